"""SAM2 pretraining with point/box prompts: the loss falls, the point-prompted reference is scored with the
referring-segmentation metric, and the checkpoint loads into the model's segmenter (and feeds a recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from perceptio.cli.main import app
from perceptio.data.readers import read_refer
from perceptio.models import build_preset
from perceptio.models.presets import tiny_sam2_config
from perceptio.train.config import ModelConfig
from perceptio.train.loop import build_model
from perceptio.train.segmenter import SegmenterPretrainConfig, load_objects, point_prompt_ciou, pretrain_segmenter


def test_interior_points_and_boxes_lie_on_their_objects(world_dir: Path) -> None:
    samples = read_refer(world_dir, "refcoco", split="val", image_root=world_dir / "images")
    objects = load_objects(samples, 64)
    assert len(objects.masks) <= len(samples) and len(load_objects(samples, 64, distinct=False).masks) == len(samples)
    for mask, (x, y), (x0, y0, x1, y1) in zip(objects.masks, objects.points, objects.boxes, strict=True):
        h, w = mask.shape
        assert mask[int(y * h / 64), int(x * w / 64)], "the prompt point is inside the object"
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x0 <= x <= x1 and y0 <= y <= y1


@pytest.mark.slow
def test_pretraining_lowers_the_loss_and_loads_into_the_model(world_dir: Path, tmp_path: Path) -> None:
    samples = read_refer(world_dir, "refcoco", split="train", image_root=world_dir / "images")
    objects = load_objects(samples, 64)
    config = SegmenterPretrainConfig(steps=120, batch_size=16, lr=2e-3, log_every=20)
    sam = pretrain_segmenter(objects, tiny_sam2_config(), config, tmp_path / "sam", progress=False)
    log = json.loads((tmp_path / "sam" / "pretraining.json").read_text())["log"]
    assert np.mean([r["loss"] for r in log[-2:]]) < log[0]["loss"]
    reference = point_prompt_ciou(sam, objects)
    assert 0.0 <= reference["ciou"] <= 1.0 and reference["objects"] == len(objects.masks)
    model, _ = build_preset("tiny")
    model.load_segmenter(tmp_path / "sam")
    for name, value in sam.state_dict().items():
        assert torch.equal(model.segmenter.state_dict()[name], value), name
    assert not any(p.requires_grad for p in model.segmenter.vision_encoder.parameters()), "encoder stays frozen"
    from_recipe, _ = build_model(ModelConfig(preset="tiny", segmenter_weights=tmp_path / "sam"))
    assert torch.equal(from_recipe.segmenter.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


def test_a_segmenter_of_another_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import Sam2Model

    Sam2Model(tiny_sam2_config(hidden=16)).save_pretrained(tmp_path / "other")
    model, _ = build_preset("tiny")
    with pytest.raises(ValueError, match="architecture differs"):
        model.load_segmenter(tmp_path / "other")


def test_segmenter_pretrain_command(world_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["segmenter", "pretrain", "--data", str(world_dir), "--out", str(tmp_path), "--steps", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "point-prompted val cIoU" in result.output
    assert "val_point_prompt" in json.loads((tmp_path / "pretraining.json").read_text())


def test_a_resumed_pretraining_ends_as_the_uninterrupted_one(world_dir: Path, tmp_path: Path) -> None:
    """Killed after its step-3 checkpoint and resumed, the run gives the same weights and log; another batch size
    or a fresh start over the checkpoints is refused."""
    import shutil

    from safetensors.torch import load_file

    objects = load_objects(read_refer(world_dir, "refcoco", split="train", image_root=world_dir / "images"), 64)
    config = SegmenterPretrainConfig(steps=6, batch_size=4, log_every=1, checkpoint_every=3)
    pretrain_segmenter(objects, tiny_sam2_config(), config, tmp_path / "full", progress=False)
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000003", killed / "checkpoints" / "step-0000003")
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain_segmenter(objects, tiny_sam2_config(), config, killed, progress=False)
    other = SegmenterPretrainConfig(steps=6, batch_size=8, log_every=1, checkpoint_every=3)
    with pytest.raises(ValueError, match=r"config.batch_size \(saved 4, now 8\)"):
        pretrain_segmenter(objects, tiny_sam2_config(), other, killed, progress=False, resume=True)
    pretrain_segmenter(objects, tiny_sam2_config(), config, killed, progress=False, resume=True)
    straight, resumed = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(killed / "model.safetensors")),
    )
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    logs = [json.loads((folder / "pretraining.json").read_text())["log"] for folder in (tmp_path / "full", killed)]
    assert logs[0] == logs[1] and len(logs[0]) == 6


def test_the_segmentation_mode_is_one_setting_of_the_built_and_saved_model(tmp_path: Path) -> None:
    """A recipe's model.seg_multimask is set when the model is built (so the parts only the other mode uses are
    frozen from the start), saved with the model, and may switch when fine-tuning from it."""
    from perceptio.models.build import load_model, save_model

    single, processor = build_model(ModelConfig(preset="tiny", seg_multimask=False))
    decoder = single.segmenter.mask_decoder
    assert single.config.seg_multimask is False
    assert all(p.requires_grad for p in decoder.output_hypernetworks_mlps[0].parameters())
    assert not any(p.requires_grad for p in decoder.iou_prediction_head.parameters())
    save_model(single, processor, tmp_path / "single")
    assert load_model(tmp_path / "single")[0].config.seg_multimask is False
    multi, _ = build_model(ModelConfig(preset=None, init=tmp_path / "single", seg_multimask=True))
    decoder = multi.segmenter.mask_decoder
    assert multi.config.seg_multimask is True
    assert not any(p.requires_grad for p in decoder.output_hypernetworks_mlps[0].parameters())
    assert all(p.requires_grad for p in decoder.iou_prediction_head.parameters())
    kept, _ = build_model(ModelConfig(preset=None, init=tmp_path / "single"))  # null keeps the saved mode
    assert kept.config.seg_multimask is False


def test_the_interior_point_of_the_bounding_box_is_the_whole_images() -> None:
    """Eroding the mask's bounding box (plus a background margin) gives the point that eroding the whole image
    gives, for masks inside the image and touching its edges, holes included."""
    from perceptio.train.segmenter import _eroded_centre, _interior_point

    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = np.zeros((int(rng.integers(3, 40)), int(rng.integers(3, 40))), bool)
        y, x = int(rng.integers(0, mask.shape[0])), int(rng.integers(0, mask.shape[1]))
        h, w = (int(v) for v in rng.integers(1, 15, 2))
        mask[max(0, y - h) : y + h, max(0, x - w) : x + w] = True
        mask[rng.random(mask.shape) < 0.1] = False
        if mask.any():
            assert _interior_point(mask) == _eroded_centre(mask)
    assert _interior_point(np.ones((3, 5), bool)) == (2.5, 1.5)  # a mask that fills the image: its centre
