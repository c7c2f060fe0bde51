"""Image-token normalisation (``PerceptioConfig.image_token_norm``) and the vision init scale
(``vision_init_std``): what they do to the tokens, that they travel with the model, and that the real-checkpoint
path accepts them with centring off by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration, Sam2Model

from perceptio.models import PRESETS, PerceptioConfig, build_preset, from_components
from perceptio.models.build import load_model, save_model
from perceptio.models.modeling_perceptio import ImageTokenNorm
from perceptio.models.presets import RANDOM_VISION_TOKEN_NORM
from perceptio.tokenizers.depth import DepthTokenizer


def _features(model, processor) -> torch.Tensor:  # noqa: ANN001
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = processor(images, ["q"] * 3)["pixel_values"]
    with torch.no_grad():
        return model.vlm.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_norm_centres_each_image_and_standardize_sets_the_rms(mode: str) -> None:
    tokens = torch.randn(2, 16, 8) + torch.tensor([5.0, -3.0]).view(2, 1, 1)
    out = ImageTokenNorm(mode)(tokens)
    assert torch.allclose(out.mean(dim=1), torch.zeros(2, 8), atol=1e-5)
    if mode == "standardize":
        assert torch.allclose(out.pow(2).mean(dim=(1, 2)), torch.ones(2), atol=1e-4)
    else:
        assert torch.allclose(out, tokens - tokens.mean(dim=1, keepdim=True))
    assert torch.equal(ImageTokenNorm("none")(tokens), tokens)


def test_the_model_applies_its_norm_inside_internvl_forward() -> None:
    plain, processor = build_preset("tiny", image_token_norm="none")
    centred, _ = build_preset("tiny", image_token_norm="center")  # same seed: same weights
    raw, normed = _features(plain, processor), _features(centred, processor)
    assert raw.mean(dim=1).abs().max() > 1e-3  # the projector's own tokens share a large constant
    assert torch.allclose(normed, raw - raw.mean(dim=1, keepdim=True), atol=1e-6)
    batch = processor([Image.new("RGB", (64, 64))], ["What color is it?"], ["red"])
    assert torch.isfinite(centred(**batch).loss)


def test_random_vision_presets_normalise_and_the_setting_is_saved(tmp_path: Path) -> None:
    model, processor = build_preset("tiny")
    assert model.config.image_token_norm == RANDOM_VISION_TOKEN_NORM != "none"
    model, processor = build_preset("tiny", image_token_norm="standardize")
    with torch.no_grad():
        model.image_token_norm.gain.fill_(2.5)
    save_model(model, processor, tmp_path / "m")
    loaded, loaded_processor = load_model(tmp_path / "m")
    assert loaded.config.image_token_norm == "standardize"
    assert loaded.image_token_norm.gain.item() == pytest.approx(2.5)
    assert torch.allclose(_features(loaded, loaded_processor), _features(model, processor), atol=1e-6)


def test_vision_init_std_rescales_the_random_vision_tower_only() -> None:
    default, _ = build_preset("tiny")
    wide, _ = build_preset("tiny", vision_init_std=0.1)
    patch = "vlm.model.vision_tower.embeddings.patch_embeddings.projection.weight"
    assert default.state_dict()[patch].std() == pytest.approx(0.02, rel=0.2)
    assert wide.state_dict()[patch].std() == pytest.approx(0.1, rel=0.2)
    text = "vlm.model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(default.state_dict()[text], wide.state_dict()[text])


def test_bad_options_are_refused_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="image_token_norm must be one of"):
        PerceptioConfig(image_token_norm="whiten")
    with pytest.raises(ValueError, match="vision_init_std"):
        PerceptioConfig(vision_init_std=-1.0)
    with pytest.raises(ValueError, match="unknown model option"):
        build_preset("tiny", image_token_nrom="center")


def test_real_checkpoints_leave_tokens_alone_unless_asked(tmp_path: Path) -> None:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    InternVLForConditionalGeneration(config.vlm_config).save_pretrained(tmp_path / "internvl")
    tokenizer.save_pretrained(tmp_path / "internvl")
    Sam2Model(config.segmenter_config).save_pretrained(tmp_path / "sam2")
    DepthTokenizer(config.depth_tokenizer).save_pretrained(tmp_path / "depth")
    args = (tmp_path / "internvl", tmp_path / "sam2", tmp_path / "depth")
    default, processor = from_components(*args)
    assert default.config.image_token_norm == "none"
    centred, _ = from_components(*args, image_token_norm="center")
    assert centred.config.image_token_norm == "center"
    raw, normed = _features(default, processor), _features(centred, processor)
    assert torch.allclose(normed, raw - raw.mean(dim=1, keepdim=True), atol=1e-6)


def test_position_table_tells_tokens_apart_and_is_added_after_the_norm() -> None:
    from perceptio.models.modeling_perceptio import sincos_2d

    table = sincos_2d(16, 64)
    assert table.shape == (16, 64)
    assert torch.allclose(table.mean(dim=0), torch.zeros(64), atol=1e-5)  # nothing common to every token
    assert torch.cdist(table, table).add(torch.eye(16) * 1e3).min() > 0.1  # every cell differs from every other
    with pytest.raises(ValueError, match="square grid"):
        sincos_2d(15, 64)
    plain, processor = build_preset("tiny", image_token_norm="standardize")
    placed, _ = build_preset("tiny", image_token_norm="standardize", image_token_pos="sincos")
    raw, with_pos = _features(plain, processor), _features(placed, processor)
    assert torch.allclose(with_pos - raw, table.expand_as(raw), atol=1e-5)


def test_seg_prompt_rms_sets_the_prompt_scale_and_can_be_switched_on_a_loaded_model() -> None:
    model, processor = build_preset("tiny", seg_prompt_rms=0.5)
    hidden = torch.randn(1, 2, model.config.vlm_config.text_config.hidden_size)
    captured = {}

    def grab(module, args, kwargs, output):  # noqa: ANN001, ANN202
        captured["sparse"] = kwargs["sparse_prompt_embeddings"]

    handle = model.segmenter.mask_decoder.register_forward_hook(grab, with_kwargs=True)
    pixels = processor.sam_pixel_values([Image.new("RGB", (64, 64))])
    with torch.no_grad():
        model.segment(pixels, hidden)
    rms = captured["sparse"].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.5), atol=1e-4)
    plain, _ = build_preset("tiny")
    assert plain.seg_prompt_gain is None
    plain.set_seg_prompt_rms(0.25)
    assert plain.config.seg_prompt_rms == 0.25 and plain.seg_prompt_gain.requires_grad
    with torch.no_grad():
        plain.segment(pixels, hidden)
    handle.remove()
    with pytest.raises(ValueError, match="seg_prompt_rms"):
        plain.set_seg_prompt_rms(0.0)


@pytest.mark.parametrize("mode", ["none", "center"])
def test_the_projector_bias_that_centring_removes_does_not_train(mode: str) -> None:
    model, _ = build_preset("tiny", image_token_norm=mode)
    bias = model.vlm.model.multi_modal_projector.linear_2.bias
    assert bias.requires_grad == (mode == "none")
    assert (any(p is bias for p in model.frozen_parameters())) == (mode != "none")
    if mode == "center":  # the bias has no effect on the normalised tokens at all
        pixels = torch.randn(2, 3, *(2 * [model.config.vlm_config.vision_config.image_size[0]]))
        features = model.vlm.model.get_image_features
        with torch.no_grad():
            before = features(pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default")
            bias.add_(3.0)
            after = features(pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default")
        torch.testing.assert_close(before.pooler_output, after.pooler_output)
