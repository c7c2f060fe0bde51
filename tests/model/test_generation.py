"""Constrained decoding, the lenient parser, and predict() end to end on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from perceptio.models import PRESETS, PerceptioForConditionalGeneration, PerceptioProcessor
from perceptio.models.generation import DepthSpanLogitsProcessor, parse_generated
from perceptio.vocab import TokenIds

IDS = TokenIds(seg=10, depth_start=11, depth_end=12, first_code=13, num_depth_codes=3)  # vocabulary of 16
N = 2


def _allowed(prefix: list[int], prompt_length: int = 1, **kwargs: object) -> set[int]:
    processor = DepthSpanLogitsProcessor(IDS, N, prompt_length, **kwargs)  # type: ignore[arg-type]
    allowed = set()
    for length in range(prompt_length, len(prefix) + 1):  # called once per step, as generate() does
        scores = processor(torch.tensor([prefix[:length]]), torch.zeros(1, 16))
        allowed = set(torch.nonzero(scores[0] > float("-inf")).flatten().tolist())
    return allowed


def test_logits_processor_enforces_the_span_grammar() -> None:
    codes = {13, 14, 15}
    text = set(range(10))
    assert _allowed([0]) == text | {10, 11}  # before a span: text, segmentation, start; no codes, no end
    assert _allowed([0, 11]) == codes  # after the start: codes only
    assert _allowed([0, 11, 13]) == codes
    assert _allowed([0, 11, 13, 14]) == {12}  # after N codes: the end only
    assert _allowed([0, 11, 13, 14, 12]) == text | {10}  # after the span: no second span, no codes
    assert _allowed([0], spatial_cot=False) == text | {10}  # direct answering: no depth span, [SEG] stays
    assert _allowed([0, 10], spatial_cot=False) == text | {10}
    assert _allowed([0], require_span=True) == {11}


def test_parser_reports_malformed_spans_instead_of_raising() -> None:
    good = parse_generated([10, 11, 13, 15, 12, 1, 2], IDS, N)
    assert (
        good.issues == []
        and good.seg_positions == [0]
        and good.depth_codes.tolist() == [0, 2]
        and good.text_ids == [1, 2]
    )
    cases = {
        (11, 13, 12): "the depth span has 1 codes, expected 2",
        (11, 13, 14): "not closed",
        (13, 1): "outside a depth span",
        (12,): "without a start marker",
        (11, 13, 1, 14, 12): "text token at 2 inside a depth span",
        (11, 11, 13, 14, 12): "a second start marker",
        (11, 13, 14, 12, 11, 13, 14, 12): "2 depth spans",
    }
    for ids, message in cases.items():
        parsed = parse_generated(list(ids), IDS, N)
        assert any(message in issue for issue in parsed.issues), (ids, parsed.issues)


@pytest.fixture(scope="module")
def tiny() -> tuple[PerceptioForConditionalGeneration, PerceptioProcessor]:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    torch.manual_seed(0)
    model = PerceptioForConditionalGeneration(PRESETS["tiny"].config(tokenizer))
    model.register_text_tokenizer(tokenizer)
    return model, PerceptioProcessor.for_config(model.config, tokenizer)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * k, 64, 3), dtype=np.uint8)) for k in range(n)]


def test_constrained_decoding_yields_well_formed_spans_with_random_weights(tiny) -> None:  # noqa: ANN001
    model, processor = tiny
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            model.vlm.lm_head.weight.add_(torch.randn_like(model.vlm.lm_head.weight) * 0.01)
        predictions = model.predict(_images(3), ["What is the depth map?"] * 3, processor, require_depth_span=True)
        for image, p in zip(_images(3), predictions, strict=True):
            assert p.issues == [] and p.depth_codes.shape == (8, 8)
            assert p.depth.shape == (image.height, image.width) and p.depth.min() >= 0 and p.depth.max() <= 1
            assert p.text.startswith("<DEPTH_START>") and p.text.count("<DEPTH_") == 8 * 8 + 2


def test_direct_answering_bans_the_depth_span_and_is_saved_with_the_model(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from perceptio.models import load_model, save_model

    model, processor = tiny
    ids = model.config.resolved_token_ids
    span = {ids.depth_start, ids.depth_end, *ids.code_ids}
    asked = model.predict(_images(2), ["a", "b"], processor, spatial_cot=False, require_depth_span=False)
    assert all(not span & set(p.token_ids) and p.depth is None for p in asked)
    spatial = model.predict(_images(2), ["a", "b"], processor, require_depth_span=True, max_new_tokens=12)
    assert all(p.token_ids[0] == ids.depth_start for p in spatial)  # the default lets it write a span
    model.config.spatial_cot = False  # what training writes for a model trained to answer directly
    try:
        save_model(model, processor, tmp_path / "direct")
    finally:
        model.config.spatial_cot = True
    direct, direct_processor = load_model(tmp_path / "direct")
    assert direct.config.spatial_cot is False
    saved = direct.predict(_images(2), ["a", "b"], direct_processor)  # no argument: the saved setting applies
    assert all(not span & set(p.token_ids) and p.depth is None for p in saved)
    forced = direct.predict(_images(1), ["a"], direct_processor, spatial_cot=True, require_depth_span=True)
    assert forced[0].token_ids[0] == ids.depth_start  # a call overrides it


@pytest.mark.slow
def test_predict_masks_and_save_load_identical_predictions(tmp_path: Path) -> None:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    torch.manual_seed(1)
    model = PerceptioForConditionalGeneration(PRESETS["tiny"].config(tokenizer))
    model.register_text_tokenizer(tokenizer)
    processor = PerceptioProcessor.for_config(model.config, tokenizer)
    image = _images(1)[0]
    mask = torch.zeros(1, image.height, image.width, dtype=torch.bool)
    mask[0, 5:30, 10:40] = True
    batch = processor([image], ["Please segment the cube."], ["Sure, [SEG]."])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(60):  # overfit one example so that greedy decoding emits the segmentation token
        optimizer.zero_grad()
        model(**batch, gt_masks=[mask]).loss.backward()
        optimizer.step()
    (prediction,) = model.predict([image], ["Please segment the cube."], processor)
    assert prediction.answer.startswith("Sure") and prediction.issues == [], prediction.text
    assert len(prediction.masks) == 1 and prediction.masks[0].shape == (image.height, image.width)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = PerceptioForConditionalGeneration.from_pretrained(tmp_path)
    again = PerceptioProcessor.for_config(loaded.config, AutoTokenizer.from_pretrained(tmp_path))
    (reloaded,) = loaded.predict([image], ["Please segment the cube."], again)
    assert reloaded.token_ids == prediction.token_ids
    np.testing.assert_array_equal(reloaded.masks[0], prediction.masks[0])


def test_predict_refuses_mismatched_inputs_and_a_foreign_tokenizer(tiny) -> None:  # noqa: ANN001
    model, processor = tiny
    with pytest.raises(ValueError, match="one image per prompt"):
        model.predict(_images(2), ["only one prompt"], processor)
    foreign = PerceptioProcessor.for_config(model.config, PRESETS["tiny"].text_tokenizer())  # tokens not registered
    from perceptio.vocab import TokenIdsMismatchError

    with pytest.raises(TokenIdsMismatchError, match="register_tokens"):
        model.predict(_images(1), ["q"], foreign)


def test_processor_state_resets_for_a_new_generation() -> None:
    processor = DepthSpanLogitsProcessor(IDS, N, 1)
    for length in range(1, 6):  # a complete span: 0 <S> c c <E>
        processor(torch.tensor([[0, 11, 13, 14, 12][:length]]), torch.zeros(1, 16))
    scores = processor(torch.tensor([[0]]), torch.zeros(1, 16))  # the next generate() call starts afresh
    assert scores[0, 11] == 0.0  # the start marker is allowed again


def test_constraint_off_with_a_required_span_only_forces_the_opening() -> None:
    processor = DepthSpanLogitsProcessor(IDS, N, 1, require_span=True, constrain=False)
    first = processor(torch.tensor([[0]]), torch.zeros(1, 16))
    assert set(torch.nonzero(first[0] > float("-inf")).flatten().tolist()) == {11}
    later = processor(torch.tensor([[0, 11]]), torch.zeros(1, 16))
    assert bool(torch.isfinite(later).all())  # no grammar afterwards


def test_left_padded_batches_match_single_prompts(tiny) -> None:  # noqa: ANN001
    model, processor = tiny
    prompts = ["short?", "a considerably longer question about the scene in this image?"]
    images = _images(2)
    batched = model.predict(images, prompts, processor, require_depth_span=True, batch_size=2)
    single = [
        model.predict([im], [p], processor, require_depth_span=True)[0] for im, p in zip(images, prompts, strict=True)
    ]
    for a, b in zip(batched, single, strict=True):
        assert a.token_ids == b.token_ids


def test_predict_in_bfloat16_and_restores_training_mode() -> None:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    model = PerceptioForConditionalGeneration(PRESETS["tiny"].config(tokenizer))
    model.register_text_tokenizer(tokenizer)
    processor = PerceptioProcessor.for_config(model.config, tokenizer)
    model = model.to(torch.bfloat16).train()
    (p,) = model.predict(_images(1), ["depth?"], processor, require_depth_span=True)
    assert p.depth.dtype == np.float32 and p.issues == []
    assert model.training and not model.depth_tokenizer.training
    with pytest.raises(ValueError, match="spatial_cot=False bans it"):
        model.predict(_images(1), ["q"], processor, spatial_cot=False, require_depth_span=True)
