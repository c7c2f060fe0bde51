"""The Perceptio model configuration: what travels with the weights (architecture, token ids, loss weights)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, InternVLConfig, PretrainedConfig, Sam2Config

from perceptio.models.sam2 import perceptio_sam2_config
from perceptio.tokenizers.depth.config import DepthTokenizerConfig
from perceptio.vocab import PerceptionVocab, TokenIds

__all__ = ["DEFAULT_LOSS_WEIGHTS", "IMAGE_TOKEN_NORMS", "PerceptioConfig"]

#: Values of ``PerceptioConfig.image_token_norm``.
IMAGE_TOKEN_NORMS = ("none", "center", "standardize")

#: Weights of the named loss terms (mask terms as in Sa2VA and LISA; the depth-token ones are our defaults).
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "text": 1.0,
    "depth_token": 1.0,
    "depth_marker": 1.0,
    "depth_count": 0.1,
    "depth_recon": 0.5,
    "mask_bce": 2.0,
    "mask_dice": 0.5,
    # Beyond Sa2VA's mask losses: with SAM2's multimask output, the IoU head that picks a mask at inference
    # must learn the candidates' IoU; SAM trains it with an MSE of weight 1.
    "mask_iou": 1.0,
}


class PerceptioConfig(PretrainedConfig):
    """Configuration of :class:`~perceptio.models.modeling_perceptio.PerceptioForConditionalGeneration`.

    Args:
        vlm_config: the vision-language model (an ``InternVLConfig`` or its dict).
        segmenter_config: SAM2 (a ``Sam2Config`` or its dict). Its image encoder is frozen; its mask decoder trains.
        depth_tokenizer_config: the depth tokenizer's architecture (a ``DepthTokenizerConfig`` or its dict).
        token_ids: the perception-token ids in the text tokenizer the model was built with (a ``TokenIds``
            dict); set by ``register_text_tokenizer`` and checked when a tokenizer is paired with the model.
        loss_weights: weights of the named loss terms; missing names take ``DEFAULT_LOSS_WEIGHTS``.
        seg_hidden_dim: width of the hidden layer of the segmentation-token -> SAM2 prompt MLP (default: the LLM width).
        seg_multimask: use SAM2's three candidate masks: training supervises the best-matching one and the IoU
            head, inference keeps the candidate with the highest predicted IoU (as in Sa2VA). False: one mask
            (decoder token 0), no IoU head.
        image_token_pos: ``"sincos"`` adds a fixed 2-D sine-cosine position table (times a learned gain) to the
            image tokens after ``image_token_norm``. A random vision tower's tokens carry no position (its position
            embeddings start at zero), and the language model's rotary positions do not reach attention values,
            so "left of" and "where is" cannot be read. ``"none"`` (default): InternVL's own path.
        seg_prompt_rms: when set, each segmentation prompt token (the MLP's output) is divided by its rms and
            multiplied by a learned gain that starts at this value, so the prompt reaches SAM2's mask decoder at the
            scale of its own point-prompt tokens (about 0.5 for the tiny SAM2) whatever the language model's hidden
            scale. None: the MLP output as it is.
        spatial_cot: the model writes a depth span before its answer on spatial questions (the spatial chain of
            thought; training sets it from the recipe's ``data.spatial_cot`` when it saves the model). False: it
            was trained to answer directly, and decoding bans the depth span (segmentation tokens stay: referring
            segmentation answers with them). ``predict(spatial_cot=...)`` and ``--spatial-cot`` override it.
        constrain: decoding enforces the depth-span grammar, so every span is well-formed (``predict(constrain=
            False)`` / ``--no-constrain`` measure how often spans are malformed without it).
    """

    model_type = "perceptio"
    sub_configs = {"vlm_config": InternVLConfig, "segmenter_config": Sam2Config}

    def __init__(
        self,
        vlm_config: InternVLConfig | dict | None = None,
        segmenter_config: Sam2Config | dict | None = None,
        depth_tokenizer_config: DepthTokenizerConfig | dict | None = None,
        token_ids: dict[str, int] | None = None,
        loss_weights: dict[str, float] | None = None,
        seg_hidden_dim: int | None = None,
        seg_multimask: bool = True,
        image_token_norm: str = "none",
        vision_init_std: float | None = None,
        seg_prompt_rms: float | None = None,
        image_token_pos: str = "none",
        spatial_cot: bool = True,
        constrain: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vlm_config = (
            InternVLConfig(**vlm_config) if isinstance(vlm_config, dict) else (vlm_config or InternVLConfig())
        )
        self.segmenter_config = perceptio_sam2_config(
            Sam2Config(**segmenter_config) if isinstance(segmenter_config, dict) else (segmenter_config or Sam2Config())
        )
        if isinstance(depth_tokenizer_config, DepthTokenizerConfig):
            depth_tokenizer_config = depth_tokenizer_config.to_dict()
        self.depth_tokenizer_config = depth_tokenizer_config or DepthTokenizerConfig().to_dict()
        DepthTokenizerConfig.from_dict(self.depth_tokenizer_config)  # validate early, with the field names
        unknown = sorted(set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; the terms are {sorted(DEFAULT_LOSS_WEIGHTS)}")
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"loss weights must be non-negative, got {self.loss_weights}")
        self.token_ids = dict(token_ids) if token_ids else None
        self.seg_hidden_dim = seg_hidden_dim
        self.seg_multimask = bool(seg_multimask)
        self.spatial_cot = bool(spatial_cot)
        self.constrain = bool(constrain)
        if image_token_norm not in IMAGE_TOKEN_NORMS:
            raise ValueError(f"image_token_norm must be one of {IMAGE_TOKEN_NORMS}, got {image_token_norm!r}")
        self.image_token_norm = image_token_norm
        if vision_init_std is not None and not vision_init_std > 0:
            raise ValueError(f"vision_init_std must be a positive number or None, got {vision_init_std!r}")
        self.vision_init_std = None if vision_init_std is None else float(vision_init_std)
        if image_token_pos not in ("none", "sincos"):
            raise ValueError(f"image_token_pos must be 'none' or 'sincos', got {image_token_pos!r}")
        self.image_token_pos = image_token_pos
        if seg_prompt_rms is not None and not seg_prompt_rms > 0:
            raise ValueError(f"seg_prompt_rms must be a positive number or None, got {seg_prompt_rms!r}")
        self.seg_prompt_rms = None if seg_prompt_rms is None else float(seg_prompt_rms)
        # Surface the language model's embedding tying, so tools that read the top-level config (peft's trainable
        # token rows, for one) treat the tied input embeddings and LM head as one matrix.
        # InternVL ties by its own top-level flag, so that is the one to mirror.
        kwargs["tie_word_embeddings"] = bool(getattr(self.vlm_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def depth_tokenizer(self) -> DepthTokenizerConfig:
        return DepthTokenizerConfig.from_dict(self.depth_tokenizer_config)

    @property
    def vocab(self) -> PerceptionVocab:
        """The perception vocabulary that matches the depth tokenizer (K codes on its grid)."""
        depth = self.depth_tokenizer
        return PerceptionVocab(num_depth_codes=depth.num_codes, depth_grid=depth.grid)

    @property
    def resolved_token_ids(self) -> TokenIds:
        if not self.token_ids:
            raise ValueError("the model has no perception-token ids yet; call model.register_text_tokenizer(tok)")
        return TokenIds.from_dict(self.token_ids)


# So that Auto classes (e.g. AutoTokenizer reading a checkpoint's config.json) recognise the model type.
AutoConfig.register(PerceptioConfig.model_type, PerceptioConfig, exist_ok=True)
