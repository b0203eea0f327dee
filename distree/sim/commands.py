"""``distree simulate``: the plan and its baselines under load, in a discrete-event simulator."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import click

from distree.cli import NUMBER, OUTPUT_FILE
from distree.errors import DistreeError
from distree.targets.topology import topology_from_flags


def _planning_file(given: Optional[Path], plan_path: Path, name: str, flag: str) -> Path:
    """An explicit file, else the one a bundle keeps in planning/ (what `distree compile` planned with)."""
    if given is not None:
        return given
    from distree.compiler.manifest import PLANNING

    kept = plan_path / PLANNING / f"{name}.json"
    if plan_path.is_dir() and kept.is_file():
        return kept
    where = f"{plan_path} has no {PLANNING}/{name}.json" if plan_path.is_dir() else f"{plan_path} is a plan file"
    raise DistreeError(f"{flag} is needed: {where}; pass the {name} file `distree plan` used")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DistreeError(f"--rate {text!r}: give requests/s as numbers, e.g. --rate 10,50,100") from None
    if not rates or any(not 0 < r < math.inf for r in rates):
        raise DistreeError(f"--rate {text!r}: every rate must be a finite number of requests/s > 0")
    return rates


@click.command("simulate")
@click.argument("plan_path", metavar="PLAN", type=click.Path(path_type=Path))
@click.option("--chain", "chain_path", default=None, type=click.Path(path_type=Path),
              help="Chain JSON `distree plan` used (`distree inspect --json`). Default for a bundle: its "
                   "planning/ copy.")
@click.option("--calibration", "calibration_path", default=None, type=click.Path(path_type=Path),
              help="Calibration JSON `distree plan` used. Default for a bundle: its planning/ copy.")
@click.option("--profile", "profile_path", default=None, type=click.Path(path_type=Path),
              help="Profile JSON covering every device of the topology. Default for a bundle: its planning/ copy.")
@click.option("--devices", default=None, help="Catalog devices in pipeline order (what-if: other devices).")
@click.option("--topology", "topology_path", type=click.Path(path_type=Path), default=None,
              help="Topology file (what-if: other links, a device removed) instead of --devices. Default for a "
                   "bundle: the topology it was planned for.")
@click.option("--rate", "rate_text", default=None, metavar="R1,R2,...",
              help="Poisson arrival rates (req/s) to sweep. Default: 5/50/80/95% of the plan's capacity.")
@click.option("--clients", type=int, default=None, help="Closed loop instead: this many back-to-back requesters.")
@click.option("--requests", type=int, default=None,
              help="Requests per run (default: one pass over the samples; each pass replays every sample once).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of arrivals, sample order and jitter.")
@click.option("--no-jitter", is_flag=True, help="Ignore the links' jitter_ms.")
@click.option("--replan", is_flag=True,
              help="Solve again on this topology instead of evaluating the same plan (automatic when a plan "
                   "device is missing).")
@click.option("--time-limit", type=NUMBER, default=60.0, show_default=True, help="Solver time limit for re-planning.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="With --samples: the multi-exit ONNX model the calibration was made on.")
@click.option("--samples", "samples_path", type=click.Path(path_type=Path), default=None,
              help="Replay these samples (.npz, e.g. the test set) instead of the calibration's; needs --model.")
@click.option("--no-baselines", is_flag=True, help="Simulate the plan only.")
@click.option("--plot", "plot_path", type=OUTPUT_FILE, default=None,
              help="Write latency vs rate curves (PNG).")
@click.option("-o", "--output", type=OUTPUT_FILE, default=None,
              help="Write the report JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON instead of tables.")
def simulate_cmd(plan_path: Path, chain_path: Optional[Path], calibration_path: Optional[Path],
                 profile_path: Optional[Path],
                 devices: Optional[str], topology_path: Optional[Path], rate_text: Optional[str],
                 clients: Optional[int], requests: Optional[int], seed: int, no_jitter: bool, replan: bool,
                 time_limit: float, model_path: Optional[Path], samples_path: Optional[Path], no_baselines: bool,
                 plot_path: Optional[Path], output: Optional[Path], as_json: bool) -> None:
    """Simulate PLAN (a Plan JSON or a bundle directory) and baselines under load: FIFO devices and links,
    requests replaying real samples (exits decided by their own scores)."""
    from distree.exits.types import Calibration
    from distree.graph.chain import Chain
    from distree.profiler.types import Profile
    from distree.targets.spec import Topology
    from distree.sim.inputs import Inputs, held_out_samples, load_plan
    from distree.sim.report import plot_report, print_report
    from distree.sim.simulate import simulate
    from distree.workload import Load

    if rate_text and clients is not None:
        raise DistreeError("give --rate or --clients, not both")
    if clients is not None and clients < 1:
        raise DistreeError("--clients must be >= 1")
    if bool(model_path) != bool(samples_path):
        raise DistreeError("--samples and --model go together: the samples are scored by the model's exits")
    plan = load_plan(plan_path)
    chain = Chain.load(_planning_file(chain_path, plan_path, "chain", "--chain"))
    calibration = Calibration.load(_planning_file(calibration_path, plan_path, "calibration", "--calibration"))
    profile = Profile.load(_planning_file(profile_path, plan_path, "profile", "--profile"))
    topology = (topology_from_flags(devices, topology_path) if devices or topology_path else
                Topology.load(_planning_file(None, plan_path, "topology", "--devices or --topology")))
    inputs = Inputs(chain=chain, calibration=calibration, profile=profile, topology=topology, samples=calibration)
    if samples_path:
        inputs = Inputs(chain, calibration, inputs.profile, inputs.topology,
                        held_out_samples(calibration, chain, model_path, samples_path), f"{samples_path} (held out)")
    loads = ([Load(rate=r) for r in _rates(rate_text)] if rate_text
             else [Load(clients=clients)] if clients is not None else None)
    report = simulate(plan, inputs, loads=loads, requests=requests, seed=seed, jitter=not no_jitter,
                      baselines=not no_baselines, replan=replan, time_limit_s=time_limit, plan_label=str(plan_path))
    if output:
        report.save(output)
    if plot_path:
        plot_report(report, plot_path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
