"""The fingerprint of a pretrained base in the settings digests: its checksums, so a retrained base retrains
what starts from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from perceptio.pipeline import base_fingerprint


def test_a_base_is_identified_by_its_checksums_or_else_its_path(tmp_path: Path) -> None:
    assert base_fingerprint(None) is None
    with pytest.raises(FileNotFoundError, match="has no config.json; make one with `perceptio pretrain`"):
        base_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert base_fingerprint(tmp_path) == str(tmp_path.resolve())
    (tmp_path / "SHA256SUMS").write_text("abc  model.safetensors\n")
    assert base_fingerprint(tmp_path) == "abc  model.safetensors\n"
    (tmp_path / "SHA256SUMS").write_text("def  model.safetensors\n")  # retrained in the same folder
    assert base_fingerprint(tmp_path) == "def  model.safetensors\n"
