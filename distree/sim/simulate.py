"""``simulate``: the plan (or a re-plan on a what-if topology) and its baselines, each under the same loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from distree.errors import DistreeError
from distree.profiler.items import HANDLING_ITEMS
from distree.serde import JsonRecord
from distree.sim.baselines import NO_PLACEMENT_THROUGH, baseline_configurations, through_idle_devices
from distree.sim.engine import Routes, build_routes, run, summarize
from distree.sim.inputs import (Configuration, Inputs, Instance, configuration_from_plan, in_pipeline_order,
                                missing_devices, plan_constraints, problem_for, selection_problem)
from distree.solver.costs import Evaluation, evaluate
from distree.solver.plan import Plan
from distree.workload import Load

DEFAULT_LOAD_FRACTIONS = (0.05, 0.5, 0.8, 0.95)   # of the plan's saturation rate, when no --rate is given
FINAL = "final"


@dataclass(frozen=True)
class LoadPoint(JsonRecord):
    label: str
    rate_rps: Optional[float]       # Poisson arrival rate (None: closed loop)
    clients: Optional[int]          # closed-loop requesters (None: open loop)
    requests: int
    offered_load: Optional[float]   # rate / capacity (open loop only); >= 1: the queue grows without bound
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_wait_ms: float             # queueing share of the mean
    throughput_rps: float
    utilisation: dict[str, float]   # per device (and per used link: "a->b")


@dataclass(frozen=True)
class ConfigResult(JsonRecord):
    name: str
    description: str
    note: str
    predicted_ms: float             # costs.evaluate over the replayed samples (the solver's cost model)
    alone_mean_ms: float            # mean latency of a request alone in the system (the simulator's routes)
    worst_ms: float                 # no exit taken
    saturation_rps: float           # 1000 / the busiest resource's expected time per request
    bottleneck: str
    busy_ms: dict[str, float]       # expected time each device (and used link) is held per request
    accuracy: float                 # of the answers returned, on the replayed samples
    exit_rates: dict[str, float]    # per exit name, and "final"
    violations: tuple[str, ...]     # memory / placement (accuracy is reported, not judged, on replayed data)
    points: tuple[LoadPoint, ...]


@dataclass(frozen=True)
class SimReport(JsonRecord):
    plan: str
    mode: str                       # "same plan" or "re-planned: <why>"
    plan_predicted_ms: float        # what the plan file says (under the topology it was solved for)
    devices: tuple[str, ...]
    source: str
    samples: str
    n_samples: int
    jitter: bool
    seed: int
    configurations: tuple[ConfigResult, ...]
    notes: tuple[str, ...] = ()


def choose_plan(plan: Plan, inputs: Inputs, replan: bool, time_limit_s: float) -> tuple[Configuration, str]:
    """The plan itself on this topology, or a fresh solve when asked or when a plan device is gone."""
    missing = missing_devices(plan, inputs.topology)
    if not replan and not missing:
        return configuration_from_plan(plan, inputs), "same plan"
    from distree.solver.solve import solve
    from distree.solver.start import check_start

    why = (f"plan device(s) {', '.join(dict.fromkeys(missing))} not in the topology" if missing else "--replan")
    constraints = plan_constraints(plan, inputs.calibration.num_samples, time_limit_s,
                                   free_order=not missing and not in_pipeline_order(plan, inputs.topology))
    try:                            # the plan seeds the solve where its model and exits are these
        check_start(plan, inputs.chain, inputs.calibration)
        start, seeded = plan, "seeded with the plan"
    except DistreeError:
        start, seeded = None, "not seeded: the plan's model or exits are not these inputs'"
    fresh = solve(inputs.chain, inputs.calibration, inputs.profile, inputs.topology, constraints, start=start)
    return configuration_from_plan(fresh, inputs, name="plan (re-planned)"), f"re-planned: {why}; {seeded}"


def simulate(plan: Plan, inputs: Inputs, loads: Optional[Sequence[Load]] = None, requests: Optional[int] = None,
             seed: int = 0, jitter: bool = True, baselines: bool = True, replan: bool = False,
             time_limit_s: float = 60.0, plan_label: str = "") -> SimReport:
    """Simulate the plan and its baselines; without ``loads``, Poisson rates at fractions of the plan's capacity."""
    n = inputs.samples.num_samples if requests is None else requests
    if n < 1:
        raise DistreeError("--requests must be >= 1")
    config, mode = choose_plan(plan, inputs, replan, time_limit_s)
    configs, notes = [config], []
    if baselines:
        idle = through_idle_devices(inputs, config)
        through = [found[0] for found in idle.values() if found is not None]
        notes = [f"the plan's exits through {device}: {NO_PLACEMENT_THROUGH}" for device, found in idle.items()
                 if found is None]
        problem, index = selection_problem(inputs, plan, free_order=not in_pipeline_order(plan, inputs.topology))
        extra, more = baseline_configurations(problem, index, inputs.calibration)
        configs += through + extra
        notes += more
    if plan.source and plan.source != inputs.topology.source_device:
        notes = [*notes, f"the plan was solved with requests arriving at {plan.source}; here they arrive at "
                         f"{inputs.topology.source_device} (the topology's source)"]
    prepared = [_prepare(c, inputs) for c in configs]
    if prepared[0].instance.problem.handling_ms is None:
        notes = [*notes, f"the profile lacks {' / '.join(HANDLING_ITEMS)} entries for some device (profiled before "
                         "distree measured a stage's request handling): devices are charged their compute only, so "
                         "capacities are upper bounds; profile again for them"]
    if prepared[0].instance.problem.hop_by_gap_ms is None and len(inputs.topology.devices) > 1:
        notes = [*notes, "the profile lacks rpc:idle entries for some device (profiled before distree measured a hop "
                         "after idle time): every hop costs its back-to-back round trip whatever the gaps between "
                         "requests, which at low rates under-charges each hop; profile again for them"]
    if loads is None:
        capacity = prepared[0].saturation_rps
        loads = [Load(rate=f * capacity) for f in DEFAULT_LOAD_FRACTIONS]
    results = tuple(_simulate_one(c, prep, loads, n, seed, jitter) for c, prep in zip(configs, prepared))
    topo = inputs.topology
    return SimReport(plan=plan_label, mode=mode, plan_predicted_ms=plan.expected_latency_ms,
                     devices=tuple(d.name for d in topo.devices), source=topo.source_device,
                     samples=inputs.samples_label, n_samples=inputs.samples.num_samples, jitter=jitter, seed=seed,
                     configurations=results, notes=tuple(notes))


@dataclass(frozen=True, eq=False)
class _Prepared:
    instance: Instance
    routes: Routes
    evaluation: Evaluation
    saturation_rps: float
    bottleneck: str
    busy_ms: dict[str, float]


def _prepare(config: Configuration, inputs: Inputs) -> _Prepared:
    inst = problem_for(inputs, config)
    routes = build_routes(inst.problem, inputs.topology, inst.levels, inst.placement)
    service = routes.mean_service_ms
    top = int(np.argmax(service))
    busy = {name: float(s) for i, (name, s) in enumerate(zip(routes.resource_names, service))
            if i < routes.n_devices or s > 0}
    return _Prepared(inst, routes, evaluate(inst.problem, inst.levels, inst.placement),
                     1000.0 / service[top] if service[top] > 0 else float("inf"), routes.resource_names[top], busy)


def _simulate_one(config: Configuration, prep: _Prepared, loads: Sequence[Load], n: int, seed: int,
                  jitter: bool) -> ConfigResult:
    routes, ev = prep.routes, prep.evaluation
    points = []
    for load in loads:
        s = summarize(routes, run(routes, load, n, seed=seed, jitter=jitter))
        offered = load.rate / prep.saturation_rps if load.rate is not None else None
        points.append(LoadPoint(label=load.label, rate_rps=load.rate, clients=load.clients, requests=n,
                                offered_load=offered, mean_ms=s.mean_ms, p50_ms=s.p50_ms,
                                p90_ms=s.p90_ms, p99_ms=s.p99_ms, mean_wait_ms=s.mean_wait_ms,
                                throughput_rps=s.throughput_rps, utilisation=s.utilisation))
    names = [*prep.instance.exit_names, FINAL]
    shares = np.bincount(routes.leave, minlength=len(names)) / len(routes.leave)
    exit_rates = {name: float(x) for name, x in zip(names, shares) if name in config.thresholds or name == FINAL}
    return ConfigResult(
        name=config.name, description=config.describe(), note=config.note, predicted_ms=ev.expected_ms,
        alone_mean_ms=float(routes.base_ms.mean()), worst_ms=ev.worst_ms, saturation_rps=prep.saturation_rps,
        bottleneck=prep.bottleneck, busy_ms=prep.busy_ms, accuracy=float(routes.correct.mean()),
        exit_rates=exit_rates, violations=tuple(v for v in ev.violations if v in ("memory", "placement")),
        points=tuple(points))
