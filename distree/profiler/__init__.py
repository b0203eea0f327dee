"""Per-block and per-exit-head latency and memory on each device, measured or estimated, with provenance."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    **dict.fromkeys(("MODES", "default_cache_dir", "device_part", "merge_profiles", "planning_items",
                     "profile_model"), "profile"),
    "block_item": "items", "exit_item": "items", "TimingSettings": "timing", "Measurement": "types",
    "Profile": "types", "cost_sources": "types", "Unit": "units", "profile_units": "units"})
