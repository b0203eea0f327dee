"""Device and link specifications, and the topology that joins them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from distree.serde import JsonRecord

# Serialization/deserialization cost of a tensor crossing a link, on top of the wire time (numpy -> bytes
# -> gRPC frame and back): 1 GB/s, i.e. 1e6 bytes per ms.
SERIALIZE_BYTES_PER_MS = 1.0e6


@dataclass(frozen=True)
class DeviceSpec(JsonRecord):
    """A target device: how to compile for it, what it holds, and the figures used only for estimates."""

    name: str
    target: dict[str, Any]                  # TVM target as a dict (TVM 0.27 takes dicts only)
    host: Optional[dict[str, Any]]          # host target for accelerators (CUDA), else None
    memory_bytes: int
    cores: int
    peak_gflops: float                      # estimate only
    mem_gbps: float                         # estimate only
    runtime_overhead_bytes: int = 64 << 20  # runtime + interpreter resident memory charged to the device
    description: str = ""
    sources: tuple[str, ...] = ()           # where the figures come from
    tvm_tag: str = ""                       # the TVM target tag this entry derives from, if any
    notes: tuple[str, ...] = ()             # limits a user must know (e.g. an accelerator out of reach)


@dataclass(frozen=True)
class LinkSpec(JsonRecord):
    src: str
    dst: str
    bandwidth_mbps: float
    latency_ms: float
    jitter_ms: float = 0.0

    def transfer_ms(self, nbytes: int) -> float:
        """Expected time to move ``nbytes`` over this link: latency + wire time + serialization."""
        if self.src == self.dst:
            return 0.0
        wire = nbytes * 8 / (self.bandwidth_mbps * 1e6) * 1e3
        return self.latency_ms + wire + nbytes / SERIALIZE_BYTES_PER_MS


DEFAULT_LINK = dict(bandwidth_mbps=100.0, latency_ms=2.0, jitter_ms=0.5)  # Wi-Fi 5 class LAN


@dataclass(frozen=True)
class Topology(JsonRecord):
    """Devices in pipeline order; requests arrive at ``source`` and answers return there."""

    devices: tuple[DeviceSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    source: str = ""                         # default: the first device
    default_link: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LINK))

    @property
    def source_device(self) -> str:
        return self.source or self.devices[0].name

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def link(self, src: str, dst: str) -> LinkSpec:
        """The link src->dst; a link given only the other way round is taken as symmetric."""
        for wanted in ((src, dst), (dst, src)):
            for ln in self.links:
                if (ln.src, ln.dst) == wanted:
                    return ln
        return LinkSpec(src=src, dst=dst, **self.default_link)
