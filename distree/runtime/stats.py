"""Live counters of a served stage, and whether the exits its requests take are still the ones its plan priced.

The plan's expected latency and its accuracy promise rest on how often calibration samples left at each exit.
Served data that leaves early less often (another camera, other light) makes requests slower than planned and may
answer worse, and nothing else would say so: a deployment has no labels to measure accuracy with, but every stage
sees which exit each request takes. Each stage counts what it does with every request and keeps its newest
:data:`RECENT` outcomes with their timings; ``distree stats`` asks the source, which asks the next stage and so on,
and :func:`exit_drift` sets the share of a stage's requests that left at each of its exits beside the plan's share,
with a binomial test.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from distree.compiler.manifest import Manifest
from distree.runtime.backends import percentiles_ms
from distree.runtime.executor import FINAL, expected_segment_ms, transfer_in_ms
from distree.serde import JsonRecord
from distree.solver.plan import Plan

RECENT = 4096               # newest outcomes a stage keeps: the window the drift test and the percentiles read
DRIFT_Z = 4.0               # |z| of the binomial test from which a share is called drifted (two-sided p ~ 6e-5) ...
DRIFT_MIN_SHARE = 0.02      # ... when it is also this far from the plan's (a real difference, not noise at large n)
DRIFT_MIN_REQUESTS = 100    # fewer requests decided by the thresholds at a stage: no verdict
FORWARD, DEADLINE, FAILED = "forward", "deadline", "failed"      # outcomes that are not a threshold's answer


def path_ms(manifest: Manifest, stage: int) -> tuple[dict[str, float], float]:
    """(exit -> ms a request spends in ``stage`` when it leaves there, ms when it passes through), by the bundle's
    figures: the transfer into the stage and its sub-segments up to that exit (the last stage's FINAL: all)."""
    seg_ms, transfer = expected_segment_ms(manifest)[stage], transfer_in_ms(manifest)[stage]
    exits, spent = {}, transfer
    for seg, ms in zip(manifest.stages[stage].segments, seg_ms):
        spent += ms
        if seg.exit:
            exits[seg.exit] = spent
    if stage == len(manifest.stages) - 1:
        exits[FINAL] = spent
    return exits, spent


def planned_shares(plan: Plan, stage: int) -> dict[str, float]:
    """Exit name -> the share of the requests reaching ``stage`` that the plan expects to leave there by its
    threshold; the last stage's FINAL is what is left."""
    st = plan.stages[stage]
    reach = max(st.reach_rate, 1e-12)
    shares = {e.name: min(e.exit_rate / reach, 1.0) for e in st.exits}
    if stage == len(plan.stages) - 1:
        shares[FINAL] = max(1.0 - sum(shares.values()), 0.0)
    return shares


class StageCounters:
    """What one stage did with its requests: totals since it started, and its newest outcomes with timings."""

    def __init__(self, device: str, stage: Optional[int], shares: dict[str, float], expected_latency_ms: float,
                 exit_ms: Optional[dict[str, float]] = None, through_ms: float = 0.0) -> None:
        self.device, self.stage, self.shares = device, stage, dict(shares)
        self.expected_latency_ms = expected_latency_ms
        self.exit_ms, self.through_ms = dict(exit_ms or {}), through_ms     # see :func:`path_ms`
        self._lock = threading.Lock()
        self._totals: Counter[str] = Counter()
        self._recent: deque[tuple[str, float, float, float]] = deque(maxlen=RECENT)
        self._started = time.time()

    @classmethod
    def for_stage(cls, manifest: Manifest, device: str, stage: Optional[int]) -> "StageCounters":
        """The counters of ``device``, which runs ``stage`` of the bundle (None: it relays for the source)."""
        if stage is None:
            return cls(device, None, {}, manifest.plan.expected_latency_ms)
        return cls(device, stage, planned_shares(manifest.plan, stage), manifest.plan.expected_latency_ms,
                   *path_ms(manifest, stage))

    def record(self, outcome: str, queued_ms: float = 0.0, compute_ms: float = 0.0, total_ms: float = 0.0) -> None:
        """``outcome``: the exit that answered by its threshold (or ``final``), or FORWARD, DEADLINE, FAILED."""
        with self._lock:
            self._totals[outcome] += 1
            self._recent.append((outcome, queued_ms, compute_ms, total_ms))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            totals, recent = dict(self._totals), list(self._recent)
        done = [r for r in recent if r[0] != FAILED]
        return {
            "device": self.device, "stage": self.stage,
            "started_utc": datetime.fromtimestamp(self._started, timezone.utc).isoformat(timespec="seconds"),
            "uptime_s": round(time.time() - self._started, 1), "expected_latency_ms": self.expected_latency_ms,
            "planned_shares": self.shares, "exit_ms": self.exit_ms, "through_ms": self.through_ms,
            "totals": totals, "recent": dict(Counter(r[0] for r in recent)),
            "queued_ms": percentiles_ms([r[1] for r in done]), "compute_ms": percentiles_ms([r[2] for r in done]),
            "total_ms": percentiles_ms([r[3] for r in done]),
        }


@dataclass(frozen=True)
class ExitDrift(JsonRecord):
    """One exit's share of the requests its stage decided by the thresholds, newest first, against the plan's."""

    device: str
    exit: str
    requests: int               # the stage's newest requests the thresholds decided (deadline answers and failures out)
    taken: int                  # ... of which left here
    planned: float
    served: float
    low: float                  # 95% Wilson interval of ``served``
    high: float
    z: float                    # (taken - requests * planned) / binomial standard deviation
    verdict: str                # "drift", "ok" or "too few requests"


def exit_drift(snapshot: dict[str, Any]) -> list[ExitDrift]:
    """Each exit of one stage's :meth:`StageCounters.snapshot`, tested against its planned share."""
    recent = Counter(snapshot["recent"])
    n = sum(recent.values()) - recent[DEADLINE] - recent[FAILED]
    rows = []
    for name, planned in snapshot["planned_shares"].items():
        taken = recent[name]
        served = taken / n if n else 0.0
        low, high = _wilson(taken, n)
        p = min(max(planned, 1e-9), 1 - 1e-9)
        z = (taken - n * p) / math.sqrt(n * p * (1 - p)) if n else 0.0
        if n < DRIFT_MIN_REQUESTS:
            verdict = "too few requests"
        else:
            verdict = "drift" if abs(z) >= DRIFT_Z and abs(served - planned) >= DRIFT_MIN_SHARE else "ok"
        rows.append(ExitDrift(snapshot["device"], name, n, taken, planned, served, low, high, z, verdict))
    return rows


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


@dataclass(frozen=True)
class PipelineStats(JsonRecord):
    """What ``distree stats`` reports: every stage's snapshot (source first) and the drift test of every exit."""

    address: str
    stages: tuple[dict[str, Any], ...]
    drift: tuple[ExitDrift, ...]
    planned_ms: Optional[float] = None    # a request's compute and transfers by the bundle's figures at the plan's
    served_ms: Optional[float] = None     # shares, and at the served ones (None: a stage did not answer)

    @property
    def drifted(self) -> tuple[ExitDrift, ...]:
        return tuple(d for d in self.drift if d.verdict == "drift")

    @property
    def unreachable(self) -> tuple[str, ...]:
        """The stages that did not answer (their predecessor said why)."""
        return tuple(s["device"] for s in self.stages if "unreachable" in s)


def pipeline_stats(address: str, snapshots: list[dict[str, Any]]) -> PipelineStats:
    drift = [row for snap in snapshots if "unreachable" not in snap for row in exit_drift(snap)]
    if any("unreachable" in snap for snap in snapshots):
        return PipelineStats(address, tuple(snapshots), tuple(drift))
    served = {(d.device, d.exit): d.served for d in drift if d.verdict != "too few requests"}
    return PipelineStats(address, tuple(snapshots), tuple(drift), _expected_ms(snapshots, {}),
                         _expected_ms(snapshots, served))


def _expected_ms(snapshots: list[dict[str, Any]], served: dict[tuple[str, str], float]) -> float:
    """A request's expected ms over the stages' paths (:func:`path_ms`), each exit taking its share of its stage's
    requests from ``served`` (device, exit), else the plan's (a stage with too few requests to say)."""
    reach, total = 1.0, 0.0
    for snap in snapshots:
        shares = {e: served.get((snap["device"], e), planned) for e, planned in snap["planned_shares"].items()}
        leave = sum(shares.values())
        total += reach * (sum(shares[e] * snap["exit_ms"][e] for e in shares) + (1 - leave) * snap["through_ms"])
        reach *= max(1 - leave, 0.0)
    return total


def prometheus_text(report: PipelineStats) -> str:
    """The report in Prometheus' text exposition format, for node_exporter's textfile collector (a cron job runs
    ``distree stats SOURCE --prometheus /var/lib/node_exporter/distree.prom``): counters since each stage started,
    the newest outcomes' timing quantiles, and each exit's served and planned share with its drift verdict."""
    lines: list[str] = []

    def metric(name: str, kind: str, what: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.extend((f"# HELP distree_{name} {what}", f"# TYPE distree_{name} {kind}"))
        for labels, value in samples:
            text = ",".join(f'{k}="{_escaped(v)}"' for k, v in labels.items())
            lines.append(f"distree_{name}{{{text}}} {value:.6g}")

    answered = [snap for snap in report.stages if "unreachable" not in snap]
    metric("stage_up", "gauge", "1 when the stage answered the stats request, 0 when its predecessor could not "
           "reach it", [({"device": s["device"]}, 0.0 if "unreachable" in s else 1.0) for s in report.stages])
    metric("stage_requests_total", "counter", "requests a stage ended, by outcome (an exit, forward, deadline, "
           "failed), since it started", [({"device": s["device"], "outcome": outcome}, float(n))
                                         for s in answered for outcome, n in sorted(s["totals"].items())])
    for series in ("compute_ms", "total_ms"):
        metric(f"stage_{series}", "gauge", f"{series[:-3]} time of the stage's newest requests (ms), by quantile",
               [({"device": s["device"], "quantile": q}, s[series][key]) for s in answered
                for q, key in (("0.5", "median_ms"), ("0.9", "p90_ms"), ("0.99", "p99_ms"))])
    metric("exit_share", "gauge", "share of the requests reaching the exit's stage that left there by its "
           "threshold: served (newest requests) and planned (calibration data)",
           [({"device": d.device, "exit": d.exit, "kind": kind}, value) for d in report.drift
            for kind, value in (("served", d.served), ("planned", d.planned))])
    if report.served_ms is not None:
        metric("request_cost_ms", "gauge", "a request's compute and transfers by the bundle's figures, at the served "
               "exit shares and at the plan's", [({"shares": "served"}, report.served_ms),
                                                 ({"shares": "planned"}, report.planned_ms)])
    metric("exit_drift", "gauge", "1 when the exit's served share drifted from the plan's (binomial test), else 0",
           [({"device": d.device, "exit": d.exit}, float(d.verdict == "drift")) for d in report.drift])
    return "\n".join(lines) + "\n"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
