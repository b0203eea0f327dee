"""Discrete-event simulation of one configuration (exits + placement) under load.

The numbers come from the solver's :class:`~distree.solver.problem.Problem`, so an unloaded request costs
exactly what :func:`distree.solver.costs.evaluate` charges it: blocks reached on their device, enabled heads
reached, every transfer, the return to the source. On top of that the simulator adds what the cost model
leaves out: contention. Every device is one FIFO server (one request at a time, a stage held for its whole
compute, and busy a while longer with the requests it receives and hands on, where the profile measured
that; a source without a stage only that, as the relay it is); every directed link is one FIFO serializer,
busy for the bytes/bandwidth + serialization part of a transfer, after which the propagation latency (plus
optional jitter) elapses without holding the link. The two directions of a link are separate serializers
(full duplex).

Jitter follows Linux netem's ``delay L J``: the propagation delay of each transfer is uniform in
[L - J, L + J] (clipped at 0), so its mean is L whenever J <= L and the cost model's expectation still holds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from distree.solver.costs import first_true
from distree.solver.problem import Problem
from distree.targets.spec import Topology
from distree.workload import Load, arrival_times_ms


@dataclass(frozen=True)
class Step:
    resource: int           # device index d, or a link (see Routes.resource_names)
    service_ms: float       # time the resource is held
    delay_ms: float         # after release, before the next step (link propagation)
    jitter_ms: float        # half-width of the uniform propagation jitter
    hold_ms: float = 0.0    # the resource stays busy this much longer without delaying the request: a stage's
    #                         handling of the request it received and handed on (its latency is in the hop)
    hop: int = -1           # a forward hop (a * D + b) whose software delay depends on how long it sat idle


@dataclass(frozen=True)
class Routes:
    """Per sample: the resources it visits in order; and what the cost model says about it alone."""

    steps: tuple[tuple[Step, ...], ...]
    base_ms: np.ndarray             # [N] latency of the sample alone in the system (= cost model)
    leave: np.ndarray               # [N] exit index the sample leaves at (E: the final classifier)
    correct: np.ndarray             # [N] bool, the answer it returns is right
    resource_names: tuple[str, ...]  # devices first, then every directed link "a->b"
    n_devices: int
    hop_gaps_ms: np.ndarray = field(default_factory=lambda: np.zeros(1))   # [G] idle gaps measured, from 0
    hop_extra_ms: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))  # [D * D, G] a hop's delay
    #                                 beyond the route's after each gap (none measured: one column of zeros)

    @property
    def mean_service_ms(self) -> np.ndarray:
        """[R] expected time each resource is held per request (its inverse is its capacity)."""
        total = np.zeros(len(self.resource_names))
        for steps in self.steps:
            for s in steps:
                total[s.resource] += s.service_ms + s.hold_ms
        return total / len(self.steps)


def link_resource(p: Problem, a: int, b: int) -> int:
    return p.n_devices + a * p.n_devices + b


def resource_names(p: Problem) -> tuple[str, ...]:
    links = tuple(f"{a}->{b}" for a in p.devices for b in p.devices)
    return p.devices + links


def build_routes(p: Problem, topology: Topology, levels: np.ndarray, placement: np.ndarray) -> Routes:
    """Each sample's path: it leaves at the first enabled exit it passes (its own calibration scores)."""
    levels = np.asarray(levels, dtype=int)
    pl = np.asarray(placement, dtype=int)
    B, E, src = p.n_blocks, p.n_exits, p.source
    latency = np.array([[topology.link(a, b).latency_ms if a != b else 0.0 for b in p.devices] for a in p.devices])
    jitter = np.array([[topology.link(a, b).jitter_ms if a != b else 0.0 for b in p.devices] for a in p.devices])
    enabled = levels > 0
    passes = (p.passed_level >= levels[None, :]) & enabled[None, :]
    leave = first_true(passes)
    bounds = [0] + [int(i) + 1 for i in np.nonzero(np.diff(pl))[0]] + [B]
    stages = list(zip(bounds, bounds[1:]))

    software = p.hop_ms if p.hop_ms is not None else np.zeros((p.n_devices, p.n_devices))
    handling = p.handling

    def transfer(a: int, b: int, total_ms: float, forward: bool = True) -> list[Step]:
        """The link is busy for the bytes; its latency and a forward hop's software (call, gRPC) only delay
        (the reply of that round trip is part of it: returning the logits adds the link alone)."""
        if a == b:
            return []
        delay = latency[a, b] + (software[a, b] if forward else 0.0)
        return [Step(link_resource(p, a, b), total_ms - delay, delay, jitter[a, b], hop=a * p.n_devices + b
                     if forward else -1)]

    cache: dict[int, tuple[Step, ...]] = {}
    for k in np.unique(leave):          # the route depends only on where the sample leaves
        last_block = int(p.exit_after[k]) if k < E else B - 1
        heads = np.nonzero(enabled & (np.arange(E) <= k))[0]
        # a source without a stage relays: it receives the request and hands it on (busy, no delay of its own)
        relay = [Step(src, 0.0, 0.0, 0.0, float(handling[src].sum()))] if src not in pl and handling[src].any() else []
        steps = relay + transfer(src, int(pl[0]), p.cut_ms[src, pl[0], 0])
        for first, end in stages:
            d = int(pl[first])
            if first > 0:
                steps += transfer(int(pl[first - 1]), d, p.cut_ms[pl[first - 1], d, first])
            last = min(end - 1, last_block)
            on_here = heads[(p.exit_after[heads] >= first) & (p.exit_after[heads] <= last)]
            handled = handling[d, 0] + (handling[d, 1] if last_block >= end else 0.0)
            steps.append(Step(d, float(p.block_ms[d, first:last + 1].sum() + p.head_ms[d, on_here].sum()), 0.0, 0.0,
                              float(handled)))
            if last_block < end:
                break
        exit_device = int(pl[last_block])
        steps += transfer(exit_device, src, p.return_ms[exit_device], forward=False)
        cache[int(k)] = tuple(steps)
    steps_per_sample = tuple(cache[int(k)] for k in leave)
    base = np.array([sum(s.service_ms + s.delay_ms for s in steps) for steps in steps_per_sample])
    answers = np.concatenate([p.correct_exit, p.correct_final[:, None]], axis=1)
    gaps, extra = np.zeros(1), np.zeros((p.n_devices ** 2, 1))
    if p.hop_by_gap_ms is not None:     # what a hop costs after idle time, against what the route charges
        gaps = p.hop_gaps_ms
        extra = (p.hop_by_gap_ms - software[..., None]).reshape(p.n_devices ** 2, -1)
    return Routes(steps=steps_per_sample, base_ms=base, leave=leave, correct=answers[np.arange(p.n_samples), leave],
                  resource_names=resource_names(p), n_devices=p.n_devices, hop_gaps_ms=gaps, hop_extra_ms=extra)


@dataclass(frozen=True)
class Trace:
    """What happened to every request of one run."""

    samples: np.ndarray         # [n] calibration sample each request replayed
    latency_ms: np.ndarray      # [n] arrival at the source -> answer back at the source
    wait_ms: np.ndarray         # [n] time spent queued for busy resources
    arrive_ms: np.ndarray       # [n]
    done_ms: np.ndarray         # [n]
    busy_ms: np.ndarray         # [R] total time each resource was held


def request_order(n_samples: int, n_requests: int, rng: np.random.Generator) -> np.ndarray:
    """Requests replay the samples in seeded random passes: every sample once per pass."""
    passes = -(-n_requests // n_samples)
    return np.concatenate([rng.permutation(n_samples) for _ in range(passes)])[:n_requests]


def run(routes: Routes, load: Load, n_requests: int, seed: int = 0, jitter: bool = True) -> Trace:
    """Event-driven: each request walks its route; a resource serves arrivals in time order (FIFO). A forward
    hop's software delay follows how long that hop sat idle before it (gRPC's threads fall asleep; the profile's
    ``rpc:idle`` entries), from the end of its previous use; the first use of a hop finds it idle.

    Latency is accumulated per request as (alone-in-the-system latency + waits + jitter offsets + hop delay
    against the route's) instead of subtracting absolute clock times, so it stays exact at vanishing rates where
    clocks grow huge.
    """
    rng = np.random.default_rng(seed)
    samples = request_order(len(routes.steps), n_requests, rng)
    jitter_rng = np.random.default_rng([seed, 1])
    free = [0.0] * len(routes.resource_names)
    busy = [0.0] * len(routes.resource_names)
    wait = [0.0] * n_requests
    shift = [0.0] * n_requests
    arrive = [0.0] * n_requests
    done = [0.0] * n_requests
    if load.rate is not None:       # the same seed scales the same draws: runs at two rates are comparable
        arrive = arrival_times_ms(load.rate, n_requests, rng).tolist()
    gaps, extra = routes.hop_gaps_ms, routes.hop_extra_ms
    idle_since = [-np.inf] * len(extra)     # per hop: when its last request was through
    first = n_requests if load.rate is not None else min(load.clients, n_requests)
    heap = [(arrive[r], r, r, 0) for r in range(first)]     # (time, tie-break, request, step)
    heapq.heapify(heap)
    seq = issued = first
    while heap:
        t, _, r, k = heapq.heappop(heap)
        steps = routes.steps[samples[r]]
        if k == len(steps):
            done[r] = t
            if load.clients is not None and issued < n_requests:
                arrive[issued] = t
                heapq.heappush(heap, (t, seq, issued, 0))
                seq += 1
                issued += 1
            continue
        step = steps[k]
        start = free[step.resource] if free[step.resource] > t else t
        wait[r] += start - t
        end = start + step.service_ms
        free[step.resource] = end + step.hold_ms
        busy[step.resource] += step.service_ms + step.hold_ms
        delay = step.delay_ms
        if jitter and step.jitter_ms > 0:
            delay = max(0.0, delay + jitter_rng.uniform(-step.jitter_ms, step.jitter_ms))
        if step.hop >= 0 and len(gaps) > 1:
            delay += float(np.interp(start - idle_since[step.hop], gaps, extra[step.hop]))
            idle_since[step.hop] = end + delay
        shift[r] += delay - step.delay_ms
        heapq.heappush(heap, (end + delay, seq, r, k + 1))
        seq += 1
    wait_arr = np.asarray(wait)
    return Trace(samples=samples, latency_ms=routes.base_ms[samples] + wait_arr + np.asarray(shift),
                 wait_ms=wait_arr, arrive_ms=np.asarray(arrive), done_ms=np.asarray(done), busy_ms=np.asarray(busy))


@dataclass(frozen=True)
class Summary:
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_wait_ms: float
    throughput_rps: float
    utilisation: dict[str, float]     # share of the run each device (and each used link) was busy


def summarize(routes: Routes, trace: Trace) -> Summary:
    span = float(trace.done_ms.max() - trace.arrive_ms.min())
    util = {name: float(b / span) if span > 0 else 0.0
            for i, (name, b) in enumerate(zip(routes.resource_names, trace.busy_ms)) if i < routes.n_devices or b > 0}
    lat = trace.latency_ms
    return Summary(mean_ms=float(lat.mean()), p50_ms=float(np.percentile(lat, 50)),
                   p90_ms=float(np.percentile(lat, 90)), p99_ms=float(np.percentile(lat, 99)),
                   mean_wait_ms=float(trace.wait_ms.mean()),
                   throughput_rps=len(lat) / span * 1000.0 if span > 0 else float("inf"), utilisation=util)
