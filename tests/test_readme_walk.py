"""The README's commands, run in order as a newcomer would on a fresh clone (slow tier).

Every command line of the README is either run here, in the README's order, in a folder that holds only the
repository's ``configs/`` (with sizes cut down so the walk takes minutes, each cut written below), or listed in
``ELSEWHERE`` with the reason it cannot run here. A new README command fails the test until it is one or the
other. ``tests/test_readme.py`` checks the names of every command and option without running them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perceptio.cli.main import app

from .test_readme import ROOT, _commands

#: Commands that need what this machine does not have, and where each is covered instead.
ELSEWHERE = {
    "data/refer_seg": "real RefCOCO files (the reader is tested on same-format fixtures in tests/data)",
    "path/to/": "a user's own folder (the same commands run on the synthetic world in tests/cli)",
    "my_images/": "a user's own images and a downloaded Depth Anything V2 (teachers: tests/depth_tokenizer)",
    "torchrun": "several GPUs (multi-process training on CPU: tests/train, slow tier)",
    "make test": "the test suite itself",
    "make demo": "a server that runs until stopped (tests/demo, make browser)",
    "perceptio demo": "a server that runs until stopped (tests/demo, make browser)",
}

QUICKSTART = [
    "--num-images", "40", "--tokenizer-steps", "5", "--segmenter-steps", "5", "--eval-limit", "4", "--gallery", "2",
    "--baseline-steps", "3", "run.steps=4", "run.checkpoint_every=2", "eval.every=0", "run.global_batch_size=4",
    "run.micro_batch_size=4",
]  # fmt: skip
TRAIN = ["run.steps=3", "run.checkpoint_every=2", "eval.every=0", "run.global_batch_size=4", "run.micro_batch_size=4"]

#: How each command is cut down: options replaced (``--name value``) and words added at the end.
SMALLER: dict[str, tuple[dict[str, str], list[str]]] = {
    "perceptio quickstart": ({}, QUICKSTART),
    "perceptio data synth": ({"--num-images": "40"}, []),
    "perceptio data show": ({"--n": "4"}, []),
    "perceptio tokenizer train": ({"--steps": "5"}, []),
    "perceptio tokenizer eval": ({}, ["--limit", "8"]),
    "perceptio segmenter pretrain": ({}, ["--steps", "5"]),
    "perceptio train": ({}, TRAIN),
    "perceptio pretrain": ({}, ["--num-images", "40", "--tokenizer-steps", "2", "--segmenter-steps", "2", *TRAIN]),
    "perceptio experiment grounding": (
        {"--arms": "baseline,base"},
        [
            "--levels",
            "L0",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--train-images",
            "8",
            "--val-images",
            "4",
            "--jobs",
            "1",
        ],
    ),
    "perceptio experiment spatial-cot": (
        {},
        [
            "--steps",
            "3",
            "--num-images",
            "40",
            "--eval-limit",
            "2",
            "--arms",
            "spatial,direct",
            "--tokenizer-steps",
            "5",
            "--segmenter-steps",
            "5",
            "--jobs",
            "1",
        ],
    ),  # fmt: skip
    "perceptio predict": ({}, []),
}


def _name(words: list[str]) -> str:
    """``perceptio <command> [<subcommand>]`` of a command line (``make quickstart`` runs the quickstart)."""
    if words[:2] == ["make", "quickstart"]:
        return "perceptio quickstart"
    groups = {"data", "tokenizer", "segmenter", "experiment"}
    return " ".join(words[:3] if len(words) > 2 and words[1] in groups else words[:2])


def _smaller(words: list[str]) -> list[str]:
    """The command's arguments (after ``perceptio``), cut down as ``SMALLER`` says."""
    name = _name(words)
    args = ["quickstart"] if name == "perceptio quickstart" and words[0] == "make" else words[1:]
    replace, extra = SMALLER[name]
    args = list(args)
    for option, value in replace.items():
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    return args + extra


def _walk() -> list[list[str]]:
    """The README's commands to run, in order; every other one must be in ``ELSEWHERE``."""
    walk = []
    for words in _commands():
        line = " ".join(words)
        if any(marker in line for marker in ELSEWHERE):
            continue
        assert _name(words) in SMALLER, f"README command not walked and not listed in ELSEWHERE: {line}"
        walk.append(words)
    return walk


def test_every_readme_command_is_walked_or_says_why_not() -> None:
    walked = _walk()
    assert len(walked) >= 12
    assert [w for w in walked if _name(w) == "perceptio quickstart"][0][0] == "make"  # the first thing a user runs


@pytest.mark.slow
def test_the_readme_commands_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for words in _walk():
        args = _smaller(words)
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"`perceptio {' '.join(args)}` (README: {' '.join(words)}):\n{result.output}"
    assert (tmp_path / "runs" / "tiny-perceptio" / "MODEL_CARD.md").is_file()
    assert list((tmp_path / "pred").rglob("prediction.json"))
