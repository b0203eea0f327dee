"""MetaSchedule tuning for a remote CPU (pi4): candidates built here with the aarch64 cross compiler and
timed on the device's TVM RPC server, here the emulated aarch64 server (qemu-user); and the user errors.

The slow tests need the cached aarch64 root (built once: ~5 min on 2 cores, see test_profiler_qemu.py).
Emulated timings prove that measurement works end to end, not how fast a Pi is.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from click.testing import CliRunner
from tvm import relax

from distree.cli import cli
from distree.compiler import tuning
from distree.compiler.bundle import tuning_sites
from distree.compiler.tvm_build import compile_segment
from distree.errors import DistreeError
from distree.profiler.rpc import connect
from distree.targets import get_device
from distree.targets.emulation import aarch64_rpc_server, ensure_aarch64_root
from distree.targets.toolchain import cross_compiler, tvm_target
from test_profiler_rpc import _free_port
from test_tuning import _two_conv_model

PI4 = get_device("pi4")
TRIALS_PER_ROUND = 4


def _tune_pi4(db_dir, address, max_trials):
    return tuning.tune(_two_conv_model(), tvm_target(PI4), minutes=10, db_dir=db_dir, trials_per_round=TRIALS_PER_ROUND,
                       max_trials=max_trials, rpc=address, cc=cross_compiler(PI4))


def _lines(db_dir, name):
    path = tuning.records_dir(db_dir, tvm_target(PI4)) / name
    return [line for line in path.read_text().splitlines() if line.strip()]


def _run_over_rpc(address, library, x):
    """Outputs of an aarch64 library run by the device's TVM runtime (its RPC server)."""
    session = connect(address)
    session.upload(str(library), "tuned.so")
    dev = session.cpu()
    out = relax.VirtualMachine(session.load_module("tuned.so"), dev)["main"](tvm.runtime.tensor(x, device=dev))
    return out.numpy()


@pytest.fixture(scope="module")
def pi4_server():
    with aarch64_rpc_server(ensure_aarch64_root()) as address:
        yield address


@pytest.fixture(scope="module")
def tuned_pi4(pi4_server, tmp_path_factory):
    """Two runs into one database over the emulated pi4: one round per task, then one more round."""
    db_dir = tmp_path_factory.mktemp("pi4_tuning")
    first = _tune_pi4(db_dir, pi4_server, 2 * TRIALS_PER_ROUND)
    after_first = (_lines(db_dir, "database_tuning_record.json"), _lines(db_dir, "database_workload.json"))
    second = _tune_pi4(db_dir, pi4_server, TRIALS_PER_ROUND)
    return db_dir, first, after_first, second


@pytest.mark.slow
def test_pi4_records_hold_device_timings(tuned_pi4, pi4_server):
    db_dir, first, (records, workloads), _ = tuned_pi4
    assert first.measured_on == f"rpc://{pi4_server}" and first.stopped == "max_trials"
    assert [t.trials for t in first.tasks] == [TRIALS_PER_ROUND] * 2 and len(workloads) == 2
    assert tuning.records_dir(db_dir, tvm_target(PI4)).name.startswith("llvm-cortex-a72-")
    assert not tuning.has_records(db_dir, get_device("host").target)
    timed = [json.loads(line)[1] for line in records]
    assert len(timed) >= 2 * TRIALS_PER_ROUND - 2            # a candidate or two may fail to build
    for _trace, run_secs, target, _args in timed:
        assert run_secs and all(math.isfinite(s) and 0 < s < 1 for s in run_secs)
        assert target["mtriple"] == "aarch64-linux-gnu"
    assert all(t.best_us is not None and t.best_us > 0 for t in first.tasks)


@pytest.mark.slow
def test_second_run_reuses_the_pi4_records(tuned_pi4):
    db_dir, first, (records, workloads), second = tuned_pi4
    assert [t.earlier for t in second.tasks] == [t.trials for t in first.tasks]   # no first round again
    assert second.trials == TRIALS_PER_ROUND
    assert _lines(db_dir, "database_workload.json") == workloads
    assert _lines(db_dir, "database_tuning_record.json")[: len(records)] == records


@pytest.mark.slow
def test_tuned_pi4_library_matches_onnxruntime_on_the_device(tuned_pi4, pi4_server, tmp_path):
    db_dir, *_ = tuned_pi4
    model = _two_conv_model()
    build = compile_segment(model, PI4, tmp_path / "pi4.so", db_dir)
    assert build.tuned
    x = np.random.default_rng(3).standard_normal((1, 1, 12, 12)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(_run_over_rpc(pi4_server, build.path, x), want, rtol=1e-4, atol=1e-4)


def test_compile_with_tuning_and_no_rpc_for_pi4_is_a_one_line_error(tiny, tmp_path):
    np.savez(tmp_path / "calib.npz", x=tiny.data.x, y=tiny.data.y)
    out = tmp_path / "bundle"
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["compile", str(tiny.path), "--devices", "host,pi4", "--data",
                                      str(tmp_path / "calib.npz"), "-o", str(out), "--tune-minutes", "1",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --tune-minutes: pi4 ")
    assert "--rpc pi4=HOST:9090" in lines[0] and "tvm.exec.rpc_server" in lines[0]
    assert not out.exists() and time.monotonic() - started < 20   # refused before any stage ran


def test_tuning_sites_tune_cpus_here_or_over_rpc_and_never_cuda():
    host, pi4, orin = (get_device(n) for n in ("host", "pi4", "jetson-orin-nano"))
    sites, notes = tuning_sites([host, pi4, orin], {"pi4": "192.168.1.20:9090"})
    assert [(d.name, where) for d, where in sites] == [("host", None), ("pi4", "192.168.1.20:9090")]
    assert len(notes) == 1 and notes[0].startswith("jetson-orin-nano: its cuda kernels ship untuned")
    with pytest.raises(DistreeError, match="--rpc pi4=HOST"):
        tuning_sites([host, pi4], {})


def test_unreachable_device_fails_before_any_tuning_work(tmp_path):
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(DistreeError, match=f"127.0.0.1:{port}"):
        _tune_pi4(tmp_path, f"127.0.0.1:{port}", TRIALS_PER_ROUND)
    assert time.monotonic() - started < 15
    assert not any(tmp_path.rglob("database_*.json"))
