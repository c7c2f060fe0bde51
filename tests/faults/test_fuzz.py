"""Property-based fuzzing (hypothesis) of the parsers that read what models and users write: the depth-span parser,
the generated-ids parser, the answer extractor, and the JSONL, TSV and refs-pickle readers. Whatever the input,
they return a result or raise the package's own error that names the problem; never another exception."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perceptio.data.errors import DataError
from perceptio.data.readers import read_conversations, read_mmbench
from perceptio.data.readers.refer import load_refs
from perceptio.eval.extract import extract_letter, normalize_answer, parse_answer
from perceptio.models.generation import parse_generated
from perceptio.vocab import DepthSpanError, PerceptionVocab, TokenIds, depth_code_token

VOCAB = PerceptionVocab(num_depth_codes=16, depth_grid=(2, 3))
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

#: Pieces that spatial-token text is made of, plus near misses.
PIECES = st.sampled_from(
    ["<DEPTH_START>", "<DEPTH_END>", "[SEG]", "<DEPTH_3>", "<DEPTH_15>", "<DEPTH_16>", "<DEPTH_03>", "<DEPTH_",
     "<DEPTH>", " ", "\n", "(B)", "text", "<|im_end|>"]
)  # fmt: skip


@FUZZ
@given(st.lists(st.integers(0, 15), min_size=6, max_size=6))
def test_span_round_trip(codes: list[int]) -> None:
    text = VOCAB.render_depth_span(codes)
    assert VOCAB.parse_depth_span(f"  {text}\n").reshape(-1).tolist() == codes


@FUZZ
@given(st.lists(PIECES, max_size=20).map("".join) | st.text(max_size=60))
def test_span_parser_returns_a_grid_or_names_the_problem(text: str) -> None:
    try:
        grid = VOCAB.parse_depth_span(text)
    except DepthSpanError as err:
        assert str(err)
    else:
        assert grid.shape == (2, 3) and ((grid >= 0) & (grid < 16)).all()
        assert VOCAB.render_depth_span(grid) == text.strip()


IDS = TokenIds(seg=5, depth_start=6, depth_end=7, first_code=10, num_depth_codes=16)


@FUZZ
@given(st.lists(st.integers(0, 40), max_size=40))
def test_generated_ids_parse_without_exceptions(ids: list[int]) -> None:
    parsed = parse_generated(ids, IDS, span_length=6)
    assert all(0 <= p < len(ids) and ids[p] == IDS.seg for p in parsed.seg_positions)
    if parsed.depth_codes is not None:
        assert (
            len(parsed.depth_codes.reshape(-1)) == 6 and ((parsed.depth_codes >= 0) & (parsed.depth_codes < 16)).all()
        )
    assert all(t not in (IDS.seg, IDS.depth_start, IDS.depth_end) and not 10 <= t < 26 for t in parsed.text_ids)


@FUZZ
@given(st.text(max_size=80), st.integers(2, 5))
def test_letter_extraction_returns_a_valid_letter_or_none(text: str, options: int) -> None:
    letter = extract_letter(text, options)
    assert letter is None or letter in "ABCDE"[:options]
    assert parse_answer(text, options) is not None


@FUZZ
@given(st.sampled_from("ABCDE"), st.integers(5, 5), st.sampled_from(["({})", "{}", "The answer is ({}).", "({}) x"]))
def test_letter_extraction_reads_plain_answers(letter: str, options: int, form: str) -> None:
    assert extract_letter(form.format(letter), options) == letter


@FUZZ
@given(st.text(max_size=60))
def test_normalize_answer_is_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once


def _file(payload: bytes, suffix: str) -> Path:
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)  # noqa: SIM115 - hypothesis calls this often
    handle.write(payload)
    handle.close()
    return Path(handle.name)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONVERSATION_LINES = st.fixed_dictionaries(
    {"image": st.text(max_size=8)},
    optional={"conversations": JSON_VALUES, "id": JSON_VALUES, "answer": JSON_VALUES},
).map(json.dumps)


@FUZZ
@given(st.lists(CONVERSATION_LINES | st.text(max_size=30), min_size=1, max_size=5), st.booleans())
def test_jsonl_reader_returns_samples_or_a_data_error(lines: list[str], jsonl: bool) -> None:
    text = "\n".join(lines) if jsonl else "[" + ",".join(lines) + "]"
    path = _file(text.encode("utf-8", "surrogatepass"), ".jsonl" if jsonl else ".json")
    try:
        samples = read_conversations(path)
    except DataError as err:
        assert str(path) in str(err) or "line" in str(err) or str(err)
    else:
        assert isinstance(samples, list)
    finally:
        path.unlink()


TSV_CELLS = st.text(alphabet=st.characters(blacklist_characters="\t\n\r"), max_size=8)


@FUZZ
@given(
    st.lists(st.sampled_from(["index", "question", "A", "B", "C", "answer", "image", "category", "hint"]),
             min_size=1, max_size=7, unique=True),
    st.lists(st.lists(TSV_CELLS, min_size=1, max_size=7), max_size=4),
)  # fmt: skip
def test_tsv_reader_returns_samples_or_a_data_error(header: list[str], rows: list[list[str]]) -> None:
    text = "\n".join(["\t".join(header), *("\t".join(row) for row in rows)]) + "\n"
    path = _file(text.encode("utf-8", "surrogatepass"), ".tsv")  # lone surrogates: invalid UTF-8
    try:
        assert isinstance(read_mmbench(path), list)
    except DataError as err:
        assert str(err)
    finally:
        path.unlink()


@FUZZ
@given(st.binary(max_size=200) | JSON_VALUES.map(lambda v: pickle.dumps(v, protocol=2)))
def test_refs_pickle_loader_returns_refs_or_a_data_error(payload: bytes) -> None:
    path = _file(payload, ".p")
    try:
        refs = load_refs(path)
    except DataError as err:
        assert str(err)
    else:
        assert isinstance(refs, list) and all(isinstance(r, dict) for r in refs)
    finally:
        path.unlink()


def test_refs_pickle_loader_refuses_globals() -> None:
    path = _file(pickle.dumps([{"ok": np.int64(1)}]), ".p")  # a numpy scalar needs a global: refused
    try:
        try:
            load_refs(path)
        except DataError as err:
            assert "global" in str(err).lower() or "refus" in str(err).lower()
        else:
            raise AssertionError("a pickle that asks for a global was loaded")
    finally:
        path.unlink()


def test_depth_code_tokens_are_what_the_fuzzed_parser_expects() -> None:
    assert depth_code_token(3) == "<DEPTH_3>"
