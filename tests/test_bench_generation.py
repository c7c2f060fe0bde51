"""bench/generation.py runs end to end: every mode of every round decodes, and the table compares them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROW = re.compile(r"^\s*2 (?P<mode>.+?)\s+(?P<ms>[\d.]+)\s+(?P<speed>[\d.]+)x\s+(?P<forwards>[\d.]+)\s+(?P<same>\d+)/2")


@pytest.mark.slow
def test_generation_benchmark_prints_every_mode_with_its_speed_up_and_agreement() -> None:
    command = [sys.executable, str(BENCH / "generation.py"), "--model", "tiny", "--queries", "2"]
    command += ["--batch-sizes", "2", "--window", "8", "--rounds", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [m.groupdict() for m in map(ROW.match, result.stdout.splitlines()) if m]
    assert [row["mode"] for row in rows] == ["generate", "loop", "loop, span 8"], result.stdout
    assert rows[0]["speed"] == "1.00" and rows[0]["same"] == "2"
    assert all(float(row["ms"]) > 0 for row in rows)
    assert float(rows[2]["forwards"]) < float(rows[1]["forwards"]) == 111.0  # 112 tokens, the first from the prefill
