"""How the proven gap depends on the accuracy bound (the question behind the ResNet-110-scale gap).

    .venv/bin/python benchmarks/solver_accuracy.py [--example DIR] [--resnet110 DIR] [--drops 0.1 0.05 ...] [--jobs N]

The same instance solved under several --accuracy-drop values: the ResNet-110-scale chain of
``solver_scale.py`` (55 blocks, 54 exits, 8 levels, 5,000 samples, 3 devices) with 10 s and 60 s, and with
the example's 22 trained exits on 3 devices with 60 s, and a trained ResNet-110's 54 exits on 3 devices with 60 s
(the files committed in benchmarks/data/, or --example / --resnet110 folders: see solver_scale.py).
Without an accuracy bound every one of these is proven optimal in under a second; what stays open is the
accuracy constraint, whose Lagrangian relaxation lets a sample past its exact window pick a later exit where it
is right. ``--jobs``: the branch and bound's cores (default: every usable core, as ``distree plan``). Prints a table
and writes benchmarks/results/solver_accuracy.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from distree.serde import write_json_atomic
from distree.solver.parallel import usable_cores
from distree.solver.problem import Constraints
from distree.solver.solve import solve
from distree.solver.synthetic import synthetic_case
from distree.targets import topology_for
from solver_scale import EXAMPLE_DATA, RESNET110_DATA, load_case_files    # benchmarks/ is first on sys.path

RESULTS = Path(__file__).parent / "results" / "solver_accuracy.json"
DROPS = (0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.0)
LONG_DROPS = (0.1, 0.05, 0.02, 0.01, 0.0)     # the 60 s runs: fewer, they take a minute each


def _real_case(folder: Path) -> tuple:
    """Chain, calibration, profile and the first 3 profiled devices' topology of a folder of real files."""
    chain, calibration, profile, devices = load_case_files(folder)
    return chain, calibration, profile, topology_for(devices[:3])


def _cases(example: Path, resnet110: Path):
    case = synthetic_case(55, 54, 8, 3, 5000, seed=1, exit_every=True)
    inputs = (case.chain, case.calibration, case.profile, case.topology)
    yield "resnet110-3dev", inputs, 10, DROPS
    yield "resnet110-3dev", inputs, 60, LONG_DROPS
    yield "example-3dev", _real_case(example), 60, LONG_DROPS
    yield "resnet110-trained-3dev", _real_case(resnet110), 60, LONG_DROPS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", type=Path, default=EXAMPLE_DATA, help="folder from benchmarks/solver_example.sh")
    ap.add_argument("--resnet110", type=Path, default=RESNET110_DATA, help="folder from benchmarks/resnet110_example.sh")
    ap.add_argument("--drops", type=float, nargs="*", default=None, help="accuracy drops (default: per case)")
    ap.add_argument("--jobs", type=int, default=usable_cores(), help="cores for the branch and bound")
    args = ap.parse_args()
    rows = []
    for name, inputs, limit, drops in _cases(args.example, args.resnet110):
        for drop in args.drops or drops:
            t0 = time.perf_counter()
            plan = solve(*inputs, Constraints(accuracy_drop=drop, time_limit_s=limit, jobs=args.jobs))
            row = {"case": name, "time_limit_s": limit, "accuracy_drop": drop, "status": plan.status,
                   "gap": plan.gap, "expected_ms": plan.expected_latency_ms, "bound_ms": plan.bound_ms,
                   "no_exit_ms": plan.no_exit_latency_ms, "accuracy": plan.accuracy,
                   "full_accuracy": plan.full_model_accuracy, "wall_s": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(f"{name:<22} {limit:4.0f} s  drop {drop:6.3f}  {row['status']:<9} gap {row['gap']:7.2%}  "
                  f"E[lat] {row['expected_ms']:8.3f} ms  bound {row['bound_ms']:8.3f}  "
                  f"wall {row['wall_s']:6.1f} s", flush=True)
    write_json_atomic(RESULTS, {"machine": f"{platform.machine()} (2 cores, shared)", "jobs": args.jobs, "rows": rows})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
