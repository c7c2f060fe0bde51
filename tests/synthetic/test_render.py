"""The renderer: depth and masks agree with the geometry, occlusion is right, scenes are deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perceptio.data.synthetic import Camera, Scene, SceneConfig, SceneObject, render_scene, sample_scene


def _surface_residual(points: np.ndarray, obj: SceneObject) -> np.ndarray:
    """Distance-like residual of world points from the surface of ``obj`` (0 on the surface)."""
    rel = points - np.asarray(obj.center)
    if obj.shape == "sphere":
        return np.abs(np.linalg.norm(rel, axis=1) - obj.radius)
    if obj.shape == "cube":
        c, s = math.cos(obj.yaw), math.sin(obj.yaw)
        rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        local = rel @ rot
        return np.abs(np.abs(local).max(axis=1) - obj.cube_half_edge)
    radial = np.hypot(rel[:, 0], rel[:, 2])
    on_side = np.abs(radial - obj.cylinder_radius) + np.clip(np.abs(rel[:, 1]) - obj.cylinder_half_height, 0, None)
    on_cap = np.abs(np.abs(rel[:, 1]) - obj.cylinder_half_height) + np.clip(radial - obj.cylinder_radius, 0, None)
    return np.minimum(on_side, on_cap)


@pytest.mark.parametrize("index", range(6))
def test_depth_and_masks_lie_on_the_surfaces_they_label(index: int) -> None:
    rng = np.random.default_rng([7, index])
    scene = sample_scene(rng, SceneConfig(), 96)
    r = render_scene(scene)
    n = scene.camera.image_size
    v, u = np.mgrid[0:n, 0:n] + 0.5
    points = scene.camera.unproject(u.ravel(), v.ravel(), r.depth.ravel().astype(np.float64))
    ids = r.instance_ids.ravel()
    assert np.isfinite(r.depth).all() and (r.depth > 0).all()
    ground = ids == 0
    assert np.abs(points[ground, 1]).max() < 1e-3  # ground pixels are on y = 0
    for obj in scene.objects:
        sel = ids == obj.object_id
        if sel.any():
            assert _surface_residual(points[sel], obj).max() < 1e-3, obj.shape
    assert set(np.unique(ids)) <= {0, *(o.object_id for o in scene.objects)}


def _brute_force_spheres(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """An independent per-pixel loop: the nearest of ground and spheres, with normalised ray directions."""
    cam = scene.camera
    n = cam.image_size
    depth = np.zeros((n, n))
    ids = np.zeros((n, n), dtype=int)
    for row in range(n):
        for col in range(n):
            d_cam = np.array([(col + 0.5 - n / 2) / cam.focal, (row + 0.5 - n / 2) / cam.focal, 1.0])
            d = cam.rotation @ d_cam
            length = np.linalg.norm(d)
            d_unit = d / length
            best, best_id = -cam.height / d_unit[1] if d_unit[1] < 0 else np.inf, 0
            for obj in scene.objects:
                oc = cam.origin - np.asarray(obj.center)
                b = d_unit @ oc
                disc = b * b - (oc @ oc - obj.radius**2)
                if disc >= 0 and 0 < -b - math.sqrt(disc) < best:
                    best, best_id = -b - math.sqrt(disc), obj.object_id
            depth[row, col] = best / length  # distance along the ray -> z-depth
            ids[row, col] = best_id
    return depth, ids


def test_occlusion_matches_an_independent_ray_caster() -> None:
    camera = Camera(height=2.5, pitch=math.radians(37), vertical_fov=math.radians(50), image_size=48)
    near = SceneObject(1, "sphere", "red", "large", (0.0, 0.62, 3.0), 0.62)
    far = SceneObject(2, "sphere", "blue", "large", (0.3, 0.9, 5.0), 0.62)  # partly hidden behind `near`
    scene = Scene(camera=camera, objects=(near, far))
    r = render_scene(scene)
    depth, ids = _brute_force_spheres(scene)
    np.testing.assert_array_equal(r.instance_ids, ids)
    np.testing.assert_allclose(r.depth, depth, rtol=1e-5)
    assert (ids == 2).sum() > 0 and (ids == 1).sum() > (ids == 2).sum()


def test_scene_sampling_is_deterministic_and_objects_never_intersect() -> None:
    config = SceneConfig()
    for index in range(20):
        a = sample_scene(np.random.default_rng([3, index]), config, 128)
        b = sample_scene(np.random.default_rng([3, index]), config, 128)
        assert a == b
        assert config.min_objects <= len(a.objects) <= config.max_objects
        for i, o in enumerate(a.objects):
            for p in a.objects[i + 1 :]:
                gap = math.hypot(o.center[0] - p.center[0], o.center[2] - p.center[2])
                assert gap >= o.footprint_radius + p.footprint_radius
            assert o.center[1] - o.half_extent >= -1e-9  # nothing sinks into the ground
            assert o.raised == (o.center[1] - o.half_extent > 1e-9)


def test_objects_vary_so_height_and_size_do_not_give_depth_away() -> None:
    rng = np.random.default_rng(0)
    objects = [o for k in range(60) for o in sample_scene(rng, SceneConfig(), 128).objects]
    assert {o.shape for o in objects} == {"sphere", "cube", "cylinder"}
    assert len({o.color for o in objects}) == 8 and {o.size for o in objects} == {"small", "large"}
    raised = np.mean([o.raised for o in objects])
    assert 0.2 < raised < 0.5


def test_scene_config_rejects_a_camera_that_sees_the_sky() -> None:
    with pytest.raises(ValueError, match="sky"):
        SceneConfig(pitch_deg=(20.0, 30.0), vertical_fov_deg=50.0)
    with pytest.raises(ValueError, match="min_objects"):
        SceneConfig(min_objects=4, max_objects=2)
