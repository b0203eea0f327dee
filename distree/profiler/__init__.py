"""Per-block and per-exit-head latency and memory on each device, measured or estimated, with provenance."""

from distree.profiler.profile import (
    MODES, cost_sources, default_cache_dir, device_part, merge_profiles, planning_items, profile_model,
)
from distree.profiler.timing import TimingSettings
from distree.profiler.types import Measurement, Profile
from distree.profiler.units import Unit, block_item, exit_item, profile_units

__all__ = [
    "MODES", "Measurement", "Profile", "TimingSettings", "Unit", "block_item", "cost_sources", "default_cache_dir",
    "device_part", "exit_item", "merge_profiles", "planning_items", "profile_model", "profile_units",
]
