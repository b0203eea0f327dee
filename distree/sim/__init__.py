"""Discrete-event simulation of a plan and its baselines under load (what-if topologies, rate sweeps)."""

from distree.sim.engine import Load
from distree.sim.inputs import Configuration, Inputs, held_out_samples, load_plan
from distree.sim.simulate import SimReport, simulate

__all__ = ["Configuration", "Inputs", "Load", "SimReport", "held_out_samples", "load_plan", "simulate"]
