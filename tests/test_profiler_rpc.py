"""Profiling over TVM RPC against a real ``python -m tvm.exec.rpc_server`` on loopback; unreachable servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from distree.errors import DistreeError
from distree.exits import declared_exits
from distree.graph import build_chain, load_model
from distree.profiler import TimingSettings, profile_model
from distree.profiler.rpc import connect
from distree.targets import get_device
from test_profiler import FAST, tiny_exit_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_rpc_server(port: int) -> subprocess.Popen:
    """A real TVM RPC server listening on ``port``, in its own process group (it forks a worker per session)."""
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TVM_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "rpc_server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    pytest.fail("rpc_server did not listen within 120 s")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


@pytest.fixture
def rpc_server():
    """A real TVM RPC server on loopback: its address; it and its session workers are stopped after."""
    port = _free_port()
    proc = _start_rpc_server(port)
    yield f"127.0.0.1:{port}"
    _stop(proc)


@pytest.mark.slow
def test_profile_two_blocks_over_rpc(tmp_path, rpc_server):
    model = load_model(tiny_exit_model(tmp_path / "tiny.onnx"))
    chain = build_chain(model)
    exits = declared_exits(model, chain)
    conv = next(b.index for b in chain.blocks if "Conv" in b.ops)
    items = (f"block:{conv}", f"block:{conv + 1}")
    profile = profile_model(model, chain, exits, get_device("host"), mode="rpc", rpc=rpc_server, items=items,
                            cache_dir=tmp_path / "cache", timing=FAST)
    assert [m.item for m in profile.entries] == list(items)
    for m in profile.entries:
        assert m.backend == "tvm" and m.provenance == f"rpc://{rpc_server}"
        assert len(m.samples_ms) == FAST.repeats and 0 < m.median_ms <= m.p90_ms
    local = profile_model(model, chain, exits, get_device("host"), items=items, backends=("tvm",),
                          cache_dir=tmp_path / "cache", timing=TimingSettings(warmup=1, repeats=5, min_repeat_ms=1))
    # the same artifact on the same machine: remote timing within an order of magnitude of local
    for r, l in zip(profile.entries, local.entries):
        assert 0.1 < r.median_ms / l.median_ms < 10


@pytest.mark.slow
def test_a_device_lost_while_profiling_is_a_clear_error_and_the_same_request_resumes(tmp_path):
    model = load_model(tiny_exit_model(tmp_path / "tiny.onnx"))
    chain = build_chain(model)
    exits = declared_exits(model, chain)
    port = _free_port()
    servers = [_start_rpc_server(port)]

    def lose_device(done: int, total: int, item: str) -> None:
        if done == 2 and servers[0].poll() is None:
            _stop(servers[0], signal.SIGKILL)       # the Pi unplugged while block:2 is next
    run = dict(mode="rpc", rpc=f"127.0.0.1:{port}", cache_dir=tmp_path / "cache", timing=FAST)
    try:
        with pytest.raises(DistreeError, match=rf"timing block:2 on host over TVM RPC \(rpc://127.0.0.1:{port}\) "
                                               r"failed: .*; 2 of \d+ units are measured and kept: run the same "
                                               r"command again to resume once its RPC server is up again"):
            profile_model(model, chain, exits, get_device("host"), progress=lose_device, **run)
        servers.append(_start_rpc_server(port))
        seen: list[str] = []
        profile = profile_model(model, chain, exits, get_device("host"), progress=lambda d, t, item: seen.append(item),
                                **run)
    finally:
        for proc in servers:
            if proc.poll() is None:
                _stop(proc)
    assert seen[:2] == ["block:0 (measured by an earlier run)", "block:1 (measured by an earlier run)"]
    assert seen[2] == "block:2" and profile.settings["host"]["resumed_units"] == 2
    assert {m.provenance for m in profile.entries if m.backend == "tvm"} == {f"rpc://127.0.0.1:{port}"}


def test_refused_connection_fails_fast_naming_the_address():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(DistreeError, match=f"127.0.0.1:{port}.*tvm.exec.rpc_server"):
        connect(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10


def test_silent_server_times_out_within_the_limit():
    """A peer that accepts TCP but never answers the RPC handshake (a hung server, a wrong service)."""
    import tvm.rpc  # noqa: F401 - importing TVM is not part of the network timeout
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(DistreeError, match=f"127.0.0.1:{port} .*no answer within 1 s"):
            connect(f"127.0.0.1:{port}", timeout_s=1.0)
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("address", ["pi4", "host:", ":9090", "host:99999", "host:abc"])
def test_malformed_address(address):
    with pytest.raises(DistreeError, match="HOST:PORT"):
        connect(address)
