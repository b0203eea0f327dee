"""Fixtures shared by test files: the example's data files, the tiny multi-exit CNN and its compiled bundle, and
SIGINT handled as Python sets it (the Ctrl-C tests)."""

from __future__ import annotations

import signal
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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny multi-exit CNN of compiler_fixtures (model, chain, calibration), built once per run."""
    import compiler_fixtures as cf

    return cf.tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny, tmp_path_factory) -> Path:
    """Its two-stage bundle: the host stage ships TVM (so TVM code runs in tests), pi4 an aarch64 library.
    Shared: tests that change files work on a copy."""
    import compiler_fixtures as cf
    from distree.compiler.bundle import build_bundle

    plan, topology = cf.two_stage_plan(tiny)
    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    return build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, out, backend="tvm")


@pytest.fixture
def python_handles_sigint():
    """SIGINT as Python sets it at start: where pytest runs as a background job, SIGINT is ignored and distree
    rightly leaves it so (``distree.interrupt``); the in-process Ctrl-C tests need it on."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)

