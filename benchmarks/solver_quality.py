"""How far are distree's time-limited plans from the true optimum? (the question an unproven gap leaves open)

    .venv/bin/python benchmarks/solver_quality.py [--limits 10 60] [--reference-limit 900] [--only NAME ...]

On instances small enough in samples for a long HiGHS run to prove the optimum (55 blocks, 3 devices,
8 threshold levels, 300 calibration samples, 10-30 candidate exits, two seeds), each row gives the
plan distree returns within each time limit, the gap it reports (what a user sees), and how far the plan
really is above the optimum that the reference run (same solver, ``--reference-limit`` seconds) proves, or
above its proven bound when even that run does not finish (then the excess is an upper limit).
Prints a table and writes benchmarks/results/solver_quality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from distree.serde import write_json_atomic
from distree.solver.problem import Constraints
from distree.solver.solve import solve
from distree.solver.synthetic import synthetic_case

RESULTS = Path(__file__).parent / "results" / "solver_quality.json"
BLOCKS, LEVELS, DEVICES, SAMPLES = 55, 8, 3, 300
CASES = [(exits, seed) for exits in (10, 18, 30) for seed in (1, 2)]


def _run(case, limit: float) -> dict:
    t0 = time.perf_counter()
    plan = solve(case.chain, case.calibration, case.profile, case.topology,
                 Constraints(accuracy_drop=0.01, time_limit_s=limit))
    return {"expected_ms": plan.expected_latency_ms, "bound_ms": plan.bound_ms, "gap": plan.gap,
            "status": plan.status, "solver": plan.solver, "wall_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limits", type=float, nargs="+", default=[10.0, 60.0])
    ap.add_argument("--reference-limit", type=float, default=600.0)
    ap.add_argument("--only", nargs="*", default=None, help="case names to run (e.g. 18x-seed2)")
    args = ap.parse_args()
    rows = []
    for exits, seed in CASES:
        name = f"{exits}x-seed{seed}"
        if args.only and name not in args.only:
            continue
        case = synthetic_case(BLOCKS, exits, LEVELS, DEVICES, SAMPLES, seed=seed, exit_every=exits >= BLOCKS - 1)
        ref = _run(case, args.reference_limit)
        optimum_known = ref["status"] == "optimal"
        row = {"case": name, "exits": exits, "seed": seed, "reference": ref, "plans": {}}
        for limit in args.limits:
            got = _run(case, limit)
            got["excess_vs_reference_plan"] = got["expected_ms"] / ref["expected_ms"] - 1
            got["excess_vs_proven_bound"] = got["expected_ms"] / ref["bound_ms"] - 1
            row["plans"][f"{limit:g}s"] = got
        rows.append(row)
        ref_text = (f"optimum {ref['expected_ms']:.4f} ({ref['wall_s']:.0f} s)" if optimum_known else
                    f"in [{ref['bound_ms']:.4f}, {ref['expected_ms']:.4f}] (not proven in {ref['wall_s']:.0f} s)")
        plans = "  ".join(f"{k}: {v['expected_ms']:.4f} (+{v['excess_vs_proven_bound']:.2%} true, "
                          f"reported gap {v['gap']:.2%})" for k, v in row["plans"].items())
        print(f"{name:<12} {ref_text:<44} {plans}", flush=True)
    doc = {"machine": f"{platform.machine()} {platform.processor() or ''} (2 cores, shared)".strip(),
           "python": platform.python_version(), "instance": {"blocks": BLOCKS, "levels": LEVELS,
                                                               "devices": DEVICES, "samples": SAMPLES},
           "reference_limit_s": args.reference_limit, "rows": rows}
    previous = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() and args.only else []
    doc["rows"] = [r for r in previous if r["case"] not in {x["case"] for x in rows}] + rows
    write_json_atomic(RESULTS, doc)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
