"""Per-segment latency of a compiled bundle on this machine, with what a reader needs to trust the numbers.

Each sub-segment a device would run is timed with the backend the bundle ships for it (TVM library or ONNX
model under ONNX Runtime), on an input that is the real activation reaching it (a seeded input pushed through
the segments' ONNX before it). Rounds are interleaved: one timed run of every segment, then one pass through
all of them (end to end, no exit taken), repeated; slow drifts of a shared machine then hit all segments
alike instead of biasing whichever ran last. Segments built for another machine (an aarch64 Pi library, CUDA
for a Jetson) cannot be timed here: they are listed as not measurable, with the reason, never dropped.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from distree import __version__
from distree.compiler.manifest import MANIFEST, DeviceArtifact, SegmentArtifact, read_manifest, sha256_file
from distree.compiler.verify import verify_bundle
from distree.runtime.backends import Runner, ort_runner, percentiles_ms, set_tvm_threads, tvm_runner
from distree.serde import JsonRecord
from distree.targets.toolchain import host_arch, target_arch, tvm_device_here

END_TO_END = "end-to-end"


@dataclass(frozen=True)
class SegmentBench(JsonRecord):
    key: str                        # "<device>:b<first>-<last>", stable across rebuilds of the same plan
    device: str
    file: str                       # what ran (or would run) on the device
    backend: str
    first_block: int
    last_block: int
    exit: Optional[str]
    measurable: bool
    reason: str                     # why not, when not measurable
    median_ms: Optional[float]
    p90_ms: Optional[float]
    samples_ms: tuple[float, ...]


@dataclass(frozen=True)
class BenchResult(JsonRecord):
    bundle: str
    manifest_sha256: str
    model_sha256: str
    distree_version: str
    tvm_version: str
    ort_version: str
    host: str                       # CPU model and architecture of this machine
    cpu_count: int
    threads: int                    # threads each segment's runtime used
    repeats: int
    warmup: int
    load_average: tuple[float, float, float]            # 1/5/15 min, before measuring
    load_average_after: tuple[float, float, float]
    created_utc: str
    segments: tuple[SegmentBench, ...]
    end_to_end: SegmentBench        # one pass through every measurable segment (no exit taken)

    def by_key(self) -> dict[str, SegmentBench]:
        return {s.key: s for s in (*self.segments, self.end_to_end)}


def segment_key(device: str, seg: SegmentArtifact) -> str:
    return f"{device}:b{seg.first_block}-{seg.last_block}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({host_arch()})"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown cpu'} ({host_arch()})"


def _not_measurable(stage: DeviceArtifact, why_not: str) -> str:
    return (f"built for {stage.name} ({target_arch(stage.spec)}, {stage.spec.target.get('kind')}): {why_not}; "
            "not measurable here, time it on the device")


@dataclass
class _Timed:
    key: str
    stage: DeviceArtifact
    seg: SegmentArtifact
    reason: str
    run: Optional[Runner] = None
    x: Optional[np.ndarray] = None


def _prepare(bundle: Path, threads: int, seed: int) -> list[_Timed]:
    """Every segment in pipeline order with its runner (when measurable) and the activation reaching it."""
    manifest = read_manifest(bundle)
    set_tvm_threads(threads)
    spec = manifest.input
    act = np.random.default_rng(seed).standard_normal(spec.shape).astype(spec.dtype)
    items = []
    for stage in manifest.stages:
        where, why_not = tvm_device_here(stage.spec)
        for seg in stage.segments:
            reason = "" if where else _not_measurable(stage, why_not if seg.backend == "tvm" else
                                                      f"its ONNX Runtime segment would run on this {host_arch()} "
                                                      f"machine, at this machine's speed, not {stage.name}'s")
            item = _Timed(segment_key(stage.name, seg), stage, seg, reason)
            if where:
                item.run = (tvm_runner(bundle / seg.file, where) if seg.backend == "tvm"
                            else ort_runner(bundle / seg.file, threads))
                item.x = act
            act = ort_runner(bundle / seg.onnx_file)(act)[0]
            items.append(item)
    return items


def _time_rounds(items: Sequence[_Timed], repeats: int, warmup: int, with_end_to_end: bool
                 ) -> tuple[dict[str, list[float]], list[float]]:
    live = [it for it in items if it.run is not None]
    for _ in range(warmup):
        for it in live:
            it.run(it.x)
    samples: dict[str, list[float]] = {it.key: [] for it in live}
    e2e: list[float] = []
    for _ in range(repeats):
        for it in live:
            t0 = time.perf_counter()
            it.run(it.x)
            samples[it.key].append((time.perf_counter() - t0) * 1e3)
        if with_end_to_end and live:
            t0 = time.perf_counter()
            for it in live:
                it.run(it.x)
            e2e.append((time.perf_counter() - t0) * 1e3)
    return samples, e2e


def _row(key: str, device: str, file: str, backend: str, first: int, last: int, exit: Optional[str],
         reason: str, samples: Sequence[float]) -> SegmentBench:
    p = percentiles_ms(samples) if samples else None
    return SegmentBench(key=key, device=device, file=file, backend=backend, first_block=first, last_block=last,
                        exit=exit, measurable=not reason, reason=reason,
                        median_ms=p["median_ms"] if p else None, p90_ms=p["p90_ms"] if p else None,
                        samples_ms=tuple(round(s, 5) for s in samples))


def measure_bundle(path: str | Path, repeats: int = 50, warmup: int = 5, threads: int = 1,
                   seed: int = 0) -> BenchResult:
    """Verify the bundle, then time every segment this machine can run (interleaved rounds)."""
    bundle = Path(path)
    verify_bundle(bundle)
    manifest = read_manifest(bundle)
    load_before = os.getloadavg()
    items = _prepare(bundle, threads, seed)
    samples, e2e = _time_rounds(items, repeats, warmup, with_end_to_end=True)
    rows = tuple(_row(it.key, it.stage.name, it.seg.file, it.seg.backend, it.seg.first_block, it.seg.last_block,
                      it.seg.exit, it.reason, samples.get(it.key, ())) for it in items)
    live = [it for it in items if it.run is not None]
    skipped = len(items) - len(live)
    e2e_reason = "" if live else "no segment of this bundle runs on this machine"
    e2e_row = _row(END_TO_END, "all" if not skipped else f"{len(live)} of {len(items)} segments", "", "",
                   0, manifest.stages[-1].last_block, None, e2e_reason, e2e)
    return BenchResult(
        bundle=str(bundle), manifest_sha256=sha256_file(bundle / MANIFEST), model_sha256=manifest.model_sha256,
        distree_version=__version__, tvm_version=manifest.tvm_version, ort_version=manifest.ort_version,
        host=cpu_model(), cpu_count=os.cpu_count() or 0, threads=threads, repeats=repeats, warmup=warmup,
        load_average=tuple(round(x, 2) for x in load_before),
        load_average_after=tuple(round(x, 2) for x in os.getloadavg()),
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), segments=rows, end_to_end=e2e_row)


def remeasure(path: str | Path, keys: Sequence[str], repeats: int, warmup: int, threads: int,
              seed: int = 0) -> dict[str, float]:
    """Median of a fresh set of rounds for the given segment keys (and end to end): the confirmation run."""
    items = _prepare(Path(path), threads, seed)
    wanted = [it for it in items if it.key in keys and it.run is not None]
    samples, _ = _time_rounds(wanted, repeats, warmup, with_end_to_end=False)
    out = {k: float(np.median(v)) for k, v in samples.items()}
    if END_TO_END in keys:
        _, e2e = _time_rounds(items, repeats, warmup, with_end_to_end=True)
        out[END_TO_END] = float(np.median(e2e))
    return out
