"""Per-segment latency of a compiled bundle on this machine, and CI regression checks against a baseline."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "Comparison": "compare", "compare": "compare", "BenchResult": "measure", "measure_bundle": "measure",
    "remeasure": "measure"})
