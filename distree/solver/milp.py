"""The MILP: exits, thresholds and placement chosen jointly, solved by HiGHS (highspy) or CBC via PuLP.

Formulation (why it is exact and why it is tighter than a survival/McCormick model):

* ``w[j,l]`` binary: exit j runs at level l (sum_l w <= 1, level 0 = off). Sample class c *passes* exit j
  iff ``pass[c,j] = sum_{l <= L[c,j]} w[j,l]`` is 1 -- linear because levels are monotone.
* ``e[c,j]`` in [0,1]: class c leaves at exit j (first-exit form), only for exits c can pass at all:
  ``e[c,j] <= pass[c,j]``, ``sum_{k<=j} e[c,k] >= pass[c,j]`` (it has left by j once it passes j) and
  ``sum_k e[c,k] <= 1``. For integer w these force e to the indicator of the first passed enabled exit
  (the pairwise ``e[c,j] <= 1 - pass[c,k]`` for k<j is implied), so e needs no integrality.
* Samples with identical (levels passed, correctness) merge into classes with weights; levels that pass
  the same samples as the next level merge; levels nobody passes (and exits with none left) are dropped
  -- each leaves the optimum unchanged.
* Placement as a flow of *reach mass* through (block, device): ``y[b,d]`` = share of samples that run
  block b on device d (``y[b,d] <= z[b,d]``), ``ry[j,d]`` = share leaving at exit j on device d, and
  ``f[b,d,d']`` = share crossing the cut after b from d to d'. Conservation
  ``sum_d' f[b,d,d'] = y[b,d] - sum_{j after b} ry[j,d]`` and ``sum_d f[b,d,d'] = y[b+1,d']`` make
  reach, transfers and returns exact with no big-M on the expected cost. Heads cost
  ``hy[j,d] >= reach_on_d(j) - (1 - enabled_j)``.
* Memory, deadline (no-exit path) and throughput (expected busy time per stage) are linear in z, the
  head indicators ``hz[j,d] >= enabled_j + z[a_j,d] - 1``, ``y`` and ``f`` (a stage's handling of the requests
  it receives, ``y[0,d]`` plus the flow into d, and of those it hands on, the flow out of d).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pulp
from pulp.apis.coin_api import pulp_cbc_path

from distree.interrupt import listening, requested
from distree.solver.plan import WITHIN_GAP
from distree.solver.problem import Problem

LE, GE, EQ = pulp.LpConstraintLE, pulp.LpConstraintGE, pulp.LpConstraintEQ
# A small cut pool: HiGHS otherwise spends most of the time in root separation on these models
# (measured: 12-block, 6-exit, 8-level, 2,500-sample case on 3 devices, 26 s -> 10-12 s to optimality).
HIGHS_OPTIONS = {"mip_pool_soft_limit": 100, "mip_lp_age_limit": 5}
PROVEN_GAP = 1e-6                 # the relative MIP gap at which a plan counts as proven optimal
OBJECTIVES = ("latency", "correct", "bottleneck")    # what a Model minimises (solve_milp)


@dataclass(frozen=True)
class Reduced:
    """The problem after exact reductions: merged levels, dropped exits, sample classes."""

    exits: np.ndarray          # Problem exit index of each kept exit
    level_map: list            # per kept exit: reduced level k (1-based) -> original level
    passed: np.ndarray         # [C, E'] reduced passed level per class
    correct_exit: np.ndarray   # [C, E']
    correct_final: np.ndarray  # [C]
    weight: np.ndarray         # [C] samples per class


def reduce(p: Problem) -> Reduced:
    kept_exits, level_maps, cols = [], [], []
    for j in range(p.n_exits):
        col = p.passed_level[:, j]
        kept = [lv for lv in range(1, p.n_levels[j] + 1) if np.any(col == lv)]
        if not kept:
            continue
        kept_exits.append(j)
        level_maps.append(kept)
        cols.append(np.searchsorted(np.array(kept), col, side="right"))
    E = len(kept_exits)
    passed = np.stack(cols, axis=1) if E else np.zeros((p.n_samples, 0), dtype=int)
    corr = p.correct_exit[:, kept_exits] & (passed > 0)
    key = np.concatenate([passed, corr, p.correct_final[:, None]], axis=1).astype(np.int64)
    uniq, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    return Reduced(exits=np.array(kept_exits, dtype=int), level_map=level_maps, passed=uniq[:, :E],
                   correct_exit=uniq[:, E:2 * E].astype(bool), correct_final=uniq[:, 2 * E].astype(bool),
                   weight=counts)


def estimated_rows(p: Problem) -> int:
    """Constraint rows of the MILP (before building it): three per (sample class, passable exit) + placement."""
    r = reduce(p)
    arcs = p.n_devices * p.n_devices
    return int(3 * (r.passed > 0).sum() + p.n_blocks * (3 * p.n_devices + arcs) + 4 * len(r.exits) * p.n_devices)


@dataclass(frozen=True)
class MilpResult:
    levels: np.ndarray | None       # per Problem exit (0 = off)
    placement: np.ndarray | None
    objective: float                # the model's objective at the returned solution
    bound: float                    # proven lower bound
    status: str                     # "optimal", "time-limit", "infeasible", "no-solution"
    sol_status: str                 # PuLP's solution status name
    gap: float
    wall_s: float
    n_vars: int
    n_constraints: int
    n_classes: int


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's highspy interface plus a (partial) start: PuLP 3.3 passes no warm start to highspy."""

    def __init__(self, start: dict[str, float] | None = None, deadline: float | None = None, **kw):
        super().__init__(**kw)
        self.start = start or {}
        self.deadline = deadline      # time.perf_counter() value: loading the model counts against the limit

    def createAndConfigureSolver(self, lp):
        """highspy prints its banner from C++ when the solver object is made, before any option applies."""
        with contextlib.nullcontext() if self.msg else _stdout_to_devnull():
            super().createAndConfigureSolver(lp)

    def buildSolverModel(self, lp):
        """PuLP's loader adds one column and one row per Python call; pass them in bulk instead."""
        import highspy
        h = lp.solverModel
        inf = highspy.kHighsInf
        variables = lp.variables()
        for i, var in enumerate(variables):
            var.index = i
        n = len(variables)
        lower = np.array([-inf if v.lowBound is None else v.lowBound for v in variables], dtype=float)
        upper = np.array([inf if v.upBound is None else v.upBound for v in variables], dtype=float)
        cost = np.array([lp.objective.get(v, 0.0) for v in variables], dtype=float)
        h.addVars(n, lower, upper)
        h.changeColsCost(n, np.arange(n, dtype=np.int32), cost)
        ints = np.array([v.index for v in variables if v.cat == pulp.LpInteger], dtype=np.int32)
        if len(ints) and self.mip:
            h.changeColsIntegrality(len(ints), ints, np.full(len(ints), highspy.HighsVarType.kInteger))
        starts, index, value, row_lo, row_hi = [], [], [], [], []
        for i, con in enumerate(lp._constraints.values()):
            con.index = i
            starts.append(len(index))
            for var, coef in con.items():
                if coef:
                    index.append(var.index)
                    value.append(coef)
            lb, ub = con.getLb(), con.getUb()
            row_lo.append(-inf if lb is None else lb)
            row_hi.append(inf if ub is None else ub)
        h.addRows(len(starts), np.array(row_lo, dtype=float), np.array(row_hi, dtype=float), len(index),
                  np.array(starts, dtype=np.int32), np.array(index, dtype=np.int32), np.array(value, dtype=float))

    def callSolver(self, lp):
        if self.start:
            by_name = {v.name: v.index for v in lp.variables()}
            idx = [by_name[n] for n in self.start if n in by_name]
            val = [self.start[n] for n in self.start if n in by_name]
            lp.solverModel.setSolution(len(idx), np.array(idx, dtype=np.int32), np.array(val, dtype=float))
        if self.deadline is not None:
            lp.solverModel.setOptionValue("time_limit", max(0.5, self.deadline - time.perf_counter()))
        if listening():             # Ctrl-C: HiGHS stops at its next check, with its best solution
            lp.solverModel.cbSimplexInterrupt += _stop_if_requested
            lp.solverModel.cbMipInterrupt += _stop_if_requested
        lp.solverModel.run()


def _stop_if_requested(event) -> None:
    if requested():
        event.interrupt()


@contextlib.contextmanager
def _stdout_to_devnull():
    """Silence file descriptor 1 (C-level prints, which Python's sys.stdout redirection misses)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class Model:
    """The PuLP model and the variables needed to read a solution back."""

    def __init__(self, p: Problem, r: Reduced, objective: str = "latency"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: one of {OBJECTIVES}")
        self.p, self.r = p, r
        self.objective = objective
        self.lp = pulp.LpProblem("distree_plan", pulp.LpMinimize)
        self._build()

    def _add(self, constraint, name: str) -> None:
        self.lp.addConstraint(constraint, name)

    def _row(self, terms: list, sense: int, rhs: float, name: str) -> None:
        """A constraint from (variable, coefficient) pairs: far faster than PuLP operator arithmetic."""
        self.lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), sense, rhs=rhs), name)

    def _build(self) -> None:
        p, r = self.p, self.r
        B, D = p.n_blocks, p.n_devices
        E = len(r.exits)
        after = p.exit_after[r.exits]
        N = float(r.weight.sum())
        lin = pulp.lpSum
        arcs = [(d, e) for d in range(D) for e in range(D) if (d == e or p.free_order or d < e)]

        # v[j,l] = 1 iff exit j is on with level <= l: a class with passed level L passes iff v[j,L] = 1,
        # one variable instead of a sum over levels (the monotone structure of thresholds)
        self.v = {(j, k): self.lp.add_variable(f"v_{j}_{k}", cat="Binary")
                  for j in range(E) for k in range(1, len(r.level_map[j]) + 1)}
        en = {j: self.v[j, len(r.level_map[j])] for j in range(E)}
        for j in range(E):
            for k in range(1, len(r.level_map[j])):
                self._row([(self.v[j, k], 1), (self.v[j, k + 1], -1)], LE, 0, f"levels_nested_x{j}_l{k}")
        self.z = {(b, d): self.lp.add_variable(f"z_{b}_{d}", cat="Binary") for b in range(B) for d in range(D)}
        usable = p.capacity_bytes >= 0
        for b in range(B):
            self._add(lin(self.z[b, d] for d in range(D)) == 1, f"assign_block{b}")
            for d in range(D):
                if not usable[d]:
                    self.z[b, d].upBound = 0

        # --- which exit each sample class leaves at ---------------------------------------------------
        # u[c,j] = share of class c gone by exit j (cumulative first-exit indicator); leaving at j is
        # u[c,j] - u[c,prev]. u >= pass: gone once it passes; u - u_prev <= pass: leaves only where it passes.
        rate_terms: dict[int, list] = {j: [] for j in range(E)}
        acc_terms: dict = defaultdict(float)     # a u appears twice (as u and as the next one's prev)
        for c in range(len(r.weight)):
            prev = None
            share = r.weight[c] / N
            for j in np.nonzero(r.passed[c] > 0)[0]:
                u = self.lp.add_variable(f"u_{c}_{j}", lowBound=0, upBound=1)
                pass_cj = self.v[j, int(r.passed[c, j])]
                step = [(u, 1)] + ([(prev, -1)] if prev is not None else [])
                self._row(step + [(pass_cj, -1)], LE, 0, f"exit_needs_pass_c{c}_x{j}")
                self._row([(u, 1), (pass_cj, -1)], GE, 0, f"exit_first_c{c}_x{j}")
                if prev is not None:
                    self._row(step, GE, 0, f"exit_once_c{c}_x{j}")
                rate_terms[j] += [(var, sign * share) for var, sign in step]
                gain = int(r.correct_exit[c, j]) - int(r.correct_final[c])
                for var, sign in step if gain else ():
                    acc_terms[var] += sign * gain * r.weight[c]
                prev = u
        rate = {j: self.lp.add_variable(f"rate_{j}", lowBound=0, upBound=1) for j in range(E)}
        for j in range(E):
            self._row([(rate[j], -1)] + rate_terms[j], EQ, 0, f"exit_rate_x{j}")
        base_correct = int((r.weight * r.correct_final).sum())
        self.correct = pulp.LpAffineExpression(list(acc_terms.items())) + base_correct
        self._add(self.correct >= p.required_correct, "accuracy")

        # --- reach mass through (block, device) ---------------------------------------------------------
        y = {(b, d): self.lp.add_variable(f"y_{b}_{d}", lowBound=0, upBound=1) for b in range(B) for d in range(D)}
        ry = {(j, d): self.lp.add_variable(f"ry_{j}_{d}", lowBound=0, upBound=1) for j in range(E) for d in range(D)}
        f = {(b, d, e): self.lp.add_variable(f"f_{b}_{d}_{e}", lowBound=0, upBound=1)
             for b in range(B - 1) for d, e in arcs}
        self._add(lin(y[0, d] for d in range(D)) == 1, "all_requests_enter")
        for b in range(B):
            for d in range(D):
                self._add(y[b, d] <= self.z[b, d], f"reach_only_where_placed_b{b}_d{d}")
        exits_after = {b: [j for j in range(E) if after[j] == b] for b in range(B)}
        for j in range(E):
            self._add(lin(ry[j, d] for d in range(D)) == rate[j], f"exit_rate_split_x{j}")
            for d in range(D):
                self._add(ry[j, d] <= self.z[after[j], d], f"exit_where_placed_x{j}_d{d}")
        for b in range(B - 1):
            for d in range(D):
                self._add(lin(f[b, d, e] for e in range(D) if (b, d, e) in f)
                          == y[b, d] - lin(ry[j, d] for j in exits_after[b]), f"flow_out_b{b}_d{d}")
                self._add(lin(f[b, e, d] for e in range(D) if (b, e, d) in f) == y[b + 1, d],
                          f"flow_in_b{b + 1}_d{d}")
        # heads: reach of exit j on device d, times "enabled"
        hy = {(j, d): self.lp.add_variable(f"hy_{j}_{d}", lowBound=0) for j in range(E) for d in range(D)}
        hz = {(j, d): self.lp.add_variable(f"hz_{j}_{d}", lowBound=0, upBound=1) for j in range(E) for d in range(D)}
        for j in range(E):
            earlier_here = [k for k in exits_after[after[j]] if k < j]
            for d in range(D):
                reach_jd = y[after[j], d] - lin(ry[k, d] for k in earlier_here)
                self._add(hy[j, d] >= reach_jd - (1 - en[j]), f"head_reach_x{j}_d{d}")
                self._add(hz[j, d] >= en[j] + self.z[after[j], d] - 1, f"head_placed_x{j}_d{d}")

        # --- ordering / contiguity of stages --------------------------------------------------------------
        if not p.free_order:
            for b in range(B - 1):
                for d in range(D - 1):
                    self._add(lin(self.z[b + 1, k] for k in range(d + 1))
                              <= lin(self.z[b, k] for k in range(d + 1)), f"device_order_b{b}_d{d}")
        else:
            for d in range(D):
                starts = [self.z[0, d]]
                for b in range(1, B):
                    s = self.lp.add_variable(f"start_{b}_{d}", lowBound=0, upBound=1)
                    self._add(s >= self.z[b, d] - self.z[b - 1, d], f"stage_start_b{b}_d{d}")
                    starts.append(s)
                self._add(lin(starts) <= 1, f"one_stage_per_device_d{d}")

        # --- objective: expected latency ------------------------------------------------------------------
        obj = []
        for d in range(D):
            obj.append(p.cut_ms[p.source, d, 0] * self.z[0, d])
            obj.append(p.return_ms[d] * y[B - 1, d])
            for b in range(B):
                obj.append(p.block_ms[d, b] * y[b, d])
            for j in range(E):
                obj.append(p.head_ms[d, r.exits[j]] * hy[j, d])
                obj.append(p.return_ms[d] * ry[j, d])
        for (b, d, e), v in f.items():
            if d != e:
                obj.append(p.cut_ms[d, e, b + 1] * v)
        # (the diagnostic variants ask instead for the most correct answers any plan can give, or for the least
        # expected busy time of its busiest stage: the highest request rate it sustains)
        if self.objective == "bottleneck":
            self.busiest = self.lp.add_variable("busiest_stage_ms", lowBound=0)
            self.lp += self.busiest
        else:
            self.lp += -self.correct if self.objective == "correct" else lin(obj)

        # --- memory per device --------------------------------------------------------------------------
        # rows are in units of the device's capacity: byte counts (1e6..1e9) would wreck the scaling
        for d in np.nonzero(usable)[0]:
            unit = max(float(p.capacity_bytes[d]), 1.0)
            act = self.lp.add_variable(f"peak_act_{d}", lowBound=0)
            for b in range(B):
                if p.block_act[d, b] > 0:
                    self._add(act >= p.block_act[d, b] / unit * self.z[b, d], f"peak_act_b{b}_d{d}")
            for j in range(E):
                if p.head_act[d, r.exits[j]] > 0:
                    self._add(act >= p.head_act[d, r.exits[j]] / unit * hz[j, d], f"peak_act_x{j}_d{d}")
            params = lin(p.block_param[d, b] / unit * self.z[b, d] for b in range(B)) + lin(
                p.head_param[d, r.exits[j]] / unit * hz[j, d] for j in range(E))
            self._add(params + act <= 1, f"memory_d{d}")

        # --- deadline on the no-exit path -------------------------------------------------------------------
        if p.deadline_ms is not None:
            cz = {}
            for b in range(B - 1):
                for d, e in arcs:
                    if d != e:
                        v = self.lp.add_variable(f"cut_{b}_{d}_{e}", lowBound=0, upBound=1)
                        self._add(v >= self.z[b, d] + self.z[b + 1, e] - 1, f"cut_used_b{b}_d{d}_e{e}")
                        cz[b, d, e] = v
            worst = lin(p.block_ms[d, b] * self.z[b, d] for b in range(B) for d in range(D)) \
                + lin(p.head_ms[d, r.exits[j]] * hz[j, d] for j in range(E) for d in range(D)) \
                + lin(p.cut_ms[d, e, b + 1] * v for (b, d, e), v in cz.items()) \
                + lin(p.cut_ms[p.source, d, 0] * self.z[0, d] + p.return_ms[d] * self.z[B - 1, d]
                      for d in range(D))
            self._add(worst <= p.deadline_ms, "deadline")

        # --- throughput: expected busy time per stage -----------------------------------------------------
        if p.busy_cap_ms is not None or self.objective == "bottleneck":
            h = p.handling
            for d in range(D):
                # requests that enter d (at block 0, or across a cut from another device) and that leave it
                received = y[0, d] + lin(v for (b, e, k), v in f.items() if k == d and e != d)
                handed_on = lin(v for (b, e, k), v in f.items() if e == d and k != d)
                busy = lin(p.block_ms[d, b] * y[b, d] for b in range(B)) + lin(
                    p.head_ms[d, r.exits[j]] * hy[j, d] for j in range(E)) + h[d, 0] * received + h[d, 1] * handed_on
                if d == p.source and h[d].any():        # relaying every request when it runs no stage
                    relay = self.lp.add_variable("relay", lowBound=0, upBound=1)
                    self._add(relay >= 1 - lin(self.z[b, d] for b in range(B)), "relay_when_no_stage")
                    busy = busy + h[d].sum() * relay
                if p.busy_cap_ms is not None:
                    self._add(busy <= p.busy_cap_ms, f"throughput_d{d}")
                if self.objective == "bottleneck":
                    self._add(busy <= self.busiest, f"busiest_d{d}")

    def start_values(self, levels: np.ndarray, placement: np.ndarray) -> dict[str, float]:
        """Values of the integer variables for a known plan (a warm start)."""
        start = {}
        for j, pj in enumerate(self.r.exits):
            # the level the plan uses, in reduced numbering (a level between kept ones acts like the next)
            chosen = np.searchsorted(self.r.level_map[j], levels[pj]) + 1 if levels[pj] > 0 else np.inf
            for k in range(1, len(self.r.level_map[j]) + 1):
                start[self.v[j, k].name] = float(k >= chosen)
        for (b, d), v in self.z.items():
            start[v.name] = float(placement[b] == d)
        return start

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        p, r = self.p, self.r
        levels = np.zeros(p.n_exits, dtype=int)
        for j in range(len(r.exits)):
            on = [k for k in range(1, len(r.level_map[j]) + 1) if (self.v[j, k].varValue or 0) > 0.5]
            if on:
                levels[r.exits[j]] = r.level_map[j][min(on) - 1]
        placement = np.array([max(range(p.n_devices), key=lambda d: self.z[b, d].varValue or 0)
                              for b in range(p.n_blocks)])
        return levels, placement


def solve_milp(p: Problem, time_limit_s: float = 60.0, solver: str = "highs",
               start: tuple[np.ndarray, np.ndarray] | None = None, dump_lp: str | None = None,
               msg: bool = False, objective: str = "latency", rel_gap: float = 0.0) -> MilpResult:
    """``rel_gap``: stop once the plan is proven within this share of the optimum (``--gap``; the solver's
    relative MIP gap), status ``within-gap`` when it stops above 1e-6. ``objective`` (OBJECTIVES): the expected
    latency; or, to explain an infeasible problem, the most right answers (minimised as their negative) or the
    busiest stage's expected busy time per request; the result's objective and bound are in those terms."""
    t0 = time.perf_counter()
    gap_rel = max(PROVEN_GAP, rel_gap)
    r = reduce(p)
    model = Model(p, r, objective=objective)
    if dump_lp:
        model.lp.writeLP(dump_lp)
    warm = model.start_values(*start) if start is not None else None
    left = max(1.0, time_limit_s - (time.perf_counter() - t0))      # building counts against the limit
    if solver == "highs":
        s = _WarmHiGHS(start=warm, deadline=t0 + time_limit_s, msg=msg, timeLimit=left, gapRel=gap_rel, threads=1,
                       **HIGHS_OPTIONS)
    else:
        if warm:
            for v in model.lp.variables():
                if v.name in warm:
                    v.setInitialValue(warm[v.name])
        # the CBC binary bundled with PuLP, through COIN_CMD (PULP_CBC_CMD is deprecated in PuLP 3.3)
        s = pulp.COIN_CMD(path=pulp_cbc_path, msg=msg, timeLimit=left, gapRel=gap_rel, warmStart=bool(warm),
                          threads=1)
    model.lp.solve(s)
    wall = time.perf_counter() - t0
    n_vars, n_cons = model.lp.numVariables(), model.lp.numConstraints()
    sol_status = pulp.LpSolution[model.lp.sol_status] if model.lp.sol_status in pulp.LpSolution else "?"
    status, bound, gap = _status(model.lp, solver)
    if status == "optimal" and rel_gap > PROVEN_GAP:
        if solver != "highs":             # CBC's "optimal" at a gap says no more than that gap
            bound, gap = bound * (1 - rel_gap), rel_gap
        if gap > PROVEN_GAP:             # PuLP still calls it "Optimal Solution Found"
            status, sol_status = WITHIN_GAP, f"{solver} stopped within --gap {rel_gap:g} (PuLP: {sol_status})"
    if status in ("infeasible", "no-solution"):
        return MilpResult(None, None, float("inf"), bound, status, sol_status, float("inf"), wall,
                          n_vars, n_cons, len(r.weight))
    levels, placement = model.read()
    obj = float(pulp.value(model.lp.objective))
    return MilpResult(levels, placement, obj, bound, status, sol_status, gap, wall, n_vars, n_cons,
                      len(r.weight))


def _status(lp: pulp.LpProblem, solver: str) -> tuple[str, float, float]:
    """('optimal' only when proven) + proven lower bound + relative gap, from the solver itself."""
    if solver == "highs":
        import highspy
        h = lp.solverModel
        ms = h.getModelStatus()
        info = h.getInfo()
        S = highspy.HighsModelStatus
        if ms == S.kInfeasible:
            return "infeasible", float("inf"), float("inf")
        has_sol = info.primal_solution_status == 2    # kSolutionStatusFeasible
        bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else float("-inf")
        if ms == S.kOptimal and has_sol:
            return "optimal", bound, float(info.mip_gap)
        if not has_sol:
            return "no-solution", bound, float("inf")
        return ("time-limit" if ms == S.kTimeLimit else f"stopped:{h.modelStatusToString(ms)}",
                bound, float(info.mip_gap))
    # CBC via the command line: PuLP reports 'Optimal' only for a proven optimum
    if lp.status == pulp.LpStatusInfeasible:
        return "infeasible", float("inf"), float("inf")
    if lp.sol_status == pulp.LpSolutionOptimal:
        obj = float(pulp.value(lp.objective))
        return "optimal", obj, 0.0
    if lp.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time-limit", float("-inf"), float("nan")
    return "no-solution", float("-inf"), float("inf")
