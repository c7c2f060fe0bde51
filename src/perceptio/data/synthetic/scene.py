"""Scenes of the synthetic spatial world: a camera over a ground plane and a few simple solids.

World frame: x to the right, y up, z forward (away from the camera), metres. The ground is the plane y = 0.
The camera sits at (0, height, 0), looks along +z and is pitched down; it has no roll or yaw, so image rows
are horizontal in the world. Image frame: u to the right, v down, pixel centres at half-integers.

Objects are spheres, cubes (rotated about the vertical axis) and vertical cylinders in two sizes. Some rest
on the ground and some float above it, so that neither their height in the image nor their apparent size
alone tells their distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "Camera",
    "SceneConfig",
    "SceneObject",
    "Scene",
    "sample_scene",
]

Shape = Literal["sphere", "cube", "cylinder"]
SHAPES: tuple[Shape, ...] = ("sphere", "cube", "cylinder")

#: Colour names and their linear RGB albedo in [0, 1] (CLEVR's palette of eight).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.68, 0.14, 0.14),
    "green": (0.11, 0.52, 0.18),
    "blue": (0.16, 0.29, 0.78),
    "yellow": (0.93, 0.82, 0.16),
    "purple": (0.48, 0.16, 0.62),
    "cyan": (0.16, 0.72, 0.78),
    "brown": (0.51, 0.33, 0.16),
    "gray": (0.52, 0.52, 0.52),
}

#: Size names and the bounding radius (metres) of an object of that size.
SIZES: dict[str, float] = {"small": 0.35, "large": 0.62}


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Defaults give 2-6 objects 2.2-7.5 m away, a third of them floating."""

    min_objects: int = 2
    """Fewest objects in a scene."""
    max_objects: int = 6
    """Most objects in a scene."""
    vertical_fov_deg: float = 50.0
    """Vertical field of view of the (square) camera, degrees."""
    camera_height: tuple[float, float] = (2.4, 3.0)
    """Range of the camera height above the ground, metres."""
    pitch_deg: tuple[float, float] = (35.0, 40.0)
    """Range of the downward pitch; with the default FOV the top image row still sees the ground (< 17 m away)."""
    distance: tuple[float, float] = (2.2, 7.5)
    """Range of an object's forward distance (world z of its centre), metres."""
    raised_probability: float = 0.35
    """Chance that an object floats above the ground instead of resting on it."""
    raised_height: tuple[float, float] = (0.3, 1.2)
    """Range of the gap between a floating object's bottom and the ground, metres."""
    min_gap: float = 0.15
    """Smallest distance between two objects' ground footprints, metres (objects never intersect)."""
    min_visible_fraction: float = 0.003
    """An object must cover at least this fraction of the image (after occlusion) for a scene to be kept."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        top_ray_below_horizon = self.pitch_deg[0] - self.vertical_fov_deg / 2
        if top_ray_below_horizon <= 1.0:
            raise ValueError(
                f"pitch_deg[0] - vertical_fov_deg/2 = {top_ray_below_horizon:.1f} deg: the top of the image would see "
                "the sky (infinite depth); raise pitch_deg or lower vertical_fov_deg"
            )
        for name in ("camera_height", "pitch_deg", "distance", "raised_height"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"SceneConfig.{name} must be (low, high), got ({lo}, {hi})")


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at (0, height, 0) looking along +z, pitched down by ``pitch`` radians."""

    height: float
    pitch: float
    vertical_fov: float
    image_size: int

    @property
    def focal(self) -> float:
        """Focal length in pixels."""
        return (self.image_size / 2) / math.tan(self.vertical_fov / 2)

    @property
    def origin(self) -> np.ndarray:
        return np.array([0.0, self.height, 0.0])

    @property
    def rotation(self) -> np.ndarray:
        """Columns are the camera's right, down and forward axes in world coordinates (camera -> world)."""
        s, c = math.sin(self.pitch), math.cos(self.pitch)
        right = np.array([1.0, 0.0, 0.0])
        down = np.array([0.0, -c, -s])
        forward = np.array([0.0, -s, c])
        return np.stack([right, down, forward], axis=1)

    def intrinsics(self) -> np.ndarray:
        """The 3x3 pixel intrinsics matrix K."""
        f, cxy = self.focal, self.image_size / 2
        return np.array([[f, 0.0, cxy], [0.0, f, cxy], [0.0, 0.0, 1.0]])

    def world_to_camera(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (..., 3) camera coordinates (x right, y down, z forward = depth)."""
        return (points - self.origin) @ self.rotation

    def project(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (..., 3) as (u, v, depth) with u, v in pixels."""
        cam = self.world_to_camera(points)
        f, cxy = self.focal, self.image_size / 2
        return np.stack([f * cam[..., 0] / cam[..., 2] + cxy, f * cam[..., 1] / cam[..., 2] + cxy, cam[..., 2]], -1)

    def unproject(self, u: np.ndarray, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Pixel coordinates and z-depth -> (..., 3) world points (the inverse of :meth:`project`)."""
        f, cxy = self.focal, self.image_size / 2
        cam = np.stack([(u - cxy) / f * depth, (v - cxy) / f * depth, depth], axis=-1)
        return cam @ self.rotation.T + self.origin

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "pitch_deg": math.degrees(self.pitch),
            "vertical_fov_deg": math.degrees(self.vertical_fov),
            "image_size": self.image_size,
            "intrinsics": self.intrinsics().tolist(),
        }


@dataclass(frozen=True)
class SceneObject:
    """One solid. ``radius`` is the bounding radius; the shape's own dimensions derive from it.

    * sphere: radius ``radius``;
    * cube: half-edge ``radius / sqrt(3) * 1.25`` (its corners stick out a little past the bounding
      sphere's equator, so it looks as big as a sphere of the same size), rotated by ``yaw`` about y;
    * cylinder: radius ``0.8 * radius``, height ``1.6 * radius``, vertical axis.
    """

    object_id: int
    shape: Shape
    color: str
    size: str
    center: tuple[float, float, float]
    radius: float
    yaw: float = 0.0
    raised: bool = False

    @property
    def half_extent(self) -> float:
        """Half the height of the object (centre to bottom), metres."""
        if self.shape == "sphere":
            return self.radius
        if self.shape == "cube":
            return self.cube_half_edge
        return self.cylinder_half_height

    @property
    def cube_half_edge(self) -> float:
        return self.radius / math.sqrt(3) * 1.25

    @property
    def cylinder_radius(self) -> float:
        return 0.8 * self.radius

    @property
    def cylinder_half_height(self) -> float:
        return 0.8 * self.radius

    @property
    def footprint_radius(self) -> float:
        """Radius of a circle on the ground that contains the object's footprint."""
        if self.shape == "cube":
            return self.cube_half_edge * math.sqrt(2)
        if self.shape == "cylinder":
            return self.cylinder_radius
        return self.radius

    def to_dict(self) -> dict[str, Any]:
        return {
            "object_id": self.object_id,
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "center": [round(c, 6) for c in self.center],
            "radius": self.radius,
            "yaw_deg": round(math.degrees(self.yaw), 4),
            "raised": self.raised,
        }


@dataclass(frozen=True)
class Scene:
    """A camera and its objects. Object ids are 1..N (0 is the ground in instance maps)."""

    camera: Camera
    objects: tuple[SceneObject, ...]
    light_direction: tuple[float, float, float] = field(default=(-0.3, 1.0, -0.25))
    """Direction towards the light. Mostly overhead, so a floating object's shadow marks where it stands."""


def _sample_object(rng: np.random.Generator, object_id: int, camera: Camera, config: SceneConfig) -> SceneObject:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    radius = SIZES[size]
    z = float(rng.uniform(*config.distance))
    # Keep the object's centre inside the horizontal field of view: a ground point at forward distance z lies at
    # camera depth z*cos(pitch) + height*sin(pitch), where the (square) image spans +-depth*tan(fov/2) sideways.
    depth = z * math.cos(camera.pitch) + camera.height * math.sin(camera.pitch)
    half_width = depth * math.tan(camera.vertical_fov / 2) * 0.9
    x = float(rng.uniform(-half_width, half_width))
    raised = bool(rng.random() < config.raised_probability)
    proto = SceneObject(object_id, shape, color, size, (0.0, 0.0, 0.0), radius)
    bottom = float(rng.uniform(*config.raised_height)) if raised else 0.0
    yaw = float(rng.uniform(0, math.pi / 2)) if shape == "cube" else 0.0
    return SceneObject(object_id, shape, color, size, (x, bottom + proto.half_extent, z), radius, yaw, raised)


def sample_scene(rng: np.random.Generator, config: SceneConfig, image_size: int, *, max_tries: int = 200) -> Scene:
    """Draw a camera and a set of non-intersecting objects (visibility is checked by the renderer's caller)."""
    camera = Camera(
        height=float(rng.uniform(*config.camera_height)),
        pitch=math.radians(float(rng.uniform(*config.pitch_deg))),
        vertical_fov=math.radians(config.vertical_fov_deg),
        image_size=image_size,
    )
    num = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects: list[SceneObject] = []
    tries = 0
    while len(objects) < num and tries < max_tries:
        tries += 1
        candidate = _sample_object(rng, len(objects) + 1, camera, config)
        cx, _, cz = candidate.center
        u, v, _ = camera.project(np.asarray(candidate.center))
        margin = 0.05 * image_size
        if not (margin <= u <= image_size - margin and margin <= v <= image_size - margin):
            continue  # the centre must be in view, so that every object can be pointed at and named
        if all(
            math.hypot(cx - o.center[0], cz - o.center[2])
            >= candidate.footprint_radius + o.footprint_radius + config.min_gap
            for o in objects
        ):
            objects.append(candidate)
    return Scene(camera=camera, objects=tuple(objects))
