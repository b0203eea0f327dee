"""`distree retune`: a bundle's thresholds chosen again on new data, its placement and compiled exits kept.

Exactness on random small instances against an exhaustive search of every table on the fixed placement, then the
real thing on the tiny two-stage bundle: the new data scored by the bundle's own segments, what `run` then measures
equal to what retune reports, only the three small files changed, and user errors in one line."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import compiler_fixtures as cf
from distree.cli import cli
from distree.compiler.bundle import build_bundle
from distree.compiler.manifest import read_manifest, read_thresholds
from distree.compiler.retune import CHANGED, heads_with_blocks
from distree.exits.scores import never_threshold
from distree.runtime.executor import run_bundle
from distree.solver.brute import all_placements
from distree.solver.costs import evaluate
from distree.solver.problem import Constraints, build_problem
from distree.solver.solve import solve_problem
from distree.solver.synthetic import synthetic_case

REPO = Path(__file__).resolve().parents[1]


def _fixed_placement_optimum(p, placement) -> float:
    """Every table of the compiled exits (each at a level, the last passing nobody) on ``placement``: the cheapest
    one that answers enough right."""
    best = np.inf
    for levels in itertools.product(*[range(1, n + 1) for n in p.n_levels]):
        ev = evaluate(p, np.array(levels), placement)
        if ev.feasible:
            best = min(best, ev.expected_ms)
    return best


def test_the_retune_solve_is_the_best_table_on_the_bundles_placement_with_every_head_paid():
    """Heads folded into their blocks and the placement forced: the real solver's optimum equals the exhaustive
    one over tables where every compiled head runs (an exit "off" still pays its head), on random instances."""
    checked = {"feasible": 0, "infeasible": 0, "off": 0, "multi_stage": 0}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        case = synthetic_case(n_blocks=int(rng.integers(3, 9)), n_exits=int(rng.integers(1, 4)),
                              n_levels=int(rng.integers(1, 4)), n_devices=int(rng.integers(1, 4)), n_samples=80,
                              seed=seed, memory_slack=50.0, dispatch_ms=(0.05, 0.1, 0.3))
        never = never_threshold(case.calibration.score_kind)
        calibration = dataclasses.replace(case.calibration, thresholds=tuple(
            (*grid, never) for grid in case.calibration.thresholds))
        c = Constraints(accuracy_drop=float(rng.choice([0.0, 0.02, 0.05])), time_limit_s=30)
        p, index = build_problem(case.chain, calibration, case.profile, case.topology, c)
        placements = all_placements(p.n_blocks, p.n_devices, False)
        placement = placements[rng.integers(len(placements))]
        reference = _fixed_placement_optimum(p, placement)
        try:
            plan = solve_problem(heads_with_blocks(p, placement), index, case.chain, calibration, c)
        except Exception as exc:            # infeasible: no table answers enough right
            assert not np.isfinite(reference), f"seed {seed}: {exc}"
            assert str(exc).startswith("infeasible plan: accuracy"), str(exc)
            checked["infeasible"] += 1
            continue
        assert plan.status == "optimal"
        assert plan.expected_latency_ms == pytest.approx(reference, rel=1e-9, abs=1e-12), f"seed {seed}"
        placed = [case.topology.devices[int(d)].name for d in placement]
        assert [s.device for s in plan.stages for _ in range(s.first_block, s.last_block + 1)] == placed
        checked["feasible"] += 1
        checked["off"] += sum(len(s.exits) for s in plan.stages) < p.n_exits
        checked["multi_stage"] += len(plan.stages) > 1
    assert checked["feasible"] >= 25 and checked["off"] >= 5 and checked["multi_stage"] >= 8, checked


@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory):
    """The tiny two-stage bundle (host: both exits; pi4: the rest) with an estimated profile in planning/, as
    retune needs, built for ONNX Runtime (nothing to compile), and new data unlike its calibration's."""
    from distree.profiler import merge_profiles, profile_model

    plan, topology = cf.two_stage_plan(tiny)
    profile = merge_profiles([profile_model(tiny.model, tiny.chain, tiny.calibration.exits, d, mode="estimate")
                              for d in topology.devices])
    root = tmp_path_factory.mktemp("retune")
    bundle = build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, root / "bundle", backend="ort",
                          profile=profile)
    new = cf.dataset(300, seed=5)
    x = (new.x * 0.4 + 0.8).astype(np.float32)              # brighter, flatter inputs: the exits' confidence moves
    np.savez(root / "new.npz", x=x, y=new.y)
    return bundle, root / "new.npz", dataclasses.replace(new, x=x)


def _retune(*args: str):
    return CliRunner().invoke(cli, ["retune", *args])


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_retuned_bundle_runs_as_retune_reported_and_only_its_table_changes(compiled, tmp_path):
    bundle, data_path, data = compiled
    out = tmp_path / "retuned"
    other = cf.dataset(150, seed=6)
    test = dataclasses.replace(other, x=(other.x * 0.4 + 0.8).astype(np.float32))     # drifted as the data was
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    r = _retune(str(bundle), "--data", str(data_path), "-o", str(out), "--accuracy-drop", "0.02", "--json", "-",
                "--test", str(tmp_path / "test.npz"))
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    before, after, plan = report["before"], report["after"], report["plan"]
    assert report["samples"] == 300 and plan["n_samples"] == 300
    held = report["held_out"]           # both tables on --test, as `run` measures them there
    assert held["samples"] == 150 and held["accuracy_drop"] == 0.02
    for path, table in ((bundle, held["current"]), (out, held["retuned"])):
        run = run_bundle(path, test)
        assert {"accuracy": run.accuracy, **run.exit_rates} == pytest.approx(table, abs=1e-12), path

    # what `run` measures on the new data, old bundle and new, is what retune reported for each table
    for path, table in ((bundle, before), (out, after)):
        run = run_bundle(path, data)
        assert run.exit_rates == pytest.approx(table["exit_rates"], abs=1e-12), path
        assert run.accuracy == pytest.approx(table["accuracy"], abs=1e-12), path
    assert after["meets_bound"] and plan["accuracy"] == pytest.approx(after["accuracy"])
    assert plan["expected_latency_ms"] == pytest.approx(after["expected_ms"])
    if before["meets_bound"]:
        assert after["expected_ms"] <= before["expected_ms"] + 1e-12        # the old table was a candidate
    assert plan["status"] == "optimal" and plan["accuracy_drop"] == 0.02

    # the same placement and every compiled exit in the table (an exit off: a threshold no score reaches)
    old, new = read_manifest(bundle), read_manifest(out)
    assert [(s.device, s.first_block, s.last_block) for s in new.plan.stages] == \
        [(s.device, s.first_block, s.last_block) for s in old.plan.stages]
    assert [e.name for e in read_thresholds(out).exits] == [e.name for e in read_thresholds(bundle).exits]
    assert {e.name: e.threshold for e in read_thresholds(out).exits} == pytest.approx(after["thresholds"])
    # the compiled files byte for byte; the three small ones changed and hashed in the new manifest
    assert set(new.files) == set(old.files)
    for name in old.files:
        if name in CHANGED:
            assert new.files[name] == _sha(out / name)
        else:
            assert _sha(out / name) == _sha(bundle / name) == new.files[name], name
    assert (out / "manifest.json").read_bytes() != (bundle / "manifest.json").read_bytes()
    assert sum(n.startswith("thresholds retuned") for n in new.notes) == 1
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0

    # retuning the retuned bundle on the same data in place changes nothing but the note's time
    again = _retune(str(out), "--data", str(data_path), "-o", str(out), "--json", "-")
    assert again.exit_code == 0, again.output
    second = json.loads(again.output[again.output.index("{"):])
    assert second["before"]["thresholds"] == pytest.approx(after["thresholds"])
    assert second["after"]["expected_ms"] == pytest.approx(after["expected_ms"])
    assert second["plan"]["accuracy_drop"] == 0.02              # the retuned bundle's drop is its default now
    assert sum(n.startswith("thresholds retuned") for n in read_manifest(out).notes) == 1


def test_exits_that_would_answer_wrong_are_turned_off_and_the_bundle_still_answers(compiled, tiny, tmp_path):
    """Labels the full model gets all right: at drop 0 an exit may not answer anyone it gets wrong, so retune turns
    exits off (thresholds above any score; their heads still run) and `run` answers those samples at the end."""
    bundle, data = compiled[0], tiny.data           # the calibration data: each exit lets about half leave
    labels, _ = cf.ort_reference(tiny, data.x, {"exit_1": 2.0, "exit_2": 2.0})      # the final classifier's
    np.savez(tmp_path / "final.npz", x=data.x, y=labels)
    out = tmp_path / "off"
    r = _retune(str(bundle), "--data", str(tmp_path / "final.npz"), "-o", str(out), "--accuracy-drop", "0")
    assert r.exit_code == 0, r.output
    assert "off: " in r.output and "still runs" in r.output, r.output
    run = run_bundle(out, dataclasses.replace(data, y=labels))
    assert run.accuracy == 1.0
    off = [e.name for e in read_thresholds(out).exits if e.threshold >= never_threshold("max_softmax")]
    assert off and all(run.exit_rates[name] == 0.0 for name in off)
    planned = {c.name: c for stage in read_manifest(out).plan.stages for c in stage.exits}
    assert set(planned) == {"exit_1", "exit_2"} and all(planned[name].exit_rate == 0.0 for name in off)


def test_a_bundle_whose_devices_run_out_of_pipeline_order_is_retuned_on_that_order(tiny, tmp_path):
    """`compile --free-order` may put the topology's second device first: retune keeps that order, not the list's."""
    from distree.profiler import merge_profiles, profile_model

    plan, topology = cf.two_stage_plan(tiny, devices=("pi4", "host"))           # pi4 first ...
    topology = dataclasses.replace(topology, devices=topology.devices[::-1], source="pi4")     # ... listed second
    profile = merge_profiles([profile_model(tiny.model, tiny.chain, tiny.calibration.exits, d, mode="estimate")
                              for d in topology.devices])
    bundle = build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, tmp_path / "bundle",
                          backend="ort", profile=profile)
    np.savez(tmp_path / "data.npz", x=tiny.data.x, y=tiny.data.y)
    r = _retune(str(bundle), "--data", str(tmp_path / "data.npz"), "-o", str(tmp_path / "out"), "--accuracy-drop",
                "0.05")
    assert r.exit_code == 0, r.output
    assert [s.device for s in read_manifest(tmp_path / "out").plan.stages] == ["pi4", "host"]


@pytest.mark.parametrize("case, message", [
    ("shape", "expects (1, 16, 16)"),
    ("labels", "--data"),
    ("test labels", "--test"),
    ("infeasible", "infeasible plan: accuracy"),
    ("profile lost", "planning/profile.json: listed in the manifest but missing"),
    ("built without a profile", "planning lacks profile.json: retune re-plans from what"),
    ("not a bundle", "no such bundle directory"),
])
def test_retune_refuses_bad_input_in_one_line_and_writes_nothing(compiled, tiny_bundle, tmp_path, case, message):
    bundle, data_path, data = compiled
    args = {"bundle": str(bundle), "data": str(data_path), "extra": []}
    if case == "shape":
        np.savez(tmp_path / "bad.npz", x=np.zeros((5, 1, 28, 28), np.float32), y=np.zeros(5, np.int64))
        args["data"] = str(tmp_path / "bad.npz")
    elif case == "labels":
        np.savez(tmp_path / "bad.npz", x=data.x[:5], y=np.full(5, 99, np.int64))
        args["data"] = str(tmp_path / "bad.npz")
    elif case == "test labels":
        np.savez(tmp_path / "bad.npz", x=data.x[:5], y=np.full(5, -1, np.int64))
        args["extra"] = ["--test", str(tmp_path / "bad.npz")]
    elif case == "infeasible":
        args["extra"] = ["--accuracy-drop", "0", "--confidence", "0.999"]
    elif case == "built without a profile":
        args["bundle"] = str(tiny_bundle)
    elif case == "profile lost":
        copy = tmp_path / "copy"
        shutil.copytree(bundle, copy)
        (copy / "planning" / "profile.json").unlink()
        args["bundle"] = str(copy)
    else:
        args["bundle"] = str(tmp_path / "nowhere")
    out = tmp_path / "out"
    r = _retune(args["bundle"], "--data", args["data"], "-o", str(out), *args["extra"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not out.exists()


def test_a_retuned_pipeline_served_its_new_data_takes_each_exit_exactly_as_often_as_its_plan_says(compiled, tmp_path):
    """The loop `distree stats` opens and retune closes: served in two processes, the retuned bundle answers the
    data it was retuned on at the new plan's shares, which `stats` compares against (z = 0 at every exit)."""
    from distree.runtime.local import StageProcess

    bundle, data_path, data = compiled
    out = tmp_path / "retuned"
    assert _retune(str(bundle), "--data", str(data_path), "-o", str(out), "--accuracy-drop", "0.02").exit_code == 0
    pi4 = StageProcess(out, "pi4", start_timeout_s=120, cwd=REPO)
    host = StageProcess(out, "host", next_address=pi4.address, start_timeout_s=120, cwd=REPO)
    served, stats = cf.served_and_stats(host, pi4, data)
    run = run_bundle(out, data)
    assert list(served.exits) == list(run.exits)
    rows = [d for d in stats.drift if d.device == "host"]
    assert [d.exit for d in rows] == ["exit_1", "exit_2"]
    assert all(abs(d.z) < 1e-6 and d.verdict in ("ok", "too few requests") for d in rows), rows


def test_a_stability_bundle_runs_as_its_model_and_retunes_with_its_entry_heads(tiny, tmp_path):
    """The stability score reads a second head per exit (on the exit block's input): compiled into the segments, run
    by `run` as ONNX Runtime runs the whole model, and read again by retune's scoring."""
    import onnxruntime as ort

    from distree.exits import calibrate, exit_scores, train_exits
    from distree.graph import build_chain
    from distree.profiler import merge_profiles, profile_model

    exits_model, exits = train_exits(tiny.model, tiny.chain, tiny.data, declared=tiny.calibration.exits)
    assert all(e.entry_output for e in exits)
    chain = build_chain(exits_model)
    calibration = calibrate(exits_model, chain, exits, tiny.data, score_kind="stability")
    stable = dataclasses.replace(tiny, model=exits_model, chain=chain, calibration=calibration)
    plan, topology = cf.two_stage_plan(stable)
    assert plan.score_kind == "stability"
    profile = merge_profiles([profile_model(exits_model, chain, exits, d, mode="estimate") for d in topology.devices])
    bundle = build_bundle(exits_model, chain, plan, topology, calibration, tmp_path / "bundle", backend="ort",
                          profile=profile)
    assert all(seg.entry_output for st in read_manifest(bundle).stages for seg in st.segments if seg.exit)

    data = cf.dataset(120, seed=21)
    session = ort.InferenceSession(exits_model.SerializeToString(), providers=["CPUExecutionProvider"])
    thresholds = {e.name: e.threshold for e in read_thresholds(bundle).exits}
    want_exits, want_predictions = [], []
    for i in range(len(data.x)):
        names = ["logits", *(n for e in exits for n in (e.name, e.entry_output))]
        out = dict(zip(names, session.run(names, {"input": data.x[i:i + 1]})))
        taken = next((e for e in exits if exit_scores(out[e.name], "stability", out[e.entry_output])[0]
                      >= thresholds[e.name]), None)
        want_exits.append(taken.name if taken else "final")
        want_predictions.append(int(out[taken.name if taken else "logits"].argmax()))
    run = run_bundle(bundle, data)
    assert list(run.exits) == want_exits and list(run.predictions) == want_predictions
    assert len(set(want_exits)) == 3                    # each exit and the final answer someone

    np.savez(tmp_path / "new.npz", x=data.x, y=data.y)
    r = _retune(str(bundle), "--data", str(tmp_path / "new.npz"), "-o", str(tmp_path / "out"), "--accuracy-drop",
                "0.05", "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    for path, table in ((bundle, report["before"]), (tmp_path / "out", report["after"])):
        measured = run_bundle(path, data)
        assert measured.exit_rates == pytest.approx(table["exit_rates"], abs=1e-12)
        assert measured.accuracy == pytest.approx(table["accuracy"], abs=1e-12)
