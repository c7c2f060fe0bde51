"""Generation speed of Perceptio: a 100-code depth span plus a short answer, per query.

Prints, side by side from one run: ms per query and decode tokens/s with the KV cache and without it, and the
share of decode time spent in the depth-span logits processor (target: under 10 %). The tiny preset is used
with the `aurora` tokenizer geometry, so the span holds 100 codes as in the paper (random weights); the smol
preset (SmolLM2-135M) keeps its tiny tokenizer's 64-code span. Every query is made to open with a depth span,
so each one decodes the full span, plus up to 12 answer tokens.

    .venv/bin/python bench/generation.py [--preset tiny|smol] [--queries 16] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image


def build(preset: str, seed: int = 0):  # noqa: ANN201
    from perceptio.models import PRESETS, PerceptioForConditionalGeneration, PerceptioProcessor, build_preset

    if preset == "smol":  # SmolLM2-135M; its span is the tiny tokenizer's 8x8 = 64 codes
        model, processor = build_preset("smol", seed=seed)
        return model.eval(), processor
    from perceptio.tokenizers.depth import DepthTokenizerConfig

    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    config.depth_tokenizer_config = DepthTokenizerConfig.from_preset("aurora").to_dict()  # 10x10 = 100 codes
    torch.manual_seed(seed)
    model = PerceptioForConditionalGeneration(config)
    model.register_text_tokenizer(tokenizer)
    return model.eval(), PerceptioProcessor.for_config(model.config, tokenizer)


def run(model, processor, images, prompts, *, batch_size: int, use_cache: bool) -> tuple[float, int, float]:  # noqa: ANN001
    """Seconds, generated tokens, and seconds spent inside the logits processor."""
    from perceptio.models import generation

    spent = [0.0]
    original = generation.DepthSpanLogitsProcessor.__call__

    def timed(self, input_ids, scores):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        out = original(self, input_ids, scores)
        spent[0] += time.perf_counter() - start
        return out

    generation.DepthSpanLogitsProcessor.__call__ = timed
    original_generate = model.vlm.generate
    model.vlm.generate = lambda **kw: original_generate(**{**kw, "use_cache": use_cache})
    try:
        start = time.perf_counter()
        predictions = model.predict(
            images, prompts, processor, batch_size=batch_size, require_depth_span=True, max_new_tokens=112
        )
        seconds = time.perf_counter() - start
    finally:
        generation.DepthSpanLogitsProcessor.__call__ = original
        model.vlm.generate = original_generate
    assert all(p.depth_codes is not None and not p.issues for p in predictions), "every query must decode a full span"
    return seconds, sum(len(p.token_ids) for p in predictions), spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", choices=("tiny", "smol"), default="tiny")
    args = parser.parse_args()

    model, processor = build(args.preset)
    span = model.config.vocab.span_length
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(args.queries)]
    prompts = ["What is the depth map for the image? Which point is the closest to the camera?"] * args.queries
    run(model, processor, images[:2], prompts[:2], batch_size=2, use_cache=True)  # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} preset, {span}-code span")
    print(f"{'setting':26} {'ms/query':>9} {'tokens/s':>9} {'processor share':>16}")
    for label, batch, cache in (
        ("KV cache, batch 1", 1, True),
        ("no cache, batch 1", 1, False),
        (f"KV cache, batch {args.batch_size}", args.batch_size, True),
    ):
        seconds, tokens, in_processor = run(model, processor, images, prompts, batch_size=batch, use_cache=cache)
        share = 100 * in_processor / seconds
        print(f"{label:26} {1000 * seconds / args.queries:9.1f} {tokens / seconds:9.0f} {share:15.1f}%")


if __name__ == "__main__":
    main()
