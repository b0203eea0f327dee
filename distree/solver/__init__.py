"""Solver: exits, thresholds and cut points chosen jointly by a MILP (HiGHS; CBC fallback)."""

from distree.solver.brute import brute_force
from distree.solver.plan import ExitChoice, Plan, Stage
from distree.solver.problem import Constraints, Problem, build_problem, check_constraints
from distree.solver.solve import solve, sweep_accuracy_drop

__all__ = ["Constraints", "ExitChoice", "Plan", "Problem", "Stage", "brute_force", "build_problem",
           "check_constraints", "solve", "sweep_accuracy_drop"]
