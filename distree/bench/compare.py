"""Compare a measurement with a baseline: per segment and end to end, medians, confirmed by re-measuring.

A segment regresses when its median is more than ``tolerance`` (relative) AND more than ``min_delta_ms``
(absolute: tens of microseconds are noise on a shared machine) above the baseline's median. A suspected
regression is measured once more; it counts only when the fresh median regresses too. Comparing medians
and demanding two measurements keep one noisy burst from failing CI; a real slowdown shows in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from distree.bench.measure import END_TO_END, BenchResult
from distree.errors import DistreeError
from distree.serde import JsonRecord


@dataclass(frozen=True)
class SegmentComparison(JsonRecord):
    key: str
    file: str
    baseline_ms: Optional[float]
    now_ms: Optional[float]
    remeasured_ms: Optional[float]  # the confirmation run, when the first one looked like a regression
    change: Optional[float]         # now / baseline - 1 (the confirmation's when there was one)
    status: str                     # ok / faster / regressed / noise (not confirmed) / not measurable / new / gone


@dataclass(frozen=True)
class Comparison(JsonRecord):
    tolerance: float
    min_delta_ms: float
    rows: tuple[SegmentComparison, ...]
    warnings: tuple[str, ...]

    @property
    def regressions(self) -> tuple[SegmentComparison, ...]:
        return tuple(r for r in self.rows if r.status == "regressed")


def check_compatible(now: BenchResult, baseline: BenchResult) -> list[str]:
    """User errors (exit 2) for baselines that cannot be compared; warnings for ones that compare poorly."""
    if baseline.model_sha256 != now.model_sha256:
        raise DistreeError(f"the baseline is from another model (model_sha256 {baseline.model_sha256[:12]}, this "
                           f"bundle {now.model_sha256[:12]}); measure this bundle without --baseline to start one")
    if baseline.threads != now.threads:
        raise DistreeError(f"the baseline was measured with --threads {baseline.threads}, now {now.threads}; "
                           "use the same --threads")
    if not set(baseline.by_key()) & {s.key for s in now.segments}:
        raise DistreeError("no segment of the baseline matches this bundle (another plan: other devices or cut "
                           "points); measure this bundle without --baseline to start one")
    warnings = []
    if baseline.manifest_sha256 != now.manifest_sha256:
        warnings.append(f"the baseline measured another build of this model's bundle (manifest "
                        f"{baseline.manifest_sha256[:12]}, now {now.manifest_sha256[:12]}): segments compared by "
                        "device and block range")
    if baseline.host != now.host:
        warnings.append(f"the baseline was measured on {baseline.host}, this is {now.host}: timings compare poorly")
    for what, a, b in (("distree", baseline.distree_version, now.distree_version),
                       ("TVM", baseline.tvm_version, now.tvm_version),
                       ("ONNX Runtime", baseline.ort_version, now.ort_version)):
        if a != b:
            warnings.append(f"{what} {a} in the baseline, {b} now")
    return warnings


def _regressed(base: float, now: float, tolerance: float, min_delta_ms: float) -> bool:
    return now > base * (1 + tolerance) and now - base > min_delta_ms


def compare(now: BenchResult, baseline: BenchResult, tolerance: float, min_delta_ms: float,
            remeasure: Callable[[Sequence[str]], dict[str, float]]) -> Comparison:
    """Rows for every segment of either side; ``remeasure(keys)`` returns fresh medians for suspects."""
    warnings = check_compatible(now, baseline)
    base, cur = baseline.by_key(), now.by_key()
    suspects = [k for k, s in cur.items() if k in base and s.median_ms is not None and base[k].median_ms is not None
                and _regressed(base[k].median_ms, s.median_ms, tolerance, min_delta_ms)]
    fresh = remeasure(suspects) if suspects else {}
    rows = []
    keys = [*(k for k in cur if k != END_TO_END), *(k for k in base if k not in cur and k != END_TO_END), END_TO_END]
    for key in keys:
        b, n = base.get(key), cur.get(key)
        if n is None:
            rows.append(SegmentComparison(key, b.file, b.median_ms, None, None, None, "gone"))
            continue
        if not n.measurable:
            rows.append(SegmentComparison(key, n.file, b.median_ms if b else None, None, None, None,
                                          "not measurable"))
            continue
        if b is None or b.median_ms is None:
            rows.append(SegmentComparison(key, n.file, None, n.median_ms, None, None, "new"))
            continue
        again = fresh.get(key)
        final = again if again is not None else n.median_ms
        change = final / b.median_ms - 1 if b.median_ms > 0 else None
        if key in suspects:
            status = "regressed" if again is not None and _regressed(b.median_ms, again, tolerance, min_delta_ms) \
                else "noise"
        elif n.median_ms < b.median_ms / (1 + tolerance):
            status = "faster"
        else:
            status = "ok"
        rows.append(SegmentComparison(key, n.file, b.median_ms, n.median_ms, again, change, status))
    return Comparison(tolerance=tolerance, min_delta_ms=min_delta_ms, rows=tuple(rows), warnings=tuple(warnings))
