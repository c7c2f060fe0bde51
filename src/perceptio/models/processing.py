"""Turning (image, query, target) into model inputs: the chat prompt, InternVL and SAM2 pixels, labels.

The prompt follows InternVL's chat format (Qwen2 markers)::

    <|im_start|>user\\n<img><IMG_CONTEXT> x image_seq_length</img>\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

and the target (the assistant's answer, spatial tokens included) is followed by the turn-end marker. Prompt and
target are tokenised separately and concatenated, so the label boundary is exact; labels are ``IGNORE_INDEX``
on the prompt and on padding. Training batches (with targets) are padded on the right; generation batches on
the left, as generation needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature, GotOcr2ImageProcessorPil

from perceptio.losses import IGNORE_INDEX
from perceptio.models.text_tokenizer import CHAT_TOKENS

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PerceptioProcessor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptioProcessor:
    """Prompts, pixels and labels for :class:`~perceptio.models.PerceptioForConditionalGeneration`.

    Args:
        text_tokenizer: the model's text tokenizer (with InternVL's image tokens and the perception tokens).
        image_processor: InternVL's image processor (a PIL one: torchvision is not a dependency).
        image_seq_length: ``<IMG_CONTEXT>`` tokens per image (the VLM config's ``image_seq_length``).
        sam_image_size: SAM2's input side in pixels.
        system_prompt: optional system turn placed before the user turn.
    """

    def __init__(
        self,
        text_tokenizer,  # noqa: ANN001 - a transformers tokenizer
        image_processor: GotOcr2ImageProcessorPil,
        *,
        image_seq_length: int,
        sam_image_size: int,
        system_prompt: str | None = None,
    ) -> None:
        self.text_tokenizer = text_tokenizer
        self.image_processor = image_processor
        self.image_seq_length = image_seq_length
        self.sam_image_size = sam_image_size
        self.system_prompt = system_prompt
        self.turn_end_id = text_tokenizer.convert_tokens_to_ids(CHAT_TOKENS["turn_end"])
        if text_tokenizer.pad_token_id is None:
            raise ValueError(
                "the text tokenizer has no pad token; set one (e.g. tokenizer.pad_token = '<|endoftext|>')"
            )

    @classmethod
    def for_config(cls, config, text_tokenizer, *, system_prompt: str | None = None) -> PerceptioProcessor:  # noqa: ANN001
        """A processor for a PerceptioConfig: InternVL images at the vision tower's size, without dynamic tiling."""
        side = config.vlm_config.vision_config.image_size
        side = side[0] if isinstance(side, list | tuple) else side
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": side, "width": side},
            crop_to_patches=False,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        return cls(
            text_tokenizer,
            image_processor,
            image_seq_length=config.vlm_config.image_seq_length,
            sam_image_size=config.segmenter_config.prompt_encoder_config.image_size,
            system_prompt=system_prompt,
        )

    def render_prompt(self, query: str) -> str:
        """The chat prompt for one image and one query, ending where the assistant's answer begins."""
        tok = self.text_tokenizer
        start, end = CHAT_TOKENS["turn_start"], CHAT_TOKENS["turn_end"]
        image = tok.start_image_token + tok.context_image_token * self.image_seq_length + tok.end_image_token
        system = f"{start}system\n{self.system_prompt}{end}\n" if self.system_prompt else ""
        return f"{system}{start}user\n{image}\n{query}{end}\n{start}assistant\n"

    def sam_pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """SAM2 inputs (B, 3, S, S): bilinear resize to S and ImageNet normalisation (no PIL SAM2 processor exists)."""
        arrays = [
            torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images
        ]
        resized = torch.stack(
            [
                F.interpolate(a[None], size=(self.sam_image_size,) * 2, mode="bilinear", align_corners=False)[0]
                for a in arrays
            ]
        )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (resized - mean) / std

    def __call__(
        self, images: Sequence[Image.Image], queries: Sequence[str], targets: Sequence[str] | None = None
    ) -> BatchFeature:
        """Batch one image and one query per sample (and, for training, the target answers).

        Returns:
            ``input_ids`` and ``attention_mask`` (B, L), ``pixel_values`` (B, 3, s, s) for InternVL,
            ``sam_pixel_values`` (B, 3, S, S), and with targets ``labels`` (B, L).
        """
        if len(images) != len(queries) or (targets is not None and len(targets) != len(queries)):
            raise ValueError(
                f"got {len(images)} images, {len(queries)} queries and {len(targets or [])} targets; "
                "one each per sample"
            )
        tok = self.text_tokenizer
        sequences, labels = [], []
        for k, query in enumerate(queries):
            prompt = tok(self.render_prompt(query), add_special_tokens=False).input_ids
            if targets is None:
                sequences.append(prompt)
                continue
            answer = tok(targets[k], add_special_tokens=False).input_ids + [self.turn_end_id]
            sequences.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        length = max(len(s) for s in sequences)
        right = targets is not None  # training pads on the right, generation on the left
        pad = tok.pad_token_id
        input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
        attention = torch.zeros((len(sequences), length), dtype=torch.long)
        label_ids = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        for k, seq in enumerate(sequences):
            span = slice(0, len(seq)) if right else slice(length - len(seq), length)
            input_ids[k, span] = torch.tensor(seq)
            attention[k, span] = 1
            if right:
                label_ids[k, span] = torch.tensor(labels[k])
        data = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pixel_values": self.image_processor(images=list(images), return_tensors="pt")["pixel_values"],
            "sam_pixel_values": self.sam_pixel_values(images),
        }
        if right:
            data["labels"] = label_ids
        return BatchFeature(data)
