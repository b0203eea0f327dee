"""A TVM RPC server that serves sessions in its own process (standalone script: imports only tvm).

``python -m tvm.exec.rpc_server`` serves each session in a multiprocessing child, which cannot start
under qemu-user; this script does the same handshake and runs ``ServerLoop`` in-process, one session at a
time. It prints ``distree-rpc-ready <port>`` once listening. Run it with the emulated Python:

    qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11 rpc_inprocess_server.py --port 0
"""

import argparse
import socket
import struct
import sys

READY = "distree-rpc-ready"


def _handshake(conn: socket.socket, key: str) -> bool:
    from tvm.rpc import base

    magic = struct.unpack("<i", base.recvall(conn, 4))[0]
    if magic != base.RPC_MAGIC:
        return False
    keylen = struct.unpack("<i", base.recvall(conn, 4))[0]
    client_key = base.recvall(conn, keylen).decode("utf-8").split()
    if not client_key or client_key[0] != "client:" + key:
        conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
        return False
    server_key = "server:" + key
    conn.sendall(struct.pack("<i", base.RPC_CODE_SUCCESS))
    conn.sendall(struct.pack("<i", len(server_key)))
    conn.sendall(server_key.encode("utf-8"))
    return True


def serve(host: str, port: int, key: str = "") -> None:
    import tvm  # noqa: F401 - registers the runtime
    from tvm.support import utils
    from tvm.rpc import _ffi_api, server

    listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen.bind((host, port))
    listen.listen(1)
    print(READY, listen.getsockname()[1], flush=True)
    while True:
        conn, _ = listen.accept()
        try:
            try:
                accepted = _handshake(conn, key)
            except (OSError, RuntimeError, struct.error):
                accepted = False  # a port probe or a client that went away: wait for the next one
            if accepted:
                work = utils.tempdir()
                server._server_env("", work)
                _ffi_api.ServerLoop(conn.detach())  # the loop closes the socket when the session ends
                work.remove()
        finally:
            conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(args.host, args.port)
    sys.exit(0)
