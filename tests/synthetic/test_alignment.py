"""Alignment conversations of the tiny base (scene descriptions written from scenes.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perceptio.data.readers import read_conversations
from perceptio.data.synthetic.alignment import (
    CLOSEST_COLOR,
    LEFT_TO_RIGHT,
    NEAR_TO_FAR,
    alignment_items,
    write_alignment,
)


def _obj(color: str, x: float, z: float, pixels: int = 100, shape: str = "cube", size: str = "small") -> dict:
    return {"color": color, "shape": shape, "size": size, "centroid": [x, 50.0], "center_depth": z,
            "visible_pixels": pixels}  # fmt: skip


def _scene(*objects: dict) -> dict:
    return {"camera": {"image_size": 128}, "objects": list(objects)}


def test_lists_follow_position_and_depth() -> None:
    items = dict((t, (q, a)) for t, q, a in alignment_items(_scene(
        _obj("red", 90, 5.0), _obj("blue", 10, 7.0, shape="sphere", size="large"), _obj("green", 50, 9.0)
    )))  # fmt: skip
    assert items["left_to_right"] == (LEFT_TO_RIGHT, "large blue sphere, small green cube, small red cube")
    assert items["near_to_far"] == (NEAR_TO_FAR, "small red cube, large blue sphere, small green cube")
    assert items["closest"] == (CLOSEST_COLOR, "red")


def test_ambiguous_scenes_are_skipped_per_task() -> None:
    near_tie = alignment_items(_scene(_obj("red", 10, 5.0), _obj("blue", 100, 5.1)))
    assert {t for t, _, _ in near_tie} == {"left_to_right"}  # depths too close for near/far and closest
    side_by_side = alignment_items(_scene(_obj("red", 50, 5.0), _obj("blue", 51, 9.0)))
    assert "left_to_right" not in {t for t, _, _ in side_by_side}
    # a barely visible object closest to the camera would decide the answer: no closest question
    hidden = alignment_items(_scene(_obj("red", 10, 4.0, pixels=5), _obj("blue", 100, 8.0)))
    assert "closest" not in {t for t, _, _ in hidden}
    assert ("left_to_right", LEFT_TO_RIGHT, "small blue cube") in hidden  # not listed either


def test_write_alignment_makes_readable_conversations(world_dir: Path, tmp_path: Path) -> None:
    import shutil

    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    counts = write_alignment(world)
    assert set(counts) == {"train", "val", "test"} and counts["train"] > 0
    samples = read_conversations(world / "alignment" / "train.json", image_root=world / "images")
    assert len(samples) == counts["train"]
    assert all(s.answer for s in samples)
    (world / "scenes.jsonl").write_text('{"split": "train"}\n')
    with pytest.raises(ValueError, match=r"scenes.jsonl:1: not a scene record"):
        write_alignment(world)
    with pytest.raises(FileNotFoundError, match="render the world first"):
        write_alignment(tmp_path / "nowhere")
    assert json.loads((world / "alignment" / "train.json").read_text())  # the earlier files are intact
