"""Task templates on samples read from the synthetic world: answer order, phrasings, direct answering."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from perceptio.data.readers import read_conversations, read_depth_folder, read_hardblink, read_mmbench, read_refer
from perceptio.data.templates import TemplateError, render_sample
from perceptio.vocab import PerceptionVocab

VOCAB = PerceptionVocab(num_depth_codes=32, depth_grid=(8, 8))
CODES = np.arange(64).reshape(8, 8) % 32


def test_referring_segmentation_puts_seg_then_depth_then_text(world_dir: Path) -> None:
    sample = read_refer(world_dir, "refcoco", split="train", image_root=world_dir / "images")[0]
    rendered = render_sample(sample, VOCAB, np.random.default_rng(0), depth_codes=CODES)
    assert sample.query in rendered.query and rendered.num_masks == 1
    seg, span, text = re.fullmatch(r"(\[SEG\]) (<DEPTH_START>.*<DEPTH_END>) (.+)", rendered.target).groups()
    np.testing.assert_array_equal(VOCAB.parse_depth_span(span), CODES)
    direct = render_sample(sample, VOCAB, np.random.default_rng(0), depth_codes=CODES, spatial_cot=False)
    assert direct.target.startswith("[SEG] ") and "<DEPTH" not in direct.target


def test_relative_depth_with_and_without_the_spatial_chain(world_dir: Path) -> None:
    sample = read_hardblink(world_dir / "hardblink" / "train", split="train")[0]
    cot = render_sample(sample, VOCAB, np.random.default_rng(1), depth_codes=CODES)
    assert cot.query == sample.query and cot.target.startswith("<DEPTH_START>") and f"({sample.answer})" in cot.target
    assert render_sample(sample, VOCAB, np.random.default_rng(1), spatial_cot=False).target == f"({sample.answer})"
    with pytest.raises(TemplateError, match="needs depth codes"):
        render_sample(sample, VOCAB, np.random.default_rng(1))


def test_depth_vqa_and_multiple_choice(world_dir: Path) -> None:
    depth = read_depth_folder(world_dir / "depth" / "train", image_dir=world_dir / "images")[0]
    rendered = render_sample(depth, VOCAB, np.random.default_rng(0), depth_codes=CODES)
    assert rendered.target == VOCAB.render_depth_span(CODES) and "depth" in rendered.query.lower()
    vqa = read_conversations(world_dir / "vqa" / "train.json", image_root=world_dir / "images")[0]
    rendered = render_sample(vqa, VOCAB, np.random.default_rng(0))
    assert rendered.target == vqa.answer and "<image>" not in rendered.query
    mcq = read_mmbench(world_dir / "mmbench" / "train.tsv")[0]
    rendered = render_sample(mcq, VOCAB, np.random.default_rng(0))
    assert rendered.target == mcq.answer and f"A. {mcq.choices[0]}" in rendered.query


def test_phrasings_vary_and_are_reproducible(world_dir: Path) -> None:
    sample = read_refer(world_dir, "refcoco", split="train", image_root=world_dir / "images")[0]
    queries = {render_sample(sample, VOCAB, np.random.default_rng(k), spatial_cot=False).query for k in range(20)}
    assert len(queries) == 3
    first = render_sample(sample, VOCAB, np.random.default_rng(5), spatial_cot=False)
    assert render_sample(sample, VOCAB, np.random.default_rng(5), spatial_cot=False) == first
