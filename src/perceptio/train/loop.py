"""The training loop behind ``perceptio train``: one process, or many under ``torchrun`` (DDP or FSDP).

One optimiser step draws ``run.global_batch_size`` samples from the mixture (a function of ``(seed, step)``),
cuts them into micro batches of ``run.micro_batch_size`` and deals micro batch ``k`` to process ``k % world``;
each process accumulates its share, DDP averages the gradients. Every process therefore sees the same global
batch whatever the number of processes, and the averaged gradient equals the single-process one.

Run folder (``run.out_dir``)::

    config.yaml, environment.json   the resolved recipe, package versions, git revision
    trainable.txt                   the trainable-policy table
    train_log.jsonl                 per logged step: loss, named terms, per-task losses, lr, samples/s, mixture
    eval_log.jsonl                  quick evaluations
    checkpoints/step-NNNNNNN/       resumable checkpoints (the newest run.keep_checkpoints)
    model/                          the final model (LoRA merged) with its text tokenizer
    training.json                   summary
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from perceptio.config import ConfigError, config_to_dict, write_run_record
from perceptio.data.errors import BadItemReport
from perceptio.data.mixture import MixtureSampler
from perceptio.errors import NonFiniteLossError
from perceptio.losses import IGNORE_INDEX
from perceptio.models.build import BUILD_OPTIONS, build_preset, from_components, load_model, save_model
from perceptio.models.configuration_perceptio import DEFAULT_LOSS_WEIGHTS
from perceptio.models.feature_cache import FeatureCache
from perceptio.models.lora import merge_lora
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.models.processing import PerceptioProcessor
from perceptio.train.config import SPEED_ONLY, ModelConfig, TrainConfig
from perceptio.train.data import TrainingData, collate
from perceptio.train.optim import accumulation_steps, build_optimizer, warmup_cosine
from perceptio.train.policy import apply_policy
from perceptio.train.quick_eval import quick_eval
from perceptio.utils.checkpoints import (
    gather_state,
    last_good_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from perceptio.utils.distributed import Distributed, setup_distributed
from perceptio.utils.jsonl import read_jsonl
from perceptio.utils.packing import pack, unpack
from perceptio.utils.run_folder import require_same_settings
from perceptio.utils.runlock import run_lock

__all__ = ["NonFiniteLossError", "TrainResult", "build_model", "train"]

logger = logging.getLogger(__name__)

#: Recipe keys that may change between a checkpoint and its resumption (they do not change the trajectory).
_RESUMABLE_CHANGES = (
    "run.out_dir",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.device",
    "run.threads",
    *SPEED_ONLY,
    "eval",
    "optim.lr",  # the usual fixes after a non-finite loss: they change the trajectory from the checkpoint on
    "optim.warmup_ratio",
    "optim.grad_clip",
)

#: What a run writes into its folder (a fresh run refuses to mix with an earlier one's).
_RUN_OUTPUTS = (
    "checkpoints",
    "model",
    "tensorboard",
    "train_log.jsonl",
    "eval_log.jsonl",
    "training.json",
    "bad_items.json",
    "trainable.txt",
)


@dataclass
class TrainResult:
    """What :func:`train` returns: where things are, and the last logged and evaluated figures."""

    out_dir: Path
    model_dir: Path | None
    steps: int
    resumed_from: int
    last_log: dict[str, Any]
    last_eval: dict[str, float]


def build_model(config: ModelConfig) -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    """The model and processor a recipe's ``model`` section names (before any trainable policy)."""
    options = {k: v for k in BUILD_OPTIONS if (v := getattr(config, k)) is not None}
    if config.init is not None:
        model, processor = load_model(config.init)
        if "seg_prompt_rms" in options and options["seg_prompt_rms"] != model.config.seg_prompt_rms:
            model.set_seg_prompt_rms(options["seg_prompt_rms"])  # the prompt scale may change when fine-tuning
        if "seg_multimask" in options and options["seg_multimask"] != model.config.seg_multimask:
            model.set_seg_multimask(options["seg_multimask"])  # so may the SAM2 output the segmentation token reads
        changed = {k: v for k, v in options.items() if getattr(model.config, k) != v}
        if changed:
            raise ValueError(
                f"model.init {config.init} was trained with { ({k: getattr(model.config, k) for k in changed}) }; "
                f"a started model cannot change {sorted(changed)}: leave them null"
            )
    elif config.preset is not None:
        model, processor = build_preset(config.preset, seed=config.seed, **options)
    else:
        dtype = torch.bfloat16 if config.dtype == "bfloat16" else None
        model, processor = from_components(config.vlm, config.segmenter, config.depth_tokenizer, dtype=dtype, **options)
    if config.depth_tokenizer is not None and config.vlm is None:
        model.load_depth_tokenizer(config.depth_tokenizer)
    if config.segmenter_weights is not None:
        model.load_segmenter(config.segmenter_weights)
    unknown = sorted(set(config.loss_weights) - set(DEFAULT_LOSS_WEIGHTS))
    if unknown:
        raise ValueError(f"model.loss_weights: unknown term(s) {unknown}; the terms are {sorted(DEFAULT_LOSS_WEIGHTS)}")
    model.config.loss_weights = {**model.config.loss_weights, **config.loss_weights}
    return model, processor


def _data_digest(data: TrainingData) -> str:
    digest = hashlib.sha256()
    for name in sorted(data.datasets):
        digest.update(name.encode())
        for sample in data.datasets[name]:
            digest.update(sample.sample_id.encode())
    return digest.hexdigest()[:16]


def _check_resumable(state: dict, config: TrainConfig, digest: str, folder: Path) -> None:
    require_same_settings(
        folder,
        state.get("config", {}),
        config_to_dict(config),
        may_change=_RESUMABLE_CHANGES,
        fix="Resume with the recipe that wrote the checkpoint (its config.yaml), or start a new run in another "
        "run.out_dir",
    )
    if state.get("data_digest") != digest:
        raise ValueError(
            f"{folder}: the training data differ from the checkpoint's (digest {state.get('data_digest')} vs "
            f"{digest}); resume with the same datasets"
        )


def _per_sample_text_loss(logits: torch.Tensor, labels: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Token cross-entropy per sample (every target token), for the per-task losses of the log; ``logits`` are
    those of positions ``start`` on (``PerceptioOutput.logits_start``)."""
    targets = labels[:, start + 1 :]
    supervised = targets != IGNORE_INDEX
    losses = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)  # 0 where unsupervised
    losses[supervised] = F.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised], reduction="none")
    return losses.sum(1) / supervised.sum(1).clamp_min(1)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _plain(module: nn.Module) -> PerceptioForConditionalGeneration:
    inner = _unwrap(module)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _writer(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train as ``config`` says and save the final model to ``run.out_dir/model``.

    Args:
        config: the recipe.
        resume: continue from the newest checkpoint in ``run.out_dir`` (an error if there is none).
        overwrite: delete an earlier run's outputs in ``run.out_dir`` (without it, a fresh run refuses them).
        progress: progress bars (on the main process).
        cache_dir: where network-teacher depth maps are cached.

    Raises:
        NonFiniteLossError: a NaN or infinite loss; the newest checkpoint is the last good state.
        RunFolderLockedError: another process trains (or evaluates) in ``run.out_dir``.
    """
    with run_lock(config.run.out_dir, "training"):  # under torchrun: rank 0 holds it for the job
        return _train(config, resume=resume, overwrite=overwrite, progress=progress, cache_dir=cache_dir)


class _StepBatches(torch.utils.data.Dataset):
    """This process's batches of each training step from ``start`` on: the names of the datasets drawn; per micro
    batch of this rank, (chunk index, the examples' tasks, the collated batch with ``gt_masks``, and with ``frozen``,
    its :meth:`~PerceptioForConditionalGeneration.frozen_targets`, when a ``model`` computes them here); and then
    (the preparing process, its frozen-feature cache's figures), or None. Every example draws from a generator
    seeded with (seed, step, position), so the batches are the same whichever process prepares them and whenever."""

    def __init__(self, sampler, data, processor, run, rank: int, world: int, start: int, model=None) -> None:  # noqa: ANN001
        self.sampler, self.data, self.processor, self.run = sampler, data, processor, run
        self.rank, self.world, self.start, self.model = rank, world, start, model

    def __len__(self) -> int:
        return self.run.steps - self.start

    def __getitem__(self, index: int) -> tuple[list[str], list[tuple[int, list[str], dict]], Any]:
        run, step = self.run, self.start + index
        pairs = self.sampler.batch(step, run.global_batch_size)
        chunks = [list(range(k, k + run.micro_batch_size)) for k in range(0, len(pairs), run.micro_batch_size)]
        mine = []
        for chunk_index, chunk in enumerate(chunks):
            if chunk_index % self.world != self.rank:
                continue
            examples = [self.data.example(*pairs[p], np.random.default_rng([run.seed, step, p])) for p in chunk]
            batch = collate(examples, self.processor)
            if self.model is not None:
                batch["frozen"] = self.model.frozen_targets(
                    batch["input_ids"], batch["labels"], batch.get("sam_pixel_values"), batch["gt_masks"]
                )
            mine.append((chunk_index, [e.task for e in examples], batch))
        cache = None
        if self.model is not None and self.model.sam_feature_cache is not None:
            worker = torch.utils.data.get_worker_info()
            cache = (-1 if worker is None else worker.id, _cache_stats(self.model.sam_feature_cache))
        return [name for name, _ in pairs], mine, cache

    def __iter__(self):  # noqa: ANN204 - in-process preparation, one step at a time
        return (self[i] for i in range(len(self)))

    def loader(self, workers: int) -> Iterator[tuple[list[str], list[tuple[int, list[str], dict]], Any]]:
        """The items prepared ahead by ``workers`` processes (two steps each), in step order. A worker hands an item
        over packed in one buffer: each tensor handed over on its own would cost this process about 0.2 ms."""
        loader = torch.utils.data.DataLoader(
            self,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=2,
            worker_init_fn=_one_thread,
            collate_fn=pack,
        )
        return (unpack(packed) for packed in loader)


def _one_thread(_: int) -> None:  # a data worker's torch work is small: do not compete with training for cores
    torch.set_num_threads(1)


def _train(
    config: TrainConfig, *, resume: bool, overwrite: bool, progress: bool, cache_dir: Path | None
) -> TrainResult:
    ctx = setup_distributed(config.run.device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    _prepare_folder(config, ctx, resume=resume, overwrite=overwrite)
    run = _set_up(config, ctx, cache_dir=cache_dir, show=progress and ctx.main)
    window = _LogWindow()
    start = _resume(run, window) if resume else 0
    last_log, last_eval = _loop(run, window, start)
    return _finish(run, start, last_log, last_eval)


def _prepare_folder(config: TrainConfig, ctx: Distributed, *, resume: bool, overwrite: bool) -> None:
    """Refuse what cannot work before anything is built or written: a batch that does not divide, ``--resume``
    without a checkpoint, an earlier run in the folder (deleted with ``overwrite``), FSDP with LoRA."""
    run, out_dir = config.run, Path(config.run.out_dir)
    accumulation_steps(run.global_batch_size, run.micro_batch_size, ctx.world)
    if resume and latest_checkpoint(out_dir) is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}; start without --resume")
    earlier = [name for name in _RUN_OUTPUTS if (out_dir / name).exists()]
    if not resume and earlier and ctx.main:
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} holds an earlier run ({', '.join(earlier)}); pass --resume to continue it, --overwrite "
                "to replace it, or choose another run.out_dir"
            )
        for name in earlier:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if run.distributed == "fsdp" and "lora" in (config.trainable.default, *config.trainable.rules.values()):
        raise ValueError("run.distributed=fsdp is for full fine-tuning; LoRA runs fit with ddp (the default)")


@dataclass
class _Run:
    """What a training run works with once it is set up."""

    config: TrainConfig
    ctx: Distributed
    show: bool
    processor: PerceptioProcessor
    trainable: nn.Module
    """The model with its trainable policy applied (a ``PeftModel`` under LoRA)."""
    engine: nn.Module
    """What the steps run: ``trainable``, or its DDP / FSDP wrapping."""
    optimizer: torch.optim.Optimizer
    data: TrainingData
    eval_data: TrainingData | None
    mixture: Any
    sampler: MixtureSampler
    digest: str
    writer: Any
    began: float = 0.0
    """When this process's steps began (``time.perf_counter``)."""
    prepared_cache: dict[int, dict[str, int]] = field(default_factory=dict)
    """The frozen-feature cache's figures of each process that prepares batches (by data worker, -1: this one)
    when the frozen targets are computed there."""

    @property
    def out_dir(self) -> Path:
        return Path(self.config.run.out_dir)

    @property
    def accumulation(self) -> int:
        run = self.config.run
        return accumulation_steps(run.global_batch_size, run.micro_batch_size, self.ctx.world)


def _set_up(config: TrainConfig, ctx: Distributed, *, cache_dir: Path | None, show: bool) -> _Run:
    """Build the model and the data, apply the trainable policy, write the run records, wrap the model for
    distributed training and make the optimiser."""
    run, out_dir = config.run, Path(config.run.out_dir)
    _check_inputs(config)  # before the model is built: a missing folder should not cost a model build first
    torch.manual_seed(config.model.seed)
    model, processor = build_model(config.model)
    model.cache_frozen_features(run.feature_cache_mb * 2**20)
    report = BadItemReport() if config.data.skip_bad else None
    data = TrainingData.from_config(
        config.data, model.depth_tokenizer, report=report, cache_dir=cache_dir, progress=show
    )
    eval_data = None
    if config.eval.datasets:
        eval_data = TrainingData.from_config(
            config.data, model.depth_tokenizer, specs=config.eval.datasets, cache_dir=cache_dir, progress=show
        )
    mixture = config.data.mixture(data.sizes())
    sampler = MixtureSampler(data.sizes(), mixture, seed=run.seed)

    trainable, plan = apply_policy(model, config.trainable)
    if run.gradient_checkpointing:
        _plain(trainable).vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable.to(ctx.device)
    table = plan.table(trainable)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(out_dir, config)
        (out_dir / "trainable.txt").write_text(table + "\n")
        if report is not None and report.items:
            report.write(out_dir / "bad_items.json")
        if show:
            print(table)
            sizes = ", ".join(f"{k} {v}" for k, v in data.sizes().items())
            print(f"data: {sizes}; mixture at step 0: {mixture.weights_at(0)}")
    engine = _distributed_engine(trainable, config, ctx)
    optim = config.optim
    optimizer = build_optimizer(
        engine, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, fused=optim.fused
    )
    return _Run(
        config=config,
        ctx=ctx,
        show=show,
        processor=processor,
        trainable=trainable,
        engine=engine,
        optimizer=optimizer,
        data=data,
        eval_data=eval_data,
        mixture=mixture,
        sampler=sampler,
        digest=_data_digest(data),
        writer=_writer(out_dir) if ctx.main else None,
    )


def _distributed_engine(trainable: nn.Module, config: TrainConfig, ctx: Distributed) -> nn.Module:
    """``trainable`` sharded with FSDP (each language-model layer, then the whole), wrapped in DDP, or itself."""
    if ctx.active and config.run.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _plain(trainable).vlm.model.language_model.layers:
            fully_shard(layer)
        fully_shard(trainable)
        return trainable
    if ctx.active:
        return nn.parallel.DistributedDataParallel(
            trainable, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    return trainable


class _LogWindow:
    """What the next log line averages: per-step values, per-task (loss sum, sample count), the datasets drawn,
    and the seconds spent in steps. A checkpoint between two log lines saves it, so that the line after a resume
    averages the same steps as the uninterrupted run's."""

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = defaultdict(list)
        self.tasks: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.drawn: Counter[str] = Counter()
        self.seconds = 0.0

    def restore(self, saved: dict[str, Any], ctx: Distributed) -> None:
        self.steps.update({k: list(v) for k, v in saved.get("steps", {}).items()})
        if ctx.main:  # the saved sums are over every process already
            self.tasks.update({k: list(v) for k, v in saved.get("tasks", {}).items()})
        self.drawn.update(saved.get("drawn", {}))

    def add_samples(self, tasks: list[str], losses: list[float]) -> None:
        for task, value in zip(tasks, losses, strict=True):
            self.tasks[task][0] += value
            self.tasks[task][1] += 1

    def add_step(self, sums: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.steps["loss"].append(float(sums[0]))
        for i, name in enumerate(DEFAULT_LOSS_WEIGHTS):
            self.steps[name].append(float(sums[i + 1]))
        if grad_norm is not None:
            self.steps["grad_norm"].append(float(grad_norm))

    def line(self, run: _Run, step: int, lr: float) -> dict[str, Any]:
        """The log record of the window ending at ``step`` (collective under distributed training)."""
        steps = self.steps
        return {
            "step": step + 1,
            "loss": float(np.mean(steps["loss"])),
            "lr": lr,
            "samples_per_s": run.config.run.global_batch_size * len(steps["loss"]) / max(self.seconds, 1e-9),
            "terms": {k: float(np.mean(steps[k])) for k in DEFAULT_LOSS_WEIGHTS},
            "grad_norm": float(np.mean(steps["grad_norm"])) if steps["grad_norm"] else None,
            "task_text_loss": _task_means(self.tasks, run.ctx),
            "mixture": {k: round(v, 4) for k, v in run.mixture.weights_at(step).items()},
            "drawn": dict(sorted(self.drawn.items())),
            "seconds": time.perf_counter() - run.began,
        }

    def saved(self, ctx: Distributed) -> dict[str, Any]:
        """The window as a checkpoint keeps it (collective: every process's samples since the last log line)."""
        tasks = _task_sums(self.tasks, ctx)
        return {"steps": dict(self.steps), "tasks": tasks, "drawn": dict(self.drawn)}

    def clear(self) -> None:
        self.steps.clear()
        self.tasks.clear()
        self.drawn.clear()
        self.seconds = 0.0


def _resume(run: _Run, window: _LogWindow) -> int:
    """Load the newest checkpoint into the model and optimiser, check it was written by this recipe and data,
    cut the logs back to it and restore the log window; returns its step."""
    checkpoint = latest_checkpoint(run.out_dir)
    state = load_checkpoint(checkpoint, run.engine, run.optimizer)
    _check_resumable(state, run.config, run.digest, checkpoint)
    start = int(state["step"])
    if run.ctx.main:
        for path in (run.out_dir / "train_log.jsonl", run.out_dir / "eval_log.jsonl"):
            kept = [line for line in read_jsonl(path) if line["step"] <= start]  # later lines are written again
            if path.is_file():
                path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        logger.info("resumed from %s (step %d)", checkpoint, start)
    window.restore(state.get("log_window", {}), run.ctx)
    return start


def _loop(run: _Run, window: _LogWindow, start: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Steps ``start`` to ``run.steps``, with log lines, checkpoints and quick evaluations; returns the last log
    record and quick-evaluation metrics."""
    config, ctx, cfg = run.config, run.ctx, run.config.run
    warmup = round(config.optim.warmup_ratio * cfg.steps)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not run.show)
    last_log: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    run.began = time.perf_counter()
    run.trainable.train()
    # On a CPU in full precision, the frozen parts' share of each loss (SAM2's image features, the decoded target
    # depth) is computed where the batch is prepared: by the data worker, beside training, as the forward pass
    # would compute it (the same loss). A GPU computes it in the forward pass, under the step's autocast, and so
    # does FSDP, whose sharded weights are gathered only inside the forward pass.
    sharded = ctx.active and config.run.distributed == "fsdp"
    ahead = ctx.device.type == "cpu" and not _bf16(run) and not sharded
    model = _plain(run.trainable) if ahead else None
    steps = _StepBatches(run.sampler, run.data, run.processor, cfg, ctx.rank, ctx.world, start, model)
    prepared = iter(steps) if not cfg.data_workers else steps.loader(cfg.data_workers)
    for step in bar:
        tick = time.perf_counter()
        factor = warmup_cosine(step, warmup_steps=warmup, total_steps=cfg.steps, min_lr_ratio=config.optim.min_lr_ratio)
        lr = config.optim.lr * factor
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        names, mine, cache = next(prepared)
        if cache is not None:
            run.prepared_cache[cache[0]] = cache[1]
        window.drawn.update(names)
        sums, grad_norm = _step(run, step, mine, window)
        window.seconds += time.perf_counter() - tick
        done = step + 1
        window.add_step(sums, grad_norm)
        if run.show:  # the bar shows this step's loss; the log line averages the window
            bar.set_postfix(loss=f"{float(sums[0]):.3f}", lr=f"{lr:.1e}", refresh=False)
        if done % cfg.log_every == 0 or done == cfg.steps:
            last_log = window.line(run, step, lr)
            if ctx.main:
                _write_log_line(run, last_log)
                bar.set_postfix(loss=f"{float(sums[0]):.3f}", lr=f"{lr:.1e}", sps=f"{last_log['samples_per_s']:.1f}")
            window.clear()
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _checkpoint(run, done, step, window)
        evaluate_now = config.eval.every and done % config.eval.every == 0 and done < cfg.steps
        if run.eval_data is not None and evaluate_now:
            last_eval = _evaluate(run, done)
    bar.close()
    return last_log, last_eval


def _step(
    run: _Run, step: int, mine: list[tuple[int, list[str], dict]], window: _LogWindow
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimiser step over this process's micro batches: forward and backward each (gradients accumulate,
    DDP synchronises on the last), clip, refuse a non-finite loss or gradient, update. Returns the loss and its
    terms averaged over every process (``sums``: total, then ``DEFAULT_LOSS_WEIGHTS``' order) and the gradient
    norm."""
    config, ctx, engine = run.config, run.ctx, run.engine
    cfg = config.run
    bf16 = _bf16(run)
    recon_dtype = _recon_dtype(cfg.recon_precision, ctx.device)
    sums = torch.zeros(len(DEFAULT_LOSS_WEIGHTS) + 1, dtype=torch.float64)
    for j, (chunk_index, tasks, batch) in enumerate(mine):
        gt_masks, frozen = batch.pop("gt_masks"), batch.pop("frozen", None)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + chunk_index)  # dropout, the same on any layout
        sync = j == len(mine) - 1 or not isinstance(engine, nn.parallel.DistributedDataParallel)
        with (
            contextlib.nullcontext() if sync else engine.no_sync(),
            torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            output = engine(**batch, gt_masks=gt_masks, frozen=frozen, recon_dtype=recon_dtype)
            (output.loss / run.accumulation).backward()
        sums[0] += output.loss.detach().double().cpu()
        for i, name in enumerate(DEFAULT_LOSS_WEIGHTS):
            sums[i + 1] += output.loss_terms[name].detach().double().cpu()
        with torch.no_grad():
            window.add_samples(
                tasks, _per_sample_text_loss(output.logits, batch["labels"], output.logits_start).cpu().tolist()
            )
    if ctx.active:
        dist.all_reduce(sums)
    sums /= run.accumulation * ctx.world
    grad_norm = (
        # foreach: torch picks its multi-tensor kernels by itself only on GPUs; on a CPU they halve the clipping
        nn.utils.clip_grad_norm_(engine.parameters(), config.optim.grad_clip, foreach=ctx.device.type == "cpu" or None)
        if config.optim.grad_clip is not None
        else None
    )
    bad = not math.isfinite(float(sums[0])) or (grad_norm is not None and not torch.isfinite(grad_norm).item())
    if bad:
        _stop_non_finite(run.out_dir, step, ctx, f"loss {float(sums[0])}, gradient norm {grad_norm}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


def _recon_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the soft-merging loss's decoder pass autocasts to (``run.recon_precision``); None: the step's."""
    if precision == "bf16" or (precision == "auto" and device.type == "cpu" and _cpu_has_bf16()):
        return torch.bfloat16
    return None


@functools.cache
def _cpu_has_bf16() -> bool:
    # without these instructions a bf16 convolution is emulated, slower than fp32
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def _bf16(run: _Run) -> bool:
    precision = run.config.run.precision
    return precision == "bf16" or (precision == "auto" and run.ctx.device.type == "cuda")


def _write_log_line(run: _Run, record: dict[str, Any]) -> None:
    with (run.out_dir / "train_log.jsonl").open("a") as log:
        log.write(json.dumps(record) + "\n")
    if run.writer is not None:
        done = record["step"]
        run.writer.add_scalar("train/loss", record["loss"], done)
        run.writer.add_scalar("train/lr", record["lr"], done)
        for k, v in record["terms"].items():
            run.writer.add_scalar(f"terms/{k}", v, done)


def _checkpoint(run: _Run, done: int, step: int, window: _LogWindow) -> None:
    """Write ``checkpoints/step-<done>`` after checking the update left every weight finite (it can overflow with
    a finite loss and gradient)."""
    if not _weights_finite(run.engine, run.ctx):
        _stop_non_finite(run.out_dir, done, run.ctx, f"the update of step {step} made weights non-finite")
    weights, optim_state = gather_state(run.engine, run.optimizer)
    log_window = window.saved(run.ctx)  # collective
    if run.ctx.main:
        state = {"config": config_to_dict(run.config), "data_digest": run.digest, "log_window": log_window}
        save_checkpoint(run.out_dir, done, weights, optim_state, state, keep=run.config.run.keep_checkpoints)


def _finish(run: _Run, start: int, last_log: dict[str, Any], last_eval: dict[str, float]) -> TrainResult:
    """The final quick evaluation, the merged model saved to ``model/`` with the decoding default it was trained
    for, and ``training.json``."""
    config, ctx, engine = run.config, run.ctx, run.engine
    model_dir = None
    divergence = _replica_divergence(engine) if isinstance(engine, nn.parallel.DistributedDataParallel) else None
    if run.eval_data is not None:
        last_eval = _evaluate(run, config.run.steps)
    final = _final_model(engine, config, ctx)
    if ctx.main:
        final.config.spatial_cot = config.data.spatial_cot  # what it was trained to write: its decoding default
        model_dir = save_model(final, run.processor, run.out_dir / "model")
        summary = {
            "steps": config.run.steps,
            "resumed_from": start,
            "seconds_this_run": time.perf_counter() - run.began,
            "world_size": ctx.world,
            "accumulation": run.accumulation,
            "replica_max_abs_diff": divergence,
            "feature_cache": _feature_cache_stats(run),
            # what run.recon_precision resolved to on this machine ("auto" depends on the CPU)
            "recon_precision": "step" if _recon_dtype(config.run.recon_precision, ctx.device) is None else "bf16",
            "final": last_log,
            "eval": last_eval,
        }
        (run.out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if run.writer is not None:
            run.writer.close()
    if ctx.active:
        dist.barrier()
    return TrainResult(run.out_dir, model_dir, config.run.steps, start, last_log, last_eval)


def _feature_cache_stats(run: _Run) -> dict[str, int] | None:
    """The frozen-feature cache's figures for the whole run: summed over the processes that prepared batches when
    they computed the frozen targets, else this process's."""
    if not run.prepared_cache:
        return _cache_stats(_plain(run.engine).sam_feature_cache)
    return {
        key: sum(stats[key] for stats in run.prepared_cache.values()) for key in ("hits", "misses", "images", "bytes")
    }


def _cache_stats(cache: FeatureCache | None) -> dict[str, int] | None:
    """Hits, misses, images and bytes of the frozen-feature cache (this process's), or None without one."""
    if cache is None:
        return None
    return {"hits": cache.hits, "misses": cache.misses, "images": len(cache), "bytes": cache.bytes}


def _check_inputs(config: TrainConfig) -> None:
    """Refuse at once, with the command that makes it, a data root or model folder of the recipe that is missing
    (``configs/tiny_synth.yaml`` names the quickstart's world, tokenizer and SAM2)."""
    makers = {
        "data.root": (config.data.root, "perceptio data synth --out {path}"),
        "model.depth_tokenizer": (
            config.model.depth_tokenizer if config.model.vlm is None else None,
            "perceptio tokenizer train --data WORLD --out {path}",
        ),
        "model.segmenter_weights": (
            config.model.segmenter_weights,
            "perceptio segmenter pretrain --data WORLD --out {path}",
        ),
        "model.init": (config.model.init, "perceptio train (its model/ folder) or perceptio pretrain"),
    }
    for key, (path, command) in makers.items():
        if path is not None and not Path(path).exists():
            raise ConfigError(
                f"{key}: {path} does not exist; make it with `{command.format(path=path)}` (make quickstart makes the "
                f"quickstart's world, tokenizer and SAM2 under runs/quickstart), or set {key} in the recipe or as an "
                "override"
            )


def _stop_non_finite(out_dir: Path, step: int, ctx: Distributed, what: str) -> None:
    """Raise :class:`NonFiniteLossError` for ``step``, naming the checkpoint to resume from. Checkpoints of that
    step or later hold the weights that gave the non-finite value: they are set aside (``bad-step-*``), so that
    ``--resume`` continues from the last good one."""
    good = last_good_checkpoint(out_dir, step) if ctx.main else latest_checkpoint(out_dir, warn=False)
    advice = "lower optim.lr or raise optim.warmup_ratio"
    raise NonFiniteLossError(
        f"non-finite loss at step {step} ({what}); the weights were not updated with it. "
        + (
            f"The last good checkpoint is {good}: {advice}, then continue with --resume"
            if good
            else f"No good checkpoint was written before it: {advice} and start again (--overwrite)"
        )
    )


def _weights_finite(engine: nn.Module, ctx: Distributed) -> bool:
    """Whether every trainable weight is finite, on every process (each checks its own shards)."""
    ok = True
    with torch.no_grad():
        for param in engine.parameters():
            if param.requires_grad:
                local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP shard
                if not bool(torch.isfinite(local).all()):
                    ok = False
                    break
    if ctx.active:
        flag = torch.tensor([1.0 if ok else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() == 1.0)
    return ok


def _task_means(window: dict[str, list[float]], ctx: Distributed) -> dict[str, float]:
    """Mean per-sample token loss per task, over every process's samples."""
    return {task: total / count for task, (total, count) in _task_sums(window, ctx).items() if count}


def _task_sums(window: dict[str, list[float]], ctx: Distributed) -> dict[str, list[float]]:
    """Per task, [loss sum, sample count] over every process (collective under distributed training)."""
    sums = {task: (total, count) for task, (total, count) in window.items()}
    if ctx.active:
        gathered: list[dict[str, tuple[float, int]]] = [{} for _ in range(ctx.world)]
        dist.all_gather_object(gathered, sums)
        sums = {}
        for part in gathered:
            for task, (total, count) in part.items():
                old = sums.get(task, (0.0, 0))
                sums[task] = (old[0] + total, old[1] + count)
    return {task: [total, count] for task, (total, count) in sorted(sums.items())}


def _replica_divergence(engine: nn.Module) -> float:
    """The largest difference between any rank's parameters and rank 0's (0.0 when DDP kept them in step)."""
    worst = torch.zeros((), dtype=torch.float64)
    for param in engine.parameters():
        reference = param.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (param.detach() - reference).abs().max().double().cpu())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _evaluate(run: _Run, step: int) -> dict[str, float]:
    """The quick evaluation on the main process (the others wait). Not under FSDP, whose sharded weights
    generation cannot use directly: evaluate the saved model with ``perceptio eval`` instead."""
    config, ctx, writer, path = run.config, run.ctx, run.writer, run.out_dir / "eval_log.jsonl"
    metrics: dict[str, float] = {}
    if ctx.active and config.run.distributed == "fsdp":
        if ctx.main:
            logger.warning(
                "the quick evaluation does not run under FSDP; evaluate %s/model afterwards", config.run.out_dir
            )
        return metrics
    if ctx.main:
        model = _plain(run.engine)
        metrics = quick_eval(
            model, run.processor, run.eval_data, samples=config.eval.samples, batch_size=config.eval.batch_size
        )
        model.train()
    if ctx.main:
        with path.open("a") as log:
            log.write(json.dumps({"step": step, **metrics}) + "\n")
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{key}", value, step)
        tqdm.write(f"eval @ {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if ctx.active:
        dist.barrier()
    return metrics


def _final_model(engine: nn.Module, config: TrainConfig, ctx: Distributed) -> PerceptioForConditionalGeneration:
    """The trained model as a plain Perceptio model (LoRA merged; FSDP weights gathered onto the main process)."""
    if ctx.active and config.run.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(engine, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not ctx.main:
            return _plain(engine)
        model, _ = build_model(config.model)
        model.load_state_dict(full)
        return model
    inner = _unwrap(engine)
    merged = merge_lora(inner) if hasattr(inner, "merge_and_unload") else inner
    merged.freeze_frozen_parts()
    return merged.to("cpu").eval()
