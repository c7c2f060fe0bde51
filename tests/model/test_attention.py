"""The language model's attention: grouped key/value heads go to a CPU's SDPA kernel uncopied, with the same output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from PIL import Image

from perceptio.models import PerceptioForConditionalGeneration, PerceptioProcessor, build_preset
from perceptio.models.attention import GROUPED_SDPA, use_grouped_sdpa


def _model() -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    return build_preset("tiny", seed=0)


def _padded_batch(processor: PerceptioProcessor) -> dict[str, torch.Tensor]:
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in (0, 1)]
    # answers of different lengths: right padding, so the language model gets a mask
    return processor(images, ["What color is the cube?", "Where?"], ["red", "the small blue sphere on the left"])


def _forward_and_grads(model: PerceptioForConditionalGeneration, batch: dict) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    output = model.vlm(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    )
    output.logits.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.vlm.model.language_model.parameters() if p.grad is not None]
    return output.logits.detach(), grads


def test_the_model_switches_its_language_model_to_grouped_sdpa_and_a_reload_does_too(tmp_path) -> None:  # noqa: ANN001
    model, _ = _model()
    assert model.vlm.model.language_model.config._attn_implementation == GROUPED_SDPA
    assert model.vlm.model.language_model.config.num_key_value_heads < model.vlm.config.text_config.num_attention_heads
    model.save_pretrained(tmp_path)
    assert GROUPED_SDPA not in (tmp_path / "config.json").read_text()  # a runtime choice, not saved
    reloaded = PerceptioForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.vlm.model.language_model.config._attn_implementation == GROUPED_SDPA


def test_other_attention_implementations_are_left_alone() -> None:
    model, _ = _model()
    config = model.vlm.model.language_model.config
    config._attn_implementation = "eager"
    assert not use_grouped_sdpa(config) and config._attn_implementation == "eager"


def test_grouped_sdpa_gives_sdpas_output_to_the_bit_without_copying_key_value_heads(monkeypatch) -> None:  # noqa: ANN001
    model, processor = _model()
    model.train()  # no dropout in the tiny language model; train mode takes the path training takes
    batch = _padded_batch(processor)
    assert not bool(batch["attention_mask"].all())
    config = model.vlm.model.language_model.config
    config._attn_implementation = "sdpa"
    logits, grads = _forward_and_grads(model, batch)

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("repeat_kv called: the key/value heads were copied")

    monkeypatch.setattr(hf_sdpa, "repeat_kv", refuse)
    with pytest.raises(AssertionError, match="repeat_kv called"):  # the check bites: sdpa copies here
        _forward_and_grads(model, batch)
    config._attn_implementation = GROUPED_SDPA
    grouped_logits, grouped_grads = _forward_and_grads(model, batch)
    assert torch.equal(grouped_logits, logits)
    for grad, grouped in zip(grads, grouped_grads, strict=True):  # the same gradients, up to the order of sums
        torch.testing.assert_close(grouped, grad, rtol=1e-5, atol=1e-7)
