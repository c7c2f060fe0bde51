"""Recipe mistakes are refused before a run writes anything, in one line with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from perceptio.cli.main import app

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_synth.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.global_batch_size=10", "run.global_batch_size 10 is not a multiple of run.micro_batch_size 4"),
        ("run.threads=-2", "run.threads must be at least 1"),
    ],
)
def test_bad_run_settings_fail_before_any_file(world_dir: Path, tmp_path: Path, override: str, message: str) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", str(TINY), f"data.root={world_dir}", f"run.out_dir={out}", "run.micro_batch_size=4"]
    result = CliRunner().invoke(app, [*args, override])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()  # nothing written that would block the corrected run
