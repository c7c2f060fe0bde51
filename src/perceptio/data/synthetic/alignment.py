"""Alignment conversations for pretraining the tiny base: scene descriptions written from ``scenes.jsonl``.

A pretrained VLM has already learned to name what it sees and where. The tiny base learns the same from these
text-only tasks (no spatial tokens: those are what Perceptio adds):

* ``left_to_right``: "List the objects from left to right." -> "small red sphere, large blue cube, ...";
* ``near_to_far``: "List the objects from nearest to farthest." (only when consecutive objects differ clearly
  in depth);
* ``closest``: "What color is the object closest to the camera?" (only with a clear winner).

Objects with fewer than ``min_visible_pixels`` visible pixels are left out of the lists (a reader could not see
them); scenes where such an object would decide an answer are skipped for that task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AlignmentConfig", "alignment_items", "write_alignment"]

LEFT_TO_RIGHT = "List the objects from left to right."
NEAR_TO_FAR = "List the objects from nearest to farthest."
CLOSEST_COLOR = "What color is the object closest to the camera?"


@dataclass(frozen=True)
class AlignmentConfig:
    min_visible_pixels: int = 30
    """Objects with fewer visible pixels are not listed (and scenes where they would matter are skipped)."""
    depth_gap: float = 0.08
    """Consecutive objects of the near-to-far list (and the closest object's runner-up) must differ in depth by
    this fraction."""
    lateral_gap: float = 0.03
    """Consecutive objects of the left-to-right list must be this fraction of the image width apart."""


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def alignment_items(scene: dict[str, Any], config: AlignmentConfig = AlignmentConfig()) -> list[tuple[str, str, str]]:
    """(task, question, answer) triples for one ``scenes.jsonl`` record."""
    width = scene["camera"]["image_size"]
    seen = [o for o in scene["objects"] if o["visible_pixels"] >= config.min_visible_pixels]
    hidden = [o for o in scene["objects"] if 0 < o["visible_pixels"] < config.min_visible_pixels]
    items = []
    by_x = sorted(seen, key=lambda o: o["centroid"][0])
    apart = [b["centroid"][0] - a["centroid"][0] for a, b in zip(by_x, by_x[1:], strict=False)]
    if by_x and all(gap >= config.lateral_gap * width for gap in apart):
        items.append(("left_to_right", LEFT_TO_RIGHT, ", ".join(_name(o) for o in by_x)))
    by_z = sorted(seen, key=lambda o: o["center_depth"])
    pairs = zip(by_z, by_z[1:], strict=False)
    clear = all(b["center_depth"] >= a["center_depth"] * (1 + config.depth_gap) for a, b in pairs)
    if by_z and clear:
        items.append(("near_to_far", NEAR_TO_FAR, ", ".join(_name(o) for o in by_z)))
    everyone = sorted(seen + hidden, key=lambda o: o["center_depth"])
    if (
        everyone
        and everyone[0] in seen
        and (len(everyone) == 1 or everyone[1]["center_depth"] >= everyone[0]["center_depth"] * (1 + config.depth_gap))
    ):
        items.append(("closest", CLOSEST_COLOR, everyone[0]["color"]))
    return items


def write_alignment(world: str | Path, config: AlignmentConfig = AlignmentConfig()) -> dict[str, int]:
    """Write ``alignment/<split>.json`` (conversation JSON, like ``vqa/``) into a rendered world; returns the
    number of conversations per split."""
    world = Path(world)
    scenes = world / "scenes.jsonl"
    if not scenes.is_file():
        raise FileNotFoundError(f"{scenes} not found: render the world first (perceptio data synth --out {world})")
    out: dict[str, list[dict[str, Any]]] = {}
    with scenes.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                scene = json.loads(line)
                split, file_name = scene["split"], scene["file_name"]
                triples = alignment_items(scene, config)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{scenes}:{line_number}: not a scene record ({err!r})") from None
            for task, question, answer in triples:
                out.setdefault(split, []).append(
                    {
                        "id": f"{Path(file_name).stem}_{task}",
                        "image": file_name,
                        "task": "vqa",  # a short text answer about the image, as the conversation reader knows it
                        "category": task,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{question}"},
                            {"from": "gpt", "value": answer},
                        ],
                    }
                )
    folder = world / "alignment"
    folder.mkdir(exist_ok=True)
    for split, records in out.items():
        tmp = folder / f"{split}.json.tmp"
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(folder / f"{split}.json")
    return {split: len(records) for split, records in out.items()}
