"""The decode loop gives transformers' greedy ``generate`` output token for token, with and without parallel span
decoding, on random and trained tiny models, and keeps the [SEG] hidden states a teacher-forced pass would give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio import Perceptio
from perceptio.models import PRESETS, PerceptioForConditionalGeneration, PerceptioProcessor, decoding
from perceptio.models.decoding import Decoded, divergences, greedy_decode, reference_decode
from perceptio.models.generation import SpanGrammar

PROMPTS = (
    "What is the depth map for the image?",
    "Please segment the red cube in this image.",
    "Which object is the closest to the camera? Answer with the option's letter.",
    "hi",
)


def _random_model(seed: int, span_preset: str | None = None) -> tuple[PerceptioForConditionalGeneration, object]:
    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    torch.manual_seed(seed)
    model = PerceptioForConditionalGeneration(config)
    model.register_text_tokenizer(tokenizer)
    return model.eval(), PerceptioProcessor.for_config(model.config, tokenizer)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _both(
    model, processor, images, prompts, *, budget: int, window: int = 1, **options
) -> tuple[Decoded, Decoded, tuple]:  # noqa: ANN001, E501
    batch = processor(images, list(prompts))
    ids = model.config.resolved_token_ids
    grammar = SpanGrammar(ids, model.config.vocab.span_length, model.vlm.lm_head.out_features, **options)
    inputs = (model.vlm, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], grammar)
    ends = {"end_id": processor.turn_end_id, "pad_id": processor.text_tokenizer.pad_token_id}
    reference = reference_decode(*inputs, max_new_tokens=budget, **ends)
    loop = greedy_decode(*inputs, max_new_tokens=budget, seg_id=ids.seg, jacobi=window, **ends)
    return reference, loop, inputs[:4]


def _assert_same(reference: Decoded, loop: Decoded, inputs: tuple, pad_id: int, *, ties: bool = False) -> None:
    """The same tokens as generate; with ``ties``, sequences may differ from a floating-point tie on (a batched
    forward adds in another order), never at a clear logit gap."""
    width = reference.tokens.shape[1]
    if not ties:
        assert loop.lengths == reference.lengths
        assert torch.equal(loop.tokens[:, :width], reference.tokens)
    found = divergences(*inputs, reference, loop)
    assert all(d.is_tie() for d in found), found
    same = [b for b in range(len(reference.lengths)) if b not in {d.row for d in found}]
    assert [loop.lengths[b] for b in same] == [reference.lengths[b] for b in same]
    assert torch.equal(loop.tokens[same, :width], reference.tokens[same])
    assert bool((loop.tokens[same, width:] == pad_id).all())  # generate stopped early: nothing but padding after


@pytest.mark.parametrize(
    "options",
    [{}, {"require_span": True}, {"constrain": False}, {"spatial_cot": False}],
    ids=["constrained", "require-span", "unconstrained", "no-spatial"],
)
def test_loop_matches_generate_on_a_random_model_batched_with_padding(options: dict) -> None:
    model, processor = _random_model(0)
    reference, loop, inputs = _both(model, processor, _images(4), PROMPTS, budget=80, **options)
    _assert_same(reference, loop, inputs, processor.text_tokenizer.pad_token_id)
    assert loop.forwards <= 80


@pytest.fixture(scope="module")
def shipped() -> Perceptio:
    return Perceptio.from_pretrained("tiny-perceptio", device="cpu")


def test_loop_matches_generate_on_the_trained_model_whose_answers_end(shipped: Perceptio, monkeypatch) -> None:  # noqa: ANN001
    from perceptio.data.synthetic.world import WorldConfig, render_world_scene

    images = [Image.fromarray(render_world_scene(3, i, WorldConfig()).rendering.rgb) for i in range(4)]
    model, processor = shipped.model, shipped.processor
    budget = model.config.vocab.span_length + 34
    groups: list[list[int]] = []  # the sequences of each forward that left others out
    run_rows = decoding._Stepper.run_rows
    monkeypatch.setattr(
        decoding._Stepper, "run_rows", lambda self, rows, *a: groups.append(rows.tolist()) or run_rows(self, rows, *a)
    )
    for window in (1, 3, 8):
        groups.clear()
        reference, loop, inputs = _both(model, processor, images, PROMPTS, budget=budget, window=window)
        _assert_same(reference, loop, inputs, processor.text_tokenizer.pad_token_id, ties=window > 1)
        assert min(loop.lengths) < budget  # the trained model ends its turns: the end-of-turn path is exercised
        if window > 1:
            assert loop.forwards < max(loop.lengths)  # fewer forwards than tokens: the span went in parallel
            # sequences past their span (or done) sat span forwards out, which the others ran alone
            assert groups and all(0 < len(g) < len(images) for g in groups)
        else:
            assert not groups


@pytest.mark.parametrize("seed", range(6))
def test_parallel_span_decoding_is_exact_on_random_models_and_prompts(seed: int) -> None:
    """Property: for any model, prompt, window and grammar, parallel span decoding gives the greedy tokens, except
    where greedy decoding is itself a floating-point tie."""
    rng = np.random.default_rng(seed)
    model, processor = _random_model(100 + seed)
    with torch.no_grad():  # sharper logits: the greedy path changes code often, so guesses are often wrong
        model.vlm.lm_head.weight.mul_(float(rng.uniform(1.0, 20.0)))
    words = ["what", "where", "depth", "point", "red", "cube", "closest", "segment", "the", "a", "of", "is"]
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(3)]
    options = [{}, {"require_span": True}, {"constrain": False}][seed % 3]
    window = int(rng.integers(2, 12))
    reference, loop, inputs = _both(
        model, processor, _images(3, seed), prompts, budget=int(rng.integers(5, 90)), window=window, **options
    )
    _assert_same(reference, loop, inputs, processor.text_tokenizer.pad_token_id, ties=True)


def _always(token: int):  # noqa: ANN202 - a forward hook making ``token`` the argmax everywhere
    def hook(module, inputs, output):  # noqa: ANN001, ANN202
        output = output.clone()
        output[..., token] += 1e4
        return output

    return hook


@pytest.mark.parametrize("budget", [1, 3])
def test_seg_hidden_states_equal_a_teacher_forced_pass_even_at_the_budget_end(budget: int) -> None:
    model, processor = _random_model(1)
    seg = model.config.resolved_token_ids.seg
    handle = model.vlm.lm_head.register_forward_hook(_always(seg))
    try:
        reference, loop, inputs = _both(model, processor, _images(2), PROMPTS[:2], budget=budget)
    finally:
        handle.remove()
    _assert_same(reference, loop, inputs, processor.text_tokenizer.pad_token_id)
    assert loop.tokens.tolist() == [[seg] * budget] * 2  # the last token is a [SEG]: it needed one more feed
    batch = processor(_images(2), list(PROMPTS[:2]))
    sequences = torch.cat([batch["input_ids"], loop.tokens], dim=1)
    attention = torch.cat([batch["attention_mask"], torch.ones_like(loop.tokens)], dim=1)
    with torch.no_grad():
        hidden = model.vlm(
            input_ids=sequences, attention_mask=attention, pixel_values=batch["pixel_values"], output_hidden_states=True
        ).hidden_states[-1]
    width = batch["input_ids"].shape[1]
    for b in range(2):
        assert loop.seg_hidden[b].shape == (budget, hidden.shape[-1])
        torch.testing.assert_close(loop.seg_hidden[b], hidden[b, width:], rtol=1e-4, atol=1e-5)


def test_predict_uses_the_loop_and_its_options_change_nothing(shipped: Perceptio) -> None:
    from perceptio.data.synthetic.world import WorldConfig, render_world_scene

    image = Image.fromarray(render_world_scene(4, 0, WorldConfig()).rendering.rgb)
    prompts = ["Please segment the red cube in this image.", "What is the depth map for the image?"]
    plain = shipped.predict(image, prompts)
    parallel = shipped.predict(image, prompts, span_window=8)
    for a, b in zip(plain, parallel, strict=True):
        assert a.token_ids == b.token_ids and a.answer == b.answer
        assert len(a.masks) == len(b.masks) and all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))


def test_stopping_at_the_segmentation_token_keeps_the_tokens_and_hidden_state_before_it(shipped: Perceptio) -> None:
    """``stop_at_seg``: a sequence ends after its first [SEG] (fed once for its hidden state) with the full answer's
    tokens up to it and the same hidden state; a sequence that writes none is decoded whole, as without it."""
    from perceptio.data.synthetic.world import WorldConfig, render_world_scene

    model, processor = shipped.model, shipped.processor
    images = [Image.fromarray(render_world_scene(4, k, WorldConfig()).rendering.rgb) for k in range(4)]
    prompts = [
        "Please segment the red cube in this image.",
        "What is the depth map for the image?",
        "Please segment the object closest to the camera in this image.",
        "hi",
    ]
    batch = processor(images, prompts)
    ids = model.config.resolved_token_ids
    grammar = SpanGrammar(ids, model.config.vocab.span_length, model.vlm.lm_head.out_features)
    inputs = (model.vlm, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], grammar)
    ends = {"end_id": processor.turn_end_id, "pad_id": processor.text_tokenizer.pad_token_id, "seg_id": ids.seg}
    whole = greedy_decode(*inputs, max_new_tokens=100, jacobi=16, **ends)
    first = greedy_decode(*inputs, max_new_tokens=100, jacobi=16, stop_at_seg=True, **ends)
    with_seg = [b for b in range(4) if ids.seg in whole.tokens[b, : whole.lengths[b]].tolist()]
    assert with_seg == [0, 2]  # the segmentation prompts; the others write no [SEG]
    for b in range(4):
        if b in with_seg:
            end = whole.tokens[b].tolist().index(ids.seg) + 1
            assert first.lengths[b] == end and torch.equal(first.tokens[b, :end], whole.tokens[b, :end])
            assert bool((first.tokens[b, end:] == ends["pad_id"]).all())
            assert first.seg_hidden[b].shape[0] == 1
            torch.testing.assert_close(first.seg_hidden[b][0], whole.seg_hidden[b][0], rtol=1e-4, atol=1e-5)
        else:
            assert first.lengths[b] == whole.lengths[b] and torch.equal(first.tokens[b], whole.tokens[b])
    alone = greedy_decode(*[x[[0, 2]] if torch.is_tensor(x) else x for x in inputs], max_new_tokens=100,
                          jacobi=16, stop_at_seg=True, **ends)  # fmt: skip
    assert alone.forwards == 1 < whole.forwards  # both end at their first token: one feed, for the hidden states

    full = shipped.predict(images[:1] * 2, prompts[:1] + prompts[2:3])
    short = shipped.predict(images[:1] * 2, prompts[:1] + prompts[2:3], first_mask=True)
    for a, b in zip(full, short, strict=True):
        assert b.text == "[SEG]" and b.depth is None and a.text.startswith("[SEG]") and len(a.masks) == 1
        assert len(b.masks) == 1 and np.array_equal(a.masks[0], b.masks[0])


@pytest.mark.parametrize("options", [{}, {"constrain": False}, {"spatial_cot": False}])
def test_the_span_ids_are_every_id_the_grammar_allows_inside_a_span(options: dict) -> None:
    model, _ = _random_model(0)
    ids = model.config.resolved_token_ids
    grammar = SpanGrammar(ids, 4, model.vlm.lm_head.out_features, **options)
    if options:  # nothing limits a span's ids, or there is no span
        assert grammar.span_ids is None
        return
    inside = torch.arange(1, 4 + 2)  # after 0..4 codes
    allowed = set(torch.nonzero(grammar.bias(inside) == 0)[:, 1].tolist())
    assert set(grammar.span_ids.tolist()) == allowed == {*ids.code_ids, ids.depth_end}


def test_inside_a_span_the_head_of_the_span_ids_alone_picks_the_whole_heads_token() -> None:
    """The greedy token from the span ids' rows of the LM head equals the whole vocabulary's argmax under the
    grammar wherever the state is inside a span; elsewhere (or with a hooked head) the whole head runs."""
    from transformers import StaticCache

    from perceptio.models.decoding import _Stepper

    model, _ = _random_model(3)
    vlm, span = model.vlm, 4
    with torch.no_grad():
        vlm.lm_head.weight.mul_(10.0)
    ids = model.config.resolved_token_ids
    grammar = SpanGrammar(ids, span, vlm.lm_head.out_features)
    cache = StaticCache(config=vlm.config.get_text_config(), max_cache_len=8)
    stepper = _Stepper(vlm, cache, grammar, compile=False)
    assert stepper.ids is not None
    torch.manual_seed(0)
    hidden = torch.randn(64, span + 3, vlm.lm_head.in_features)
    state = torch.arange(span + 3).expand(64, -1)  # every state: before, inside (after 0..span codes), after
    whole = (vlm.lm_head(hidden) + grammar.bias(state)).argmax(-1)
    inside = state[0, 1 : span + 2]
    assert torch.equal(stepper.greedy(hidden[:, 1 : span + 2], inside.expand(64, -1)), whole[:, 1 : span + 2])
    assert torch.equal(stepper.greedy(hidden, state), whole)  # not all inside: the whole head
    picked = stepper.greedy(hidden, state, guesses=True)  # guesses outside the span may be any span id
    assert torch.equal(picked[:, 1 : span + 2], whole[:, 1 : span + 2])
    assert set(picked.unique().tolist()) <= {*ids.code_ids, ids.depth_end}

    # a hooked head is not a plain head: its whole output decides
    vlm.lm_head.register_forward_hook(_always(ids.code_ids[1]))
    hooked = _Stepper(vlm, cache, grammar, compile=False)
    assert hooked.ids is None
    assert bool((hooked.greedy(hidden[:, 1 : span + 1], inside[:-1].expand(64, -1)) == ids.code_ids[1]).all())


def test_a_changed_token_is_a_divergence_at_a_clear_gap_not_a_tie() -> None:
    model, processor = _random_model(2)
    with torch.no_grad():
        model.vlm.lm_head.weight.mul_(10.0)
    reference, loop, inputs = _both(model, processor, _images(2), PROMPTS[:2], budget=20)
    assert divergences(*inputs, reference, loop) == []
    tampered = loop.tokens.clone()
    tampered[1, 5] = (tampered[1, 5] + 1) % model.config.resolved_token_ids.first_code
    (found,) = divergences(*inputs, reference, Decoded(tampered, loop.lengths, None, loop.forwards))
    assert (found.row, found.position) == (1, 5) and not found.is_tie()


@pytest.mark.slow
def test_compiled_step_decodes_the_same_tokens(shipped: Perceptio) -> None:
    from perceptio.data.synthetic.world import WorldConfig, render_world_scene

    images = [Image.fromarray(render_world_scene(5, i, WorldConfig()).rendering.rgb) for i in range(4)]
    model, processor = shipped.model, shipped.processor
    batch = processor(images, list(PROMPTS))
    ids = model.config.resolved_token_ids
    grammar = SpanGrammar(ids, model.config.vocab.span_length, model.vlm.lm_head.out_features)
    inputs = (model.vlm, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    ends = {"end_id": processor.turn_end_id, "pad_id": processor.text_tokenizer.pad_token_id}
    budget = model.config.vocab.span_length + 34
    reference = reference_decode(*inputs, grammar, max_new_tokens=budget, **ends)
    for window in (1, 8):
        compiled = greedy_decode(
            *inputs, grammar, max_new_tokens=budget, seg_id=ids.seg, jacobi=window, compile=True, **ends
        )
        found = divergences(*inputs, reference, compiled)
        assert all(d.is_tie() for d in found), found
        assert len(found) < len(PROMPTS)
