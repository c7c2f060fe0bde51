"""LoRA adapters through the trainable policy (the one path that wraps a model with peft): what trains, that
training reduces the loss, saving adapters, and merging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image

from perceptio.models import PerceptioForConditionalGeneration, build_preset
from perceptio.models.lora import merge_lora
from perceptio.train.config import LoraConfig, TrainableConfig
from perceptio.train.policy import apply_policy


def apply_lora(model: PerceptioForConditionalGeneration, r: int = 4, alpha: int = 8):  # noqa: ANN201 - PeftModel
    """The paper recipes' policy: LoRA on the language model, the perception tokens' rows, the projector, the
    segmentation-token projection and SAM2's mask decoder trained fully, everything else frozen."""
    policy = TrainableConfig(
        default="frozen",
        rules={
            "vlm.model.language_model.*": "lora",
            "vlm.model.multi_modal_projector.*": "full",
            "seg_projection.*": "full",
            "segmenter.mask_decoder.*": "full",
        },
        lora=LoraConfig(r=r, alpha=alpha, dropout=0.0),
    )
    wrapped, _ = apply_policy(model, policy)
    assert isinstance(wrapped, PeftModel)
    return wrapped


def _batch(processor):  # noqa: ANN001, ANN202
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 8:40, 8:40] = True
    return processor([image], ["Please segment the cube."], ["Sure, [SEG]."]), [mask]


def test_lora_trains_only_adapters_token_rows_and_heads_and_merges(tmp_path: Path) -> None:
    model, processor = build_preset("tiny")
    wrapped = apply_lora(model)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert not any("vision_tower" in n or "depth_tokenizer" in n or "pred_obj_score_head" in n for n in trainable)
    assert not any("language_model" in n and "lora" not in n and "trainable_tokens" not in n for n in trainable)
    batch, masks = _batch(processor)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=5e-3)
    first = wrapped(**batch, gt_masks=masks).loss.item()
    for _ in range(25):
        optimizer.zero_grad()
        loss = wrapped(**batch, gt_masks=masks).loss
        loss.backward()
        assert all(p.grad is not None for n, p in wrapped.named_parameters() if p.requires_grad), (
            "a trainable part got no gradient"
        )
        optimizer.step()
    wrapped.eval()
    last = wrapped(**batch, gt_masks=masks).loss.item()
    # A random tiny LM caps what LoRA can do to the text term (its tied, frozen, tiny embeddings bound the logit
    # scale), so the bar is a clear decrease, with the mask terms fitted; full fine-tuning fits it all.
    assert last < 0.8 * first, (first, last)

    wrapped.save_pretrained(tmp_path / "adapter")
    assert list((tmp_path / "adapter").glob("*.safetensors"))
    expected = wrapped(**batch, gt_masks=masks).logits
    merged = merge_lora(wrapped)
    assert isinstance(merged, PerceptioForConditionalGeneration) and not any(
        "lora" in n for n, _ in merged.named_parameters()
    )
    torch.testing.assert_close(merged(**batch, gt_masks=masks).logits, expected, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in merged.segmenter.vision_encoder.parameters())


def test_adapters_reload_onto_a_fresh_base(tmp_path: Path) -> None:
    model, processor = build_preset("tiny", seed=3)
    wrapped = apply_lora(model)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # make the adapter do something
    wrapped.eval()
    batch, _ = _batch(processor)
    expected = wrapped(**batch).logits
    wrapped.save_pretrained(tmp_path)
    base, _ = build_preset("tiny", seed=3)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected)


def test_an_untied_lm_head_gets_trainable_rows_for_the_new_tokens() -> None:
    from perceptio.models import PRESETS, PerceptioForConditionalGeneration

    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    config.vlm_config.tie_word_embeddings = False
    config.vlm_config.text_config.tie_word_embeddings = False
    model = PerceptioForConditionalGeneration(config)
    model.register_text_tokenizer(tokenizer)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    wrapped = apply_lora(model)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lm_head" in n and "trainable_tokens" in n for n in trainable)
    assert any("embed_tokens" in n and "trainable_tokens" in n for n in trainable)


def test_lora_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="r >= 1"):
        LoraConfig(r=0)
