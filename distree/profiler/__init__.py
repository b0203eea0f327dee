"""Per-block and per-exit-head latency and memory on each device, measured or estimated, with provenance."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    **dict.fromkeys(("MODES", "cost_sources", "default_cache_dir", "device_part", "merge_profiles",
                     "planning_items", "profile_model"), "profile"),
    "TimingSettings": "timing", "Measurement": "types", "Profile": "types", "Unit": "units",
    "block_item": "units", "exit_item": "units", "profile_units": "units"})
