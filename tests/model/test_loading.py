"""The real-checkpoint path: InternVL, SAM2 and a depth tokenizer loaded from local directories, exercised with
same-architecture tiny checkpoints saved to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration, Sam2Model

from perceptio.models import PRESETS, PerceptioForConditionalGeneration, build_preset, from_components
from perceptio.tokenizers.depth import DepthTokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    torch.manual_seed(7)
    InternVLForConditionalGeneration(config.vlm_config).save_pretrained(root / "internvl")
    tokenizer.save_pretrained(root / "internvl")
    Sam2Model(config.segmenter_config).save_pretrained(root / "sam2")
    DepthTokenizer(config.depth_tokenizer).save_pretrained(root / "depth")
    return {"vlm": root / "internvl", "sam2": root / "sam2", "depth": root / "depth"}


def test_components_load_with_their_own_weights(checkpoints: dict[str, Path]) -> None:
    model, processor = from_components(checkpoints["vlm"], checkpoints["sam2"], checkpoints["depth"])
    vlm = InternVLForConditionalGeneration.from_pretrained(checkpoints["vlm"])
    ours = model.vlm.state_dict()
    for name, value in vlm.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:  # resized for the perception tokens
            n = value.shape[0]
            assert torch.equal(ours[name][:n], value), name
        else:
            assert torch.equal(ours[name], value), name
    sam = Sam2Model.from_pretrained(checkpoints["sam2"]).state_dict()
    assert all(torch.equal(model.segmenter.state_dict()[k], v) for k, v in sam.items())
    assert model.segmenter.mask_decoder.dynamic_multimask_via_stability is False
    assert model.config.token_ids is not None and model.config.depth_tokenizer.grid == (8, 8)
    assert not any(p.requires_grad for p in model.segmenter.vision_encoder.parameters())
    image = Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8))
    batch = processor([image], ["What color is the cube?"], ["red"])
    assert torch.isfinite(model(**batch).loss)


def test_missing_or_pickled_checkpoints_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        from_components(tmp_path, checkpoints["sam2"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((checkpoints["sam2"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_components(checkpoints["vlm"], pickled)


def test_composed_model_round_trips_through_save_pretrained(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model, processor = from_components(checkpoints["vlm"], checkpoints["sam2"], checkpoints["depth"])
    model.save_pretrained(tmp_path)
    loaded = PerceptioForConditionalGeneration.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    loaded.check_text_tokenizer(processor.text_tokenizer)


def test_components_in_bfloat16_run_a_forward(checkpoints: dict[str, Path]) -> None:
    model, processor = from_components(
        checkpoints["vlm"], checkpoints["sam2"], checkpoints["depth"], dtype=torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    image = Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8))
    batch = processor([image], ["What color is the cube?"], ["red"])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    batch["sam_pixel_values"] = batch["sam_pixel_values"].to(torch.bfloat16)
    assert torch.isfinite(model(**batch).loss.float())


def test_build_preset() -> None:
    model, processor = build_preset("tiny")
    assert model.config.token_ids["seg"] == processor.text_tokenizer.convert_tokens_to_ids("[SEG]")
    with pytest.raises(ValueError, match="the presets are"):
        build_preset("huge")
