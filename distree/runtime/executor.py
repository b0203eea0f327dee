"""Run a bundle's stages: :class:`StageExecutor` runs one device's sub-segments with the exit policy between
them (what ``distree serve`` hosts on each device), and :func:`run_bundle` chains every stage in this process.

Artifacts this machine cannot execute (an aarch64 TVM library on x86) run from the segment's ``.onnx``
under ONNX Runtime instead; the report lists every such substitution, so no result hides where it ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

from distree.compiler.manifest import PLANNING, DeviceArtifact, Manifest, SegmentArtifact, TensorSpec, \
    read_manifest, read_thresholds
from distree.targets.catalog import host_device
from distree.targets.toolchain import target_arch, tvm_device_here
from distree.errors import DistreeError
from distree.exits import Dataset
from distree.exits.data import check_labels, layout_fix
from distree.graph.chain import Chain
from distree.runtime.backends import Runner, ort_runner, percentiles_ms, set_tvm_threads, tvm_runner
from distree.runtime.policy import ExitPolicy
from distree.serde import JsonRecord

FINAL = "final"


@dataclass(frozen=True)
class SegmentTiming(JsonRecord):
    device: str
    file: str                       # the file that actually ran
    backend: str                    # what ran it here: tvm (CPU) / tvm-cuda (GPU) / ort
    count: int
    median_ms: float
    p90_ms: float


@dataclass(frozen=True)
class StageTiming(JsonRecord):
    device: str
    reached: int                    # samples that entered the stage
    median_ms: float
    p90_ms: float


@dataclass(frozen=True)
class RunReport(JsonRecord):
    bundle: str
    samples: int
    predictions: tuple[int, ...]
    exits: tuple[str, ...]          # exit taken per sample (``final`` = the last classifier)
    exit_rates: dict[str, float]
    accuracy: Optional[float]       # when labels are given
    segments: tuple[SegmentTiming, ...]
    stages: tuple[StageTiming, ...]
    end_to_end: dict[str, float]    # median/p90 ms per sample, compute only (no network: one process)
    deadline_exits: int             # samples answered early because of --deadline-ms
    substitutions: tuple[str, ...]  # artifacts that ran in another form here, and why
    threads: int
    predicted_ms: float = 0.0       # the plan's expected latency (on its devices, with its transfers)
    predicted_here: bool = False    # the plan is one stage on this machine, at the source: comparable


@dataclass(frozen=True)
class Answer:
    logits: np.ndarray              # (1, K) of the classifier that answered
    exit: str                       # exit name, or ``final``
    reason: str                     # "threshold", "deadline" or "final"

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.logits.reshape(-1)))


class ExitLogits(NamedTuple):
    logits: np.ndarray              # (1, K) of the exit head
    entry: Optional[np.ndarray]     # (1, K) of its entry head (stability score only)


@dataclass(frozen=True)
class StageOutcome:
    """What one stage did with one request: an answer, or the cut tensor to hand to the next stage."""

    answer: Optional[Answer]
    forward: Optional[np.ndarray]
    late: bool                      # the deadline looked lost on entry and this stage had no exit head to use
    segment_ms: tuple[float, ...]   # each sub-segment that ran


@dataclass
class _Loaded:
    segment: SegmentArtifact
    run: Runner
    ran_file: str
    ran_backend: str
    times: list


def _load_segment(bundle: Path, stage: DeviceArtifact, seg: SegmentArtifact, threads: int,
                  here: tuple[Optional[str], str], substitutions: list[str]) -> _Loaded:
    """``here``: where the stage's TVM libraries run in this process (:func:`tvm_device_here`)."""
    if seg.backend == "ort":
        return _Loaded(seg, ort_runner(bundle / seg.file, threads), seg.file, "ort", [])
    where, why_not = here
    if where == "cpu":
        return _Loaded(seg, tvm_runner(bundle / seg.file), seg.file, "tvm", [])
    if where == "cuda":
        # the activation stays on the GPU for the stage's next sub-segment; exit logits come back for the decision
        after = stage.segments[stage.segments.index(seg) + 1:]
        feeds_next = bool(after) and after[0].backend == "tvm"
        run = tvm_runner(bundle / seg.file, "cuda", keep_on_gpu=frozenset({0}) if feeds_next else frozenset())
        return _Loaded(seg, run, seg.file, "tvm-cuda", [])
    substitutions.append(
        f"{seg.file}: {stage.spec.name} TVM library ({target_arch(stage.spec)}, {stage.spec.target.get('kind')}): "
        f"{why_not}; ran {seg.onnx_file} under ONNX Runtime on this CPU instead")
    return _Loaded(seg, ort_runner(bundle / seg.onnx_file, threads), seg.onnx_file, "ort", [])


class StageExecutor:
    """One device's stage: its sub-segments in order, the exit policy after each one that ends at an exit.

    Not thread-safe (TVM's VM is not): a caller serving concurrent requests runs one at a time.
    """

    def __init__(self, bundle: str | Path, manifest: Manifest, index: int, policy: ExitPolicy, threads: int = 1):
        self.bundle = Path(bundle)
        self.index = index
        self.stage = manifest.stages[index]
        self.policy = policy
        self.substitutions: list[str] = []
        here = tvm_device_here(self.stage.spec)
        self._segments = [_load_segment(self.bundle, self.stage, seg, threads, here, self.substitutions)
                          for seg in self.stage.segments]
        remaining = remaining_ms(manifest)
        self._remaining_after = remaining.after_segment[index]
        self._remaining_on_entry = remaining.on_entry[index]
        self._has_exit = any(seg.exit for seg in self.stage.segments)

    @property
    def input(self) -> TensorSpec:
        return self.stage.segments[0].input

    @property
    def output(self) -> TensorSpec:
        """The tensor handed to the next stage (the final logits on the last stage)."""
        return self.stage.segments[-1].outputs[0]

    def run(self, x: np.ndarray, elapsed_ms: float = 0.0, deadline_ms: Optional[float] = None) -> StageOutcome:
        """Run ``x`` (batch 1) through the stage; ``elapsed_ms``: time the request has spent before it."""
        started = time.perf_counter()
        late = (deadline_ms is not None and not self._has_exit
                and elapsed_ms + self._remaining_on_entry > deadline_ms)
        ran = []
        for k, seg, outs in self._sub_segments(x):
            ran.append(self._segments[k].times[-1])
            if seg.is_final:
                return StageOutcome(Answer(outs[0], FINAL, "final"), None, late, tuple(ran))
            if seg.exit is not None:
                decision = self.policy.decide(
                    seg.exit, outs[1], outs[2] if seg.entry_output else None,
                    elapsed_ms=elapsed_ms + (time.perf_counter() - started) * 1e3,
                    remaining_ms=self._remaining_after[k], deadline_ms=deadline_ms)
                if decision.leave:
                    return StageOutcome(Answer(outs[1], seg.exit, decision.reason), None, late, tuple(ran))
        return StageOutcome(None, outs[0], late, tuple(ran))

    def every_exit(self, x: np.ndarray) -> tuple[dict[str, ExitLogits], np.ndarray]:
        """Run ``x`` through every sub-segment whatever the thresholds say: each exit's logits (and its entry
        head's, for the stability score) and the stage's output (what a calibration on the bundle itself reads)."""
        heads = {}
        for _k, seg, outs in self._sub_segments(x):
            if seg.exit is not None:
                heads[seg.exit] = ExitLogits(outs[1], outs[2] if seg.entry_output else None)
        return heads, outs[0]

    def _sub_segments(self, x: np.ndarray) -> Iterator[tuple[int, SegmentArtifact, list]]:
        """Each sub-segment in order on the previous one's output, timed into its ``times``; a caller that has
        its answer stops iterating."""
        act = x
        for k, loaded in enumerate(self._segments):
            t0 = time.perf_counter()
            outs = loaded.run(act)
            loaded.times.append((time.perf_counter() - t0) * 1e3)
            yield k, loaded.segment, outs
            act = outs[0]

    def segment_timings(self) -> tuple[SegmentTiming, ...]:
        return tuple(_segment_timing(self.stage.name, loaded) for loaded in self._segments)


@dataclass(frozen=True)
class RemainingMs:
    """Predicted worst-case time left (no exit taken): after each sub-segment, and on entering each stage."""

    after_segment: tuple[tuple[float, ...], ...]
    on_entry: tuple[float, ...]


def transfer_in_ms(manifest: Manifest) -> tuple[float, ...]:
    """Transfer time into each stage when it is reached (the plan stores it weighted by the reach rate)."""
    return tuple(stage.transfer_in_ms / stage.reach_rate if stage.reach_rate > 0 else 0.0
                 for stage in manifest.plan.stages)


def expected_segment_ms(manifest: Manifest) -> tuple[tuple[float, ...], ...]:
    """Expected compute of each sub-segment on its device: the compiler's figure (timed on the build machine
    when it ran the device's code, else the device's profile), else the plan's compute for the stage (per
    request that reaches it) shared out by block count."""
    out = []
    for artifact, planned in zip(manifest.stages, manifest.plan.stages):
        per_reach = planned.compute_ms / planned.reach_rate if planned.reach_rate > 0 else 0.0
        blocks = artifact.last_block - artifact.first_block + 1
        out.append(tuple(
            seg.expected_ms if seg.expected_ms is not None
            else per_reach * (seg.last_block - seg.first_block + 1) / blocks
            for seg in artifact.segments))
    return tuple(out)


def remaining_ms(manifest: Manifest) -> RemainingMs:
    """What the deadline override compares against: every later sub-segment and every later transfer."""
    seg_ms, transfer = expected_segment_ms(manifest), transfer_in_ms(manifest)
    stage_total = [sum(ms) for ms in seg_ms]
    after_stage = [sum(stage_total[t] + transfer[t] for t in range(s + 1, len(seg_ms))) for s in range(len(seg_ms))]
    after_segment = tuple(tuple(sum(ms[k + 1:]) + after_stage[s] for k in range(len(ms)))
                          for s, ms in enumerate(seg_ms))
    on_entry = tuple(stage_total[s] + after_stage[s] for s in range(len(seg_ms)))
    return RemainingMs(after_segment, on_entry)


def run_bundle(path: str | Path, data: Dataset, threads: int = 1, limit: Optional[int] = None,
               deadline_ms: Optional[float] = None) -> RunReport:
    """Predict every sample of ``data`` through the bundle, one request at a time (batch 1).

    With a deadline, each stage counts the plan's transfer time into it as elapsed (one process, no real
    network), exactly as a served stage does on receipt.
    """
    bundle = Path(path)
    manifest = read_manifest(bundle)
    policy = ExitPolicy(read_thresholds(bundle))
    _check_data(bundle, manifest, data)
    x = data.x if limit is None else data.x[:limit]
    set_tvm_threads(threads)
    stages = [StageExecutor(bundle, manifest, i, policy, threads) for i in range(len(manifest.stages))]
    transfer = transfer_in_ms(manifest)
    predictions, exits, stage_times = [], [], [[] for _ in stages]
    deadline_exits = 0
    e2e: list[float] = []
    for i in range(len(x)):
        act = x[i:i + 1]
        started = time.perf_counter()
        modeled_transfer = 0.0
        answer: Optional[Answer] = None
        for stage, times in zip(stages, stage_times):
            modeled_transfer += transfer[stage.index]
            stage_start = time.perf_counter()
            outcome = stage.run(act, elapsed_ms=(stage_start - started) * 1e3 + modeled_transfer,
                                deadline_ms=deadline_ms)
            times.append((time.perf_counter() - stage_start) * 1e3)
            answer, act = outcome.answer, outcome.forward
            if answer:
                break
        if answer is None:
            raise DistreeError(f"{bundle}: no segment produced the final output; rebuild the bundle")
        e2e.append((time.perf_counter() - started) * 1e3)
        deadline_exits += answer.reason == "deadline"
        predictions.append(answer.prediction)
        exits.append(answer.exit)
    n = len(predictions)
    accuracy = None
    if data.y is not None and n:
        accuracy = float((np.asarray(predictions) == data.y[:n]).mean())
    return RunReport(
        bundle=str(bundle), samples=n, predictions=tuple(predictions), exits=tuple(exits),
        exit_rates=exit_rates(policy, exits), accuracy=accuracy,
        segments=tuple(t for stage in stages for t in stage.segment_timings()),
        stages=tuple(_stage_timing(st.name, t) for st, t in zip(manifest.stages, stage_times)),
        end_to_end=percentiles_ms(e2e), deadline_exits=deadline_exits,
        substitutions=tuple(s for stage in stages for s in stage.substitutions), threads=threads,
        predicted_ms=manifest.plan.expected_latency_ms, predicted_here=_planned_for_here(manifest))


def _planned_for_here(manifest: Manifest) -> bool:
    """One stage, on this machine (its CPU, or a GPU here that runs the stage's kernels), where requests arrive:
    then the plan's latency is what ``run`` measures."""
    (stage, *rest) = manifest.stages
    if rest or stage.name != manifest.source:
        return False
    if stage.spec.target.get("kind") == "cuda":
        return tvm_device_here(stage.spec)[0] == "cuda"
    return stage.spec.target == host_device().target


def exit_rates(policy: ExitPolicy, exits: list[str]) -> dict[str, float]:
    """Share of answers per exit, in pipeline order, ``final`` last."""
    names = [e.name for e in policy.table.exits] + [FINAL]
    return {name: exits.count(name) / max(len(exits), 1) for name in names}


def check_input(want: TensorSpec, x: np.ndarray, what: str = "the bundle") -> None:
    """Samples ``x`` (N, ...) must match the bundle's input ``want`` (its batch axis aside)."""
    shape, dtype = tuple(x.shape[1:]), x.dtype
    if shape != tuple(want.shape[1:]) or np.dtype(dtype) != np.dtype(want.dtype):
        fix = (layout_fix(x.shape, tuple(want.shape)) if shape != tuple(want.shape[1:])
               else f"save x.astype(np.{want.dtype})")
        raise DistreeError(f"input has samples of shape {shape} {np.dtype(dtype)}, {what} expects "
                           f"{tuple(want.shape[1:])} {want.dtype}; {fix}")


def _check_data(bundle: Path, manifest: Manifest, data: Dataset) -> None:
    """The samples fit the bundle's input, and the labels (when given) its classes, as its planning chain has them
    (a bundle copied without ``planning/`` skips that check)."""
    check_input(manifest.input, data.x)
    chain = bundle / PLANNING / "chain.json"
    if data.y is not None and chain.is_file():
        check_labels(data.y, Chain.load(chain).blocks[-1].output_shape[-1], "--input")


def _segment_timing(device: str, loaded: _Loaded) -> SegmentTiming:
    p = percentiles_ms(loaded.times)
    return SegmentTiming(device=device, file=loaded.ran_file, backend=loaded.ran_backend, count=p["count"],
                         median_ms=p["median_ms"], p90_ms=p["p90_ms"])


def _stage_timing(device: str, times: list[float]) -> StageTiming:
    p = percentiles_ms(times)
    return StageTiming(device=device, reached=p["count"], median_ms=p["median_ms"], p90_ms=p["p90_ms"])
