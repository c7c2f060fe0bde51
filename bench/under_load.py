"""How the quickstart's stages slow down when another process keeps one core busy, under each thread setting.

Each case runs the same steps in a fresh process, alone and then beside a competing busy-loop process, and prints
steps/s and the slowdown. Stages (``--stage``):

- ``train``: tiny-preset training steps on batches of the synthetic world's referring expressions;
- ``tokenizer``: depth-tokenizer (tiny VQ-VAE) training steps on the world's depth maps;
- ``eval``: the shipped tiny-perceptio answering batches of referring prompts (the decode loop), a step = a batch.

    .venv/bin/python bench/under_load.py [--stage train|tokenizer|eval] [--steps 30] [--batch 8]
        [--world runs/quickstart/world]

Cases: 2 threads (torch's default on 2 cores), 2 threads with OpenMP's passive waiting (``OMP_WAIT_POLICY=PASSIVE``:
idle threads sleep instead of spinning), and 1 thread. Side by side in one run, since these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "2 threads": {"threads": "2", "env": {}},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"threads": "2", "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "1 thread": {"threads": "1", "env": {}},
}

WORKER = r"""
import json, sys, time
import numpy as np, torch
from pathlib import Path
torch.set_num_threads(int(sys.argv[1]))
stage, world, steps, size = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from perceptio.train.config import DataConfig, DatasetConfig
from perceptio.train.data import TrainingData, collate
rng = np.random.default_rng(0)
if stage == "train":
    from perceptio.models.build import build_preset
    model, processor = build_preset("tiny", seed=0)
    spec = DatasetConfig(format="refcoco", path=world, split="train", image_root=world / "images", limit=64)
    data = TrainingData.from_config(DataConfig(datasets={"r": spec}, spatial_cot=False, seg_depth_span=False),
                                    model.depth_tokenizer, progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    def step():
        batch = collate([data.example("r", int(i), rng) for i in rng.integers(0, 64, size)], processor)
        loss = model(**batch).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
elif stage == "tokenizer":
    from perceptio.data.readers import read_depth_folder
    from perceptio.tokenizers.depth import DepthTokenizer
    from perceptio.tokenizers.depth.teachers import GroundTruthTeacher, teacher_maps
    tokenizer = DepthTokenizer.from_preset("tiny")
    samples = read_depth_folder(world / "depth" / "train", image_dir=world / "images")[:64]
    maps, _ = teacher_maps(samples, GroundTruthTeacher(), size=tokenizer.config.input_size, progress=False)
    depth = torch.from_numpy(np.stack([m.depth for m in maps])).float()
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-3)
    def step():
        out = tokenizer(depth[torch.from_numpy(rng.integers(0, len(depth), size))])
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()
else:
    from PIL import Image
    from perceptio import Perceptio
    from perceptio.data.readers import read_refer
    model = Perceptio.from_pretrained("tiny-perceptio", device="cpu")
    samples = read_refer(world, "refcoco", split="val", image_root=world / "images")[:64]
    def step():
        chosen = [samples[int(i)] for i in rng.integers(0, len(samples), size)]
        model.predict([s.image.load() for s in chosen], [f"Please segment {s.query} in this image." for s in chosen],
                      batch_size=size)
for _ in range(3):
    step()
began = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - began)}))
"""


def _busy() -> None:  # a competing process that keeps one core busy
    while True:
        pass


def _run(case: dict, stage: str, world: Path, steps: int, batch: int) -> float:
    env = {**os.environ, **case["env"], "OMP_NUM_THREADS": case["threads"], "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, case["threads"], stage, str(world), str(steps), str(batch)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("train", "tokenizer", "eval"), default="train")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--world", type=Path, default=Path("runs/quickstart/world"))
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if not (args.world / "refcoco").is_dir():
        sys.exit(f"{args.world}: no synthetic world; make one with `perceptio data synth --out {args.world}`")
    print(f"{os.cpu_count()} cores; stage {args.stage}, {args.steps} steps of batch {args.batch} per case")
    print("| case | alone (steps/s) | beside a busy process (steps/s) | slowdown |")
    print("|---|---|---|---|")
    for name, case in CASES.items():
        alone = _run(case, args.stage, args.world, args.steps, args.batch)
        busy = multiprocessing.Process(target=_busy, daemon=True)
        busy.start()
        time.sleep(0.5)
        try:
            loaded = _run(case, args.stage, args.world, args.steps, args.batch)
        finally:
            busy.terminate()
            busy.join()
        print(f"| {name} | {alone:.2f} | {loaded:.2f} | {alone / loaded:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
