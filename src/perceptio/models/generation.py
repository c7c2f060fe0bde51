"""Constrained decoding of the depth span (the default: every span well-formed) and a lenient parser of generated ids.

:class:`DepthSpanLogitsProcessor` enforces the grammar while decoding: outside a span, no codes and no end
marker; after the start marker, exactly N codes, then the end marker; at most one span. It keeps a small state
per sequence and reads only the newest token at each step, so its cost does not grow with the length.
``spatial=False`` bans every spatial token (direct answering, for ablations), and ``require_span=True`` makes
the first generated token the start marker (for tasks whose answer opens with the depth span).

:func:`parse_generated` turns generated ids into the answer text, the segmentation-token positions and the
depth codes, recording malformed spans as issues rather than raising, so an evaluation never stops on a bad
generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor

from perceptio.vocab import TokenIds

__all__ = ["DepthSpanLogitsProcessor", "ParsedGeneration", "parse_generated"]


class DepthSpanLogitsProcessor(LogitsProcessor):
    """Mask logits so that generated text holds at most one well-formed depth span.

    Args:
        token_ids: the perception-token ids.
        span_length: N, codes per span.
        prompt_length: length of the (padded) prompt; tokens after it are the generated ones.
        spatial: False bans every spatial token (segmentation token included): direct answering.
        require_span: force the first generated token to be the span's start marker.
        grammar: enforce the span grammar (False: only ``spatial`` and ``require_span`` apply, to measure the
            constraint's effect).

    One instance serves one ``generate`` call; a new call (a sequence no longer than the last one seen, or
    another batch size) starts from a fresh state.
    """

    def __init__(
        self,
        token_ids: TokenIds,
        span_length: int,
        prompt_length: int,
        *,
        spatial: bool = True,
        require_span: bool = False,
        grammar: bool = True,
    ) -> None:
        self.ids = token_ids
        self.span_length = span_length
        self.prompt_length = prompt_length
        self.spatial = spatial
        self.require_span = require_span
        self.grammar = grammar
        self._seen = prompt_length
        self._codes: torch.Tensor | None = None  # per row: -1 before a span, 0..N inside, N + 1 after it
        self._table: torch.Tensor | None = None

    def _advance(self, input_ids: torch.Tensor) -> None:
        fresh = input_ids.shape[1] <= self.prompt_length or input_ids.shape[1] < self._seen
        if self._codes is None or fresh or self._codes.shape[0] != input_ids.shape[0]:
            self._codes = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
            self._seen = self.prompt_length
        for position in range(self._seen, input_ids.shape[1]):
            token = input_ids[:, position]
            state = self._codes
            start = (token == self.ids.depth_start) & (state == -1)
            code = (
                (token >= self.ids.first_code) & (token < self.ids.first_code + self.ids.num_depth_codes) & (state >= 0)
            )
            end = (token == self.ids.depth_end) & (state == self.span_length)
            state = torch.where(start, torch.zeros_like(state), state)
            state = torch.where(code, state + 1, state)
            self._codes = torch.where(end, torch.full_like(state, self.span_length + 1), state)
        self._seen = input_ids.shape[1]

    # Grammar states; each has one precomputed additive bias row (0 = allowed, -inf = banned).
    _BEFORE, _INSIDE, _FULL, _AFTER, _FIRST, _NO_SPATIAL = range(6)

    def _bias_table(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        ids = self.ids
        codes = slice(ids.first_code, ids.first_code + ids.num_depth_codes)
        banned = torch.zeros(6, vocab_size, dtype=torch.bool, device=device)
        banned[self._BEFORE, codes] = True
        banned[self._BEFORE, ids.depth_end] = True
        banned[self._INSIDE] = True
        banned[self._INSIDE, codes] = False  # inside: codes only
        banned[self._FULL] = True
        banned[self._FULL, ids.depth_end] = False  # after N codes: the end marker only
        banned[self._AFTER] = banned[self._BEFORE]
        banned[self._AFTER, ids.depth_start] = True  # at most one span
        banned[self._FIRST] = True
        banned[self._FIRST, ids.depth_start] = False
        banned[self._NO_SPATIAL, codes] = True
        banned[self._NO_SPATIAL, [ids.seg, ids.depth_start, ids.depth_end]] = True
        table = torch.zeros(6, vocab_size, dtype=dtype, device=device)
        return table.masked_fill(banned, float("-inf"))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._advance(input_ids)
        if getattr(self, "_table", None) is None or self._table.shape[1] != scores.shape[1]:
            self._table = self._bias_table(scores.shape[1], scores.dtype, scores.device)
        first = self.require_span and input_ids.shape[1] == self.prompt_length
        if not self.spatial:
            return scores + self._table[self._NO_SPATIAL]
        if first:
            return scores + self._table[self._FIRST]
        if not self.grammar:
            return scores
        state = self._codes
        category = torch.full_like(state, self._BEFORE)
        category = torch.where((state >= 0) & (state < self.span_length), self._INSIDE, category)
        category = torch.where(state == self.span_length, self._FULL, category)
        category = torch.where(state == self.span_length + 1, self._AFTER, category)
        return scores + self._table[category]


@dataclass
class ParsedGeneration:
    """Generated ids split into their parts.

    Attributes:
        text_ids: the ids that are not spatial tokens (the answer).
        seg_positions: indices (into the generated ids) of segmentation tokens.
        depth_codes: (N,) codes of the first complete span, None when there is none.
        issues: what was malformed, in words (empty for a well-formed generation).
    """

    text_ids: list[int]
    seg_positions: list[int]
    depth_codes: np.ndarray | None
    issues: list[str] = field(default_factory=list)


def parse_generated(ids: list[int], token_ids: TokenIds, span_length: int) -> ParsedGeneration:
    """Split generated ids; malformed spans become issues (never exceptions)."""
    codes_range = token_ids.code_ids
    text_ids: list[int] = []
    seg_positions: list[int] = []
    spans: list[list[int]] = []
    issues: list[str] = []
    current: list[int] | None = None
    for position, token in enumerate(ids):
        if token == token_ids.seg:
            seg_positions.append(position)
        elif token == token_ids.depth_start:
            if current is not None:
                issues.append(f"a second start marker at token {position} inside an open depth span")
            current = []
        elif token == token_ids.depth_end:
            if current is None:
                issues.append(f"an end marker at token {position} without a start marker")
            else:
                spans.append(current)
                current = None
        elif token in codes_range:
            if current is None:
                issues.append(f"a depth code at token {position} outside a depth span")
            else:
                current.append(token - codes_range.start)
        else:
            if current is not None:
                issues.append(f"text token at {position} inside a depth span (after {len(current)} codes)")
            text_ids.append(token)
    if current is not None:
        issues.append(f"the depth span is not closed (after {len(current)} codes)")
        spans.append(current)
    if len(spans) > 1:
        issues.append(f"{len(spans)} depth spans; the first is used")
    depth_codes = None
    if spans:
        if len(spans[0]) == span_length:
            depth_codes = np.asarray(spans[0], dtype=np.int64)
        else:
            issues.append(f"the depth span has {len(spans[0])} codes, expected {span_length}")
    return ParsedGeneration(text_ids=text_ids, seg_positions=seg_positions, depth_codes=depth_codes, issues=issues)
