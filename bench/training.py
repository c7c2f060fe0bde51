"""Training figures of a recipe on this machine: loss curve, samples/s, and when the quick evaluation first shows
well-formed spans and non-zero masks.

Runs the recipe (unless its run folder already holds a finished run) and prints the figures from the run's own
logs (`train_log.jsonl`, `eval_log.jsonl`, `training.json`):

    .venv/bin/python bench/training.py [--config configs/tiny_synth.yaml] [override ...]

The tiny recipe needs the quickstart world and tokenizer (`runs/quickstart/world`, `runs/quickstart/tokenizer`);
pass overrides such as `data.root=...` for others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/tiny_synth.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args()

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
