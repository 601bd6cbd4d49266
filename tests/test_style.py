"""The code base passes its own linters: ruff and mypy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False
    )


def test_ruff_finds_nothing() -> None:
    """ruff check reports no problem anywhere in the repository."""
    result = _run(str(BIN / "ruff"), "check", "--quiet", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_settled() -> None:
    """Every file is formatted as ruff format would write it."""
    result = _run(str(BIN / "ruff"), "format", "--check", "--quiet", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing() -> None:
    """mypy type-checks the packages without errors."""
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_unfinished_marks() -> None:
    """No unfinished-work marks are left in code: limits are named instead."""
    marks = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in ROOT.glob("[!.]*/**/*.py")
        if ".venv" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(mark in line for mark in ("TO" + "DO", "FIX" + "ME"))
    ]
    assert marks == []
