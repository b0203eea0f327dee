"""The planning problem as plain numbers, built once from chain, calibration, profile and topology.

Everything the solvers (MILP, brute force, heuristics) need is in :class:`Problem`; they never look at
ONNX, profiles or links again. That keeps the solver core testable on random instances and makes the
cost model one readable function (:mod:`distree.solver.costs`).

Exits are ordered along the chain (by ``after_block``, then by their calibration column). Threshold
levels are 1-based: level ``l`` of exit ``j`` is ``thresholds[j][l-1]``, level 0 means "exit off".
Because the grid is ascending, a sample passes level ``l`` iff ``l <= passed_level[i, j]``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from distree.errors import DistreeError
from distree.exits.confidence import clopper_pearson_lower
from distree.exits.types import DEFAULT_LEVELS, MAX_LEVELS, Calibration
from distree.graph.chain import Chain
from distree.profiler.items import CALL_ITEM, HANDLING_ITEMS, IDLE_GAPS_MS, IDLE_RPC_ITEMS, RPC_ITEM, decide_item
from distree.profiler.types import Profile
from distree.targets.spec import DeviceSpec, Topology

SPORADIC = "sporadic"       # each request finds the pipeline idle: a hop costs its round trip after idle time
STEADY = "steady"           # requests back to back: a hop costs its round trip with gRPC's threads awake
TRAFFIC = (SPORADIC, STEADY)

@dataclass(frozen=True)
class Constraints:
    """What the user asks of a plan (the CLI flags of ``distree plan``)."""

    accuracy_drop: float = 0.01
    confidence: Optional[float] = None      # one-sided Clopper-Pearson level for the accuracy promise; the
    #                                         no-exit plan itself may then miss a tiny drop (its bound < its accuracy)
    deadline_ms: Optional[float] = None     # bound on the latency of the path where no exit is taken
    min_throughput: Optional[float] = None  # requests/s; each stage's expected busy time (blocks + heads,
    #                                         weighted by reach, + request handling) must fit 1/rate; transfers
    #                                         overlap it
    free_order: bool = False                # let the solver choose the device order too
    traffic: str = SPORADIC                 # what a hop's software costs: SPORADIC, each request after the pipeline
    #                                         idled (a camera's frames); STEADY, requests back to back
    time_limit_s: float = 60.0
    gap: float = 0.0                        # stop once the plan is proven within this relative gap (0: optimal)
    solver: str = "highs"                   # "highs" (highspy) or "cbc"
    jobs: Optional[int] = None              # cores for the best-first branch and bound (None: every usable core)
    dump_lp: Optional[str] = None           # write the MILP in LP format here


@dataclass(frozen=True, eq=False)
class Problem:
    """Numbers only. Shapes: B blocks, D devices (pipeline order), E candidate exits, N samples.

    ``cut_ms[d, e, k]``: moving cut tensor k from device d to e (k=0: the model input, k=b+1: the output
    of block b), of which ``hop_ms[d, e]`` is software (a call, a gRPC round trip), not the link's time.
    ``return_ms[d]``: returning the logits from d to the source device.
    ``capacity_bytes[d]``: device memory minus its runtime overhead (negative: device unusable).
    """

    devices: tuple[str, ...]
    source: int
    block_ms: np.ndarray            # [D, B]
    head_ms: np.ndarray             # [D, E]
    exit_after: np.ndarray          # [E] block index each exit reads, non-decreasing
    n_levels: np.ndarray            # [E]
    cut_ms: np.ndarray              # [D, D, B]
    return_ms: np.ndarray           # [D]
    block_param: np.ndarray         # [D, B] bytes
    block_act: np.ndarray           # [D, B] bytes
    head_param: np.ndarray          # [D, E]
    head_act: np.ndarray            # [D, E]
    capacity_bytes: np.ndarray      # [D]
    passed_level: np.ndarray        # [N, E] int: highest level sample i passes at exit j (0: none)
    correct_exit: np.ndarray        # [N, E] bool
    correct_final: np.ndarray       # [N] bool
    required_correct: int           # K: the plan must answer at least K samples right
    deadline_ms: Optional[float] = None
    busy_cap_ms: Optional[float] = None   # 1000 / min_throughput
    free_order: bool = False
    hop_ms: Optional[np.ndarray] = None   # [D, D] part of cut_ms that does not occupy the link (None: 0)
    handling_ms: Optional[np.ndarray] = None  # [D, 2] a stage's CPU per request it receives / forwards (gRPC,
    #                                           framing, Python): busy time only, its latency is in cut_ms (None: 0)
    hop_by_gap_ms: Optional[np.ndarray] = None  # [D, D, G] a hop's software when the hop sat idle for each of
    #                                             hop_gaps_ms before (the first gap 0: back to back); hop_ms is
    #                                             one of its ends, by traffic (None: not measured, hop_ms alone)
    hop_gaps_ms: Optional[np.ndarray] = None    # [G] increasing, from 0

    @property
    def n_blocks(self) -> int:
        return self.block_ms.shape[1]

    @property
    def n_devices(self) -> int:
        return self.block_ms.shape[0]

    @property
    def n_exits(self) -> int:
        return len(self.exit_after)

    @property
    def n_samples(self) -> int:
        return len(self.correct_final)

    @property
    def handling(self) -> np.ndarray:
        """[D, 2] ``handling_ms``, zeros where the profile has no such entries."""
        return self.handling_ms if self.handling_ms is not None else np.zeros((self.n_devices, 2))

    def replace(self, **changes) -> "Problem":
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields.update(changes)
        return Problem(**fields)


def required_correct(n: int, target_accuracy: float, confidence: Optional[float]) -> int:
    """Smallest correct count K whose accuracy (or its lower bound at ``confidence``) reaches the target.

    Returns n + 1 when even a perfect answer cannot certify the target (the constraint is then infeasible).
    Precomputing K keeps the accuracy constraint linear.
    """
    if confidence is None:
        return max(0, math.ceil(n * target_accuracy - 1e-9))
    lo, hi = 0, n + 1
    while lo < hi:                           # the bound is monotone in the count: bisect
        mid = (lo + hi) // 2
        if clopper_pearson_lower(mid, n, confidence) >= target_accuracy - 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class ProblemIndex:
    """How the Problem's exits map back to the calibration's exit columns and thresholds."""

    exit_columns: tuple[int, ...]             # Problem exit j is calibration column exit_columns[j]
    thresholds: tuple[tuple[float, ...], ...]  # per Problem exit, level l -> thresholds[j][l-1]
    full_accuracy: float


def passed_levels(scores: np.ndarray, thresholds: tuple[float, ...]) -> np.ndarray:
    """Highest 1-based level a score passes on an ascending grid (score >= threshold)."""
    return np.searchsorted(np.asarray(thresholds, dtype=float), scores, side="right")


def profile_entry(profile: Profile, device: str, item: str, backend: str | None = None):
    """``profile.get``, a missing entry a user error that says how to make it."""
    try:
        return profile.get(device, item, backend)
    except KeyError:
        raise _missing_entry(device, item) from None


def _missing_entry(device: str, item: str) -> DistreeError:
    return DistreeError(f"the profile has no entry for {item} on {device}; run `distree profile` for device {device} "
                        "with this model and its exits (profiles and bundles made before distree measured dispatch "
                        "lack the call, decide and rpc entries: re-profile, or re-compile the bundle)")


def favourite_backend(profile: Profile, device: str, blocks: int) -> str:
    """The backend with the least time for the device's blocks run as one segment (one call, plus each block
    without the call its standalone measurement paid): the compiler picks per segment by time, so this is the one
    it will mostly ship, and the one whose blocks, heads and call the plan charges. (Counting the blocks each
    backend wins instead let many tiny blocks outvote the few that take the time: on the Pi 4 estimate TVM won 12
    ReLU blocks, ONNX Runtime every conv, ORT shipped, and each call was charged TVM's 0.02 ms, not 0.18. Summing
    the blocks' times with their calls did the same once TVM's convolutions caught up: ONNX Runtime's 0.077 ms
    call, paid 23 times over, made TVM look 2x faster on the Pi 4 where its segment estimate is 4% slower.)
    Backends are compared over the blocks every one of them times (ONNX Runtime alone times a block TVM cannot
    import); where no block is timed by all, the one that times most blocks ships most."""
    times: dict[str, dict[str, float]] = {}
    for m in profile.entries:
        if m.device == device and m.item.startswith("block:"):
            times.setdefault(m.item, {})[m.backend] = m.median_ms
    missing = [b for b in range(blocks) if f"block:{b}" not in times]
    if missing:
        raise _missing_entry(device, f"block:{missing[0]}")
    backends = sorted({backend for by_backend in times.values() for backend in by_backend})
    common = [t for t in times.values() if len(t) == len(backends)]
    if common:
        def as_one_segment(backend: str) -> float:
            call = profile_entry(profile, device, CALL_ITEM, backend).median_ms
            return call + sum(max(0.0, t[backend] - call) for t in common)
        return min(backends, key=as_one_segment)
    return max(backends, key=lambda b: sum(b in t for t in times.values()))


def gpu_handovers(profile: Profile, device: DeviceSpec, blocks: int) -> dict[int, bool]:
    """On a GPU device, block -> whether ONNX Runtime takes over there (True) or TVM takes back (False): the blocks
    where the profile starts or stops lacking TVM (ops TVM cannot import), before each of which the compiler
    ends a segment (:func:`~distree.compiler.bundle.tvm_handovers`). Empty for a CPU device: its segments are
    not split, a segment holding such a block ships whole as ONNX Runtime."""
    if device.target.get("kind") != "cuda":
        return {}
    timed = {m.item for m in profile.entries if m.device == device.name and m.backend == "tvm"}
    lacks = [f"block:{b}" not in timed for b in range(blocks)]
    return {b: lacks[b] for b in range(1, blocks) if lacks[b] != lacks[b - 1]}


def _handling_ms(profile: Profile, names: tuple[str, ...], constraints: Constraints) -> Optional[np.ndarray]:
    """[D, 2] each device's ``serve:receive`` / ``serve:forward`` CPU, or None where a device's profile predates
    them (a throughput bound then counts that device's compute only, and says so)."""
    have = {(m.device, m.item): m.median_ms for m in profile.entries if m.item in HANDLING_ITEMS}
    lacking = [dev for dev in names if any((dev, item) not in have for item in HANDLING_ITEMS)]
    if lacking:
        if constraints.min_throughput is not None:
            logging.getLogger(__name__).warning(
                "the profile has no %s entries for %s (profiled before distree measured a stage's request handling): "
                "--min-throughput counts compute only, which overstates the rate a served stage sustains; profile "
                "again for them", " / ".join(HANDLING_ITEMS), ", ".join(lacking))
        return None
    return np.array([[have[dev, item] for item in HANDLING_ITEMS] for dev in names])


def _rpc_by_gap_ms(profile: Profile, names: tuple[str, ...], entry) -> np.ndarray:
    """[D, G] each device's ``rpc`` round trip back to back, then after each idle gap of IDLE_GAPS_MS; [D, 1]
    (back to back alone) where a device's profile predates the idle entries (the plan says so: Plan.hops_line,
    and so does the simulator's report)."""
    have = {(m.device, m.item): m.median_ms for m in profile.entries if m.item in IDLE_RPC_ITEMS}
    warm = np.array([[entry(dev, RPC_ITEM).median_ms] for dev in names])
    if any((dev, item) not in have for dev in names for item in IDLE_RPC_ITEMS):
        return warm
    return np.concatenate([warm, [[have[dev, item] for item in IDLE_RPC_ITEMS] for dev in names]], axis=1)


def build_problem(chain: Chain, calibration: Calibration, profile: Profile, topology: Topology,
                  constraints: Constraints) -> tuple[Problem, ProblemIndex]:
    """Turn the typed inputs into a :class:`Problem`, failing early with a fix-it message.

    Dispatch: a bundle runs each device's blocks as sub-segments that end at its enabled exits, one call each, and
    after an exit head decides in Python whether the sample leaves. Blocks and heads are charged without the call
    their standalone measurement paid; every exit head evaluated is charged the decision and one call (the one that
    carries on if the sample stays); reaching the final classifier is charged one call, and every hop to another
    device one call there plus its gRPC round trip (the mean of the two devices' ``rpc`` entries, back to back
    for STEADY traffic, after the longest idle gap for SPORADIC; the link's latency and bandwidth come on top).
    That is one call per sub-segment run, except that an exit at the end of a stage, and a source device without a
    stage, count one call too many per hop (microseconds against the hop's milliseconds).
    """
    _validate(chain, calibration, topology, constraints)
    names = tuple(d.name for d in topology.devices)
    B = len(chain.blocks)
    order = sorted(range(len(calibration.exits)), key=lambda j: (calibration.exits[j].after_block, j))
    exits = [calibration.exits[j] for j in order]

    def entry(dev: str, item: str, backend: str | None = None):
        return profile_entry(profile, dev, item, backend)

    def shipped(dev: str, item: str, favourite: str):
        """The item as the favourite backend runs it, where that backend times it (else the faster other)."""
        try:
            return profile.get(dev, item, favourite)
        except KeyError:
            return entry(dev, item)

    calls: dict[tuple[str, str], float] = {}

    def inside_segment(dev: str, m) -> float:
        """An item's time without the call its standalone measurement paid (a segment pays it once)."""
        if (dev, m.backend) not in calls:
            calls[dev, m.backend] = entry(dev, CALL_ITEM, m.backend).median_ms
        return max(0.0, m.median_ms - calls[dev, m.backend])

    block_ms = np.zeros((len(names), B))
    block_param = np.zeros((len(names), B))
    block_act = np.zeros((len(names), B))
    head_ms = np.zeros((len(names), len(exits)))
    head_param = np.zeros((len(names), len(exits)))
    head_act = np.zeros((len(names), len(exits)))
    call_ms = np.zeros(len(names))
    rpc_ms = _rpc_by_gap_ms(profile, names, entry)
    for d, dev in enumerate(names):
        favourite = favourite_backend(profile, dev, B)
        blocks = [shipped(dev, f"block:{b}", favourite) for b in range(B)]
        call_ms[d] = entry(dev, CALL_ITEM, favourite).median_ms
        decide_ms = entry(dev, decide_item(calibration.score_kind)).median_ms
        handovers = gpu_handovers(profile, topology.devices[d], B)
        for b, (blk, m) in enumerate(zip(chain.blocks, blocks)):
            block_ms[d, b] = inside_segment(dev, m)
            if b in handovers:      # the compiler starts a segment here: its call
                block_ms[d, b] += entry(dev, CALL_ITEM, m.backend if handovers[b] else favourite).median_ms
            block_param[d, b] = m.param_bytes or blk.param_bytes
            block_act[d, b] = m.activation_bytes or max(blk.workspace_bytes, blk.out_bytes)
        for j, ex in enumerate(exits):
            m = shipped(dev, f"exit:{ex.name}", favourite)
            head_ms[d, j] = inside_segment(dev, m) + decide_ms + call_ms[d]
            head_param[d, j] = m.param_bytes or ex.param_bytes
            head_act[d, j] = m.activation_bytes
            if calibration.score_kind == "stability" and ex.entry_output:  # its score also needs the entry head
                e = shipped(dev, f"entry:{ex.name}", favourite)
                head_ms[d, j] += inside_segment(dev, e)
                head_param[d, j] += e.param_bytes or ex.entry_param_bytes
                head_act[d, j] = max(head_act[d, j], e.activation_bytes)
    block_ms[:, B - 1] += call_ms      # the final sub-segment's call

    cut_bytes = [chain.input_bytes] + [blk.out_bytes for blk in chain.blocks[:-1]]
    return_bytes = int(chain.blocks[-1].output_shape[-1]) * 4
    src = names.index(topology.source_device)
    hop_by_gap = (rpc_ms[:, None] + rpc_ms[None, :]) / 2 + call_ms[None, :, None]    # [D, D, G]
    hop_ms = hop_by_gap[..., -1 if constraints.traffic == SPORADIC else 0]
    cut_ms = np.array([[[topology.link(a, b).transfer_ms(n) + (hop_ms[i, j] if i != j else 0.0) for n in cut_bytes]
                        for j, b in enumerate(names)] for i, a in enumerate(names)])
    return_ms = np.array([topology.link(a, names[src]).transfer_ms(return_bytes) for a in names])
    capacity = np.array([d.memory_bytes - d.runtime_overhead_bytes for d in topology.devices], dtype=float)

    scores = np.asarray(calibration.scores, dtype=float)
    correct = np.asarray(calibration.correct, dtype=bool)
    passed = np.stack([passed_levels(scores[:, j], calibration.thresholds[j]) for j in order], axis=1) \
        if exits else np.zeros((len(scores), 0), dtype=int)
    full_acc = float(correct[:, -1].mean())
    n = len(scores)
    problem = Problem(
        devices=names, source=src, block_ms=block_ms, head_ms=head_ms,
        exit_after=np.array([ex.after_block for ex in exits], dtype=int),
        n_levels=np.array([len(calibration.thresholds[j]) for j in order], dtype=int),
        cut_ms=cut_ms, return_ms=return_ms, block_param=block_param, block_act=block_act,
        head_param=head_param, head_act=head_act, capacity_bytes=capacity,
        passed_level=passed.astype(int), correct_exit=correct[:, order] if exits else np.zeros((n, 0), bool),
        correct_final=correct[:, -1],
        required_correct=required_correct(n, full_acc - constraints.accuracy_drop, constraints.confidence),
        deadline_ms=constraints.deadline_ms,
        busy_cap_ms=None if constraints.min_throughput is None else 1000.0 / constraints.min_throughput,
        free_order=constraints.free_order, hop_ms=hop_ms * (1 - np.eye(len(names))),
        handling_ms=_handling_ms(profile, names, constraints),
        hop_by_gap_ms=hop_by_gap * (1 - np.eye(len(names)))[..., None] if rpc_ms.shape[1] > 1 else None,
        hop_gaps_ms=np.array((0.0, *IDLE_GAPS_MS)) if rpc_ms.shape[1] > 1 else None,
    )
    index = ProblemIndex(exit_columns=tuple(order),
                         thresholds=tuple(tuple(calibration.thresholds[j]) for j in order),
                         full_accuracy=full_acc)
    return problem, index


def _validate(chain: Chain, calibration: Calibration, topology: Topology, c: Constraints) -> None:
    B = len(chain.blocks)
    if B == 0:
        raise DistreeError("the chain has no blocks; re-run `distree inspect` on the model")
    if calibration.model_sha256 and chain.model_sha256 and calibration.model_sha256 != chain.model_sha256:
        raise DistreeError("the calibration was made for another model (model_sha256 differs); "
                           "re-run `distree calibrate` for this model")
    if not topology.devices:
        raise DistreeError("no devices given; pass --devices or --topology")
    if topology.source_device not in {d.name for d in topology.devices}:
        raise DistreeError(f"source device {topology.source_device!r} is not in the topology")
    if not calibration.scores:
        raise DistreeError("the calibration has no samples; re-run `distree calibrate` with data")
    E = len(calibration.exits)
    if any(len(row) != E for row in calibration.scores) or any(len(row) != E + 1 for row in calibration.correct):
        raise DistreeError("malformed calibration: scores need one column per exit and correct one more "
                           "(the final classifier); re-run `distree calibrate`")
    if len(calibration.thresholds) != E:
        raise DistreeError("malformed calibration: one threshold grid per exit is needed")
    for ex, grid in zip(calibration.exits, calibration.thresholds):
        if not 0 <= ex.after_block < B - 1:
            raise DistreeError(f"exit {ex.name} is after block {ex.after_block}, but exits must sit after "
                               f"blocks 0..{B - 2} of this {B}-block chain; re-run `distree calibrate`")
        if any(b < a for a, b in zip(grid, grid[1:])):
            raise DistreeError(f"the threshold grid of exit {ex.name} is not ascending; re-run `distree calibrate`")
        if len(grid) > MAX_LEVELS:
            raise DistreeError(f"exit {ex.name} has {len(grid)} threshold levels, the solver takes at most "
                               f"{MAX_LEVELS}; re-run `distree calibrate --levels {DEFAULT_LEVELS}`")
    check_constraints(c)


def check_constraints(c: Constraints) -> None:
    """The user's flags alone (no model needed), so that `distree compile` rejects them before minutes of
    work; the comparisons are written so that nan fails too."""
    if not 0 <= c.accuracy_drop < 1:
        raise DistreeError(f"--accuracy-drop {c.accuracy_drop} must be in [0, 1)")
    if c.confidence is not None and not 0.5 <= c.confidence < 1:
        raise DistreeError(f"--confidence {c.confidence} must be in [0.5, 1)")
    if c.deadline_ms is not None and not c.deadline_ms > 0:
        raise DistreeError("--deadline-ms must be positive")
    if c.min_throughput is not None and not c.min_throughput > 0:
        raise DistreeError("--min-throughput must be positive")
    if not c.time_limit_s > 0:
        raise DistreeError(f"--time-limit {c.time_limit_s:g} must be a positive number of seconds")
    if not 0 <= c.gap < 1:
        raise DistreeError(f"--gap {c.gap:g} must be in [0, 1): the share by which a plan may miss the optimum "
                           "(0.02: within 2%)")
    if c.jobs is not None and not c.jobs >= 1:
        raise DistreeError(f"--jobs {c.jobs} must be at least 1 (leave it out to use every core)")
    if c.traffic not in TRAFFIC:
        raise DistreeError(f"--traffic {c.traffic!r}: choose {' or '.join(TRAFFIC)}")
    if c.solver not in ("highs", "cbc"):
        raise DistreeError(f"--solver {c.solver!r}: choose highs or cbc")
