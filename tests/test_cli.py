"""The CLI skeleton: help, version, and the error contract (one line, exit 2, traceback only with --debug)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from distree import __version__
from distree.cli import cli
from distree.errors import DistreeError


def test_help_lists_the_pipeline_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("inspect", "devices", "exits", "calibrate", "profile", "plan", "compile", "verify", "run"):
        assert command in result.output, f"`distree {command}` is not registered"


def test_listing_commands_and_planning_load_no_model_compiler():
    """`distree --help`, `plan` and `simulate` work on JSON files: loading ONNX, TVM, SciPy or torch for them cost
    seconds per call (the listing 2.35 -> 0.66 s, `simulate bundle/` 7.5 -> 0.75 s on a 2-core VM). The solver's
    numba (0.16 s) imports SciPy's bare package (10 ms), not the parts distree uses (``scipy.stats``, 1 s). Nor
    does the listing load numba: `distree plan` imports the solver when it runs (the listing 1.2 -> 0.28 s)."""
    probe = ("import sys; from importlib import import_module; "
             "import distree.sim.simulate, distree.sim.commands; sim = 'numba' in sys.modules; "
             "from distree.cli import COMMANDS; [import_module(v.split(':')[0]) for v in COMMANDS.values()]; "
             "listing = 'numba' in sys.modules; import distree.solver.solve, distree.solver.commands; "
             "print(sim, listing, sorted(m for m in ('onnx', 'tvm', 'scipy.stats', 'scipy.optimize', 'torch', 'onnxruntime', "
             "'matplotlib') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "False False []"         # simulating does not even load numba


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


def _output_options(out: str, missing: str) -> list[list[str]]:
    """Every command line that writes a file, writing it to ``out`` (its inputs ``missing``)."""
    return [["inspect", missing, "--json", out],
            ["plan", "--chain", missing, "--calibration", missing, "--profile", missing, "-o", out],
            ["plan", "--chain", missing, "--calibration", missing, "--profile", missing, "--dump-lp", out],
            ["plan", "--chain", missing, "--calibration", missing, "--profile", missing, "--plot", out],
            ["profile", missing, "--device", "pi4", "-o", out],
            ["calibrate", missing, "--data", missing, "-o", out],
            ["calibrate", missing, "--data", missing, "--plot", out],
            ["exits", missing, "--data", missing, "-o", out],
            ["run", missing, "--input", missing, "-o", out],
            ["infer", "127.0.0.1:1", "--input", missing, "--json", out],
            ["simulate", missing, "-o", out],
            ["simulate", missing, "--plot", out],
            ["bench", missing, "--out", out]]


def test_a_directory_given_as_an_output_file_is_refused_up_front(tmp_path):
    """Before any work (plan -o DIR used to solve for a minute, then fail with a traceback)."""
    for argv in _output_options(str(tmp_path), str(tmp_path / "missing")):
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "is a directory" in result.output and "Traceback" not in result.output, (argv, result.output)


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """compile -o under a file, or where nothing can be created, used to compute for minutes and then die in
    mkdtemp with a traceback; the same for every other output."""
    (tmp_path / "notes.txt").write_text("")
    missing = str(tmp_path / "missing")
    for out, why in ((str(tmp_path / "notes.txt" / "sub" / "out"), "notes.txt is a file, not a directory"),
                     ("/proc/distree-out", "cannot create a file in /proc")):
        compile_argv = ["compile", missing, "--devices", "pi4", "--data", missing, "-o", out]
        caches = [["compile", missing, "--devices", "pi4", "--data", missing, "-o", str(tmp_path / "bundle"),
                   "--cache-dir", out],
                  ["profile", missing, "--device", "pi4", "-o", str(tmp_path / "p.json"), "--cache-dir", out]]
        for argv in [compile_argv, *caches, *_output_options(out, missing)]:
            result = CliRunner().invoke(cli, argv)
            assert result.exit_code == 2, (argv, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], (argv, result.output)
    result = CliRunner().invoke(cli, ["compile", missing, "--devices", "pi4", "--data", missing,
                                      "-o", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and "notes.txt is a file; give a directory path" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]      # the probes leave nothing


def test_json_to_standard_output_needs_no_writable_directory(tmp_path, monkeypatch):
    (tmp_path / "empty.onnx").write_bytes(b"")
    monkeypatch.chdir("/proc")          # nothing can be created here
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "empty.onnx"), "--json", "-"])
    assert result.exit_code == 2 and "not an ONNX model" in result.output, result.output    # past the options


def test_a_write_the_file_system_refuses_is_one_line_and_leaves_nothing(tmp_path):
    from distree.serde import atomic_directory, write_json_atomic

    (tmp_path / "notes.txt").write_text("")
    for target in (tmp_path / "notes.txt" / "x.json", Path("/proc/distree-out.json")):
        with pytest.raises(DistreeError, match=f"cannot write {target}: .*; give a path in a directory you can"):
            write_json_atomic(target, {"a": 1})
    with pytest.raises(DistreeError, match="cannot write /proc/distree-bundle: "):
        with atomic_directory("/proc/distree-bundle"):
            raise AssertionError("no directory can be made there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_atomic_writer_refuses_a_directory(tmp_path):
    from distree.errors import DistreeError
    from distree.serde import write_json_atomic
    try:
        write_json_atomic(tmp_path, {"a": 1})
    except DistreeError as exc:
        assert "is a directory" in str(exc)
    else:
        raise AssertionError("a directory was accepted as a file to write")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["infer", "--rate", "nan", "127.0.0.1:1", "--input", "x.npz"],
    ["infer", "--timeout-s", "inf", "127.0.0.1:1", "--input", "x.npz"],
    ["serve", "--forward-timeout-s", "nan", "bundle", "--device", "pi4"],
    ["bench", "--min-delta-ms", "nan", "bundle"],
    ["profile", "--min-repeat-ms", "inf", "model.onnx", "--device", "host"],
    ["plan", "--deadline-ms", "inf", "--chain", "c.json"],
    ["compile", "--time-limit", "nan", "model.onnx"],
], ids=lambda args: " ".join(args[:3]))
def test_a_number_that_is_not_finite_is_refused_before_any_work(args):
    """click's FloatRange lets nan and inf through (nan compares false to every bound): a nan rate was a
    traceback, a nan --min-delta-ms a bench that could never fail, a nan forward timeout a server that started."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"{args[2]!r} is not a finite number" in result.output and result.exception.__class__ is SystemExit


def test_a_load_or_client_timeout_that_is_not_finite_is_refused_by_the_api():
    from distree.runtime.client import InferenceClient
    from distree.workload import Load

    for rate in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match="finite number of requests/s"):
            Load(rate=rate)
    with pytest.raises(DistreeError, match="--timeout-s must be a finite number of seconds"):
        InferenceClient("127.0.0.1:1", timeout_s=math.nan)
