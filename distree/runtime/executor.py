"""Run a whole bundle in this process: every stage in order, the exit policy between sub-segments.

Artifacts this machine cannot execute (an aarch64 TVM library on x86) run from the segment's ``.onnx``
under ONNX Runtime instead; the report lists every such substitution, so no result hides where it ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from distree.compiler.manifest import DeviceArtifact, Manifest, SegmentArtifact, read_manifest, read_thresholds
from distree.targets.toolchain import host_arch, host_runnable, target_arch
from distree.errors import DistreeError
from distree.exits import Dataset
from distree.runtime.backends import Runner, ort_runner, percentiles_ms, set_tvm_threads, tvm_runner
from distree.runtime.policy import ExitPolicy
from distree.serde import JsonRecord

FINAL = "final"


@dataclass(frozen=True)
class SegmentTiming(JsonRecord):
    device: str
    file: str                       # the file that actually ran
    backend: str                    # what ran it here: tvm / ort
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


@dataclass
class _Loaded:
    segment: SegmentArtifact
    run: Runner
    ran_file: str
    ran_backend: str
    expected_ms: float              # for the deadline override
    times: list


def _load_segment(bundle: Path, stage: DeviceArtifact, seg: SegmentArtifact, threads: int,
                  substitutions: list[str]) -> _Loaded:
    expected = (seg.tvm_ms if seg.backend == "tvm" else seg.ort_ms) or 0.0
    if seg.backend == "ort":
        return _Loaded(seg, ort_runner(bundle / seg.file, threads), seg.file, "ort", expected, [])
    if host_runnable(stage.spec):
        return _Loaded(seg, tvm_runner(bundle / seg.file), seg.file, "tvm", expected, [])
    substitutions.append(
        f"{seg.file}: {stage.spec.name} TVM library ({target_arch(stage.spec)}, "
        f"{stage.spec.target.get('kind')}) cannot run on this {host_arch()} machine; ran {seg.onnx_file} "
        "under ONNX Runtime instead")
    return _Loaded(seg, ort_runner(bundle / seg.onnx_file, threads), seg.onnx_file, "ort", expected, [])


def run_bundle(path: str | Path, data: Dataset, threads: int = 1, limit: Optional[int] = None,
               deadline_ms: Optional[float] = None) -> RunReport:
    """Predict every sample of ``data`` through the bundle, one request at a time (batch 1)."""
    bundle = Path(path)
    manifest = read_manifest(bundle)
    policy = ExitPolicy(read_thresholds(bundle))
    _check_data(manifest, data)
    x = data.x if limit is None else data.x[:limit]
    set_tvm_threads(threads)
    substitutions: list[str] = []
    stages = [[_load_segment(bundle, st, seg, threads, substitutions) for seg in st.segments]
              for st in manifest.stages]
    remaining_after = _remaining_ms(stages, _transfer_in(manifest))
    predictions, exits, stage_times = [], [], [[] for _ in stages]
    deadline_exits = 0
    e2e: list[float] = []
    for i in range(len(x)):
        act = x[i:i + 1]
        started = time.perf_counter()
        answer: Optional[tuple[int, str]] = None
        for s_idx, segments in enumerate(stages):
            stage_start = time.perf_counter()
            for k, loaded in enumerate(segments):
                t0 = time.perf_counter()
                outs = loaded.run(act)
                loaded.times.append((time.perf_counter() - t0) * 1e3)
                act = outs[0]
                seg = loaded.segment
                if seg.is_final:
                    answer = (int(np.argmax(outs[0].reshape(-1))), FINAL)
                elif seg.exit is not None:
                    entry = outs[2] if seg.entry_output else None
                    decision = policy.decide(
                        seg.exit, outs[1], entry, elapsed_ms=(time.perf_counter() - started) * 1e3,
                        remaining_ms=remaining_after[s_idx][k], deadline_ms=deadline_ms)
                    if decision.leave:
                        deadline_exits += decision.reason == "deadline"
                        answer = (int(np.argmax(outs[1].reshape(-1))), seg.exit)
                if answer:
                    break
            stage_times[s_idx].append((time.perf_counter() - stage_start) * 1e3)
            if answer:
                break
        if answer is None:
            raise DistreeError(f"{bundle}: no segment produced the final output; rebuild the bundle")
        e2e.append((time.perf_counter() - started) * 1e3)
        predictions.append(answer[0])
        exits.append(answer[1])
    n = len(predictions)
    names = [e.name for e in policy.table.exits] + [FINAL]
    accuracy = None
    if data.y is not None and n:
        accuracy = float((np.asarray(predictions) == data.y[:n]).mean())
    return RunReport(
        bundle=str(bundle), samples=n, predictions=tuple(predictions), exits=tuple(exits),
        exit_rates={name: exits.count(name) / max(n, 1) for name in names}, accuracy=accuracy,
        segments=tuple(_segment_timing(st.name, l) for st, segs in zip(manifest.stages, stages) for l in segs),
        stages=tuple(_stage_timing(st.name, t) for st, t in zip(manifest.stages, stage_times)),
        end_to_end=percentiles_ms(e2e), deadline_exits=deadline_exits, substitutions=tuple(substitutions),
        threads=threads)


def _check_data(manifest: Manifest, data: Dataset) -> None:
    want = tuple(manifest.input.shape[1:])
    if tuple(data.x.shape[1:]) != want or data.x.dtype != np.dtype(manifest.input.dtype):
        raise DistreeError(f"input has samples of shape {tuple(data.x.shape[1:])} {data.x.dtype}, the bundle "
                           f"expects {want} {manifest.input.dtype}; give data the model was built for")


def _transfer_in(manifest: Manifest) -> list[float]:
    """Transfer time into each stage when it is reached (the plan stores it weighted by the reach rate)."""
    return [stage.transfer_in_ms / stage.reach_rate if stage.reach_rate > 0 else 0.0
            for stage in manifest.plan.stages]


def _remaining_ms(stages: list[list[_Loaded]], transfer_in: list[float]) -> list[list[float]]:
    """Worst-case time left after segment (s, k): every later segment and transfer (no exit taken)."""
    flat = [(s, k, l.expected_ms) for s, segs in enumerate(stages) for k, l in enumerate(segs)]
    out = [[0.0] * len(segs) for segs in stages]
    for pos, (s, k, _) in enumerate(flat):
        later = sum(ms for _, _, ms in flat[pos + 1:])
        later += sum(transfer_in[t] for t in range(s + 1, len(stages)) if t < len(transfer_in))
        out[s][k] = later
    return out


def _segment_timing(device: str, loaded: _Loaded) -> SegmentTiming:
    p = percentiles_ms(loaded.times)
    return SegmentTiming(device=device, file=loaded.ran_file, backend=loaded.ran_backend, count=p["count"],
                         median_ms=p["median_ms"], p90_ms=p["p90_ms"])


def _stage_timing(device: str, times: list[float]) -> StageTiming:
    p = percentiles_ms(times)
    return StageTiming(device=device, reached=p["count"], median_ms=p["median_ms"], p90_ms=p["p90_ms"])
