"""What a relaxation is worth at the open nodes that hold the ResNet-110 bound (the research question of issue 6).

    .venv/bin/python benchmarks/solver_node_relaxations.py [--case trained|synthetic] [--resnet110 DIR]
                                                           [--tree-s 20] [--nodes 4] [--milp-s 120]

``--case trained`` (the default): the trained ResNet-110 (54 exits, 8 levels, 5,000 samples, pi4 + Orin + x86
server, accuracy drop 0.01): a plan as a solve finds it (local search, then dives from a short best-first tree over
placement classes), that tree for ``--tree-s`` seconds in this one process. ``--case synthetic``: the synthetic
ResNet-110 scale of ``solver_scale.py`` (55 blocks, 54 exits, 8 levels, 5,000 samples, 3 devices): a plan from a
local search and 30 s of kicks (where a solve finds its plan there), then a best-first tree over every placement
(no classes, no wide window) for ``--tree-s`` seconds. Then, for the tree's ``--nodes`` lowest open nodes (after
its own narrowing), the **tied relaxation** solved by HiGHS, and the best completion a coordinate descent over the
node's later exits finds (its prefix fixed; exact placement; from the plan's later levels and from all off):

- the levels ``y[k, l]`` of the exits left are shared, one level (or off) an exit, integer;
- each survivor leaves at one exit whose chosen level it passes, or at the final classifier, at that exit's
  cheapest cost in the node's placement class (``x[s, k] <= sum of y[k, l] over the levels l it passes``); it
  may pass by an exit that would take it (that is the relaxation), and the heads on its way are not charged;
- the right answers of those choices reach the need (the free choice's count), and so does the order-free
  accuracy relaxation of ``kernels.recovery_search`` on the same levels: right at the final classifier, plus
  the recoverable survivors some chosen level covers and none spoils, minus the survivors some chosen level
  surely loses ("hits"), with spoils and hits summed over an exit's levels (one level an exit).

Every completion of the node gives a solution of it at most as dear as its true latency (its survivors' true
exits are admitted, their answers counted, the order-free count holds), so its value bounds the node. Reported
per node: the tree's bound, the LP relaxation's value, the MILP's status, dual bound, best solution, HiGHS's
branch-and-bound nodes and seconds, and the completion found, against the plan. On the trained case the LP is as
weak as the tree's bounds while the integer value lies far above the plan (the nodes are dead; a bound for the
tree needs that integrality cheaply); on the synthetic one even the integer value stays below the plan while
the completions say the nodes are dead (its accuracy depends on the order of the enabled exits, which the
relaxation does not see). Prints a table and writes benchmarks/results/solver_node_relaxations[_synthetic].json.
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import time
from pathlib import Path

import highspy
import numpy as np

from distree.serde import write_json_atomic
from distree.solver.bnb import Tree
from distree.solver.classes import PlacementClasses
from distree.solver.heuristic import _penalised, iterated_local_search, local_search, place
from distree.solver.kernels import _recovery_sets
from distree.solver.problem import Constraints, Problem, build_problem
from distree.solver.synthetic import synthetic_case
from distree.targets import topology_for
from solver_scale import RESNET110_DATA, load_case_files    # benchmarks/ is first on sys.path

RESULTS = Path(__file__).parent / "results"
ACCURACY_DROP = 0.01
OPENING_S = 2.0             # trained: best-first tree before the dives
DIVES_S = 3.0               # dives from its open nodes: where a solve finds its plan on this case
KICKS_S = 30.0              # synthetic: kicks after the local search (a 60 s solve's plan, 11.264 ms)


def _members(words: np.ndarray, count: int) -> list[int]:
    """The indices set in a bit set of ``count`` bits (uint64 words)."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:count]
    return np.nonzero(bits)[0].tolist()


def best_completion(p: Problem, prefix: tuple[int, ...], rest: np.ndarray):
    """A coordinate descent over the levels of the exits after ``prefix`` (kept), each configuration placed exactly
    (:func:`~distree.solver.heuristic.place`), from ``prefix`` + ``rest``: the best Candidate met (None when none
    places)."""
    levels = np.array(list(prefix) + list(rest), dtype=int)
    best = place(p, levels)
    if best is None:
        return None
    score = _penalised(p, best.levels, best.placement)
    improved = True
    while improved:
        improved = False
        for k in range(len(prefix), p.n_exits):
            for level in range(p.n_levels[k] + 1):
                trial = levels.copy()
                trial[k] = level
                found = None if level == levels[k] else place(p, trial)
                found_score = np.inf if found is None else _penalised(p, found.levels, found.placement)
                if found_score < score - 1e-12:
                    levels, best, score, improved = trial, found, found_score, True
    return best


class _Model:
    """A HiGHS model built row by row."""

    def __init__(self) -> None:
        self.h = highspy.Highs()
        self.h.setOptionValue("output_flag", False)
        self.columns = 0

    def var(self, cost: float = 0.0, integer: bool = False) -> int:
        self.h.addVar(0.0, 1.0)
        if cost:
            self.h.changeColCost(self.columns, float(cost))
        if integer:
            self.h.changeColIntegrality(self.columns, highspy.HighsVarType.kInteger)
        self.columns += 1
        return self.columns - 1

    def row(self, lower: float, upper: float, columns: list[int], values: list[float]) -> None:
        self.h.addRow(lower, upper, len(columns), np.array(columns, dtype=np.int32),
                      np.array(values, dtype=np.float64))


def tied_relaxation(p, search, node, limits: np.ndarray) -> tuple[_Model, float]:
    """The tied relaxation of ``node`` (module docstring), levels integer (HiGHS's ``solve_relaxation`` option
    gives its LP), and the constant its objective adds (sums over samples: the node's decided cost and the heads
    every survivor surely evaluates)."""
    inf = highspy.kHighsInf
    lo, hi = limits[0].astype(np.int8), limits[1].astype(np.int8)
    depth, n_exits = node.depth, p.n_exits
    leave = search.tables.leave
    survivors = np.nonzero(np.unpackbits(node.packed)[:p.n_samples])[0]
    need = p.required_correct - node.fixed_right
    right_now, recoverable, n_lossy, covers, spoils, hits, _ = _recovery_sets(
        node.packed, depth, search.passed_by_sample, search.correct_by_sample, search.final, search.max_level,
        *search.right_exits, lo, hi)
    m = _Model()
    levels = {k: list(range(max(1, int(lo[k])), int(hi[k]) + 1)) for k in range(depth, n_exits)}
    y = {(k, lv): m.var(integer=True) for k in levels for lv in levels[k]}
    for k, options in levels.items():
        if options:
            m.row(-inf, 1, [y[k, lv] for lv in options], [1.0] * len(options))
    right = []
    for i in survivors:
        choices = []
        for k in range(depth, n_exits):
            passes = min(int(p.passed_level[i, k]), int(hi[k]))
            admitting = [y[k, lv] for lv in levels[k] if lv <= passes]
            if not admitting:
                continue
            x = m.var(leave[k])
            m.row(-inf, 0, [x] + admitting, [1.0] + [-1.0] * len(admitting))
            choices.append(x)
            if p.correct_exit[i, k]:
                right.append(x)
        final = m.var(leave[n_exits])
        choices.append(final)
        if p.correct_final[i]:
            right.append(final)
        m.row(1, 1, choices, [1.0] * len(choices))
    m.row(need, inf, right, [1.0] * len(right))
    covered = [m.var() for _ in recoverable]
    lost = [m.var() for _ in range(n_lossy)]
    covering: dict[int, list[int]] = {a: [] for a in range(len(recoverable))}
    spoiling: dict[tuple[int, int], list[int]] = {}
    hitting: dict[tuple[int, int], list[int]] = {}
    for (k, lv), v in y.items():
        for a in _members(covers[k - depth, lv], len(recoverable)):
            covering[a].append(v)
        for a in _members(spoils[k - depth, lv], len(recoverable)):
            spoiling.setdefault((a, k), []).append(v)
        for q in _members(hits[k - depth, lv], n_lossy):
            hitting.setdefault((q, k), []).append(v)
    for a, vs in covering.items():
        m.row(-inf, 0, [covered[a]] + vs, [1.0] + [-1.0] * len(vs))
    for (a, _), vs in spoiling.items():
        m.row(-inf, 1, [covered[a]] + vs, [1.0] * (1 + len(vs)))
    for (q, _), vs in hitting.items():
        m.row(0, inf, [lost[q]] + vs, [1.0] + [-1.0] * len(vs))
    m.row(need - right_now, inf, covered + lost, [1.0] * len(covered) + [-1.0] * len(lost))
    return m, node.fixed_ms + node.heads_ms * len(survivors)


def _trained(folder: Path, tree_s: float):
    """The trained ResNet-110, its plan as a solve finds it and the tree over placement classes grown from it."""
    chain, calibration, profile, devices = load_case_files(folder)
    p, _ = build_problem(chain, calibration, profile, topology_for(devices[:3]),
                         Constraints(accuracy_drop=ACCURACY_DROP))
    tree = Tree(p, local_search(p, time_limit_s=10.0), best_first=True, classes=PlacementClasses(p))
    tree.run(OPENING_S)
    tree.dive(DIVES_S)
    plan = tree.best
    return p, plan, tree, tree.run(tree_s)


def _synthetic(tree_s: float):
    """The synthetic ResNet-110 scale, a plan from a local search and kicks, and a best-first tree over every
    placement grown from it."""
    case = synthetic_case(55, 54, 8, 3, 5000, seed=1, exit_every=True)     # solver_scale.py's instance
    p, _ = build_problem(case.chain, case.calibration, case.profile, case.topology,
                         Constraints(accuracy_drop=ACCURACY_DROP))
    plan = iterated_local_search(p, local_search(p, time_limit_s=10.0), KICKS_S)
    tree = Tree(p, plan, best_first=True)
    return p, plan, tree, tree.run(tree_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("trained", "synthetic"), default="trained")
    ap.add_argument("--resnet110", type=Path, default=RESNET110_DATA, help="folder from benchmarks/resnet110_example.sh")
    ap.add_argument("--tree-s", type=float, default=20.0, help="seconds of best-first tree before the nodes are taken")
    ap.add_argument("--nodes", type=int, default=4, help="how many of the lowest open nodes")
    ap.add_argument("--milp-s", type=float, default=120.0,
                    help="HiGHS's time limit a node (checked between its phases: a root LP may overrun it)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    p, plan, tree, result = _trained(args.resnet110, args.tree_s) if args.case == "trained" else \
        _synthetic(args.tree_s)
    n, plan_ms = p.n_samples, plan.expected_ms
    print(f"plan {plan_ms:.4f} ms; tree bound {result.bound:.4f} after {result.nodes} nodes "
          f"({time.perf_counter() - t0:.0f} s), {len(tree.open)} open")
    rows = []
    header = (f"{'bound':>7} {'depth':>5} {'class':>7} {'surv':>5} {'LP':>7} {'MILP':>10} {'dual':>7} {'primal':>7} "
              f"{'nodes':>6} {'s':>6} {'found':>7}")
    print(header)
    for bound, _, i, node in heapq.nsmallest(50 * args.nodes, tree.open):
        if len(rows) == args.nodes:
            break
        search = tree.searches[i]
        narrowed = search.narrow(node)
        if narrowed is None:
            continue
        limits = search.all_levels if narrowed.limits is None else narrowed.limits
        milp, const = tied_relaxation(p, search, narrowed, limits)
        milp.h.setOptionValue("solve_relaxation", True)
        milp.h.run()
        lp_ms = (const + milp.h.getInfo().objective_function_value) / n
        milp.h.setOptionValue("solve_relaxation", False)
        milp.h.setOptionValue("time_limit", milp.h.getRunTime() + args.milp_s)   # HiGHS's clock counts the LP
        t1 = time.perf_counter()
        milp.h.run()
        info = milp.h.getInfo()
        milp_s = time.perf_counter() - t1
        found = [c for c in (best_completion(p, node.levels, plan.levels[node.depth:]),
                             best_completion(p, node.levels, np.zeros(p.n_exits - node.depth, dtype=int)))
                 if c is not None and c.feasible]
        cls = search.stage_class
        row = {"bound_ms": narrowed.bound / n, "depth": node.depth,
               "stage_class": None if cls is None else f"{p.devices[cls.device]} ends {cls.first_end}-{cls.last_end}",
               "survivors": int(np.unpackbits(node.packed)[:n].sum()), "lp_ms": lp_ms,
               "milp_status": milp.h.modelStatusToString(milp.h.getModelStatus()),
               "milp_dual_ms": (const + info.mip_dual_bound) / n,
               "milp_primal_ms": (const + info.objective_function_value) / n,
               "milp_nodes": int(info.mip_node_count), "milp_s": milp_s,
               "completion_ms": min((c.expected_ms for c in found), default=None)}
        rows.append(row)
        where = "all" if cls is None else f"{cls.first_end:3d}-{cls.last_end:<3d}"
        done = "none" if row["completion_ms"] is None else f"{row['completion_ms']:7.4f}"
        print(f"{row['bound_ms']:7.4f} {row['depth']:5d} {where:>7} {row['survivors']:5d} {lp_ms:7.4f} "
              f"{row['milp_status'][:10]:>10} {row['milp_dual_ms']:7.4f} {row['milp_primal_ms']:7.4f} "
              f"{row['milp_nodes']:6d} {milp_s:6.1f} {done:>7}", flush=True)
    out = RESULTS / ("solver_node_relaxations.json" if args.case == "trained" else
                     "solver_node_relaxations_synthetic.json")
    write_json_atomic(out, {"machine": f"{platform.machine()} ({len(os.sched_getaffinity(0))} cores)",
                            "case": "resnet110-trained-3dev" if args.case == "trained" else "resnet110-3dev",
                            "accuracy_drop": ACCURACY_DROP, "plan_ms": plan_ms, "tree_s": args.tree_s,
                            "tree_bound_ms": result.bound, "tree_nodes": result.nodes,
                            "milp_time_limit_s": args.milp_s, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
