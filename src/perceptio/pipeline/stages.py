"""The stages the applications share: render the synthetic world, train the depth tokenizer, pretrain SAM2, train
Perceptio, and the evaluation settings of a task on a world.

The quickstart, ``perceptio pretrain`` and the spatial chain-of-thought experiment all build the same upstream
(world, tokenizer, segmenter) and train and evaluate the same way; these functions are that one way. Each writes
into the folder it is given and knows nothing of stage records: :mod:`perceptio.pipeline.runner` decides whether
it runs, resumes or is reused. Heavy imports stay inside the functions, so that importing the pipeline (as every
job process of :mod:`perceptio.pipeline.jobs` does) stays cheap.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perceptio.pipeline.runner import Stage, without_resume

if TYPE_CHECKING:
    from perceptio.eval.harness import EvalSettings
    from perceptio.train.config import TrainConfig

__all__ = [
    "base_fingerprint",
    "pretrain_sam2",
    "sam2_stage",
    "tokenizer_stage",
    "train_stage",
    "world_stage",
    "render_world",
    "train_depth_tokenizer",
    "train_perceptio",
    "world_eval_settings",
]


def render_world(folder: Path, *, num_images: int, seed: int, image_size: int, progress: bool = True) -> None:
    """Render the synthetic world (train/val/test, every format) into ``folder``, replacing what is there."""
    from perceptio.data.synthetic import WorldConfig, default_render_workers, generate_world

    generate_world(
        folder,
        num_images=num_images,
        seed=seed,
        config=WorldConfig(image_size=image_size),
        overwrite=True,
        progress=progress,
        workers=default_render_workers(num_images),  # the same files with any number of workers
    )


def train_depth_tokenizer(world: Path, folder: Path, *, steps: int, resume: bool, progress: bool = True) -> None:
    """Train the ``tiny`` depth tokenizer on the exact depth of ``world``'s train split into ``folder``.

    With ``resume``, continue from the newest checkpoint when there is one (a run killed before its first
    checkpoint starts again)."""
    from perceptio.tokenizers.depth.pipeline import train_from_folder
    from perceptio.tokenizers.depth.train import TokenizerTrainConfig
    from perceptio.utils.checkpoints import latest_checkpoint

    train_from_folder(
        world,
        folder,
        preset="tiny",
        train_config=TokenizerTrainConfig(steps=steps, checkpoint_every=500),
        resume=resume and latest_checkpoint(folder) is not None,
        progress=progress,
    )


def pretrain_sam2(
    world: Path, folder: Path, *, steps: int, batch_size: int, resume: bool = False, progress: bool = True
) -> None:
    """Pretrain the ``tiny`` SAM2 with point and box prompts on ``world``'s train-split object masks.

    With ``resume``, continue from the newest checkpoint when there is one (a run killed before its first
    checkpoint starts again)."""
    from perceptio.train.config import SegmenterPretrainConfig
    from perceptio.train.segmenter import pretrain_on_refer
    from perceptio.utils.checkpoints import latest_checkpoint

    config = SegmenterPretrainConfig(steps=steps, batch_size=batch_size)
    resume = resume and latest_checkpoint(folder) is not None
    pretrain_on_refer(world, folder, config, progress=progress, resume=resume)


def base_fingerprint(base: Path | None) -> str | None:
    """What identifies the pretrained base a training starts from in its settings digest: the base's checksums
    (``SHA256SUMS``), so that a base retrained in the same folder retrains what was fine-tuned from it; its
    resolved path when it has none; None for random weights."""
    if base is None:
        return None
    sums = Path(base) / "SHA256SUMS"
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"the base model {base} has no config.json; make one with `perceptio pretrain`, "
            "or start from random weights (`perceptio quickstart --from-scratch`; no --base elsewhere)"
        )
    return sums.read_text() if sums.is_file() else str(Path(base).resolve())


def train_perceptio(recipe: TrainConfig, *, resume: bool, progress: bool = True) -> None:
    """Train Perceptio as ``recipe`` says into its ``run.out_dir``.

    With ``resume``, continue from the newest checkpoint when there is one; otherwise start over, replacing an
    earlier run's outputs (the caller has decided they are stale)."""
    from perceptio.tokenizers.depth.pipeline import default_cache_dir
    from perceptio.train.loop import train
    from perceptio.utils.checkpoints import latest_checkpoint

    resume = resume and latest_checkpoint(recipe.run.out_dir) is not None
    train(recipe, resume=resume, overwrite=not resume, progress=progress, cache_dir=default_cache_dir())


def world_eval_settings(
    world: Path,
    task: str,
    split: str,
    *,
    model: Path,
    out: Path,
    limit: int | None,
    batch_size: int,
    constrain: bool,
    first_mask: bool = False,
) -> EvalSettings:
    """The evaluation of ``model`` on ``task`` (refcoco, hardblink, depth or vqa) of a synthetic world's ``split``,
    resumable, into ``out``; run it with :func:`perceptio.eval.harness.run_eval` (``first_mask``: see
    :class:`~perceptio.eval.settings.EvalSettings`)."""
    from perceptio.eval.harness import EvalSettings

    data = {
        "refcoco": world,
        "hardblink": world / "hardblink" / split,
        "depth": world,
        "vqa": world / "vqa" / f"{split}.json",
    }
    if task not in data:
        raise ValueError(f"a synthetic world has no {task!r} evaluation; it has {sorted(data)}")
    return EvalSettings(
        task=task,
        model=model,
        data=data[task],
        out=out,
        split=split,
        image_root=world / "images" if task in ("refcoco", "vqa") else None,
        limit=limit,
        batch_size=batch_size,
        resume=True,
        constrain=constrain,
        first_mask=first_mask,
    )


# The stages the applications share, with the settings that enter their digests (kept as they were, so that runs
# made before these helpers existed are still recognised).


def world_stage(folder: Path, *, num_images: int, seed: int, image_size: int, progress: bool = True) -> Stage:
    """The ``world`` stage: :func:`render_world` into ``folder``."""
    run = without_resume(
        render_world, folder, num_images=num_images, seed=seed, image_size=image_size, progress=progress
    )
    return Stage("world", (num_images, seed, image_size), run, folder=folder)


def tokenizer_stage(world: Path, folder: Path, *, steps: int, progress: bool = True) -> Stage:
    """The resumable ``tokenizer`` stage: :func:`train_depth_tokenizer` on ``world`` into ``folder``."""
    return Stage(
        "tokenizer",
        (steps,),
        partial(train_depth_tokenizer, world, folder, steps=steps, progress=progress),
        folder=folder,
        resumable=True,
    )


def sam2_stage(world: Path, folder: Path, *, steps: int, batch_size: int, progress: bool = True) -> Stage:
    """The resumable ``segmenter`` stage: :func:`pretrain_sam2` on ``world`` into ``folder``."""
    return Stage(
        "segmenter",
        (steps, batch_size),
        partial(pretrain_sam2, world, folder, steps=steps, batch_size=batch_size, progress=progress),
        folder=folder,
        resumable=True,
    )


def train_stage(recipe: TrainConfig, *extra_settings: Any, progress: bool = True) -> Stage:
    """The resumable ``train`` stage: :func:`train_perceptio` of ``recipe`` into its ``run.out_dir``. Its settings
    are what the model depends on (speed-only keys aside) and ``extra_settings`` (e.g. the base's fingerprint)."""
    from perceptio.train.config import outcome_settings

    return Stage(
        "train",
        (outcome_settings(recipe), *extra_settings),
        partial(train_perceptio, recipe, progress=progress),
        folder=Path(recipe.run.out_dir),
        resumable=True,
    )
