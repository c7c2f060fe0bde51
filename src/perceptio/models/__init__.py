"""The Perceptio model: configuration, presets and the model class (built on transformers' InternVL and SAM2)."""

from perceptio.models.build import build_preset, from_components, load_model, save_model
from perceptio.models.configuration_perceptio import DEFAULT_LOSS_WEIGHTS, PerceptioConfig
from perceptio.models.modeling_perceptio import (
    FrozenTargets,
    PerceptioForConditionalGeneration,
    PerceptioOutput,
    Prediction,
)
from perceptio.models.presets import PRESETS, ModelPreset
from perceptio.models.processing import PerceptioProcessor

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "PRESETS",
    "FrozenTargets",
    "ModelPreset",
    "PerceptioConfig",
    "PerceptioForConditionalGeneration",
    "PerceptioOutput",
    "PerceptioProcessor",
    "Prediction",
    "build_preset",
    "from_components",
    "load_model",
    "save_model",
]
