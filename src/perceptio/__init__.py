"""Perceptio: a vision-language model that writes segmentation and depth tokens before it answers."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
