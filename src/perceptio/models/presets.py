"""Named model presets. Every preset builds the same classes through :func:`build_model`; only sizes differ.

* ``tiny``: random weights, CPU tests and the quickstart. InternVL with a 2-layer ViT (64 px, patch 8 ->
  16 image tokens after pixel shuffle) and a 2-layer Qwen2 (width 64); a 64-px SAM2 (Hiera widths 16-128,
  FPN 32); the ``tiny`` depth tokenizer (64 px -> 8x8 codes, K = 32); a text tokenizer built in code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import (
    InternVLConfig,
    PreTrainedTokenizerFast,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)

from perceptio.models.configuration_perceptio import PerceptioConfig
from perceptio.models.text_tokenizer import IMAGE_TOKENS, build_tiny_text_tokenizer
from perceptio.tokenizers.depth.config import DepthTokenizerConfig

__all__ = ["PRESETS", "ModelPreset", "tiny_sam2_config"]


@dataclass(frozen=True)
class ModelPreset:
    """How to get a preset's configuration and text tokenizer."""

    name: str
    config: Callable[[PreTrainedTokenizerFast], PerceptioConfig]
    text_tokenizer: Callable[[], PreTrainedTokenizerFast]
    description: str


def tiny_sam2_config(image_size: int = 64, hidden: int = 32) -> Sam2Config:
    """A same-architecture SAM2 small enough for CPU tests (stack.md 2b). Only decoder token 0 is trained, so
    the decoder's dynamic multimask selection is off (it would swap in untrained tokens at evaluation)."""
    dims = [16, 32, 64, 128]
    backbone = Sam2HieraDetConfig(
        hidden_size=dims[0],
        image_size=[image_size, image_size],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 2],
        global_attention_blocks=[3],  # never the first block of a stage (window size 0 otherwise)
        window_positional_embedding_background_size=[4, 4],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=dims[::-1],
        backbone_feature_sizes=[[image_size // 4] * 2, [image_size // 8] * 2, [image_size // 16] * 2],
        fpn_hidden_size=hidden,
    )
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(
            hidden_size=hidden, image_size=image_size, patch_size=16, mask_input_channels=8
        ),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=hidden,
            mlp_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=32,
            dynamic_multimask_via_stability=False,
        ),
    )


def _tiny_config(text_tokenizer: PreTrainedTokenizerFast) -> PerceptioConfig:
    vlm = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": 64,
            "patch_size": 8,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(text_tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        image_token_id=text_tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    return PerceptioConfig(
        vlm_config=vlm,
        segmenter_config=tiny_sam2_config(),
        depth_tokenizer_config=DepthTokenizerConfig.from_preset("tiny"),
    )


#: The registry. Real presets (InternVL from a local directory) are added with the loading path (issue 4).
PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset("tiny", _tiny_config, build_tiny_text_tokenizer, "random weights, CPU tests and quickstart"),
}
