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
        ("run.feature_cache_mb=-1", "run.feature_cache_mb must be >= 0 (0: no cache), got -1"),
        ("model.preset=huge", "model.preset 'huge' is not a preset; the presets are ['smol', 'tiny']"),
    ],
)
def test_bad_run_settings_fail_before_any_file(world_dir: Path, tmp_path: Path, override: str, message: str) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", str(TINY), f"data.root={world_dir}", f"run.out_dir={out}", "run.micro_batch_size=4"]
    result = CliRunner().invoke(app, [*args, override])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()  # nothing written that would block the corrected run


def test_file_system_errors_are_one_line_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that cannot be written (permissions, a full or read-only disk, a file in the way) is the user's to
    fix: the console script prints one line and exits 2; other errors keep their traceback."""
    import errno
    import subprocess
    import sys

    import perceptio.cli.main as cli

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run = subprocess.run(
        [sys.executable, "-m", "perceptio", "data", "synth", "--out", str(blocker / "world"), "--num-images", "2"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"error: cannot use {blocker / 'world'}" in run.stderr

    def denied(**_: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/out")

    monkeypatch.setattr(cli, "app", denied)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2

    def broken(**_: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(OSError, match="Input/output"):
        cli.main()


def test_every_expected_failure_is_a_user_error_the_script_prints_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import perceptio.cli.main as cli
    from perceptio.config import ConfigError
    from perceptio.data.errors import DataError
    from perceptio.errors import UserError
    from perceptio.eval.harness import IncompleteEvaluationError
    from perceptio.models.modeling_perceptio import WeightsMismatchError
    from perceptio.train.loop import NonFiniteLossError
    from perceptio.utils.runlock import RunFolderLockedError
    from perceptio.utils.weights_files import CorruptWeightsError

    for kind in (ConfigError, DataError, IncompleteEvaluationError, WeightsMismatchError, NonFiniteLossError,
                 RunFolderLockedError, CorruptWeightsError):  # fmt: skip
        assert issubclass(kind, UserError), kind

    def fails(**_: object) -> None:
        raise DataError("image cannot be decoded", path="a.png", fix="re-encode it")

    monkeypatch.setattr(cli, "app", fails)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: a.png: image cannot be decoded. Fix: re-encode it"


def test_a_recipe_whose_folders_do_not_exist_says_how_to_make_them(tmp_path: Path) -> None:
    """configs/tiny_synth.yaml names the quickstart's world and tokenizer; without them the run stops at once,
    before building the model, with the command that makes each one."""
    missing = tmp_path / "no_world"
    args = ["train", "--config", str(TINY), f"data.root={missing}", f"run.out_dir={tmp_path / 'run'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"perceptio data synth --out {missing}" in result.output
    assert not (tmp_path / "run").exists()


def test_version_flag() -> None:
    from perceptio import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == __version__
