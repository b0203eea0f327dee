"""Measured (or estimated) cost of every block and exit head on every device, with provenance."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from distree.serde import JsonRecord

PROVENANCES = ("local", "rpc", "qemu-emulated", "estimate")


@dataclass(frozen=True)
class Measurement(JsonRecord):
    device: str
    item: str                       # "block:<i>", "exit:<name>", "entry:<name>", "call", "decide:<score>", "rpc"
    backend: str                    # "tvm" or "ort"; "python" for exit decisions, "grpc" for a hop
    provenance: str                 # "local", "rpc://host:port", "qemu-emulated", "estimate"
    samples_ms: tuple[float, ...]   # empty for estimates
    median_ms: float
    p90_ms: float
    param_bytes: int
    activation_bytes: int           # planned activation/workspace bytes (TVM static plan where available)
    memory_source: str = ""         # "tvm-static-plan" or "graph-workspace-estimate (<why>)"
    threads: int = 1                # threads the backend ran with
    flops: int = 0                  # of the item, from the graph
    note: str = ""                  # e.g. "emulated: not a Pi timing"

    def __post_init__(self) -> None:
        """A profile may be made by hand (a Pi's, say), and a time that is not a finite number >= 0 would steer the
        solver without a word: a NaN made ``Profile.get``'s faster-backend pick arbitrary, a negative block a bonus."""
        times = (("median_ms", self.median_ms), ("p90_ms", self.p90_ms),
                 *((f"samples_ms[{k}]", v) for k, v in enumerate(self.samples_ms)))
        sizes = (("param_bytes", self.param_bytes), ("activation_bytes", self.activation_bytes))
        for name, value in times:
            if not _in_range(value):
                raise ValueError(f"{self.device} {self.item} ({self.backend}): {name} {value!r} is not a time in ms "
                                 "(a finite number >= 0)")
        for name, value in sizes:
            if not _in_range(value):
                raise ValueError(f"{self.device} {self.item} ({self.backend}): {name} {value!r} is not a size in "
                                 "bytes (>= 0)")

    @property
    def memory_bytes(self) -> int:
        """What the item needs resident on its device: weights + planned activations."""
        return self.param_bytes + self.activation_bytes


def _in_range(value: Any) -> bool:
    """A finite number >= 0 (not a string, not a bool, not NaN)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < math.inf   # numpy too


@dataclass(frozen=True)
class Profile(JsonRecord):
    model_sha256: str
    entries: tuple[Measurement, ...]
    versions: dict[str, str]        # distree, tvm, onnxruntime, ... and content hashes used as cache key
    settings: dict[str, Any] = field(default_factory=dict)   # mode, timing settings, threads, cache key

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.device for m in self.entries))

    def get(self, device: str, item: str, backend: str | None = None) -> Measurement:
        """The entry for (device, item); with no backend given, the faster one."""
        found = [m for m in self.entries if m.device == device and m.item == item
                 and (backend is None or m.backend == backend)]
        if not found:
            raise KeyError(f"no profile entry for {item} on {device}")
        return min(found, key=lambda m: m.median_ms)


PROVENANCE_WORDS = {"local": "measured", "estimate": "estimated, not measured",
                    "qemu-emulated": "emulated under qemu (not device timings)"}


def cost_sources(profile: Profile) -> dict[str, str]:
    """device -> where its kernel costs come from, in words (what a plan's numbers are worth)."""
    out = {}
    for device in profile.devices:
        settings = profile.settings.get(device, {})
        kinds = [m.provenance for m in profile.entries if m.device == device and m.item.startswith("block:")]
        provenance = max(sorted(set(kinds)), key=kinds.count) if kinds else "?"
        how = PROVENANCE_WORDS.get(provenance, f"measured over {provenance}")      # rpc://host:port
        if provenance == "local" and settings.get("measured_on"):
            how += f" on {settings['measured_on']}"
        if settings.get("from_file"):
            how += f" (profile {settings['from_file']})"
        out[device] = how
    return out
