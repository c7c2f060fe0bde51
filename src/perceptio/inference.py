"""Prediction from Python and the command line: load a saved model, answer prompts about images, save the outputs.

    from perceptio import Perceptio

    model = Perceptio.from_pretrained("runs/tiny_synth/model")
    prediction = model.predict("scene.png", "Please segment the red cube in this image.")
    model.save_prediction(prediction, "scene.png", "out/scene")

A saved prediction folder holds ``prediction.json`` (prompt, answer, raw generated sequence, parse issues),
``mask_{k}.png`` per segmentation token, ``overlay.png`` (the masks on the image) and ``depth.png`` (the decoded
depth span, colour-mapped, bright = near).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from perceptio.data.schema import load_rgb
from perceptio.models.build import load_model
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration, Prediction
from perceptio.models.processing import PerceptioProcessor
from perceptio.utils.viz import colorize_depth, overlay_masks

__all__ = ["Perceptio", "save_prediction"]

ImageInput = Image.Image | str | Path


def _image(value: ImageInput) -> Image.Image:
    return value.convert("RGB") if isinstance(value, Image.Image) else load_rgb(Path(value))


def save_prediction(prediction: Prediction, image: ImageInput, out_dir: str | Path, *, prompt: str = "") -> Path:
    """Write one prediction's files into ``out_dir`` (see the module docstring); returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = _image(image)
    record: dict[str, Any] = {
        "prompt": prompt,
        "answer": prediction.answer,
        "output": prediction.text,
        "issues": prediction.issues,
        "num_masks": len(prediction.masks),
        "mask_pixels": [int(m.sum()) for m in prediction.masks],
        "depth_codes": prediction.depth_codes.tolist() if prediction.depth_codes is not None else None,
    }
    (out_dir / "prediction.json").write_text(json.dumps(record, indent=2) + "\n")
    for k, mask in enumerate(prediction.masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(out_dir / f"mask_{k}.png")
    overlay_masks(picture, prediction.masks).save(out_dir / "overlay.png")
    if prediction.depth is not None:
        colorize_depth(prediction.depth, inverse=False).save(out_dir / "depth.png")
    return out_dir


class Perceptio:
    """A trained model and its processor, ready to predict.

    Args:
        model: the model (moved to ``device`` by :meth:`from_pretrained`).
        processor: its processor (text tokenizer and image preprocessing).
    """

    def __init__(self, model: PerceptioForConditionalGeneration, processor: PerceptioProcessor) -> None:
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None
    ) -> Perceptio:
        """Load a model folder (``perceptio train``'s ``model/``, or :func:`perceptio.models.save_model`'s output);
        ``device`` defaults to CUDA when available."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = load_model(directory, dtype=dtype, device=device)
        return cls(model, processor)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        **kwargs: Any,
    ) -> Prediction | list[Prediction]:
        """Answer ``prompts`` about ``images`` (one each, or one image for several prompts, or lists of equal
        length). Keyword arguments go to :meth:`PerceptioForConditionalGeneration.predict` (``batch_size``,
        ``spatial``, ``constrain``, ``max_new_tokens``, ``require_depth_span``). Returns one prediction for a
        single prompt, else a list."""
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        image_list = [images] if isinstance(images, Image.Image | str | Path) else list(images)
        if len(image_list) == 1 and len(prompt_list) > 1:
            image_list = image_list * len(prompt_list)
        loaded = [_image(image) for image in image_list]
        predictions = self.model.predict(loaded, prompt_list, self.processor, **kwargs)
        return predictions[0] if single else predictions

    def save_prediction(self, prediction: Prediction, image: ImageInput, out_dir: str | Path, **kwargs: Any) -> Path:
        """:func:`save_prediction`."""
        return save_prediction(prediction, image, out_dir, **kwargs)
