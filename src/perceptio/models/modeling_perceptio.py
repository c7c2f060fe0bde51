"""PerceptioForConditionalGeneration: InternVL + SAM2 + the depth tokenizer, one class for every use.

Training (``forward`` returns the weighted loss and every named term), inference (``predict``: constrained
greedy generation, then masks and depth at the original image size) and export (``save_pretrained`` /
``from_pretrained``, safetensors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import InternVLForConditionalGeneration, PreTrainedModel, Sam2Model
from transformers.utils import logging as hf_logging

from perceptio.losses import IGNORE_INDEX, full_span_codes, mask_bce_loss, mask_dice_loss, sequence_loss_terms
from perceptio.models.attention import use_grouped_sdpa
from perceptio.models.configuration_perceptio import PerceptioConfig
from perceptio.models.decoding import greedy_decode
from perceptio.models.feature_cache import FeatureCache
from perceptio.models.generation import SpanGrammar, parse_generated
from perceptio.models.processing import PerceptioProcessor
from perceptio.models.sam2 import load_sam2, without_stability_swap
from perceptio.tokenizers.depth.model import CheckpointMismatchError, DepthTokenizer
from perceptio.utils.weights_files import check_safetensors_folder
from perceptio.vocab import TokenIds, register_tokens

__all__ = [
    "FrozenTargets",
    "ImageTokenNorm",
    "ImageTokenPosition",
    "PerceptioForConditionalGeneration",
    "PerceptioOutput",
    "Prediction",
    "WeightsMismatchError",
]


def _unless_right_padded(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a (B, L) mask whose sequences all start at position 0 and end in padding only (right padding), where
    a causal language model's outputs at the real tokens do not depend on it; else the mask."""
    if attention_mask is None:
        return None
    starts = bool(attention_mask[:, 0].all())
    right_padded = starts and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    return None if right_padded else attention_mask


class WeightsMismatchError(CheckpointMismatchError):
    """Saved weights that do not fit the model their ``config.json`` builds: tensors missing from the files,
    tensors the model does not have, or tensors of another shape.

    Attributes:
        missing: names of the model's tensors absent from the files (sorted).
        unexpected: names of tensors in the files the model does not have (sorted).
        mismatched: ``(name, shape in the files, shape in the model)`` (sorted).
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' multi-line LOAD REPORT warning while a strict load decides whether to raise (the
    error then names the same tensors on one line)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageTokenNorm(nn.Module):
    """What ``PerceptioConfig.image_token_norm`` does to the projected image tokens (B, T, D) of each image.

    ``"none"`` returns them unchanged; ``"center"`` subtracts the image's mean token; ``"standardize"`` also divides
    by the image's token rms and multiplies by a learned scalar gain (initialised to 1).
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.gain = nn.Parameter(torch.ones(1)) if mode == "standardize" else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return tokens
        centred = tokens - tokens.mean(dim=1, keepdim=True)
        if self.mode == "center":
            return centred
        rms = centred.pow(2).mean(dim=(1, 2), keepdim=True).add(1e-6).sqrt()
        return centred / rms * self.gain


def sincos_2d(tokens: int, width: int) -> torch.Tensor:
    """A fixed (tokens, width) 2-D sine-cosine position table over a square grid of ``tokens`` cells, in raster
    order (the order of InternVL's image tokens): a quarter of the channels each for sin/cos of the row and of the
    column, at geometric frequencies; centred over the tokens (no part common to all of them) and scaled to rms 1."""
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"image tokens form a square grid; got {tokens}")
    quarter = max(1, width // 4)
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angles = axis[:, None] * frequencies[None] * (torch.pi / side)
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    if table.shape[1] < width:
        table = torch.cat([table, table.new_zeros(tokens, width - table.shape[1])], dim=1)
    table = table[:, :width] - table[:, :width].mean(dim=0, keepdim=True)
    return table / table.pow(2).mean().sqrt().clamp_min(1e-6)


class ImageTokenPosition(nn.Module):
    """``PerceptioConfig.image_token_pos == "sincos"``: add a fixed 2-D sine-cosine table, times a learned scalar
    gain (initialised to 1), to the projected image tokens, so each token says where in the image it is."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.register_buffer("table", sincos_2d(tokens, width), persistent=False)
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.gain * self.table.to(tokens.dtype)


@dataclass
class Prediction:
    """One answer of :meth:`PerceptioForConditionalGeneration.predict`.

    Attributes:
        answer: the answer text (spatial tokens removed).
        masks: one bool (H, W) mask per generated segmentation token, at the original image size.
        depth: the decoded depth span as float32 (H, W) in [0, 1] (1 = nearest) at the original size, or None.
        depth_codes: the span's codes (h, w), or None.
        text: the raw generated text, special tokens kept.
        token_ids: the generated ids (up to the end of the turn).
        issues: malformed parts of the generation, in words (empty when well-formed).
        seconds: wall time of its batch, by phase: ``generation`` (greedy decoding) and ``decoding`` (the masks
            from the segmentation tokens and the depth map from the span).
    """

    answer: str
    masks: list[np.ndarray]
    depth: np.ndarray | None
    depth_codes: np.ndarray | None
    text: str
    token_ids: list[int]
    issues: list[str]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PerceptioOutput:
    """What :meth:`PerceptioForConditionalGeneration.forward` returns.

    Attributes:
        loss: the weighted sum of ``loss_terms`` (None without labels).
        loss_terms: every named term (unweighted), present in every batch (zero when its targets are absent).
        logits: (B, L - logits_start, V), the logits of positions ``logits_start`` on.
        mask_logits: per sample, (N_b, h, w) low-resolution logits of its segmentation tokens (None without masks).
        logits_start: the first position with logits: 0 without labels; with labels, the position before the
            batch's first supervised token (no loss term reads the logits of the prompt before it).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_logits: list[torch.Tensor | None] | None = None
    logits_start: int = 0


@dataclass
class FrozenTargets:
    """What the frozen parts compute for a training batch (:meth:`PerceptioForConditionalGeneration.frozen_targets`).

    They depend on the batch alone, not on a trainable weight, so they can be computed ahead of the forward pass,
    in another process (the trainer's data worker does on a CPU); computed the same way, they give the same loss
    to the bit.

    Attributes:
        image_features: SAM2's frozen multi-scale features of the image of each row whose target masks the loss
            decodes, by row (row 0 alone when no row has masks: the zero-weighted pass).
        depth_reference: (M, H, W) the decoded target codes of the M full depth spans, in row order (None without
            one), the reference of the soft-merging reconstruction term.
    """

    image_features: dict[int, tuple[torch.Tensor, ...]]
    depth_reference: torch.Tensor | None


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
    # No ties of our own; a dict (not None) makes tools collect the sub-models' ties (InternVL's LM head and
    # input embeddings), as peft does for trainable token rows.
    _tied_weights_keys: dict[str, str] = {}  # noqa: RUF012 - the transformers convention for this attribute

    def __init__(
        self,
        config: PerceptioConfig,
        *,
        vlm: InternVLForConditionalGeneration | None = None,
        segmenter: Sam2Model | None = None,
        depth_tokenizer: DepthTokenizer | None = None,
    ) -> None:
        """Build from ``config``; pretrained submodules may be passed in (see ``perceptio.models.build``) and are
        used as they are, not re-initialised."""
        super().__init__(config)
        self.vlm = vlm if vlm is not None else InternVLForConditionalGeneration(config.vlm_config)
        use_grouped_sdpa(self.vlm.model.language_model.config)  # SDPA without copied key/value heads on a CPU
        self.segmenter = segmenter if segmenter is not None else Sam2Model(config.segmenter_config)
        config.segmenter_config.mask_decoder_config.dynamic_multimask_via_stability = False  # see models.sam2
        without_stability_swap(self.segmenter)
        width = config.vlm_config.text_config.hidden_size
        hidden = config.seg_hidden_dim or width
        self.seg_projection = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Linear(hidden, config.segmenter_config.mask_decoder_config.hidden_size),
        )
        self.depth_tokenizer = (
            depth_tokenizer if depth_tokenizer is not None else DepthTokenizer(config.depth_tokenizer)
        )
        self.seg_prompt_gain = (
            nn.Parameter(torch.full((1,), float(config.seg_prompt_rms))) if config.seg_prompt_rms is not None else None
        )
        self.image_token_norm = ImageTokenNorm(config.image_token_norm)
        self.image_token_pos = (
            ImageTokenPosition(config.vlm_config.image_seq_length, width)
            if config.image_token_pos == "sincos"
            else None
        )
        if config.image_token_norm != "none" or self.image_token_pos is not None:
            # applied to the projector's output, inside InternVL's own forward
            self.vlm.model.multi_modal_projector.register_forward_hook(self._normalise_image_tokens)
        self.post_init()
        if config.vision_init_std is not None and vlm is None:
            self._init_vision(config.vision_init_std)
        self.sam_feature_cache: FeatureCache | None = None  # see cache_frozen_features
        self.freeze_frozen_parts()

    def set_seg_prompt_rms(self, rms: float | None) -> None:
        """Switch the segmentation prompt's rescaling (``PerceptioConfig.seg_prompt_rms``) on a built model, e.g. a
        base that never trained its segmentation path; the gain restarts at ``rms``."""
        if rms is not None and not rms > 0:
            raise ValueError(f"seg_prompt_rms must be a positive number or None, got {rms!r}")
        self.config.seg_prompt_rms = None if rms is None else float(rms)
        device = self.seg_projection[0].weight.device
        self.seg_prompt_gain = None if rms is None else nn.Parameter(torch.full((1,), float(rms), device=device))

    def set_seg_multimask(self, multimask: bool) -> None:
        """Switch which SAM2 output the segmentation token trains and reads (``PerceptioConfig.seg_multimask``) on a
        built model, e.g. one whose SAM2 was pretrained on its single-mask output. The decoder parts only one mode
        uses (the single-mask output; the IoU head) are frozen or released to match."""
        multimask = bool(multimask)
        decoder = self.segmenter.mask_decoder
        for module, trains in (
            (decoder.output_hypernetworks_mlps[0], not multimask),
            (decoder.iou_prediction_head, multimask),
        ):
            for param in module.parameters():
                param.requires_grad_(trains)
        self.config.seg_multimask = multimask
        self.freeze_frozen_parts()

    def _normalise_image_tokens(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output = self.image_token_norm(output)
        return output if self.image_token_pos is None else self.image_token_pos(output)

    @torch.no_grad()
    def _init_vision(self, std: float) -> None:
        """Re-initialise the vision tower's and projector's linear and convolution weights at ``std``."""
        for part in (self.vlm.model.vision_tower, self.vlm.model.multi_modal_projector):
            for module in part.modules():
                if isinstance(module, nn.Linear | nn.Conv2d):
                    module.weight.normal_(0.0, std)

    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.vlm.get_output_embeddings()

    @classmethod
    def from_pretrained(  # noqa: ANN206 - the model, or (model, loading info) with output_loading_info=True
        cls,
        pretrained_model_name_or_path: str | Path,
        *args,  # noqa: ANN002
        strict: bool = True,
        **kwargs,  # noqa: ANN003
    ):
        """``PreTrainedModel.from_pretrained`` (safetensors, local directories), strict about the weights, then
        re-freezes the frozen parts: loading materialises fresh parameters, which would otherwise all require
        gradients again.

        A local folder's ``*.safetensors`` files are checked first: an empty or cut-short file raises
        :class:`~perceptio.utils.weights_files.CorruptWeightsError` naming it. With ``strict`` (the default) a
        tensor of the model missing from the files, a tensor in the files the model lacks, or one of another shape
        raises :class:`WeightsMismatchError` naming them (transformers alone would initialise a missing tensor at
        random with only a warning). ``strict=False`` is for deliberate partial loads: missing tensors are
        initialised and unexpected ones dropped, with transformers' report; a shape mismatch still raises unless
        ``ignore_mismatched_sizes=True`` is passed too. Tied weights (e.g. an LM head tied to the input
        embeddings) and buffers transformers knows to be absent do not count as missing.
        """
        folder = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        files = check_safetensors_folder(folder) if folder.is_dir() else []
        want_info = kwargs.pop("output_loading_info", False)
        resize = kwargs.pop("ignore_mismatched_sizes", False)
        report_logger = logging.getLogger("transformers.modeling_utils")
        hold = _HoldLoadReport()
        if strict:
            report_logger.addFilter(hold)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        finally:
            report_logger.removeFilter(hold)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        mismatched = sorted((str(k), tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"])
        if (strict and (missing or unexpected)) or (mismatched and not (resize and not strict)):
            where = str(files[0]) if len(files) == 1 else f"the weights in {pretrained_model_name_or_path}"
            problems = []
            if missing:
                problems.append(f"missing tensor(s) {_names(missing)}")
            if unexpected:
                problems.append(f"unexpected tensor(s) {_names(unexpected)}")
            if mismatched:
                shapes = [f"{k} (file {list(a)}, model {list(b)})" for k, a, b in mismatched]
                problems.append(f"mis-shaped tensor(s) {_names(shapes)}")
            fix = (
                "load with strict=False only for a deliberate partial load"
                if strict
                else "pass ignore_mismatched_sizes=True as well to re-initialise them"
            )
            raise WeightsMismatchError(
                f"{where} does not fit the model its config.json describes: {'; '.join(problems)}. The files are "
                f"damaged or mixed up with another model's; {fix}",
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
            )
        for record in hold.held:  # nothing was raised: let transformers' report through after all
            report_logger.handle(record)
        model.freeze_frozen_parts()
        return (model, info) if want_info else model

    def frozen_modules(self) -> list[nn.Module]:
        """What never trains: the depth tokenizer; SAM2's image encoder, with the two convolutions
        SAM2 applies to its high-resolution features inside the frozen feature path; and the SAM2 parts the
        segmentation-token path does not use: the point and mask prompt embeddings (the dense prompt is the
        learned no-mask embedding, which trains) and the IoU and object-score heads (training supervises mask
        token 0 only, and inference reads token 0)."""
        sam = self.segmenter
        frozen = [
            self.depth_tokenizer,
            sam.vision_encoder,
            sam.mask_decoder.conv_s0,
            sam.mask_decoder.conv_s1,
            sam.mask_decoder.pred_obj_score_head,
            sam.prompt_encoder.mask_embed,
            sam.prompt_encoder.point_embed,
            sam.prompt_encoder.not_a_point_embed,
        ]
        if self.config.seg_multimask:  # candidates 1-3 and the IoU head train; the single-mask output does not
            frozen.append(sam.mask_decoder.output_hypernetworks_mlps[0])
        else:  # only decoder token 0 trains and is read; the IoU head is not used
            frozen.append(sam.mask_decoder.iou_prediction_head)
        return frozen

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters of :meth:`frozen_modules`, plus the projector's output bias when the image tokens are
        centred (``image_token_norm`` ``"center"`` or ``"standardize"``): the centring removes a bias shared by
        every token, so its gradient is rounding noise, which Adam would turn into full-size random steps."""
        params = [p for module in self.frozen_modules() for p in module.parameters()]
        if self.config.image_token_norm != "none":
            last = [m for m in self.vlm.model.multi_modal_projector.modules() if isinstance(m, nn.Linear)][-1]
            if last.bias is not None:
                params.append(last.bias)
        return params

    def freeze_frozen_parts(self) -> None:
        """Freeze :meth:`frozen_parameters` (and keep the depth tokenizer and image encoder in eval mode)."""
        for param in self.frozen_parameters():
            param.requires_grad_(False)
        self.depth_tokenizer.eval()
        self.segmenter.vision_encoder.eval()

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
            # transformers initialises the new rows from the old rows' mean and covariance (the right start for
            # new tokens) and announces it on every call, loads included; the notice is dropped, not the method
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                self.vlm.resize_token_embeddings(len(text_tokenizer), pad_to_multiple_of=8)
            finally:
                hf_logging.set_verbosity(verbosity)
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

    def load_segmenter(self, directory: str | Path) -> None:
        """Load pretrained SAM2 weights (a ``Sam2Model.save_pretrained`` folder, safetensors) into the segmenter;
        the checkpoint's architecture must equal the model's."""
        pretrained = load_sam2(directory)
        mine, theirs = self.segmenter.state_dict(), pretrained.state_dict()
        wrong = sorted(k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape)
        if wrong or set(theirs) - set(mine):
            raise ValueError(
                f"{directory}: the SAM2 checkpoint's architecture differs from the model's segmenter "
                f"(first mismatches: {(wrong or sorted(set(theirs) - set(mine)))[:4]}); pretrain it with the "
                "model's segmenter config"
            )
        self.segmenter.load_state_dict(theirs)
        without_stability_swap(self.segmenter)
        self.freeze_frozen_parts()

    # ------------------------------------------------------------------------------------------- segmentation

    def segment(self, sam_pixel_values: torch.Tensor, seg_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate masks from segmentation-token hidden states through the SAM2 mask decoder.

        Args:
            sam_pixel_values: (B, 3, S, S) images preprocessed for SAM2 (resize + ImageNet normalisation).
            seg_hidden: (B, N, D) last-layer hidden states at N segmentation-token positions per image.

        Returns:
            mask_logits: (B, N, K, h, w) low-resolution logits (4x the last SAM2 feature map); K = 3 candidates
                with ``config.seg_multimask``, else 1.
            iou_scores: (B, N, K) the decoder's predicted IoU of each candidate.
        """
        b, n, _ = seg_hidden.shape
        levels = self._frozen_image_features(sam_pixel_values)
        image_of = torch.arange(b, device=seg_hidden.device).repeat_interleave(n)
        masks, iou_scores = self._decode_objects(levels, image_of, seg_hidden.reshape(b * n, -1))
        return masks.view(b, n, *masks.shape[1:]), iou_scores.view(b, n, -1)

    def _decode_objects(
        self, levels: Sequence[torch.Tensor], image_of: torch.Tensor, seg_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The SAM2 mask decoder over M objects at once, each prompted by one segmentation-token hidden state.

        Args:
            levels: SAM2's frozen multi-scale features of the images, each (h * w, B, C).
            image_of: (M,) the image of each object (an index into the B images).
            seg_hidden: (M, D) the objects' hidden states.

        Returns:
            (M, K, h, w) mask logits and (M, K) predicted IoUs.
        """
        sam = self.segmenter
        m = len(seg_hidden)
        levels = list(levels)
        levels[-1] = levels[-1] + sam.no_memory_embedding  # image-only use: no memory, as SAM2 does for frame 0
        embeddings = [
            x.permute(1, 2, 0).reshape(x.shape[1], -1, *size)[image_of]
            for x, size in zip(levels, sam.backbone_feature_sizes, strict=True)
        ]
        sparse = self.seg_projection(seg_hidden)
        if self.seg_prompt_gain is not None:
            sparse = sparse * torch.rsqrt(sparse.pow(2).mean(-1, keepdim=True) + 1e-8) * self.seg_prompt_gain
        # each object is its own image batch entry with one prompt token: SAM2's decoder treats the objects of
        # one image the same way (it repeats the image per prompt), so this is one call for every image
        sparse = sparse[:, None, None]  # (M, 1 prompt set, 1 token, C)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = dense.expand(m, -1, *sam.prompt_encoder.image_embedding_size)
        positional = sam.get_image_wide_positional_embeddings().expand(m, -1, -1, -1)
        masks, iou_scores, _, _ = sam.mask_decoder(
            image_embeddings=embeddings[-1],
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.config.seg_multimask,
            high_resolution_features=embeddings[:-1],
        )
        return masks[:, 0], iou_scores[:, 0]

    def cache_frozen_features(self, max_bytes: int) -> None:
        """Keep the frozen SAM2 image encoder's features of up to ``max_bytes`` of recently seen images and reuse
        them (0: no cache). The features are the same at every step, so losses, gradients and masks do not change;
        what changes is the time, when a run sees its images many times (training does, see
        ``run.feature_cache_mb``; so does an evaluation with several expressions per image)."""
        self.sam_feature_cache = FeatureCache(max_bytes) if max_bytes > 0 else None

    @contextmanager
    def frozen_features_cached(self, max_bytes: int) -> Iterator[None]:
        """Within the block, cache the frozen SAM2 features as :meth:`cache_frozen_features` does (a cache already
        set is kept); afterwards the model's own setting is back."""
        before = self.sam_feature_cache
        if before is None:
            self.cache_frozen_features(max_bytes)
        try:
            yield
        finally:
            self.sam_feature_cache = before

    @torch.no_grad()  # the image encoder is frozen
    def _frozen_image_features(self, sam_pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """SAM2's multi-scale image features, each (h * w, B, C). A single image (how the mask loss and ``predict``
        send each sample) comes from the cache when there is one; a batch is never taken apart, since the
        encoder's kernels may round differently for another batch size."""
        sam = self.segmenter
        encode = lambda pixels: tuple(sam.get_image_features(pixels, return_dict=True).fpn_hidden_states)  # noqa: E731
        if self.sam_feature_cache is None or len(sam_pixel_values) != 1:
            return encode(sam_pixel_values)
        return self.sam_feature_cache.get(sam_pixel_values, encode)

    def select_masks(self, mask_logits: torch.Tensor, iou_scores: torch.Tensor) -> torch.Tensor:
        """(B, N, K, h, w) candidates -> (B, N, h, w): the candidate with the highest predicted IoU."""
        best = iou_scores.argmax(dim=-1)
        index = best[..., None, None, None].expand(-1, -1, 1, *mask_logits.shape[-2:])
        return mask_logits.gather(2, index)[:, :, 0]

    # ---------------------------------------------------------------------------------------------- training

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        gt_masks: list[torch.Tensor | None] | None = None,
        frozen: FrozenTargets | None = None,
        recon_dtype: torch.dtype | None = None,
    ) -> PerceptioOutput:
        """Run the VLM and, with ``labels``, every named loss term.

        Args:
            input_ids: (B, L) prompt + target ids (see :class:`~perceptio.models.processing.PerceptioProcessor`).
            attention_mask: (B, L).
            pixel_values: (B, 3, s, s) InternVL pixels.
            labels: (B, L) with ``IGNORE_INDEX`` on the prompt and padding.
            sam_pixel_values: (B, 3, S, S) SAM2 pixels (needed when any sample has target masks).
            gt_masks: per sample, bool (N_b, H, W) target masks, one per segmentation token in its sequence, or None.
            frozen: :meth:`frozen_targets` of these inputs, when computed beforehand (else computed here).
            recon_dtype: autocast the soft-merging loss's pass through the frozen depth decoder to this dtype (e.g.
                ``torch.bfloat16`` on a CPU in fp32); None: the step's own precision.

        Returns:
            A :class:`PerceptioOutput`.
        """
        start = 0  # with labels, the LM head runs from the position that predicts the first supervised token on
        if labels is not None:
            supervised = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
            start = int(supervised[0]) if len(supervised) else labels.shape[1] - 1
        outputs = self.vlm(
            input_ids=input_ids,
            # training batches are right-padded: causal attention alone gives every real token the keys the padding
            # mask would, so SDPA runs its causal kernel instead of reading a (B, 1, L, L) mask (2 % of a tiny step)
            attention_mask=_unless_right_padded(attention_mask) if labels is not None else attention_mask,
            pixel_values=pixel_values,
            output_hidden_states=True,
            return_dict=True,
            logits_to_keep=input_ids.shape[1] - start,
        )
        logits = outputs.logits
        if labels is None:
            return PerceptioOutput(loss=None, logits=logits)
        if frozen is None:
            frozen = self.frozen_targets(input_ids, labels, sam_pixel_values, gt_masks)
        ids = self.config.resolved_token_ids
        span_length = self.config.vocab.span_length
        step_logits, targets = logits[:, :-1], labels[:, start + 1 :]  # position t predicts token t + 1
        terms = sequence_loss_terms(
            step_logits,
            targets,
            code_ids=ids.code_ids,
            start_id=ids.depth_start,
            end_id=ids.depth_end,
            span_length=span_length,
            # unclamped: a saturated (clamped) decoder output would carry no gradient
            decode_soft=lambda **kw: self._decode_soft(recon_dtype, **kw, clamp=False),
            reference=frozen.depth_reference,
        )
        hidden = outputs.hidden_states[-1]
        mask_logits, bce, dice, iou = self._mask_terms(hidden, input_ids, frozen.image_features, gt_masks)
        terms.update(mask_bce=bce, mask_dice=dice, mask_iou=iou)
        weights = self.config.loss_weights
        loss = sum(weights[name] * value for name, value in terms.items())
        return PerceptioOutput(loss=loss, logits=logits, loss_terms=terms, mask_logits=mask_logits, logits_start=start)

    def _decode_soft(self, dtype: torch.dtype | None, **kwargs: object) -> torch.Tensor:
        if dtype is None:
            return self.depth_tokenizer.decode_soft(**kwargs)
        with torch.autocast(self.depth_tokenizer.quantizer.codebook.device.type, dtype=dtype):
            return self.depth_tokenizer.decode_soft(**kwargs).float()

    @torch.no_grad()
    def frozen_targets(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        sam_pixel_values: torch.Tensor | None = None,
        gt_masks: list[torch.Tensor | None] | None = None,
    ) -> FrozenTargets:
        """The frozen parts' share of the loss of a batch (the arguments as :meth:`forward` takes them): SAM2's
        image features of the rows with target masks, each image encoded alone (from the cache when there is one),
        and the depth decoded from the target codes of the full spans, in one batch."""
        rows = [b for b, target in enumerate(gt_masks or []) if target is not None and len(target)]
        if rows and sam_pixel_values is None:
            raise ValueError("gt_masks need sam_pixel_values (the processor makes them)")
        if not rows:  # the zero-weighted pass decodes the first image
            side = self.config.segmenter_config.prompt_encoder_config.image_size
            blank = sam_pixel_values is None
            pixels = torch.zeros(1, 3, side, side, device=input_ids.device) if blank else sam_pixel_values[:1]  # type: ignore[index]
            features = {0: self._frozen_image_features(pixels)}
        else:
            features = {b: self._frozen_image_features(sam_pixel_values[b : b + 1]) for b in rows}  # type: ignore[index]
        ids = self.config.resolved_token_ids
        codes = full_span_codes(labels[:, 1:], code_ids=ids.code_ids, span_length=self.config.vocab.span_length)
        reference = None
        if codes is not None:
            reference = self.depth_tokenizer.decode(codes.view(-1, *self.config.depth_tokenizer.grid), clamp=False)
        return FrozenTargets(image_features=features, depth_reference=reference)

    def _mask_terms(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        image_features: dict[int, tuple[torch.Tensor, ...]],
        gt_masks: list[torch.Tensor | None] | None,
    ) -> tuple[list[torch.Tensor | None] | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask BCE, Dice and IoU-head terms over every segmentation token with a target mask (Sa2VA convention:
        the hidden state computed with the segmentation token as input). With several candidates, each object's
        mask terms use its best-matching candidate (SAM's minimum-loss assignment) and the IoU head learns every
        candidate's actual IoU. Without any target, a zero-weighted pass keeps the projection and the mask
        decoder in the graph. ``image_features``: :attr:`FrozenTargets.image_features`."""
        seg = input_ids == self.config.resolved_token_ids.seg
        has_masks = gt_masks is not None and any(m is not None and len(m) for m in gt_masks)
        if not has_masks:
            logits, iou = self._decode_objects(image_features[0], hidden.new_zeros(1, dtype=torch.long), hidden[0, :1])
            zero = logits.sum() * 0.0 + iou.sum() * 0.0
            return None, zero, zero, zero
        counts = seg.sum(1).tolist()
        rows = [b for b, target in enumerate(gt_masks) if target is not None and len(target)]  # type: ignore[arg-type]
        for b in rows:
            if counts[b] != len(gt_masks[b]):  # type: ignore[index, arg-type]
                raise ValueError(
                    f"sample {b} has {counts[b]} segmentation token(s) in its sequence but {len(gt_masks[b])} "  # type: ignore[index, arg-type]
                    "target mask(s); the target text must hold one segmentation token per mask"
                )
        # every object of the batch through the mask decoder in one call
        levels = [torch.cat(level, dim=1) for level in zip(*(image_features[b] for b in rows), strict=True)]
        sizes = [counts[b] for b in rows]
        image_of = torch.repeat_interleave(
            torch.arange(len(rows), device=hidden.device), torch.tensor(sizes, device=hidden.device)
        )
        with_target = torch.zeros_like(seg[:, 0])
        with_target[rows] = True
        all_logits, all_iou = self._decode_objects(levels, image_of, hidden[seg & with_target[:, None]])
        by_row = dict(zip(rows, zip(all_logits.split(sizes), all_iou.split(sizes), strict=True), strict=True))
        weights = self.config.loss_weights
        per_sample: list[torch.Tensor | None] = []
        chosen, targets, predicted_iou, actual_iou = [], [], [], []
        for b, target in enumerate(gt_masks):  # type: ignore[arg-type]
            if b not in by_row:
                per_sample.append(None)
                continue
            logits, iou = by_row[b]  # (N, K, h, w), (N, K)
            resized = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest-exact")
            resized = resized.to(logits.device)  # (N, 1, h, w)
            with torch.no_grad():  # which candidate each object is matched to, and how good each one is
                expanded = resized.expand_as(logits)
                bce = mask_bce_loss(logits, expanded, reduction="none")
                dice = mask_dice_loss(logits, expanded, reduction="none")
                best = (weights["mask_bce"] * bce + weights["mask_dice"] * dice).argmin(dim=1)
                hard = logits > 0
                inter = (hard & (resized > 0.5)).sum((-2, -1)).float()
                union = (hard | (resized > 0.5)).sum((-2, -1)).float()
                actual_iou.append(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)))
            picked = logits[torch.arange(len(best)), best]  # (N, h, w)
            per_sample.append(self.select_masks(logits[None], iou[None])[0])
            chosen.append(picked)
            targets.append(resized[:, 0])
            predicted_iou.append(iou)
        logits, target_masks = torch.cat(chosen), torch.cat(targets)
        iou_term = F.mse_loss(torch.cat(predicted_iou).float(), torch.cat(actual_iou))
        if not self.config.seg_multimask:
            iou_term = iou_term * 0.0  # the IoU head is frozen and unused in single-mask mode
        return per_sample, mask_bce_loss(logits, target_masks), mask_dice_loss(logits, target_masks), iou_term

    # --------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        processor: PerceptioProcessor,
        *,
        max_new_tokens: int | None = None,
        constrain: bool | None = None,
        spatial_cot: bool | None = None,
        require_depth_span: bool = False,
        batch_size: int = 8,
        span_window: int = 16,
        compile: bool = False,
        first_mask: bool = False,
    ) -> list[Prediction]:
        """Answer ``prompts`` about ``images`` greedily, then decode masks and depth.

        Args:
            images: one RGB image per prompt.
            prompts: the queries.
            processor: the model's processor (text tokenizer, image preprocessing).
            max_new_tokens: generation budget (default: a depth span plus 32 tokens).
            constrain: enforce the depth-span grammar while decoding (off: measure its effect); None: the
                model's ``config.constrain``.
            spatial_cot: False bans the depth span (direct answering; segmentation tokens stay); None: the
                model's ``config.spatial_cot``, i.e. what it was trained to do.
            require_depth_span: make every answer open with a depth span.
            batch_size: prompts per generation batch (left padding, KV cache).
            span_window: W > 1 decodes the depth span up to W tokens per forward (guess, check, accept up to the
                first wrong guess: the greedy tokens, except where greedy decoding is itself a floating-point tie);
                1 decodes one token per forward, exactly as ``generate`` does.
            compile: ``torch.compile`` the decoding step (worth it for long evaluations: compiling takes tens of
                seconds, once per batch size).
            first_mask: end each answer at its first segmentation token, for referring segmentation when only
                that mask is scored: the tokens before it, its hidden state and so its mask are the full answer's,
                and the depth span and text after it are not written (an answer without one is written whole).

        Decoding is :func:`perceptio.models.decoding.greedy_decode`: the same tokens as transformers'
        ``generate(do_sample=False)`` under the span grammar, with a static KV cache, and the hidden states at the
        generated segmentation tokens kept for the mask decoder.
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; one image per prompt")
        constrain = self.config.constrain if constrain is None else constrain
        spatial_cot = self.config.spatial_cot if spatial_cot is None else spatial_cot
        if require_depth_span and not spatial_cot:
            raise ValueError("require_depth_span=True asks for a depth span, but spatial_cot=False bans it")
        self.check_text_tokenizer(processor.text_tokenizer)
        was_training = self.training
        self.eval()
        span_length = self.config.vocab.span_length
        budget = max_new_tokens or span_length + 34
        out: list[Prediction] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = slice(start, start + batch_size)
                args = (processor, budget, constrain, spatial_cot, require_depth_span, span_window, compile, first_mask)
                out += self._predict_batch(list(images[chunk]), list(prompts[chunk]), *args)
        finally:
            self.train(was_training)  # predict() in the middle of training leaves the mode as it found it
        return out

    def _predict_batch(
        self,
        images: list[Image.Image],
        prompts: list[str],
        processor: PerceptioProcessor,
        budget: int,
        constrain: bool,
        spatial_cot: bool,
        require_span: bool,
        span_window: int,
        compile: bool,
        first_mask: bool,
    ) -> list[Prediction]:
        ids = self.config.resolved_token_ids
        span_length = self.config.vocab.span_length
        device = self.device
        batch = processor(images, prompts).to(device)
        tokenizer = processor.text_tokenizer
        grammar = SpanGrammar(
            ids,
            span_length,
            self.vlm.lm_head.out_features,
            spatial_cot=spatial_cot,
            require_span=require_span,
            constrain=constrain,
            device=device,
        )
        began = time.perf_counter()
        decoded = greedy_decode(
            self.vlm,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            grammar,
            max_new_tokens=budget,
            end_id=processor.turn_end_id,
            pad_id=tokenizer.pad_token_id,
            seg_id=ids.seg,
            compile=compile,
            jacobi=span_window,
            stop_at_seg=first_mask,
        )
        generation_seconds = time.perf_counter() - began
        began = time.perf_counter()
        generated, lengths = decoded.tokens, decoded.lengths
        parsed = [
            parse_generated(row[:n], ids, span_length) for row, n in zip(generated.tolist(), lengths, strict=True)
        ]
        grid = self.config.depth_tokenizer.grid
        predictions = []
        for b, (image, parse) in enumerate(zip(images, parsed, strict=True)):
            size = (image.height, image.width)
            masks: list[np.ndarray] = []
            if parse.seg_positions:
                prompts_b = decoded.seg_hidden[b]  # hidden states at the segmentation tokens, kept while decoding
                logits = self.select_masks(*self.segment(batch["sam_pixel_values"][b : b + 1], prompts_b[None]))
                full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
                masks = [m.float().cpu().numpy() > 0 for m in full]
            depth = codes = None
            if parse.depth_codes is not None:
                codes = parse.depth_codes.reshape(grid)
                depth_map = self.depth_tokenizer.decode(torch.from_numpy(codes)[None].to(device))
                depth = F.interpolate(depth_map[:, None].float(), size=size, mode="nearest-exact")[0, 0].cpu().numpy()
            row = generated[b, : lengths[b]].tolist()
            predictions.append(
                Prediction(
                    answer=tokenizer.decode(parse.text_ids, skip_special_tokens=True).strip(),
                    masks=masks,
                    depth=depth,
                    depth_codes=codes,
                    text=tokenizer.decode(row, skip_special_tokens=False),
                    token_ids=row,
                    issues=parse.issues,
                )
            )
        phases = {"generation": generation_seconds, "decoding": time.perf_counter() - began}
        for prediction in predictions:
            prediction.seconds = dict(phases)
        return predictions
