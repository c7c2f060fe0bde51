"""Depth tokenizer benchmarks, printed side by side from one run.

1. encode and decode throughput (maps/s) of the `tiny` and `aurora` presets on this machine's CPU
   (and on CUDA when one is present);
2. the `tiny` preset's training time on the synthetic world (target: under 60 s on 2 cores) and what it keeps
   on unseen val scenes against the mean-depth-map baseline (target: better by a wide margin).

    .venv/bin/python bench/depth_tokenizer.py [--world DIR] [--steps 600] [--batch-size 32]

Without --world, a 600-image synthetic world (128 px, seed 0) is rendered into a temporary folder first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def throughput(preset: str, device: str, batch: int, repeats: int) -> tuple[float, float]:
    from perceptio.tokenizers.depth import DepthTokenizer

    tok = DepthTokenizer.from_preset(preset).to(device).eval()
    size = tok.config.input_size
    maps = torch.rand(batch, size, size, device=device)
    codes = tok.encode(maps)
    tok.decode(codes)  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        tok.encode(maps)
    sync()
    encode = batch * repeats / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats):
        tok.decode(codes)
    sync()
    decode = batch * repeats / (time.perf_counter() - start)
    return encode, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=None, help="a synthetic world (default: render one)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from perceptio.data.synthetic import generate_world
    from perceptio.tokenizers.depth import PRESETS
    from perceptio.tokenizers.depth.evaluate import evaluate_tokenizer
    from perceptio.tokenizers.depth.pipeline import collect_teacher_maps
    from perceptio.tokenizers.depth.train import TokenizerTrainConfig, train_tokenizer

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\n1. throughput (random maps; maps/s)")
    print(f"{'preset':8} {'device':6} {'batch':>5} {'encode':>10} {'decode':>10}")
    for preset, batch, repeats in (("tiny", 64, 20), ("aurora", 8, 5)):
        for device in devices:
            enc, dec = throughput(preset, device, batch if device == "cpu" else batch * 8, repeats)
            print(f"{preset:8} {device:6} {batch:5d} {enc:10.1f} {dec:10.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        world = args.world
        if world is None:
            world = Path(tmp) / "world"
            start = time.perf_counter()
            generate_world(world, num_images=600, seed=0, progress=False)
            print(f"\n(rendered a 600-image world in {time.perf_counter() - start:.1f} s)")
        size = PRESETS["tiny"].input_size
        train_maps = collect_teacher_maps(world, split="train", size=size, progress=False)
        val_maps = collect_teacher_maps(world, split="val", size=size, progress=False)
        stacked = np.stack([m.depth for m in train_maps])
        config = TokenizerTrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=0, log_every=50
        )
        start = time.perf_counter()
        tok = train_tokenizer(stacked, PRESETS["tiny"], config, Path(tmp) / "tiny", progress=False)
        seconds = time.perf_counter() - start
        results = evaluate_tokenizer(tok, val_maps, mean_map=stacked.mean(0))

    ours, base = results["tokenizer"], results["mean_map_baseline"]
    print(
        f"\n2. tiny preset: {args.steps} steps x batch {args.batch_size} on {len(train_maps)} train maps: "
        f"{seconds:.1f} s "
        f"({'meets' if seconds < 60 else 'MISSES'} the < 60 s target)"
    )
    print(f"   evaluated on {results['num_maps']} unseen val maps ({results['space'].replace('_', ' ')})")
    print(f"   {'metric':28} {'tiny tokenizer':>15} {'mean-map baseline':>18}")
    for key, label in (
        ("abs_rel", "AbsRel"),
        ("rmse", "RMSE (m)"),
        ("delta1", "delta<1.25"),
        ("rmse_normalized", "RMSE (normalised)"),
    ):
        print(f"   {label:28} {ours[key]:15.4f} {base[key]:18.4f}")
    for n, acc in ours["closest_point_accuracy"].items():
        print(
            f"   {'closest of ' + n + ' points':28} {100 * acc:14.1f}% {100 * base['closest_point_accuracy'][n]:17.1f}%"
        )
    print(
        f"   codebook usage {100 * results['codebook']['usage']:.0f}%, "
        f"perplexity {results['codebook']['perplexity']:.1f}"
    )


if __name__ == "__main__":
    main()
