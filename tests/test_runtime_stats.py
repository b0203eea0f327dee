"""`distree stats`: every stage's live counters, relayed along the served pipeline, and the test of whether the
exits requests take still match the plan's shares (drift)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import compiler_fixtures as cf
from distree.cli import cli
from distree.compiler.bundle import build_bundle
from distree.exits import Dataset
from distree.runtime.client import InferenceClient, ServeError, infer_dataset
from distree.runtime.executor import FINAL
from distree.runtime.local import StageProcess
from distree.runtime.stats import DEADLINE, DRIFT_MIN_REQUESTS, FAILED, FORWARD, RECENT, StageCounters, exit_drift, \
    pipeline_stats, planned_shares

REPO = Path(__file__).resolve().parents[1]


def _snapshot(planned: dict[str, float], outcomes: dict[str, int]) -> dict:
    counters = StageCounters("pi4", 0, planned, 1.0)
    for outcome, n in outcomes.items():
        for _ in range(n):
            counters.record(outcome, 0.0, 0.1, 0.2)
    return counters.snapshot()


def test_a_share_far_from_the_plan_is_drift_and_one_within_noise_is_not():
    plan = {"exit_1": 0.5, FINAL: 0.5}
    same = {d.exit: d for d in exit_drift(_snapshot(plan, {"exit_1": 510, FINAL: 490}))}
    assert {d.verdict for d in same.values()} == {"ok"} and same["exit_1"].served == pytest.approx(0.51)
    assert same["exit_1"].low < 0.5 < same["exit_1"].high
    moved = {d.exit: d for d in exit_drift(_snapshot(plan, {"exit_1": 400, FINAL: 600}))}
    assert moved["exit_1"].verdict == "drift" and moved["exit_1"].z == pytest.approx(-100 / np.sqrt(250))
    assert moved[FINAL].verdict == "drift" and moved[FINAL].z > 0
    few = exit_drift(_snapshot(plan, {"exit_1": 20, FINAL: 60}))
    assert {d.verdict for d in few} == {"too few requests"}
    # answers a deadline forced and failed requests are not the thresholds' choice: out of the test's count
    mixed = {d.exit: d for d in exit_drift(_snapshot(plan, {"exit_1": 300, FINAL: 300, DEADLINE: 500, FAILED: 50}))}
    assert mixed["exit_1"].requests == 600 and mixed["exit_1"].verdict == "ok"
    # a stage that hands requests on decides them too: its forwarded share is what its exits did not take
    relay = {d.exit: d for d in exit_drift(_snapshot({"exit_1": 0.3}, {"exit_1": 150, FORWARD: 350}))}
    assert relay["exit_1"].requests == 500 and relay["exit_1"].verdict == "ok"


def test_a_requests_cost_follows_the_shares_of_the_exits_it_takes():
    """A request leaving at e1 costs its path to e1; one passing through pays the whole first stage and then its
    path in the second: at the plan's shares 0.5*1 + 0.5*(2 + 3) = 3.0 ms; at served shares of 0.2, 0.2*1 + 0.8*5."""
    first = {"device": "a", "planned_shares": {"e1": 0.5}, "exit_ms": {"e1": 1.0}, "through_ms": 2.0,
             "recent": {"e1": 200, FORWARD: 800}}
    last = {"device": "b", "planned_shares": {FINAL: 1.0}, "exit_ms": {FINAL: 3.0}, "through_ms": 3.0,
            "recent": {FINAL: 800}}
    report = pipeline_stats("x:1", [first, last])
    assert report.planned_ms == pytest.approx(3.0) and report.served_ms == pytest.approx(0.2 + 0.8 * 5.0)
    quiet = pipeline_stats("x:1", [{**first, "recent": {"e1": 2, FORWARD: 8}}, {**last, "recent": {FINAL: 8}}])
    assert quiet.served_ms == pytest.approx(3.0)        # too few requests to say: the plan's shares stand in


def test_a_stage_keeps_its_newest_outcomes_and_counts_them_all():
    counters = StageCounters("host", 1, {FINAL: 1.0}, 2.0)
    for i in range(RECENT + 10):
        counters.record(FINAL if i >= 10 else FAILED, 0.0, float(i), float(i))
    snap = counters.snapshot()
    assert snap["totals"] == {FAILED: 10, FINAL: RECENT}
    assert snap["recent"] == {FINAL: RECENT}            # the 10 failures rolled out of the window
    assert snap["compute_ms"]["count"] == RECENT and snap["compute_ms"]["median_ms"] == pytest.approx(10 + RECENT / 2 - 0.5)
    json.dumps(snap)                                    # it crosses the wire as JSON


@pytest.fixture(scope="module")
def planned(tiny, tmp_path_factory) -> Path:
    """The tiny two-stage bundle, its plan's exit rates those of the calibration data (ONNX Runtime on the whole
    model, the bundle's thresholds), built for ONNX Runtime (nothing to compile)."""
    plan, topology = cf.two_stage_plan(tiny)
    thresholds = {e.name: e.threshold for e in plan.stages[0].exits}
    _, exits = cf.ort_reference(tiny, tiny.data.x, thresholds)
    rate = {name: exits.count(name) / len(exits) for name in (*thresholds, FINAL)}
    assert 0.1 < min(rate.values()), rate            # every way out is taken: a share can move either way
    first, second = plan.stages
    plan = dataclasses.replace(plan, stages=(
        dataclasses.replace(first, exits=tuple(dataclasses.replace(e, exit_rate=rate[e.name]) for e in first.exits)),
        dataclasses.replace(second, reach_rate=rate[FINAL])))
    assert planned_shares(plan, 0) == pytest.approx({name: rate[name] for name in thresholds})
    assert planned_shares(plan, 1) == pytest.approx({FINAL: 1.0})
    out = tmp_path_factory.mktemp("stats") / "bundle"
    return build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, out, backend="ort")


def test_stats_relays_every_stages_counters_and_flags_requests_unlike_the_calibration_data(planned, tiny, tmp_path):
    pi4 = StageProcess(planned, "pi4", start_timeout_s=120, cwd=REPO)
    host = StageProcess(planned, "host", next_address=pi4.address, start_timeout_s=120, cwd=REPO)
    try:
        with InferenceClient(host.address) as client:
            served = infer_dataset(client, tiny.data)               # the calibration data itself
            stats = client.stats()
        first, second = stats.stages
        assert (first["device"], second["device"]) == ("host", "pi4")
        answered = {name: served.exits.count(name) for name in ("exit_1", "exit_2", FINAL)}
        assert first["totals"] == {"exit_1": answered["exit_1"], "exit_2": answered["exit_2"],
                                   FORWARD: answered[FINAL]}
        assert second["totals"] == {FINAL: answered[FINAL]}
        assert first["compute_ms"]["count"] == len(tiny.data.x) and first["total_ms"]["median_ms"] > 0
        assert [(d.device, d.exit) for d in stats.drift] == [("host", "exit_1"), ("host", "exit_2"), ("pi4", FINAL)]
        host_rows, (last,) = stats.drift[:2], stats.drift[2:]
        assert all(d.verdict == "ok" and abs(d.z) < 1e-6 for d in host_rows), host_rows      # exactly as planned
        assert last.requests == answered[FINAL] < DRIFT_MIN_REQUESTS and last.verdict == "too few requests"
        assert stats.served_ms == pytest.approx(stats.planned_ms) and stats.planned_ms > 0

        np.savez(tmp_path / "dark.npz", x=np.full_like(tiny.data.x, -3.0))      # every request the same image
        with InferenceClient(host.address) as client:
            infer_dataset(client, Dataset(x=np.full_like(tiny.data.x, -3.0), y=tiny.data.y))
        result = CliRunner().invoke(cli, ["stats", host.address, "--fail-on-drift"])
        assert result.exit_code == 1, result.output
        assert "DRIFT" in result.output and "drift on host: exit_1" in result.output
        cost = r"a request costs ([0-9.]+) ms at the served shares and ([0-9.]+) ms at the plan's \(([+-][0-9.]+)%\)"
        served_ms, planned_ms, change = map(float, re.search(cost, result.output).groups())
        assert served_ms != planned_ms and change == pytest.approx(100 * (served_ms / planned_ms - 1), abs=0.2)
        as_json = CliRunner().invoke(cli, ["stats", host.address, "--json", "-"])
        assert as_json.exit_code == 0, as_json.output
        doc = json.loads(as_json.output)
        assert doc["stages"][0]["totals"][FORWARD] + sum(doc["stages"][0]["totals"].get(e, 0)
                                                         for e in ("exit_1", "exit_2")) == 2 * len(tiny.data.x)
        assert {d["verdict"] for d in doc["drift"] if d["device"] == "host"} == {"drift"}
        result = CliRunner().invoke(cli, ["stats", host.address, "--prometheus", str(tmp_path / "distree.prom")])
        assert result.exit_code == 0, result.output
        metrics = _prometheus(tmp_path / "distree.prom")
        assert metrics['distree_exit_drift{device="host",exit="exit_1"}'] == 1.0
        assert metrics['distree_request_cost_ms{shares="planned"}'] == pytest.approx(doc["planned_ms"], rel=1e-5)
        assert metrics['distree_stage_requests_total{device="pi4",outcome="final"}'] == doc["stages"][1]["totals"][FINAL]
        assert metrics['distree_exit_share{device="host",exit="exit_2",kind="planned"}'] == pytest.approx(
            planned_shares_of(doc, "host", "exit_2"), rel=1e-5)

        pi4.stop()                      # a stage that does not answer is named by the one before it
        with InferenceClient(host.address) as client:
            with pytest.raises(ServeError, match="next stage pi4"):
                for x in tiny.data.x:       # a request the host hands on, now to no one: it fails, and is counted
                    client.infer(x)
            assert client.stats().stages[0]["totals"][FAILED] == 1
        result = CliRunner().invoke(cli, ["stats", host.address, "--fail-on-drift", "--prometheus",
                                          str(tmp_path / "distree.prom")])
        assert result.exit_code == 1 and f"pi4 at {pi4.address}: did not answer (UNAVAILABLE" in result.output
        assert _prometheus(tmp_path / "distree.prom")['distree_stage_up{device="pi4"}'] == 0.0
    finally:
        host.stop()
        pi4.stop()


def planned_shares_of(doc: dict, device: str, exit_name: str) -> float:
    return next(st["planned_shares"][exit_name] for st in doc["stages"] if st["device"] == device)


def _prometheus(path: Path) -> dict[str, float]:
    """Series -> value of a text exposition file, each line checked against the format."""
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            assert re.fullmatch(r"# (HELP distree_[a-z_]+ .+|TYPE distree_[a-z_]+ (counter|gauge))", line), line
            continue
        match = re.fullmatch(r'(distree_[a-z_]+\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\}) (\S+)', line)
        assert match, line
        values[match.group(1)] = float(match.group(2))
    return values
