"""``distree serve``: one device's stage as a gRPC server.

Each request runs the stage's sub-segments with the exit policy (:class:`StageExecutor`, the same code as
``run_bundle``). A request answered at an exit is replied to at once; otherwise the cut tensor goes to the
next stage over a persistent channel and its answer is relayed back, so every answer returns along the
chain to the device where the request arrived (the source). The source device may hold no stage of its
own (the plan found it not worth using): it then serves as a relay that accepts requests and forwards them
to the first stage.

gRPC without generated code: generic method handlers over bytes, framed by :mod:`distree.runtime.wire`.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import grpc

from distree.compiler.manifest import MANIFEST, Manifest, TensorSpec, read_manifest, read_thresholds, sha256_file
from distree.compiler.verify import verify_bundle
from distree.errors import DistreeError
from distree.runtime.backends import set_tvm_threads
from distree.runtime.executor import StageExecutor, StageOutcome, transfer_in_ms
from distree.runtime.link import NO_FREE_STREAM, Link
from distree.runtime.policy import ExitPolicy
from distree.runtime.stats import DEADLINE, FAILED, FORWARD, StageCounters
from distree.runtime.tls import Tls, add_port, open_channel
from distree.runtime.wire import Hop, Reply, Request, WireError, decode_reply, decode_request, encode_reply, \
    encode_request
from distree.targets.topology import parse_host_port

SERVICE = "distree.Stage"
INFER = f"/{SERVICE}/Infer"
INFER_STREAM = f"/{SERVICE}/InferStream"     # the same requests on a persistent stream (distree.runtime.link)
INFO = f"/{SERVICE}/Info"
STATS = f"/{SERVICE}/Stats"      # this stage's counters, then the next stage's (distree.runtime.stats)
STATS_TIMEOUT_S = 5.0             # how long a stage waits for the next one's counters
ORIGIN_KEY = "distree-origin"       # trailing metadata on errors a stage raised itself (vs transport errors)
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 200),     # a restarted next stage is found again within seconds
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
WORKERS = 16                        # a server's threads; each open request stream holds one
UNARY_RESERVE = 4                   # threads never given to streams: unary calls (Info, fallbacks) still run
Log = Callable[[str], None]


@dataclass(frozen=True)
class Role:
    """What a device does in the pipeline: run stage ``index``, or (index None) relay for the source."""

    device: str
    index: Optional[int]
    accepts: TensorSpec             # the tensor it takes
    next_device: Optional[str]      # who gets what it forwards

    def describe(self, manifest: Manifest) -> str:
        if self.index is None:
            return f"{self.device} (source, no stage of its own: relays requests to {self.next_device})"
        stage = manifest.stages[self.index]
        exits = [s.exit for s in stage.segments if s.exit]
        return (f"{self.device} (stage {self.index + 1} of {len(manifest.stages)}: blocks {stage.first_block}.."
                f"{stage.last_block}" + (f", exits {', '.join(exits)}" if exits else "") + ")")


def stage_role(manifest: Manifest, device: str, bundle: Path) -> Role:
    names = [st.name for st in manifest.stages]
    if device in names:
        index = names.index(device)
        if device == manifest.source and index != 0:
            raise DistreeError(f"{device} is the source and runs stage {index + 1}, not the first: serving such a "
                               "plan is not supported; re-plan so the source runs the first stage or none")
        return Role(device, index, manifest.stages[index].segments[0].input,
                    names[index + 1] if index + 1 < len(names) else None)
    if device == manifest.source:
        return Role(device, None, manifest.input, names[0])
    raise DistreeError(f"device {device!r} is not in the bundle {bundle} (stages: {', '.join(names)}; source: "
                       f"{manifest.source}); pass one of those to --device")


class _StageService:
    """The request handler: run the stage, answer or forward, relay the answer back."""

    def __init__(self, bundle: Path, manifest: Manifest, role: Role, next_address: Optional[str],
                 threads: int, forward_timeout_s: float, stream_slots: int, tls: Optional[Tls]) -> None:
        self.role, self.manifest = role, manifest
        self.bundle_id = sha256_file(bundle / MANIFEST)      # the same file on every device of one bundle
        policy = ExitPolicy(read_thresholds(bundle))
        self.exit_names = tuple(e.name for e in policy.table.exits)
        self.executor: Optional[StageExecutor] = None
        if role.index is not None:
            self.executor = StageExecutor(bundle, manifest, role.index, policy, threads)
        # requests run in turn, each on the gRPC thread that received it (the executor is not thread-safe); a
        # hand-off to one compute thread cost 0.12 ms per hop here. TVM's thread pool size is per calling
        # thread, so each thread sets it before its first run.
        self._turn = threading.Lock()
        self._threads = threads
        self._configured = threading.local()
        self.transfer_in_ms = 0.0 if role.index is None else transfer_in_ms(manifest)[role.index]
        self.forwards = role.accepts if self.executor is None else self.executor.output
        self.next_address = next_address
        self.forward_timeout_s = forward_timeout_s
        self._channel = open_channel(next_address, tls, CHANNEL_OPTIONS) if next_address else None
        self._link = Link(self._channel, INFER, INFER_STREAM) if self._channel else None
        self._next_stats = self._channel.unary_unary(STATS) if self._channel else None
        self.counters = StageCounters.for_stage(manifest, role.device, role.index)
        self._stream_slots = threading.BoundedSemaphore(stream_slots)

    def close(self) -> None:
        if self._channel is not None:
            self._link.close()
            self._channel.close()

    def info(self, _request: bytes, _context: grpc.ServicerContext) -> bytes:
        m = self.manifest
        return json.dumps({
            "device": self.role.device, "stage": self.role.index, "stages": [st.name for st in m.stages],
            "source": m.source, "accepts": self.role.accepts.to_dict(), "input": m.input.to_dict(),
            "exits": list(self.exit_names), "next": self.next_address,
            "model_sha256": m.model_sha256, "bundle": self.bundle_id,
        }).encode()

    def stats(self, _request: bytes, _context: grpc.ServicerContext) -> bytes:
        """This stage's counters, then those of every later stage (one that does not answer says why)."""
        later: list[dict] = []
        if self._next_stats is not None:
            try:
                later = json.loads(self._next_stats(b"", timeout=STATS_TIMEOUT_S).decode())
            except grpc.RpcError as exc:
                later = [{"device": self.role.next_device, "address": self.next_address,
                          "unreachable": f"{exc.code().name}: {exc.details()}"}]
        return json.dumps([self.counters.snapshot(), *later]).encode()

    def infer_stream(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Requests on one caller's persistent stream, answered in order; while open it holds a worker thread,
        so when the slots are taken the caller is told to call unary instead."""
        if not self._stream_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.role.device}: {NO_FREE_STREAM}")
        try:
            for data in frames:
                yield self.infer(data, context)
        finally:
            self._stream_slots.release()

    def infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        received = time.perf_counter()
        try:
            req = decode_request(data)
        except WireError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {exc}")
        self._check_bundle(req, context)
        self._check_tensor(req, context)
        elapsed_in = req.elapsed_ms + self.transfer_in_ms
        queued, outcome, failure = self._run(req, elapsed_in)
        if failure:
            self._abort(context, grpc.StatusCode.INTERNAL, failure)
        compute_ms = sum(outcome.segment_ms)
        if outcome.answer is not None:
            answer = outcome.answer
            name = self._answer_tensor(answer.exit)
            down = Reply(id=req.id, prediction=answer.prediction, exit=answer.exit, reason=answer.reason,
                         deadline_missed=False, late_at=None, hops=(), tensor=name, logits=answer.logits)
            forward_ms = 0.0
        else:
            sent = time.perf_counter()
            down = self._forward(req, outcome, elapsed_in + (sent - received) * 1e3, received, context)
            forward_ms = (time.perf_counter() - sent) * 1e3
        total_ms = (time.perf_counter() - received) * 1e3
        answered = outcome.answer
        taken = FORWARD if answered is None else DEADLINE if answered.reason == "deadline" else answered.exit
        self.counters.record(taken, queued, compute_ms, total_ms)
        hop = Hop(self.role.device, queued, compute_ms, forward_ms, total_ms)
        over = req.deadline_ms is not None and elapsed_in + total_ms > req.deadline_ms
        late_at = self.role.device if outcome.late else down.late_at
        return encode_reply(Reply(
            id=req.id, prediction=down.prediction, exit=down.exit, reason=down.reason,
            deadline_missed=down.deadline_missed or outcome.late or over, late_at=late_at,
            hops=(hop, *down.hops), tensor=down.tensor, logits=down.logits))

    def _run(self, req: Request, elapsed_in: float) -> tuple[float, StageOutcome, Optional[str]]:
        """(queue ms: waiting for the request before it, outcome, failure message)."""
        if self.executor is None:
            return 0.0, StageOutcome(None, req.x, False, ()), None
        if not getattr(self._configured, "tvm_threads", False):
            set_tvm_threads(self._threads)
            self._configured.tvm_threads = True
        arrived = time.perf_counter()
        with self._turn:
            queued = (time.perf_counter() - arrived) * 1e3
            try:
                return queued, self.executor.run(req.x, elapsed_in, req.deadline_ms), None
            except Exception as exc:  # a backend failure: report it to the caller, keep serving
                return queued, StageOutcome(None, None, False, ()), f"stage failed: {type(exc).__name__}: {exc}"

    def _answer_tensor(self, exit_name: str) -> str:
        if self.executor is None or exit_name != "final":
            return exit_name
        return self.executor.output.name

    def _check_bundle(self, req: Request, context: grpc.ServicerContext) -> None:
        """Stages of two bundles can pass shapes the other takes (a retrained model, a new plan with the same
        cuts) and would answer wrongly without a word: one device updated and not the others."""
        if req.bundle != self.bundle_id:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                        f"the request comes from bundle {req.bundle[:12]}, this device serves bundle "
                        f"{self.bundle_id[:12]} (made {self.manifest.created_utc}); every device must serve the "
                        f"same bundle: copy it again to the devices whose manifest.json differs")

    def _check_tensor(self, req: Request, context: grpc.ServicerContext) -> None:
        want = self.role.accepts
        if req.tensor != want.name:
            hint = (f"send requests to the source device ({self.manifest.source})"
                    if want.name != self.manifest.input.name else "send the model input")
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"got tensor {req.tensor!r}, this stage takes {want.name!r}; {hint}")
        if tuple(req.x.shape) != tuple(want.shape) or req.x.dtype.name != want.dtype:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"tensor {req.tensor} is {req.x.dtype.name} {list(req.x.shape)}, this stage takes "
                        f"{want.dtype} {list(want.shape)}")

    def _forward(self, req: Request, outcome: StageOutcome, elapsed_ms: float, received: float,
                 context: grpc.ServicerContext) -> Reply:
        """Hand the cut tensor on and return the next stage's answer; any failure aborts with a status
        that names the next stage's address, within the caller's own deadline."""
        timeout = self.forward_timeout_s
        if req.timeout_s is not None:           # the caller said how long it waits (a stream has no deadline)
            left = req.timeout_s - (time.perf_counter() - received)
        else:                                   # a unary call's own deadline (a caller that did not say)
            left = context.time_remaining()
        if left is not None:        # leave the caller time to receive our error before its own deadline
            timeout = max(min(timeout, left - min(0.5, 0.2 * left)), 0.01)
        frame = encode_request(Request(id=req.id, bundle=self.bundle_id, tensor=self.forwards.name,
                                       deadline_ms=req.deadline_ms, elapsed_ms=elapsed_ms, x=outcome.forward,
                                       timeout_s=timeout))
        try:
            data = self._link.call(frame, timeout)
        except grpc.RpcError as exc:
            self._abort(context, exc.code(), self._downstream_error(exc, timeout))
        try:
            reply = decode_reply(data)
        except WireError as exc:
            self._abort(context, grpc.StatusCode.INTERNAL, f"{self._next} sent a bad reply: {exc}")
        if reply.id != req.id:
            self._abort(context, grpc.StatusCode.INTERNAL, f"{self._next} answered request {reply.id}, not {req.id}")
        return reply

    @property
    def _next(self) -> str:
        return f"next stage {self.role.next_device} at {self.next_address}"

    def _downstream_error(self, exc: grpc.RpcError, timeout: float) -> str:
        if any(key == ORIGIN_KEY for key, _ in (exc.trailing_metadata() or ())):
            return f"via {self._next}: {exc.details()}"     # a later stage's own error, relayed as it is
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{self._next} did not answer within {timeout:.2f} s"
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return (f"{self._next} is unreachable ({exc.details()}); start `distree serve BUNDLE --device "
                    f"{self.role.next_device} --listen {self.next_address}` there")
        return f"{self._next} failed: {exc.code().name}: {exc.details()}"

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        self.counters.record(FAILED)
        context.set_trailing_metadata(((ORIGIN_KEY, self.role.device),))
        context.abort(code, f"{self.role.device}: {message}")


@dataclass
class StageServer:
    """A running stage; ``address`` is the one actually bound (``--listen HOST:0`` picks a free port)."""

    role: Role
    address: str
    description: str
    notes: tuple[str, ...]
    tls: bool                       # mutual TLS on its port and towards the next stage
    _server: grpc.Server
    _service: _StageService

    @property
    def bundle_id(self) -> str:
        """What every request must name (its sender's manifest SHA-256): print it, compare it across devices."""
        return self._service.bundle_id

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace_s: Optional[float] = None) -> None:
        self._server.stop(grace_s).wait()
        self._service.close()


def grpc_server(workers: int = WORKERS) -> grpc.Server:
    """The gRPC server every stage runs on (and the profiler's echo, so that it measures the same setup)."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                       options=[*CHANNEL_OPTIONS[:2], ("grpc.so_reuseport", 0)])


def _unbindable(host: str, port: int) -> Optional[str]:
    """Why ``host:port`` cannot be listened on (in use, not this machine's address), or None; asked before the
    stage loads, and before gRPC, which would log its own failure in C before distree's line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as gRPC: a TIME_WAIT port is free
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def serve_stage(bundle: str | Path, device: str, listen: str, next_address: Optional[str] = None, *,
                threads: int = 1, forward_timeout_s: float = 10.0, workers: int = WORKERS,
                tls: Optional[Tls] = None) -> StageServer:
    """Verify ``device``'s files of the bundle (other devices' folders need not be there), load its stage
    and start serving it on ``listen`` (returns at once); with ``tls``, mutual TLS both ways."""
    bundle = Path(bundle)
    busy = _unbindable(*parse_host_port(listen, "--listen"))
    if busy:
        raise DistreeError(f"cannot listen on {listen}: {busy}; pick another --listen")
    if next_address is not None:
        parse_host_port(next_address, "--next")
    manifest = read_manifest(bundle)
    role = stage_role(manifest, device, bundle)
    if role.next_device and next_address is None:
        raise DistreeError(f"{role.device} hands requests on to {role.next_device}: start `distree serve {bundle} "
                           f"--device {role.next_device} --listen HOST:PORT` there and pass --next HOST:PORT")
    if role.next_device is None and next_address is not None:
        raise DistreeError(f"{device} runs the last stage and answers every request itself; drop --next")
    if not 0 < forward_timeout_s < math.inf:
        raise DistreeError(f"--forward-timeout-s must be a finite number of seconds > 0, got {forward_timeout_s}")
    verify_bundle(bundle, devices=(device,), against_onnx=False)
    if workers <= UNARY_RESERVE:
        raise DistreeError(f"a stage server needs more than {UNARY_RESERVE} worker threads, got {workers}")
    service = _StageService(bundle, manifest, role, next_address, threads, forward_timeout_s,
                            stream_slots=workers - UNARY_RESERVE, tls=tls)
    server = grpc_server(workers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Infer": grpc.unary_unary_rpc_method_handler(service.infer),
        "InferStream": grpc.stream_stream_rpc_method_handler(service.infer_stream),
        "Info": grpc.unary_unary_rpc_method_handler(service.info),
        "Stats": grpc.unary_unary_rpc_method_handler(service.stats),
    }),))
    try:
        port = add_port(server, listen, tls)
    except RuntimeError:
        port = 0
    if port == 0:
        service.close()
        raise DistreeError(f"cannot listen on {listen}: the port is in use or the host is not an address of "
                           "this machine; pick another --listen")
    server.start()
    address = f"{listen.rpartition(':')[0]}:{port}"
    notes = tuple(service.executor.substitutions) if service.executor else ()
    return StageServer(role, address, role.describe(manifest), notes, tls is not None, server, service)
