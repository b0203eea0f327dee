"""Connecting to a device's TVM RPC server (``python -m tvm.exec.rpc_server`` on a Pi or a Jetson)."""

from __future__ import annotations

import socket
import threading

from distree.errors import DistreeError
from distree.targets.topology import parse_host_port

CONNECT_TIMEOUT_S = 10.0


def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S):
    """A TVM RPC session; fails within ``timeout_s`` with a DistreeError that names the address."""
    host, port = parse_host_port(address, "--rpc", "192.168.1.20:9090 (a TVM RPC server)")
    hint = (f"start one on the device with: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}, "
            "and check the address and firewall")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise DistreeError(f"cannot reach the TVM RPC server at {host}:{port} within {timeout_s:g} s "
                           f"({exc.strerror or exc}); {hint}") from None
    from tvm import rpc

    # TVM's handshake blocks in C++ without a timeout: run it in a daemon thread and stop waiting on time.
    result: dict = {}

    def handshake() -> None:
        try:
            result["session"] = rpc.connect(host, port, session_timeout=0)
        except Exception as exc:  # noqa: BLE001 - TVM raises TVMError/RuntimeError for a non-RPC peer
            result["error"] = exc

    worker = threading.Thread(target=handshake, daemon=True, name=f"tvm-rpc-connect-{host}:{port}")
    worker.start()
    worker.join(timeout_s)
    if "session" in result:
        return result["session"]
    why = f"({result['error']})" if "error" in result else f"(no answer within {timeout_s:g} s)"
    raise DistreeError(f"{host}:{port} accepted a connection but no TVM RPC session started {why}; "
                       f"is it a TVM RPC server, and is it free (it serves one session at a time)? {hint}")
