"""The one place that configures SAM2 the way Perceptio uses it.

SAM2's mask decoder can swap its single-mask output for the most stable of its multi-mask outputs
(``dynamic_multimask_via_stability``). Perceptio trains one output per mode (single mask, or the multi-mask
outputs scored by IoU), so the swap would read an output the mode does not train: it is always off, on the module
and in its config (so that a saved model keeps it off).
"""

from __future__ import annotations

from pathlib import Path

from transformers import Sam2Config, Sam2Model

__all__ = ["load_sam2", "perceptio_sam2_config", "without_stability_swap"]


def perceptio_sam2_config(config: Sam2Config) -> Sam2Config:
    """``config`` with the stability-based mask swap turned off (changed in place); returns it."""
    config.mask_decoder_config.dynamic_multimask_via_stability = False
    return config


def without_stability_swap(sam: Sam2Model) -> Sam2Model:
    """``sam`` with the stability-based mask swap turned off (module and config); returns it."""
    sam.mask_decoder.dynamic_multimask_via_stability = False
    perceptio_sam2_config(sam.config)
    return sam


def load_sam2(directory: str | Path) -> Sam2Model:
    """A SAM2 saved with ``save_pretrained`` (safetensors only), configured for Perceptio."""
    return without_stability_swap(Sam2Model.from_pretrained(directory, use_safetensors=True))
