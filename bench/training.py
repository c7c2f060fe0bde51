"""Training figures of a recipe on this machine: loss curve, samples/s, and when the quick evaluation first shows
well-formed spans and non-zero masks.

Runs the recipe (unless its run folder already holds a finished run) and prints the figures from the run's own
logs (`train_log.jsonl`, `eval_log.jsonl`, `training.json`):

    .venv/bin/python bench/training.py [--config configs/tiny_synth.yaml] [override ...]

The tiny recipe needs the quickstart world and tokenizer (`runs/quickstart/world`, `runs/quickstart/tokenizer`);
pass overrides such as `data.root=...` for others.

Before/after in one run: ``--compare KEY --values A,B [--steps N]`` trains the recipe N steps once per value of
the recipe key (fresh run folders under ``runs/bench_training``), then prints samples/s of each, the ratio to the
first, and whether the logged losses are identical (the first 50 log lines, side by side):

    .venv/bin/python bench/training.py --compare run.data_workers --values 0,1 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def compare(config: Path, key: str, values: list[str], steps: int, overrides: list[str]) -> None:
    """Train ``steps`` steps per value of ``key`` and print speed and loss agreement."""
    from perceptio.utils.jsonl import read_jsonl

    logs = {}
    for value in values:
        out = Path("runs/bench_training") / f"{key}={value}"
        command = [sys.executable, "-m", "perceptio", "train", "--config", str(config), "--overwrite", *overrides]
        command += [f"run.steps={steps}", "run.log_every=1", "run.checkpoint_every=0", "eval.every=0"]
        command += [f"run.out_dir={out}", f"{key}={value}"]
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        logs[value] = read_jsonl(out / "train_log.jsonl")
    print(f"\n| {key} | samples/s (steps 6 on) | ratio |")
    print("|---|---|---|")
    rates = {}
    for value, log in logs.items():
        done = [line for line in log if line["step"] > 5]
        seconds = sum(1 / line["samples_per_s"] for line in done)  # each line is one step of the same batch size
        rates[value] = len(done) / seconds
        print(f"| {value} | {rates[value]:.1f} | {rates[value] / rates[values[0]]:.2f}x |")
    first = [line["loss"] for line in logs[values[0]]][:50]
    for value in values[1:]:
        other = [line["loss"] for line in logs[value]][:50]
        print(f"losses of {key}={value} identical to {key}={values[0]} (first {len(first)} steps): {other == first}")
    print("\nstep | " + " | ".join(f"{key}={v}" for v in values))
    for k in range(min(len(first), 50)):
        print(f"{k + 1} | " + " | ".join(f"{logs[v][k]['loss']:.6f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/tiny_synth.yaml"))
    parser.add_argument("--compare", metavar="KEY", help="a recipe key to compare values of (before/after)")
    parser.add_argument("--values", default="", help="comma-separated values of --compare")
    parser.add_argument("--steps", type=int, default=60, help="steps per value of --compare")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args()
    if args.compare:
        compare(args.config, args.compare, args.values.split(","), args.steps, args.overrides)
        return

    from perceptio.config import load_config
    from perceptio.train.config import TrainConfig
    from perceptio.utils.jsonl import read_jsonl

    recipe = load_config(TrainConfig, args.config, args.overrides)
    out = Path(recipe.run.out_dir)
    if not (out / "training.json").is_file():
        command = [sys.executable, "-m", "perceptio", "train", "--config", str(args.config), *args.overrides]
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    summary = json.loads((out / "training.json").read_text())
    log = read_jsonl(out / "train_log.jsonl")
    evaluations = read_jsonl(out / "eval_log.jsonl")
    seconds = log[-1]["seconds"] if log else float("nan")
    rates = [line["samples_per_s"] for line in log]
    print(
        f"recipe {args.config}: {summary['steps']} steps x {recipe.run.global_batch_size} samples, "
        f"{seconds:.1f} s of training, {sum(rates) / len(rates):.1f} samples/s (mean of log windows)"
    )
    print("loss curve (step: loss):")
    marks = sorted({log[0]["step"], *[line["step"] for line in log if line["step"] % 100 == 0], log[-1]["step"]})
    print("  " + ", ".join(f"{line['step']}: {line['loss']:.3f}" for line in log if line["step"] in marks))
    for metric in ("span_ok", "seg_ciou"):
        hits = [
            e
            for e in evaluations
            if any(k.endswith(metric) and v > (0.99 if metric == "span_ok" else 0) for k, v in e.items())
        ]
        first = hits[0]["step"] if hits else None
        print(f"first quick evaluation with {metric} {'= 1' if metric == 'span_ok' else '> 0'}: step {first}")
    if evaluations:
        print("last quick evaluation:", json.dumps(evaluations[-1]))


if __name__ == "__main__":
    main()
