"""How big a proof is: Knuth's estimate of how many nodes the best-first tree expands to prove a plan optimal.

    .venv/bin/python benchmarks/solver_tree_size.py [--case example-22 resnet110-trained resnet110-synthetic]
                                                    [--probes 30000] [--seed 1] [--chain]

A solve's proven gap after 10 s moves with the host's speed and load; the size of the tree a proof needs does
not, so this is the measure to judge a new bound by (issue 6: the ResNet-110 target asks for a proof within 10 s).
Given the plan as incumbent, best first expands exactly the nodes whose bound is below it (when the plan is
optimal). Each probe walks down from the root choosing a child uniformly among those (the tree's own expansion:
narrowing, placement classes, children; twins, which only drop nodes, and the open-node cap are left out); the
sum over depths of the product of the branching factors met is an unbiased estimate of their number (Knuth,
"Estimating the efficiency of backtrack programs", 1975). Its distribution is heavy-tailed: the mean converges
slowly and mostly from below, so the median probe, the largest, and the means of the two halves are reported too.
Where the proof lies is estimated the same way: its nodes by the number of exits they decide, and the share in
open placement classes (a first stage whose end is not fixed yet), which says what a new bound must lift.

Cases: ``example-22``, the example's 22 trained exits on pi4 + Orin (proven in ~1 s), whose tree is also walked
whole with the same expansion, the true count to hold the estimate against; ``resnet110-trained``, the trained
ResNet-110 on 3 devices with the plan and multiplier of ``solver_node_relaxations.py``'s harness (placement
classes); ``resnet110-synthetic``, the synthetic ResNet-110 scale with its plan from a local search and kicks and
the width-5 wide window a 10 s solve carries (no placement classes: its solve's screen finds none worth searching).
Accuracy drop 0.01 throughout. ``--chain``: the trees over placement classes also bound each node by the chain
bound (``Tree(chain=True)``, :mod:`distree.solver.chain`; the synthetic case has no classes, so it is left out).
Prints a table and writes benchmarks/results/solver_tree_size.json (``--chain``: solver_tree_size_chain.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from distree.serde import write_json_atomic
from distree.solver.bnb import Tree
from distree.solver.bounds import bound_tables, window_prefix_bound
from distree.solver.classes import PlacementClasses
from distree.solver.heuristic import local_search
from distree.solver.problem import Constraints, build_problem
from distree.targets import topology_for
from solver_node_relaxations import ACCURACY_DROP, _synthetic, _trained   # benchmarks/ is first on sys.path
from solver_scale import EXAMPLE_DATA, RESNET110_DATA, load_case_files

RESULTS = Path(__file__).parent / "results"
CASES = ("example-22", "resnet110-trained", "resnet110-synthetic")
SYNTHETIC_WIDTH = 5         # the wide window a 10 s solve of the synthetic case carries along its tree
EXAMPLE_PROOF_S = 120.0     # the example's tree, run to its proof for the plan the estimate starts from


def _example(chain: bool) -> tuple[Tree, float]:
    chain, cal, profile, devices = load_case_files(EXAMPLE_DATA)
    p, _ = build_problem(chain, cal, profile, topology_for(devices[:2]), Constraints(accuracy_drop=ACCURACY_DROP))
    proof = Tree(p, local_search(p), best_first=True, classes=PlacementClasses(p))
    if not proof.run(EXAMPLE_PROOF_S).complete:
        raise SystemExit(f"example-22: not proven within {EXAMPLE_PROOF_S:.0f} s: no optimal plan to start from")
    return Tree(p, proof.best, best_first=True, classes=PlacementClasses(p), chain=chain), 1.0


def _resnet110_trained(chain: bool) -> tuple[Tree, float]:
    p, plan, tree, _ = _trained(RESNET110_DATA, 5.0)
    return Tree(p, plan, best_first=True, classes=PlacementClasses(p), chain=chain), tree.multiplier_factor


def _resnet110_synthetic(chain: bool) -> tuple[Tree, float]:
    p, plan, tree, _ = _synthetic(0.5)
    tables = bound_tables(p)
    prefix = window_prefix_bound(p, tables, SYNTHETIC_WIDTH)
    return Tree(p, plan, best_first=True, tables=tables, prefix=prefix), tree.multiplier_factor


def expand(tree: Tree, i: int, node) -> list:
    """The children best first would push for ``node`` (search ``i``) below the plan: narrowed first, as when popped."""
    cutoff = tree._cutoff()
    if node.bound >= cutoff:
        return []
    if node.depth < tree.p.n_exits and not node.narrowed:
        node = tree.searches[i].narrow(node)
        if node is None or node.bound >= cutoff:
            return []
    kids = tree.kids(i, node)
    return [(j, kid) for j, kid in kids or () if kid.bound < cutoff]


def whole_tree(tree: Tree, roots: list) -> int:
    """Every node below the plan, walked depth first (only where that is small enough to finish)."""
    stack, count = list(roots), 0
    while stack:
        count += 1
        stack.extend(expand(tree, *stack.pop()))
    return count


def estimate(tree: Tree, roots: list, probes: int, rng: np.random.Generator) -> dict:
    """Knuth's estimate over ``probes`` probes, and where the proof lies: the estimated nodes by the number of exits
    decided, and the share in open placement classes (a first stage whose end is not fixed yet), each the same
    unbiased weighting restricted to the nodes with that property."""
    sizes, depths = np.empty(probes), np.empty(probes, dtype=int)
    by_exits, in_open = np.zeros(tree.p.n_exits + 1), 0.0
    t0 = time.perf_counter()
    for n in range(probes):
        level, weight, total, depth = roots, 1.0, 0.0, 0
        while level:
            weight *= len(level)
            total += weight
            i, node = level[rng.integers(len(level))]
            by_exits[node.depth] += weight
            stage_class = tree.searches[i].stage_class
            in_open += weight if stage_class is not None and not stage_class.exact else 0.0
            level = expand(tree, i, node)
            depth += 1
        sizes[n], depths[n] = total, depth
    half = probes // 2
    deepest = int(np.nonzero(by_exits)[0].max())
    return {"probes": probes, "probe_s": round(time.perf_counter() - t0, 1), "mean": float(sizes.mean()),
            "first_half_mean": float(sizes[:half].mean()), "second_half_mean": float(sizes[half:].mean()),
            "median": float(np.median(sizes)), "max": float(sizes.max()), "median_depth": float(np.median(depths)),
            "max_depth": int(depths.max()),
            "by_exits_decided": [float(f"{x / probes:.3g}") for x in by_exits[:deepest + 1]],
            "open_class_share": round(in_open / sizes.sum(), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--probes", type=int, default=30_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chain", action="store_true", help="bound by the chain bound too (the trees over classes)")
    args = ap.parse_args()
    cases = [c for c in args.case if not (args.chain and c == "resnet110-synthetic")]
    out = RESULTS / ("solver_tree_size_chain.json" if args.chain else "solver_tree_size.json")
    build = {"example-22": _example, "resnet110-trained": _resnet110_trained,
             "resnet110-synthetic": _resnet110_synthetic}
    rows = []
    print(f"{'case':<20} {'plan ms':>8} {'mean':>9} {'halves':>19} {'median':>9} {'max':>9} {'depth':>5} "
          f"{'whole':>7} {'s':>5}")
    for name in cases:
        tree, factor = build[name](args.chain)
        tree.price_accuracy_at(factor)            # the multiplier the solve's tree retunes to
        roots = [(i, node) for _, _, i, node in tree.open if node.bound < tree._cutoff()]
        row = {"case": name, "plan_ms": tree.best.expected_ms, "multiplier_factor": factor,
               **estimate(tree, roots, args.probes, np.random.default_rng(args.seed))}
        if name == "example-22":
            row["whole_tree"] = whole_tree(tree, roots)
        rows.append(row)
        print(f"{name:<20} {row['plan_ms']:8.4f} {row['mean']:9.3g} {row['first_half_mean']:9.3g}/"
              f"{row['second_half_mean']:<9.3g} {row['median']:9.3g} {row['max']:9.3g} {row['median_depth']:5.0f} "
              f"{row.get('whole_tree', ''):>7} {row['probe_s']:5.0f}", flush=True)
    write_json_atomic(out, {"machine": f"{platform.machine()} ({len(os.sched_getaffinity(0))} cores)",
                            "accuracy_drop": ACCURACY_DROP, "seed": args.seed, "chain": args.chain, "rows": rows})
    for row in rows:
        counts = row["by_exits_decided"]
        print(f"{row['case']}: nodes by exits decided {', '.join(f'{d}: {c:.3g}' for d, c in enumerate(counts))}; "
              f"in open placement classes {row['open_class_share']:.1%}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
