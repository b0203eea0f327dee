"""Solver scale benchmark: solve time, status and proven gap, and the latency gain from early exits.

    .venv/bin/python benchmarks/solver_scale.py [--example DIR] [--resnet110 DIR] [--only NAME ...] [--jobs N ...]

Cases (issue 6): the example model's 22 trained exits on 2 and 3 devices, and on 2 with 300 s; a ResNet-110-scale
chain (55 blocks, 54 candidate exits, 8 threshold levels, 5,000 calibration samples, 3 devices), synthetic, and
the same target on a trained ResNet-110's 54 exits; 200 blocks on 8 devices; and a few mid-size cases that map
where the MILP still proves optimality. The trained cases' chain, calibration and profile are committed
(benchmarks/data/: written by ``benchmarks/solver_example.sh DIR`` and ``benchmarks/resnet110_example.sh DIR``,
whose outputs differ from one CPU to another: PyTorch's kernels do); --example / --resnet110 take other folders
of such files (``name.json`` or ``name.json.gz``).

For each: wall time, solver status ("optimal" only when proven: by the branch and bound finishing, by
HiGHS, or by a bound meeting the plan within 1e-9), proven gap (against the best of the branch-and-bound,
MILP and relaxed bounds), expected latency, the best plan without exits, their ratio, and
(<= 3 devices) PORTEND's search space (one global threshold level, exits only at stage ends) solved by
enumeration. ``--jobs``: the branch and bound's cores (default: every usable core, as ``distree plan``); several
values run each case once per value, one after the other, so that their ratio is measured in one run; a row is
keyed by its case and jobs. Prints a table and writes benchmarks/results/solver_scale.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from distree.exits.types import Calibration
from distree.graph.chain import Chain
from distree.profiler.types import Profile
from distree.serde import write_json_atomic
from distree.solver.brute import all_placements
from distree.solver.heuristic import local_search, portend_plan
from distree.solver.parallel import usable_cores
from distree.solver.problem import Constraints, build_problem
from distree.solver.solve import solve
from distree.solver.synthetic import synthetic_case
from distree.targets import topology_for
from distree.targets.spec import Topology

RESULTS = Path(__file__).parent / "results" / "solver_scale.json"
EXAMPLE_DATA = Path(__file__).parent / "data" / "example-22-exits"      # solver_example.sh's files, committed
RESNET110_DATA = Path(__file__).parent / "data" / "resnet110-trained"   # resnet110_example.sh's files, committed

# name, (blocks, exits, levels, devices, samples), time limit (s), target
SYNTHETIC = [
    ("resnet110-3dev", (55, 54, 8, 3, 5000), 10, "proven optimal within 10 s"),
    ("resnet110-3dev-60s", (55, 54, 8, 3, 5000), 60, "(same, 60 s)"),
    ("chain200-8dev", (200, 40, 4, 8, 2000), 60, "proven gap <= 1% within 60 s"),
    ("mid-55b-10x-4l-1000s", (55, 10, 4, 3, 1000), 60, "exactness map"),
    ("mid-30b-8x-4l-500s", (30, 8, 4, 3, 500), 60, "exactness map"),
    ("mid-55b-54x-8l-300s", (55, 54, 8, 3, 300), 60, "exactness map"),
]


def load_case_files(folder: Path):
    """A real-scores case's chain, calibration, profile and its devices in profiled order (also solver_accuracy's):
    ``name.json``, or ``name.json.gz`` where that is absent."""
    def named(name: str) -> Path:
        plain = folder / f"{name}.json"
        return plain if plain.exists() else folder / f"{name}.json.gz"

    chain = Chain.load(named("chain"))
    cal = Calibration.load(named("calibration"))
    profile = Profile.load(named("profile"))
    return chain, cal, profile, list(dict.fromkeys(m.device for m in profile.entries))


def _example_cases(example: Path):
    chain, cal, profile, devices = load_case_files(example)
    for k in (2, 3):
        if len(devices) >= k:
            yield f"example-{k}dev", "real files", chain, cal, profile, topology_for(devices[:k]), 60
    # given the time, the tree proves the 2-device case (237 s in the nineteenth session)
    yield ("example-2dev-300s", "real files, 300 s", chain, cal, profile, topology_for(devices[:2]), 300)


def _resnet110_cases(folder: Path):
    """The ResNet-110 target on trained exits: 54 exits, 8 levels, 5,000 calibration samples, 3 devices, as the
    synthetic case, but with a real network's scores and 113 blocks (each residual block's ReLU is a block of its
    own) where the synthetic chain has 55."""
    chain, cal, profile, devices = load_case_files(folder)
    what = (f"trained ResNet-110, {len(chain.blocks)} blocks, {len(cal.exits)} exits, "
            f"{len(cal.thresholds[0])} levels, {cal.num_samples} samples, 3 devices")
    for name, limit in (("resnet110-trained-3dev", 10), ("resnet110-trained-3dev-60s", 60)):
        yield name, what, chain, cal, profile, topology_for(devices[:3]), limit


def _synthetic_cases():
    for name, size, limit, target in SYNTHETIC:
        case = synthetic_case(*size, seed=1, exit_every=(size[1] >= size[0] - 1))
        yield (name, f"synthetic {size[0]} blocks, {size[1]} exits, {size[2]} levels, {size[3]} devices, "
               f"{size[4]} samples; target: {target}", case.chain, case.calibration, case.profile, case.topology,
               limit)


def run_case(name: str, what: str, chain: Chain, cal: Calibration, profile: Profile, topo: Topology,
             limit: float, drop: float, jobs: int) -> dict:
    c = Constraints(accuracy_drop=drop, time_limit_s=limit, jobs=jobs)
    t0 = time.perf_counter()
    plan = solve(chain, cal, profile, topo, c)
    wall = time.perf_counter() - t0
    row = {"case": name, "what": what, "time_limit_s": limit, "jobs": jobs, "wall_s": round(wall, 2),
           "status": plan.status,
           "sol_status": plan.sol_status, "gap": plan.gap, "expected_ms": plan.expected_latency_ms,
           "bound_ms": plan.bound_ms, "no_exit_ms": plan.no_exit_latency_ms,
           "ratio_vs_no_exit": plan.expected_latency_ms / plan.no_exit_latency_ms,
           "accuracy": plan.accuracy, "full_accuracy": plan.full_model_accuracy,
           "exits_enabled": sum(len(s.exits) for s in plan.stages), "stages": len(plan.stages),
           "milp": plan.model_stats}
    problem, _ = build_problem(chain, cal, profile, topo, c)
    t0 = time.perf_counter()
    heur = local_search(problem)
    row["heuristic_ms"] = heur.expected_ms if heur else None
    row["heuristic_s"] = round(time.perf_counter() - t0, 2)
    if problem.n_devices <= 3 and problem.n_blocks <= 60:
        t0 = time.perf_counter()
        pt = portend_plan(problem, all_placements(problem.n_blocks, problem.n_devices, False))
        row["portend_ms"] = pt.expected_ms if pt else None
        row["portend_s"] = round(time.perf_counter() - t0, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", type=Path, default=EXAMPLE_DATA,
                    help="folder with the example's chain/calibration/profile JSON (benchmarks/solver_example.sh)")
    ap.add_argument("--resnet110", type=Path, default=RESNET110_DATA,
                    help="folder with a trained ResNet-110's files (benchmarks/resnet110_example.sh)")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run")
    ap.add_argument("--accuracy-drop", type=float, default=0.01)
    ap.add_argument("--jobs", type=int, nargs="+", default=[usable_cores()], help="cores for the branch and bound")
    args = ap.parse_args()
    rows = []
    for case in [*_example_cases(args.example), *_resnet110_cases(args.resnet110), *_synthetic_cases()]:
        if args.only and case[0] not in args.only:
            continue
        for jobs in args.jobs:
            row = run_case(*case, drop=args.accuracy_drop, jobs=jobs)
            rows.append(row)
            print(f"{row['case']:<22} {row['status']:<10} gap {row['gap']:8.2%}  wall {row['wall_s']:7.2f} s  "
                  f"E[lat] {row['expected_ms']:8.3f} ms  bound {row['bound_ms']:8.3f}  no-exit {row['no_exit_ms']:8.3f}"
                  f"  ratio {row['ratio_vs_no_exit']:.3f}  portend {row.get('portend_ms') or float('nan'):8.3f}"
                  f"  exits {row['exits_enabled']:3d}  stages {row['stages']}  jobs {row['jobs']}", flush=True)
    doc = {"machine": f"{platform.machine()} {platform.processor() or ''} (2 cores, shared, loaded)".strip(),
           "python": platform.python_version(), "accuracy_drop": args.accuracy_drop, "rows": rows}
    previous = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() and args.only else []
    keep = [r for r in previous if (r["case"], r.get("jobs")) not in {(x["case"], x["jobs"]) for x in rows}]
    doc["rows"] = keep + rows
    write_json_atomic(RESULTS, doc)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
