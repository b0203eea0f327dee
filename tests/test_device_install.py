"""A device installs `distree` without the build machine's extra (`distree[compile]`: SciPy, PuLP, HiGHS,
matplotlib, tuning's packages): every command a device runs still works, the others refuse in one line.

Each command runs in its own Python whose start-up (tests/device_only/sitecustomize.py) makes those packages
unimportable, as on such a device; the served pipeline is two real stage processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compiler_fixtures as cf
from distree.runtime.executor import run_bundle
from distree.runtime.local import StageProcess

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fashion_mnist"
DEVICE_ONLY = Path(__file__).resolve().parent / "device_only"


def _device_env() -> dict[str, str]:
    paths = [str(DEVICE_ONLY), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _on_device(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distree", *args], env=_device_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


DATA = cf.dataset(40, seed=7)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("device") / "x.npz"
    np.savez(path, x=DATA.x, y=DATA.y)
    return path


@pytest.fixture(scope="module")
def answers_here(tiny_bundle):
    """The bundle run in this process (every package installed): what the device must answer."""
    here = run_bundle(tiny_bundle, DATA)
    return [int(p) for p in here.predictions], list(here.exits)


def test_the_build_packages_are_really_missing_there():
    probe = subprocess.run([sys.executable, "-c", "import scipy"], env=_device_env(), capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'scipy'" in probe.stderr


def test_verify_run_and_bench_work_without_the_build_packages(tiny_bundle, inputs, answers_here, tmp_path):
    verify = _on_device("verify", str(tiny_bundle))
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr[-2000:]
    run = _on_device("run", str(tiny_bundle), "--input", str(inputs), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert (report["predictions"], report["exits"]) == answers_here
    bench = _on_device("bench", str(tiny_bundle), "--repeats", "5", "--warmup", "1", "--out", str(tmp_path / "b.json"))
    assert bench.returncode == 0 and (tmp_path / "b.json").is_file(), bench.stderr[-2000:]
    devices = _on_device("devices")
    assert devices.returncode == 0 and "pi4" in devices.stdout, devices.stderr[-2000:]


def test_a_pipeline_served_without_the_build_packages_answers_like_run(tiny_bundle, inputs, answers_here,
                                                                       monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", _device_env()["PYTHONPATH"])       # the stage processes inherit it
    pi4 = StageProcess(tiny_bundle, "pi4", start_timeout_s=120, cwd=REPO)
    host = StageProcess(tiny_bundle, "host", next_address=pi4.address, start_timeout_s=120, cwd=REPO)
    try:
        infer = _on_device("infer", host.address, "--input", str(inputs), "--json", str(tmp_path / "infer.json"))
    finally:
        host.stop()
        pi4.stop()
    assert infer.returncode == 0, infer.stderr[-2000:]
    report = json.loads((tmp_path / "infer.json").read_text())
    assert (report["predictions"], report["exits"]) == answers_here


@pytest.mark.slow
def test_a_device_profiles_itself_without_the_build_packages(tiny, tmp_path):
    out = tmp_path / "host.json"
    profiled = _on_device("profile", str(tiny.path), "--device", "host", "--item", "block:0", "--item",
                          "exit:exit_1", "-o", str(out), timeout=600)
    assert profiled.returncode == 0, profiled.stderr[-2000:]
    items = {(e["item"], e["backend"]) for e in json.loads(out.read_text())["entries"]}
    assert {("block:0", "tvm"), ("block:0", "ort"), ("exit:exit_1", "tvm")} <= items


@pytest.mark.parametrize("command, missing", [
    (["plan", "--chain", "c.json", "--calibration", "k.json", "--profile", "p.json", "--devices", "host"], "numba"),
    (["compile", "{model}", "--devices", "host", "--data", "{calib}", "-o", "{out}"], None),
    (["exits", "{plain}", "--data", "{calib}", "-o", "{out}/e.onnx"], "scipy"),     # training heads
])
def test_build_commands_say_which_extra_to_install(command, missing, tiny, example_data, tmp_path):
    paths = {"model": tiny.path, "plain": EXAMPLE / "resnet_plain.onnx", "calib": example_data[0],
             "out": tmp_path / "out"}
    refused = _on_device(*[a.format(**paths) for a in command])
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and refused.stderr.strip().endswith(errors[0]), refused.stderr[-2000:]
    assert errors[0].startswith(f"error: `distree {command[0]}` needs the Python package")
    assert "pip install 'distree[compile]'" in errors[0] and (missing is None or f"'{missing}'" in errors[0])
    assert not (tmp_path / "out").exists()


def test_listing_the_commands_names_the_extra_the_missing_ones_need():
    listed = _on_device("--help")
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.startswith("  ")}
    assert "needs distree[compile]" in rows["plan"] and "needs distree[compile]" not in rows["serve"]


def test_serving_imports_neither_the_solver_nor_onnx_nor_tvm_up_front(tiny_bundle):
    """What makes a device's stage start in a fraction of a second: opening a bundle and loading the server
    imports none of them (a stage that runs TVM code imports TVM when it loads it)."""
    probe = ("import sys; from distree.runtime.server import serve_stage; from distree.compiler.manifest import "
             f"read_manifest; read_manifest({str(tiny_bundle)!r}); "
             "print(sorted(m for m in ('onnx', 'scipy', 'pulp', 'tvm', 'torch', 'distree.solver.solve') "
             "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_a_device_installs_holds_every_file_of_the_package(tmp_path):
    """Devices install a built wheel (or `pip install .`), not an editable checkout: every file distree reads
    at run time must be in it (estimate_calibration.json once was not)."""
    import shutil
    import zipfile

    source = tmp_path / "src"         # a clean copy: a checkout's own build leftovers (egg-info) can hide a gap
    shutil.copytree(REPO / "distree", source / "distree", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("distree-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package_files = {str(p.relative_to(REPO)) for p in (REPO / "distree").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
    assert "distree/profiler/estimate_calibration.json" in package_files and package_files - shipped == set()
