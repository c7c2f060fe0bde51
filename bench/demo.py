"""The web demo's latency per request: the page's own request handler (`DemoModel.answer`, no browser, no Gradio)
on its examples, with the spatial chain of thought on and off.

Prints, per example and setting, the median over ``--repeats`` of the generation, mask-and-depth decoding and
whole-request milliseconds (the request adds reading the image and drawing the overlay, depth view, sequence and
code grid), after one warm-up request:

    .venv/bin/python bench/demo.py [--model tiny-perceptio] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-perceptio", help="a model folder or a shipped model's name")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from perceptio.demo.app import DemoModel, world_examples
    from perceptio.inference import Perceptio

    model = Perceptio.from_pretrained(args.model, device="cpu")
    with tempfile.TemporaryDirectory(prefix="perceptio-bench-demo-") as folder:
        demo = DemoModel(model, world_examples(Path(folder)))
        first = demo.examples[0]
        demo.answer(str(first.image), first.prompt, True, True)  # warm-up
        print(f"model {args.model}, {args.threads} threads, median of {args.repeats} requests each\n")
        print("| example | spatial CoT | generation ms | masks + depth ms | request ms |")
        print("|---|---|---|---|---|")
        requests = []
        for example in demo.examples:
            for spatial in (True, False):
                figures = []
                for _ in range(args.repeats):
                    latency = demo.answer(str(example.image), example.prompt, spatial, True)["latency"]
                    figures.append([float(x) for x in re.findall(r"(\d+) ms", latency)])
                generation, decoding, request = (statistics.median(column) for column in zip(*figures, strict=True))
                requests.append(request)
                prompt = example.prompt if len(example.prompt) <= 48 else example.prompt[:45] + "..."
                setting = "on" if spatial else "off"
                print(f"| {prompt} | {setting} | {generation:.0f} | {decoding:.0f} | {request:.0f} |")
        print(f"\nmedian request over every example and setting: {statistics.median(requests):.0f} ms")


if __name__ == "__main__":
    main()
