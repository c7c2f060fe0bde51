"""The command line asks OpenMP for passive waiting before torch loads it (bench/under_load.py: idle threads that
spin make a stage 3x slower beside another busy process), and leaves a user's own setting alone."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import sys, os; import perceptio.cli.main; print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_passive_waiting_is_set_before_torch_loads() -> None:
    assert _probe() == "False PASSIVE"  # torch not loaded yet: the setting takes effect


def test_a_users_wait_policy_wins() -> None:
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "False ACTIVE"
