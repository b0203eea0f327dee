"""What running a bundle costs beyond its kernels: calling a sub-segment, deciding at an exit, and a hop.

Each block and head is profiled as a standalone model, so each measurement carries one call's fixed cost
(``session.run``, the VM's invoke). A bundle pays that cost once per sub-segment it runs, after every exit head
the runtime scores the logits and compares the score with the threshold in Python, and every hop to the next
device is a gRPC call. Without these, plans with many exits looked cheaper than they run and long stages
dearer (``benchmarks/predicted_vs_measured.py``), and a hop cost only its link's latency and bandwidth.

- ``call``: a one-op model profiled like every other unit (same backends, same modes), so it measures the
  fixed cost that every other entry of the same device and backend includes;
- ``decide:<score kind>``: ``ExitPolicy.decide`` on one sample's logits;
- ``rpc``: a request to a stage that only answers, in another process: distree's gRPC server setup, frames
  and turn-taking, no model: what a hop costs in software beyond its link and its compute;
- ``serve:receive`` / ``serve:forward``: the CPU that stage, and the process sending to it, spend per request
  when requests keep coming: what occupies a served device beyond its compute (on loopback a stage spent
  0.4-0.76 ms of CPU a request around 0.1 ms of compute, ``benchmarks/served_vs_simulated.py``).
- ``rpc:idle:<gap>ms``: the same round trip for a request that follows the previous one by that gap: back to
  back, gRPC's threads on both ends are awake; after a few idle milliseconds each hand-off pays for waking one
  (0.47 -> 1.47 ms on this VM's loopback after 8 ms or more; a raw socket pays 0.03 -> 0.12): what a lone
  request pays per hop, which the served pipeline showed as latencies 3-4x the prediction under random arrivals.
All but ``call`` run Python, which TVM RPC cannot run on a device: ``decide`` is timed here and scaled by
per-core speed for another device, ``rpc*`` and ``serve:*`` are the floor timed here (see :func:`hop_entries`);
each entry says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from distree.errors import DistreeError
from distree.exits.types import SCORE_KINDS
from distree.lifetime import dies_with_this_process
from distree.profiler.estimate import per_core_gflops
from distree.profiler.timing import TimingSettings, summarize, time_callable
from distree.profiler.types import Measurement
from distree.profiler.items import HANDLING_ITEMS, IDLE_GAPS_MS, IDLE_RPC_ITEMS, RPC_ITEM, decide_item
from distree.targets.catalog import host_device
from distree.targets.spec import DeviceSpec

DECIDE_BACKEND = "python"
RPC_BACKEND = "grpc"
ECHO_SERVICE = "distree.Echo"
RPC_FRAME_BYTES = 4096      # a cut tensor of the example's size; bytes over the link are the link's own cost
RPC_CLASSES = 10
HANDLING_SENDERS = 4        # requesters back to back while a stage's CPU per request is measured
HANDLING_WARMUP = 20        # requests each before the rounds (streams opened, threads warm)
HANDLING_REQUESTS = 60      # per sender and round
HANDLING_ROUNDS = 5
IDLE_SAMPLES = 15           # round trips per idle gap (~0.8 s for the gaps together)


def time_decide(score_kind: str, classes: int, timing: TimingSettings) -> tuple[float, ...]:
    """Samples (ms) of the runtime's exit decision for one sample of ``classes`` logits, on this machine."""
    from distree.compiler.manifest import ThresholdEntry, ThresholdTable
    from distree.runtime.policy import ExitPolicy

    table = ThresholdTable(score_kind=score_kind, score_definition="",
                           exits=(ThresholdEntry(name="e", after_block=0, device="host", threshold=2.0),))
    policy = ExitPolicy(table)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, classes)).astype(np.float32)
    entry = rng.standard_normal((1, classes)).astype(np.float32) if score_kind == "stability" else None
    return time_callable(lambda: policy.decide("e", logits, entry), timing)


def _reply_to(data: bytes, turn) -> bytes:
    """What a stage does with a request but run it: check the frame, wait for its turn, frame a reply with its
    hop."""
    from distree.runtime.wire import Hop, Reply, decode_request, encode_reply

    req = decode_request(data)
    with turn:
        logits = req.x.reshape(-1)[None, :RPC_CLASSES]
    return encode_reply(Reply(id=req.id, prediction=0, exit="final", reason="final", deadline_missed=False,
                              late_at=None, hops=(Hop("echo", 0.0, 0.0, 0.0, 0.0),), tensor="logits", logits=logits))


def serve_echo() -> None:
    """A stage that only answers (``python -c``: the profiler's peer for ``rpc``): distree's server setup, frames
    and turn-taking, no model; ``Cpu`` answers the CPU seconds it has used. Prints its port."""
    import threading
    import time

    import grpc

    from distree.runtime.server import grpc_server

    turn = threading.Lock()
    server = grpc_server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda data, _context: _reply_to(data, turn)),
        "EchoStream": grpc.stream_stream_rpc_method_handler(
            lambda frames, _context: (_reply_to(data, turn) for data in frames)),
        "Cpu": grpc.unary_unary_rpc_method_handler(lambda _data, _context: repr(time.process_time()).encode())}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


@dataclass(frozen=True)
class HopTiming:
    """What a hop costs in software on this machine (ms): its round trip as a caller waits for it, back to back
    and after each of IDLE_GAPS_MS idle, and the CPU each end spends per request when requests keep coming (the
    receiving stage's, the stage handing it on)."""

    round_trip: tuple[float, ...]
    receive_cpu: tuple[float, ...]
    forward_cpu: tuple[float, ...]
    after_idle: tuple[tuple[float, ...], ...]       # one tuple of round trips per gap of IDLE_GAPS_MS


@functools.lru_cache(maxsize=4)
def time_hop(timing: TimingSettings) -> HopTiming:
    """One request at a time to a stage that only answers, in another process on this machine: what a hop between
    two stages costs in software (gRPC, frames, turn-taking), beyond the link's latency and bandwidth and the
    stage's own compute; back to back, then each request after an idle gap. Then HANDLING_SENDERS requesters
    back to back, in HANDLING_ROUNDS rounds: the CPU time of both processes per request, which occupies a served
    stage's device under load (a round trip alone is mostly waiting). Once per process and settings: every
    device's entries are this machine's figures."""
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from distree.runtime.link import Link
    from distree.runtime.server import CHANNEL_OPTIONS
    from distree.runtime.wire import Request, decode_reply, encode_request

    peer = subprocess.Popen(dies_with_this_process([sys.executable, "-c", "from distree.profiler.dispatch import "
                                                    "serve_echo; serve_echo()"]), stdout=subprocess.PIPE, text=True)
    try:
        port = peer.stdout.readline().strip()
        if not port.isdigit() or port == "0":
            raise DistreeError("the profiler's gRPC echo process did not start; is port binding on 127.0.0.1 "
                               "allowed here?")
        x = np.zeros((1, RPC_FRAME_BYTES // 4), np.float32)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            link = Link(channel, f"/{ECHO_SERVICE}/Echo", f"/{ECHO_SERVICE}/EchoStream")
            peer_cpu = channel.unary_unary(f"/{ECHO_SERVICE}/Cpu")

            def hop() -> None:
                frame = encode_request(Request(id="rpc", bundle="rpc", tensor="x", deadline_ms=None, elapsed_ms=0.0,
                                               x=x, timeout_s=10.0))
                decode_reply(link.call(frame, 10.0))

            def after(gap_ms: int) -> float:
                time.sleep(gap_ms / 1e3)
                started = time.perf_counter()
                hop()
                return (time.perf_counter() - started) * 1e3

            try:
                round_trip = time_callable(hop, timing)
                after_idle = _after_idle_gaps(after)
                with ThreadPoolExecutor(HANDLING_SENDERS) as pool:     # the same threads, so the same streams

                    def senders(count: int) -> None:
                        for done in [pool.submit(lambda: [hop() for _ in range(count)])
                                     for _ in range(HANDLING_SENDERS)]:
                            done.result()           # a failed request is the profiler's error, not a lost thread
                    senders(HANDLING_WARMUP)
                    receive, forward = [], []
                    for _ in range(HANDLING_ROUNDS):
                        theirs, ours = float(peer_cpu(b"", timeout=10.0)), time.process_time()
                        senders(HANDLING_REQUESTS)
                        requests = HANDLING_SENDERS * HANDLING_REQUESTS
                        receive.append((float(peer_cpu(b"", timeout=10.0)) - theirs) * 1e3 / requests)
                        forward.append((time.process_time() - ours) * 1e3 / requests)
                return HopTiming(round_trip, tuple(receive), tuple(forward), after_idle)
            finally:
                link.close()
    finally:
        peer.kill()
        peer.wait()


def _after_idle_gaps(after) -> tuple[tuple[float, ...], ...]:
    """IDLE_SAMPLES round trips ``after(gap)`` per gap of IDLE_GAPS_MS, the gaps in a seeded random order each
    round: gaps mixed as random arrivals mix them (a 1 ms gap costs more after a 32 ms one than in a run of 1 ms
    gaps), and a busy spell here shifts every gap alike."""
    rng = np.random.default_rng(0)
    samples: list[list[float]] = [[] for _ in IDLE_GAPS_MS]
    for _ in range(IDLE_SAMPLES):
        for k in rng.permutation(len(IDLE_GAPS_MS)):
            samples[k].append(after(IDLE_GAPS_MS[k]))
    return tuple(map(tuple, samples))


def hop_entries(device: DeviceSpec, timing: TimingSettings, measured_here: bool) -> list[Measurement]:
    """The ``rpc`` entry (one hop's software round trip), its ``rpc:idle:<gap>ms`` entries (the same after an idle
    gap) and the ``serve:receive`` / ``serve:forward`` entries (a stage's CPU per request it receives / hands on).
    For another device they are the floor timed here, not scaled: per-core peak FLOP/s would charge a Pi 4 ~10 ms
    per hop, far above what its gRPC is reported to take, and nothing here can measure it; a floor keeps hops
    honest without forbidding them."""
    hop = time_hop(timing)
    note = f"timed on this machine, not on {device.name}: a lower bound for a slower CPU"
    return [_timed_here(device, item, RPC_BACKEND, samples, timing, measured_here, 1.0, f"{what} {note}",
                        "none: no model")
            for item, samples, what in ((RPC_ITEM, hop.round_trip, "gRPC round trip"),
                                        (HANDLING_ITEMS[0], hop.receive_cpu, "a stage's CPU per request received,"),
                                        (HANDLING_ITEMS[1], hop.forward_cpu, "a stage's CPU per request handed on,"),
                                        *((item, samples, f"gRPC round trip {gap} ms after the previous one,")
                                          for item, samples, gap in zip(IDLE_RPC_ITEMS, hop.after_idle,
                                                                        IDLE_GAPS_MS)))]


def decide_entries(device: DeviceSpec, classes: int, timing: TimingSettings, measured_here: bool,
                   score_kinds: Sequence[str] = SCORE_KINDS) -> list[Measurement]:
    """One ``decide:<kind>`` entry per score kind: measured when profiling this machine, else scaled by per-core
    speed (like every estimated fixed cost) and labelled an estimate."""
    slow = 1.0 if measured_here else per_core_gflops(host_device()) / per_core_gflops(device)
    note = (f"exit decisions (Python) on {device.name}: timed on this machine and scaled by per-core speed "
            f"(x{slow:.2f}), not measured there")
    return [_timed_here(device, decide_item(kind), DECIDE_BACKEND, time_decide(kind, classes, timing), timing,
                        measured_here, slow, note, "none: Python on the logits") for kind in score_kinds]


def _timed_here(device: DeviceSpec, item: str, backend: str, samples: tuple[float, ...], timing: TimingSettings,
                measured_here: bool, slow: float, note: str, memory_source: str) -> Measurement:
    """An entry timed on this machine: as measured when profiling it, else ``slow`` times its fastest sample, an
    estimate with ``note`` saying how it was obtained. The fastest, since this machine's interference is not the
    device's: a median once caught a busy spell here (decide 0.19 ms for the Pi 4 against 0.07 in every other run,
    the first command's plan 1.652 ms against 1.535)."""
    median, p90 = summarize(samples) if measured_here else (min(samples), min(samples))
    return Measurement(device=device.name, item=item, backend=backend,
                       provenance="local" if measured_here else "estimate",
                       samples_ms=samples if measured_here else (), median_ms=median * slow, p90_ms=p90 * slow,
                       param_bytes=0, activation_bytes=0, memory_source=memory_source, threads=timing.threads,
                       note="" if measured_here else note)
