"""The perception vocabulary: rendering and strict parsing of depth spans."""

from __future__ import annotations

import re

import numpy as np
import pytest

from perceptio.vocab import (
    DEPTH_END_TOKEN,
    DEPTH_START_TOKEN,
    SEG_TOKEN,
    DepthSpanError,
    PerceptionVocab,
    depth_code_token,
)

VOCAB = PerceptionVocab(num_depth_codes=16, depth_grid=(2, 3))


def test_tokens_are_the_decided_strings() -> None:
    assert (SEG_TOKEN, DEPTH_START_TOKEN, DEPTH_END_TOKEN, depth_code_token(7)) == (
        "[SEG]",
        "<DEPTH_START>",
        "<DEPTH_END>",
        "<DEPTH_7>",
    )
    assert VOCAB.tokens[:3] == ["[SEG]", "<DEPTH_START>", "<DEPTH_END>"] and len(VOCAB.tokens) == 3 + 16
    assert VOCAB.span_length == 6


def test_render_parse_round_trip() -> None:
    codes = np.array([[0, 5, 15], [3, 3, 9]])
    text = VOCAB.render_depth_span(codes)
    assert text == "<DEPTH_START><DEPTH_0><DEPTH_5><DEPTH_15><DEPTH_3><DEPTH_3><DEPTH_9><DEPTH_END>"
    np.testing.assert_array_equal(VOCAB.parse_depth_span(f"  {text}\n"), codes)


def _span(codes: list[int]) -> str:
    return "<DEPTH_START>" + "".join(f"<DEPTH_{c}>" for c in codes) + "<DEPTH_END>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_span([1, 2, 3, 4, 5]), "the span has 5 codes, expected 6 (a 2x3 grid)"),
        (_span([1, 2, 3, 4, 5, 6, 7]), "more than 6 codes"),
        (_span([1, 2, 3, 16, 5, 6]), "code 3 of the span is <DEPTH_16>, outside the codebook (0..15)"),
        (
            "<DEPTH_START><DEPTH_1><DEPTH_2><DEPTH_3><DEPTH_4><DEPTH_5><DEPTH_6>",
            "not closed: no <DEPTH_END> after 6 codes",
        ),
        ("<DEPTH_1><DEPTH_END>", "outside a depth span"),
        ("no span here", "unexpected text 'no span here' at character 0 (before <DEPTH_START>)"),
        ("", "no <DEPTH_START>"),
        (
            "<DEPTH_START><DEPTH_1> oops <DEPTH_2><DEPTH_3><DEPTH_4><DEPTH_5><DEPTH_6><DEPTH_END>",
            "unexpected text 'oops' at character 23 (after code 1)",
        ),
        (_span([1, 2, 3, 4, 5, 6]) + " tail", "unexpected text 'tail'"),
        (_span([1, 2, 3, 4, 5, 6]) + _span([1, 2, 3, 4, 5, 6]), "a second depth span"),
        ("<DEPTH_START><DEPTH_START>", "a second <DEPTH_START>"),
        ("<DEPTH_START><DEPTH_01>", "leading zero"),
        ("<DEPTH_START>[SEG]", "[SEG] at character 13"),
        ("<DEPTH_START><DEPTH_x>", "malformed token '<DEPTH_x>'"),
        ("<DEPTH_END>", "without a <DEPTH_START>"),
    ],
)
def test_malformed_spans_are_rejected_precisely(text: str, message: str) -> None:
    with pytest.raises(DepthSpanError, match=re.escape(message)):
        VOCAB.parse_depth_span(text)


def test_render_rejects_bad_codes() -> None:
    with pytest.raises(DepthSpanError, match="got 5 codes, a span needs 6"):
        VOCAB.render_depth_span([1, 2, 3, 4, 5])
    with pytest.raises(DepthSpanError, match="outside the codebook"):
        VOCAB.render_depth_span([1, 2, 3, 4, 5, 16])
    with pytest.raises(DepthSpanError, match="integers"):
        VOCAB.render_depth_span(np.zeros(6))


def test_no_perception_token_strings_outside_the_vocab_module() -> None:
    """One owner: the package spells the spatial tokens only in perceptio/vocab.py."""
    from pathlib import Path

    import perceptio

    package = Path(perceptio.__file__).parent
    offenders = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "vocab.py" and re.search(r"<DEPTH_|\[SEG\]", p.read_text())
    ]
    assert offenders == []
