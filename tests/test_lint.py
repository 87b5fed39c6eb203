"""The code passes ruff (pyproject.toml's [tool.ruff]), so that `python -m pytest`, the README's test
command and CI's, also checks style: pyflakes' errors, pycodestyle's, import order."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    try:
        from ruff import find_ruff_bin
    except ImportError:
        pytest.skip("ruff is not installed: pip install -e '.[test]' installs it")
    out = subprocess.run([find_ruff_bin(), "check", "--no-cache", "sharp_cli", "scripts", "tests"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
