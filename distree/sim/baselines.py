"""Baselines on the same inputs as the plan, each chosen on the calibration the solver saw.

- the best single device with no exits (every block there; the input still travels from the source);
- every block on the source device, no exits (no distribution at all);
- the solver's best placement with every exit off (what distribution alone buys);
- PORTEND's space: one global threshold level, exits only at stage ends (enumerated; skipped, with the
  reason, when there are too many placements to enumerate).
"""

from __future__ import annotations

import numpy as np

from distree.solver.brute import all_placements
from distree.solver.costs import evaluate
from distree.solver.heuristic import no_exit_plan, portend_plan
from distree.solver.problem import Problem, ProblemIndex
from distree.exits.types import Calibration
from distree.sim.inputs import Configuration, configuration_from_levels

MAX_PORTEND_PLACEMENTS = 20_000     # evaluate() per placement and level is ~0.1 ms: seconds at most


def baseline_configurations(p: Problem, index: ProblemIndex, calibration: Calibration
                            ) -> tuple[list[Configuration], list[str]]:
    """(baselines, notes on baselines that could not be formed)."""
    off = np.zeros(p.n_exits, dtype=int)
    out, notes = [], []

    def add(name: str, levels: np.ndarray, placement: np.ndarray, note: str = "") -> None:
        out.append(configuration_from_levels(p, index, calibration, name, levels, placement, note))

    singles = [(evaluate(p, off, np.full(p.n_blocks, d)), d) for d in range(p.n_devices)]
    fitting = [(ev.expected_ms, d) for ev, d in singles if not ev.violations]
    if fitting:
        _, d = min(fitting)
        add(f"single device, no exits ({p.devices[d]})", off, np.full(p.n_blocks, d))
    else:
        ev, d = min(singles, key=lambda s: s[0].expected_ms)
        add(f"single device, no exits ({p.devices[d]})", off, np.full(p.n_blocks, d),
            note=f"fits no single device ({', '.join(ev.violations)}); shown on the fastest")
    src = evaluate(p, off, np.full(p.n_blocks, p.source))
    add(f"source only, no exits ({p.devices[p.source]})", off, np.full(p.n_blocks, p.source),
        note=f"violates {', '.join(src.violations)}" if src.violations else "")
    best = no_exit_plan(p)
    if best is None:
        notes.append("best placement without exits: no placement fits the devices")
    else:
        add("best placement, no exits", best.levels, best.placement)
    count = _placement_count(p)
    if count > MAX_PORTEND_PLACEMENTS:
        notes.append(f"PORTEND space: {count} placements, over {MAX_PORTEND_PLACEMENTS} to enumerate; not run")
    else:
        found = portend_plan(p, all_placements(p.n_blocks, p.n_devices, p.free_order))
        if found is None:
            notes.append("PORTEND space: no feasible plan (accuracy or memory)")
        else:
            add("PORTEND space (one global threshold, exits at stage ends)", found.levels, found.placement)
    return out, notes


def _placement_count(p: Problem) -> int:
    """Placements ``all_placements`` would list: device sequences times cut positions."""
    from math import comb, perm
    return sum((perm(p.n_devices, k) if p.free_order else comb(p.n_devices, k)) * comb(p.n_blocks - 1, k - 1)
               for k in range(1, min(p.n_blocks, p.n_devices) + 1))
