"""Prediction from Python and the command line: load a saved model, answer prompts about images, save the outputs.

    from perceptio import Perceptio

    model = Perceptio.from_pretrained("runs/tiny_synth/model")
    prediction = model.predict("scene.png", "Please segment the red cube in this image.")
    model.save_prediction(prediction, "scene.png", "out/scene")

A saved prediction folder holds ``prediction.json`` (prompt, source image path and sha256, answer, raw generated
sequence, parse issues), ``mask_{k}.png`` per segmentation token, ``overlay.png`` (the masks on the image) and
``depth.png`` (the decoded depth span, colour-mapped, bright = near). :func:`prediction_folder_names` names the
folders of a set of (image, prompt) pairs (``perceptio predict``): unique, and the same for the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from perceptio.data.errors import DataError
from perceptio.data.schema import as_rgb, load_rgb
from perceptio.models.build import load_model
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration, Prediction
from perceptio.models.processing import PerceptioProcessor
from perceptio.utils.viz import colorize_depth, overlay_masks

__all__ = ["Perceptio", "prediction_folder_names", "read_prompts_jsonl", "save_prediction"]

ImageInput = Image.Image | str | Path


def _image(value: ImageInput) -> Image.Image:
    """An RGB image; in-memory images pass the checks image files pass (no 16-bit saturation, no lost alpha)."""
    return as_rgb(value) if isinstance(value, Image.Image) else load_rgb(Path(value))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prediction_folder_names(images: Sequence[str | Path]) -> list[str]:
    """Folder names for predictions on ``images`` (one entry per (image, prompt) pair, in order).

    A name is the image's path relative to the images' common folder, without its suffix and with ``__`` between
    the parts, then ``__p{k}`` for the image's k-th prompt: ``d2/a.png`` -> ``d2__a__p0``. Names that would still
    clash (``a.png`` and ``a.jpg``; ``A.png`` and ``a.png`` on a case-insensitive disk) get a suffix from the hash
    of the relative path. The names depend only on the inputs, so the same inputs give the same folders.
    """
    absolute = [os.path.abspath(os.fspath(image)) for image in images]
    distinct = list(dict.fromkeys(absolute))
    try:
        root = os.path.commonpath([os.path.dirname(path) for path in distinct]) if distinct else ""
    except ValueError:  # paths on different drives
        root = ""
    relative: dict[str, str] = {}
    for path in distinct:
        rel = os.path.relpath(path, root) if root else os.path.splitdrive(path)[1].lstrip("\\/")
        relative[path] = Path(rel).as_posix()
    base = {path: "__".join(Path(rel).with_suffix("").parts) for path, rel in relative.items()}
    names = dict(base)
    for length in (8, 16, 64):
        seen: dict[str, list[str]] = {}
        for path, name in names.items():
            seen.setdefault(name.casefold(), []).append(path)
        clashing = [path for group in seen.values() if len(group) > 1 for path in group]
        if not clashing:
            break
        for path in clashing:
            names[path] = f"{base[path]}__{hashlib.sha256(relative[path].encode()).hexdigest()[:length]}"
    counts: dict[str, int] = {}
    folders = []
    for path in absolute:
        folders.append(f"{names[path]}__p{counts.get(path, 0)}")
        counts[path] = counts.get(path, 0) + 1
    return folders


def read_prompts_jsonl(path: str | Path) -> list[tuple[Path, str]]:
    """The (image, prompt) pairs of a JSONL file of ``{"image": PATH, "prompt": TEXT}`` lines (relative image paths
    are relative to the file; blank lines are skipped).

    Raises:
        DataError: naming the file and line, for a line that is not such an object (a missing, null or non-text
            prompt or image included), or a file that is missing or not UTF-8 text.
    """
    path = Path(path)
    expected = '{"image": PATH, "prompt": TEXT}'
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path=path, fix="check the --jsonl path") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise DataError(
            f"not a UTF-8 text file ({err})", path=path, fix=f"give a JSONL file of {expected} lines"
        ) from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"not JSON ({err})", path=path, line=number, fix=f"write one {expected} per line") from None
        if not isinstance(item, dict):
            raise DataError(f"expected {expected}, got {type(item).__name__}", path=path, line=number)
        for key in ("image", "prompt"):
            if not isinstance(item.get(key), str) or (key == "image" and not item[key]):
                got = "nothing" if key not in item else json.dumps(item[key])
                kind = "a non-empty path" if key == "image" else "a string"
                raise DataError(f'"{key}" must be {kind}, got {got}', path=path, line=number, fix=f"write {expected}")
        image = Path(item["image"])
        pairs.append((image if image.is_absolute() else path.parent / image, item["prompt"]))
    return pairs


def save_prediction(prediction: Prediction, image: ImageInput, out_dir: str | Path, *, prompt: str = "") -> Path:
    """Write one prediction's files into ``out_dir`` (see the module docstring); returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = _image(image)
    source = None if isinstance(image, Image.Image) else Path(image)
    record: dict[str, Any] = {
        "prompt": prompt,
        "image": str(source) if source is not None else None,
        "image_sha256": _sha256(source) if source is not None else None,
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
        cls, directory: str | Path = "tiny-perceptio", *, device: str | None = None, dtype: torch.dtype | None = None
    ) -> Perceptio:
        """Load a model folder (``perceptio train``'s ``model/``, or :func:`perceptio.models.save_model`'s output),
        or a model shipped with the package by name (``"tiny-perceptio"``, the default, or ``"tiny-base"``) when no
        folder of that name exists; ``device`` defaults to CUDA when available."""
        from perceptio.weights import SHIPPED, shipped

        if str(directory) in SHIPPED and not Path(directory).exists():
            directory = shipped(str(directory))
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
