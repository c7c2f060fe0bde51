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

Against an earlier commit: ``--against REV`` trains the same recipe with the code of git revision ``REV``
(exported with ``git archive`` under ``runs/bench_training``, with that revision's copy of the recipe) and with
the working tree, alternately ``--rounds`` times, and prints the same table (the overrides apply to both):

    .venv/bin/python bench/training.py --against 64bb014 --steps 60 data.root=runs/quickstart/world

``--processes N`` trains the working tree's side with N processes of one thread under ``torchrun`` (DDP over gloo,
each with the global batch's 1/N as its micro batch and no data worker), the revision's side as the recipe says:
both use the whole machine. Not exact: each micro batch averages its own token losses, so the losses differ
from the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _train(
    config: Path, overrides: list[str], out: Path, steps: int, source: Path | None, processes: int = 1
) -> list[dict]:
    """Train ``steps`` steps into ``out`` (the code of ``source``'s ``src``, or the installed package; under
    ``torchrun`` with ``processes`` > 1) and return the log lines."""
    from perceptio.config import load_config
    from perceptio.train.config import TrainConfig
    from perceptio.utils.jsonl import read_jsonl

    recipe = source / config if source is not None and (source / config).is_file() else config  # its own recipe
    launcher = [sys.executable, "-m", "perceptio"]
    if processes > 1:
        batch = load_config(TrainConfig, recipe, overrides).run.global_batch_size
        if batch % processes:
            raise SystemExit(f"--processes {processes} does not divide the global batch {batch}")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launcher += ["-m", "perceptio"]
        overrides = [*overrides, f"run.micro_batch_size={batch // processes}", "run.data_workers=0", "run.threads=1"]
    command = [*launcher, "train", "--config", str(recipe), "--overwrite", *overrides]
    command += [f"run.steps={steps}", "run.log_every=1", "run.checkpoint_every=0", "eval.every=0", f"run.out_dir={out}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if source is not None:
        env["PYTHONPATH"] = str(source / "src")
    print("running:", " ".join(command), f"(code: {source or 'working tree'})", flush=True)
    subprocess.run(command, check=True, env=env)
    return read_jsonl(out / "train_log.jsonl")


def _export(revision: str) -> Path:
    """The tree of git ``revision`` under ``runs/bench_training/rev-<revision>`` (exported once)."""
    target = Path("runs/bench_training") / f"rev-{revision}"
    if not (target / "src").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", revision], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def _rate(log: list[dict]) -> float:
    done = [line for line in log if line["step"] > 5]  # the first steps hold the start-up costs
    return len(done) / sum(1 / line["samples_per_s"] for line in done)  # one line per step, one batch size


def report(logs: dict[str, list[list[dict]]], label: str) -> None:
    """Samples/s per variant (best of its rounds, and every round's), the ratio to the first, and the first 50 losses
    side by side (with the largest difference when they differ)."""
    names = list(logs)
    rates = {name: max(_rate(log) for log in runs) for name, runs in logs.items()}
    rounds = len(logs[names[0]])
    print(f"\n| {label} | samples/s (steps 6 on, best of {rounds}) | ratio | every round |")
    print("|---|---|---|---|")
    for name in names:
        every = ", ".join(f"{_rate(log):.1f}" for log in logs[name])
        print(f"| {name} | {rates[name]:.1f} | {rates[name] / rates[names[0]]:.2f}x | {every} |")
    first = [line["loss"] for line in logs[names[0]][0]][:50]
    for name in names[1:]:
        other = [line["loss"] for line in logs[name][0]][:50]
        gap = max((abs(a - b) for a, b in zip(first, other, strict=False)), default=0.0)
        same = other == first
        print(f"losses of {name} identical to {names[0]} (first {len(first)} steps): {same} (largest gap {gap:.2g})")
    print("\nstep | " + " | ".join(names))
    for k in range(min(len(first), 50)):
        print(f"{k + 1} | " + " | ".join(f"{logs[name][0][k]['loss']:.6f}" for name in names))


def compare(config: Path, key: str, values: list[str], steps: int, overrides: list[str], rounds: int) -> None:
    """Train ``steps`` steps per value of ``key`` and print speed and loss agreement."""
    logs: dict[str, list[list[dict]]] = {f"{key}={value}": [] for value in values}
    for _ in range(rounds):
        for value in values:
            out = Path("runs/bench_training") / f"{key}={value}"
            logs[f"{key}={value}"].append(_train(config, [*overrides, f"{key}={value}"], out, steps, None))
    report(logs, key)


def against(config: Path, revision: str, steps: int, overrides: list[str], rounds: int, processes: int = 1) -> None:
    """Train ``steps`` steps with the code of ``revision`` and of the working tree (in ``processes`` processes);
    print speed and losses."""
    source = _export(revision)
    tree = "working tree" + (f", {processes} processes" if processes > 1 else "")
    logs: dict[str, list[list[dict]]] = {revision: [], tree: []}
    for _ in range(rounds):
        for name, code in ((revision, source), (tree, None)):
            out = Path("runs/bench_training") / ("rev" if code else "tree")
            logs[name].append(_train(config, overrides, out, steps, code, 1 if code else processes))
    report(logs, "code")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/tiny_synth.yaml"))
    parser.add_argument("--compare", metavar="KEY", help="a recipe key to compare values of (before/after)")
    parser.add_argument("--values", default="", help="comma-separated values of --compare")
    parser.add_argument("--against", metavar="REV", help="a git revision whose code to compare with the working tree")
    parser.add_argument("--steps", type=int, default=60, help="steps per run of --compare / --against")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each variant, alternating (best one counts)")
    parser.add_argument("--processes", type=int, default=1, help="--against: the working tree under torchrun")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args()
    if args.compare:
        compare(args.config, args.compare, args.values.split(","), args.steps, args.overrides, args.rounds)
        return
    if args.against:
        against(args.config, args.against, args.steps, args.overrides, args.rounds, args.processes)
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
