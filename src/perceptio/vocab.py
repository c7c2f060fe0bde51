"""The perception-token vocabulary: the only module that spells the spatial tokens.

Tokens (the strings of Sa2VA and AURORA):

* ``[SEG]``: one per referred object; its hidden state prompts the SAM2 mask decoder;
* ``<DEPTH_START>`` ``<DEPTH_k>`` x N ``<DEPTH_END>``: a depth span of exactly N = h x w codes in raster order
  (row by row), each ``k`` an index into the depth tokenizer's codebook of K codes.

Everything else (templates, the depth tokenizer, parsers, the model) asks a :class:`PerceptionVocab` for strings
and never writes them itself.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from perceptio.errors import UserError

__all__ = [
    "DEPTH_END_TOKEN",
    "DEPTH_START_TOKEN",
    "SEG_TOKEN",
    "DepthSpanError",
    "PerceptionVocab",
    "TokenIds",
    "TokenIdsMismatchError",
    "depth_code_token",
    "register_tokens",
]

SEG_TOKEN = "[SEG]"
DEPTH_START_TOKEN = "<DEPTH_START>"
DEPTH_END_TOKEN = "<DEPTH_END>"
_CODE_PREFIX = "<DEPTH_"

# One pass over a text finds every perception token; anything between them is "other text".
SPATIAL_TOKEN_PATTERN = re.compile(r"<DEPTH_START>|<DEPTH_END>|<DEPTH_(\d+)>|\[SEG\]")
"""Any spatial token in text; group 1 holds a depth code's index."""


def depth_code_token(index: int) -> str:
    """The token string of depth code ``index`` (``<DEPTH_7>``)."""
    if index < 0:
        raise ValueError(f"depth code indices are non-negative, got {index}")
    return f"{_CODE_PREFIX}{index}>"


class DepthSpanError(UserError, ValueError):
    """A depth span that does not follow the grammar; the message says where and what is wrong."""


@dataclass(frozen=True)
class PerceptionVocab:
    """The spatial tokens for a depth codebook of ``num_depth_codes`` codes on a ``depth_grid`` of (h, w).

    Attributes:
        num_depth_codes: K, the codebook size; codes are ``<DEPTH_0>`` .. ``<DEPTH_{K-1}>``.
        depth_grid: (h, w) of the code grid; a span holds exactly h * w codes.
    """

    num_depth_codes: int = 128
    depth_grid: tuple[int, int] = (10, 10)

    def __post_init__(self) -> None:
        if self.num_depth_codes < 2:
            raise ValueError(f"num_depth_codes must be at least 2, got {self.num_depth_codes}")
        if len(self.depth_grid) != 2 or min(self.depth_grid) < 1:
            raise ValueError(f"depth_grid must be (h, w) with h, w >= 1, got {self.depth_grid}")

    @property
    def span_length(self) -> int:
        """N, the number of codes in a depth span."""
        return self.depth_grid[0] * self.depth_grid[1]

    @property
    def seg_token(self) -> str:
        return SEG_TOKEN

    @property
    def depth_start_token(self) -> str:
        return DEPTH_START_TOKEN

    @property
    def depth_end_token(self) -> str:
        return DEPTH_END_TOKEN

    @property
    def code_tokens(self) -> list[str]:
        return [depth_code_token(k) for k in range(self.num_depth_codes)]

    @property
    def tokens(self) -> list[str]:
        """Every perception token, in the order they are added to a text tokenizer."""
        return [SEG_TOKEN, DEPTH_START_TOKEN, DEPTH_END_TOKEN, *self.code_tokens]

    def render_depth_span(self, codes: np.ndarray | list[int]) -> str:
        """``<DEPTH_START><DEPTH_k>...<DEPTH_END>`` for codes of shape (h, w) (or N flat, raster order)."""
        flat = np.asarray(codes).reshape(-1)
        if flat.size != self.span_length:
            raise DepthSpanError(f"got {flat.size} codes, a span needs {self.span_length} (a {self._grid_text} grid)")
        if not np.issubdtype(flat.dtype, np.integer):
            raise DepthSpanError(f"codes must be integers, got dtype {flat.dtype}")
        bad = np.flatnonzero((flat < 0) | (flat >= self.num_depth_codes))
        if bad.size:
            last = self.num_depth_codes - 1
            raise DepthSpanError(f"code {bad[0]} of the span is {int(flat[bad[0]])}, outside the codebook (0..{last})")
        return DEPTH_START_TOKEN + "".join(depth_code_token(int(k)) for k in flat) + DEPTH_END_TOKEN

    def parse_depth_span(self, text: str) -> np.ndarray:
        """Parse a text that is exactly one depth span (surrounding whitespace allowed) into codes (h, w).

        Raises:
            DepthSpanError: naming what is wrong and where (character offset, code number): a missing or
                repeated marker, text inside or around the span, a malformed or out-of-range code, or a wrong count.
        """
        codes: list[int] = []
        state = "before"  # before -> inside -> after
        position = 0
        for match in SPATIAL_TOKEN_PATTERN.finditer(text):
            self._check_gap(text[position : match.start()], position, state, len(codes))
            position = match.end()
            token = match.group(0)
            if token == DEPTH_START_TOKEN:
                if state == "inside":
                    raise DepthSpanError(f"a second <DEPTH_START> at character {match.start()}, inside the open span")
                if state == "after":
                    raise DepthSpanError(f"a second depth span starts at character {match.start()}; a text holds one")
                state = "inside"
            elif token == DEPTH_END_TOKEN:
                if state != "inside":
                    raise DepthSpanError(f"<DEPTH_END> at character {match.start()} without a <DEPTH_START> before it")
                if len(codes) != self.span_length:
                    raise DepthSpanError(
                        f"the span has {len(codes)} codes, expected {self.span_length} (a {self._grid_text} grid)"
                    )
                state = "after"
            elif token == SEG_TOKEN:
                raise DepthSpanError(f"[SEG] at character {match.start()}; a depth span holds only depth codes")
            else:
                if state != "inside":
                    raise DepthSpanError(f"depth code {token} at character {match.start()} is outside a depth span")
                digits = match.group(1)
                if digits != str(int(digits)):
                    raise DepthSpanError(f"malformed code token {token} at character {match.start()} (leading zero)")
                value = int(digits)
                if value >= self.num_depth_codes:
                    last = self.num_depth_codes - 1
                    raise DepthSpanError(f"code {len(codes)} of the span is {token}, outside the codebook (0..{last})")
                codes.append(value)
                if len(codes) > self.span_length:
                    raise DepthSpanError(
                        f"the span has more than {self.span_length} codes (a {self._grid_text} grid); "
                        f"code {len(codes) - 1} at character {match.start()} is one too many"
                    )
        self._check_gap(text[position:], position, state, len(codes))
        if state == "before":
            raise DepthSpanError("no <DEPTH_START> in the text")
        if state == "inside":
            raise DepthSpanError(f"the span is not closed: no <DEPTH_END> after {len(codes)} codes")
        return np.asarray(codes, dtype=np.int64).reshape(self.depth_grid)

    def _check_gap(self, gap: str, offset: int, state: str, num_codes: int) -> None:
        stripped = gap.strip()
        if not stripped:
            return
        shown = stripped if len(stripped) <= 24 else stripped[:21] + "..."
        where = {"before": "before <DEPTH_START>", "after": "after <DEPTH_END>"}.get(state, f"after code {num_codes}")
        if stripped.startswith(_CODE_PREFIX) or stripped.startswith("<DEPTH"):
            raise DepthSpanError(f"malformed token {shown!r} at character {offset + gap.index(stripped[0])} ({where})")
        raise DepthSpanError(f"unexpected text {shown!r} at character {offset + gap.index(stripped[0])} ({where})")

    @property
    def _grid_text(self) -> str:
        return f"{self.depth_grid[0]}x{self.depth_grid[1]}"


class TokenIdsMismatchError(UserError, ValueError):
    """A text tokenizer whose ids for the perception tokens differ from the ones a model was saved with."""


class _TextTokenizer(Protocol):  # the part of a transformers tokenizer that registration uses
    def add_tokens(self, new_tokens: list[str], special_tokens: bool = ...) -> int: ...

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]: ...


@dataclass(frozen=True)
class TokenIds:
    """The resolved ids of the perception tokens in one text tokenizer.

    Attributes:
        seg: id of ``[SEG]``.
        depth_start: id of ``<DEPTH_START>``.
        depth_end: id of ``<DEPTH_END>``.
        first_code: id of ``<DEPTH_0>``; code k has id ``first_code + k`` (the range is contiguous by check).
        num_depth_codes: K.
    """

    seg: int
    depth_start: int
    depth_end: int
    first_code: int
    num_depth_codes: int

    @property
    def code_ids(self) -> range:
        """The ids of ``<DEPTH_0>`` .. ``<DEPTH_{K-1}>``."""
        return range(self.first_code, self.first_code + self.num_depth_codes)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TokenIds:
        return cls(**{k: int(payload[k]) for k in ("seg", "depth_start", "depth_end", "first_code", "num_depth_codes")})

    @classmethod
    def resolve(cls, text_tokenizer: _TextTokenizer, vocab: PerceptionVocab) -> TokenIds:
        """Look up the ids of registered tokens; each token must be one id, and the codes contiguous."""
        ids = text_tokenizer.convert_tokens_to_ids(vocab.tokens)
        unknown = [tok for tok, i in zip(vocab.tokens, ids, strict=True) if i is None or i < 0]
        if unknown or len(set(ids)) != len(ids):
            raise TokenIdsMismatchError(
                f"the text tokenizer does not know {unknown[:3] or 'distinct ids for'} the perception tokens; "
                "call perceptio.vocab.register_tokens(text_tokenizer, vocab) first"
            )
        seg, start, end, *codes = ids
        if codes != list(range(codes[0], codes[0] + len(codes))):
            raise TokenIdsMismatchError("the depth code tokens do not have contiguous ids; register them in one call")
        return cls(seg=seg, depth_start=start, depth_end=end, first_code=codes[0], num_depth_codes=len(codes))

    def check(self, text_tokenizer: _TextTokenizer, vocab: PerceptionVocab, *, where: str = "the model") -> None:
        """Raise if ``text_tokenizer`` maps the perception tokens to other ids than these."""
        try:
            found = TokenIds.resolve(text_tokenizer, vocab)
        except TokenIdsMismatchError as err:
            raise TokenIdsMismatchError(f"{where} expects perception-token ids {self.to_dict()}, but {err}") from None
        if found != self:
            diffs = {k: (v, getattr(found, k)) for k, v in self.to_dict().items() if getattr(found, k) != v}
            raise TokenIdsMismatchError(
                f"{where} was saved with other perception-token ids than this text tokenizer gives: "
                + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diffs.items())
                + "; load the text tokenizer saved with the model"
            )


def register_tokens(text_tokenizer: _TextTokenizer, vocab: PerceptionVocab) -> TokenIds:
    """Add the perception tokens to a text tokenizer as special tokens (idempotent) and return their ids.

    ``add_tokens(..., special_tokens=True)`` keeps the tokenizer's other special tokens (InternVL's image tokens);
    ``add_special_tokens`` would replace the named extra ones. The caller resizes the model's embeddings to
    ``len(text_tokenizer)``.
    """
    text_tokenizer.add_tokens(vocab.tokens, special_tokens=True)
    return TokenIds.resolve(text_tokenizer, vocab)
