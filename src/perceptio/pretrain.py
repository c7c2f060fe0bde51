"""The pretrained tiny base: ``perceptio pretrain``, the tiny counterpart of "pretrained InternVL + SAM2".

The paper fine-tunes Perceptio from backbones that already know how to look. Ours cannot be downloaded, so the
project pretrains tiny ones on a large synthetic world (a different seed from the quickstart's world) and ships
the result. Stages, each written under ``out`` and reused once finished (``stages.json``, as in the quickstart):

1. ``world/``: render the world (``num_images`` scenes);
2. ``alignment``: write the alignment conversations (scene descriptions, closest object) into ``world/alignment``;
3. ``tokenizer/``: train the tiny depth tokenizer on the world's exact depth;
4. ``segmenter/``: pretrain the tiny SAM2 with point and box prompts;
5. ``train/``: train the tiny VLM with the base recipe (``configs/tiny_base.yaml``): text-only alignment tasks
   and VQA, no spatial tokens; resumable;
6. ``base/``: the exported model (``save_model``) with ``MODEL_CARD.md`` and ``SHA256SUMS``.

The base is a whole Perceptio model folder (its depth tokenizer and SAM2 included), so fine-tuning starts from it
with ``model.init`` and nothing else to point at.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceptio.pipeline import (
    Concurrent,
    Stage,
    check_limits,
    run_stages,
    sam2_stage,
    stage_records,
    tokenizer_stage,
    train_stage,
    world_stage,
)

__all__ = ["PretrainConfig", "run_pretrain"]


@dataclass(frozen=True)
class PretrainConfig:
    """What ``perceptio pretrain`` runs; each field's ``help`` and limits are checked here as on the command line.
    The world's seed is not the quickstart world's (0): the base never sees the images Perceptio is evaluated on."""

    out: Path = field(
        default=Path("runs/base"), metadata={"help": "Run folder; the base model is written to OUT/base."}
    )
    recipe: Path = field(default=Path("configs/tiny_base.yaml"), metadata={"help": "The base recipe."})
    overrides: tuple[str, ...] = field(
        default=(), metadata={"help": "key=value overrides of the base recipe, e.g. run.steps=2000."}
    )
    world: Path | None = field(
        default=None,
        metadata={"help": "Use this rendered world (perceptio data synth) instead of rendering one."},
    )
    num_images: int = field(default=20000, metadata={"help": "Images in the pretraining world.", "min": 10})
    world_seed: int = field(default=1, metadata={"help": "Seed of the pretraining world (not the quickstart's 0)."})
    image_size: int = field(default=128, metadata={"help": "Side of the world's square images, in pixels."})
    tokenizer_steps: int = field(default=1500, metadata={"help": "Depth-tokenizer training steps.", "min": 1})
    segmenter_steps: int = field(default=1500, metadata={"help": "SAM2 pretraining steps.", "min": 1})
    segmenter_batch_size: int = field(default=32, metadata={"help": "SAM2 pretraining batch size.", "min": 1})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    command: str | None = field(
        default=None, metadata={"help": "The command line that made the base, written on its model card."}
    )

    def __post_init__(self) -> None:
        check_limits(self)


def _manifest(world: Path) -> str:
    manifest = world / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: --world must be a folder written by `perceptio data synth`")
    return manifest.read_text()


def _recipe(config: PretrainConfig):  # noqa: ANN202 - TrainConfig
    from perceptio.config import load_config
    from perceptio.train.config import TrainConfig

    out = Path(config.out)
    pointed = [
        f"data.root={config.world or out / 'world'}",
        f"model.depth_tokenizer={out / 'tokenizer'}",
        f"model.segmenter_weights={out / 'segmenter'}",
        f"run.out_dir={out / 'train'}",
    ]
    return load_config(TrainConfig, config.recipe, pointed + list(config.overrides))


def run_pretrain(config: PretrainConfig, *, echo: Callable[[str], None] = print) -> Path:
    """Run (or resume) every stage; returns the base model's folder."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(config)
    paths = {name: out / name for name in ("world", "tokenizer", "segmenter", "train", "base")}
    if config.world is not None:
        paths["world"] = Path(config.world)
    world = paths["world"]
    if config.world is None:
        rendered = world_stage(
            world,
            num_images=config.num_images,
            seed=config.world_seed,
            image_size=config.image_size,
            progress=config.progress,
        )
    else:  # the user's world is read, never removed
        rendered = Stage("world", (_manifest(world),), lambda resume: None)
    stages = [
        rendered,
        Stage("alignment", (), lambda resume: _alignment(world, echo)),
        Concurrent(  # side by side, one core each: SAM2 trains no faster on two threads, the tokenizer 1.2x
            (
                tokenizer_stage(world, paths["tokenizer"], steps=config.tokenizer_steps, progress=config.progress),
                sam2_stage(
                    world,
                    paths["segmenter"],
                    steps=config.segmenter_steps,
                    batch_size=config.segmenter_batch_size,
                    progress=config.progress,
                ),
            )
        ),
        train_stage(recipe, progress=config.progress),
        Stage(
            "base",
            (config.command,),
            lambda resume: _export(config, paths, stage_records(out / "stages.json")),
            folder=paths["base"],
        ),
    ]
    run_stages(stages, out / "stages.json", echo=echo)
    return paths["base"]


def _world_line(config: PretrainConfig, world: Path) -> str:
    if config.world is None:
        return f"{config.num_images} images, seed {config.world_seed}, {config.image_size} px"
    manifest = json.loads(_manifest(world))
    size = manifest.get("config", {}).get("image_size")
    return f"`{world}`: {manifest.get('num_images')} images, seed {manifest.get('seed')}, {size} px"


def _image_use(recipe, base: Path) -> dict[str, dict[str, Any]]:  # noqa: ANN001 - TrainConfig
    """The exported base's image-use gap on the recipe's eval datasets (see perceptio.train.image_use)."""
    from perceptio.models import load_model
    from perceptio.train.data import TrainingData
    from perceptio.train.image_use import image_use_gap

    if not recipe.eval.datasets:
        return {}
    model, processor = load_model(base)
    data = TrainingData.from_config(recipe.data, model.depth_tokenizer, specs=recipe.eval.datasets, progress=False)
    return image_use_gap(model, processor, data, samples=128)


def _alignment(world: Path, echo: Callable[[str], None]) -> None:
    from perceptio.data.synthetic.alignment import write_alignment

    counts = write_alignment(world)
    echo(f"alignment conversations: {counts}")


def _export(config: PretrainConfig, paths: dict[str, Path], timings: dict[str, dict[str, Any]]) -> None:
    from perceptio.utils.jsonl import read_jsonl
    from perceptio.weights import export_model

    model = paths["train"] / "model"
    logs = [r for r in read_jsonl(paths["train"] / "train_log.jsonl") if "loss" in r]
    eval_log = paths["train"] / "eval_log.jsonl"
    evals = list(read_jsonl(eval_log)) if eval_log.is_file() else []
    recipe = _recipe(config)
    lines = [
        "# Perceptio tiny base",
        "",
        "The tiny counterpart of a pretrained InternVL + SAM2 + depth tokenizer: a `tiny`-preset Perceptio model "
        "whose vision tower, projector and language model were trained on text-only alignment tasks (scene "
        "descriptions left to right and near to far, the closest object's colour, VQA) on a synthetic world that "
        "the quickstart never evaluates on. It knows no spatial tokens (no segmentation token, no depth spans): "
        "those are learned when Perceptio is fine-tuned from it (`model.init`).",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{config.command or 'perceptio pretrain'}` |",
        f"| recipe | `{config.recipe}` {' '.join(config.overrides)} |",
        f"| world | {_world_line(config, paths['world'])} |",
        f"| steps | {recipe.run.steps} of batch {recipe.run.global_batch_size}, seed {recipe.run.seed} |",
        f"| depth tokenizer | {config.tokenizer_steps} steps on the world's exact depth |",
        f"| SAM2 | {config.segmenter_steps} steps of batch {config.segmenter_batch_size}, point and box prompts |",
        f"| final training loss | {logs[-1]['loss']:.4f} |" if logs else "| final training loss | n/a |",
    ]
    for name, record in timings.items():
        if "seconds" in record:
            lines.append(f"| wall time, {name} | {record['seconds']} s |")
    for record in evals:
        figures = ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "step" and isinstance(v, float))
        where = f"step {record.get('step')}, val, up to {recipe.eval.samples} samples"
        lines.append(f"| quick eval ({where}) | {figures} |")
    for name, gap in _image_use(recipe, model).items():
        lines.append(
            f"| image-use gap, {name} (val) | {gap['gap']:+.3f} nats (loss {gap['real']['loss']:.3f} with the right "
            f"images, {gap['shuffled']['loss']:.3f} shuffled; {gap['count']} examples) |"
        )
    export_model(model, paths["base"], lines)
