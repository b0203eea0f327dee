"""Fixtures shared by test files: the example's data files, written once by its own script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"


@pytest.fixture(scope="session")
def example_data() -> tuple[Path, Path]:
    """(calib.npz, test.npz) of the Fashion-MNIST example; make_data.py is deterministic and atomic."""
    calib, test = EXAMPLE / "calib.npz", EXAMPLE / "test.npz"
    if not (calib.is_file() and test.is_file()):
        subprocess.run([sys.executable, str(EXAMPLE / "make_data.py")], check=True, timeout=600)
    return calib, test
