"""Baselines on the same inputs as the plan, each chosen on the calibration the solver saw.

- the best single device with no exits (every block there; the input still travels from the source);
- every block on the source device, no exits (no distribution at all);
- the solver's best placement with every exit off (what distribution alone buys);
- PORTEND's space: one global threshold level, exits only at stage ends (enumerated; skipped, with the
  reason, when there are too many placements to enumerate);
- for each device the plan leaves idle, the plan's own exits and thresholds placed at the cheapest through it
  (what using that device would cost: the hop it adds against the compute it takes over).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distree.solver.brute import all_placements
from distree.solver.costs import best_placement, evaluate
from distree.solver.heuristic import no_exit_plan, portend_plan
from distree.solver.plan import Plan
from distree.solver.problem import Problem, ProblemIndex
from distree.exits.types import Calibration
from distree.sim.inputs import Configuration, Inputs, configuration_from_levels, configuration_from_plan, problem_for

NO_PLACEMENT_THROUGH = "no placement in pipeline order that runs a stage there fits the devices' memory"
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


def through_idle_devices(inputs: Inputs, plan: Configuration) -> dict[str, tuple[Configuration, float] | None]:
    """Each device of the topology the plan leaves idle -> the plan's exits and thresholds placed at the cheapest
    (pipeline order, memory kept) through it, chosen on the calibration, and its expected latency there (ms, the
    solver's cost model); None where no such placement fits."""
    chosen_on = problem_for(dataclasses.replace(inputs, samples=inputs.calibration), plan)
    p = chosen_on.problem
    out: dict[str, tuple[Configuration, float] | None] = {}
    for d, name in enumerate(p.devices):
        if name in plan.placement:
            continue
        found = best_placement(p, chosen_on.levels, through=d)
        out[name] = None if found is None else (Configuration(
            name=f"the plan's exits, through {name}", placement=tuple(p.devices[k] for k in found[0]),
            thresholds=dict(plan.thresholds), note=f"{name} idle in the plan: what using it costs"), found[1])
    return out


def idle_device_costs(inputs: Inputs, plan: Plan) -> dict[str, float | None]:
    """Each device the plan leaves idle -> the expected latency (ms) of the plan's exits placed through it; None
    where none fits. Says how far from worth using a device is."""
    through = through_idle_devices(inputs, configuration_from_plan(plan, inputs))
    return {device: None if found is None else found[1] for device, found in through.items()}


def idle_device_lines(idle_ms: dict[str, float | None], plan_ms: float, simulate_hint: str) -> list[str]:
    """What each idle device would cost, one line each (``idle_ms`` from :func:`idle_device_costs`)."""
    if not idle_ms:
        return []
    lines = [f"devices without a stage (the plan found them not worth using): {', '.join(idle_ms)}"]
    for device, ms in idle_ms.items():
        lines.append(f"  {device}: the plan's exits placed through it predict {ms:.3f} ms ({ms - plan_ms:+.3f}); "
                     f"{simulate_hint} compares the two under load" if ms is not None else
                     f"  {device}: the plan's exits: {NO_PLACEMENT_THROUGH}")
    return lines


def _placement_count(p: Problem) -> int:
    """Placements ``all_placements`` would list: device sequences times cut positions."""
    from math import comb, perm
    return sum((perm(p.n_devices, k) if p.free_order else comb(p.n_devices, k)) * comb(p.n_blocks - 1, k - 1)
               for k in range(1, min(p.n_blocks, p.n_devices) + 1))
