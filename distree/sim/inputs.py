"""What the simulator runs: configurations (placement + exit thresholds) turned into solver Problems.

A :class:`Configuration` is a plan reduced to what decides behaviour: the device of every block and the
threshold of every enabled exit. :func:`problem_for` builds the solver's Problem for it with each enabled
exit's threshold grid replaced by that one threshold, so ``levels`` are 1 (on) or 0 (off) and a sample
passes an exit iff its own score >= the threshold. The replayed samples may be the calibration the solver
saw or held-out data (:func:`held_out_samples`): the decision is always made on each sample's real score.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from distree.errors import DistreeError
from distree.exits.types import Calibration
from distree.graph.chain import Chain
from distree.profiler.types import Profile
from distree.solver.plan import Plan
from distree.solver.problem import SPORADIC, Constraints, Problem, ProblemIndex, build_problem, required_correct
from distree.targets.spec import Topology


@dataclass(frozen=True)
class Configuration:
    name: str
    placement: tuple[str, ...]          # device of every block
    thresholds: dict[str, float]        # enabled exits only: exit name -> leave iff score >= threshold
    note: str = ""

    def describe(self) -> str:
        """e.g. ``pi4[0..3] exit_1>=0.91 -> jetson-orin-nano[4..10]``."""
        parts, first = [], 0
        for b in range(1, len(self.placement) + 1):
            if b == len(self.placement) or self.placement[b] != self.placement[first]:
                parts.append(f"{self.placement[first]}[{first}..{b - 1}]")
                first = b
        exits = ", ".join(f"{k}>={v:.4g}" for k, v in self.thresholds.items())
        return " -> ".join(parts) + (f"; exits {exits}" if exits else "; no exits")


@dataclass(frozen=True)
class Inputs:
    """The files `distree plan` used, plus the samples to replay (default: the calibration itself)."""

    chain: Chain
    calibration: Calibration        # the threshold split the solver chose on
    profile: Profile
    topology: Topology
    samples: Calibration            # what requests replay
    samples_label: str = "calibration (threshold split)"


def load_plan(path: str | Path) -> Plan:
    """A Plan JSON, or the plan inside a bundle's manifest."""
    p = Path(path)
    if p.is_dir():
        from distree.compiler.manifest import read_manifest
        return read_manifest(p).plan
    if not p.exists():
        raise DistreeError(f"{p}: no such plan file or bundle; pass a plan JSON (`distree plan -o`) or a bundle "
                           "directory (`distree compile -o`)")
    return Plan.load(p)


def configuration_from_plan(plan: Plan, inputs: Inputs, name: str = "plan") -> Configuration:
    """Check the plan against the chain, calibration and topology; keep what decides behaviour."""
    chain, cal, topo = inputs.chain, inputs.calibration, inputs.topology
    if plan.model_sha256 and chain.model_sha256 and plan.model_sha256 != chain.model_sha256:
        raise DistreeError(f"the plan is for model {plan.model_sha256[:12]}, the chain for {chain.model_sha256[:12]}; "
                           "give the chain/calibration/profile files `distree plan` used")
    if plan.score_kind != cal.score_kind:
        raise DistreeError(f"the plan uses score {plan.score_kind}, the calibration {cal.score_kind}; "
                           "give the calibration `distree plan` used")
    B = len(chain.blocks)
    covered = [b for s in plan.stages for b in range(s.first_block, s.last_block + 1)]
    if covered != list(range(B)):
        raise DistreeError(f"the plan's stages cover blocks {covered[:3]}...{covered[-3:]} but the chain has blocks "
                           f"0..{B - 1} in order; give the chain `distree plan` used")
    missing = missing_devices(plan, topo)
    if missing:
        raise DistreeError(f"plan device {missing[0]} is not in the topology; add it, or pass --replan")
    by_name = {e.name: e for e in cal.exits}
    thresholds = {}
    for s in plan.stages:
        for e in s.exits:
            if e.name not in by_name or by_name[e.name].after_block != e.after_block:
                raise DistreeError(f"plan exit {e.name} (after block {e.after_block}) is not in the calibration; "
                                   "give the calibration `distree plan` used")
            thresholds[e.name] = e.threshold
    placement = tuple(s.device for s in plan.stages for _ in range(s.first_block, s.last_block + 1))
    return Configuration(name=name, placement=placement, thresholds=thresholds)


def missing_devices(plan: Plan, topology: Topology) -> list[str]:
    names = {d.name for d in topology.devices}
    return [s.device for s in plan.stages if s.device not in names]


def in_pipeline_order(plan: Plan, topology: Topology) -> bool:
    """Whether the plan visits its devices in the topology's order (else it was solved with --free-order)."""
    order = [d.name for d in topology.devices]
    seen = [order.index(s.device) for s in plan.stages if s.device in order]
    return seen == sorted(seen)


@dataclass(frozen=True, eq=False)
class Instance:
    """One configuration in the solver's terms, over the replayed samples."""

    problem: Problem
    levels: np.ndarray              # [E] 1: enabled at the configuration's threshold, 0: off
    placement: np.ndarray           # [B] device index
    exit_names: tuple[str, ...]     # of the Problem's exits, in its (chain) order


def problem_for(inputs: Inputs, config: Configuration) -> Instance:
    """The solver's Problem over the replayed samples, with the configuration's levels and placement."""
    cal = inputs.samples
    unknown = sorted(set(config.thresholds) - set(cal.exit_names))
    if unknown:
        raise DistreeError(f"exit {unknown[0]} is not among the replayed samples' exits {list(cal.exit_names)}")
    grids = tuple((config.thresholds[e.name],) if e.name in config.thresholds else grid
                  for e, grid in zip(cal.exits, cal.thresholds))
    problem, index = build_problem(inputs.chain, dataclasses.replace(cal, thresholds=grids), inputs.profile,
                                   inputs.topology, Constraints())
    levels = np.array([1 if cal.exits[col].name in config.thresholds else 0 for col in index.exit_columns], dtype=int)
    devices = list(problem.devices)
    placement = np.array([devices.index(d) for d in config.placement], dtype=int)
    return Instance(problem, levels, placement, tuple(cal.exits[col].name for col in index.exit_columns))


def selection_problem(inputs: Inputs, plan: Optional[Plan], free_order: bool) -> tuple[Problem, ProblemIndex]:
    """The solver's Problem on the calibration grid, with the plan's accuracy promise (for baselines)."""
    drop = plan.accuracy_drop if plan else 0.01
    problem, index = build_problem(inputs.chain, inputs.calibration, inputs.profile, inputs.topology,
                                   Constraints(accuracy_drop=drop, free_order=free_order,
                                               traffic=plan.traffic if plan and plan.traffic else SPORADIC))
    if plan and plan.n_samples == problem.n_samples and plan.required_correct > 0:
        problem = problem.replace(required_correct=plan.required_correct)   # e.g. made with --confidence
    return problem, index


def plan_constraints(plan: Plan, n_samples: int, time_limit_s: float, free_order: bool) -> Constraints:
    """The constraints the plan was solved under, as far as the plan records them (for --replan)."""
    plain = required_correct(n_samples, plan.full_model_accuracy - plan.accuracy_drop, None)
    confidence = plan.confidence if plan.n_samples == n_samples and plan.required_correct > plain else None
    return Constraints(accuracy_drop=plan.accuracy_drop, confidence=confidence, time_limit_s=time_limit_s,
                       free_order=free_order, traffic=plan.traffic or SPORADIC)


def configuration_from_levels(problem: Problem, index: ProblemIndex, calibration: Calibration, name: str,
                              levels: np.ndarray, placement: np.ndarray, note: str = "") -> Configuration:
    thresholds = {calibration.exits[index.exit_columns[j]].name: float(index.thresholds[j][lv - 1])
                  for j, lv in enumerate(np.asarray(levels, dtype=int)) if lv > 0}
    return Configuration(name=name, placement=tuple(problem.devices[d] for d in placement), thresholds=thresholds,
                         note=note)


def held_out_samples(calibration: Calibration, chain: Chain, model_path: str | Path,
                     data_path: str | Path) -> Calibration:
    """The calibration's exits scored on other data (e.g. the test set): same exits and grids, new samples."""
    from distree.exits import load_dataset
    from distree.exits.calibrate import run_exits
    from distree.graph import build_chain, load_model

    model = load_model(model_path)
    if chain.model_sha256 and build_chain(model).model_sha256 != chain.model_sha256:
        raise DistreeError(f"{model_path} is not the model of the chain (model_sha256 differs); give the "
                           "multi-exit model `distree calibrate` ran on")
    data = load_dataset(data_path, chain.input_shape)
    behaviour = run_exits(model, chain, calibration.exits, data, calibration.score_kind)
    return dataclasses.replace(
        calibration, scores=tuple(tuple(float(v) for v in row) for row in behaviour.scores),
        correct=tuple(tuple(bool(v) for v in row) for row in behaviour.correct),
        split_sizes={"held_out": len(data)})
