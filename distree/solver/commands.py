"""``distree plan``: choose exits, thresholds and cut points; print and write the Plan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.console import Console

from distree.cli import DEADLINE_OPTION, MIN_THROUGHPUT_OPTION, NUMBER, OUTPUT_FILE, TRAFFIC_OPTION
from distree.errors import DistreeError
from distree.exits.types import Calibration
from distree.graph.chain import Chain
from distree.lazy import require_installed
from distree.profiler import Profile, cost_sources
from distree.serde import write_json_atomic
from distree.solver.problem import Constraints
from distree.sim.baselines import idle_device_costs, idle_device_lines
from distree.sim.inputs import Inputs, load_plan
from distree.solver.report import plot_sweep, print_plan, print_sweep, sweep_rows
from distree.targets.topology import topology_from_flags

require_installed("numba", "pulp", "highspy")     # the solver's, imported when `plan` runs


def _status():
    """A live line on stderr while the solver works (a terminal only: nothing in logs)."""
    return Console(stderr=True).status("plan ...")


def _parse_sweep(spec: str) -> list[float]:
    key, _, values = spec.partition("=")
    if key.strip() != "accuracy-drop" or not values:
        raise DistreeError(f"--sweep {spec!r}: expected accuracy-drop=V1,V2,... (e.g. accuracy-drop=0,0.01)")
    try:
        return [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise DistreeError(f"--sweep {spec!r}: values must be numbers") from None


@click.command("plan")
@click.option("--chain", "chain_path", required=True, type=click.Path(path_type=Path),
              help="Chain JSON from `distree inspect --json`.")
@click.option("--calibration", "calibration_path", required=True, type=click.Path(path_type=Path),
              help="Calibration JSON from `distree calibrate`.")
@click.option("--profile", "profile_path", required=True, type=click.Path(path_type=Path),
              help="Profile JSON from `distree profile` (all devices).")
@click.option("--devices", default=None, help="Catalog devices in pipeline order, e.g. pi4,jetson-orin-nano.")
@click.option("--topology", "topology_path", type=click.Path(path_type=Path), default=None,
              help="Topology file (devices, links, source) instead of --devices.")
@click.option("--accuracy-drop", type=NUMBER, default=0.01, show_default=True,
              help="Allowed accuracy loss against the full model, on calibration data.")
@click.option("--confidence", type=NUMBER, default=None,
              help="Promise the accuracy at this one-sided confidence (Clopper-Pearson), e.g. 0.95. Even "
                   "the no-exit plan may then miss a very small --accuracy-drop; the error names the smallest "
                   "drop that works.")
@DEADLINE_OPTION
@MIN_THROUGHPUT_OPTION
@click.option("--free-order", is_flag=True, help="Let the solver choose the order of the devices too.")
@TRAFFIC_OPTION
@click.option("--time-limit", type=NUMBER, default=60.0, show_default=True,
              help="Solver time limit (s). Ctrl-C ends the search sooner and keeps its best plan (status "
                   "interrupted, with its proven gap); a second Ctrl-C aborts.")
@click.option("--gap", type=NUMBER, default=0.0, show_default=True,
              help="Stop once the plan is proven within this share of the optimum (0.02: 2%; 0: prove it optimal).")
@click.option("--jobs", type=int, default=None,
              help="Cores for the branch and bound's best-first search (default: every core this process may use).")
@click.option("--solver", type=click.Choice(["highs", "cbc"]), default="highs", show_default=True)
@click.option("--dump-lp", type=OUTPUT_FILE, default=None,
              help="Write the MILP (LP format) here.")
@click.option("--sweep", default=None, metavar="accuracy-drop=V1,V2,...",
              help="Solve for several accuracy drops; print the latency-accuracy frontier.")
@click.option("--plot", "plot_path", type=OUTPUT_FILE, default=None,
              help="With --sweep: write the frontier as PNG.")
@click.option("--start", "start_path", type=click.Path(path_type=Path), default=None,
              help="An earlier plan of this model (Plan JSON from `distree plan -o`, or a bundle directory) to start "
                   "from: its exits and thresholds seed the search, on its own placement where its devices are all "
                   "here and on the best one for them (a re-plan after re-profiling, for other devices or another "
                   "accuracy drop starts near it and ends no worse where it is feasible). A seed, not a constraint.")
@click.option("-o", "--output", type=OUTPUT_FILE, default=None,
              help="Write the Plan JSON (with --sweep: the frontier JSON).")
def plan_cmd(chain_path: Path, calibration_path: Path, profile_path: Path, devices: Optional[str],
             topology_path: Optional[Path], accuracy_drop: float, confidence: Optional[float],
             deadline_ms: Optional[float], min_throughput: Optional[float], free_order: bool, traffic: str,
             time_limit: float,
             gap: float, jobs: Optional[int], solver: str, dump_lp: Optional[Path], sweep: Optional[str],
             plot_path: Optional[Path], start_path: Optional[Path], output: Optional[Path]) -> None:
    """Choose exits, thresholds and cut points of minimal expected latency (a MILP, proven optimal or
    reported with its gap)."""
    from distree.solver.solve import solve, sweep_accuracy_drop

    chain = Chain.load(chain_path)
    calibration = Calibration.load(calibration_path)
    profile = Profile.load(profile_path)
    topology = topology_from_flags(devices, topology_path)
    start = load_plan(start_path) if start_path else None
    constraints = Constraints(accuracy_drop=accuracy_drop, confidence=confidence, deadline_ms=deadline_ms,
                              min_throughput=min_throughput, free_order=free_order, traffic=traffic,
                              time_limit_s=time_limit,
                              gap=gap, jobs=jobs, solver=solver, dump_lp=str(dump_lp) if dump_lp else None)
    if plot_path and not sweep:
        raise DistreeError("--plot needs --sweep accuracy-drop=...")
    if sweep:
        with _status() as status:
            points = sweep_accuracy_drop(chain, calibration, profile, topology, constraints, _parse_sweep(sweep),
                                         progress=status.update, start=start)
        print_sweep(points)
        if plot_path:
            plot_sweep(points, plot_path)
        if output:
            write_json_atomic(output, {"schema_version": 1, "kind": "Frontier", "points": sweep_rows(points),
                                       "plans": [pt.plan.to_dict() if pt.plan else None for pt in points]})
        return
    with _status() as status:
        plan = solve(chain, calibration, profile, topology, constraints, progress=status.update, start=start)
    print_plan(plan)
    costs = cost_sources(profile)
    click.echo("costs: " + "; ".join(f"{d.name} {costs[d.name]}" for d in topology.devices if d.name in costs))
    idle = idle_device_costs(Inputs(chain, calibration, profile, topology, samples=calibration), plan)
    for line in idle_device_lines(idle, plan.expected_latency_ms, "`distree simulate`"):
        click.echo(line)
    if output:
        plan.save(output)
