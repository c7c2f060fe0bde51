"""Task samples derived from a rendered scene: referring expressions, relative-depth markers and VQA.

Every referring expression is built as a small structured program (:class:`Expression`) and kept only if
:func:`resolve` maps it to exactly its target, with clear margins: an expression that a reasonable reader
could take two ways (two objects nearly equally far, an object almost straight above the anchor) is never
emitted. The program is written next to the text, so tests and users can re-check every expression.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perceptio.data.formats import MARKER_RULE
from perceptio.data.synthetic.render import Rendering
from perceptio.data.synthetic.scene import COLORS, SHAPES, SIZES, Scene

__all__ = [
    "Descriptor",
    "Expression",
    "MarkerQuestion",
    "MarkerStyle",
    "ObjectFacts",
    "TaskConfig",
    "VQAItem",
    "draw_markers",
    "measure_objects",
    "referring_expressions",
    "relative_depth_question",
    "resolve",
    "vqa_items",
]

CLOSEST_QUESTION = (
    "Multiple points are circled on the image, labeled by letters beside each circle. "
    "Which point is the closest to the camera?"
)


@dataclass(frozen=True)
class TaskConfig:
    """Margins that keep derived samples unambiguous."""

    lateral_margin: float = 0.06
    """Left/right relations need the centroids' horizontal gap to exceed this fraction of the image width."""
    depth_margin: float = 0.12
    """'Closest'/'farthest' need the runner-up to be this much (relative) farther/nearer than the winner."""
    expressions_per_object: int = 3
    """Most referring expressions written per object (one of each kind where possible)."""
    marker_band: tuple[float, float] = MARKER_RULE.band
    """Markers sit in this band of image rows (fractions of the height): the mid-height rule of HardBLINK."""
    marker_closest_gap: float = MARKER_RULE.closest_gap
    """The second-closest marker must be at least this much (relative) farther than the closest."""
    marker_min_gap: float = MARKER_RULE.min_gap
    """Any two markers must differ in depth by at least this much (relative)."""
    marker_min_distance: float = MARKER_RULE.min_distance
    """Any two markers must be at least this fraction of the image width apart (labels must not collide)."""


@dataclass(frozen=True)
class ObjectFacts:
    """What a viewer can see of one object, measured on the rendering."""

    object_id: int
    shape: str
    color: str
    size: str
    raised: bool
    center_depth: float  # z-depth of the object's centre, metres
    centroid: tuple[float, float]  # (u, v) mean of the visible pixels' centres
    visible_pixels: int
    bbox: tuple[int, int, int, int]  # COCO [x, y, w, h] of the visible pixels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_objects(scene: Scene, rendering: Rendering) -> list[ObjectFacts]:
    """Facts for every object of ``scene`` from its ``rendering`` (objects with no visible pixel included)."""
    facts = []
    for obj in scene.objects:
        rows, cols = np.nonzero(rendering.instance_ids == obj.object_id)
        if len(rows):
            centroid = (float(cols.mean() + 0.5), float(rows.mean() + 0.5))
            bbox = (
                int(cols.min()),
                int(rows.min()),
                int(cols.max() - cols.min() + 1),
                int(rows.max() - rows.min() + 1),
            )
        else:
            centroid, bbox = (float("nan"), float("nan")), (0, 0, 0, 0)
        depth = float(scene.camera.world_to_camera(np.asarray(obj.center))[2])
        facts.append(
            ObjectFacts(obj.object_id, obj.shape, obj.color, obj.size, obj.raised, depth, centroid, len(rows), bbox)
        )
    return facts


# ------------------------------------------------------------------------------------- referring expressions


@dataclass(frozen=True)
class Descriptor:
    """A noun phrase over attributes; None means 'any'. ``Descriptor()`` is 'the object'."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    def matches(self, obj: ObjectFacts) -> bool:
        # spelled out: called about 3,000 times per scene while rendering a world
        return (
            (self.size is None or self.size == obj.size)
            and (self.color is None or self.color == obj.color)
            and (self.shape is None or self.shape == obj.shape)
        )

    def phrase(self, *, plural: bool = False) -> str:
        noun = self.shape or "object"
        if plural:
            noun += "s"
        return " ".join(w for w in (self.size, self.color, noun) if w)

    @property
    def num_attributes(self) -> int:
        return sum(v is not None for v in (self.size, self.color, self.shape))

    @staticmethod
    def all_for(obj: ObjectFacts, *, exclude: str | None = None) -> list[Descriptor]:
        """Every descriptor that matches ``obj`` (optionally never naming attribute ``exclude``), fewest words first."""
        names = [n for n in ("size", "color", "shape") if n != exclude]
        out = []
        for k in range(len(names) + 1):
            for subset in itertools.combinations(names, k):
                out.append(Descriptor(**{n: getattr(obj, n) for n in subset}))
        return out


@dataclass(frozen=True)
class Expression:
    """A referring expression as a program: ``kind`` is attribute, relation (left_of/right_of) or extreme."""

    kind: Literal["attribute", "relation", "extreme"]
    descriptor: Descriptor
    relation: Literal["left_of", "right_of", "closest", "farthest"] | None = None
    anchor: Descriptor | None = None

    def text(self) -> str:
        phrase = "the " + self.descriptor.phrase()
        if self.kind == "attribute":
            return phrase
        if self.kind == "relation":
            side = "left" if self.relation == "left_of" else "right"
            return f"{phrase} to the {side} of the {self.anchor.phrase()}"  # type: ignore[union-attr]
        return f"{phrase} {'closest to' if self.relation == 'closest' else 'farthest from'} the camera"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "descriptor": asdict(self.descriptor),
            "relation": self.relation,
            "anchor": asdict(self.anchor) if self.anchor else None,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Expression:
        anchor = payload.get("anchor")
        return cls(
            kind=payload["kind"],
            descriptor=Descriptor(**payload["descriptor"]),
            relation=payload.get("relation"),
            anchor=Descriptor(**anchor) if anchor else None,
        )


def resolve(expr: Expression, objects: list[ObjectFacts], image_size: int, config: TaskConfig) -> list[int] | None:
    """The object ids ``expr`` refers to, or None when it is ambiguous (a candidate falls inside a margin)."""
    candidates = [o for o in objects if expr.descriptor.matches(o)]
    if expr.kind == "attribute":
        return [o.object_id for o in candidates]
    if expr.kind == "relation":
        anchors = [o for o in objects if expr.anchor is not None and expr.anchor.matches(o)]
        if len(anchors) != 1:
            return None
        anchor = anchors[0]
        margin = config.lateral_margin * image_size
        chosen = []
        for o in candidates:
            if o.object_id == anchor.object_id:
                continue
            dx = o.centroid[0] - anchor.centroid[0]
            if abs(dx) <= margin:
                return None
            if (dx < 0) == (expr.relation == "left_of"):
                chosen.append(o.object_id)
        return chosen
    # extreme: closest / farthest among the candidates, with a clear gap to the runner-up
    if len(candidates) < 2:
        return None
    ordered = sorted(candidates, key=lambda o: o.center_depth, reverse=expr.relation == "farthest")
    best, runner_up = ordered[0].center_depth, ordered[1].center_depth
    if abs(runner_up - best) < config.depth_margin * min(best, runner_up):
        return None
    return [ordered[0].object_id]


def referring_expressions(
    target: ObjectFacts, objects: list[ObjectFacts], image_size: int, config: TaskConfig, rng: np.random.Generator
) -> list[Expression]:
    """Up to ``config.expressions_per_object`` unambiguous expressions for ``target``, one per kind first."""

    def unique(expr: Expression) -> bool:
        return resolve(expr, objects, image_size, config) == [target.object_id]

    by_kind: dict[str, list[Expression]] = {"attribute": [], "relation": [], "extreme": []}
    attribute = [
        Expression("attribute", d)
        for d in Descriptor.all_for(target)
        if d.num_attributes and unique(Expression("attribute", d))
    ]
    if attribute:  # keep the shortest ones: "the red cube" rather than "the large red cube" when both work
        fewest = min(e.descriptor.num_attributes for e in attribute)
        by_kind["attribute"] = [e for e in attribute if e.descriptor.num_attributes == fewest]
    descriptors = Descriptor.all_for(target)
    for other in objects:
        if other.object_id == target.object_id:
            continue
        anchor = _shortest_unique(other, objects)
        if anchor is None:
            continue
        for descriptor in descriptors:
            for relation in ("left_of", "right_of"):
                expr = Expression("relation", descriptor, relation, anchor)
                if unique(expr):
                    by_kind["relation"].append(expr)
    for descriptor in descriptors:
        for relation in ("closest", "farthest"):
            expr = Expression("extreme", descriptor, relation)
            if unique(expr):
                by_kind["extreme"].append(expr)
    chosen: list[Expression] = []
    for kind in ("attribute", "relation", "extreme"):
        options = by_kind[kind]
        if options and len(chosen) < config.expressions_per_object:
            chosen.append(options[int(rng.integers(len(options)))])
    return chosen


def _shortest_unique(obj: ObjectFacts, objects: list[ObjectFacts], *, exclude: str | None = None) -> Descriptor | None:
    for descriptor in Descriptor.all_for(obj, exclude=exclude):
        if sum(descriptor.matches(o) for o in objects) == 1:
            return descriptor
    return None


# ------------------------------------------------------------------------------------------ relative depth


@dataclass(frozen=True)
class MarkerStyle:
    """HardBLINK's marker look at 336 px (red ring of radius 4, width 2; white letter on a black box 25 px
    above the point), scaled to other image sizes with floors that keep it legible."""

    reference_size: int = 336
    radius: float = 4.0
    width: float = 2.0
    label_offset: float = 25.0
    font_size: float = 11.0
    min_font_size: int = 8

    def scaled(self, image_size: int) -> tuple[int, int, int, int]:
        """(radius, line width, label offset, font size) in pixels for an image of this size."""
        s = image_size / self.reference_size
        return (
            max(2, round(self.radius * s)),
            max(1, round(self.width * s)),
            max(self.min_font_size + 2, round(self.label_offset * s)),
            max(self.min_font_size, round(self.font_size * s)),
        )


@dataclass(frozen=True)
class MarkerQuestion:
    """Lettered points and which one is closest. ``depths`` are the z-depths at the points, metres."""

    points: list[tuple[str, float, float]]  # (label, x, y), pixel centres
    depths: list[float]
    answer: str

    @property
    def question(self) -> str:
        return CLOSEST_QUESTION


def relative_depth_question(
    rendering: Rendering, num_points: int, config: TaskConfig, rng: np.random.Generator, *, tries: int = 20
) -> MarkerQuestion | None:
    """Pick ``num_points`` mid-height points with clearly different depths; None if the scene has none.

    Points are pixel centres whose 5x5 neighbourhood lies on one surface (so the ring marks one thing), spread
    over different surfaces where possible, at least ``marker_min_distance`` apart, with the depth gaps of
    ``config``. Letters are assigned in random order; the answer is the letter of the smallest depth.
    """
    ids, depth = rendering.instance_ids, rendering.depth
    n = ids.shape[0]
    interior = np.ones_like(ids, dtype=bool)
    for dy, dx in itertools.product(range(-2, 3), repeat=2):
        interior &= np.roll(ids, (dy, dx), axis=(0, 1)) == ids
    # rows whose pixel centres (row + 0.5) lie inside the band
    top, bottom = int(np.ceil(config.marker_band[0] * n - 0.5)), int(np.floor(config.marker_band[1] * n - 0.5)) + 1
    band = np.zeros_like(interior)
    band[top:bottom, 3 : n - 3] = True
    rows, cols = np.nonzero(interior & band)
    if len(rows) < num_points:
        return None
    z_all = depth[rows, cols].astype(float)
    min_dist2 = (config.marker_min_distance * n) ** 2
    letters = string.ascii_uppercase[:num_points]
    for _ in range(tries):
        # Randomised greedy: walk the candidates in random order, keep one if it is far enough (in the image and
        # in depth) from every point kept so far. Different surfaces come first, so points spread over objects.
        order = rng.permutation(len(rows))
        _, first_of_surface = np.unique(ids[rows[order], cols[order]], return_index=True)
        firsts = order[first_of_surface][rng.permutation(len(first_of_surface))]
        order = np.concatenate([firsts, np.delete(order, first_of_surface)])
        kept: list[int] = []
        for idx in order:
            if all(
                (cols[idx] - cols[k]) ** 2 + (rows[idx] - rows[k]) ** 2 >= min_dist2
                and max(z_all[idx], z_all[k]) >= min(z_all[idx], z_all[k]) * (1 + config.marker_min_gap)
                for k in kept
            ):
                kept.append(int(idx))
                if len(kept) == num_points:
                    break
        if len(kept) < num_points:
            continue  # this order found too few separable points; another random order may find enough
        kept = [kept[i] for i in rng.permutation(num_points)]  # letters in random order, so gold letters are uniform
        z = z_all[kept]
        zs = np.sort(z)
        if zs[1] < zs[0] * (1 + config.marker_closest_gap):
            continue
        points = [(letters[i], float(cols[k] + 0.5), float(rows[k] + 0.5)) for i, k in enumerate(kept)]
        return MarkerQuestion(points=points, depths=[float(v) for v in z], answer=letters[int(np.argmin(z))])
    return None


def draw_markers(
    rgb: np.ndarray, points: list[tuple[str, float, float]], style: MarkerStyle | None = None
) -> Image.Image:
    """Draw HardBLINK-style lettered rings on a copy of ``rgb`` (H, W, 3) uint8."""
    style = style or MarkerStyle()
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    radius, width, offset, font_size = style.scaled(image.width)
    font = ImageFont.load_default(size=font_size)
    for label, x, y in points:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 0, 0), width=width)
        left, top, right, bottom = draw.textbbox((x, y - offset), label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
        draw.text((x, y - offset), label, fill=(255, 255, 255), font=font)
    return image


# --------------------------------------------------------------------------------------------------- VQA


@dataclass(frozen=True)
class VQAItem:
    """A short-answer question and its multiple-choice version (``options`` includes ``answer``)."""

    category: Literal["color", "shape", "count", "spatial"]
    question: str
    answer: str
    options: tuple[str, ...]


def vqa_items(
    objects: list[ObjectFacts], image_size: int, config: TaskConfig, rng: np.random.Generator
) -> list[VQAItem]:
    """One colour, shape, count and left/right question per scene where the scene allows it."""
    items: list[VQAItem] = []
    order = [objects[i] for i in rng.permutation(len(objects))]

    for obj in order:  # colour: name the object without its colour
        d = _shortest_unique(obj, objects, exclude="color")
        if d is not None:
            others = [c for c in COLORS if c != obj.color]
            options = [obj.color, *rng.choice(others, size=3, replace=False).tolist()]
            items.append(VQAItem("color", f"What color is the {d.phrase()}?", obj.color, tuple(options)))
            break
    for obj in order:  # shape: name the object without its shape
        d = _shortest_unique(obj, objects, exclude="shape")
        if d is not None:
            items.append(VQAItem("shape", f"What shape is the {d.phrase()}?", obj.shape, SHAPES))
            break

    # count: over all objects, one colour, one shape or one size
    filters: list[Descriptor] = [Descriptor()]
    filters += [Descriptor(color=c) for c in sorted({o.color for o in objects})]
    filters += [Descriptor(shape=s) for s in sorted({o.shape for o in objects})]
    filters += [Descriptor(size=s) for s in SIZES]
    d = filters[int(rng.integers(len(filters)))]
    count = sum(d.matches(o) for o in objects)
    wrong = [c for c in range(max(0, count - 3), count + 4) if c != count]
    options = [count, *rng.choice(wrong, size=3, replace=False).tolist()]
    items.append(VQAItem("count", f"How many {d.phrase(plural=True)} are there?", str(count), tuple(map(str, options))))

    margin = config.lateral_margin * image_size
    for a, b in itertools.permutations(order, 2):  # left/right between two nameable objects, clearly apart
        da, db = _shortest_unique(a, objects), _shortest_unique(b, objects)
        dx = a.centroid[0] - b.centroid[0]
        if da is None or db is None or abs(dx) <= margin:
            continue
        question = f"Is the {da.phrase()} to the left or to the right of the {db.phrase()}?"
        items.append(VQAItem("spatial", question, "left" if dx < 0 else "right", ("left", "right")))
        break
    return items
