"""A small vectorised ray caster for :class:`~perceptio.data.synthetic.scene.Scene`.

One primary ray per pixel centre, exact ray/solid intersections, a z-buffer over the ground and every object,
Lambert shading under one directional light plus ambient light, and cast shadows (one shadow ray per pixel).
No anti-aliasing: every pixel belongs to exactly one surface, so the RGB image, the depth map and the
instance masks agree pixel for pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perceptio.data.synthetic.scene import COLORS, Scene, SceneObject

__all__ = ["Rendering", "render_scene"]

_EPS = 1e-6
_AMBIENT = 0.38
_DIFFUSE = 0.62
_GROUND_ALBEDO = np.array([0.60, 0.58, 0.54])


@dataclass(frozen=True)
class Rendering:
    """What the renderer returns.

    Attributes:
        rgb: uint8 (H, W, 3).
        depth: float32 (H, W), metric z-depth (distance along the optical axis) in metres; finite everywhere.
        instance_ids: int32 (H, W), 0 for the ground, ``object_id`` (1..N) for objects, after occlusion.
    """

    rgb: np.ndarray
    depth: np.ndarray
    instance_ids: np.ndarray

    def mask(self, object_id: int) -> np.ndarray:
        """The visible pixels of one object: bool (H, W)."""
        return self.instance_ids == object_id


def _rays(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Ray origin (3,) and directions (P, 3) scaled so that a ray parameter t equals the z-depth."""
    cam = scene.camera
    n = cam.image_size
    coords = (np.arange(n) + 0.5 - n / 2) / cam.focal
    u, v = np.meshgrid(coords, coords)  # u varies along columns, v along rows
    dirs_cam = np.stack([u.ravel(), v.ravel(), np.ones(n * n)], axis=1)
    return cam.origin, dirs_cam @ cam.rotation.T


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_sphere(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    oc = o - np.asarray(obj.center)
    a = np.sum(d * d, axis=-1)
    b = 2.0 * np.sum(d * oc, axis=-1)
    c = np.sum(oc * oc, axis=-1) - obj.radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _hit_cube(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    rot = _yaw_matrix(obj.yaw)
    o_local = (o - np.asarray(obj.center)) @ rot  # R^T (o - c) written as a row-vector product
    d_local = d @ rot
    h = obj.cube_half_edge
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-h - o_local) / d_local
        t2 = (h - o_local) / d_local
    # the slab bounds over the three axes, NaN (a ray along a face) ignored: np.nanmax / np.nanmin, 3x faster
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near = np.fmax(np.fmax(near[:, 0], near[:, 1]), near[:, 2])
    t_far = np.fmin(np.fmin(far[:, 0], far[:, 1]), far[:, 2])
    return np.where((t_far >= t_near) & (t_near > _EPS), t_near, np.inf)


def _hit_cylinder(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    cx, cy, cz = obj.center
    r, hh = obj.cylinder_radius, obj.cylinder_half_height
    ox, oy, oz = o[..., 0] - cx, o[..., 1] - cy, o[..., 2] - cz
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = dx * dx + dz * dz
    b = 2 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - r * r
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
        y_side = oy + t_side * dy
        t_side = np.where((disc >= 0) & (t_side > _EPS) & (np.abs(y_side) <= hh), t_side, np.inf)
        best = t_side
        for cap_y in (hh, -hh):
            t_cap = (cap_y - oy) / dy
            px, pz = ox + t_cap * dx, oz + t_cap * dz
            ok = (t_cap > _EPS) & (px * px + pz * pz <= r * r)
            best = np.minimum(best, np.where(ok, t_cap, np.inf))
    return best


# Each takes ray origins o (3,) or (P, 3) and directions d (P, 3) or (1, 3) and returns the first hit's ray
# parameter t (P,), or inf where the ray misses.
_HIT = {"sphere": _hit_sphere, "cube": _hit_cube, "cylinder": _hit_cylinder}


def _normals(points: np.ndarray, obj: SceneObject) -> np.ndarray:
    """Outward unit normals (P, 3) at surface points (P, 3) of one object."""
    center = np.asarray(obj.center)
    rel = points - center
    if obj.shape == "sphere":
        return rel / obj.radius
    if obj.shape == "cube":
        rot = _yaw_matrix(obj.yaw)
        local = rel @ rot
        axis = np.argmax(np.abs(local), axis=1)
        n_local = np.zeros_like(local)
        n_local[np.arange(len(local)), axis] = np.sign(local[np.arange(len(local)), axis])
        return n_local @ rot.T
    # cylinder: caps where the point sits at the top/bottom plane, the side elsewhere
    normals = np.zeros_like(rel)
    on_cap = np.abs(np.abs(rel[:, 1]) - obj.cylinder_half_height) < 1e-5 * max(1.0, obj.radius)
    normals[on_cap, 1] = np.sign(rel[on_cap, 1])
    radial = rel[~on_cap][:, [0, 2]]
    radial /= np.linalg.norm(radial, axis=1, keepdims=True)
    normals[~on_cap, 0] = radial[:, 0]
    normals[~on_cap, 2] = radial[:, 1]
    return normals


def render_scene(scene: Scene, *, noise: np.random.Generator | None = None) -> Rendering:
    """Ray-cast a scene.

    Args:
        scene: the camera and objects.
        noise: if given, adds faint per-pixel sensor noise (sigma 1/255) to the RGB image; depth is exact either way.

    Returns:
        A :class:`Rendering` with RGB (H, W, 3) uint8, depth (H, W) float32 metres and instance ids (H, W) int32.
    """
    n = scene.camera.image_size
    origin, dirs = _rays(scene)
    with np.errstate(divide="ignore"):
        t_ground = np.where(dirs[:, 1] < -_EPS, -origin[1] / dirs[:, 1], np.inf)
    hits = np.stack([t_ground] + [_HIT[obj.shape](origin, dirs, obj) for obj in scene.objects])
    winner = np.argmin(hits, axis=0)
    depth = hits[winner, np.arange(n * n)]
    if not np.isfinite(depth).all():  # guarded by SceneConfig; kept as an invariant check
        raise RuntimeError("a camera ray escaped the scene (the sky is visible); check the camera pitch and FOV")
    points = origin + depth[:, None] * dirs

    light = np.asarray(scene.light_direction, dtype=float)
    light /= np.linalg.norm(light)
    normals = np.empty_like(points)
    albedo = np.empty_like(points)
    ground = winner == 0
    normals[ground] = (0.0, 1.0, 0.0)
    # The ground carries a faint 1 m checkerboard so that perspective is visible.
    checker = (np.floor(points[ground, 0]) + np.floor(points[ground, 2])) % 2
    albedo[ground] = _GROUND_ALBEDO * (0.93 + 0.07 * checker)[:, None]
    for index, obj in enumerate(scene.objects, start=1):
        sel = winner == index
        normals[sel] = _normals(points[sel], obj)
        albedo[sel] = COLORS[obj.color]
    lambert = np.clip(normals @ light, 0.0, None)
    # Shadow rays towards the light, started a hair off the surface so they do not hit it again.
    lit = lambert > 0
    starts = points[lit] + 1e-4 * normals[lit]
    blocked = np.zeros(int(lit.sum()), dtype=bool)
    for obj in scene.objects:
        blocked |= np.isfinite(_HIT[obj.shape](starts, light[None, :], obj))
    lambert[np.flatnonzero(lit)[blocked]] = 0.0
    rgb = albedo * (_AMBIENT + _DIFFUSE * lambert)[:, None]
    if noise is not None:
        rgb += noise.normal(0.0, 1.0 / 255, size=rgb.shape)
    srgb = np.clip(rgb, 0.0, 1.0) ** (1 / 2.2)
    return Rendering(
        rgb=(srgb * 255 + 0.5).astype(np.uint8).reshape(n, n, 3),
        depth=depth.astype(np.float32).reshape(n, n),
        instance_ids=winner.astype(np.int32).reshape(n, n),
    )
