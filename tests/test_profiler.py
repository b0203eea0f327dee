"""Profiler: local TVM + ORT measurements, memory, estimates, cache, merge, CLI, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from distree.cli import cli
from distree.errors import DistreeError
from distree.exits import declared_exits
from distree.graph import build_chain, load_model
from distree.exits.types import SCORE_KINDS
from distree.profiler import Profile, TimingSettings, merge_profiles, profile_model, profile_units
from distree.profiler import estimate as est
from distree.targets import get_device
from distree.profiler.dispatch import HANDLING_ROUNDS, IDLE_SAMPLES
from distree.profiler.items import HANDLING_ITEMS, HOP_ITEMS, IDLE_RPC_ITEMS

FAST = TimingSettings(warmup=1, repeats=3, min_repeat_ms=1.0)


def tiny_exit_model(path: Path) -> Path:
    """conv -> relu -> conv(stride 2) -> relu -> [exit head] -> flatten -> linear; outputs logits, exit_1."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b0 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
            self.b1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
            self.exit = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x):
            h = self.b1(self.b0(x))
            return self.fc(h), self.exit(h)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 1, 14, 14),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits", "exit_1"], opset_version=17)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_exit_model(tmp_path_factory.mktemp("model") / "tiny.onnx")
    model = load_model(path)
    chain = build_chain(model)
    return path, model, chain, declared_exits(model, chain)


@pytest.fixture(scope="module")
def local_profile(tiny, tmp_path_factory):
    _, model, chain, exits = tiny
    cache = tmp_path_factory.mktemp("cache")
    return cache, profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)


def test_units_are_blocks_then_exit_heads_and_run_like_the_model(tiny):
    import onnxruntime as ort

    _, model, chain, exits = tiny
    units = profile_units(model, chain, exits)
    assert [u.item for u in units] == [f"block:{b.index}" for b in chain.blocks] + ["exit:exit_1", "call"]
    x = np.random.default_rng(0).standard_normal((1, 1, 14, 14)).astype(np.float32)
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want_logits, want_exit = full.run(["logits", "exit_1"], {"input": x})
    h = x
    for u in units[:-2]:
        h = ort.InferenceSession(u.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {u.input_name: h})[0]
    np.testing.assert_allclose(h, want_logits, rtol=1e-5, atol=1e-5)
    for u, b in zip(units, chain.blocks):
        assert u.flops == b.flops and u.dense_flops == (b.flops if {"Conv", "Gemm"} & set(b.ops) else 0)
    head, call = units[-2:]
    assert call.num_ops == 1 and call.param_bytes == 0
    cut = chain.blocks[exits[0].after_block].output
    assert head.input_name == cut and head.flops == exits[0].flops
    assert head.param_bytes == sum(onnx.numpy_helper.to_array(t).nbytes for t in head.model.graph.initializer) > 0
    assert want_exit.shape == (1, 10)


def test_stability_entry_heads_are_profiled_as_their_own_units(tiny, tmp_path):
    """The stability score also runs an entry head on the exit block's input: it must have a cost too."""
    import onnxruntime as ort

    from distree.exits import load_dataset, train_exits

    _, model, chain, declared = tiny
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 1, 14, 14)).astype(np.float32)
    y = np.arange(200) % 10
    npz = tmp_path / "d.npz"
    np.savez(npz, x=x, y=y)
    exits_model, exits = train_exits(model, chain, load_dataset(npz), declared=declared)
    (e,) = exits
    units = {u.item: u for u in profile_units(exits_model, chain, exits)}
    entry = units[f"entry:{e.name}"]
    assert entry.input_name == chain.blocks[e.after_block].input and entry.flops == e.entry_flops > 0
    sample = x[:1]
    want = ort.InferenceSession(exits_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [e.entry_output], {"input": sample})[0]
    h = sample
    for b in range(e.after_block):
        h = ort.InferenceSession(units[f"block:{b}"].model.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {units[f"block:{b}"].input_name: h})[0]
    got = ort.InferenceSession(entry.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {entry.input_name: h})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_local_profile_measures_every_item_with_both_backends(tiny, local_profile):
    _, model, chain, exits = tiny
    _, profile = local_profile
    items = [f"block:{b.index}" for b in chain.blocks] + ["exit:exit_1", "call"]
    timed = {(f"decide:{k}", "python") for k in SCORE_KINDS} | {(i, "grpc") for i in HOP_ITEMS}
    assert {(m.item, m.backend) for m in profile.entries} == {(i, b) for i in items for b in ("tvm", "ort")} | timed
    for m in profile.entries:
        assert m.device == "host" and m.provenance == "local" and m.threads == 1
        if m.item in HANDLING_ITEMS:        # CPU per request of a stage and of its sender, round by round
            assert len(m.samples_ms) == HANDLING_ROUNDS and 0 < m.median_ms <= m.p90_ms
            continue
        if m.item in IDLE_RPC_ITEMS:        # one round trip after each idle gap
            assert len(m.samples_ms) == IDLE_SAMPLES and 0 < m.median_ms <= m.p90_ms
            continue
        if m.backend in ("python", "grpc"):
            assert len(m.samples_ms) == FAST.repeats and 0 < m.median_ms <= m.p90_ms
            continue
        assert m.median_ms > 0.5 * profile.get("host", "call", m.backend).median_ms  # the call: no work inside
        assert len(m.samples_ms) == FAST.repeats and 0 < m.median_ms <= m.p90_ms
        assert m.memory_source.startswith("tvm-static-plan")
    # a hop after idle time wakes gRPC's sleeping threads on both ends: dearer than back to back
    assert profile.get("host", IDLE_RPC_ITEMS[-1]).median_ms > profile.get("host", "rpc").median_ms
    conv = next(b for b in chain.blocks if "Conv" in b.ops)
    m = profile.get("host", f"block:{conv.index}", "tvm")
    assert m.param_bytes > 0 and m.flops == conv.flops
    # activations include at least the block's input and output tensors
    assert m.activation_bytes >= 4 * (int(np.prod(conv.output_shape)))
    assert profile.versions["tvm"] and profile.versions["onnxruntime"] and profile.versions["model_sha256"]
    fastest = profile.get("host", "exit:exit_1")
    assert fastest.median_ms == min(profile.get("host", "exit:exit_1", b).median_ms for b in ("tvm", "ort"))


def test_profile_json_round_trip(local_profile, tmp_path):
    _, profile = local_profile
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile



@pytest.mark.parametrize("field, value", [("median_ms", "nan"), ("p90_ms", -1.0), ("median_ms", "fast"),
                                          ("samples_ms", [0.1, "inf"]), ("param_bytes", -5)])
def test_a_profile_edited_by_hand_with_an_impossible_time_is_refused_naming_the_entry(local_profile, tmp_path,
                                                                                      field, value):
    """A NaN median once made the faster-backend pick arbitrary and changed the plan without a word."""
    _, profile = local_profile
    profile.save(tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    entry = doc["entries"][3]
    entry[field] = [float(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else \
        (float(value) if value in ("nan", "inf") else value)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(DistreeError, match=rf"malformed Profile file \({entry['device']} {entry['item']} "
                                           rf"\({entry['backend']}\): {field}(\[1\])? .* is not a "):
        Profile.load(tmp_path / "p.json")


def test_cache_reuses_profile_and_compiled_units_force_remeasures(tiny, local_profile):
    _, model, chain, exits = tiny
    cache, first = local_profile
    libs = sorted((cache / "tvm").glob("*.so"))
    stamps = [p.stat().st_mtime_ns for p in libs]
    again = profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)
    assert again == first
    forced = profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST, force=True)
    assert [m.samples_ms for m in forced.entries] != [m.samples_ms for m in first.entries]
    assert sorted((cache / "tvm").glob("*.so")) == libs  # same content hashes: nothing recompiled
    assert [p.stat().st_mtime_ns for p in libs] == stamps


def _counting_measure(monkeypatch, after=None) -> list[str]:
    """The items the profiler measures from now on (not those it keeps); ``after(n)`` runs after the n-th."""
    import distree.profiler.profile as profiling

    measured: list[str] = []
    real = profiling.measure_unit

    def measure_unit(unit, *args, **kwargs):
        out = real(unit, *args, **kwargs)
        measured.append(unit.item)
        if after is not None:
            after(len(measured))
        return out
    monkeypatch.setattr(profiling, "measure_unit", measure_unit)
    return measured


def test_a_stopped_profile_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    _, model, chain, exits = tiny
    cache = tmp_path / "cache"
    items = [u.item for u in profile_units(model, chain, exits)]

    def abort(done: int, total: int, item: str) -> None:     # as a second Ctrl-C, or a kill, before unit 3
        if done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST, progress=abort)
    partial, = (cache / "profiles").glob("*.partial.jsonl")
    first = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [doc["item"] for doc in first] == items[:3] and not list((cache / "profiles").glob("*[0-9a-f].json"))
    with partial.open("a") as f:
        f.write('{"item": "' + items[3] + '", "entr')       # killed while writing unit 3
    measured = _counting_measure(monkeypatch)
    profile = profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)
    assert measured == items[3:]
    assert profile.settings["host"]["resumed_units"] == 3
    for doc in first:       # the kept units' own samples, not new ones
        assert [m.samples_ms for m in profile.entries if m.item == doc["item"]] == \
            [tuple(e["samples_ms"]) for e in doc["entries"]]
    assert {m.item for m in profile.entries} >= set(items) and not partial.exists()
    again = profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)
    assert again == profile and measured == items[3:]       # the whole profile is cached now


def test_force_measures_everything_again_and_a_stopped_forced_run_resumes_without_it(tiny, tmp_path,
                                                                                      monkeypatch):
    _, model, chain, exits = tiny
    cache = tmp_path / "cache"
    items = [u.item for u in profile_units(model, chain, exits)]
    profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)

    def abort(done: int, total: int, item: str) -> None:
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST, force=True,
                      progress=abort)
    measured = _counting_measure(monkeypatch)
    resumed = profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)
    assert measured == items[2:] and resumed.settings["host"]["resumed_units"] == 2     # not the old profile
    profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST, force=True)
    assert measured == items[2:] + items


def test_a_cached_profile_damaged_on_disk_is_measured_again_and_said(tiny, tmp_path, monkeypatch, caplog):
    _, model, chain, exits = tiny
    cache = tmp_path / "cache"
    items = [u.item for u in profile_units(model, chain, exits)]
    profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)
    cached, = (cache / "profiles").glob("*.json")
    cached.write_text(cached.read_text()[:200])
    compiled = next((cache / "tvm").glob("*.json"))         # a compiled unit's memory figures, likewise
    compiled.write_text("{")
    measured = _counting_measure(monkeypatch)
    again = profile_model(model, chain, exits, get_device("host"), cache_dir=cache, timing=FAST)
    assert measured == items and {m.item for m in again.entries} >= set(items)
    assert f"{cached}: not valid JSON" in caplog.text and "measuring host again" in caplog.text
    assert Profile.load(cached) == again and json.loads(compiled.read_text())["activation_bytes"] >= 0


def test_ctrl_c_stops_profiling_after_the_unit_under_way_and_the_same_command_resumes(
        tiny, tmp_path, monkeypatch, python_handles_sigint):
    import os
    import signal

    path, model, chain, exits = tiny
    total = len(profile_units(model, chain, exits))
    args = ["profile", str(path), "--device", "host", "--warmup", "1", "--repeats", "3", "--min-repeat-ms", "1",
            "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "p.json")]
    measured = _counting_measure(monkeypatch, after=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGINT))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 130, res.output
    assert f"stopped: profiling host stopped; 1 of {total} units are measured and kept: run the same command " \
           "again to resume" in res.output
    assert len(measured) == 1 and not (tmp_path / "p.json").exists()
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert f"note: host: 1 of {total} units were measured by an earlier run" in res.output
    assert len(measured) == total and len(set(measured)) == total


def test_estimate_mode_scales_by_device_figures(tiny, tmp_path):
    _, model, chain, exits = tiny
    prof = {d: profile_model(model, chain, exits, get_device(d), mode="estimate", cache_dir=tmp_path)
            for d in ("host", "pi4", "jetson-orin-nano")}
    conv = next(b for b in chain.blocks if "Conv" in b.ops)
    item = f"block:{conv.index}"
    for d, p in prof.items():
        for m in p.entries:
            assert m.provenance == "estimate" and m.samples_ms == () and m.median_ms > 0
            assert m.memory_source.startswith("none" if m.backend in ("python", "grpc") else "tvm-static-plan")
        assert "calibrated on" in p.get(d, item).note
    assert prof["pi4"].get("pi4", item, "ort").median_ms > prof["host"].get("host", item, "ort").median_ms
    # a decision on a slower CPU costs more, and says it was not measured there
    decide = prof["pi4"].get("pi4", "decide:max_softmax")
    assert decide.median_ms > prof["host"].get("host", "decide:max_softmax").median_ms and "scaled" in decide.note
    # a hop's round trip cannot be timed on the device: the floor measured here, and it says so
    assert "lower bound" in prof["pi4"].get("pi4", "rpc").note
    merged = merge_profiles(list(prof.values()))
    assert set(merged.devices) == {"host", "pi4", "jetson-orin-nano"} and set(merged.settings) == set(prof)


def test_fit_recovers_known_coefficients():
    host = get_device("host")
    truth = est.EstimateCoefficients("ort", 0.3, 0.05, 0.01, host.peak_gflops / host.cores, 0, 0, 0, call_ms=0.04,
                                     eff_other=0.02)
    rng = np.random.default_rng(1)
    n = 60
    rows = [(d, o, b, k, est.estimate_ms(d, o, b, k, host, truth, 1))
            for d, o, b, k in zip(10 ** rng.uniform(4, 9, n), 10 ** rng.uniform(3, 7, n), 10 ** rng.uniform(3, 7, n),
                                  rng.integers(1, 20, n))]
    fit = est.fit_coefficients("ort", rows, host, 1)
    assert fit.median_rel_error < 0.02
    assert abs(fit.eff_compute - 0.3) / 0.3 < 0.1 and abs(fit.op_ms - 0.01) / 0.01 < 0.1
    assert abs(fit.call_ms - 0.04) / 0.04 < 0.1 and abs(fit.eff_other - 0.02) / 0.02 < 0.1


def test_calibration_file_is_present_with_its_command():
    cal = est.load_calibration()
    assert "profile_fidelity.py --calibrate" in cal.command
    assert {c.backend for c in cal.coefficients} == {"tvm", "ort"}
    for c in cal.coefficients:
        assert 0 < c.eff_compute <= 1.5 and c.op_ms > 0 and c.rows >= 10


def test_merge_refuses_profiles_of_different_models(local_profile):
    _, p = local_profile
    other = Profile(model_sha256="0" * 64, entries=(), versions={})
    with pytest.raises(DistreeError, match="different models"):
        merge_profiles([p, other])


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="pi4", mode="local"), "pi4's code is built for aarch64 CPUs; run .* on pi4 itself.*--rpc.*--estimate"),
    (dict(device="jetson-orin-nano", mode="local"),
     "kernels on this machine's GPU, and its aarch64 code cannot run on this .* machine; run .* on jetson-orin-nano "
     "itself"),
    (dict(device="jetson-orin-nano", mode="local", backends=("tvm", "ort")), "runs TVM kernels on its GPU .* drop the "
     "ort backend"),
    (dict(device="host", mode="rpc"), "--rpc HOST:PORT"),
    (dict(device="host", mode="rpc", rpc="127.0.0.1:1", backends=("ort",)), "drop the ort backend"),
    (dict(device="jetson-orin-nano", mode="qemu"), "--qemu emulates aarch64 CPUs"),
    (dict(device="host", mode="fast"), "unknown profiling mode"),
    (dict(device="host", items=("block:99",)), "no item 'block:99'"),
])
def test_bad_requests_fail_before_work(tiny, tmp_path, kwargs, message):
    _, model, chain, exits = tiny
    device = get_device(kwargs.pop("device"))
    with pytest.raises(DistreeError, match=message):
        profile_model(model, chain, exits, device, cache_dir=tmp_path, **kwargs)


def test_profile_command_writes_profile_and_reports_bad_input(tiny, tmp_path):
    path = tiny[0]
    runner = CliRunner()
    out = tmp_path / "profile.json"
    res = runner.invoke(cli, ["profile", str(path), "--device", "host", "--device", "pi4", "--estimate",
                              "--cache-dir", str(tmp_path / "c"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "Profile" and {e["device"] for e in doc["entries"]} == {"host", "pi4"}
    assert all(e["provenance"] == "estimate" for e in doc["entries"])
    res = runner.invoke(cli, ["profile", str(path), "--device", "pi9", "--estimate", "-o", str(out)])
    assert res.exit_code == 2 and "unknown device 'pi9'" in res.output and "pi4" in res.output
    res = runner.invoke(cli, ["profile", str(path), "--device", "pi4", "-o", str(out)])
    assert res.exit_code == 2 and "--estimate" in res.output
    res = runner.invoke(cli, ["profile", str(path), "--device", "pi4", "--estimate", "--qemu", "-o", str(out)])
    assert res.exit_code == 2 and "choose one of" in res.output


def _same_isa_device(name: str, mcpu: str):
    """A device this machine can stand in for: its own ISA, built for another CPU model."""
    import dataclasses

    from distree.targets import host_device

    host = host_device()
    return dataclasses.replace(host, name=name, target={"kind": "llvm", "mtriple": host.target["mtriple"],
                                                         "mcpu": mcpu})


def test_a_device_of_this_cpu_family_is_profiled_here_and_says_it_stood_in(tiny, tmp_path):
    """What a user does on a real Pi 4 (`distree profile --device pi4` there): measured, provenance local,
    and where it ran is recorded; here a generic build of this machine's ISA stands in for the device."""
    import platform

    from distree.targets.toolchain import host_arch

    _, model, chain, exits = tiny
    generic = {"x86_64": "x86-64", "aarch64": "generic"}[host_arch()]
    device = _same_isa_device("edge", generic)
    p = profile_model(model, chain, exits, device, mode="local", cache_dir=tmp_path, timing=FAST,
                      items=("block:0", "call", "decide:max_softmax", "rpc"))
    assert {m.item for m in p.entries} == {"block:0", "call", "decide:max_softmax", *HOP_ITEMS}
    assert all(m.device == "edge" and m.provenance == "local" and m.samples_ms for m in p.entries)
    kernels = [m for m in p.entries if m.item in ("block:0", "call")]
    assert all("standing in for edge (" + generic + ")" in m.note for m in kernels)
    assert p.settings["edge"]["measured_on"].startswith(platform.node() + ": ")


def test_a_device_whose_code_needs_vector_extensions_this_cpu_lacks_is_not_run_here(tiny, tmp_path):
    from distree.targets.toolchain import host_arch, missing_cpu_features

    _, model, chain, exits = tiny
    mcpu = {"x86_64": "sapphirerapids", "aarch64": "neoverse-v2"}[host_arch()]
    device = _same_isa_device("big", mcpu)
    missing = missing_cpu_features(device)
    if not missing:
        pytest.skip(f"this CPU has every vector extension of {mcpu}")
    with pytest.raises(DistreeError, match=f"big's code may use {missing[0]}.*this machine's CPU .* lacks; run "):
        profile_model(model, chain, exits, device, mode="local", cache_dir=tmp_path, timing=FAST)


def test_a_fixed_cost_timed_here_for_another_device_scales_the_fastest_sample():
    """This machine's busy spells are not the device's: an estimate scales the fastest sample, a measurement
    keeps the median."""
    from distree.profiler.dispatch import _timed_here

    samples, pi4 = (0.5, 0.2, 0.9), get_device("pi4")
    estimated = _timed_here(pi4, "decide:max_softmax", "python", samples, TimingSettings(), False, 10.0, "scaled",
                            "none")
    measured = _timed_here(get_device("host"), "decide:max_softmax", "python", samples, TimingSettings(), True, 1.0,
                           "", "none")
    assert estimated.median_ms == pytest.approx(2.0) and estimated.provenance == "estimate"
    assert measured.median_ms == pytest.approx(0.5) and measured.samples_ms == samples
