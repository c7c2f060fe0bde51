"""The training recipe: typed sections loaded from YAML by :func:`perceptio.config.load_config`.

A recipe has six sections (every field has a default except the data)::

    model:     which model to build (a preset, or local InternVL + SAM2 checkpoints) and its loss weights
    data:      the datasets, their mixture weights and curriculum, and where depth targets come from
    trainable: patterns -> frozen / full / lora, and the LoRA settings
    optim:     AdamW, warm-up + cosine, clipping
    run:       steps, batch sizes, precision, checkpoints, logging, distribution
    eval:      the quick evaluation on a held-out slice

Values are checked when the recipe loads, so a wrong recipe fails before any model is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from perceptio.data.mixture import MixtureSpec

__all__ = [
    "DatasetConfig",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "SPEED_ONLY",
    "RunConfig",
    "SegmenterPretrainConfig",
    "TrainConfig",
    "TrainableConfig",
    "outcome_settings",
]

Mode = Literal["frozen", "full", "lora"]
DatasetFormat = Literal["refcoco", "hardblink", "blink", "mmbench", "conversation", "depth"]


@dataclass(frozen=True)
class ModelConfig:
    """What to build. Either ``preset`` (random or bundled weights) or ``vlm`` + ``segmenter`` (local checkpoints)."""

    preset: str | None = "tiny"
    """A model preset (``tiny``, ``smol``); set to null when loading checkpoints with ``vlm`` and ``segmenter``."""
    vlm: Path | None = None
    """A local InternVL checkpoint in transformers (-hf) format."""
    segmenter: Path | None = None
    """A local SAM2 checkpoint in transformers format."""
    depth_tokenizer: Path | None = None
    """A trained depth tokenizer (``perceptio tokenizer train``); its codes are the depth-span targets."""
    segmenter_weights: Path | None = None
    """A pretrained SAM2 (``save_pretrained`` folder, e.g. from :func:`perceptio.train.segmenter.pretrain_segmenter`)
    whose weights replace a preset's random segmenter; its architecture must equal the preset's."""
    init: Path | None = None
    """A saved Perceptio model to start from (a previous run's ``model/`` folder); replaces preset/vlm/segmenter."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights' dtype when loading checkpoints (training keeps fp32 master weights unless bfloat16 is asked for)."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Overrides of the named loss terms' weights (``text``, ``depth_token``, ... ; see the model docs)."""
    seg_multimask: bool | None = None
    """Read SAM2's three candidate masks (true) or its single-mask output (false); null keeps the model's setting.
    A segmenter pretrained on the single-mask output only (``perceptio segmenter pretrain``) wants false."""
    seed: int = 0
    """Seed of the random initialisation."""
    image_token_norm: Literal["none", "center", "standardize"] | None = None
    """What happens to the projected image tokens before the language model (see docs/model.md); null keeps the
    model's own setting (random-vision presets centre them; real checkpoints leave them as they are)."""
    image_token_pos: Literal["none", "sincos"] | None = None
    """Add a 2-D position table to the image tokens (see docs/model.md); null keeps the model's own setting."""
    vision_init_std: float | None = None
    """Re-initialise a preset's random vision tower and projector at this std (null: the preset's init)."""
    seg_prompt_rms: float | None = None
    """Rescale each segmentation prompt token to this rms with a learned gain (null: the model's own setting)."""

    def __post_init__(self) -> None:
        if self.vision_init_std is not None and self.preset is None:
            raise ValueError("vision_init_std re-initialises a random vision tower: it needs model.preset")
        sources = [self.preset is not None, self.vlm is not None or self.segmenter is not None, self.init is not None]
        if sum(sources) != 1:
            raise ValueError(
                "give exactly one model source: preset, or vlm + segmenter (local checkpoints), or init "
                f"(got preset={self.preset}, vlm={self.vlm}, segmenter={self.segmenter}, init={self.init}); "
                "set the others to null"
            )
        if (self.vlm is None) != (self.segmenter is None):
            raise ValueError("vlm and segmenter go together: give both local checkpoint folders")
        if self.preset is not None:
            from perceptio.models.presets import PRESETS  # lazy: the model classes are not needed to read a recipe

            if self.preset not in PRESETS:
                raise ValueError(f"model.preset {self.preset!r} is not a preset; the presets are {sorted(PRESETS)}")


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the mixture, read by the reader of its ``format`` (see docs/data.md)."""

    format: DatasetFormat
    """Reader: refcoco, hardblink, blink, mmbench, conversation or depth."""
    path: Path
    """The dataset's folder or file (relative paths are taken from ``data.root``)."""
    split: str | None = None
    """The split to read (refcoco: train/val/testA/..., others: stored in the samples)."""
    image_root: Path | None = None
    """Where the images are, when not next to the annotations."""
    depth: Path | None = None
    """A folder of depth maps (with a ``depth.json`` sidecar) named after the images: the depth-span targets."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra reader arguments (refcoco: ``dataset``, ``split_by``; hardblink: ``points``, ``variant``)."""
    limit: int | None = None
    """Use only the first N samples."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")


@dataclass(frozen=True)
class DataConfig:
    """The training data: datasets, mixture and depth targets."""

    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    """Name -> dataset."""
    weights: dict[str, float] = field(default_factory=dict)
    """Name -> sampling weight (default: every dataset weighted by its size)."""
    curriculum: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Name -> ``[[step, weight], ...]``: a weight that changes with the optimiser step (linear in between)."""
    root: Path | None = None
    """Base folder of relative dataset paths."""
    spatial_cot: bool = True
    """Write the depth span before the answer on spatial tasks (False: answer directly)."""
    seg_depth_span: bool = True
    """Referring-segmentation targets carry the depth span after the segmentation token (the answer order)."""
    teacher: Path | None = None
    """A local Depth Anything checkpoint that makes depth targets for images without a depth map."""
    skip_bad: bool = False
    """Skip (and report in ``bad_items.json``) unreadable items instead of stopping."""

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("data.datasets is empty; name at least one dataset (see configs/tiny_synth.yaml)")
        for where, names in (("weights", self.weights), ("curriculum", self.curriculum)):
            unknown = sorted(set(names) - set(self.datasets))
            if unknown:
                raise ValueError(
                    f"data.{where} names {unknown}, which are not in data.datasets ({sorted(self.datasets)})"
                )
        if self.weights or self.curriculum:
            self.mixture()  # the mixture's own checks, at load time

    def mixture(self, sizes: dict[str, int] | None = None) -> MixtureSpec:
        """The mixture: the recipe's weights, or the dataset sizes when it gives none."""
        weights = dict(self.weights) if self.weights else {k: float(v) for k, v in (sizes or {}).items()}
        for name in self.curriculum:
            weights.setdefault(name, 0.0)
        if not weights:
            weights = {name: 1.0 for name in self.datasets}
        return MixtureSpec(weights=weights, curriculum={k: list(v) for k, v in self.curriculum.items()})


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters for the modules the trainable policy marks ``lora``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    layers: str = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    """Regular expression over the leaf names of the linear layers that get adapters."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs r >= 1, alpha >= 1 and 0 <= dropout < 1, got {self}")


@dataclass(frozen=True)
class TrainableConfig:
    """Which parameters train, and how.

    ``rules`` maps glob patterns over parameter names (``vlm.model.language_model.*``) to a mode; rules apply in
    order and the last matching one wins; parameters no rule matches take ``default``. The model's always-frozen
    parts (the depth tokenizer, SAM2's image encoder, ...) stay frozen whatever the rules say.
    """

    default: Mode = "full"
    rules: dict[str, Mode] = field(default_factory=dict)
    new_token_rows: bool = True
    """Train the embedding (and LM-head) rows of the perception tokens when the embeddings are not ``full``."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (configs/paper_*.yaml hold the paper-scale values, Sa2VA's)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.05
    """Share of the steps spent warming up linearly."""
    min_lr_ratio: float = 0.0
    """The cosine ends at this fraction of ``lr``."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm (null: no clipping)."""
    fused: bool = True
    """AdamW's fused kernel (one call per tensor; on a CPU the tiny model's clipping and update take 4.0 ms instead
    of 6.5); false: the multi-tensor (foreach) implementation, which updates to the bit as the per-tensor loop does
    (the fused kernel rounds differently, by about 1e-7 after 200 steps)."""

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0 and 0 <= warmup_ratio < 1, got {self}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")


@dataclass(frozen=True)
class RunConfig:
    """Length, batch, precision, checkpoints and logging of a run."""

    out_dir: Path = Path("runs/train")
    steps: int = 100
    """Optimiser steps."""
    global_batch_size: int = 16
    """Samples per optimiser step over all processes (micro batch x processes x accumulation)."""
    micro_batch_size: int = 16
    """Samples per forward pass on one process."""
    seed: int = 0
    """Seed of the data order, the answer phrasings and dropout (every draw derives from (seed, step))."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU."""
    recon_precision: Literal["step", "bf16", "auto"] = "step"
    """The soft-merging loss's pass through the frozen depth decoder: ``step``, the step's precision; ``bf16``,
    bf16 autocast even in an fp32 step (on a CPU with bf16 instructions it halves that pass); ``auto``, bf16 on a
    CPU with bf16 instructions (AVX-512 BF16 or AMX), the step's precision elsewhere."""
    gradient_checkpointing: bool = False
    """Recompute the language model's activations in the backward pass (less memory, more time)."""
    device: str | None = None
    """``cpu``, ``cuda`` (default: CUDA when available; under torchrun, the local rank's GPU)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: replicate (DDP) or shard (FSDP) the model."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: none before the end)."""
    keep_checkpoints: int = 2
    log_every: int = 10
    """Steps between lines of ``train_log.jsonl``."""
    threads: int | None = None
    """torch CPU threads per process (default: torch's choice)."""
    data_workers: int = 0
    """Processes that prepare the next steps' batches (drawing, decoding, collating and, on a CPU in full precision,
    the frozen parts' share of the loss: SAM2's image features and the decoded target depth) while the model
    trains on the current one; 0: prepare each batch in the training process. The losses are the same either way."""
    feature_cache_mb: int = 0
    """Keep the frozen SAM2 image encoder's features of recently seen images, up to this many MB, instead of
    computing them again at every step (0: no cache), in each process that computes them (a data worker's when it
    prepares the frozen targets). Losses do not change; a tiny model over a few thousand images trains faster
    (about 1 MB per 64-pixel image; about 6 MB at SAM2's 1,024 pixels)."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"run.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"run.threads must be at least 1 (or null for torch's choice), got {self.threads}")
        if self.data_workers < 0:
            raise ValueError(f"run.data_workers must be >= 0, got {self.data_workers}")
        if self.feature_cache_mb < 0:
            raise ValueError(f"run.feature_cache_mb must be >= 0 (0: no cache), got {self.feature_cache_mb}")
        if self.micro_batch_size <= self.global_batch_size and self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"run.global_batch_size {self.global_batch_size} is not a multiple of run.micro_batch_size "
                f"{self.micro_batch_size}"
            )


@dataclass(frozen=True)
class EvalConfig:
    """The quick evaluation: greedy, unconstrained generation on a few held-out samples per dataset."""

    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    every: int = 0
    """Steps between quick evaluations (0: only at the end; no datasets: never)."""
    samples: int = 16
    """Samples per dataset (the first ones of the file)."""
    batch_size: int = 8


@dataclass(frozen=True)
class TrainConfig:
    """A whole training recipe."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.run.micro_batch_size > self.run.global_batch_size:
            raise ValueError(
                f"run.micro_batch_size ({self.run.micro_batch_size}) exceeds run.global_batch_size "
                f"({self.run.global_batch_size})"
            )


#: Recipe keys that change how fast a run goes, never what it computes (each is tested to give the same losses and
#: weights): a resumed run may change them, and a pipeline stage's settings leave them out.
SPEED_ONLY = ("run.data_workers", "run.feature_cache_mb")


def outcome_settings(config: TrainConfig) -> dict[str, Any]:
    """The recipe as a dict without the :data:`SPEED_ONLY` keys: what a trained model depends on."""
    settings = asdict(config)
    for key in SPEED_ONLY:
        section, name = key.split(".")
        settings[section].pop(name, None)
    return settings


@dataclass(frozen=True)
class SegmenterPretrainConfig:
    """Optimisation of the segmenter pretraining."""

    steps: int = field(default=1500, metadata={"help": "Optimiser steps.", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "Objects per step.", "min": 1})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (cosine to 0).", "min": 0.0})
    weight_decay: float = 0.01
    box_fraction: float = 0.5
    """Share of prompts that are boxes (the rest are single positive points)."""
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and sampling."})
    log_every: int = 50
    checkpoint_every: int = 500
    """Steps between resumable checkpoints (0: none)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or not 0 <= self.box_fraction <= 1:
            raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0 and 0 <= box_fraction <= 1, got {self}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError(f"need checkpoint_every >= 0, keep_checkpoints >= 1 and log_every >= 1, got {self}")
