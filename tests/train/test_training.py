"""The training loop on the tiny preset: recipes, trainable policies, loss going down, exact resume after SIGKILL,
DDP and FSDP under torchrun equal to one process, and a clean stop on a non-finite loss."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration, Sam2Model

from perceptio.config import ConfigError, load_config
from perceptio.models import PRESETS
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.tokenizers.depth import DepthTokenizer
from perceptio.train.config import TrainConfig
from perceptio.train.loop import NonFiniteLossError, build_model, train
from perceptio.train.optim import accumulation_steps, build_optimizer
from perceptio.train.policy import apply_policy

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "tiny_synth.yaml"


def _overrides(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={world}",
        "model.depth_tokenizer=null",
        f"run.out_dir={out}",
        "run.log_every=1",
        "run.checkpoint_every=0",
        "run.threads=1",
        "eval.datasets={}",
        *extra,
    ]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "perceptio", "train", "--config", str(TINY), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_parses(recipe: Path) -> None:
    config = load_config(TrainConfig, recipe)
    assert config.data.datasets and config.run.steps > 0
    mixture = config.data.mixture({name: 10 for name in config.data.datasets})
    weights = mixture.weights_at(0)
    assert set(weights) == set(config.data.datasets) and abs(sum(weights.values()) - 1) < 1e-9


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Same-architecture tiny InternVL / SAM2 / depth-tokenizer checkpoints on disk, standing in for the real ones."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    InternVLForConditionalGeneration(config.vlm_config).save_pretrained(root / "internvl")
    tokenizer.save_pretrained(root / "internvl")
    Sam2Model(config.segmenter_config).save_pretrained(root / "sam2")
    DepthTokenizer(config.depth_tokenizer).save_pretrained(root / "depth")
    return {"vlm": root / "internvl", "segmenter": root / "sam2", "depth_tokenizer": root / "depth"}


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name.startswith("paper_")], ids=lambda p: p.name)
def test_paper_recipes_build_on_same_architecture_checkpoints(recipe: Path, tiny_checkpoints: dict) -> None:
    """The real recipes' model section, trainable rules and optimiser build through the real-checkpoint path."""
    overrides = [f"model.{key}={path}" for key, path in tiny_checkpoints.items()] + ["model.dtype=float32"]
    config = load_config(TrainConfig, recipe, overrides)
    model, _ = build_model(config.model)
    wrapped, plan = apply_policy(model, config.trainable)
    assert plan.lora_layers and all(".language_model." in name for name in plan.lora_layers)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("mask_decoder" in n for n in trainable)
    assert not any("vision_tower" in n or "vision_encoder" in n or "depth_tokenizer" in n for n in trainable)
    assert build_optimizer(wrapped, lr=config.optim.lr).param_groups
    # the recipe's global batch splits exactly over 16 GPUs at its micro batch
    assert accumulation_steps(config.run.global_batch_size, config.run.micro_batch_size, 16) >= 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.stpes=3"], "unknown key 'run.stpes'; did you mean 'steps'?"),
        (["optim.lr=-1"], "need lr > 0"),
        (["model.vlm=/x"], "exactly one model source"),
        (["data.weights={nope: 1}"], "data.weights names ['nope']"),
        (["run.micro_batch_size=64"], "exceeds run.global_batch_size"),
        (["trainable.default=half"], "'half' is not one of"),
        (["run.data_workers=-1"], "run.data_workers must be >= 0"),
        (["data.datasets.vqa.format=coco"], "data.datasets.vqa.format: 'coco' is not one of"),
    ],
)
def test_recipe_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, TINY, overrides)
    assert message in str(err.value) and "tiny_synth.yaml" in str(err.value)


def test_policy_rules_that_match_nothing_are_errors(world_dir: Path, tmp_path: Path) -> None:
    config = load_config(
        TrainConfig, TINY, _overrides(world_dir, tmp_path, 'trainable.rules={"vlm.languagemodel.*": lora}')
    )
    model, _ = build_model(config.model)
    with pytest.raises(ValueError, match=r"\['vlm.languagemodel.\*'\] match no parameter"):
        apply_policy(model, config.trainable)


def test_policy_table_and_modes(world_dir: Path, tmp_path: Path) -> None:
    rules = 'trainable.rules={"vlm.model.language_model.*": lora, "seg_projection.*": full}'
    config = load_config(TrainConfig, TINY, _overrides(world_dir, tmp_path, "trainable.default=frozen", rules))
    model, _ = build_model(config.model)
    wrapped, plan = apply_policy(model, config.trainable)
    table = plan.table(wrapped)
    assert "vlm.model.language_model" in table and "lora" in table and "total" in table
    assert (
        plan.modes["seg_projection.0.weight"] == "full"
        and plan.modes["vlm.model.vision_tower.embeddings.patch_embeddings.projection.weight"] == "frozen"
    )
    assert all(plan.modes[n] == "fixed" for n in plan.modes if n.startswith("depth_tokenizer."))
    names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("trainable_tokens" in n for n in names), "the perception-token rows train under LoRA"
    assert not any("vision_tower" in n for n in names)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("policy", ["full", "lora"])
def test_training_reduces_the_loss(policy: str, world_dir: Path, tmp_path: Path) -> None:
    extra = ["run.steps=24", "run.global_batch_size=8", "run.micro_batch_size=8", "optim.lr=3e-3", "run.log_every=6"]
    if policy == "lora":
        extra += [
            "trainable.default=frozen",
            'trainable.rules={"vlm.model.language_model.*": lora, "vlm.model.multi_modal_projector.*": full, '
            '"seg_projection.*": full, "segmenter.mask_decoder.*": full}',
            "optim.lr=1e-2",
        ]
    config = load_config(TrainConfig, TINY, _overrides(world_dir, tmp_path / policy, *extra))
    result = train(config, progress=False)
    losses = _losses(tmp_path / policy)
    assert len(losses) == 4 and losses[-1] < 0.75 * losses[0], losses
    assert result.model_dir is not None and (result.model_dir / "model.safetensors").is_file()
    log = json.loads((tmp_path / policy / "train_log.jsonl").read_text().splitlines()[-1])
    assert set(log["terms"]) >= {"text", "depth_token", "depth_marker", "depth_count", "depth_recon", "mask_bce"}
    assert log["task_text_loss"] and log["samples_per_s"] > 0 and sum(log["drawn"].values()) == 6 * 8
    saved = PerceptioForConditionalGeneration.from_pretrained(result.model_dir)
    assert not any("lora" in name for name in saved.state_dict()), "LoRA is merged into the saved model"
    assert saved.config.spatial_cot is True  # the recipe writes depth spans: so will the saved model
    assert (tmp_path / policy / "config.yaml").is_file() and (tmp_path / policy / "trainable.txt").is_file()


def test_a_model_trained_to_answer_directly_is_saved_that_way(world_dir: Path, tmp_path: Path) -> None:
    overrides = _overrides(world_dir, tmp_path, "run.steps=1", "run.global_batch_size=4", "run.micro_batch_size=4")
    result = train(load_config(TrainConfig, TINY, [*overrides, "data.spatial_cot=false"]), progress=False)
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["spatial_cot"] is False and saved["constrain"] is True


def test_data_workers_prepare_the_same_batches(world_dir: Path, tmp_path: Path) -> None:
    """Batches prepared ahead in worker processes give the same losses, task losses and weights, also on resume."""
    extra = ["run.steps=4", "run.global_batch_size=4", "run.micro_batch_size=2", "run.checkpoint_every=2"]
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        recipe = load_config(TrainConfig, TINY, [*_overrides(world_dir, out, *extra), f"run.data_workers={workers}"])
        train(recipe, progress=False)
        runs[workers] = out
    logs = {
        w: [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()] for w, out in runs.items()
    }
    assert [(r["loss"], r["task_text_loss"], r["drawn"]) for r in logs[0]] == [
        (r["loss"], r["task_text_loss"], r["drawn"]) for r in logs[2]
    ]
    weights = [load_file(out / "model" / "model.safetensors") for out in runs.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # resumed from step 2 with workers: the remaining steps are drawn from step 2 on
    resumed = tmp_path / "resumed"
    config = load_config(TrainConfig, TINY, [*_overrides(world_dir, resumed, *extra), "run.data_workers=1"])
    shutil.copytree(runs[0] / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    for name in ("config.yaml", "train_log.jsonl"):
        shutil.copy(runs[0] / name, resumed / name)
    train(config, resume=True, progress=False)
    assert _losses(resumed) == [r["loss"] for r in logs[0]]


def test_quick_evaluation_runs_and_is_logged(world_dir: Path, tmp_path: Path) -> None:
    evaluation = (
        'eval.datasets={"refseg": {format: refcoco, path: ., split: val, image_root: images, depth: depth/val}, '
        '"vqa": {format: conversation, path: vqa/val.json, image_root: images}}'
    )
    overrides = _overrides(
        world_dir, tmp_path, "run.steps=2", "eval.every=1", "eval.samples=3", "run.global_batch_size=4"
    )
    config = load_config(TrainConfig, TINY, [*overrides[:-1], evaluation, "run.micro_batch_size=4"])
    result = train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "eval_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert {"refseg/span_ok", "refseg/seg_ciou", "vqa/answer_acc"} <= set(lines[-1])
    assert all(0 <= v <= 1 for k, v in lines[-1].items() if k != "step") and result.last_eval == {
        k: v for k, v in lines[-1].items() if k != "step"
    }


def test_non_finite_loss_stops_cleanly(world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = PerceptioForConditionalGeneration.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PerceptioForConditionalGeneration, "forward", poisoned)
    extra = ["run.steps=6", "run.checkpoint_every=2", "run.global_batch_size=4", "run.micro_batch_size=4"]
    config = load_config(TrainConfig, TINY, _overrides(world_dir, tmp_path, *extra))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3.*step-0000002.*--resume"):
        train(config, progress=False)
    assert (tmp_path / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    assert not (tmp_path / "model").exists()


def test_resume_refuses_another_recipe(world_dir: Path, tmp_path: Path) -> None:
    base = _overrides(
        world_dir,
        tmp_path,
        "run.steps=2",
        "run.checkpoint_every=1",
        "run.global_batch_size=4",
        "run.micro_batch_size=4",
    )
    train(load_config(TrainConfig, TINY, base), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(load_config(TrainConfig, TINY, base), progress=False)
    with pytest.raises(ValueError, match=r"optim.weight_decay \(saved 0.01, now 0.5\)"):
        train(load_config(TrainConfig, TINY, [*base, "optim.weight_decay=0.5"]), resume=True, progress=False)
    # the learning rate may change on resume (the advice after a non-finite loss), and --overwrite starts afresh
    train(load_config(TrainConfig, TINY, [*base, "optim.lr=2e-3"]), resume=True, progress=False)
    result = train(load_config(TrainConfig, TINY, [*base, "run.steps=1"]), overwrite=True, progress=False)
    assert result.steps == 1 and not (tmp_path / "checkpoints").exists() and len(_losses(tmp_path)) == 1


@pytest.mark.slow
def test_sigkill_and_resume_follow_the_uninterrupted_run(world_dir: Path, tmp_path: Path) -> None:
    common = ["run.steps=30", "run.checkpoint_every=5", "run.global_batch_size=4", "run.micro_batch_size=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(*_overrides(world_dir, straight, *common)), check=True, env=_env(), capture_output=True)
    process = subprocess.Popen(
        _cli(*_overrides(world_dir, killed, *common)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-0000010" / "trainer_state.json").is_file():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists(), "killed before the end"
    subprocess.run(
        _cli(*_overrides(world_dir, killed, *common), "--resume"), check=True, env=_env(), capture_output=True
    )
    assert _losses(killed) == _losses(straight) and len(_losses(straight)) == 30
    a, b = (
        load_file(str(straight / "model" / "model.safetensors")),
        load_file(str(killed / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy: str, world_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo) and the same global batch: same losses and weights as 1 process."""
    common = ["run.steps=4", "run.global_batch_size=8", "run.micro_batch_size=4", f"run.distributed={strategy}"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(*_overrides(world_dir, one, *common)), check=True, env=_env(), capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "perceptio"]
    args = ["train", "--config", str(TINY), *_overrides(world_dir, two, *common, "run.checkpoint_every=2")]
    done = subprocess.run([*torchrun, *args], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-5)
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert (two / "checkpoints" / "step-0000002" / "trainable.safetensors").is_file()
    if strategy == "ddp":  # every rank holds the same weights
        assert json.loads((two / "training.json").read_text())["replica_max_abs_diff"] == 0.0


def test_the_frozen_feature_cache_changes_no_loss(world_dir: Path, tmp_path: Path) -> None:
    """Cached SAM2 image features (reused once an image comes back) give the uncached run's losses and weights,
    in the training process and in a data worker (which then keeps the cache and reports its figures)."""
    extra = ["run.steps=6", "run.global_batch_size=8", "run.micro_batch_size=8", "run.checkpoint_every=0"]
    runs = {}
    for megabytes, workers in ((0, 0), (64, 0), (64, 1)):
        out = tmp_path / f"cache{megabytes}-{workers}"
        overrides = [*_overrides(world_dir, out, *extra), f"run.feature_cache_mb={megabytes}"]
        train(load_config(TrainConfig, TINY, [*overrides, f"run.data_workers={workers}"]), progress=False)
        runs[megabytes, workers] = out
    stats = [json.loads((out / "training.json").read_text())["feature_cache"] for out in runs.values()]
    assert stats[0] is None and stats[1]["hits"] > 0 and stats[1]["images"] == stats[1]["misses"]
    assert stats[2] == stats[1]  # the worker's cache saw the same images
    from perceptio.train.loop import _cpu_has_bf16  # the tiny recipe's recon_precision: auto, as resolved here

    resolved = json.loads((runs[0, 0] / "training.json").read_text())["recon_precision"]
    assert resolved == ("bf16" if _cpu_has_bf16() else "step")
    losses = [_losses(out) for out in runs.values()]
    assert losses[0] == losses[1] == losses[2]
    weights = [load_file(out / "model" / "model.safetensors") for out in runs.values()]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


def _mixed_batch(world_dir: Path) -> tuple[PerceptioForConditionalGeneration, dict, list]:
    """A tiny model from random weights and a collated batch of three samples of referring segmentation, depth
    and VQA each (without ``gt_masks``, returned apart)."""
    from perceptio.train.data import TrainingData, collate

    config = load_config(TrainConfig, TINY, [f"data.root={world_dir}", "model.depth_tokenizer=null"])
    torch.manual_seed(0)
    model, processor = build_model(config.model)
    data = TrainingData.from_config(config.data, model.depth_tokenizer, progress=False)
    rng = np.random.default_rng(0)
    examples = [data.example(name, i, rng) for name in ("refseg", "depth", "vqa") for i in range(3)]
    batch = collate(examples, processor)
    return model, batch, batch.pop("gt_masks")


def test_frozen_targets_computed_ahead_give_the_forward_passs_own_loss(world_dir: Path) -> None:
    """The trainer computes the frozen parts' share of the loss where it prepares a batch (in the data worker):
    SAM2's features of each row's image alone, and the target codes decoded (unclamped) by the depth tokenizer.
    The forward pass given them computes the loss terms and gradients it computes on its own, to the bit."""
    from perceptio.losses import depth_recon_loss

    model, batch, gt_masks = _mixed_batch(world_dir)
    ids = model.config.resolved_token_ids
    codes = (batch["labels"] >= ids.code_ids.start) & (batch["labels"] < ids.code_ids.stop)
    other = torch.randint(ids.code_ids.start, ids.code_ids.stop, (int(codes.sum()),))  # a random tokenizer
    batch["labels"][codes] = batch["input_ids"][codes] = other  # gives every map one code: make the spans differ
    frozen = model.frozen_targets(batch["input_ids"], batch["labels"], batch["sam_pixel_values"], gt_masks)
    assert sorted(frozen.image_features) == [0, 1, 2]  # the referring-segmentation rows, each image alone
    for b, features in frozen.image_features.items():
        alone = model.segmenter.get_image_features(batch["sam_pixel_values"][b : b + 1]).fpn_hidden_states
        assert all(torch.equal(x, y) for x, y in zip(features, alone, strict=True))
    model.train()
    runs = []
    for ahead in (None, frozen):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout
        output = model(**batch, gt_masks=gt_masks, frozen=ahead)
        output.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((output.loss_terms, grads))
    (terms, grads), (terms_ahead, grads_ahead) = runs
    assert terms["mask_dice"].item() > 0
    assert all(torch.equal(terms[k], terms_ahead[k]) for k in terms)
    assert grads.keys() == grads_ahead.keys() and all(torch.equal(grads[k], grads_ahead[k]) for k in grads)
    # the reconstruction term against the target decoded inside the loss, as the loss alone would
    tokenizer = model.depth_tokenizer
    recon = depth_recon_loss(
        output.logits[:, :-1].detach(),
        batch["labels"][:, output.logits_start + 1 :],
        code_ids=ids.code_ids,
        span_length=model.config.vocab.span_length,
        decode_soft=lambda **kw: tokenizer.decode_soft(**kw, clamp=False),
        decode=lambda codes: tokenizer.decode(codes.view(-1, *model.config.depth_tokenizer.grid), clamp=False),
    )
    assert len(frozen.depth_reference) >= 3 and recon.item() > 0  # the depth rows' full spans
    spans = [row for row in batch["labels"][:, 1:] if ((row >= ids.code_ids.start) & (row < ids.code_ids.stop)).any()]
    for row, reference in zip(spans, frozen.depth_reference, strict=True):  # each span's own map, in row order
        alone = tokenizer.decode(
            (row[(row >= ids.code_ids.start) & (row < ids.code_ids.stop)] - ids.code_ids.start).view(
                1, *model.config.depth_tokenizer.grid
            ),
            clamp=False,
        )
        torch.testing.assert_close(reference, alone[0], rtol=0, atol=1e-6)  # alone: another batch size's rounding
    assert torch.equal(recon, terms_ahead["depth_recon"].detach())


def test_the_reconstruction_pass_in_bf16_changes_that_term_alone_and_only_by_rounding(world_dir: Path) -> None:
    """``recon_dtype=torch.bfloat16`` (``run.recon_precision: bf16``) autocasts the frozen decoder's pass of the
    soft-merging loss: that term moves by bf16 rounding, every other term stays to the bit, and the gradient
    keeps its direction."""
    from perceptio.weights import shipped

    model, batch, gt_masks = _mixed_batch(world_dir)
    base = PerceptioForConditionalGeneration.from_pretrained(shipped("tiny-base"))
    model.depth_tokenizer.load_state_dict(base.depth_tokenizer.state_dict())  # a trained decoder: varied maps
    model.train()
    runs = []
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        output = model(**batch, gt_masks=gt_masks, recon_dtype=dtype)
        output.loss_terms["depth_recon"].backward()
        runs.append((output.loss_terms, model.vlm.lm_head.weight.grad.clone()))
    (terms, grad), (terms_bf16, grad_bf16) = runs
    assert all(torch.equal(terms[k], terms_bf16[k]) for k in terms if k != "depth_recon")
    assert terms_bf16["depth_recon"].dtype == torch.float32
    recon, recon_bf16 = terms["depth_recon"].item(), terms_bf16["depth_recon"].item()
    assert recon > 0 and recon_bf16 != recon and abs(recon_bf16 - recon) < 2e-2 * recon
    assert torch.nn.functional.cosine_similarity(grad.flatten(), grad_bf16.flatten(), dim=0) > 0.99


def test_the_recipes_recon_precision_reaches_the_loss(world_dir: Path, tmp_path: Path) -> None:
    logs = {}
    for precision in ("step", "bf16"):
        extra = ["run.steps=1", "run.global_batch_size=8", "run.micro_batch_size=8", "run.log_every=1"]
        out = tmp_path / precision
        overrides = _overrides(world_dir, out, *extra, f"run.recon_precision={precision}")
        train(load_config(TrainConfig, TINY, overrides), progress=False)
        logs[precision] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["terms"]
    assert logs["step"]["text"] == logs["bf16"]["text"] and logs["step"]["depth_recon"] > 0
    assert logs["step"]["depth_recon"] != logs["bf16"]["depth_recon"]


def test_a_wrong_recon_precision_is_refused_naming_the_field_and_the_choices(world_dir: Path, tmp_path: Path) -> None:
    from perceptio.config import ConfigError

    with pytest.raises(ConfigError, match=r"run\.recon_precision: 'fp16' is not one of \['step', 'bf16', 'auto'\]"):
        load_config(TrainConfig, TINY, _overrides(world_dir, tmp_path, "run.recon_precision=fp16"))


def test_recon_precision_auto_takes_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    from perceptio.train import loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for has_bf16 in (True, False):
        monkeypatch.setattr(loop, "_cpu_has_bf16", lambda has=has_bf16: has)
        assert loop._recon_dtype("auto", cpu) == (torch.bfloat16 if has_bf16 else None)
        assert loop._recon_dtype("auto", cuda) is None  # a GPU step is bf16 already, or asked to be fp32
        assert loop._recon_dtype("bf16", cpu) == torch.bfloat16 and loop._recon_dtype("step", cpu) is None


def test_with_labels_the_lm_head_runs_from_the_first_supervised_token_on(world_dir: Path) -> None:
    """Training reads no logit of the prompt before the batch's first supervised token: the forward pass with
    labels computes the logits from the position that predicts it on, and its loss terms are those of the whole
    sequence's logits."""
    from perceptio.losses import IGNORE_INDEX, text_loss
    from perceptio.train.loop import _per_sample_text_loss

    model, batch, gt_masks = _mixed_batch(world_dir)
    model.eval()  # no dropout: the two passes see the same activations
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        output = model(**batch, gt_masks=gt_masks)
    labels = batch["labels"]
    first = int((labels != IGNORE_INDEX).any(0).nonzero()[0])
    assert output.logits_start == first - 1 > 0 and output.logits.shape[1] == labels.shape[1] - first + 1
    # at the real tokens: the right padding's own logits (read by no loss) differ, since a training forward leaves
    # the padding mask out (causal attention gives the real tokens the same keys)
    real = batch["attention_mask"][:, first - 1 :].bool()
    assert not bool(real.all())
    torch.testing.assert_close(output.logits[real], full[:, first - 1 :][real], rtol=0, atol=1e-6)
    ids = model.config.resolved_token_ids
    whole = text_loss(full[:, :-1], labels[:, 1:], exclude_ids=[ids.depth_start, ids.depth_end, *ids.code_ids])
    torch.testing.assert_close(output.loss_terms["text"], whole, rtol=1e-6, atol=0)
    per_sample = _per_sample_text_loss(output.logits, labels, output.logits_start)
    torch.testing.assert_close(per_sample, _per_sample_text_loss(full, labels), rtol=1e-6, atol=0)


def test_a_depth_map_shared_by_several_datasets_is_encoded_once(world_dir: Path) -> None:
    """Referring segmentation, depth and relative depth share their images' depth maps: each map is encoded once,
    and every sample gets the codes of its own map."""
    from perceptio.tokenizers.depth import DepthTokenizer
    from perceptio.train.data import TrainingData

    config = load_config(TrainConfig, TINY, [f"data.root={world_dir}"])
    tokenizer = DepthTokenizer.from_preset("tiny")
    encoded: list[int] = []
    encode = tokenizer.encode
    tokenizer.encode = lambda maps: encoded.append(len(maps)) or encode(maps)  # type: ignore[method-assign]
    data = TrainingData.from_config(config.data, tokenizer, progress=False)
    paths = {
        str(s.depth.path): c
        for name, samples in data.datasets.items()
        for s, c in zip(samples, data.codes[name], strict=True)
        if c is not None
    }
    assert sum(encoded) == len(paths) < sum(c is not None for codes in data.codes.values() for c in codes)
    for name, samples in data.datasets.items():
        for sample, codes in zip(samples, data.codes[name], strict=True):
            if codes is not None:
                assert np.array_equal(codes, paths[str(sample.depth.path)])
    one = tokenizer.encode  # a map encoded alone gets the codes it got in its batch
    sample = next(s for s in data.datasets["depth"])
    from perceptio.tokenizers.depth.teachers import GroundTruthTeacher, teacher_maps

    (alone,), _ = teacher_maps([sample], GroundTruthTeacher(), size=tokenizer.config.input_size, progress=False)
    with torch.no_grad():
        grid = one(torch.from_numpy(alone.depth[None].astype(np.float32))).numpy()[0]
    assert np.array_equal(grid, paths[str(sample.depth.path)])
