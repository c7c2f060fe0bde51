"""Evaluation tasks, one module each, registered by name (``perceptio eval NAME``).

To add a benchmark, write a module here with an :class:`EvalTask` subclass decorated with :func:`register`
(``load`` its samples, ``score`` one prediction, ``summarize`` the scores; optionally ``select`` for ``--limit``,
``prompt``, ``prepare`` and ``export``) and import it below. The runner in :mod:`perceptio.eval.harness` does
batching, resuming and sharding for every task alike.
"""

from perceptio.eval.tasks import depth, mmbench, refcoco, relative_depth, vqa  # noqa: F401 - they register
from perceptio.eval.tasks.base import REGISTRY, EvalTask, UnknownTaskError, get_task, register
from perceptio.eval.tasks.mmbench import export_vlmevalkit
from perceptio.eval.tasks.relative_depth import balance_point_counts

TASKS = tuple(REGISTRY)

__all__ = [
    "REGISTRY",
    "TASKS",
    "EvalTask",
    "UnknownTaskError",
    "balance_point_counts",
    "export_vlmevalkit",
    "get_task",
    "register",
]
