"""Bundle build, manifest, verify and run on a tiny multi-exit CNN: host stage + pi4 stage (cross-compiled)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compiler_fixtures as cf
from distree.compiler.bundle import build_bundle
from distree.compiler.manifest import check_bundle_target, read_manifest, read_thresholds
from distree.compiler.verify import verify_bundle
from distree.errors import DistreeError
from distree.runtime.executor import FINAL, run_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_manifest_describes_every_segment_and_file(bundle, tiny):
    m = read_manifest(bundle)
    assert [st.name for st in m.stages] == ["host", "pi4"]
    host, pi4 = m.stages
    # host stage ends at both exits -> two sub-segments, each ending at its exit
    assert [(s.first_block, s.last_block, s.exit) for s in host.segments] == [
        (0, 3, "exit_1"), (4, 5, "exit_2")]
    assert [s.outputs[1].name for s in host.segments] == ["exit_1", "exit_2"]
    assert host.segments[1].input.name == host.segments[0].outputs[0].name
    (last,) = pi4.segments
    assert last.is_final and last.exit is None and last.outputs[0].name == tiny.chain.output_name
    for seg in (*host.segments, last):
        assert seg.backend == "tvm" and seg.file.endswith(".so") and seg.onnx_file.endswith(".onnx")
        assert seg.tvm_ms > 0 and seg.ort_ms > 0 and seg.ratio == pytest.approx(seg.tvm_ms / seg.ort_ms)
    assert all(s.expected_ms == s.tvm_ms and s.expected_from == "timed here" for s in host.segments)
    assert last.expected_ms is None     # pi4's code does not run here and no profile was given: the plan's share
    assert m.ratio_measured_on.startswith("host proxy")
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m.files) == on_disk
    table = read_thresholds(bundle)
    assert [e.name for e in table.exits] == ["exit_1", "exit_2"] and "softmax" in table.score_definition


def test_verify_runs_host_artifacts_and_checks_cross_ones(bundle):
    report = verify_bundle(bundle)
    status = {c.file: c.status for c in report.checks}
    assert status["host/s0_seg0_b0-3.so"] == "ran"
    assert status["pi4/s1_seg0_b6-10.so"] == "checked"
    assert all(v == "ran" for k, v in status.items() if k.endswith(".onnx"))


def test_run_matches_onnxruntime_on_the_multi_exit_model(bundle, tiny):
    data = cf.dataset(60, seed=7)
    report = run_bundle(bundle, data)
    thresholds = {e.name: e.threshold for e in read_thresholds(bundle).exits}
    want_preds, want_exits = cf.ort_reference(tiny, data.x, thresholds)
    assert list(report.predictions) == list(want_preds)
    assert list(report.exits) == want_exits
    assert len(set(want_exits)) == 3                    # samples leave at both exits and at the end
    assert report.accuracy == pytest.approx(float((want_preds == data.y).mean()))
    assert sum(report.exit_rates.values()) == pytest.approx(1.0)
    # the pi4 library cannot load on x86: its ONNX ran instead, and the report says so
    assert len(report.substitutions) == 1 and "pi4" in report.substitutions[0]
    assert not report.predicted_here             # planned for a pi4 too: its latency is not comparable here
    assert {s.backend for s in report.segments if s.device == "host"} == {"tvm"}
    assert report.stages[0].reached == 60 and report.stages[1].reached == want_exits.count(FINAL)


def test_deadline_answers_from_the_first_exit(bundle):
    data = cf.dataset(20, seed=3)
    free = run_bundle(bundle, data)
    rushed = run_bundle(bundle, data, deadline_ms=0.0)   # nothing can finish in time: leave at once
    assert set(rushed.exits) == {"exit_1"}
    assert rushed.deadline_exits == sum(e != "exit_1" for e in free.exits) > 0


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distree", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def test_tampered_file_is_refused_naming_it(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    victim = copy / "pi4" / "s1_seg0_b6-10.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DistreeError, match="s1_seg0_b6-10.onnx: SHA-256 does not match"):
        verify_bundle(copy)
    proc = _cli("verify", str(copy))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "s1_seg0_b6-10.onnx" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_and_extra_files_are_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    (copy / "host" / "s0_seg1_b4-5.so").unlink()
    with pytest.raises(DistreeError, match="s0_seg1_b4-5.so: listed in the manifest but missing"):
        verify_bundle(copy)
    copy2 = _copy(bundle, tmp_path / "2")
    (copy2 / "pi4" / "notes.txt").write_text("x")
    with pytest.raises(DistreeError, match="notes.txt: not part of the bundle"):
        verify_bundle(copy2)


def test_bundle_from_another_version_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["distree_version"] = "0.0.9"
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DistreeError, match="made by distree 0.0.9 .*rebuild it with this version"):
        verify_bundle(copy)
    with pytest.raises(DistreeError, match="made by distree 0.0.9"):
        run_bundle(copy, cf.dataset(2, seed=0))


def test_interrupted_build_leaves_no_partial_bundle(tiny, tmp_path):
    plan, topology = cf.two_stage_plan(tiny)
    out = tmp_path / "bundle"

    def interrupt(msg: str) -> None:
        if msg.startswith("[2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, out, backend="ort", log=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_plan_for_another_model_is_refused(tiny, tmp_path):
    plan, topology = cf.two_stage_plan(tiny)
    wrong = type(plan).from_dict({**plan.to_dict(), "model_sha256": "0" * 64})
    with pytest.raises(DistreeError, match="plan was made for model 000000000000"):
        build_bundle(tiny.model, tiny.chain, wrong, topology, tiny.calibration, tmp_path / "b")
    short = type(plan).from_dict({**plan.to_dict(), "stages": [plan.stages[0].to_dict()]})
    with pytest.raises(DistreeError, match="the plan covers blocks 0..5 but the model has 11 blocks"):
        build_bundle(tiny.model, tiny.chain, short, topology, tiny.calibration, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_folder_that_is_not_a_bundle_is_never_replaced(tiny, tmp_path):
    """A bundle replaces its -o folder entirely, so a folder with other files in it is refused, untouched."""
    plan, topology = cf.two_stage_plan(tiny)
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(DistreeError, match="holds files but no distree bundle"):
        build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, mine, backend="ort")
    (mine / "manifest.json").write_text("{not json")
    with pytest.raises(DistreeError, match="holds files but no distree bundle"):
        build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, mine, backend="ort")
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "notes.txt"]
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new"):
        check_bundle_target(target)                     # new or empty: fine
    (mine / "manifest.json").write_text(json.dumps({"kind": "Manifest"}))
    check_bundle_target(mine)                           # an earlier bundle: replaced


def test_unknown_device_exits_2(tiny, tmp_path):
    np.savez(tmp_path / "calib.npz", x=tiny.data.x, y=tiny.data.y)
    proc = _cli("compile", str(tiny.path), "--devices", "pi4,pi9", "--data", str(tmp_path / "calib.npz"),
                "-o", str(tmp_path / "b"))
    assert proc.returncode == 2 and "unknown device 'pi9'" in proc.stderr and "pi4" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_bad_solver_flags_fail_before_any_work(tmp_path):
    """Checked before the model is even read (here it does not exist), not after minutes of profiling."""
    for flag, value in (("--accuracy-drop", "1.5"), ("--time-limit", "0"), ("--confidence", "0.2")):
        proc = _cli("compile", str(tmp_path / "missing.onnx"), "--devices", "pi4", "--data",
                    str(tmp_path / "missing.npz"), "-o", str(tmp_path / "b"), flag, value)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {flag} "), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_missing_cross_compiler_exits_2_naming_the_package(tiny, tmp_path):
    np.savez(tmp_path / "calib.npz", x=tiny.data.x, y=tiny.data.y)
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = {**os.environ, "PATH": str(empty_path)}
    proc = _cli("compile", str(tiny.path), "--devices", "host,pi4", "--data", str(tmp_path / "calib.npz"),
                "-o", str(tmp_path / "b"), env=env)
    assert proc.returncode == 2, proc.stderr
    assert "aarch64-linux-gnu-gcc" in proc.stderr and "gcc-aarch64-linux-gnu" in proc.stderr
    assert not (tmp_path / "b").exists()
