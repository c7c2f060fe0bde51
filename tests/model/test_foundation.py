"""The model foundation: the tiny text tokenizer, perception-token ids, PerceptioConfig, and the tiny model's
construction, segmentation path and persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from perceptio.models import PRESETS, PerceptioConfig, PerceptioForConditionalGeneration
from perceptio.tokenizers.depth import CheckpointMismatchError, DepthTokenizer, DepthTokenizerConfig
from perceptio.vocab import PerceptionVocab, TokenIds, TokenIdsMismatchError, register_tokens


@pytest.fixture(scope="module")
def tiny() -> tuple[PerceptioForConditionalGeneration, object]:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    torch.manual_seed(0)
    model = PerceptioForConditionalGeneration(PRESETS["tiny"].config(tokenizer))
    model.register_text_tokenizer(tokenizer)
    return model, tokenizer


def test_tiny_text_tokenizer_is_deterministic_and_keeps_image_tokens() -> None:
    a, b = PRESETS["tiny"].text_tokenizer(), PRESETS["tiny"].text_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.context_image_token == "<IMG_CONTEXT>" and a.context_image_token_id == a.convert_tokens_to_ids(
        "<IMG_CONTEXT>"
    )
    assert a.padding_side == "left"
    text = "Please segment the large red sphere in this image."
    assert a.decode(a(text, add_special_tokens=False).input_ids) == text


def test_registration_is_idempotent_and_spans_are_single_ids() -> None:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    vocab = PerceptionVocab(num_depth_codes=32, depth_grid=(8, 8))
    image_id = tokenizer.context_image_token_id
    ids = register_tokens(tokenizer, vocab)
    size = len(tokenizer)
    assert register_tokens(tokenizer, vocab) == ids and len(tokenizer) == size
    assert list(ids.code_ids) == list(range(ids.first_code, ids.first_code + 32))
    assert tokenizer.context_image_token_id == image_id  # InternVL's image tokens survive
    span = vocab.render_depth_span(list(range(32)) * 2)
    encoded = tokenizer("[SEG]" + span + " left", add_special_tokens=False).input_ids
    assert encoded[:2] == [ids.seg, ids.depth_start] and encoded[2:66] == [
        ids.first_code + k for k in list(range(32)) * 2
    ]
    assert encoded[66] == ids.depth_end


def test_token_id_checks_catch_a_different_tokenizer() -> None:
    vocab = PerceptionVocab(num_depth_codes=32, depth_grid=(8, 8))
    ours = PRESETS["tiny"].text_tokenizer()
    ids = register_tokens(ours, vocab)
    ids.check(ours, vocab)
    shifted = PRESETS["tiny"].text_tokenizer()
    shifted.add_tokens(["<extra>"], special_tokens=True)  # every perception id moves by one
    register_tokens(shifted, vocab)
    with pytest.raises(TokenIdsMismatchError, match=rf"seg {ids.seg} vs {ids.seg + 1}"):
        ids.check(shifted, vocab)
    with pytest.raises(TokenIdsMismatchError, match="register_tokens"):
        ids.check(PRESETS["tiny"].text_tokenizer(), vocab)
    assert TokenIds.from_dict(ids.to_dict()) == ids


def test_config_defaults_validation_and_round_trip(tmp_path: Path) -> None:
    config = PRESETS["tiny"].config(PRESETS["tiny"].text_tokenizer())
    assert config.loss_weights == {
        "text": 1.0,
        "depth_token": 1.0,
        "depth_marker": 1.0,
        "depth_count": 0.1,
        "depth_recon": 0.5,
        "mask_bce": 2.0,
        "mask_dice": 0.5,
        "mask_iou": 1.0,
    }
    assert config.vocab == PerceptionVocab(num_depth_codes=32, depth_grid=(8, 8))
    config.save_pretrained(tmp_path)
    loaded = PerceptioConfig.from_pretrained(tmp_path)
    assert loaded.depth_tokenizer == config.depth_tokenizer and loaded.vlm_config.image_seq_length == 16
    assert loaded.segmenter_config.mask_decoder_config.dynamic_multimask_via_stability is False
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) \['mask_focal'\]"):
        PerceptioConfig(loss_weights={"mask_focal": 1.0})
    with pytest.raises(ValueError, match="not divisible"):
        PerceptioConfig(depth_tokenizer_config={**DepthTokenizerConfig().to_dict(), "input_size": 100})
    with pytest.raises(ValueError, match="register_text_tokenizer"):
        _ = config.resolved_token_ids


def test_segmentation_path_shapes_and_gradients(tiny) -> None:  # noqa: ANN001
    model, _ = tiny
    model.zero_grad()
    hidden = torch.randn(2, 3, 64, requires_grad=True)
    masks, iou = model.segment(torch.randn(2, 3, 64, 64), hidden)
    assert masks.shape == (2, 3, 3, 16, 16) and iou.shape == (2, 3, 3)  # three candidates per object
    (masks.square().mean() + iou.sum()).backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in model.seg_projection.parameters())
    assert model.segmenter.mask_decoder.output_hypernetworks_mlps[1].layers[0].weight.grad is not None
    assert model.segmenter.mask_decoder.iou_prediction_head.proj_in.weight.grad is not None
    assert all(p.grad is None for p in model.segmenter.vision_encoder.parameters())


def test_mask_terms_decode_every_object_of_a_batch_at_once_as_per_image_calls_would(tiny) -> None:  # noqa: ANN001
    """Training sends every object of a batch through the mask decoder in one call; its masks are what
    ``segment`` gives image by image (to rounding: the decoder's matrix products see another batch size)."""
    model, _ = tiny
    seg = model.config.resolved_token_ids.seg
    torch.manual_seed(1)
    input_ids = torch.randint(0, 100, (3, 12))
    input_ids[0, [3, 7]] = seg  # two objects
    input_ids[1, 5] = seg  # one object, no target mask: left out
    input_ids[2, 9] = seg  # one object
    hidden = torch.randn(3, 12, 64)
    pixels = torch.randn(3, 3, 64, 64)
    gt_masks = [torch.rand(2, 64, 64) > 0.5, None, torch.rand(1, 64, 64) > 0.5]
    features = model.frozen_targets(input_ids, input_ids, pixels, gt_masks).image_features
    assert sorted(features) == [0, 2]  # the rows with target masks
    per_sample, bce, dice, _ = model._mask_terms(hidden, input_ids, features, gt_masks)
    assert per_sample[1] is None and per_sample[0].shape == (2, 16, 16) and per_sample[2].shape == (1, 16, 16)
    for b in (0, 2):
        alone = model.select_masks(*model.segment(pixels[b : b + 1], hidden[b][input_ids[b] == seg][None]))[0]
        torch.testing.assert_close(per_sample[b], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(bce) and torch.isfinite(dice)


def test_frozen_targets_refuse_masks_without_sam2_pixels(tiny) -> None:  # noqa: ANN001
    """Target masks need SAM2's pixels to decode against; without them the error names what makes them."""
    model, _ = tiny
    input_ids = torch.randint(0, 100, (2, 12))
    input_ids[0, 3] = model.config.resolved_token_ids.seg
    with pytest.raises(ValueError, match="gt_masks need sam_pixel_values"):
        model.frozen_targets(input_ids, input_ids, None, [torch.rand(1, 64, 64) > 0.5, None])
    blank = model.frozen_targets(input_ids, input_ids, None, [None, None])  # no masks: the zero pass, a blank image
    assert list(blank.image_features) == [0] and blank.depth_reference is None


def test_best_iou_candidate_is_selected() -> None:
    logits = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.float32).view(2, 1, 3, 2, 2)
    iou = torch.tensor([[[0.1, 0.9, 0.3]], [[0.8, 0.1, 0.2]]])
    selected = PerceptioForConditionalGeneration.select_masks(None, logits, iou)  # type: ignore[arg-type]
    assert torch.equal(selected[0, 0], logits[0, 0, 1]) and torch.equal(selected[1, 0], logits[1, 0, 0])


def test_single_mask_mode_uses_decoder_token_zero() -> None:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    config.seg_multimask = False
    model = PerceptioForConditionalGeneration(config)
    masks, iou = model.segment(torch.randn(1, 3, 64, 64), torch.randn(1, 2, 64))
    assert masks.shape == (1, 2, 1, 16, 16) and iou.shape == (1, 2, 1)
    assert not any(p.requires_grad for p in model.segmenter.mask_decoder.iou_prediction_head.parameters())
    assert all(p.requires_grad for p in model.segmenter.mask_decoder.output_hypernetworks_mlps[0].parameters())


def test_frozen_parts_and_trainable_parts(tiny) -> None:  # noqa: ANN001
    model, _ = tiny
    assert not any(p.requires_grad for p in model.depth_tokenizer.parameters())
    assert not any(p.requires_grad for p in model.segmenter.vision_encoder.parameters())
    # everything in the VLM trains except the projector bias that the image-token centring removes
    bias = model.vlm.model.multi_modal_projector.linear_2.bias
    assert all(p.requires_grad for p in model.vlm.parameters() if p is not bias) and not bias.requires_grad
    model.train()
    assert not model.depth_tokenizer.training and not model.segmenter.vision_encoder.training and model.vlm.training


def test_save_load_round_trip_keeps_weights_ids_and_freezing(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = PerceptioForConditionalGeneration.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.config.token_ids == model.config.token_ids
    loaded.check_text_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    assert not any(p.requires_grad for p in loaded.depth_tokenizer.parameters())
    with pytest.raises(TokenIdsMismatchError):
        loaded.check_text_tokenizer(PRESETS["tiny"].text_tokenizer())


def test_loading_a_trained_depth_tokenizer(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    model, _ = tiny
    trained = DepthTokenizer.from_preset("tiny")
    with torch.no_grad():
        trained.quantizer.codebook.add_(1.0)
    trained.save_pretrained(tmp_path / "tok")
    model.load_depth_tokenizer(tmp_path / "tok")
    assert torch.equal(model.depth_tokenizer.quantizer.codebook, trained.quantizer.codebook)
    DepthTokenizer.from_preset("tiny", num_codes=16).save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointMismatchError, match=r"num_codes \(checkpoint 16, expected 32\)"):
        model.load_depth_tokenizer(tmp_path / "other")
