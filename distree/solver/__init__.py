"""Solver: exits, thresholds and cut points chosen jointly by a MILP (HiGHS; CBC fallback)."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "brute_force": "brute", "ExitChoice": "plan", "Plan": "plan", "Stage": "plan", "Constraints": "problem",
    "Problem": "problem", "build_problem": "problem", "check_constraints": "problem", "solve": "solve",
    "sweep_accuracy_drop": "solve"})
