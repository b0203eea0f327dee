"""What a bound must reach at the open nodes that hold the trained ResNet-110's bound (the research question of
issue 6): each node's exact latency-accuracy frontier, searched by the tree itself.

    .venv/bin/python benchmarks/solver_node_frontier.py [--resnet110 DIR] [--tree-s 20] [--nodes 4] [--run-s 20]
                                                        [--deficits=-50,-25,-10,0,10,25,50,100,200,400]

The trained ResNet-110 (pi4 + Orin + x86 server, accuracy drop 0.01), its plan and a best-first tree over
placement classes grown for ``--tree-s`` seconds, as ``solver_node_relaxations.py`` makes them. For each of the
tree's ``--nodes`` lowest open nodes, a fresh tree on the same problem with the need moved by d right answers (each
of ``--deficits``: d > 0 under the need, d < 0 over it; and "all": no accuracy bound), every placement outside the
node's class made dear, is walked down to the node's levels and class and searched from that node alone for
``--run-s`` seconds: its proven bound is a lower bound on V(need - d), the least latency of a completion of the node
in its class with that many right answers (exact where the search completes; "short": none has them). Also, per
node:

- how many nodes the search from it alone takes to close it at the real need with the plan as the cutoff (the
  node's own share of the proof);
- the tree's bound at the node at each need ("start"), and with no accuracy bound the lowest bound over the exact
  placement classes (each end of the first stage) inside its class: how much of the gap between the tree's bound
  and V(no accuracy bound) is the relaxed stage end, how much the relaxed shared levels;
- the smallest multiplier lambda (ms of summed latency per right answer, as the tree's) at which the exact
  Lagrangian, min over the node's completions of latency - lambda (right - need), is *proven* to reach the plan
  from these lower bounds (:func:`proven_lagrangian`), with the class's root multiplier for scale.

Prints a table and writes benchmarks/results/solver_node_frontier.json (its numbers, the thirty-seventh session's
reading of them: docs/solver.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import os
import platform
import time
from pathlib import Path

import numpy as np

from distree.serde import write_json_atomic
from distree.solver.bnb import Tree
from distree.solver.classes import PlacementClasses, StageClass
from distree.solver.problem import Problem
from solver_node_relaxations import RESNET110_DATA, _trained     # benchmarks/ is first on sys.path

RESULTS = Path(__file__).parent / "results"
LAMBDAS = np.arange(0.5, 200.0, 0.5)     # ms of summed latency per right answer, searched for the smallest proven
OUTSIDE_MS = 1e6                         # a block's cost where a placement leaves the node's class


def _contains(outer: StageClass, inner: StageClass) -> bool:
    return outer.device == inner.device and outer.first_end <= inner.first_end and outer.last_end >= inner.last_end


def within_class(p: Problem, stage_class: StageClass) -> Problem:
    """``p`` with every placement outside ``stage_class`` made dear (OUTSIDE_MS a block its first stage should not
    run, or another device should), and every placement inside it priced as before: the tree prices a full
    configuration at its best placement anywhere, and a node's frontier is about its own class."""
    block_ms = p.block_ms.copy()
    block_ms[np.arange(p.n_devices) != stage_class.device, :stage_class.first_end + 1] = OUTSIDE_MS
    block_ms[stage_class.device, stage_class.last_end + 1:] = OUTSIDE_MS
    return dataclasses.replace(p, block_ms=block_ms)


def in_class_ms(p: Problem, proven_ms: float) -> float:
    """A restricted tree's proven bound (ms) as a bound on the node's completions in its class: inf where it says
    every completion costs what one leaving the class does (none in the class has the right answers)."""
    return np.inf if proven_ms >= OUTSIDE_MS / p.n_samples else proven_ms


def restricted_tree(p: Problem, levels: tuple[int, ...], stage_class: StageClass):
    """A fresh tree over placement classes of ``p`` within ``stage_class`` (:func:`within_class`) holding, as its
    only open node, the node with ``levels`` in ``stage_class`` (walked down from the roots the way the tree
    expands: narrowed, then its children or the split of its class), with that node's search index; None when the
    tree finds a node on the way short of right answers or rules out a level on the way. Searched, it ends at the
    best completion of the node in its class."""
    p = within_class(p, stage_class)
    tree = Tree(p, None, best_first=True, classes=PlacementClasses(p))
    found = [(i, node) for _, _, i, node in tree.open]
    while True:
        on_path = [(i, node) for i, node in found if tuple(node.levels) == levels[:len(node.levels)]
                   and _contains(tree.searches[i].stage_class, stage_class)]
        if not on_path:                     # a level on the way ruled out: it cannot get the right answers
            return None
        for i, node in on_path:
            if tuple(node.levels) == levels and tree.searches[i].stage_class == stage_class:
                tree.open = [(node.bound, 0, i, node)]
                return tree, i
        i, node = on_path[0]
        if not node.narrowed:
            node = tree.searches[i].narrow(node)
            if node is None:
                return None
        found = tree.kids(i, node) or []


def lowest_exact_class(p: Problem, levels: tuple[int, ...], stage_class: StageClass) -> float:
    """The lowest bound (ms) of the node over the exact classes inside its own: the first stage ending at each
    block its class allows."""
    walked = restricted_tree(p, levels, stage_class)
    if walked is None:
        return float("inf")
    tree, _ = walked
    node = tree.open[0][3]
    best = np.inf
    for end in range(stage_class.first_end, stage_class.last_end + 1):
        search = tree.searches[tree._search_of(StageClass(stage_class.device, end, end))]
        for kid in search.rebound(node, None):
            narrowed = search.narrow(kid)
            if narrowed is not None:
                best = min(best, max(kid.bound, narrowed.bound))
    return best / p.n_samples


def proven_lagrangian(plan_ms: float, frontier: dict[int, float], need: int, n: int) -> float | None:
    """The smallest lambda of LAMBDAS at which ``frontier`` proves min over completions of latency - lambda x
    (right - need) / n >= ``plan_ms``. ``frontier[d]``: a lower bound on V(need - d), the least latency with at
    least need - d right (d < 0: a surplus over the need; d = need: no accuracy bound). V is nonincreasing in d, so
    a completion whose d lies between two measured deficits costs at least the larger deficit's value and pays at
    least lambda times the smaller; one with more right than the largest surplus measured, at least lambda times
    need - n."""
    ds = sorted(frontier)
    for lam in LAMBDAS:
        lowest = min([frontier[ds[0]] + lam * (need - n) / n] +
                     [frontier[ds[a + 1]] + lam * ds[a] / n for a in range(len(ds) - 1)])
        if lowest >= plan_ms - 1e-9:
            return float(lam)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resnet110", type=Path, default=RESNET110_DATA, help="folder from benchmarks/resnet110_example.sh")
    ap.add_argument("--tree-s", type=float, default=20.0, help="seconds of best-first tree before the nodes are taken")
    ap.add_argument("--nodes", type=int, default=4, help="how many of the lowest open nodes")
    ap.add_argument("--run-s", type=float, default=20.0, help="seconds of search from a node, for each need")
    ap.add_argument("--deficits", default="-50,-25,-10,0,10,25,50,100,200,400",
                    help="right answers under the need (negative: over it), comma-separated")
    args = ap.parse_args()
    deficits = sorted({int(d) for d in args.deficits.split(",")})
    t0 = time.perf_counter()
    p, plan, tree, result = _trained(args.resnet110, args.tree_s)
    n, need, plan_ms = p.n_samples, p.required_correct, plan.expected_ms
    print(f"plan {plan_ms:.4f} ms; tree bound {result.bound:.4f} after {result.nodes} nodes "
          f"({time.perf_counter() - t0:.0f} s)")
    rows = []
    for bound, _, i, node in heapq.nsmallest(args.nodes, tree.open):
        c = tree.searches[i].stage_class
        levels = tuple(node.levels)
        closing, _ = restricted_tree(p, levels, c)
        closing._lower_ceiling(plan_ms * n)
        closed = closing.run(args.run_s)
        row = {"bound_ms": bound / n, "depth": node.depth, "levels": list(levels),
               "stage_class": f"{p.devices[c.device]} ends {c.first_end}-{c.last_end}",
               "root_multiplier": float(tree.searches[i].tables.lam),
               "closed": closed.complete, "closing_nodes": closed.nodes, "frontier": []}
        print(f"node {bound / n:.4f}, depth {node.depth}, {row['stage_class']}, levels {levels}: closed by the plan "
              f"{'in' if closed.complete else 'NOT in'} {closed.nodes} nodes", flush=True)
        print(f"  {'deficit':>7} {'start':>7} {'V >=':>7} {'exact':>5} {'nodes':>7}")
        lower = {}
        for d in sorted({d for d in deficits if 0 <= need - d <= n} | {need}):
            walked = restricted_tree(dataclasses.replace(p, required_correct=need - d), levels, c)
            if walked is None:                   # short of right answers on the way: no completion has them
                lower[d] = np.inf
                point = {"deficit": d, "short": True}
                print(f"  {d:>7} {'short':>7}", flush=True)
            else:
                sub, _ = walked
                start = sub.open[0][0] / n
                r = sub.run(args.run_s)
                lower[d] = in_class_ms(p, r.bound)
                point = {"deficit": d, "start_ms": start, "lower_ms": lower[d], "exact": r.complete, "nodes": r.nodes}
                name = "all" if d == need else str(d)
                print(f"  {name:>7} {start:7.4f} {lower[d]:7.4f} {str(r.complete):>5} {r.nodes:7d}", flush=True)
            row["frontier"].append(point)
        row["no_accuracy_exact_class_ms"] = lowest_exact_class(dataclasses.replace(p, required_correct=0), levels, c)
        row["proven_lambda"] = proven_lagrangian(plan_ms, lower, need, n)
        print(f"  no accuracy bound: lowest exact class {row['no_accuracy_exact_class_ms']:.4f}; exact Lagrangian "
              f">= plan from lambda {row['proven_lambda']} (the class root's multiplier {row['root_multiplier']:.2f})",
              flush=True)
        rows.append(row)
    out = RESULTS / "solver_node_frontier.json"
    write_json_atomic(out, {"machine": f"{platform.machine()} ({len(os.sched_getaffinity(0))} cores)",
                            "case": "resnet110-trained-3dev", "plan_ms": plan_ms, "need": need, "n_samples": n,
                            "tree_s": args.tree_s, "tree_bound_ms": result.bound, "tree_nodes": result.nodes,
                            "run_s": args.run_s, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
