"""The depth tokenizer: a VQ-VAE over normalised depth maps, its teachers, training and evaluation."""

from perceptio.tokenizers.depth.config import PRESETS, DepthTokenizerConfig
from perceptio.tokenizers.depth.model import CheckpointMismatchError, DepthTokenizer, DepthTokenizerOutput
from perceptio.tokenizers.depth.normalize import (
    DepthInputError,
    DepthStats,
    denormalize_depth,
    normalize_depth,
    resize_nearest,
)

__all__ = [
    "PRESETS",
    "CheckpointMismatchError",
    "DepthInputError",
    "DepthStats",
    "DepthTokenizer",
    "DepthTokenizerConfig",
    "DepthTokenizerOutput",
    "denormalize_depth",
    "normalize_depth",
    "resize_nearest",
]
