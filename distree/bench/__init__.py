"""Per-segment latency of a compiled bundle on this machine, and CI regression checks against a baseline."""

from distree.bench.compare import Comparison, compare
from distree.bench.measure import BenchResult, measure_bundle, remeasure

__all__ = ["BenchResult", "Comparison", "compare", "measure_bundle", "remeasure"]
