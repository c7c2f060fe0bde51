"""Constrained decoding of the depth span (the default: every span well-formed) and a lenient parser of generated ids.

:class:`SpanGrammar` holds the grammar enforced while decoding: outside a span, no codes and no end marker;
after the start marker, exactly N codes, then the end marker; at most one span. It is a few precomputed tensors
(a transition table and one bias row per state), used by the decode loop of :mod:`perceptio.models.decoding`
and, through :class:`DepthSpanLogitsProcessor`, by transformers' ``generate``. ``spatial_cot=False`` bans the
depth span (a model that answers directly; segmentation tokens stay, since referring segmentation answers with
them), and ``require_span=True`` makes the first generated token the start marker (for tasks whose answer opens
with the depth span).

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

__all__ = ["DepthSpanLogitsProcessor", "ParsedGeneration", "SpanGrammar", "parse_generated"]


class SpanGrammar:
    """The depth-span grammar as precomputed tensors, so that decoding does no per-token Python work.

    A sequence's state is one integer: 0 before any span, ``1 + k`` inside a span after k codes (k = 0..N),
    ``N + 2`` after the span. Every vocabulary id falls in one class (other, start marker, code, end marker);
    ``advance`` looks the next state up in a (states, classes) table, and ``bias`` returns one additive row per
    sequence (0 = allowed, -inf = banned): outside a span no codes and no end marker, inside exactly N codes then
    the end marker, at most one span. ``span_ids`` lists every id a constrained span may hold (its codes and end
    marker; None when spans are not constrained), so a decoder checking guessed span tokens needs the logits of
    those ids only.

    Args:
        token_ids: the perception-token ids.
        span_length: N, codes per span.
        vocab_size: width of the logits.
        spatial_cot: False bans the depth span (its markers and codes): direct answering. Segmentation tokens
            stay allowed (referring segmentation answers with them).
        require_span: the first generated token is the span's start marker.
        constrain: enforce the span grammar (False: only ``spatial_cot`` and ``require_span`` apply, to measure
            the constraint's effect).
    """

    # additive-bias rows
    _BEFORE, _INSIDE, _FULL, _AFTER, _FIRST, _NO_SPAN, _FREE = range(7)

    def __init__(
        self,
        token_ids: TokenIds,
        span_length: int,
        vocab_size: int,
        *,
        spatial_cot: bool = True,
        require_span: bool = False,
        constrain: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if require_span and not spatial_cot:
            raise ValueError("require_span=True asks for a depth span, but spatial_cot=False bans it")
        self.ids = token_ids
        self.span_length = span_length
        self.spatial_cot, self.require_span, self.constrain = spatial_cot, require_span, constrain
        n = span_length
        self.after = n + 2
        codes = slice(token_ids.first_code, token_ids.first_code + token_ids.num_depth_codes)
        token_class = torch.zeros(vocab_size, dtype=torch.long)  # 0 other, 1 start, 2 code, 3 end
        token_class[token_ids.depth_start] = 1
        token_class[codes] = 2
        token_class[token_ids.depth_end] = 3
        states = torch.arange(n + 3)
        transition = states[:, None].repeat(1, 4)  # (state, class) -> next state; default: stay
        transition[0, 1] = 1  # the start marker opens a span
        transition[1 : n + 1, 2] = states[2 : n + 2]  # a code inside the span counts
        transition[n + 1, 3] = self.after  # the end marker closes a full span

        banned = torch.zeros(7, vocab_size, dtype=torch.bool)
        banned[self._BEFORE, codes] = True
        banned[self._BEFORE, token_ids.depth_end] = True
        banned[self._INSIDE] = True
        banned[self._INSIDE, codes] = False  # inside: codes only
        banned[self._FULL] = True
        banned[self._FULL, token_ids.depth_end] = False  # after N codes: the end marker only
        banned[self._AFTER] = banned[self._BEFORE]
        banned[self._AFTER, token_ids.depth_start] = True  # at most one span
        banned[self._FIRST] = True
        banned[self._FIRST, token_ids.depth_start] = False
        banned[self._NO_SPAN, codes] = True
        banned[self._NO_SPAN, [token_ids.depth_start, token_ids.depth_end]] = True
        if not spatial_cot:
            row_of_state = torch.full((n + 3,), self._NO_SPAN)
        elif not constrain:
            row_of_state = torch.full((n + 3,), self._FREE)
        else:
            row_of_state = torch.full((n + 3,), self._INSIDE)
            row_of_state[0], row_of_state[n + 1], row_of_state[self.after] = self._BEFORE, self._FULL, self._AFTER
        self.token_class = token_class.to(device)
        self.transition = transition.to(device)
        self.rows = torch.zeros(7, vocab_size, dtype=dtype).masked_fill(banned, float("-inf")).to(device)
        self.row_of_state = row_of_state.to(device)
        # every id a constrained span may hold (its codes, then its end marker); None when nothing constrains it
        span_ids = torch.cat([torch.arange(codes.start, codes.stop), torch.tensor([token_ids.depth_end])])
        self.span_ids = span_ids.to(device) if spatial_cot and constrain else None

    def initial(self, batch_size: int) -> torch.Tensor:
        """(B,) states of sequences that have generated nothing yet."""
        return torch.zeros(batch_size, dtype=torch.long, device=self.transition.device)

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """States after each sequence appends ``tokens`` (B,)."""
        return self.transition[state, self.token_class[tokens]]

    def bias(self, state: torch.Tensor, *, first: bool = False) -> torch.Tensor:
        """(B, V) additive logits bias for the next token; ``first``: nothing has been generated yet."""
        if first and self.require_span:
            return self.rows[self._FIRST].expand(state.shape[0], -1)
        return self.rows[self.row_of_state[state]]

    def inside(self, state: torch.Tensor) -> torch.Tensor:
        """(B,) codes written so far for sequences inside a span, -1 for the others."""
        inside = (state >= 1) & (state <= self.span_length + 1)
        return torch.where(inside, state - 1, torch.full_like(state, -1))


class DepthSpanLogitsProcessor(LogitsProcessor):
    """:class:`SpanGrammar` as a transformers logits processor, for ``generate``.

    Args:
        token_ids: the perception-token ids.
        span_length: N, codes per span.
        prompt_length: length of the (padded) prompt; tokens after it are the generated ones.
        spatial_cot, require_span, constrain: as in :class:`SpanGrammar`.

    One instance serves one ``generate`` call; a new call (a sequence no longer than the last one seen, or
    another batch size) starts from a fresh state. It reads only the newest tokens at each step, so its cost
    does not grow with the length.
    """

    def __init__(
        self,
        token_ids: TokenIds,
        span_length: int,
        prompt_length: int,
        *,
        spatial_cot: bool = True,
        require_span: bool = False,
        constrain: bool = True,
    ) -> None:
        self.ids = token_ids
        self.span_length = span_length
        self.prompt_length = prompt_length
        self.options = {"spatial_cot": spatial_cot, "require_span": require_span, "constrain": constrain}
        self._grammar: SpanGrammar | None = None
        self._state: torch.Tensor | None = None
        self._seen = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        grammar = self._grammar
        if grammar is None or grammar.rows.shape[1] != scores.shape[1] or grammar.rows.dtype != scores.dtype:
            grammar = self._grammar = SpanGrammar(
                self.ids, self.span_length, scores.shape[1], dtype=scores.dtype, device=scores.device, **self.options
            )
        fresh = input_ids.shape[1] <= self.prompt_length or input_ids.shape[1] < self._seen
        if self._state is None or fresh or self._state.shape[0] != input_ids.shape[0]:
            self._state = grammar.initial(input_ids.shape[0])
            self._seen = self.prompt_length
        for position in range(self._seen, input_ids.shape[1]):
            self._state = grammar.advance(self._state, input_ids[:, position])
        self._seen = input_ids.shape[1]
        return scores + grammar.bias(self._state, first=input_ids.shape[1] == self.prompt_length)


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
