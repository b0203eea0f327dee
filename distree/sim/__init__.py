"""Discrete-event simulation of a plan and its baselines under load (what-if topologies, rate sweeps)."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "Configuration": "inputs", "Inputs": "inputs", "held_out_samples": "inputs",
    "load_plan": "inputs", "SimReport": "simulate", "simulate": "simulate"})
