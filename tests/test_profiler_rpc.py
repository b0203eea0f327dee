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


@pytest.fixture
def rpc_server():
    """A real TVM RPC server in its own process group (it forks a worker per session): both are stopped."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TVM_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "rpc_server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("rpc_server did not listen within 120 s")
    yield f"127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


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
