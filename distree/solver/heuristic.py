"""Good feasible plans fast: a warm start and an upper bound for the MILP, and baselines to report.

``local_search`` alternates (a) the exact best placement of the current exit configuration (dynamic
programme) with (b) the best single change of one exit's level under that placement. ``no_exit_plan``
is the best plan with every exit off. ``portend_plan`` is PORTEND's search space (one global threshold
level, exits only at stage ends) solved by enumeration.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from distree.solver.costs import best_placement, evaluate
from distree.solver.problem import Problem

DEADLINE_WEIGHTS = (0.0, 0.01, 0.1, 1.0, 10.0, 1000.0)


@dataclass(frozen=True)
class Candidate:
    levels: np.ndarray
    placement: np.ndarray
    expected_ms: float
    feasible: bool


def _orders(p: Problem) -> list[tuple[int, ...] | None]:
    if not p.free_order:
        return [None]
    if p.n_devices <= 4:
        return list(itertools.permutations(range(p.n_devices)))
    speed = np.argsort(p.block_ms.sum(axis=1))
    return [tuple(range(p.n_devices)), tuple(reversed(range(p.n_devices))), tuple(int(d) for d in speed),
            tuple(int(d) for d in speed[::-1])]


def place(p: Problem, levels: np.ndarray) -> Candidate | None:
    """Best placement found for a configuration: exact without a deadline, Lagrangian sweep with one."""
    best = None
    for order in _orders(p):
        for lam in DEADLINE_WEIGHTS if p.deadline_ms is not None else (0.0,):
            found = best_placement(p, levels, deadline_weight=lam, order=order)
            if found is None:
                break
            ev = evaluate(p, levels, found[0])
            if "deadline" in ev.violations:
                continue
            cand = Candidate(np.asarray(levels), found[0], ev.expected_ms, ev.feasible)
            if best is None or _key(cand) < _key(best):
                best = cand
            break
    return best


def _key(c: Candidate) -> tuple[bool, float]:
    return (not c.feasible, c.expected_ms)


def _penalised(p: Problem, levels: np.ndarray, placement: np.ndarray) -> float:
    ev = evaluate(p, levels, placement)
    if set(ev.violations) - {"accuracy"}:
        return np.inf
    return ev.expected_ms + 1e6 * max(0, p.required_correct - ev.correct) / p.n_samples


def local_search(p: Problem, max_rounds: int = 50) -> Candidate | None:
    levels = np.zeros(p.n_exits, dtype=int)
    cur = place(p, levels)
    if cur is None:
        return None
    cur_score = _penalised(p, cur.levels, cur.placement)
    for _ in range(max_rounds):
        best_move, best_score = None, cur_score
        for j in range(p.n_exits):
            for lv in range(p.n_levels[j] + 1):
                if lv == cur.levels[j]:
                    continue
                trial = cur.levels.copy()
                trial[j] = lv
                s = _penalised(p, trial, cur.placement)
                if s < best_score - 1e-12:
                    best_move, best_score = trial, s
        if best_move is None:
            break
        moved = place(p, best_move)
        if moved is None:
            break
        cur = moved
        cur_score = _penalised(p, cur.levels, cur.placement)
    return cur if cur.feasible else None


def no_exit_plan(p: Problem) -> Candidate | None:
    """Best plan with all exits off (placement by the exact DP; Lagrangian with a deadline)."""
    cand = place(p, np.zeros(p.n_exits, dtype=int))
    return cand if cand is not None and cand.feasible else None


def portend_plan(p: Problem, placements: np.ndarray) -> Candidate | None:
    """PORTEND's space: one global level for all enabled exits, exits only where a stage ends."""
    best = None
    top = int(p.n_levels.max()) if p.n_exits else 0
    for pl in placements:
        ends = set(np.nonzero(np.diff(pl))[0].tolist())
        at_end = np.array([a in ends for a in p.exit_after], dtype=bool)
        for g in range(top + 1):
            levels = np.where(at_end, np.minimum(g, p.n_levels), 0)
            ev = evaluate(p, levels, pl)
            if ev.feasible and (best is None or ev.expected_ms < best.expected_ms):
                best = Candidate(levels, pl, ev.expected_ms, True)
            if not at_end.any():
                break
    return best
