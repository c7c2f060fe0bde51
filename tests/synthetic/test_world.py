"""The synthetic world as written to disk: unique expressions, true answers, disjoint splits, determinism,
and every file loads back through the real-format readers."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from perceptio.data.readers import read_conversations, read_depth_folder, read_hardblink, read_mmbench, read_refer
from perceptio.data.schema import Task
from perceptio.data.synthetic import (
    Expression,
    ObjectFacts,
    TaskConfig,
    WorldConfig,
    generate_world,
    render_world_scene,
    resolve,
)


def _scenes(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]


def _facts(scene: dict) -> list[ObjectFacts]:
    keys = ObjectFacts.__dataclass_fields__
    return [
        ObjectFacts(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in o.items() if k in keys})
        for o in scene["objects"]
    ]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path, world_dir: Path) -> None:
    again = generate_world(tmp_path / "again", num_images=40, seed=0, progress=False).out_dir
    assert _digest(again) == _digest(world_dir)
    workers = generate_world(tmp_path / "workers", num_images=40, seed=0, progress=False, workers=2).out_dir
    assert _digest(workers) == _digest(world_dir)  # rendered by two processes: the same files
    other = generate_world(tmp_path / "other", num_images=40, seed=1, progress=False).out_dir
    assert _digest(other)["images/synth_000000.png"] != _digest(world_dir)["images/synth_000000.png"]


def test_every_expression_resolves_to_exactly_its_target(world_dir: Path) -> None:
    config = TaskConfig()
    checked = 0
    for scene in _scenes(world_dir):
        facts = _facts(scene)
        for obj in scene["objects"]:
            for payload in obj["expressions"]:
                expr = Expression.from_dict(payload)
                assert expr.text() == payload["text"]
                assert resolve(expr, facts, scene["camera"]["image_size"], config) == [obj["object_id"]], payload[
                    "text"
                ]
                checked += 1
    assert checked > 100


def _by_words(phrase: str, objects: list[dict]) -> list[dict]:
    """Objects whose attributes include every word of a noun phrase ("the small red object")."""
    words = set(phrase.split()) - {"the", "object"}
    return [o for o in objects if words <= {o["size"], o["color"], o["shape"]}]


def test_expressions_are_unique_by_a_plain_reading_of_the_words(world_dir: Path) -> None:
    """Independent of `resolve`: re-read each expression's words against the scene's facts."""
    kinds = set()
    for scene in _scenes(world_dir):
        objects = scene["objects"]
        for obj in objects:
            for payload in obj["expressions"]:
                text, kinds_seen = payload["text"], payload["kind"]
                if m := re.fullmatch(r"(the .+?) to the (left|right) of (the .+)", text):
                    (anchor,) = _by_words(m.group(3), objects)
                    candidates = [o for o in _by_words(m.group(1), objects) if o is not anchor]
                    side = [
                        o for o in candidates if (o["centroid"][0] < anchor["centroid"][0]) == (m.group(2) == "left")
                    ]
                    assert [o["object_id"] for o in side] == [obj["object_id"]], text
                elif m := re.fullmatch(r"(the .+?) (closest to|farthest from) the camera", text):
                    candidates = _by_words(m.group(1), objects)
                    pick = min if m.group(2) == "closest to" else max
                    assert pick(candidates, key=lambda o: o["center_depth"])["object_id"] == obj["object_id"], text
                else:
                    assert [o["object_id"] for o in _by_words(text, objects)] == [obj["object_id"]], text
                kinds.add(kinds_seen)
    assert kinds == {"attribute", "relation", "extreme"}


def test_ambiguous_expressions_are_rejected() -> None:
    def facts(object_id: int, color: str, u: float, depth: float) -> ObjectFacts:
        return ObjectFacts(object_id, "sphere", color, "small", False, depth, (u, 60.0), 50, (0, 0, 1, 1))

    config = TaskConfig()
    # two red spheres at 5.0 m and 5.2 m: "the red sphere closest to the camera" is too close to call
    objects = [facts(1, "red", 20, 5.0), facts(2, "red", 100, 5.2), facts(3, "blue", 60, 4.0)]
    closest = Expression.from_dict({"kind": "extreme", "descriptor": {"color": "red"}, "relation": "closest"})
    assert resolve(closest, objects, 128, config) is None
    # a red sphere almost straight above the anchor is neither left nor right of it
    objects = [facts(1, "red", 61, 5.0), facts(2, "red", 10, 7.0), facts(3, "blue", 60, 4.0)]
    left = Expression.from_dict(
        {"kind": "relation", "descriptor": {"color": "red"}, "relation": "left_of", "anchor": {"color": "blue"}}
    )
    assert resolve(left, objects, 128, config) is None
    objects[0] = facts(1, "red", 100, 5.0)
    assert resolve(left, objects, 128, config) == [2]


def test_refcoco_masks_are_the_rendered_visible_pixels(world_dir: Path) -> None:
    samples = read_refer(world_dir, "refcoco", split="val", image_root=world_dir / "images")
    assert samples and all(s.task is Task.REFERRING_SEGMENTATION for s in samples)
    by_image: dict[str, list] = defaultdict(list)
    for s in samples:
        by_image[s.image.path.name].append(s)
    for name, group in list(by_image.items())[:3]:
        index = int(re.search(r"(\d+)", name).group(1))
        rendering = render_world_scene(0, index, WorldConfig()).rendering
        for s in group:
            object_id = s.meta["ann_id"] % 100
            np.testing.assert_array_equal(s.target_mask(), rendering.mask(object_id))
            assert s.image.load().size == (128, 128)


def test_marker_answers_follow_the_true_depth_and_the_mid_height_rule(world_dir: Path) -> None:
    config = WorldConfig()
    band = config.tasks.marker_band
    total = 0
    for split in ("train", "val", "test"):
        for s in read_hardblink(world_dir / "hardblink" / split, split=split):
            depth = np.load(world_dir / "depth" / split / s.meta["source_image"].replace(".png", ".npy"))
            z = [float(depth[int(p.y), int(p.x)]) for p in s.points]
            assert s.answer == s.points[int(np.argmin(z))].label
            ordered = sorted(z)
            assert ordered[1] >= ordered[0] * (1 + config.tasks.marker_closest_gap)
            assert all(band[0] * 128 <= p.y <= band[1] * 128 for p in s.points)
            assert len(s.points) == s.meta["num_points"] and s.letters == tuple("ABCDE"[: len(s.points)])
            assert s.image.load().size == (128, 128)
            total += 1
    assert total >= 30


def test_vqa_answers_match_the_scene(world_dir: Path) -> None:
    scenes = {s["file_name"]: s for s in _scenes(world_dir)}
    seen = set()
    for s in read_conversations(world_dir / "vqa" / "train.json", image_root=world_dir / "images", split="train"):
        objects = scenes[s.image.path.name]["objects"]
        question = s.query.replace("<image>", "").strip()
        if m := re.fullmatch(
            r"How many (?:(small|large) )?(?:(\w+) )?(sphere|cube|cylinder|object)s are there\?", question
        ):
            size, color, shape = m.groups()
            expected = sum(
                (size is None or o["size"] == size)
                and (color is None or o["color"] == color)
                and (shape in ("object", o["shape"]))
                for o in objects
            )
            assert s.answer == str(expected), question
            seen.add("count")
        elif m := re.fullmatch(r"What (color|shape) is (the .+)\?", question):
            (obj,) = _by_words(m.group(2), objects)  # exactly one object fits the words
            assert s.answer == obj[m.group(1)], question
            seen.add(m.group(1))
        else:
            m = re.fullmatch(r"Is (the .+) to the left or to the right of (the .+)\?", question)
            assert m, question
            (a,) = _by_words(m.group(1), objects)
            (b,) = _by_words(m.group(2), objects)
            assert s.answer == ("left" if a["centroid"][0] < b["centroid"][0] else "right"), question
            seen.add("spatial")
    assert seen == {"count", "color", "shape", "spatial"}


def test_multiple_choice_rows_form_consistent_circular_groups(world_dir: Path) -> None:
    samples = read_mmbench(world_dir / "mmbench" / "val.tsv")
    groups: dict[int, list] = defaultdict(list)
    for s in samples:
        groups[s.meta["g_index"]].append(s)
    for group in groups.values():
        assert len(group) == len(group[0].choices)  # one pass per option
        gold = {s.choices["ABCD".index(s.answer)] for s in group}
        assert len(gold) == 1  # the same option text is right in every pass
        assert len({s.choices for s in group}) == len(group)  # every pass shows a different rotation
    assert samples[0].images[0].load().size == (128, 128)
    assert samples[-1].images[0].load().size == (128, 128)  # an index-reference row resolves to the image


def test_splits_are_disjoint_by_image_and_readers_see_every_item(world_dir: Path) -> None:
    manifest = json.loads((world_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    images: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        depth = read_depth_folder(world_dir / "depth" / split, image_dir=world_dir / "images")
        assert len(depth) == counts["images"][split]
        images[split] = {s.image.path.name for s in depth}
        vqa = read_conversations(world_dir / "vqa" / f"{split}.json", image_root=world_dir / "images")
        assert len(vqa) == counts["vqa"][split]
        assert {s.image.path.name for s in vqa} <= images[split]
        markers = read_hardblink(world_dir / "hardblink" / split)
        assert {s.meta["source_image"] for s in markers} <= images[split]
        assert len(markers) == sum(v for k, v in counts["relative_depth"].items() if k.startswith(split + "/"))
        with (world_dir / "mmbench" / f"{split}.tsv").open() as handle:
            files = {row["comment"] for row in csv.DictReader(handle, delimiter="\t")}
        assert files <= images[split]
    assert (
        not (images["train"] & images["val"])
        and not (images["train"] & images["test"])
        and not (images["val"] & images["test"])
    )
    refs = {
        split: read_refer(world_dir, "refcoco", split=split, image_root=world_dir / "images")
        for split in ("train", "val", "testA", "testB")
    }
    assert sum(len(v) for v in refs.values()) == sum(counts["referring_expressions"].values())
    assert {s.image.path.name for s in refs["val"]} <= images["val"]
    assert {s.image.path.name for s in refs["testA"] + refs["testB"]} <= images["test"]


def test_existing_output_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    out = tmp_path / "w"
    generate_world(out, num_images=3, seed=0, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_world(out, num_images=3, seed=0, progress=False)
    generate_world(out, num_images=4, seed=0, progress=False, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["num_images"] == 4
    assert not (tmp_path / "w.partial").exists()


def test_tiny_resolution_world(tmp_path: Path) -> None:
    summary = generate_world(tmp_path / "tiny", num_images=8, seed=2, config=WorldConfig(image_size=64), progress=False)
    assert sum(summary.images.values()) == 8
    depth = read_depth_folder(tmp_path / "tiny" / "depth" / "train", image_dir=tmp_path / "tiny" / "images")
    assert depth[0].depth.load().values.shape == (64, 64)


def test_bad_sizes_and_worker_counts_are_refused_before_any_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_images must be at least 1"):
        generate_world(tmp_path / "none", num_images=0, progress=False)
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        generate_world(tmp_path / "bad", num_images=4, progress=False, workers=-1)
    assert not list(tmp_path.iterdir())  # no folder, no .partial left behind
