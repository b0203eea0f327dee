"""The CLI skeleton: help, version, and the error contract (one line, exit 2, traceback only with --debug)."""

import subprocess
import sys

from click.testing import CliRunner

from distree import __version__
from distree.cli import cli


def test_help_lists_the_pipeline_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("inspect", "devices", "exits", "calibrate", "profile", "plan", "compile", "verify", "run"):
        assert command in result.output, f"`distree {command}` is not registered"


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def _distree(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distree", *args], capture_output=True, text=True, timeout=120)


def test_user_error_is_one_line_with_status_2(tmp_path):
    proc = _distree("inspect", str(tmp_path / "missing.onnx"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = _distree("--debug", "inspect", str(tmp_path / "missing.onnx"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "DistreeError" in proc.stderr
