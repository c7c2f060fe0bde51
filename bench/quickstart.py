"""The quickstart's targets and stage timings on this machine.

Runs `perceptio quickstart` into --out (finished stages are reused, so a second call only prints) and prints
every target of the quickstart model with its measured figure, then the seconds each stage took:

    .venv/bin/python bench/quickstart.py [--out runs/quickstart] [override ...]

For the whole fresh-clone time, set-up included, time `make quickstart` in a new clone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    args = parser.parse_args()

    from perceptio.quickstart import TARGETS, QuickstartConfig, run_quickstart

    run_quickstart(QuickstartConfig(out=args.out, overrides=tuple(args.overrides)))
    summary = json.loads((args.out / "eval" / "summary.json").read_text())
    print(f"\n{'target':<24} {'met':<5} measured (goal)")
    for target in TARGETS:
        value, met = target.check(summary)
        print(f"{target.name:<24} {'n/a' if met is None else 'yes' if met else 'no':<5} {value} ({target.describe})")
    stages = json.loads((args.out / "stages.json").read_text())
    print(
        "\nstage seconds (the run that made each stage): "
        + ", ".join(f"{name} {record['seconds']}" for name, record in stages.items() if "seconds" in record)
    )


if __name__ == "__main__":
    main()
