"""bench/gpu.py runs end to end on a CPU at the tiny size, and builds the paper-size model it measures on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_benchmark_runs_on_a_cpu_at_the_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(BENCH / "gpu.py"), "--size", "tiny", "--device", "cpu", "--dtype", "float32"]
    command += ["--batch-size", "2", "--steps", "1", "--queries", "2", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MFU" in result.stdout and "floor ms/forward" in result.stdout
    figures = json.loads(out.read_text())
    assert [r["activation_checkpointing"] for r in figures["training"]] == [False, True]
    for row in figures["training"]:
        assert row["seconds_per_step"] > 0 and row["tokens_per_step"] > 0 and row["counted_tflops_per_step"] > 0
        assert row["mfu"] is None  # a CPU has no listed peak
    modes = [(r["batch_size"], r["mode"]) for r in figures["generation"]]
    assert modes == [(b, m) for b in (1, 2) for m in ("generate", "loop", "loop, span 16")]
    assert all(r["differ_clearly"] == 0 and r["ms_per_query"] > 0 for r in figures["generation"])
    span = [r for r in figures["generation"] if r["mode"] == "loop, span 16"]
    assert all(r["forwards_per_query"] < 75 for r in span)  # 64 codes + 12 tokens, fewer forwards in parallel


@pytest.mark.slow
def test_the_internvl3_1b_size_builds_and_computes_every_loss_term() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    model, processor, recipe = gpu.build("internvl3-1b", torch.device("cpu"), torch.float32)
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.1e9 and recipe.is_file()
    assert model.config.vocab.span_length == 100
    batch = gpu.training_batch(model, processor, 1, torch.device("cpu"))
    assert batch["pixel_values"].shape[-1] == 448 and batch["sam_pixel_values"].shape[-1] == 1024
    with torch.no_grad():
        output = model(**batch)
    assert all(torch.isfinite(v) for v in output.loss_terms.values())
    assert float(output.loss_terms["mask_bce"]) > 0  # the mask path ran on the target mask
