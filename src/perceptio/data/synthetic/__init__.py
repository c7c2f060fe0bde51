"""The synthetic spatial world: rendered 3D scenes with exact depth and masks, written in real formats."""

from perceptio.data.synthetic.render import Rendering, render_scene
from perceptio.data.synthetic.scene import COLORS, SHAPES, SIZES, Camera, Scene, SceneConfig, SceneObject, sample_scene
from perceptio.data.synthetic.tasks import Descriptor, Expression, MarkerStyle, ObjectFacts, TaskConfig, resolve
from perceptio.data.synthetic.world import (
    SPLITS,
    WorldConfig,
    WorldScene,
    WorldSummary,
    default_render_workers,
    generate_world,
    render_world_scene,
)

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Camera",
    "Descriptor",
    "Expression",
    "MarkerStyle",
    "ObjectFacts",
    "Rendering",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "TaskConfig",
    "WorldConfig",
    "WorldScene",
    "WorldSummary",
    "default_render_workers",
    "generate_world",
    "render_scene",
    "render_world_scene",
    "resolve",
    "sample_scene",
]
