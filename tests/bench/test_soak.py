"""The fault soak's CI preset: faults at random moments, nothing lost."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOAK_LIMIT_SECONDS = 540


@pytest.mark.slow
@pytest.mark.timeout(SOAK_LIMIT_SECONDS + 60)
def test_ci_soak_loses_nothing() -> None:
    """Under process, Postgres, network and sink faults, no event is lost."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RUNLEDGER_", "DATABASE_URL"))
    }
    soak = subprocess.Popen(
        # The soak makes its own folder: its Postgres runs as another user,
        # who cannot enter pytest's private temporary folders.
        [sys.executable, "-m", "bench.soak", "--ci"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = soak.communicate(timeout=SOAK_LIMIT_SECONDS)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the soak stop its processes and its Postgres.
        soak.terminate()
        stdout, stderr = soak.communicate(timeout=60)
    completed = subprocess.CompletedProcess(soak.args, soak.returncode, stdout, stderr)
    report = completed.stdout + completed.stderr

    lost = re.search(r"^events lost\s+(\d+)$", completed.stdout, re.MULTILINE)
    injected = re.search(r"^total\s+(\d+)$", completed.stdout, re.MULTILINE)
    assert lost is not None, report[-4000:]
    assert injected is not None and int(injected.group(1)) > 0, report[-4000:]
    assert int(lost.group(1)) == 0, report[-4000:]
    assert completed.returncode == 0, report[-4000:]
