"""The request link (`distree.runtime.link`) against a real gRPC server on loopback: one stream per calling
thread, unary calls where the server has no stream for it, per-request timeouts, and errors that keep
gRPC's shape."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from distree.runtime.link import NO_FREE_STREAM, Link

SERVICE = "test.Echo"


class EchoServer:
    """Echoes frames; b"slow" sleeps first, b"bad" ends the call with INVALID_ARGUMENT. Counts what it saw."""

    def __init__(self, stream_slots: int = 4, with_stream: bool = True) -> None:
        self.streams_opened = self.unary_calls = self.open_streams = 0
        self._slots = threading.BoundedSemaphore(stream_slots)
        self._lock = threading.Lock()
        handlers = {"Call": grpc.unary_unary_rpc_method_handler(self._unary)}
        if with_stream:
            handlers["Stream"] = grpc.stream_stream_rpc_method_handler(self._stream)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=stream_slots + 4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    @staticmethod
    def _answer(frame: bytes, context: grpc.ServicerContext) -> bytes:
        if frame == b"slow":
            time.sleep(1.0)
        if frame == b"bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad frame")
        return frame

    def _unary(self, frame: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.unary_calls += 1
        return self._answer(frame, context)

    def _stream(self, frames, context: grpc.ServicerContext):
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, NO_FREE_STREAM)
        with self._lock:
            self.streams_opened += 1
            self.open_streams += 1
        try:
            for frame in frames:
                yield self._answer(frame, context)
        finally:
            with self._lock:
                self.open_streams -= 1
            self._slots.release()

    def stop(self) -> None:
        self.server.stop(0).wait()


@pytest.fixture
def echo():
    servers = []

    def start(**kwargs) -> tuple[EchoServer, Link]:
        server = EchoServer(**kwargs)
        channel = grpc.insecure_channel(server.address)
        servers.append((server, channel))
        return server, Link(channel, f"/{SERVICE}/Call", f"/{SERVICE}/Stream")

    yield start
    for server, channel in servers:
        channel.close()
        server.stop()


def test_requests_of_one_thread_share_one_stream(echo):
    server, link = echo()
    assert [link.call(f"r{i}".encode(), 5.0) for i in range(20)] == [f"r{i}".encode() for i in range(20)]
    assert (server.streams_opened, server.unary_calls) == (1, 0)


def test_each_thread_gets_its_own_stream_and_the_rest_call_unary_when_slots_run_out(echo):
    server, link = echo(stream_slots=2)
    answers: dict[int, list[bytes]] = {}
    ready = threading.Barrier(3)

    def caller(k: int) -> None:
        ready.wait()                        # all three open their streams at once: one is refused
        answers[k] = [link.call(f"{k}-{i}".encode(), 5.0) for i in range(10)]

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == {k: [f"{k}-{i}".encode() for i in range(10)] for k in range(3)}
    assert server.streams_opened == 2 and server.unary_calls == 10     # the refused thread stays unary


def test_a_finished_thread_gives_its_stream_back(echo):
    """Callers on short-lived threads (a pool that is shut down, a thread per request) must not keep their
    streams open: each holds a worker thread of the server."""
    server, link = echo(stream_slots=1)
    for k in range(3):
        worker = threading.Thread(target=link.call, args=(f"t{k}".encode(), 5.0))
        worker.start()
        worker.join(10)
        deadline = time.monotonic() + 5
        while server.open_streams and time.monotonic() < deadline:
            time.sleep(0.01)
    assert (server.streams_opened, server.unary_calls, server.open_streams) == (3, 0, 0)


def test_a_late_reply_is_deadline_exceeded_and_the_next_call_works(echo):
    server, link = echo()
    assert link.call(b"warm", 5.0) == b"warm"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        link.call(b"slow", 0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9                             # not the server's 1 s
    assert link.call(b"again", 5.0) == b"again" and server.streams_opened == 2


def test_a_server_error_keeps_its_status_and_the_link_recovers(echo):
    server, link = echo()
    with pytest.raises(grpc.RpcError) as err:
        link.call(b"bad", 5.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad frame" in err.value.details()
    assert link.call(b"fine", 5.0) == b"fine"


def test_a_server_without_streams_is_called_unary(echo):
    server, link = echo(with_stream=False)
    assert [link.call(b"x", 5.0) for _ in range(3)] == [b"x"] * 3
    assert server.unary_calls == 3


def test_an_unreachable_server_is_unavailable():
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        link = Link(channel, f"/{SERVICE}/Call", f"/{SERVICE}/Stream")
        with pytest.raises(grpc.RpcError) as err:
            link.call(b"x", 2.0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
