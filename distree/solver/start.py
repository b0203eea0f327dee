"""An earlier plan as the solver's starting point (`distree plan --start`).

A seed, not a constraint: its exits and thresholds, read onto this problem's threshold grids, join the local
search's own starting points, and the placement is chosen again. So a plan made for other devices, on another
profile, or for a tighter accuracy bound (a sweep's previous point) still starts the search near a good answer,
and the solve ends no worse than the seed wherever the seed is feasible here (on its own placement, where its
devices are all here, or on the best placement for its configuration).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from distree.errors import DistreeError
from distree.exits.types import Calibration
from distree.graph.chain import Chain
from distree.solver.costs import evaluate
from distree.solver.heuristic import Candidate, place
from distree.solver.plan import Plan
from distree.solver.problem import Problem, ProblemIndex


def check_start(plan: Plan, chain: Chain, calibration: Calibration) -> None:
    """DistreeError unless the plan is of this model and its exits are among the calibration's."""
    if plan.model_sha256 and chain.model_sha256 and plan.model_sha256 != chain.model_sha256:
        raise DistreeError(f"--start: the plan is for model {plan.model_sha256[:12]}, the chain for "
                           f"{chain.model_sha256[:12]}; start from a plan of this model, or leave --start out")
    if plan.score_kind != calibration.score_kind:
        raise DistreeError(f"--start: the plan's exits decide by score {plan.score_kind}, the calibration's by "
                           f"{calibration.score_kind}; start from a plan made with this calibration, or leave "
                           "--start out")
    known = {(e.name, e.after_block) for e in calibration.exits}
    for stage in plan.stages:
        for choice in stage.exits:
            if (choice.name, choice.after_block) not in known:
                raise DistreeError(f"--start: the plan's exit {choice.name} (after block {choice.after_block}) is "
                                   "not among the calibration's exits; start from a plan made with this "
                                   "calibration's exits, or leave --start out")


def start_levels(plan: Plan, chain: Chain, calibration: Calibration, index: ProblemIndex) -> np.ndarray:
    """The plan's configuration as levels of this problem's exits (0: off): each enabled exit at the level whose
    threshold lies nearest the plan's (the grids differ when the calibration was made again)."""
    check_start(plan, chain, calibration)
    exit_of = {calibration.exits[col].name: j for j, col in enumerate(index.exit_columns)}
    levels = np.zeros(len(index.exit_columns), dtype=int)
    for choice in (c for stage in plan.stages for c in stage.exits):
        j = exit_of[choice.name]
        levels[j] = int(np.argmin(np.abs(np.asarray(index.thresholds[j]) - choice.threshold))) + 1
    return levels


def start_placement(plan: Plan, devices: tuple[str, ...]) -> Optional[np.ndarray]:
    """The plan's device of every block, as this problem's device indices; None where a plan device is not here."""
    if any(stage.device not in devices for stage in plan.stages):
        return None
    return np.array([devices.index(stage.device) for stage in plan.stages
                     for _ in range(stage.first_block, stage.last_block + 1)], dtype=int)


def seed_candidate(p: Problem, levels: np.ndarray, placement: Optional[np.ndarray]) -> Optional[Candidate]:
    """The seed as the solver's candidate: the better of its own placement (when given and of this chain's length)
    and the best placement found for its levels (the exact one without a deadline); None where neither fits."""
    found = [c for c in (place(p, levels),) if c is not None]
    if placement is not None and len(placement) == p.n_blocks:
        ev = evaluate(p, levels, placement)
        found.append(Candidate(np.asarray(levels), np.asarray(placement), ev.expected_ms, ev.feasible))
    return min(found, key=lambda c: (not c.feasible, c.expected_ms), default=None)
