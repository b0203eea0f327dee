"""`distree compile --profile`: a device profiled where it runs (`distree profile --device NAME` on the device)
is planned with those measurements instead of being profiled or estimated again; a profile that cannot stand for
the compile is a one-line error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

import compiler_fixtures as cf
from distree.cli import cli
from distree.compiler.pipeline import CompileOptions, compile_model
from distree.compiler.summary import summary_dict
from distree.profiler import Profile, TimingSettings, profile_model
from distree.runtime.executor import remaining_ms
from distree.targets import host_device, load_topology
from distree.targets.toolchain import host_arch

FAST = TimingSettings(warmup=1, repeats=3, min_repeat_ms=1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, its data, a topology whose source ``edge`` is a machine of this ISA, and edge's profile
    measured here as it would be measured on the device itself."""
    tmp = tmp_path_factory.mktemp("given")
    tiny = cf.tiny_model(tmp)
    np.savez(tmp / "calib.npz", x=tiny.data.x, y=tiny.data.y)
    host = host_device()
    generic = {"x86_64": "x86-64", "aarch64": "generic"}[host_arch()]
    topology = tmp / "topology.yaml"
    topology.write_text(
        "devices:\n"
        f"  - {{name: edge, target: {{kind: llvm, mtriple: {host.target['mtriple']}, mcpu: {generic}}},\n"
        "     memory_gb: 1, cores: 1, peak_gflops: 20, mem_gbps: 5}\n"
        "  - pi4\n"
        "links:\n"
        "  - {src: edge, dst: pi4, bandwidth_mbps: 100, latency_ms: 2}\n")
    edge = load_topology(topology).device("edge")
    measured = profile_model(tiny.model, tiny.chain, tiny.calibration.exits, edge, mode="local",
                             cache_dir=tmp / "profiles", timing=FAST)
    path = tmp / "edge.json"
    measured.save(path)
    return tmp, tiny, topology, measured, path


def _compile(tmp, tiny, topology, profiles, out: str):
    options = CompileOptions(topology=topology, backend="ort", time_limit_s=10, accuracy_drop=0.05,
                             profiles=tuple(profiles))
    return compile_model(tiny.path, tmp / "calib.npz", tmp / out, options, cache_dir=tmp / "cache")


def test_the_device_is_planned_with_its_own_measurements(setup):
    tmp, tiny, topology, measured, path = setup
    result = _compile(tmp, tiny, topology, [path], "bundle")
    planned = Profile.load(result.bundle / "planning" / "profile.json")
    edge = {(m.item, m.backend): m.median_ms for m in planned.entries if m.device == "edge"}
    assert edge == {(m.item, m.backend): m.median_ms for m in measured.entries if m.backend != "tvm"}
    assert all(m.provenance == "estimate" for m in planned.entries if m.device == "pi4")
    assert result.costs["edge"].startswith("measured on ") and str(path) in result.costs["edge"]
    assert result.costs["pi4"] == "estimated, not measured"

    # the same file measured again (here: edge found 10x slower) is a new profile, so a new plan
    slower = Profile(model_sha256=measured.model_sha256, versions=measured.versions, settings=measured.settings,
                     entries=tuple(dataclasses.replace(m, median_ms=m.median_ms * 10, p90_ms=m.p90_ms * 10)
                                   for m in measured.entries))
    slow_path = tmp / "edge_slow.json"
    slower.save(slow_path)
    again = _compile(tmp, tiny, topology, [slow_path], "bundle_slow")
    assert "profile" not in again.cached and "plan" not in again.cached
    replanned = Profile.load(again.bundle / "planning" / "profile.json")
    assert replanned.get("edge", "block:0", "ort").median_ms == pytest.approx(
        measured.get("edge", "block:0", "ort").median_ms * 10)


def test_a_device_profiled_on_itself_gets_the_backend_that_was_faster_there(setup):
    """Code for a Pi cannot run here, so `--backend auto` compares TVM and ONNX Runtime on this host as a
    stand-in, unless the Pi's own profile timed both: then its figures decide (here: a profile in which TVM
    took half of ONNX Runtime's time on every item, while untuned TVM is slower than ORT on this host)."""
    tmp, tiny, _, measured, _ = setup
    ort = [m for m in measured.entries if m.backend in ("ort", "python", "grpc")]
    halved = [dataclasses.replace(m, backend="tvm", median_ms=m.median_ms / 2) for m in ort if m.backend == "ort"]
    on_pi = Profile(model_sha256=measured.model_sha256, versions=measured.versions,
                    entries=tuple(dataclasses.replace(m, device="pi4") for m in (*ort, *halved)),
                    settings={"pi4": {**measured.settings["edge"], "measured_on": "raspberrypi: cortex-a72, 4 cores"}})
    on_pi.save(tmp / "pi4.json")
    options = CompileOptions(devices=("pi4",), time_limit_s=10, accuracy_drop=0.05, profiles=(tmp / "pi4.json",))
    result = compile_model(tiny.path, tmp / "calib.npz", tmp / "bundle_pi", options, cache_dir=tmp / "cache")
    segments = [s for st in result.manifest.stages for s in st.segments]
    assert segments and all(s.backend == "tvm" for s in segments)
    assert all(s.backend_reason == "auto: TVM/ORT = 0.50 <= 1 on pi4 itself (raspberrypi: cortex-a72, 4 cores; its "
               "profile's blocks)" for s in segments)
    assert result.manifest.ratio_measured_on.endswith("; pi4: on itself (raspberrypi: cortex-a72, 4 cores)")

    # the runtime's deadline estimates on the Pi use the Pi's times, not this host's
    for seg in segments:
        assert seg.expected_from == "profile of pi4 (local)"
        assert seg.expected_ms == pytest.approx(seg.tvm_ms) and seg.expected_ms != pytest.approx(seg.ort_ms)
    assert remaining_ms(result.manifest).on_entry[0] == pytest.approx(sum(s.expected_ms for s in segments))


def test_deadline_estimates_for_a_device_not_at_hand_come_from_its_profile(setup):
    """Before, a Pi's segments carried this host's proxy times, so its deadline override thought the rest of the
    model ~10x quicker than the Pi runs it."""
    tmp, tiny, _, _, _ = setup
    options = CompileOptions(devices=("pi4",), time_limit_s=10, accuracy_drop=0.05)
    result = compile_model(tiny.path, tmp / "calib.npz", tmp / "bundle_estimated", options, cache_dir=tmp / "cache")
    segments = [s for st in result.manifest.stages for s in st.segments]
    for seg in segments:
        assert seg.expected_from == "profile of pi4 (estimate)"
        assert seg.expected_ms > 3 * (seg.tvm_ms if seg.backend == "tvm" else seg.ort_ms)
    assert remaining_ms(result.manifest).on_entry[0] == pytest.approx(sum(s.expected_ms for s in segments))


def test_a_compile_starts_from_an_earlier_bundles_plan(setup):
    """`compile --start BUNDLE` (the one -o replaces, say): its plan seeds the solve, which ends no slower; the
    plan stage is not answered from the cache of an unseeded one."""
    tmp, tiny, topology, _, path = setup
    first = _compile(tmp, tiny, topology, [path], "bundle_first")
    options = CompileOptions(topology=topology, backend="ort", time_limit_s=10, accuracy_drop=0.05, profiles=(path,),
                             start=first.bundle)
    again = compile_model(tiny.path, tmp / "calib.npz", first.bundle, options, cache_dir=tmp / "cache")
    assert "plan" not in again.cached and "profile" in again.cached
    assert again.plan.model_stats["start_ms"] == pytest.approx(first.plan.expected_latency_ms, rel=1e-9)
    assert again.plan.expected_latency_ms <= first.plan.expected_latency_ms + 1e-9
    assert summary_dict(again)["solver"]["start_ms"] == again.plan.model_stats["start_ms"]


def _cli_error(tmp, tiny, *args: str) -> str:
    res = CliRunner().invoke(cli, ["compile", str(tiny.path), "--data", str(tmp / "calib.npz"), "-o",
                                   str(tmp / "refused"), "--cache-dir", str(tmp / "cache"), "--backend", "ort", *args])
    assert res.exit_code == 2, res.output
    assert not (tmp / "refused").exists()
    return res.output.strip()


def test_profiles_that_cannot_stand_for_the_compile_are_refused(setup):
    tmp, tiny, topology, measured, path = setup
    # so is a start plan that is none, or one of another model
    out = _cli_error(tmp, tiny, "--topology", str(topology), "--start", str(tmp / "none.json"))
    assert out.startswith("error: ") and "no such plan file" in out and "\n" not in out, out
    _cli_error(tmp, tiny, "--topology", str(topology), "--start", str(path))      # a Profile, not a Plan
    first = _compile(tmp, tiny, topology, [path], "bundle_other")
    dataclasses.replace(first.plan, model_sha256="f" * 64).save(tmp / "other.json")
    out = _cli_error(tmp, tiny, "--topology", str(topology), "--profile", str(path), "--start", str(tmp / "other.json"))
    assert out.splitlines()[-1].startswith("error: --start: the plan is for model ffffffffffff"), out
    with_topology = ("--topology", str(topology))
    out = _cli_error(tmp, tiny, "--devices", "pi4,host", "--profile", str(path))
    assert "profiles edge, which is not among the devices (pi4, host)" in out
    out = _cli_error(tmp, tiny, *with_topology, "--profile", str(path), "--rpc", "edge=127.0.0.1:9")
    assert "edge has both --rpc and a --profile" in out
    out = _cli_error(tmp, tiny, *with_topology, "--profile", str(path), "--profile", str(path))
    assert "edge is profiled in both" in out
    out = _cli_error(tmp, tiny, *with_topology, "--profile", str(tmp / "nowhere.json"))
    assert "nowhere.json: no such file" in out

    other = dataclasses.replace(measured, model_sha256="0" * 64)
    other.save(tmp / "other_model.json")
    out = _cli_error(tmp, tiny, *with_topology, "--profile", str(tmp / "other_model.json"))
    assert f"profiles model 000000000000, this compile plans model {measured.model_sha256[:12]}" in out

    partial = dataclasses.replace(measured, entries=tuple(m for m in measured.entries if m.item != "rpc"))
    partial.save(tmp / "partial.json")
    out = _cli_error(tmp, tiny, *with_topology, "--profile", str(tmp / "partial.json"))
    assert "partial.json lacks rpc for edge (kernels timed with ort)" in out
    ort_only = dataclasses.replace(measured, entries=tuple(m for m in measured.entries if m.backend != "tvm"))
    ort_only.save(tmp / "ort_only.json")
    out = _cli_error(tmp, tiny, *with_topology, "--profile", str(tmp / "ort_only.json"), "--backend", "tvm")
    assert "lacks block:0, block:1, block:2, block:3 ... for edge (kernels timed with tvm)" in out
