"""Resumable stages, the stage functions the applications share, and parallel jobs (see docs/architecture.md).

* :mod:`~perceptio.pipeline.runner`: :class:`Stage`, :class:`Concurrent` (stages side by side), :func:`run_stages`
  (``stages.json``) and :func:`fresh_folder` (a settings stamp beside a folder): work made with the same settings
  is kept, anything else is removed;
* :mod:`~perceptio.pipeline.stages`: render the world, train the depth tokenizer, pretrain SAM2, train Perceptio
  (and the fingerprint of the base it starts from), evaluate on a world;
* :mod:`~perceptio.pipeline.jobs`: :func:`run_jobs`, several jobs at once, one process and one thread each;
* :mod:`~perceptio.pipeline.settings`: :func:`check_limits`, the limits of a settings dataclass.
"""

from perceptio.pipeline.jobs import Job, JobsFailedError, last_line, run_jobs
from perceptio.pipeline.runner import Concurrent, Stage, fresh_folder, run_stages, stage_records, without_resume
from perceptio.pipeline.settings import check_limits
from perceptio.pipeline.stages import (
    base_fingerprint,
    pretrain_sam2,
    render_world,
    sam2_stage,
    tokenizer_stage,
    train_depth_tokenizer,
    train_perceptio,
    train_stage,
    world_eval_settings,
    world_stage,
)

__all__ = [
    "Concurrent",
    "Job",
    "JobsFailedError",
    "Stage",
    "base_fingerprint",
    "check_limits",
    "fresh_folder",
    "last_line",
    "pretrain_sam2",
    "render_world",
    "run_jobs",
    "run_stages",
    "sam2_stage",
    "stage_records",
    "tokenizer_stage",
    "train_depth_tokenizer",
    "train_perceptio",
    "train_stage",
    "world_eval_settings",
    "without_resume",
    "world_stage",
]
