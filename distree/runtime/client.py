"""``distree infer``: send samples to a served pipeline (its source device) and report what came back."""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import grpc
import numpy as np

from distree.errors import DistreeError
from distree.exits import Dataset
from distree.runtime.backends import percentiles_ms
from distree.compiler.manifest import TensorSpec
from distree.runtime.executor import FINAL, check_input
from distree.runtime.link import Link
from distree.runtime.tls import Tls, open_channel
from distree.runtime.server import CHANNEL_OPTIONS, INFER, INFER_STREAM, INFO, ORIGIN_KEY, STATS
from distree.runtime.stats import PipelineStats, pipeline_stats
from distree.targets.topology import parse_host_port
from distree.runtime.wire import Reply, Request, WireError, decode_reply, encode_request
from distree.serde import JsonRecord
from distree.workload import Load, arrival_times_ms


class ServeError(DistreeError):
    """The served pipeline did not answer: the message names the stage and address that failed."""


class InferenceClient:
    """One channel to the source device's server; ``infer`` sends one sample (batch 1) and waits for its answer.

    Every call has a timeout (``timeout_s``), so a dead or stuck pipeline is an error, never a hang.
    """

    def __init__(self, address: str, timeout_s: float = 10.0, tls: Optional[Tls] = None) -> None:
        parse_host_port(address, "address")
        self.address = address
        if not 0 < timeout_s < math.inf:     # nan fails too
            raise DistreeError(f"--timeout-s must be a finite number of seconds > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._channel = open_channel(address, tls, CHANNEL_OPTIONS)
        self._link = Link(self._channel, INFER, INFER_STREAM)
        self._info = self._channel.unary_unary(INFO)
        self._stats = self._channel.unary_unary(STATS)
        self._server_info: Optional[dict[str, Any]] = None

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._link.close()
        self._channel.close()

    def info(self) -> dict[str, Any]:
        """What the server runs: its device, stage, the pipeline's stages and the tensor it accepts."""
        return json.loads(self._call(self._info, b"").decode())

    def stats(self) -> PipelineStats:
        """The counters of every stage from this server on (the source's: the whole pipeline), drift tested."""
        try:
            snapshots = json.loads(self._stats(b"", timeout=self.timeout_s).decode())
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ServeError(f"{self.address} runs a distree from before `distree stats`: restart its "
                                 "`distree serve` with this version") from None
            raise ServeError(_client_error(self.address, exc, self.timeout_s)) from None
        return pipeline_stats(self.address, snapshots)

    def infer(self, x: np.ndarray, deadline_ms: Optional[float] = None, request_id: Optional[str] = None) -> Reply:
        """The pipeline's answer for one sample ``x`` (with or without its batch axis of 1)."""
        if deadline_ms is not None and deadline_ms < 0:
            raise DistreeError("--deadline-ms must be >= 0")
        rid = request_id or uuid.uuid4().hex
        accepts = self._accepts()
        x = np.asarray(x)
        if x.ndim == len(accepts["shape"]) - 1:
            x = x[None]
        frame = encode_request(Request(id=rid, bundle=self._server_info["bundle"], tensor=accepts["name"],
                                       deadline_ms=deadline_ms, elapsed_ms=0.0, x=x, timeout_s=self.timeout_s))
        try:
            reply = decode_reply(self._call(self._link.call, frame))
        except WireError as exc:
            raise ServeError(f"{self.address} sent a bad reply: {exc}") from None
        if reply.id != rid:
            raise ServeError(f"{self.address} answered request {reply.id}, not {rid}")
        return reply

    def _accepts(self) -> dict[str, Any]:
        """The tensor the server takes, asked once; a server of a later stage is refused."""
        if self._server_info is None:
            doc = self.info()
            if doc["accepts"]["name"] != doc["input"]["name"]:
                raise ServeError(f"{self.address} serves {doc['device']} (stage {doc['stage'] + 1} of "
                                 f"{len(doc['stages'])}), which takes {doc['accepts']['name']} from the stage before; "
                                 f"send requests to the server of the source device {doc['source']}")
            self._server_info = doc
        return self._server_info["accepts"]

    def _call(self, method, frame: bytes) -> bytes:
        try:
            return method(frame, self.timeout_s)
        except grpc.RpcError as exc:
            raise ServeError(_client_error(self.address, exc, self.timeout_s)) from None


def _client_error(address: str, exc: grpc.RpcError, timeout_s: float) -> str:
    """A stage's own error (it names the stage and the address that failed) or a transport error."""
    code, details = exc.code(), exc.details()
    if any(key == ORIGIN_KEY for key, _ in (exc.trailing_metadata() or ())):
        return f"{address}: {code.name}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{address} did not answer within {timeout_s:g} s (--timeout-s)"
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"cannot reach {address} ({details}); start the source device's server there: "
                f"distree serve BUNDLE --device SOURCE --listen {address} (a server with --tls-* answers only "
                "clients with --tls-* certificates from its CA, and its certificate must name that host)")
    return f"{address}: {code.name}: {details}"


@dataclass(frozen=True)
class HopStats(JsonRecord):
    """One device's share of the requests that reached it (ms percentiles on that device's clock)."""

    device: str
    reached: int
    compute: dict[str, float]
    total: dict[str, float]         # receipt to reply, everything downstream included
    link: dict[str, float]          # to the next stage and back, minus that stage's own time (network + framing)


@dataclass(frozen=True)
class InferReport(JsonRecord):
    address: str
    stages: tuple[str, ...]         # the served pipeline, in order
    samples: int
    predictions: tuple[int, ...]
    exits: tuple[str, ...]
    reasons: tuple[str, ...]        # "threshold", "deadline" or "final" per sample
    latency_ms: tuple[float, ...]   # end to end, measured by this client (under --rate: from the request's arrival)
    exit_rates: dict[str, float]
    accuracy: Optional[float]
    deadline_ms: Optional[float]
    deadline_exits: int             # answered early from an exit to keep the deadline
    deadline_missed: int            # answered after the deadline (or found lost with no exit at hand)
    end_to_end: dict[str, float]
    client_link: dict[str, float]   # this client to the source server and back, minus the server's time
    hops: tuple[HopStats, ...]
    workload: str                   # Load.label: "1 client(s)" when sent one at a time
    rate_rps: Optional[float]       # Poisson arrivals (open loop), or None
    clients: Optional[int]          # back-to-back requesters (closed loop), or None
    throughput_rps: float           # answers per second, first arrival to last answer
    client_wait_ms: dict[str, float]    # open loop: arrival to send (timer overshoot; a queue when every sender
    #                                     is busy); 0 in a closed loop


OPEN_LOOP_SENDERS = 8   # requests in flight at most under a rate; later arrivals wait in the client, counted


@dataclass(frozen=True)
class _Driven:
    """What a load did: per request its reply, arrival -> answer, send -> answer, arrival -> send (ms)."""

    replies: list[Reply]
    latency_ms: list[float]
    service_ms: list[float]
    wait_ms: list[float]
    span_s: float


def infer_dataset(client: InferenceClient, data: Dataset, deadline_ms: Optional[float] = None,
                  limit: Optional[int] = None, load: Optional[Load] = None, seed: int = 0) -> InferReport:
    """Send every sample of ``data`` under ``load`` (default: one at a time) and collect answers, exits and
    timings. Under a rate (open loop, ``seed`` draws the arrivals) a request's latency runs from its arrival,
    so a pipeline that falls behind shows it as the simulator's queue does (no coordinated omission)."""
    load = load or Load(clients=1)
    info = client.info()
    check_input(TensorSpec.from_dict(info["input"]), data.x, "the served bundle")
    x = data.x if limit is None else data.x[:limit]

    def send(i: int) -> Reply:
        return client.infer(x[i:i + 1], deadline_ms=deadline_ms, request_id=f"{i}")

    if load.rate is None:
        driven = _drive(send, len(x), load.clients)
    else:
        arrive_s = arrival_times_ms(load.rate, len(x), np.random.default_rng(seed)) / 1e3
        driven = _drive(send, len(x), OPEN_LOOP_SENDERS, arrive_s)
    replies, latency = driven.replies, driven.latency_ms
    n = len(replies)
    predictions = [r.prediction for r in replies]
    exits = [r.exit for r in replies]
    accuracy = float((np.asarray(predictions) == data.y[:n]).mean()) if data.y is not None and n else None
    return InferReport(
        address=client.address, stages=tuple(info["stages"]), samples=n, predictions=tuple(predictions),
        exits=tuple(exits), reasons=tuple(r.reason for r in replies), latency_ms=tuple(latency),
        exit_rates={name: exits.count(name) / max(n, 1) for name in [*info["exits"], FINAL]}, accuracy=accuracy,
        deadline_ms=deadline_ms, deadline_exits=sum(r.reason == "deadline" for r in replies),
        deadline_missed=sum(r.deadline_missed for r in replies), end_to_end=percentiles_ms(latency),
        client_link=percentiles_ms([ms - r.hops[0].total_ms for ms, r in zip(driven.service_ms, replies)]),
        hops=_hop_stats(replies), workload=load.label, rate_rps=load.rate, clients=load.clients,
        throughput_rps=n / driven.span_s if driven.span_s > 0 else float("inf"),
        client_wait_ms=percentiles_ms(driven.wait_ms))


def _drive(send: Callable[[int], Reply], n: int, senders: int, arrive_s: Optional[np.ndarray] = None) -> _Driven:
    """Requests 0..n-1 by ``senders`` threads, each taking the next one in turn. Closed loop (``arrive_s`` None):
    a sender sends as soon as its last answer is back (one sender: in this thread). Open loop: request i arrives
    ``arrive_s[i]`` s after the start whatever the answers do; its sender sleeps until then (a dispatcher handing
    arrivals to senders added a thread wake-up to each), and when every sender is busy it waits for the first one
    free, a wait that is part of its latency."""
    replies: list[Optional[Reply]] = [None] * n
    latency, service, wait, answered = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    order = itertools.count()           # next() on a count is atomic: each request is sent once
    stop = threading.Event()            # a request failed, or Ctrl-C: the others send no more
    start = time.perf_counter() + (0.0 if arrive_s is None else 0.01)   # the senders start before the first arrival

    def sender() -> None:
        while not stop.is_set():
            i = next(order)
            if i >= n:
                return
            arrival = None if arrive_s is None else start + arrive_s[i]
            if arrival is not None and arrival > time.perf_counter() and stop.wait(arrival - time.perf_counter()):
                return
            sent = time.perf_counter()
            try:
                replies[i] = send(i)
            except BaseException:
                stop.set()
                raise
            answered[i] = time.perf_counter()
            service[i] = (answered[i] - sent) * 1e3
            wait[i] = 0.0 if arrival is None else (sent - arrival) * 1e3
            latency[i] = service[i] + wait[i]

    try:
        if senders == 1 and arrive_s is None:
            sender()
        else:
            with ThreadPoolExecutor(senders, thread_name_prefix="distree-sender") as pool:
                futures = [pool.submit(sender) for _ in range(senders)]
                try:
                    for future in futures:
                        future.result()         # the first error is raised; the others stop sending
                except BaseException:
                    stop.set()
                    raise
    except KeyboardInterrupt:
        got = sum(r is not None for r in replies)
        raise KeyboardInterrupt(f"Ctrl-C: {got} of {n} requests answered, no report written; --limit sends "
                                "fewer") from None
    return _Driven(replies, latency, service, wait, max(answered, default=start) - start)


def _hop_stats(replies: list[Reply]) -> tuple[HopStats, ...]:
    order: list[str] = []
    compute: dict[str, list[float]] = {}
    total: dict[str, list[float]] = {}
    link: dict[str, list[float]] = {}
    for reply in replies:
        for k, hop in enumerate(reply.hops):
            if hop.device not in compute:
                order.append(hop.device)
                compute[hop.device], total[hop.device], link[hop.device] = [], [], []
            compute[hop.device].append(hop.compute_ms)
            total[hop.device].append(hop.total_ms)
            if k + 1 < len(reply.hops):
                link[hop.device].append(hop.forward_ms - reply.hops[k + 1].total_ms)
    return tuple(HopStats(device=d, reached=len(compute[d]), compute=percentiles_ms(compute[d]),
                          total=percentiles_ms(total[d]), link=percentiles_ms(link[d])) for d in order)
