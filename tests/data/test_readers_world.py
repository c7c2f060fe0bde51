"""Every reader on the synthetic world (the ``world_dir`` session fixture), which writes the real formats."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from perceptio.data.errors import DataError
from perceptio.data.readers import (
    assert_no_eval_images,
    check_samples,
    eval_image_ids,
    read_conversations,
    read_depth_folder,
    read_hardblink,
    read_mmbench,
    read_refer,
)
from perceptio.data.schema import Task

SPLITS = ("train", "val", "test")


def test_depth_folders_cover_every_image_once(world_dir: Path) -> None:
    samples = [
        s for split in SPLITS for s in read_depth_folder(world_dir / "depth" / split, image_dir=world_dir / "images")
    ]
    assert len(samples) == 40 and len({s.sample_id for s in samples}) == 40
    assert all(s.depth.convention.metric and s.depth.convention.units == "m" for s in samples)
    assert check_samples(samples, progress=False) == 40  # every map decodes at its image's size


def test_refcoco_splits_are_disjoint_and_decode(world_dir: Path) -> None:
    read = {s: read_refer(world_dir, "refcoco", split=s, image_root=world_dir / "images") for s in ("train", "val")}
    assert all(s.task is Task.REFERRING_SEGMENTATION and len(s.masks) == 1 for s in read["val"])
    assert check_samples(read["val"], progress=False) == len(read["val"])
    eval_ids = eval_image_ids(world_dir, datasets=("refcoco",))
    assert eval_ids == {s.meta["image_id"] for s in read["val"]} | {
        s.meta["image_id"] for s in read_refer(world_dir, split="test", image_root=world_dir / "images")
    }
    assert_no_eval_images(read["train"], eval_ids, manifest="synthetic train")
    with pytest.raises(DataError, match="synthetic val: training data contains"):
        assert_no_eval_images(read["val"], eval_ids, manifest="synthetic val")


@pytest.mark.parametrize("split", SPLITS)
def test_hardblink_points_match_letters(world_dir: Path, split: str) -> None:
    samples = read_hardblink(world_dir / "hardblink" / split, split=split)
    assert samples
    for sample in samples:
        assert len(sample.points) == sample.meta["num_points"] and sample.answer in sample.letters
        assert sorted(p.label for p in sample.points) == list(sample.letters)
    assert check_samples(samples, progress=False) == len(samples)  # images decode, points lie inside them


def test_mmbench_circular_groups_are_complete(world_dir: Path) -> None:
    samples = read_mmbench(world_dir / "mmbench" / "val.tsv")
    groups: dict[int, list] = defaultdict(list)
    for sample in samples:
        groups[sample.meta["g_index"]].append(sample)
    for passes in groups.values():
        assert sorted(s.meta["circular_pass"] for s in passes) == list(range(len(passes[0].choices)))
        gold = {s.choices[ord(s.answer) - ord("A")] for s in passes}
        assert len(gold) == 1  # every pass points at the same option text
    assert check_samples(samples[:8], progress=False) == 8


def test_vqa_conversations(world_dir: Path) -> None:
    samples = read_conversations(world_dir / "vqa" / "val.json", image_root=world_dir / "images", source="synthetic")
    assert samples and Counter(s.task for s in samples).keys() == {Task.VQA}
    assert all(s.conversation[0].role == "user" and s.answer == s.conversation[1].text for s in samples)
    assert check_samples(samples, progress=False) == len(samples)
