"""The tiny model's training forward: named loss terms, gradients on every batch type, overfitting, processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.losses import IGNORE_INDEX
from perceptio.models import DEFAULT_LOSS_WEIGHTS, PRESETS, PerceptioForConditionalGeneration, PerceptioProcessor


def _model() -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    torch.manual_seed(0)
    model = PerceptioForConditionalGeneration(PRESETS["tiny"].config(tokenizer))
    model.register_text_tokenizer(tokenizer)
    return model, PerceptioProcessor.for_config(model.config, tokenizer)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _batches(model: PerceptioForConditionalGeneration, processor: PerceptioProcessor) -> dict[str, tuple]:
    vocab = model.config.vocab
    span = vocab.render_depth_span(np.random.default_rng(0).integers(0, 32, (8, 8)))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 10:40, 20:50] = True
    return {
        "text": (processor([_image(1)], ["What color is the cube?"], ["red"]), None),
        "segmentation": (processor([_image(2)], ["Please segment the cube."], ["Sure, [SEG]."]), [mask]),
        "depth": (processor([_image(3)], ["What is the depth map for the image?"], [span]), None),
    }


def test_processor_masks_the_prompt_and_pads_by_use() -> None:
    model, processor = _model()
    batch = processor([_image(1), _image(2)], ["short?", "a much longer question here?"], ["red", "blue"])
    prompt = processor.text_tokenizer(processor.render_prompt("short?"), add_special_tokens=False).input_ids
    answer = processor.text_tokenizer("red", add_special_tokens=False).input_ids
    labels = batch["labels"][0].tolist()
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) : len(prompt) + len(answer) + 1] == answer + [processor.turn_end_id]
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1, -1] == 1  # training: right padding
    assert (batch["input_ids"] == processor.text_tokenizer.context_image_token_id).sum(1).tolist() == [16, 16]
    generation = processor([_image(1), _image(2)], ["short?", "a much longer question here?"])
    assert "labels" not in generation and generation["attention_mask"][0, 0] == 0  # generation: left padding
    assert batch["sam_pixel_values"].shape == (2, 3, 64, 64) and batch["pixel_values"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="one each per sample"):
        processor([_image(1)], ["a", "b"])


@pytest.mark.parametrize("kind", ["text", "segmentation", "depth"])
def test_every_trainable_parameter_gets_a_gradient_on_every_batch_type(kind: str) -> None:
    model, processor = _model()
    model.train()
    batch, masks = _batches(model, processor)[kind]
    output = model(**batch, gt_masks=masks)
    assert set(output.loss_terms) == set(DEFAULT_LOSS_WEIGHTS)
    weighted = sum(DEFAULT_LOSS_WEIGHTS[k] * v for k, v in output.loss_terms.items())
    assert torch.allclose(output.loss, weighted)
    output.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad, sorted(trainable - with_grad)[:5]
    assert not any(p.grad is not None for p in model.depth_tokenizer.parameters())
    present = {
        "text": {"text"},
        "segmentation": {"text", "mask_bce", "mask_dice", "mask_iou"},
        "depth": {"text", "depth_token", "depth_marker", "depth_count", "depth_recon"},
    }[kind]
    for name, value in output.loss_terms.items():
        assert (value.item() > 0) == (name in present), (name, value.item())


def test_a_segmentation_token_without_a_mask_is_an_error() -> None:
    model, processor = _model()
    batch = processor([_image(2)], ["Please segment both."], ["[SEG] and [SEG]."])
    with pytest.raises(ValueError, match="2 segmentation token"):
        model(**batch, gt_masks=[torch.ones(1, 64, 64, dtype=torch.bool)])


@pytest.mark.slow
def test_tiny_model_overfits_one_batch_of_each_task() -> None:
    model, processor = _model()
    model.train()
    batches = list(_batches(model, processor).values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def total() -> torch.Tensor:
        return sum(model(**batch, gt_masks=masks).loss for batch, masks in batches)

    first = total().item()
    for _ in range(120):
        optimizer.zero_grad()
        loss = total()
        loss.backward()
        optimizer.step()
    last = total().item()
    assert last < 0.1 * first, (first, last)


def test_a_right_padded_batch_drops_its_padding_mask_and_keeps_every_loss_term(monkeypatch) -> None:  # noqa: ANN001
    from perceptio.models import modeling_perceptio

    unless = modeling_perceptio._unless_right_padded
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert unless(right) is None and unless(None) is None and unless(torch.ones(2, 4, dtype=torch.long)) is None
    left, holed = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])
    assert unless(left) is left and unless(holed) is holed  # causal attention alone would read their padding

    model, processor = _model()
    model.train()
    images = [_image(1), _image(2), _image(3)]
    span = model.config.vocab.render_depth_span(np.random.default_rng(0).integers(0, 32, (8, 8)))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 10:40, 20:50] = True
    batch = processor(images, ["What color?", "Please segment the cube.", "Depth?"], ["red", "Sure, [SEG].", span])
    assert not bool(batch["attention_mask"].all())  # padded, on the right
    torch.manual_seed(0)
    dropped = model(**batch, gt_masks=[None, mask, None])
    monkeypatch.setattr(modeling_perceptio, "_unless_right_padded", lambda attention_mask: attention_mask)
    torch.manual_seed(0)
    masked = model(**batch, gt_masks=[None, mask, None])
    for name, value in masked.loss_terms.items():
        torch.testing.assert_close(dropped.loss_terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert float(masked.loss_terms["text"]) > 0 and float(masked.loss_terms["mask_dice"]) > 0
