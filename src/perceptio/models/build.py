"""Building a Perceptio model: the tiny preset, or real backbones from local directories.

Real checkpoints are never downloaded. A user provides (see docs/model.md for the layout):

* an InternVL checkpoint in transformers ("-hf") format: ``config.json``, ``*.safetensors``, the text
  tokenizer files and ``preprocessor_config.json`` (e.g. a local snapshot of InternVL3-1B-hf);
* a SAM2 / SAM2.1 checkpoint in transformers format (``Sam2Model``), e.g. sam2.1-hiera-large;
* optionally a trained depth tokenizer (``perceptio tokenizer train``); without one, a randomly initialised
  tokenizer of the given preset is used, which is only useful for smoke tests.

Both paths go through :class:`PerceptioForConditionalGeneration`; the difference is only where the weights come
from. Loading refuses pickled weights (``use_safetensors=True``) and remote code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration, Sam2Model

from perceptio.models.configuration_perceptio import PerceptioConfig
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.models.presets import PRESETS
from perceptio.models.processing import PerceptioProcessor
from perceptio.tokenizers.depth.model import DepthTokenizer
from perceptio.utils.weights_files import with_user_umask

__all__ = ["BUILD_OPTIONS", "build_preset", "from_components", "load_model", "save_model"]


def build_preset(
    name: str = "tiny", *, seed: int = 0, **options: object
) -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    """A randomly initialised model of a named preset, with its text tokenizer registered, and its processor.

    ``options`` set ``PerceptioConfig`` fields (e.g. ``image_token_norm="none"``) before the model is built."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; the presets are {sorted(PRESETS)}")
    preset = PRESETS[name]
    if preset.build is not None:  # presets with pretrained parts build themselves (config comes with the weights)
        return preset.build(seed, **options)
    text_tokenizer = preset.text_tokenizer()
    config = preset.config(text_tokenizer)
    if options:
        config = PerceptioConfig.from_dict({**config.to_dict(), **_checked_options(options)})
    torch.manual_seed(seed)
    model = PerceptioForConditionalGeneration(config)
    model.register_text_tokenizer(text_tokenizer)
    return model, PerceptioProcessor.for_config(model.config, text_tokenizer)


#: ``PerceptioConfig`` fields a recipe or caller may set when a model is built (not the architecture's sizes).
BUILD_OPTIONS = ("image_token_norm", "image_token_pos", "vision_init_std", "seg_prompt_rms", "seg_multimask")


def _checked_options(options: dict[str, object]) -> dict[str, object]:
    unknown = sorted(set(options) - set(BUILD_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; the options are {list(BUILD_OPTIONS)}")
    return dict(options)


def _require_checkpoint(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}/config.json not found: {what} must be a local checkpoint folder in transformers format"
        )
    if not list(path.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors weights in {path}; pickled .bin checkpoints are not loaded")
    return path


def from_components(
    vlm_dir: str | Path,
    segmenter_dir: str | Path,
    depth_tokenizer_dir: str | Path | None = None,
    *,
    depth_tokenizer_preset: str = "aurora",
    dtype: torch.dtype | None = None,
    **options: object,
) -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    """Compose Perceptio from pretrained InternVL and SAM2 checkpoints (and a depth tokenizer) on disk.

    ``options`` set ``PerceptioConfig`` fields such as ``image_token_norm`` (default ``"none"``: a pretrained
    projector's tokens reach the language model as they are).

    Returns:
        The model (perception tokens registered, embeddings resized) and its processor.
    """
    vlm_dir = _require_checkpoint(Path(vlm_dir), "the InternVL model")
    segmenter_dir = _require_checkpoint(Path(segmenter_dir), "the SAM2 model")
    text_tokenizer = AutoTokenizer.from_pretrained(vlm_dir)
    missing = [
        name
        for name in ("context_image_token", "start_image_token", "end_image_token")
        if not getattr(text_tokenizer, name, None)
    ]
    if missing:
        raise ValueError(
            f"{vlm_dir}: the text tokenizer lacks InternVL's image tokens ({missing}); use an InternVL -hf checkpoint"
        )
    vlm = InternVLForConditionalGeneration.from_pretrained(vlm_dir, use_safetensors=True, dtype=dtype)
    segmenter = Sam2Model.from_pretrained(segmenter_dir, use_safetensors=True, dtype=dtype)
    if depth_tokenizer_dir is not None:
        depth_tokenizer = DepthTokenizer.from_pretrained(depth_tokenizer_dir)
    else:
        depth_tokenizer = DepthTokenizer.from_preset(depth_tokenizer_preset)
    config = PerceptioConfig(
        vlm_config=vlm.config,
        segmenter_config=segmenter.config,
        depth_tokenizer_config=depth_tokenizer.config,
        **_checked_options(options),  # type: ignore[arg-type]
    )
    model = PerceptioForConditionalGeneration(config, vlm=vlm, segmenter=segmenter, depth_tokenizer=depth_tokenizer)
    if dtype is not None:  # the new parts (segmentation-token MLP, depth tokenizer) in the backbones' dtype
        model = model.to(dtype)
    model.register_text_tokenizer(text_tokenizer)
    return model, PerceptioProcessor.for_config(model.config, text_tokenizer)


def save_model(model: PerceptioForConditionalGeneration, processor: PerceptioProcessor, directory: str | Path) -> Path:
    """Save a model with its text tokenizer (and system prompt) so :func:`load_model` restores both."""
    directory = Path(directory)
    model.save_pretrained(directory)
    with_user_umask(directory)
    processor.text_tokenizer.save_pretrained(directory)
    if processor.system_prompt:
        (directory / "system_prompt.txt").write_text(processor.system_prompt)
    return directory


def load_model(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
) -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    """Load a model saved by :func:`save_model` (or ``perceptio train``'s ``model/`` folder): safetensors weights,
    the text tokenizer saved next to them (its perception-token ids are checked against the model's), the
    processor.

    Every tensor of the model must be in the files, with its shape, and no other (``strict=False`` allows a
    deliberate partial load; see :meth:`PerceptioForConditionalGeneration.from_pretrained`).

    Raises:
        FileNotFoundError: no config.json or no ``*.safetensors`` file.
        CorruptWeightsError: a weights file is empty or cut short (the error names it).
        WeightsMismatchError: tensors missing, unexpected or mis-shaped (the error names them).
    """
    directory = _require_checkpoint(Path(directory), "the Perceptio model")
    model = PerceptioForConditionalGeneration.from_pretrained(
        directory, use_safetensors=True, dtype=dtype, strict=strict
    )
    text_tokenizer = AutoTokenizer.from_pretrained(directory)
    model.check_text_tokenizer(text_tokenizer)
    if device is not None:
        model.to(device)
    prompt_file = directory / "system_prompt.txt"
    system_prompt = prompt_file.read_text() if prompt_file.is_file() else None
    return model, PerceptioProcessor.for_config(model.config, text_tokenizer, system_prompt=system_prompt)
