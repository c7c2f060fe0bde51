"""The named loss terms of Perceptio as pure functions. Imports torch only.

Sequence terms take **next-token** logits and targets already aligned: ``logits[:, t]`` predicts
``targets[:, t]`` (i.e. the caller has shifted them), with ``IGNORE_INDEX`` where nothing is supervised.
Every term returns a scalar. A term whose targets are absent from the batch returns ``0 * (its input).sum()``:
zero, yet attached to the graph, so every parameter that feeds it still gets a (zero) gradient and
distributed training never waits for a gradient that does not come.

Terms:

* ``text``: cross-entropy over the full vocabulary on supervised positions that are not depth-span tokens;
* ``depth_token``: cross-entropy at depth-code positions with the softmax restricted to the K code ids;
* ``depth_marker``: cross-entropy of the depth-span start and end markers at their positions, averaged
  separately so the two markers are not swamped by the codes, then averaged;
* ``depth_count``: per span, ``|sum_t P_t(codes) - N| / N`` over the span's code positions plus the negative
  log-probability of the end marker right after the N codes;
* ``depth_recon``: MSE between the depth decoded from the soft (probability-weighted) codes and the depth
  decoded from the target codes, through the frozen tokenizer decoder (soft merging);
* ``mask_bce`` / ``mask_dice``: sigmoid BCE and Dice (smoothing 1) of mask logits against binary masks.

:func:`sequence_loss_terms` computes the five sequence terms together, as the training forward does: the same
values, from one gather of the supervised positions instead of one boolean indexing of the logits per term
(each of which costs a gradient buffer the size of the logits in the backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "depth_count_loss",
    "depth_marker_loss",
    "depth_recon_loss",
    "depth_token_loss",
    "full_span_codes",
    "mask_bce_loss",
    "mask_dice_loss",
    "sequence_loss_terms",
    "text_loss",
]

IGNORE_INDEX = -100


def _zero(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.sum() * 0.0


def _code_positions(targets: torch.Tensor, code_ids: range) -> torch.Tensor:
    return (targets >= code_ids.start) & (targets < code_ids.stop)


def text_loss(logits: torch.Tensor, targets: torch.Tensor, *, exclude_ids: Iterable[int] = ()) -> torch.Tensor:
    """Cross-entropy on supervised positions whose target is not in ``exclude_ids``.

    Args:
        logits: (B, T, V) next-token logits.
        targets: (B, T) target ids, ``IGNORE_INDEX`` where unsupervised.
        exclude_ids: target ids left to other terms (the depth-span tokens).
    """
    mask = targets != IGNORE_INDEX
    excluded = torch.as_tensor(list(exclude_ids), dtype=targets.dtype, device=targets.device)
    if excluded.numel():
        mask &= ~torch.isin(targets, excluded)
    if not bool(mask.any()):
        return _zero(logits)
    return F.cross_entropy(logits[mask].float(), targets[mask])


def depth_token_loss(logits: torch.Tensor, targets: torch.Tensor, *, code_ids: range) -> torch.Tensor:
    """Cross-entropy at depth-code positions over the K code logits only: (B, T, V), (B, T) -> scalar."""
    mask = _code_positions(targets, code_ids)
    if not bool(mask.any()):
        return _zero(logits)
    code_logits = logits[mask][:, code_ids.start : code_ids.stop].float()
    return F.cross_entropy(code_logits, targets[mask] - code_ids.start)


def depth_marker_loss(logits: torch.Tensor, targets: torch.Tensor, *, start_id: int, end_id: int) -> torch.Tensor:
    """Mean of (CE at start-marker positions, CE at end-marker positions), over the markers present."""
    terms = []
    for marker in (start_id, end_id):
        mask = targets == marker
        if bool(mask.any()):
            terms.append(F.cross_entropy(logits[mask].float(), targets[mask]))
    if not terms:
        return _zero(logits)
    return torch.stack(terms).mean()


def depth_count_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, code_ids: range, end_id: int, span_length: int
) -> torch.Tensor:
    """Pressure towards exactly ``span_length`` codes, then the end marker; averaged over the spans present.

    For each sequence with a span: ``|sum over its code positions of P(any code)| - N| / N`` plus the NLL of
    the end marker at its position.
    """
    codes = _code_positions(targets, code_ids)
    ends = targets == end_id
    spans = codes.any(1) & ends.any(1)  # the sequences with a span
    if not bool(spans.any()):
        return _zero(logits)
    codes, ends = codes & spans[:, None], ends & spans[:, None]
    # One indexing per kind of position, split by sequence afterwards: indexing a sequence at a time would
    # cost a (B, T, V) gradient buffer per index in the backward pass. The softmax is taken only at the span's
    # positions: the full sequence (image tokens included) would cost positions x vocabulary memory for nothing.
    code_probs = torch.softmax(logits[codes].float(), dim=-1)[:, code_ids.start : code_ids.stop]
    end_nll = -torch.log_softmax(logits[ends].float(), dim=-1)[:, end_id]
    per_span = zip(
        code_probs.split(codes.sum(1)[spans].tolist()), end_nll.split(ends.sum(1)[spans].tolist()), strict=True
    )
    losses = [(probs.sum() - span_length).abs() / span_length + nll.mean() for probs, nll in per_span]
    return torch.stack(losses).mean()


def full_span_codes(targets: torch.Tensor, *, code_ids: range, span_length: int) -> torch.Tensor | None:
    """The target codes (M, span_length) of the M sequences holding exactly ``span_length`` code targets (a full
    span), in sequence order; None when there is none. These are the spans :func:`depth_recon_loss` scores."""
    codes = _code_positions(targets, code_ids)
    full = codes.sum(1) == span_length
    if not bool(full.any()):
        return None
    return (targets[codes & full[:, None]] - code_ids.start).reshape(int(full.sum()), span_length)


def depth_recon_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    code_ids: range,
    span_length: int,
    decode_soft: Callable[..., torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Soft merging: decode ``softmax(code logits / temperature)`` and compare with the decoded target codes.

    Only sequences holding exactly ``span_length`` code targets take part (a full span). ``decode_soft`` takes
    ``logits=(M, N, K)`` and returns (M, H, W); the target is ``decode`` of the spans' codes (M, N) (the caller
    reshapes them for its tokenizer: ``DepthTokenizer.decode_soft`` and ``lambda c: tokenizer.decode(c.view(M, h,
    w))``), or ``reference``, that decode computed beforehand from :func:`full_span_codes` (pass one of the two
    when there is a full span).
    """
    codes = _code_positions(targets, code_ids)
    full = codes.sum(1) == span_length
    if not bool(full.any()):
        return _zero(logits)
    codes &= full[:, None]  # one indexing for every full span (see depth_count_loss)
    code_logits = logits[codes][:, code_ids.start : code_ids.stop].reshape(int(full.sum()), span_length, -1).float()
    return _soft_merging_mse(code_logits, targets, code_ids, decode_soft, decode, reference, temperature)


def _soft_merging_mse(
    span_logits: torch.Tensor,
    targets: torch.Tensor,
    code_ids: range,
    decode_soft: Callable[..., torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    reference: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """MSE between the soft-merged decode of the full spans' code logits (M, N, K) and the depth decoded from their
    target codes (``reference``, or ``decode`` of :func:`full_span_codes`)."""
    if (decode is None) == (reference is None):
        raise ValueError("the targets hold a full depth span: pass exactly one of decode or reference")
    spans, span_length = span_logits.shape[:2]
    predicted = decode_soft(logits=span_logits, temperature=temperature)
    if reference is None:
        with torch.no_grad():
            reference = decode(full_span_codes(targets, code_ids=code_ids, span_length=span_length))  # type: ignore[misc, arg-type]
    if reference.shape != predicted.shape:
        raise ValueError(
            f"the reference depth has shape {tuple(reference.shape)}, the {spans} full span(s) decode to "
            f"{tuple(predicted.shape)}; compute it from full_span_codes of the same targets"
        )
    return F.mse_loss(predicted, reference)


def sequence_loss_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    code_ids: range,
    start_id: int,
    end_id: int,
    span_length: int,
    decode_soft: Callable[..., torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``text``, ``depth_token``, ``depth_marker``, ``depth_count`` and ``depth_recon`` at once: the values of
    :func:`text_loss` (the depth-span ids excluded), :func:`depth_token_loss`, :func:`depth_marker_loss`,
    :func:`depth_count_loss` and :func:`depth_recon_loss` with the same arguments, up to float rounding.

    The supervised positions are gathered once, code positions first (in sequence order), and every term reads
    its rows from there; the probability of "any code" in the count term is ``exp(logsumexp(code logits) -
    logsumexp(logits))``, the sum of those softmax entries.
    """
    batch, length, _ = logits.shape
    zero = _zero(logits)
    is_code = _code_positions(targets, code_ids)
    code_at = is_code.flatten().nonzero()[:, 0]  # flat (b * T + t) positions, in sequence order
    other_at = ((targets != IGNORE_INDEX) & ~is_code).flatten().nonzero()[:, 0]
    rows = logits.flatten(0, 1).index_select(0, torch.cat([code_at, other_at])).float()
    codes, others = rows[: len(code_at)], rows[len(code_at) :]

    other_targets = targets.flatten()[other_at]
    other_nll = -torch.log_softmax(others, dim=-1).gather(1, other_targets[:, None])[:, 0]
    at_start, at_end = other_targets == start_id, other_targets == end_id
    at_text = ~(at_start | at_end)
    terms = {"text": other_nll[at_text].mean() if bool(at_text.any()) else zero}
    markers = [other_nll[at].mean() for at in (at_start, at_end) if bool(at.any())]
    terms["depth_marker"] = torch.stack(markers).mean() if markers else zero
    if not len(code_at):
        return {**terms, "depth_token": zero, "depth_count": zero, "depth_recon": zero}

    code_logits = codes[:, code_ids.start : code_ids.stop]
    code_targets = targets.flatten()[code_at] - code_ids.start
    terms["depth_token"] = -torch.log_softmax(code_logits, dim=-1).gather(1, code_targets[:, None]).mean()

    code_row, end_row = code_at // length, other_at[at_end] // length
    codes_per_row = torch.bincount(code_row, minlength=batch)
    ends_per_row = torch.bincount(end_row, minlength=batch)
    spans = (codes_per_row > 0) & (ends_per_row > 0)  # the sequences with a span
    terms["depth_count"] = zero
    if bool(spans.any()):
        any_code = (torch.logsumexp(code_logits, dim=-1) - torch.logsumexp(codes, dim=-1)).exp()
        code_mass = any_code.new_zeros(batch).index_add(0, code_row, any_code)
        end_nll = any_code.new_zeros(batch).index_add(0, end_row, other_nll[at_end])
        per_span = (code_mass - span_length).abs() / span_length + end_nll / ends_per_row.clamp_min(1)
        terms["depth_count"] = per_span[spans].mean()

    full = codes_per_row == span_length
    terms["depth_recon"] = zero
    if bool(full.any()):
        in_full = full[code_row]
        span_logits = code_logits if bool(in_full.all()) else code_logits[in_full]
        span_logits = span_logits.reshape(int(full.sum()), span_length, -1)
        terms["depth_recon"] = _soft_merging_mse(
            span_logits, targets, code_ids, decode_soft, decode, reference, temperature
        )
    return terms


def mask_bce_loss(mask_logits: torch.Tensor, masks: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Sigmoid BCE of mask logits (..., H, W) against binary masks of the same shape.

    ``reduction="mean"``: one scalar, 0 (attached) when there is no mask; ``"none"``: per mask, shape (...).
    """
    if reduction == "mean" and mask_logits.numel() == 0:
        return _zero(mask_logits)
    per_pixel = F.binary_cross_entropy_with_logits(mask_logits.float(), masks.float(), reduction="none")
    per_mask = per_pixel.mean((-2, -1))
    return per_mask.mean() if reduction == "mean" else per_mask


def mask_dice_loss(
    mask_logits: torch.Tensor, masks: torch.Tensor, *, smooth: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per mask, with p = sigmoid(logits), over (..., H, W).

    ``reduction="mean"``: the mean over masks, 0 (attached) when there is none; ``"none"``: per mask, shape (...).
    """
    if reduction == "mean" and mask_logits.numel() == 0:
        return _zero(mask_logits)
    p = torch.sigmoid(mask_logits.float()).flatten(-2)
    t = masks.float().flatten(-2)
    per_mask = 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    return per_mask.mean() if reduction == "mean" else per_mask
