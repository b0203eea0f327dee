"""The simulator agrees with the solver's cost model when alone, queues under load, and saturates where the
busiest resource says; `distree simulate` handles what-ifs and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from distree.cli import cli
from distree.sim.engine import build_routes, run, summarize
from distree.sim.baselines import idle_device_costs
from distree.sim.inputs import Configuration, Inputs, configuration_from_plan, problem_for
from distree.sim.simulate import simulate
from distree.solver import Constraints, solve
from distree.solver.problem import build_problem
from distree.solver.brute import all_placements
from distree.solver.costs import evaluate, outcome
from distree.solver.synthetic import synthetic_case
from distree.workload import Load

DEVICES = ("pi4", "jetson-orin-nano", "host")


@pytest.fixture(scope="module")
def case():
    return synthetic_case(n_blocks=8, n_exits=3, n_levels=4, n_devices=3, n_samples=400, seed=1,
                          device_names=DEVICES, dispatch_ms=(0.01, 0.02, 0.3))


@pytest.fixture(scope="module")
def inputs(case) -> Inputs:
    return Inputs(case.chain, case.calibration, case.profile, case.topology, case.calibration)


@pytest.fixture(scope="module")
def plan(case):
    return solve(case.chain, case.calibration, case.profile, case.topology,
                 Constraints(accuracy_drop=0.02, time_limit_s=20))


def three_stage(case) -> Configuration:
    """Every device used, every exit on at a middle threshold: transfers, heads and returns on all paths."""
    cal = case.calibration
    return Configuration("three stages", placement=("pi4",) * 2 + ("jetson-orin-nano",) * 3 + ("host",) * 3,
                         thresholds={e.name: grid[len(grid) // 2] for e, grid in zip(cal.exits, cal.thresholds)})


def test_alone_in_the_system_the_simulator_is_the_cost_model(case, inputs, plan):
    inst = problem_for(inputs, three_stage(case))
    ev = evaluate(inst.problem, inst.levels, inst.placement)
    routes = build_routes(inst.problem, case.topology, inst.levels, inst.placement)
    assert len(set(inst.placement.tolist())) == 3 and inst.levels.all()
    trace = run(routes, Load(rate=1e-6), n_requests=inst.problem.n_samples, jitter=False)
    assert trace.wait_ms.max() == 0.0
    assert trace.latency_ms.mean() == pytest.approx(ev.expected_ms, rel=1e-9)
    # a hop's software (its call and gRPC round trip) delays the request but does not occupy the link: the
    # links are as busy as without any dispatch cost
    free = synthetic_case(n_blocks=8, n_exits=3, n_levels=4, n_devices=3, n_samples=400, seed=1, device_names=DEVICES)
    bare = problem_for(Inputs(free.chain, free.calibration, free.profile, free.topology, free.calibration),
                       three_stage(free))
    bare_routes = build_routes(bare.problem, free.topology, bare.levels, bare.placement)
    assert routes.mean_service_ms[3:] == pytest.approx(bare_routes.mean_service_ms[3:], rel=1e-9)
    assert routes.base_ms.mean() > bare_routes.base_ms.mean()
    assert routes.mean_service_ms[:3] == pytest.approx(ev.busy_ms, rel=1e-9)
    o = outcome(inst.problem, inst.levels)
    assert np.bincount(routes.leave, minlength=4) / len(routes.leave) == pytest.approx([*o.exit_rate, o.final_rate])
    assert routes.correct.sum() == ev.correct

    report = simulate(plan, inputs, loads=[Load(rate=1e-6)], jitter=False)
    for c in report.configurations:          # the plan and every baseline
        assert c.points[0].mean_ms == pytest.approx(c.predicted_ms, rel=1e-9), c.name
    assert report.configurations[0].predicted_ms == pytest.approx(plan.expected_latency_ms, rel=1e-9)
    assert report.configurations[0].accuracy == pytest.approx(plan.accuracy)


def test_each_idle_device_gets_the_plans_exits_placed_through_it(case, inputs, plan):
    """What using a device the plan leaves idle costs: the plan's own exits and thresholds at the cheapest
    placement that runs a stage there (every placement in pipeline order enumerated), in the simulation and in
    the numbers `distree compile` prints; the plan, proven optimal, is never slower."""
    inst = problem_for(inputs, configuration_from_plan(plan, inputs))
    p = inst.problem
    idle = [d for d in p.devices if d not in {s.device for s in plan.stages}]
    assert plan.status == "optimal" and len(idle) == 2, "the case no longer leaves two devices idle"
    report = simulate(plan, inputs, loads=[Load(rate=1e-6)], jitter=False)
    rows = {c.name: c for c in report.configurations}
    costs = idle_device_costs(inputs, plan)
    assert set(costs) == set(idle)
    for device in idle:
        d = p.devices.index(device)
        evaluations = [evaluate(p, inst.levels, pl) for pl in all_placements(p.n_blocks, p.n_devices, False)
                       if (pl == d).any()]
        best = min(ev.expected_ms for ev in evaluations if not set(ev.violations) - {"accuracy"})
        row = rows[f"the plan's exits, through {device}"]
        assert row.predicted_ms == pytest.approx(best, rel=1e-9) and costs[device] == pytest.approx(best, rel=1e-9)
        assert best >= plan.expected_latency_ms - 1e-9
        assert f"{device}[" in row.description and row.exit_rates == rows["plan"].exit_rates


def test_queueing_grows_with_the_rate(case, inputs):
    inst = problem_for(inputs, three_stage(case))
    routes = build_routes(inst.problem, case.topology, inst.levels, inst.placement)
    capacity = 1000.0 / routes.mean_service_ms.max()
    runs = [summarize(routes, run(routes, Load(rate=f * capacity), 2000, seed=3, jitter=False))
            for f in (0.2, 0.5, 0.8)]
    means = [s.mean_ms for s in runs]
    waits = [s.mean_wait_ms for s in runs]
    assert means[0] < means[1] < means[2] and waits[0] < waits[1] < waits[2]
    assert waits[0] > 0


def test_throughput_saturates_at_the_busiest_resource(case, inputs):
    inst = problem_for(inputs, three_stage(case))
    routes = build_routes(inst.problem, case.topology, inst.levels, inst.placement)
    service = routes.mean_service_ms
    capacity = 1000.0 / service.max()
    bottleneck = routes.resource_names[int(service.argmax())]
    n = 4 * inst.problem.n_samples          # whole passes: the mean service is exact
    for load in (Load(rate=3 * capacity), Load(clients=16)):
        s = summarize(routes, run(routes, load, n, seed=5, jitter=True))
        assert s.throughput_rps == pytest.approx(capacity, rel=0.03), load
        assert s.utilisation[bottleneck] == pytest.approx(1.0, abs=0.03)
    light = summarize(routes, run(routes, Load(rate=0.3 * capacity), n, seed=5))
    assert light.throughput_rps == pytest.approx(0.3 * capacity, rel=0.1)


def test_a_stage_s_request_handling_occupies_its_device_without_delaying_the_request():
    """With the profile's serve:receive / serve:forward figures a device is busy that much longer per request it
    receives and hands on (what a served stage spends in gRPC and Python): latency alone unchanged, busy time the
    cost model's, and the capacity it leaves is what saturation shows."""
    kwargs = dict(n_blocks=8, n_exits=3, n_levels=4, n_devices=3, n_samples=400, seed=1, device_names=DEVICES,
                  dispatch_ms=(0.01, 0.02, 0.3))
    cases = [synthetic_case(**kwargs), synthetic_case(**kwargs, handling_ms=(0.2, 0.05))]
    instances = [problem_for(Inputs(c.chain, c.calibration, c.profile, c.topology, c.calibration), three_stage(c))
                 for c in cases]
    plain, handled = [build_routes(i.problem, c.topology, i.levels, i.placement) for i, c in zip(instances, cases)]
    assert handled.base_ms == pytest.approx(plain.base_ms, rel=1e-12)
    p, inst = instances[1].problem, instances[1]
    ev = evaluate(p, inst.levels, inst.placement)
    assert handled.mean_service_ms[:3] == pytest.approx(ev.busy_ms, rel=1e-9)
    o = outcome(p, inst.levels)
    first_blocks = [0, 2, 5]                                    # pi4 0..1, jetson 2..4, host 5..7
    extra = [p.handling[d, 0] * o.reach_block[b] + p.handling[d, 1] * (o.reach_block[b + n] if d < 2 else 0.0)
             for d, (b, n) in enumerate(zip(first_blocks, (2, 3, 3)))]
    assert handled.mean_service_ms[:3] - plain.mean_service_ms[:3] == pytest.approx(extra, rel=1e-9)
    assert min(extra) > 0
    capacity = 1000.0 / handled.mean_service_ms.max()
    s = summarize(handled, run(handled, Load(clients=16), 4 * p.n_samples, seed=5))
    assert s.throughput_rps == pytest.approx(capacity, rel=0.03)
    assert capacity < 1000.0 / plain.mean_service_ms.max()
    alone = run(handled, Load(rate=1e-6), p.n_samples, jitter=False)
    assert alone.wait_ms.max() == 0.0 and alone.latency_ms.mean() == pytest.approx(ev.expected_ms, rel=1e-9)
    # a source that runs no stage relays every request: busy with receiving and handing each on, nothing else
    relayed = Configuration("relay", placement=("jetson-orin-nano",) * 5 + ("host",) * 3,
                            thresholds=three_stage(cases[1]).thresholds)
    inputs = Inputs(cases[1].chain, cases[1].calibration, cases[1].profile, cases[1].topology, cases[1].calibration)
    inst = problem_for(inputs, relayed)
    routes = build_routes(inst.problem, cases[1].topology, inst.levels, inst.placement)
    assert cases[1].topology.source_device == "pi4" and routes.mean_service_ms[0] == pytest.approx(0.2 + 0.05)
    ev = evaluate(inst.problem, inst.levels, inst.placement)
    assert routes.base_ms.mean() == pytest.approx(ev.expected_ms, rel=1e-9)
    # a report says when the profile lacks these figures (devices then charged their compute only)
    for c, lacking in zip(cases, (True, False)):
        plan = solve(c.chain, c.calibration, c.profile, c.topology, Constraints(accuracy_drop=0.02, time_limit_s=20))
        report = simulate(plan, Inputs(c.chain, c.calibration, c.profile, c.topology, c.calibration),
                          loads=[Load(rate=1.0)], requests=50, baselines=False)
        assert any("serve:receive / serve:forward" in note for note in report.notes) == lacking


def test_a_hop_costs_its_round_trip_after_the_time_it_sat_idle():
    """With the profile's rpc:idle entries a hop's software follows how long it sat idle (gRPC's threads asleep):
    a lone request pays the longest gap's round trip whatever the plan was charged for, the cost model's
    sporadic figure; requests one after another find a hop idle only for the rest of the previous request, and
    pay what the measured curve says for that gap."""
    kwargs = dict(n_blocks=8, n_exits=3, n_levels=4, n_devices=3, n_samples=400, seed=1, device_names=DEVICES,
                  dispatch_ms=(0.01, 0.02, 0.3))
    c = synthetic_case(**kwargs, idle_rpc_ms=(0.4, 0.6, 0.9, 1.1, 1.2))
    inputs = Inputs(c.chain, c.calibration, c.profile, c.topology, c.calibration)
    inst = problem_for(inputs, three_stage(c))
    sporadic, levels, placement = inst.problem, inst.levels, inst.placement
    assert list(sporadic.hop_gaps_ms) == [0, 1, 2, 4, 8, 32]
    steady, _ = build_problem(c.chain, dataclasses.replace(c.calibration, thresholds=tuple(
        (t,) for t in three_stage(c).thresholds.values())), c.profile, c.topology, Constraints(traffic="steady"))
    # the round trip of a hop between devices a and b: the mean of theirs (x 1 + index), plus a call there
    assert sporadic.hop_ms[0, 1] == pytest.approx((1.2 * 1 + 1.2 * 2) / 2 + 0.01)
    assert steady.hop_ms[0, 1] == pytest.approx((0.3 * 1 + 0.3 * 2) / 2 + 0.01)
    alone, back_to_back = (evaluate(p, levels, placement).expected_ms for p in (sporadic, steady))
    reach = outcome(sporadic, levels).reach_block
    idle_extra = 0.9 * ((1 + 2) / 2 * reach[2] + (2 + 3) / 2 * reach[5])     # pi4 -> orin at 2, orin -> host at 5
    assert alone - back_to_back == pytest.approx(idle_extra, rel=1e-9)
    for p in (sporadic, steady):        # a lone request finds every hop idle, whatever the route was charged
        routes = build_routes(p, c.topology, levels, placement)
        trace = run(routes, Load(rate=1e-6), p.n_samples, jitter=False)
        assert trace.latency_ms.mean() == pytest.approx(alone, rel=1e-9)
    # one client: the first request finds the hops idle; each later one the gap since its hop's last use
    routes = build_routes(sporadic, c.topology, levels, placement)
    one = run(routes, Load(clients=1), 200, jitter=False, seed=3)
    first = one.samples[0]
    assert one.latency_ms[0] == pytest.approx(routes.base_ms[first], rel=1e-12)
    assert (one.latency_ms <= routes.base_ms[one.samples] + 1e-9).all()
    hops = {s.hop: s for steps in routes.steps for s in steps if s.hop >= 0}
    assert set(hops) == {0 * 3 + 1, 1 * 3 + 2}
    last_done = {h: -np.inf for h in hops}
    for r in range(len(one.samples)):       # replay: each hop's delay from its own idle gap, by hand
        clock, paid = one.arrive_ms[r], 0.0
        for s in routes.steps[one.samples[r]]:
            clock += s.service_ms
            if s.hop >= 0:
                a, b = divmod(s.hop, 3)
                idle = clock - s.service_ms - last_done[s.hop]
                curve = sporadic.hop_by_gap_ms[a, b]
                extra = float(np.interp(idle, sporadic.hop_gaps_ms, curve)) - sporadic.hop_ms[a, b]
                paid += extra
                last_done[s.hop] = clock + s.delay_ms + extra
                clock += extra
            clock += s.delay_ms
        assert one.latency_ms[r] == pytest.approx(routes.base_ms[one.samples[r]] + paid, rel=1e-9)
        assert paid < 0 or r == 0 or not any(s.hop >= 0 for s in routes.steps[one.samples[r]])
    # a report says when the profile lacks these figures
    old = synthetic_case(**kwargs)
    for case_, lacking in ((old, True), (c, False)):
        plan = solve(case_.chain, case_.calibration, case_.profile, case_.topology,
                     Constraints(accuracy_drop=0.02, time_limit_s=20))
        report = simulate(plan, Inputs(case_.chain, case_.calibration, case_.profile, case_.topology,
                                       case_.calibration), loads=[Load(rate=1.0)], requests=50, baselines=False)
        assert any("rpc:idle" in note for note in report.notes) == lacking


def test_jitter_is_seeded_and_mean_preserving(case, inputs):
    links = tuple(dataclasses.replace(ln, jitter_ms=0.5 * ln.latency_ms) for ln in case.topology.links)
    topology = dataclasses.replace(case.topology, links=links)
    inst = problem_for(dataclasses.replace(inputs, topology=topology), three_stage(case))
    routes = build_routes(inst.problem, topology, inst.levels, inst.placement)
    assert all(s.jitter_ms > 0 for steps in routes.steps for s in steps if s.resource >= 3)
    a = run(routes, Load(rate=1e-6), 4000, seed=7)
    b = run(routes, Load(rate=1e-6), 4000, seed=7)
    assert np.array_equal(a.latency_ms, b.latency_ms)
    assert not np.array_equal(a.latency_ms, routes.base_ms[a.samples])
    assert a.latency_ms.mean() == pytest.approx(routes.base_ms.mean(), rel=0.01)


# --- the command ----------------------------------------------------------------------------------------

def _files(case, tmp: Path, plan) -> dict[str, Path]:
    paths = {k: tmp / f"{k}.json" for k in ("chain", "calibration", "profile", "plan")}
    case.chain.save(paths["chain"])
    case.calibration.save(paths["calibration"])
    case.profile.save(paths["profile"])
    plan.save(paths["plan"])
    links = [{"src": ln.src, "dst": ln.dst, "bandwidth_mbps": ln.bandwidth_mbps, "latency_ms": ln.latency_ms}
             for ln in case.topology.links]
    paths["topology"] = tmp / "topology.yaml"
    paths["topology"].write_text(yaml.safe_dump({"devices": list(DEVICES), "links": links}))
    return paths


def _simulate(paths: dict[str, Path], *extra: str, topology: Path | None = None):
    args = ["simulate", str(paths["plan"]), "--chain", str(paths["chain"]), "--calibration",
            str(paths["calibration"]), "--profile", str(paths["profile"]),
            "--topology", str(topology or paths["topology"]), *extra]
    return CliRunner().invoke(cli, args)


def test_cli_json_plot_and_what_ifs(case, plan, tmp_path):
    paths = _files(case, tmp_path, plan)
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    r = _simulate(paths, "--rate", "5,50", "--no-jitter", "-o", str(out), "--plot", str(png), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["mode"] == "same plan"
    names = [c["name"] for c in doc["configurations"]]
    assert names[0] == "plan" and any("PORTEND" in n for n in names) and any("source only" in n for n in names)
    assert [p["rate_rps"] for p in doc["configurations"][0]["points"]] == [5.0, 50.0]
    assert json.loads(out.read_text())["kind"] == "SimReport"
    assert png.read_bytes()[:4] == b"\x89PNG"

    # what-if: every link 10x slower -> the same plan, costing more
    slow = yaml.safe_load(paths["topology"].read_text())
    for ln in slow["links"]:
        ln["bandwidth_mbps"] /= 10
        ln["latency_ms"] *= 10
    slow_path = tmp_path / "slow.yaml"
    slow_path.write_text(yaml.safe_dump(slow))
    r = _simulate(paths, "--rate", "5", "--no-baselines", "--json", topology=slow_path)
    assert r.exit_code == 0, r.output
    slow_doc = json.loads(r.output)
    assert slow_doc["mode"] == "same plan"
    used = {s.device for s in plan.stages}
    if used != {case.topology.source_device}:
        assert slow_doc["configurations"][0]["predicted_ms"] > doc["configurations"][0]["predicted_ms"]

    # what-if: a plan device removed -> re-planned on what is left, and the report says so
    gone = next(iter(used))
    rest = [d for d in DEVICES if d != gone]
    small = {"devices": rest, "links": [ln for ln in slow["links"] if gone not in (ln["src"], ln["dst"])]}
    small_path = tmp_path / "small.yaml"
    small_path.write_text(yaml.safe_dump(small))
    r = _simulate(paths, "--rate", "5", "--no-baselines", "--json", topology=small_path)
    assert r.exit_code == 0, r.output
    re_doc = json.loads(r.output)
    assert re_doc["mode"].startswith("re-planned") and gone in re_doc["mode"]
    assert re_doc["mode"].endswith("seeded with the plan"), re_doc["mode"]
    assert gone not in re_doc["configurations"][0]["description"]


@pytest.mark.parametrize("breakage, message", [
    ("other-model", "plan is for model"),
    ("missing-file", "no such file"),
    ("not-gzip", "not a gzip file"),
    ("bad-rate", "--rate"),
])
def test_cli_bad_input_is_one_line_exit_2(case, plan, tmp_path, breakage, message):
    paths = _files(case, tmp_path, plan)
    extra = ["--rate", "-3"] if breakage == "bad-rate" else []
    if breakage == "other-model":
        doc = json.loads(paths["plan"].read_text())
        doc["model_sha256"] = "0" * 64
        paths["plan"].write_text(json.dumps(doc))
    if breakage == "missing-file":
        paths["profile"] = tmp_path / "nope.json"
    if breakage == "not-gzip":               # a name ending in .gz holding plain JSON
        paths["profile"] = paths["profile"].rename(tmp_path / "profile.json.gz")
    r = _simulate(paths, *extra)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


def test_cli_reads_the_plan_from_a_bundle_and_replays_held_out_samples(tmp_path):
    import compiler_fixtures as cf
    from distree.compiler.bundle import build_bundle
    from distree.profiler import merge_profiles, profile_model

    tiny = cf.tiny_model(tmp_path)
    plan, topology = cf.two_stage_plan(tiny)
    profile = merge_profiles([profile_model(tiny.model, tiny.chain, tiny.calibration.exits, d, mode="estimate")
                              for d in topology.devices])
    bundle = build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, tmp_path / "bundle",
                          backend="ort", profile=profile)
    files = {"chain": tiny.chain, "calibration": tiny.calibration, "profile": profile, "plan": plan}
    for name, value in files.items():
        value.save(tmp_path / f"{name}.json")
    held_out = cf.dataset(60, seed=9)
    np.savez(tmp_path / "held_out.npz", x=held_out.x, y=held_out.y)

    def run_json(plan_arg: Path, *extra: str) -> dict:
        r = CliRunner().invoke(cli, ["simulate", str(plan_arg), "--chain", str(tmp_path / "chain.json"),
                                     "--calibration", str(tmp_path / "calibration.json"), "--profile",
                                     str(tmp_path / "profile.json"), "--devices", "host,pi4", "--rate", "20",
                                     "--no-jitter", "--no-baselines", "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.output[r.output.index("{"):])

    from_file, from_bundle = run_json(tmp_path / "plan.json"), run_json(bundle)
    assert from_bundle["configurations"][0]["description"] == from_file["configurations"][0]["description"]
    assert from_bundle["configurations"][0]["predicted_ms"] == from_file["configurations"][0]["predicted_ms"]
    # the bundle alone: its planning/ copies of chain, calibration, profile and topology
    alone = CliRunner().invoke(cli, ["simulate", str(bundle), "--rate", "20", "--no-jitter", "--no-baselines",
                                     "--json"])
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.output[alone.output.index("{"):])["configurations"][0]["predicted_ms"] == \
        from_file["configurations"][0]["predicted_ms"]
    (bundle / "planning" / "profile.json").unlink()
    missing = CliRunner().invoke(cli, ["simulate", str(bundle), "--rate", "20"])
    assert missing.exit_code == 2 and "--profile is needed" in missing.output and "planning/profile.json" in \
        missing.output, missing.output
    assert from_file["n_samples"] == tiny.calibration.num_samples

    replay = run_json(bundle, "--samples", str(tmp_path / "held_out.npz"), "--model", str(tiny.path))
    config = replay["configurations"][0]
    assert replay["n_samples"] == 60 and "held out" in replay["samples"]
    assert sum(config["exit_rates"].values()) == pytest.approx(1.0)
    assert config["points"][0]["requests"] == 60
