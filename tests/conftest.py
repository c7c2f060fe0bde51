"""Shared fixtures. The synthetic world is generated once per test session (about a second for 40 images)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic world (40 images, seed 0, 128 px) shared by the tests that only read it."""
    from perceptio.data.synthetic import generate_world

    out = tmp_path_factory.mktemp("world") / "world"
    generate_world(out, num_images=40, seed=0, progress=False)
    return out
