"""`distree compile` end to end on a tiny multi-exit CNN: every real stage (graph, exits, calibration,
profiler, HiGHS solver, TVM/ORT build), its cache, then `distree verify` and `distree run` on the bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compiler_fixtures as cf

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distree", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=900)


@pytest.mark.slow
def test_compile_verify_run(tmp_path):
    tiny = cf.tiny_model(tmp_path)
    np.savez(tmp_path / "calib.npz", x=tiny.data.x, y=tiny.data.y)
    test = cf.dataset(40, seed=11)
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    args = ["compile", str(tiny.path), "--devices", "host,pi4", "--data", str(tmp_path / "calib.npz"),
            "-o", str(tmp_path / "bundle"), "--cache-dir", str(tmp_path / "cache"), "--accuracy-drop", "0.05",
            "--json"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)          # stdout holds only the JSON summary
    assert summary["cached_stages"] == []
    assert summary["accuracy"] >= summary["full_model_accuracy"] - 0.05 - 1e-9
    for stage in summary["stages"]:
        for seg in stage["segments"]:
            assert seg["backend"] in ("tvm", "ort") and seg["reason"]
            assert seg["ratio"] > 0
    assert set(summary["sizes"]) == {s["device"] for s in summary["stages"]}
    solver = summary["solver"]
    assert solver["bound_ms"] <= summary["expected_latency_ms"] * (1 + 1e-9)
    assert solver["gap"] <= 1e-6 if solver["status"] == "optimal" else solver["gap"] > 0
    # a device the plan leaves idle: what the plan's exits cost placed through it (never less than an optimum)
    assert set(summary["unused_device_ms"]) == set(summary["unused_devices"])
    for ms in summary["unused_device_ms"].values():
        assert ms is None or solver["status"] != "optimal" or ms >= summary["expected_latency_ms"] * (1 - 1e-9)

    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    cached = json.loads(again.stdout)["cached_stages"]
    assert cached == ["exits", "calibrate", "profile", "plan"]

    verify = _cli("verify", str(tmp_path / "bundle"))
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr
    run = _cli("run", str(tmp_path / "bundle"), "--input", str(tmp_path / "test.npz"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["samples"] == 40 and len(report["exits"]) == 40
    assert report["predicted_ms"] == pytest.approx(summary["expected_latency_ms"])
    one_stage_here = [s["device"] for s in summary["stages"]] == ["host"]
    assert report["predicted_here"] == one_stage_here
    assert report["accuracy"] == pytest.approx(float((np.asarray(report["predictions"]) == test.y).mean()))


def test_cache_keys_follow_distree_source(tmp_path):
    """A stage cached by one version of distree is not served to another: the keys include its source."""
    from distree.fingerprint import code_fingerprint, source_fingerprint
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    before = source_fingerprint(tmp_path / "pkg")
    assert source_fingerprint(tmp_path / "pkg") == before                       # stable
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    edited = source_fingerprint(tmp_path / "pkg")
    assert edited != before
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "b.py")    # same bytes, another module
    assert source_fingerprint(tmp_path / "pkg") not in (before, edited)
    assert code_fingerprint() == source_fingerprint(REPO / "distree")


def test_an_op_tvm_cannot_import_is_named_up_front_and_ort_builds_without_tvm(tmp_path):
    """TVM's ONNX importer lacks some ops ONNX Runtime runs (Celu, LSTM, QLinearConv, ...): `compile` names them
    in one line before any work, and `--backend ort` builds, profiles and estimates without importing into TVM."""
    import onnx
    from tvm.error import OpNotImplemented
    from tvm.relax.frontend.onnx import from_onnx

    from distree.graph import load_model
    from distree.targets.toolchain import tvm_unsupported_ops

    tiny = cf.tiny_model(tmp_path)
    model = onnx.load(tiny.path)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Celu"
    path = tmp_path / "celu.onnx"
    onnx.save(model, path)
    assert tvm_unsupported_ops(load_model(path)) == {"Celu": [relu.name]}
    with pytest.raises(OpNotImplemented, match="Celu"):                 # TVM's own verdict agrees
        from_onnx(load_model(path))
    assert tvm_unsupported_ops(load_model(tiny.path)) == {}
    np.savez(tmp_path / "calib.npz", x=tiny.data.x, y=tiny.data.y)
    args = ["compile", str(path), "--devices", "host,pi4", "--data", str(tmp_path / "calib.npz"),
            "--cache-dir", str(tmp_path / "cache"), "--accuracy-drop", "0.05"]
    refused = _cli(*args, "-o", str(tmp_path / "refused"))
    assert refused.returncode == 2 and not (tmp_path / "refused").exists()
    (line,) = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "does not support Celu" in line and "--backend ort" in line
    assert "Traceback" not in refused.stderr
    built = _cli(*args, "-o", str(tmp_path / "bundle"), "--backend", "ort", "--json")
    assert built.returncode == 0, built.stderr[-3000:]
    summary = json.loads(built.stdout)
    assert {seg["backend"] for stage in summary["stages"] for seg in stage["segments"]} == {"ort"}
    test = cf.dataset(30, seed=12)
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    run = _cli("run", str(tmp_path / "bundle"), "--input", str(tmp_path / "test.npz"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["samples"] == 30
