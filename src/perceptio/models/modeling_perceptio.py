"""PerceptioForConditionalGeneration: InternVL + SAM2 + the depth tokenizer, one class for every use.

Status: construction, perception-token registration, depth-tokenizer loading and the segmentation-token -> SAM2
segmentation path are here; the training forward with the named loss terms and constrained generation
(issue 4) build on them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, PreTrainedModel, Sam2Model

from perceptio.models.configuration_perceptio import PerceptioConfig
from perceptio.tokenizers.depth.model import DepthTokenizer
from perceptio.vocab import TokenIds, register_tokens

__all__ = ["PerceptioForConditionalGeneration"]


class PerceptioForConditionalGeneration(PreTrainedModel):
    """The Perceptio model.

    Submodules:
        vlm: ``InternVLForConditionalGeneration`` (vision tower, projector, language model).
        segmenter: ``Sam2Model``; its image encoder is frozen, its mask decoder trains.
        seg_projection: MLP (d -> d -> SAM2 width) from the last-layer hidden state at a segmentation token to one
            sparse prompt token of the SAM2 mask decoder (Sa2VA's mechanism).
        depth_tokenizer: the frozen depth VQ-VAE whose codes are the depth tokens.
    """

    config_class = PerceptioConfig
    base_model_prefix = "perceptio"
    main_input_name = "input_ids"

    def __init__(self, config: PerceptioConfig) -> None:
        super().__init__(config)
        self.vlm = InternVLForConditionalGeneration(config.vlm_config)
        self.segmenter = Sam2Model(config.segmenter_config)
        width = config.vlm_config.text_config.hidden_size
        hidden = config.seg_hidden_dim or width
        self.seg_projection = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Linear(hidden, config.segmenter_config.mask_decoder_config.hidden_size),
        )
        self.depth_tokenizer = DepthTokenizer(config.depth_tokenizer)
        self.post_init()
        self.freeze_frozen_parts()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> PerceptioForConditionalGeneration:  # noqa: ANN002, ANN003
        """``PreTrainedModel.from_pretrained`` (safetensors, local directories), then re-freezes the frozen parts:
        loading materialises fresh parameters, which would otherwise all require gradients again."""
        model = super().from_pretrained(*args, **kwargs)
        model.freeze_frozen_parts()
        return model

    def freeze_frozen_parts(self) -> None:
        """Freeze what never trains: the depth tokenizer and SAM2's image encoder (decision 7)."""
        for module in (self.depth_tokenizer, self.segmenter.vision_encoder):
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> PerceptioForConditionalGeneration:
        super().train(mode)
        self.depth_tokenizer.eval()  # frozen parts stay in eval mode (the quantiser never updates its codebook)
        self.segmenter.vision_encoder.eval()
        return self

    # ----------------------------------------------------------------------------------------- vocabulary

    def register_text_tokenizer(self, text_tokenizer) -> TokenIds:  # noqa: ANN001 - a transformers tokenizer
        """Add the perception tokens to ``text_tokenizer``, resize the embeddings, and record the ids in the config."""
        ids = register_tokens(text_tokenizer, self.config.vocab)
        if len(text_tokenizer) > self.vlm.get_input_embeddings().num_embeddings:
            self.vlm.resize_token_embeddings(len(text_tokenizer), pad_to_multiple_of=8)
        self.config.token_ids = ids.to_dict()
        return ids

    def check_text_tokenizer(self, text_tokenizer) -> None:  # noqa: ANN001
        """Raise if ``text_tokenizer`` maps the perception tokens to other ids than the model was built with."""
        self.config.resolved_token_ids.check(text_tokenizer, self.config.vocab, where=f"{type(self).__name__}")
        if len(text_tokenizer) > self.vlm.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"the text tokenizer has {len(text_tokenizer)} tokens but the model's embeddings only "
                f"{self.vlm.get_input_embeddings().num_embeddings}; load the tokenizer saved with the model"
            )

    def load_depth_tokenizer(self, directory: str | Path) -> None:
        """Load trained depth-tokenizer weights; the checkpoint's config must equal the model's."""
        trained = DepthTokenizer.from_pretrained(directory, expected=self.config.depth_tokenizer)
        self.depth_tokenizer.load_state_dict(trained.state_dict())

    # ------------------------------------------------------------------------------------------- segmentation

    def segment(self, sam_pixel_values: torch.Tensor, seg_hidden: torch.Tensor) -> torch.Tensor:
        """Masks from segmentation-token hidden states through the SAM2 mask decoder.

        Args:
            sam_pixel_values: (B, 3, S, S) images preprocessed for SAM2 (resize + ImageNet normalisation).
            seg_hidden: (B, N, D) last-layer hidden states at N segmentation-token positions per image.

        Returns:
            mask_logits: (B, N, h, w) low-resolution mask logits (4x the last SAM2 feature map).
        """
        sam = self.segmenter
        b, n, _ = seg_hidden.shape
        with torch.no_grad():  # the image encoder is frozen
            features = sam.get_image_features(sam_pixel_values, return_dict=True)
        levels = list(features.fpn_hidden_states)
        levels[-1] = levels[-1] + sam.no_memory_embedding  # image-only use: no memory, as SAM2 does for frame 0
        embeddings = [
            x.permute(1, 2, 0).reshape(b, -1, *size) for x, size in zip(levels, sam.backbone_feature_sizes, strict=True)
        ]
        sparse = self.seg_projection(seg_hidden).unsqueeze(2)  # (B, N objects as point batches, 1 token, C)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            b, -1, *sam.prompt_encoder.image_embedding_size
        )
        positional = sam.get_image_wide_positional_embeddings().repeat(b, 1, 1, 1)
        masks, _, _, _ = sam.mask_decoder(
            image_embeddings=embeddings[-1],
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            high_resolution_features=embeddings[:-1],
        )
        return masks[:, :, 0]
