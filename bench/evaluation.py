"""Evaluation throughput: `perceptio eval refcoco` on the synthetic RefCOCO val split, batch 1 vs batch 8, and
batch 16 with and without the frozen SAM2 feature cache (an image encoded once for all its expressions).

Each pair runs side by side in one process on the same samples (order alternated, best of ``--repeats``),
through the harness itself (`run_eval`: generation, masks at the original size, scoring, predictions.jsonl); the
cache pair also says whether the two predictions files are identical. The cache only matters for a model that
writes segmentation tokens, such as the shipped one (``--model src/perceptio/weights/tiny-perceptio``).

    .venv/bin/python bench/evaluation.py [--model runs/tiny_synth/model] [--world runs/quickstart/world] [--samples 48]

Without ``--model`` a randomly initialised tiny preset is used (it rarely ends its answer early, so it decodes
the full token budget: a worst case).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--world", type=Path, default=Path("runs/quickstart/world"))
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from perceptio.eval import harness
    from perceptio.eval.harness import EvalSettings, run_eval
    from perceptio.models import build_preset, load_model

    scratch = tempfile.TemporaryDirectory()
    if not (args.world / "manifest.json").is_file():  # no quickstart world yet: render a small one
        from perceptio.data.synthetic import generate_world

        args.world = Path(scratch.name) / "world"
        generate_world(args.world, num_images=200, seed=0, progress=False)
    loaded = load_model(args.model) if args.model else build_preset("tiny")
    name = str(args.model) if args.model else "tiny preset (random weights)"
    arms = {"batch 1": (1, True), "batch 8": (8, True), "batch 16, no cache": (16, False), "batch 16": (16, True)}
    best: dict[str, float] = {}
    cache_bytes = harness.FEATURE_CACHE_BYTES
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for pair in (("batch 1", "batch 8"), ("batch 16, no cache", "batch 16")):
                for arm in pair if repeat % 2 == 0 else pair[::-1]:
                    batch, cached = arms[arm]
                    harness.FEATURE_CACHE_BYTES = cache_bytes if cached else 0
                    settings = EvalSettings(
                        task="refcoco",
                        model=args.model or Path("tiny"),
                        data=args.world,
                        out=Path(tmp) / arm.replace(" ", "_").replace(",", ""),
                        split="val",
                        image_root=args.world / "images",
                        limit=args.samples,
                        batch_size=batch,
                        device="cpu",
                        resume=False,
                    )
                    start = time.perf_counter()
                    metrics = run_eval(settings, progress=False, model=loaded)
                    seconds = time.perf_counter() - start
                    best[arm] = min(best.get(arm, float("inf")), seconds)
        plain, cached = (Path(tmp) / name / "predictions.jsonl" for name in ("batch_16_no_cache", "batch_16"))
        same = plain.read_text() == cached.read_text()
    harness.FEATURE_CACHE_BYTES = cache_bytes
    print(f"model: {name}; {args.samples} RefCOCO val expressions; {args.threads} threads; best of {args.repeats}")
    print(f"{'setting':>18}  {'seconds':>8}  {'samples/s':>9}")
    for arm, seconds in best.items():
        print(f"{arm:>18}  {seconds:>8.2f}  {args.samples / seconds:>9.2f}")
    print(f"speed-up of batch 8 over batch 1: {best['batch 1'] / best['batch 8']:.2f}x")
    print(
        f"speed-up of the feature cache (batch 16): {best['batch 16, no cache'] / best['batch 16']:.2f}x; "
        f"predictions identical: {'yes' if same else 'NO'} (cIoU of the last run {metrics['ciou']:.3f})"
    )


if __name__ == "__main__":
    main()
