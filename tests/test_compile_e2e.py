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
    assert summary["traffic"] == "sporadic" and summary["idle_hops_measured"]     # hops as a lone request pays
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
    # a cache entry damaged on disk is a miss, said and computed again, not an error the user must clear
    plan_value, = (tmp_path / "cache" / "plan").glob("*/value.json")
    exits_model, = (tmp_path / "cache" / "exits").glob("*/model.onnx")
    for damaged in (plan_value, exits_model):
        damaged.write_bytes(damaged.read_bytes()[:100])
    mended = _cli(*args)
    assert mended.returncode == 0, mended.stderr[-3000:]
    assert json.loads(mended.stdout)["cached_stages"] == ["calibrate", "profile"]
    assert mended.stderr.count("is unreadable") == 2 and "computing it again" in mended.stderr
    assert json.loads(plan_value.read_text())["kind"] == "Plan"

    # the plan's bounds reach compile: a deadline no plan meets is one line, nothing written; others are new plans
    other = [str(tmp_path / "other") if a == str(tmp_path / "bundle") else a for a in args]
    refused = _cli(*other, "--deadline-ms", "0.0001")
    assert refused.returncode == 2 and "deadline" in refused.stderr and not (tmp_path / "other").exists()
    bounded = _cli(*other, "--deadline-ms", "1000", "--min-throughput", "1")
    assert bounded.returncode == 0, bounded.stderr[-3000:]
    assert json.loads(bounded.stdout)["cached_stages"] == ["exits", "calibrate", "profile"]
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


def test_segments_holding_an_op_tvm_cannot_import_ship_as_ort_and_the_rest_is_timed(tmp_path):
    """TVM's ONNX importer lacks some ops ONNX Runtime runs (Celu, LSTM, QLinearConv, ...). By default the
    segments holding them ship as ONNX Runtime, profiled with ONNX Runtime alone (a GPU's on its CPU), and every
    other segment is still chosen by time; `--backend tvm` and devices timed over RPC are refused up front in one
    line; `--backend ort` builds, profiles and estimates without importing into TVM."""
    import onnx
    from tvm.error import OpNotImplemented
    from tvm.relax.frontend.onnx import from_onnx

    from distree.compiler import build_bundle, read_manifest, read_thresholds
    from distree.exits import calibrate, declared_exits
    from distree.graph import build_chain, load_model
    from distree.profiler import estimate as est
    from distree.runtime import run_bundle
    from distree.solver.problem import favourite_backend
    from distree.profiler.profile import profile_model
    from distree.profiler.units import profile_units
    from distree.targets import get_device
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

    loaded = load_model(path)
    chain = build_chain(loaded)
    celu_block = next(b.index for b in chain.blocks if relu.name in b.nodes)
    orin = get_device("jetson-orin-nano")
    profile = profile_model(loaded, chain, (), orin, mode="estimate", cache_dir=tmp_path / "pcache")
    by_item = {}
    for m in profile.entries:
        by_item.setdefault(m.item, {})[m.backend] = m
    assert set(by_item[f"block:{celu_block}"]) == {"ort"} and set(by_item["call"]) == {"tvm", "ort"}
    assert all(set(v) == {"tvm"} for k, v in by_item.items() if k.startswith("block:") and k != f"block:{celu_block}")
    ort_only = profile.settings["jetson-orin-nano"]["ort_only"]
    assert ort_only == {f"block:{celu_block}": f"Celu (1 node, e.g. {relu.name!r})"}
    (celu_unit,) = [u for u in profile_units(loaded, chain) if u.item == f"block:{celu_block}"]
    cal = est.load_calibration()
    on_cpu = est.unit_estimate_ms(celu_unit, est.host_cpu_view(orin), cal.for_backend("ort"), 1)
    assert by_item[f"block:{celu_block}"]["ort"].median_ms == pytest.approx(on_cpu)
    assert on_cpu != pytest.approx(est.unit_estimate_ms(celu_unit, orin, cal.for_backend("ort"), 1))  # not the GPU
    assert favourite_backend(profile, orin.name, len(chain.blocks)) == "tvm"     # what ships on all other blocks

    np.savez(tmp_path / "calib.npz", x=tiny.data.x, y=tiny.data.y)
    args = ["compile", str(path), "--devices", "host,pi4", "--data", str(tmp_path / "calib.npz"),
            "--cache-dir", str(tmp_path / "cache"), "--accuracy-drop", "0.05"]
    for flags, expected in ((["--backend", "tvm"], "--backend tvm"), (["--rpc", "pi4=127.0.0.1:9"], "over RPC")):
        refused = _cli(*args, *flags, "-o", str(tmp_path / "refused"))
        assert refused.returncode == 2 and not (tmp_path / "refused").exists()
        (line,) = refused.stderr.strip().splitlines()[-1:]
        assert line.startswith("error: ") and "Celu" in line and expected in line, line
        assert "Traceback" not in refused.stderr

    built = _cli(*args, "-o", str(tmp_path / "auto"), "--json")         # the default: auto
    assert built.returncode == 0, built.stderr[-3000:]
    assert any("TVM cannot import" in note for note in json.loads(built.stdout)["notes"])
    planned = json.loads((tmp_path / "auto" / "planning" / "profile.json").read_text())
    assert {m["backend"] for m in planned["entries"] if m["item"] == f"block:{celu_block}"} == {"ort"}

    # a plan of several segments (the solver enables no exit on random data): the one holding Celu ships as
    # ONNX Runtime, every other is timed; the bundle answers as ONNX Runtime on the whole multi-exit model
    data = cf.dataset(60, seed=7)
    celu = cf.Tiny(path, loaded, chain, calibrate(loaded, chain, declared_exits(loaded, chain), tiny.data), tiny.data)
    plan, topology = cf.two_stage_plan(celu)
    bundle = build_bundle(loaded, chain, plan, topology, celu.calibration, tmp_path / "mixed", backend="auto")
    segments = [seg for stage in read_manifest(bundle).stages for seg in stage.segments]
    holding = [seg for seg in segments if seg.first_block <= celu_block <= seg.last_block]
    assert len(holding) == 1 and holding[0].backend == "ort" and holding[0].file.endswith(".onnx")
    assert "does not support Celu" in holding[0].backend_reason
    others = [seg for seg in segments if seg is not holding[0]]
    assert len(others) == 2 and all("TVM/ORT =" in seg.backend_reason for seg in others), others
    report = run_bundle(bundle, data)
    thresholds = {e.name: e.threshold for e in read_thresholds(bundle).exits}
    want_preds, want_exits = cf.ort_reference(celu, data.x, thresholds)
    assert list(report.predictions) == list(want_preds) and list(report.exits) == want_exits

    built = _cli(*args, "-o", str(tmp_path / "bundle"), "--backend", "ort", "--json")
    assert built.returncode == 0, built.stderr[-3000:]
    summary = json.loads(built.stdout)
    assert {seg["backend"] for stage in summary["stages"] for seg in stage["segments"]} == {"ort"}
    test = cf.dataset(30, seed=12)
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    run = _cli("run", str(tmp_path / "bundle"), "--input", str(tmp_path / "test.npz"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["samples"] == 30
