"""Turning (image, query, target) into model inputs: the chat prompt, InternVL and SAM2 pixels, labels.

The prompt follows InternVL's chat format (Qwen2 markers)::

    <|im_start|>user\\n<img><IMG_CONTEXT> x image_seq_length</img>\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

and the target (the assistant's answer, spatial tokens included) is followed by the turn-end marker. Prompt and
target are tokenised separately and concatenated, so the label boundary is exact; labels are ``IGNORE_INDEX``
on the prompt and on padding. Training batches (with targets) are padded on the right; generation batches on
the left, as generation needs.

User text is plain text: the query (and the system prompt) is tokenised with the tokenizer's special-token
matching off (:func:`encode_plain_text`), so a typed segmentation token, ``<IMG_CONTEXT>`` or ``<|im_end|>`` is spelled
in ordinary tokens and can neither forge a chat turn nor add an image slot. Only the template's own markers are
control ids. Targets (the assistant's answers) are not escaped: they carry the spatial tokens on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature, GotOcr2ImageProcessorPil

from perceptio.data.schema import as_rgb
from perceptio.losses import IGNORE_INDEX
from perceptio.models.text_tokenizer import CHAT_TOKENS

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PerceptioProcessor", "control_token_ids", "encode_plain_text"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Put after the first character of a control-token string in user text when the tokenizer cannot switch its
# special-token matching off: the string no longer matches, and the text reads the same.
_ZERO_WIDTH_SPACE = "\u200b"


def control_token_ids(text_tokenizer) -> set[int]:  # noqa: ANN001 - a transformers tokenizer
    """The ids no user text may produce: every special token, and every added token marked special (InternVL's
    image tokens, the chat markers, the perception tokens)."""
    added = getattr(text_tokenizer, "added_tokens_decoder", {}) or {}
    ids = {int(i) for i, token in added.items() if getattr(token, "special", True)}
    return ids | {int(i) for i in text_tokenizer.all_special_ids}


def _control_strings(text_tokenizer, control: set[int]) -> list[str]:  # noqa: ANN001
    strings = {str(token) for token in (getattr(text_tokenizer, "added_tokens_decoder", {}) or {}).values()}
    strings = {s for s in strings if text_tokenizer.convert_tokens_to_ids(s) in control}
    strings |= set(text_tokenizer.all_special_tokens)
    return sorted((s for s in strings if s), key=len, reverse=True)


def encode_plain_text(
    text_tokenizer,  # noqa: ANN001 - a transformers tokenizer
    text: str,
    *,
    user_spans: Sequence[tuple[int, int]] | None = None,
    control: set[int] | None = None,
) -> list[int]:
    """The ids of ``text`` as plain text: no substring becomes a special (control) token id.

    The text is tokenised with special-token matching off (``split_special_tokens=True``), which spells
    ``<|im_end|>`` in ordinary tokens and otherwise gives the ids a normal call gives. Should a control id still
    appear (a tokenizer that ignores the switch), every control-token string in the ``user_spans`` of the text
    (default: all of it) is broken with a zero-width space and the text tokenised again.

    Raises:
        ValueError: if even then the ids hold a control id.
    """
    control = control_token_ids(text_tokenizer) if control is None else control
    ids = text_tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    if control.isdisjoint(ids):
        return list(ids)
    strings = _control_strings(text_tokenizer, control)
    if strings:
        pattern = re.compile("|".join(re.escape(s) for s in strings))
        spans = [(0, len(text))] if user_spans is None else sorted(user_spans)
        pieces, position = [], 0
        for start, end in spans:
            pieces.append(text[position:start])
            pieces.append(pattern.sub(lambda m: m.group(0)[0] + _ZERO_WIDTH_SPACE + m.group(0)[1:], text[start:end]))
            position = end
        pieces.append(text[position:])
        ids = text_tokenizer("".join(pieces), add_special_tokens=False, split_special_tokens=True).input_ids
    found = sorted(control.intersection(ids))
    if found:
        names = text_tokenizer.convert_ids_to_tokens(found[:5])
        raise ValueError(f"user text still tokenises to control tokens {names} after escaping: {text[:80]!r}")
    return list(ids)


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

    def _prompt_parts(self, query: str) -> list[tuple[str, str]]:
        """The chat prompt as (text, kind) parts; kind is "control" (one template marker), "template" or "user"."""
        tok = self.text_tokenizer
        start, end = CHAT_TOKENS["turn_start"], CHAT_TOKENS["turn_end"]
        image = [(tok.start_image_token, "control")]
        image += [(tok.context_image_token, "control")] * self.image_seq_length + [(tok.end_image_token, "control")]
        parts: list[tuple[str, str]] = []
        if self.system_prompt:
            parts += [(start, "control"), ("system\n", "template"), (self.system_prompt, "user")]
            parts += [(end, "control"), ("\n", "template")]
        parts += [(start, "control"), ("user\n", "template"), *image, ("\n", "template"), (query, "user")]
        return parts + [(end, "control"), ("\n", "template"), (start, "control"), ("assistant\n", "template")]

    def render_prompt(self, query: str) -> str:
        """The chat prompt for one image and one query, ending where the assistant's answer begins (as text: its
        control strings and the query's look alike here; :meth:`encode_prompt` tells them apart)."""
        return "".join(text for text, _ in self._prompt_parts(query))

    def encode_prompt(self, query: str, *, control: set[int] | None = None) -> list[int]:
        """The ids of :meth:`render_prompt`'s prompt with the query as plain text: the template's markers are the
        only control ids. For a query without control strings the ids equal tokenising the rendered prompt."""
        tok = self.text_tokenizer
        control = control_token_ids(tok) if control is None else control
        ids: list[int] = []
        run: list[tuple[str, str]] = []  # the text between two markers is tokenised in one piece, as a tokenizer would

        def flush() -> None:
            spans, position = [], 0
            for text, kind in run:
                if kind == "user":
                    spans.append((position, position + len(text)))
                position += len(text)
            if position:
                ids.extend(encode_plain_text(tok, "".join(t for t, _ in run), user_spans=spans, control=control))
            run.clear()

        for text, kind in self._prompt_parts(query):
            if kind != "control":
                run.append((text, kind))
                continue
            flush()
            ids.append(tok.convert_tokens_to_ids(text))
        flush()
        return ids

    def sam_pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """SAM2 inputs (B, 3, S, S): bilinear resize to S and ImageNet normalisation (no PIL SAM2 processor exists)."""
        arrays = [torch.from_numpy(np.asarray(as_rgb(im), dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images]
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
        # in-memory images follow the rules of image files: no saturated 16-bit images, no dropped transparency
        images = [as_rgb(image, name=f"<in-memory image {k} of the batch>") for k, image in enumerate(images)]
        tok = self.text_tokenizer
        control = control_token_ids(tok)
        sequences, labels = [], []
        for k, query in enumerate(queries):
            if not isinstance(query, str):
                raise TypeError(f"query {k} is {type(query).__name__} ({query!r}), expected a string")
            prompt = self.encode_prompt(query, control=control)
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
