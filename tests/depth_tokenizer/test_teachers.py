"""Depth teachers: ground truth from files, Depth Anything from a tiny checkpoint on disk, and the disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.schema import ImageRef, Sample, Task
from perceptio.tokenizers.depth.pipeline import find_depth_samples
from perceptio.tokenizers.depth.teachers import (
    DepthAnythingTeacher,
    GroundTruthTeacher,
    RawDepth,
    TeacherCache,
    load_teacher,
    teacher_maps,
)


@pytest.fixture(scope="module")
def depth_anything_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Depth Anything (same class as the real V2 checkpoints) saved in transformers format."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
        out_indices=[1, 2],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        reassemble_factors=[4, 2],
        neck_hidden_sizes=[8, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # a random DA head outputs exactly 0 (ReLU); spread the weights so maps vary
        for name, param in model.named_parameters():
            if "backbone" not in name:
                torch.nn.init.normal_(param, std=0.3)
    out = tmp_path_factory.mktemp("depth_anything") / "tiny-da"
    model.save_pretrained(out)
    return out


def _image_samples(folder: Path, n: int) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for k in range(n):
        path = folder / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(sample_id=path.stem, task=Task.DEPTH, source="images", images=(ImageRef(path=path),)))
    return samples


def test_ground_truth_teacher_reads_the_world_depth(world_dir: Path) -> None:
    samples = find_depth_samples(world_dir, split="val")
    maps, kept = teacher_maps(samples, GroundTruthTeacher(), size=64, progress=False)
    assert len(maps) == len(kept) == len(samples) > 0
    raw = np.load(world_dir / "depth" / "val" / f"{samples[0].sample_id}.npy")
    first = maps[0]
    # 128 px -> 64 px by nearest neighbour keeps exact values but may skip the single farthest row
    assert first.metric and first.depth.shape == (64, 64) and first.depth.max() == 1.0 and first.depth.min() < 0.02
    assert first.stats.low == pytest.approx(1 / raw.max(), rel=1e-5) and first.stats.high == pytest.approx(
        1 / raw.min(), rel=1e-5
    )


def test_depth_anything_teacher_from_a_saved_checkpoint(depth_anything_dir: Path, tmp_path: Path) -> None:
    teacher = load_teacher(f"depth-anything:{depth_anything_dir}")
    assert isinstance(teacher, DepthAnythingTeacher) and not teacher.metric
    samples = _image_samples(tmp_path / "images", 3)
    raws = teacher.predict(samples)
    assert [r.values.shape for r in raws] == [(40, 50)] * 3 and raws[0].quantity == "inverse_depth"
    assert float(raws[0].values.std()) > 0
    maps, _ = teacher_maps(samples, teacher, size=32, cache=TeacherCache(tmp_path / "cache"), progress=False)
    assert all(m.depth.shape == (32, 32) and not m.metric for m in maps)


def test_depth_anything_handles_images_of_different_shapes(depth_anything_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(1)
    samples = []
    for k, (h, w) in enumerate([(40, 60), (60, 40), (40, 60), (33, 47)]):
        path = folder / f"m{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(sample_id=path.stem, task=Task.DEPTH, source="images", images=(ImageRef(path=path),)))
    raws = DepthAnythingTeacher(depth_anything_dir, batch_size=4).predict(samples)
    assert [r.values.shape for r in raws] == [(40, 60), (60, 40), (40, 60), (33, 47)]


def test_skip_bad_covers_a_missing_image_with_a_cached_teacher(depth_anything_dir: Path, tmp_path: Path) -> None:
    samples = _image_samples(tmp_path / "images", 3)
    samples[1].image.path.unlink()
    teacher = DepthAnythingTeacher(depth_anything_dir)
    with pytest.raises(DataError, match="image file not found"):
        teacher_maps(samples, teacher, size=16, cache=TeacherCache(tmp_path / "c"), progress=False)
    report = BadItemReport()
    maps, kept = teacher_maps(
        samples, teacher, size=16, cache=TeacherCache(tmp_path / "c"), progress=False, skip_bad=True, report=report
    )
    assert [s.sample_id for s in kept] == ["img0", "img2"] and len(report) == 1 and "img1" in report.items[0].location


def test_teacher_cache_is_used_on_the_second_run(depth_anything_dir: Path, tmp_path: Path) -> None:
    teacher = DepthAnythingTeacher(depth_anything_dir)
    calls: list[int] = []
    original = teacher.predict

    def counting(samples: list[Sample]) -> list[RawDepth]:
        calls.append(len(samples))
        return original(samples)

    teacher.predict = counting  # type: ignore[method-assign]
    samples = _image_samples(tmp_path / "images", 5)
    cache = TeacherCache(tmp_path / "cache")
    first, _ = teacher_maps(samples, teacher, size=32, cache=cache, batch_size=2, progress=False)
    assert sum(calls) == 5 and cache.misses == 5
    calls.clear()
    second_cache = TeacherCache(tmp_path / "cache")
    second, _ = teacher_maps(samples, teacher, size=32, cache=second_cache, batch_size=2, progress=False)
    assert calls == [] and second_cache.hits == 5
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.depth, b.depth)  # fresh maps are rounded as the cache stores them
        np.testing.assert_array_equal(a.valid, b.valid)
        assert a.stats == b.stats
    # another resolution is another key
    teacher_maps(samples[:1], teacher, size=16, cache=second_cache, progress=False)
    assert sum(calls) == 1
    entries = sorted(p.relative_to(tmp_path / "cache" / "v2").parts[:2] for p in (tmp_path / "cache").rglob("*.npz"))
    assert {e[0] for e in entries} == {teacher.teacher_id} and {e[1] for e in entries} == {"16", "32"}


def test_a_constant_depth_map_is_an_error_or_a_reported_skip(tmp_path: Path) -> None:
    folder = tmp_path / "depth"
    folder.mkdir()
    (folder / "depth.json").write_text(
        '{"convention": {"quantity": "depth", "metric": true, "units": "m", "scale": 1.0}}'
    )
    for name, values in (("good", np.linspace(1, 5, 64).reshape(8, 8)), ("flat", np.full((8, 8), 2.0))):
        np.save(folder / f"{name}.npy", values.astype(np.float32))
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    samples = find_depth_samples(folder)
    with pytest.raises(DataError, match=r"\[flat\].*constant"):
        teacher_maps(samples, GroundTruthTeacher(), size=8, progress=False)
    report = BadItemReport()
    maps, kept = teacher_maps(samples, GroundTruthTeacher(), size=8, progress=False, skip_bad=True, report=report)
    assert [s.sample_id for s in kept] == ["good"] and len(maps) == 1
    assert len(report) == 1 and "flat" in report.items[0].location


def test_image_folders_need_a_network_teacher(tmp_path: Path) -> None:
    samples = find_depth_samples(_image_samples(tmp_path / "imgs", 2)[0].image.path.parent)
    assert len(samples) == 2 and samples[0].depth is None
    with pytest.raises(DataError, match="no depth map"):
        teacher_maps(samples, GroundTruthTeacher(), size=8, progress=False)
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("midas")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(f"depth-anything:{tmp_path}")
