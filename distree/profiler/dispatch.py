"""What running a bundle costs beyond its kernels: calling a sub-segment, and deciding at an exit.

Each block and head is profiled as a standalone model, so each measurement carries one call's fixed cost
(``session.run``, the VM's invoke). A bundle pays that cost once per sub-segment it runs, and after every exit
head the runtime scores the logits and compares the score with the threshold in Python. Without both, plans
with many exits looked cheaper than they run and long stages dearer (on this machine: a MobileNet-like model
predicted at 0.044 ms ran at 0.053 ms, its no-exit path predicted at 0.474 ms ran at 0.318 ms).

- ``call``: a one-op model profiled like every other unit (same backends, same modes), so it measures the
  fixed cost that every other entry of the same device and backend includes;
- ``decide:<score kind>``: ``ExitPolicy.decide`` on one sample's logits, timed here; on another device it is
  scaled by per-core speed and says so (TVM RPC cannot run Python on the device).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from distree.exits.types import SCORE_KINDS
from distree.profiler.estimate import per_core_gflops
from distree.profiler.timing import TimingSettings, summarize, time_callable
from distree.profiler.types import Measurement
from distree.profiler.units import decide_item
from distree.targets.catalog import host_device
from distree.targets.spec import DeviceSpec

DECIDE_BACKEND = "python"


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


def decide_entries(device: DeviceSpec, classes: int, timing: TimingSettings, measured_here: bool,
                   score_kinds: Sequence[str] = SCORE_KINDS) -> list[Measurement]:
    """One ``decide:<kind>`` entry per score kind: measured when ``device`` is this machine, else scaled."""
    out = []
    for kind in score_kinds:
        samples = time_decide(kind, classes, timing)
        median, p90 = summarize(samples)
        if measured_here:
            provenance, note = "local", ""
        else:
            slow = per_core_gflops(host_device()) / per_core_gflops(device)
            samples, median, p90 = (), median * slow, p90 * slow
            provenance = "estimate"
            note = (f"exit decisions (Python) on {device.name}: timed on this machine and scaled by per-core "
                    f"speed (x{slow:.2f}), not measured there")
        out.append(Measurement(device=device.name, item=decide_item(kind), backend=DECIDE_BACKEND,
                               provenance=provenance, samples_ms=tuple(samples), median_ms=median, p90_ms=p90,
                               param_bytes=0, activation_bytes=0, memory_source="none: Python on the logits",
                               threads=timing.threads, note=note))
    return out
