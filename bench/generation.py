"""Generation speed: the decode loop against transformers' ``generate``, side by side in one run.

For each batch size, the same prompts are decoded greedily under the depth-span grammar by:

- ``generate``: transformers' ``generate(do_sample=False)`` with the span grammar as a logits processor
  (``perceptio.models.decoding.reference_decode``), what ``predict`` used before the loop;
- ``loop``: ``perceptio.models.decoding.greedy_decode``, one token per forward;
- ``loop, span W``: the same with exact parallel decoding of the depth span, W tokens per forward;
- with ``--compile``, both loops again with ``torch.compile`` of the step (compile time printed apart, not counted).

Printed: ms per query (the best of ``--rounds`` rounds, the modes taking turns), the speed-up over ``generate``,
forwards per query (prefill excluded), and the queries decoded to the same tokens as ``generate``. A difference is
allowed only at a floating-point tie (the two tokens' logits within 1e-5 of the logits' scale, where the order of
float operations in a batched, padded or compiled forward decides); any other difference stops the run as a bug.
Models:

- ``tiny``: the tiny preset with random weights and the paper's 10x10 = 100-code span; every answer opens with
  the span (forced), then text up to the budget (random weights never end their turn);
- ``shipped``: the trained ``tiny-perceptio`` on rendered scenes of the synthetic world, with its own prompts: a
  depth span (8x8), masks and short answers that end their turn, as ``predict`` sees them;
- ``smol``: the smol preset (SmolLM2-135M language model, random weights), its 64-code span forced first.

    .venv/bin/python bench/generation.py [--model tiny|shipped|smol] [--queries 16] [--window 16] [--compile] \
        [--rounds 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

PROMPTS = (
    "What is the depth map for the image?",
    "Please segment the red cube in this image.",
    "Estimate the depth of this image.",
    "Which object is the closest to the camera?",
)


def build(name: str):  # noqa: ANN201 - (model, processor, images, prompts, require_span)
    from perceptio.models import PRESETS, PerceptioForConditionalGeneration, PerceptioProcessor, build_preset

    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(64)]
    if name == "shipped":
        from perceptio import Perceptio
        from perceptio.data.synthetic.world import WorldConfig, render_world_scene

        loaded = Perceptio.from_pretrained("tiny-perceptio", device="cpu")
        scenes = [Image.fromarray(render_world_scene(0, i, WorldConfig()).rendering.rgb) for i in range(64)]
        return loaded.model.eval(), loaded.processor, scenes, PROMPTS, False
    if name == "smol":
        model, processor = build_preset("smol", seed=0)
        return model.eval(), processor, noise, PROMPTS[:1], True
    from perceptio.tokenizers.depth import DepthTokenizerConfig

    tokenizer = PRESETS["tiny"].text_tokenizer()
    config = PRESETS["tiny"].config(tokenizer)
    config.depth_tokenizer_config = DepthTokenizerConfig.from_preset("aurora").to_dict()  # 10x10 = 100 codes
    torch.manual_seed(0)
    model = PerceptioForConditionalGeneration(config)
    model.register_text_tokenizer(tokenizer)
    return model.eval(), PerceptioProcessor.for_config(model.config, tokenizer), noise, PROMPTS[:1], True


def decode_all(mode: dict, model, processor, batches, grammar) -> tuple[float, list]:  # noqa: ANN001
    """Seconds and the decodings of every batch under one mode."""
    from perceptio.models.decoding import greedy_decode, reference_decode

    ends = {"end_id": processor.turn_end_id, "pad_id": processor.text_tokenizer.pad_token_id}
    budget = model.config.vocab.span_length + 12
    decoded = []
    start = time.perf_counter()
    for batch in batches:
        inputs = (model.vlm, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], grammar)
        if mode["kind"] == "generate":
            decoded.append(reference_decode(*inputs, max_new_tokens=budget, **ends))
        else:
            seg_id = model.config.resolved_token_ids.seg
            options = {"jacobi": mode["window"], "compile": mode["compile"]}
            decoded.append(greedy_decode(*inputs, max_new_tokens=budget, seg_id=seg_id, **options, **ends))
    return time.perf_counter() - start, decoded


def agreement(model, batches, reference: list, decoded: list) -> str:  # noqa: ANN001
    """Queries decoded as generate does, and where they differ, whether at a floating-point tie."""
    from perceptio.models.decoding import divergences

    found = []
    for batch, ref, new in zip(batches, reference, decoded, strict=True):
        inputs = (model.vlm, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        found += divergences(*inputs, ref, new)
    real = [d for d in found if not d.is_tie()]
    if real:
        raise SystemExit(f"decoded other tokens than generate at a clear logit gap: a bug ({real[0]})")
    total = sum(b["input_ids"].shape[0] for b in batches)
    return f"{total - len(found)}/{total}" + (f" ({len(found)} at ties)" if found else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "shipped", "smol"), default="tiny")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--window", type=int, default=16, help="tokens per forward of parallel span decoding")
    parser.add_argument("--compile", action="store_true", help="also time the loop with torch.compile")
    parser.add_argument("--rounds", type=int, default=1, help="modes run in turn this many times; best time kept")
    args = parser.parse_args()

    from perceptio.models.generation import SpanGrammar

    model, processor, images, prompts, require_span = build(args.model)
    span = model.config.vocab.span_length
    ids = model.config.resolved_token_ids
    grammar = SpanGrammar(ids, span, model.vlm.lm_head.out_features, require_span=require_span)
    queries = [(images[i % len(images)], prompts[i % len(prompts)]) for i in range(args.queries)]
    modes = [
        {"label": "generate", "kind": "generate"},
        {"label": "loop", "kind": "loop", "window": 1, "compile": False},
        {"label": f"loop, span {args.window}", "kind": "loop", "window": args.window, "compile": False},
    ]
    if args.compile:
        modes += [
            {"label": "compiled loop", "kind": "loop", "window": 1, "compile": True},
            {"label": f"compiled loop, span {args.window}", "kind": "loop", "window": args.window, "compile": True},
        ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}, {span}-code span, "
        f"{args.queries} queries, budget span + 12 tokens"
    )
    print(f"{'batch':>5} {'mode':28} {'ms/query':>9} {'speed-up':>9} {'forwards/query':>15} {'same tokens':>12}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        batches = [
            processor([im for im, _ in queries[i : i + batch_size]], [p for _, p in queries[i : i + batch_size]])
            for i in range(0, len(queries), batch_size)
        ]
        decode_all(modes[1], model, processor, batches[:1], grammar)  # warm-up
        for mode in modes:
            if mode.get("compile"):  # a first pass compiles the step for every shape met (prompt lengths vary)
                began = time.perf_counter()
                decode_all(mode, model, processor, batches, grammar)
                print(f"{'':5} ({mode['label']}: compiling and a first pass took {time.perf_counter() - began:.1f} s)")
        # the modes take turns, round after round, so that the machine's slow spells fall on all of them
        best: list[float] = [float("inf")] * len(modes)
        outputs: list[list] = [[] for _ in modes]
        for _ in range(args.rounds):
            for i, mode in enumerate(modes):
                seconds, outputs[i] = decode_all(mode, model, processor, batches, grammar)
                best[i] = min(best[i], seconds)
        reference, reference_seconds = outputs[0], best[0]
        for mode, seconds, decoded in zip(modes, best, outputs, strict=True):
            same = agreement(model, batches, reference, decoded)
            forwards = sum(d.forwards * d.tokens.shape[0] for d in decoded) / args.queries
            print(
                f"{batch_size:5} {mode['label']:28} {1000 * seconds / args.queries:9.1f} "
                f"{reference_seconds / seconds:8.2f}x {forwards:15.1f} {same:>12}"
            )


if __name__ == "__main__":
    main()
