"""Evaluation throughput: `perceptio eval refcoco` on the synthetic RefCOCO val split, batch 1 vs batch 8.

Both settings run side by side in one process on the same samples (order alternated, best of ``--repeats``),
through the harness itself (`run_eval`: generation, masks at the original size, scoring, predictions.jsonl).

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

    from perceptio.eval.harness import EvalSettings, run_eval
    from perceptio.models import build_preset, load_model

    scratch = tempfile.TemporaryDirectory()
    if not (args.world / "manifest.json").is_file():  # no quickstart world yet: render a small one
        from perceptio.data.synthetic import generate_world

        args.world = Path(scratch.name) / "world"
        generate_world(args.world, num_images=200, seed=0, progress=False)
    loaded = load_model(args.model) if args.model else build_preset("tiny")
    name = str(args.model) if args.model else "tiny preset (random weights)"
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for batch in (1, 8) if repeat % 2 == 0 else (8, 1):
                settings = EvalSettings(
                    task="refcoco",
                    model=args.model or Path("tiny"),
                    data=args.world,
                    out=Path(tmp) / f"b{batch}_{repeat}",
                    split="val",
                    image_root=args.world / "images",
                    limit=args.samples,
                    batch_size=batch,
                    device="cpu",
                )
                start = time.perf_counter()
                metrics = run_eval(settings, progress=False, model=loaded)
                seconds = time.perf_counter() - start
                best[batch] = min(best.get(batch, float("inf")), seconds)
    print(f"model: {name}; {args.samples} RefCOCO val expressions; {args.threads} threads; best of {args.repeats}")
    print(f"{'batch':>5}  {'seconds':>8}  {'samples/s':>9}")
    for batch in (1, 8):
        print(f"{batch:>5}  {best[batch]:>8.2f}  {args.samples / best[batch]:>9.2f}")
    print(f"speed-up of batch 8 over batch 1: {best[1] / best[8]:.2f}x (cIoU of the last run {metrics['ciou']:.3f})")


if __name__ == "__main__":
    main()
