"""Solver: the MILP equals brute force on random instances; plans re-checked by an independent replay."""

from __future__ import annotations

import dataclasses
import importlib
import heapq
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from distree.cli import cli
from distree.errors import DistreeError
from distree.exits.types import MAX_LEVELS
from distree.solver import Constraints, Plan, brute_force, build_problem, solve
from distree.solver import bnb, parallel
from distree.solver.bnb import Tree, _Search, branch_and_bound
from distree.solver.bounds import (WindowTerms, best_multiplier, bound_tables, nested_window_bounds,
                                   widest_window_bound, window_bound)
from distree.solver.brute import all_configurations, all_placements
from distree.solver.chain import chain_bound, chain_bounds_by_level, chain_tables
from distree.solver.classes import PlacementClasses, StageClass, _coarse_to_fine
from distree.solver.costs import (best_placement, evaluate, first_true, nested_free_choice_ms, relaxed_lower_bound,
                                  relay_ms)
from distree.solver.heuristic import Candidate, _MoveScorer, _penalised, iterated_local_search, local_search, place
from distree.solver.milp import solve_milp
from distree.solver.parallel import kicks_on_cores, run_tree
from distree.solver.plan import WITHIN_GAP
from distree.solver.problem import check_constraints, clopper_pearson_lower, favourite_backend, required_correct
from distree.solver.solve import sweep_accuracy_drop
from distree.solver.start import start_levels, start_placement
from distree.solver.synthetic import synthetic_case
from solver_reference import replay


def _random_instance(seed: int):
    rng = np.random.default_rng(seed)
    case_args = dict(n_blocks=int(rng.integers(2, 13)), n_exits=int(rng.integers(1, 6)),
                     n_levels=int(rng.integers(1, 5)), n_devices=int(rng.integers(1, 4)),
                     n_samples=int(rng.integers(30, 120)), seed=seed, memory_slack=float(rng.uniform(0.9, 3.0)),
                     dispatch_ms=(0.0, 0.0, 0.0) if seed % 2 else  # own stream: same instances as without
                     tuple(np.random.default_rng(seed + 1000).uniform(0.05, 0.5, 3)))
    case = synthetic_case(**case_args)
    if rng.random() < 0.3:      # requests arriving at another device than the first
        src = case.topology.devices[int(rng.integers(len(case.topology.devices)))].name
        case = dataclasses.replace(case, topology=dataclasses.replace(case.topology, source=src))
    topology = case.topology
    kind = rng.random()
    c = Constraints(accuracy_drop=float(rng.choice([0.0, 0.01, 0.03, 0.08])),
                    confidence=0.9 if rng.random() < 0.15 else None,
                    free_order=bool(rng.random() < 0.25), time_limit_s=60)
    problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
    if kind < 0.2:      # a deadline between the fastest no-exit path and a bit more
        fastest = min(evaluate(problem, np.zeros(problem.n_exits, int), np.full(problem.n_blocks, d)).worst_ms
                      for d in range(problem.n_devices))
        c = dataclasses.replace(c, deadline_ms=float(fastest * rng.uniform(0.7, 1.2)))
    elif kind < 0.35:   # a throughput near what a single device gives, stages' request handling charged or not
        if seed % 3:
            handling = tuple(np.random.default_rng(seed + 2000).uniform(0.02, 0.3, 2))     # own stream, as above
            case = dataclasses.replace(synthetic_case(**case_args, handling_ms=handling), topology=topology)
        busiest = problem.block_ms.sum(axis=1).min()
        c = dataclasses.replace(c, min_throughput=float(1000.0 / (busiest * rng.uniform(0.4, 1.1))))
    return case, c


def _random_problem(seed: int):
    """A random instance and its Problem."""
    case, c = _random_instance(seed)
    return case, c, build_problem(case.chain, case.calibration, case.profile, case.topology, c)[0]


def _check_plan(plan: Plan, case, c: Constraints) -> None:
    """Every constraint, re-derived from the raw calibration data, profile and topology."""
    r = replay(plan, case.chain, case.calibration, case.profile, case.topology)
    assert r.expected_ms == pytest.approx(plan.expected_latency_ms, rel=1e-9, abs=1e-9)
    assert r.worst_ms == pytest.approx(plan.worst_case_latency_ms, rel=1e-9, abs=1e-9)
    assert r.correct == round(plan.accuracy * len(case.calibration.scores))
    for stage in plan.stages:
        for e in stage.exits:
            assert r.exit_rates[e.name] == pytest.approx(e.exit_rate)
    shares = [e.exit_rate for stage in plan.stages for e in sorted(stage.exits, key=lambda e: e.after_block)]
    assert all(sum(shares[:k]) < 1 - 1e-9 for k in range(len(shares))), shares     # none on that no one reaches
    n = len(case.calibration.scores)
    full = sum(row[-1] for row in case.calibration.correct) / n
    promised = clopper_pearson_lower(r.correct, n, c.confidence) if c.confidence else r.accuracy
    assert promised >= full - c.accuracy_drop - 1e-12
    for dev, need in r.memory.items():
        spec = case.topology.device(dev)
        assert need + spec.runtime_overhead_bytes <= spec.memory_bytes
        assert plan.memory_bytes[dev] == need
    if c.deadline_ms is not None:
        assert r.worst_ms <= c.deadline_ms + 1e-9
    if c.min_throughput is not None:
        assert max(r.busy_ms.values()) <= 1000.0 / c.min_throughput + 1e-9
    if c.free_order:
        assert len({s.device for s in plan.stages}) == len(plan.stages)
    else:
        assert r.contiguous_ordered


@pytest.mark.slow
def test_random_instances_match_brute_force_and_replay():
    """Hundreds of small instances: MILP optimum == exhaustive optimum, and each plan passes the replay."""
    stats = {"feasible": 0, "infeasible": 0, "memory_binds": 0, "exits_used": 0, "multi_stage": 0, "bnb_exact": 0}
    for seed in range(240):
        case, c, problem = _random_problem(seed)
        ref = brute_force(problem)
        try:
            plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
        except DistreeError as exc:
            assert not np.isfinite(ref.expected_ms), f"seed {seed}: solver says infeasible: {exc}"
            assert str(exc).startswith("infeasible plan: ")
            stats["infeasible"] += 1
            continue
        assert np.isfinite(ref.expected_ms), f"seed {seed}: brute force finds no plan"
        assert relaxed_lower_bound(problem) <= ref.expected_ms + 1e-9      # the bounds behind reported gaps
        tree = branch_and_bound(problem, None, time_limit_s=0.05 if seed % 2 else 20.0,    # stopped or finished,
                                best_first=seed % 4 >= 2)                                # depth or best first
        assert tree.bound <= ref.expected_ms * (1 + 1e-9) + 1e-12, f"seed {seed}"
        if tree.complete:
            stats["bnb_exact"] += 1
            assert tree.best.expected_ms == pytest.approx(ref.expected_ms, rel=1e-7, abs=1e-9), f"seed {seed}"
        assert plan.status == "optimal"
        assert plan.expected_latency_ms == pytest.approx(ref.expected_ms, rel=1e-7, abs=1e-9), f"seed {seed}"
        _check_plan(plan, case, c)
        stats["feasible"] += 1
        stats["exits_used"] += any(s.exits for s in plan.stages)
        stats["multi_stage"] += len(plan.stages) > 1
        roomy = brute_force(problem.replace(capacity_bytes=problem.capacity_bytes + 1e12))
        stats["memory_binds"] += roomy.expected_ms < ref.expected_ms - 1e-9
    # the generator must exercise what it claims to: memory binding, exits, pipelines, infeasibility
    assert stats["feasible"] >= 150 and stats["infeasible"] >= 5, stats
    assert stats["memory_binds"] >= 15 and stats["exits_used"] >= 60 and stats["multi_stage"] >= 30, stats
    assert stats["bnb_exact"] >= 50, stats


@pytest.mark.slow
def test_kicks_escape_where_single_exit_moves_get_stuck():
    """Where plain local search stops above the brute-force optimum, the iterated local search reaches it."""
    stuck = reached = 0
    for seed in range(150):
        case, c, problem = _random_problem(seed)
        descent = local_search(problem) if problem.n_exits >= 3 else None
        ref = brute_force(problem) if descent is not None else None
        if ref is None or descent.expected_ms <= ref.expected_ms * (1 + 1e-9):
            continue
        stuck += 1
        kicked = iterated_local_search(problem, descent, time_limit_s=10)
        assert kicked.feasible and kicked.expected_ms <= descent.expected_ms
        assert evaluate(problem, kicked.levels, kicked.placement).expected_ms == pytest.approx(kicked.expected_ms)
        reached += kicked.expected_ms <= ref.expected_ms * (1 + 1e-9)
    assert stuck >= 5, "the generator no longer produces instances where single moves get stuck"
    assert reached == stuck, (reached, stuck)


def test_window_moves_are_scored_exactly():
    """Every level combination of a window of exits scores what a full re-evaluation gives (memory, deadline,
    throughput and accuracy included), so pair moves never mislead the descent; so do all windows scored at
    once (``moves``)."""
    checked = moved = 0
    for seed in range(40):
        case, c, problem = _random_problem(seed)
        if problem.n_exits < 2:
            continue
        rng = np.random.default_rng(seed)
        if seed % 2 and problem.n_levels[0] > 1:       # exits with fewer threshold levels than others
            problem = problem.replace(n_levels=np.concatenate([[problem.n_levels[0] - 1], problem.n_levels[1:]]),
                                      passed_level=np.concatenate([np.minimum(problem.passed_level[:, :1],
                                                                              problem.n_levels[0] - 1),
                                                                   problem.passed_level[:, 1:]], axis=1))
        levels = rng.integers(0, problem.n_levels + 1)
        start = place(problem, levels)
        if start is None:
            continue
        scorer = _MoveScorer(problem, start.levels, start.placement)
        for width in (1, 2, 3):
            every = scorer.moves(width)
            assert (every is None) == (problem.busy_cap_ms is not None or problem.n_exits < width)
            for a in range(problem.n_exits - width + 1):
                combos, scores = scorer.window(a, width)
                if every is not None:       # all windows at once: the same scores, combinations past a level inf
                    valid = (every[0] <= problem.n_levels[a:a + width]).all(axis=1)
                    assert np.array_equal(every[0][valid], combos) and np.isinf(every[1][a][~valid]).all()
                    many = every[1][a][valid]
                    assert np.allclose(many, scores, rtol=1e-9, atol=1e-9), (seed, a, width)
                    moved += len(combos)
                for combo, score in zip(combos, scores):
                    trial = start.levels.copy()
                    trial[a:a + len(combo)] = combo
                    want = _penalised(problem, trial, start.placement)
                    assert score == pytest.approx(want, rel=1e-9, abs=1e-9) or (np.isinf(score) and np.isinf(want))
                    checked += 1
    assert checked >= 2000 and moved >= 1500, (checked, moved)


def test_descents_are_the_same_with_windows_scored_one_at_a_time(monkeypatch):
    """Where all windows at once would not fit memory (MOVES_MAX_CELLS) the descent scores one window at a time,
    and ends where it would have."""
    import distree.solver.heuristic as heuristic

    compared = 0
    for seed in range(30):
        case, c, problem = _random_problem(seed)
        at_once = local_search(problem)
        with monkeypatch.context() as m:
            m.setattr(heuristic, "MOVES_MAX_CELLS", 0)
            one_by_one = local_search(problem)
            if at_once is not None and problem.n_exits:
                assert _MoveScorer(problem, at_once.levels, at_once.placement).moves(1) is None
        assert (at_once is None) == (one_by_one is None)
        if at_once is not None:
            assert np.array_equal(at_once.levels, one_by_one.levels), seed
            assert at_once.expected_ms == pytest.approx(one_by_one.expected_ms, rel=1e-12)
            compared += 1
    assert compared >= 15, compared


def test_best_placement_through_a_device_is_the_cheapest_placement_using_it():
    """``best_placement(through=d)`` (what using a device the plan leaves idle would cost) equals the cheapest of
    every placement, in pipeline order, that runs a stage on d and fits memory and throughput (enumerated)."""
    compared = 0
    for seed in range(60):
        case, c, problem = _random_problem(seed)
        if problem.n_devices < 2:
            continue
        p = problem.replace(free_order=False, deadline_ms=None)
        levels = np.random.default_rng(seed).integers(0, p.n_levels + 1)
        placements = all_placements(p.n_blocks, p.n_devices, False)
        costs = []
        for pl in placements:
            ev = evaluate(p, levels, pl)
            costs.append(np.inf if set(ev.violations) - {"accuracy"} else ev.expected_ms)
        costs = np.array(costs)
        for d in range(p.n_devices):
            uses = (placements == d).any(axis=1)
            want = costs[uses].min() if uses.any() else np.inf
            found = best_placement(p, levels, through=d)
            if found is None:
                assert np.isinf(want), (seed, d)
                continue
            assert (found[0] == d).any() and found[1] == pytest.approx(want, rel=1e-9), (seed, d)
            assert evaluate(p, levels, found[0]).expected_ms == pytest.approx(found[1], rel=1e-9)
            compared += 1
        unforced = best_placement(p, levels)
        assert (unforced is None and np.isinf(costs).all()) or unforced[1] == pytest.approx(costs.min(), rel=1e-9)
    assert compared >= 60, compared


def test_shared_exit_positions_and_no_exits():
    """Two heads on the same cut tensor (evaluated in calibration order), and a model with no exits."""
    case = synthetic_case(6, 3, 3, 2, 120, seed=21)
    exits = list(case.calibration.exits)
    exits[1] = dataclasses.replace(exits[1], after_block=exits[0].after_block)
    shared = dataclasses.replace(case, calibration=dataclasses.replace(case.calibration, exits=tuple(exits)))
    bare = synthetic_case(5, 0, 3, 2, 60, seed=22)
    for cs in (shared, bare):
        c = Constraints(accuracy_drop=0.05)
        problem, _ = build_problem(cs.chain, cs.calibration, cs.profile, cs.topology, c)
        plan = solve(cs.chain, cs.calibration, cs.profile, cs.topology, c)
        assert plan.expected_latency_ms == pytest.approx(brute_force(problem).expected_ms, rel=1e-7)
        _check_plan(plan, cs, c)


def test_the_milp_matches_brute_force_where_a_stage_s_request_handling_counts_toward_throughput():
    """A stage is busy with the requests it receives and hands on, not only with its compute: the MILP's flow into
    and out of each device against the exhaustive optimum and the evaluator, on the random instances that bound
    throughput with those figures in their profile."""
    checked = feasible = 0
    for seed in range(240):
        case, c, problem = _random_problem(seed)
        if problem.busy_cap_ms is None or problem.handling_ms is None:
            continue
        checked += 1
        ref = brute_force(problem)
        r = solve_milp(problem, solver="highs")
        if not np.isfinite(ref.expected_ms):
            assert r.status == "infeasible", f"seed {seed}"
            continue
        feasible += 1
        assert r.status == "optimal" and r.objective == pytest.approx(ref.expected_ms, rel=1e-6), f"seed {seed}"
        ev = evaluate(problem, r.levels, r.placement)
        assert ev.feasible and ev.busy_ms.max() <= problem.busy_cap_ms + 1e-9, f"seed {seed}"
    assert checked >= 15 and feasible >= 5, (checked, feasible)


@pytest.mark.parametrize("seed, handling", [(29, (0.05, 5.0)), (38, (0.05, 5.0)), (2, (0.01, 20.0)),
                                           (13, (0.01, 20.0))])
def test_a_source_that_cannot_afford_to_relay_under_a_throughput_bound_runs_a_stage(seed, handling):
    """A source that runs no stage still receives every request and hands it on: where that alone breaks the
    throughput bound, every engine must place a stage there (cases where the unbounded optimum relays)."""
    case = synthetic_case(6, 2, 3, 2, 80, seed=seed, handling_ms=handling)
    free, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints(accuracy_drop=0.05))
    relaying = brute_force(free)
    assert free.source not in relaying.placement, "the case no longer relays when unbounded"
    c = Constraints(accuracy_drop=0.05, min_throughput=1000.0 / (0.95 * relay_ms(free)))
    problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
    assert "throughput" in evaluate(problem, relaying.levels, relaying.placement).violations
    ref = brute_force(problem)
    assert np.isfinite(ref.expected_ms) and problem.source in ref.placement
    r = solve_milp(problem, solver="highs")
    assert r.status == "optimal" and r.objective == pytest.approx(ref.expected_ms, rel=1e-6)
    plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
    assert plan.expected_latency_ms == pytest.approx(ref.expected_ms, rel=1e-7)
    assert case.topology.source_device in {s.device for s in plan.stages}
    _check_plan(plan, case, c)


def test_cbc_agrees_with_highs():
    for seed in (3, 7, 11, 19):
        case, c, problem = _random_problem(seed)
        a = solve_milp(problem, solver="highs")
        b = solve_milp(problem, solver="cbc")
        assert a.status == b.status
        if a.status == "optimal":
            assert a.objective == pytest.approx(b.objective, rel=1e-6)


def test_branch_and_bound_stopped_by_a_gap_is_within_it_of_the_brute_force_optimum():
    """--gap g drops nodes that cannot beat the plan by g: the plan is then at most the optimum / (1 - g), never
    called optimal unless it is, and the bound stays a bound."""
    g, complete, above = 0.25, 0, 0
    for seed in range(80):
        case, c, problem = _random_problem(seed)
        ref = brute_force(problem).expected_ms
        if not np.isfinite(ref):
            continue
        tree = branch_and_bound(problem, None, time_limit_s=20.0, best_first=seed % 2 == 1, rel_gap=g)
        assert tree.bound <= ref * (1 + 1e-9) + 1e-12, f"seed {seed}"
        if tree.complete:
            complete += 1
            assert tree.best.expected_ms * (1 - g) <= ref + 1e-9, f"seed {seed}"
            assert tree.bound >= tree.best.expected_ms * (1 - g) * (1 - 1e-9) - 1e-12, f"seed {seed}"
            above += tree.best.expected_ms > ref * (1 + 1e-9)
    assert complete >= 40 and above >= 3, (complete, above)      # the gap let some plans stop above the optimum


def test_the_milp_stopped_by_a_gap_is_within_it_of_the_brute_force_optimum():
    """--gap reaches HiGHS and CBC as their relative MIP gap: a plan they stop on is at most the optimum / (1 - g),
    its status says within-gap (never optimal) when it may be above the optimum, and the bound stays a bound."""
    g, within = 0.3, {"highs": 0, "cbc": 0}
    for seed in range(24):
        case, c, problem = _random_problem(seed)
        ref = brute_force(problem).expected_ms
        if not np.isfinite(ref):
            continue
        for solver in within:
            r = solve_milp(problem, solver=solver, rel_gap=g)
            assert r.status in ("optimal", WITHIN_GAP), (seed, solver, r.status)
            assert r.objective * (1 - g) <= ref * (1 + 1e-6) + 1e-9 and r.bound <= ref * (1 + 1e-6) + 1e-9
            if r.status == "optimal":
                assert r.objective == pytest.approx(ref, rel=1e-6), (seed, solver)
            within[solver] += r.status == WITHIN_GAP
            assert (r.status == WITHIN_GAP) == r.sol_status.startswith(f"{solver} stopped within --gap 0.3")
    assert within["highs"] >= 2 and within["cbc"] >= 10, within     # the gap was used (CBC cannot say less)


def test_solve_stops_at_the_gap_asked_for_and_says_so(tmp_path):
    """A case the time limit leaves open at gap 0 (tested above) ends within --gap, with that status and its proof;
    a --gap outside [0, 1) is a one-line error."""
    case = synthetic_case(40, 12, 6, 3, 1500, seed=5)
    c = Constraints(accuracy_drop=0.02, time_limit_s=600, gap=0.2)      # reached in ~5 s here: the gap stops it
    plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
    assert plan.status in ("optimal", WITHIN_GAP) and plan.gap <= 0.2 + 1e-9, (plan.status, plan.gap)
    assert plan.status == "optimal" or "proven within --gap 0.2 by branch and bound" in plan.sol_status
    assert plan.bound_ms <= plan.expected_latency_ms
    _check_plan(plan, case, c)
    with pytest.raises(DistreeError, match=r"--gap 1 must be in \[0, 1\)"):
        check_constraints(dataclasses.replace(c, gap=1.0))


@pytest.mark.parametrize("size, limit", [((20, 8, 5, 3, 800), 3), ((40, 12, 6, 3, 1500), 2)])
def test_time_limited_solve_is_not_called_optimal(size, limit):
    """A stopped or skipped MILP reports its proven gap; 'optimal' only with a matching bound."""
    case = synthetic_case(*size, seed=5)
    c = Constraints(accuracy_drop=0.02, time_limit_s=limit)
    plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
    assert plan.bound_ms <= plan.expected_latency_ms + 1e-9
    assert plan.wall_s <= 2 * limit + 2          # the limit covers search, MILP build and load (loose: shared CI)
    if plan.status == "optimal":
        assert plan.gap <= 1e-6 and plan.bound_ms >= plan.expected_latency_ms * (1 - 1e-6)
    else:
        assert plan.status in ("time-limit", "feasible") and plan.gap > 0
        assert plan.gap == pytest.approx((plan.expected_latency_ms - plan.bound_ms) / plan.expected_latency_ms)
        problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
        shared, _ = best_multiplier(problem, bound_tables(problem))      # the reported bound uses it, or better
        assert plan.bound_ms >= shared - 1e-9 and plan.bound_ms >= relaxed_lower_bound(problem) - 1e-9
    _check_plan(plan, case, c)


def test_milp_above_its_row_cap_is_not_run_once_a_plan_is_known(monkeypatch):
    """Past MILP_MAX_ROWS the best-first tree gets the time (a longer --time-limit must not give a worse bound)."""
    solve_module = importlib.import_module("distree.solver.solve")
    monkeypatch.setattr(solve_module, "MILP_MAX_ROWS", 10)
    case = synthetic_case(30, 8, 4, 3, 500, seed=1)     # ~7k rows: HiGHS would run (and prove it, in ~18 s)
    c = Constraints(accuracy_drop=0.01, time_limit_s=6)
    plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
    assert plan.solver == "branch-and-bound"
    assert "over 10, where HiGHS bounds less than the tree" in plan.sol_status
    _check_plan(plan, case, c)


@pytest.mark.parametrize("min_share, widened", [(0.0, True), (1.01, False)])
def test_window_widens_only_after_a_trial_shows_it_decides(monkeypatch, min_share, widened):
    """Before the best-first tree, a wider window is built only when a short trial tree found the wide window
    deciding often enough (WIDEN_MIN_SHARE); its bound then counts in the reported one."""
    solve_module = importlib.import_module("distree.solver.solve")
    monkeypatch.setattr(solve_module, "MILP_MAX_ROWS", 10)          # the best-first tree route
    monkeypatch.setattr(solve_module, "WIDEN_MIN_SHARE", min_share)
    monkeypatch.setattr(solve_module, "WIDE_BOUND_SHARE", 0.001)     # 8 ms for the first window: width 4 of 8
    monkeypatch.setattr(solve_module, "WIDE_BOUND_MIN_S", 0.0)
    monkeypatch.setattr(solve_module, "CLASS_SHARE", 0.0)             # no placement classes (they skip the window)
    built, build = [], solve_module.window_prefix_bound

    def recording_build(p, t, width):
        built.append(build(p, t, width))
        return built[-1]

    monkeypatch.setattr(solve_module, "window_prefix_bound", recording_build)
    case = synthetic_case(30, 8, 4, 3, 500, seed=1)     # 8 exits x 5 options (width 5: 25k cells, 15 ms)
    c = Constraints(accuracy_drop=0.01, time_limit_s=8)
    plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
    assert len(built) == (1 if widened else 0)
    if widened:
        assert built[0].width > 4
        assert built[0].total / 500 <= plan.bound_ms + 1e-9 <= plan.expected_latency_ms + 2e-9
    _check_plan(plan, case, c)


def test_best_first_tree_past_its_open_node_cap_keeps_a_valid_bound(monkeypatch):
    """At max_open_nodes the best-first tree drops its worse half and goes on; the proven bound never passes the
    optimum (the dropped nodes' smallest bound caps it), it claims completeness only when the dropped nodes
    could not have beaten the plan, and the plan's solver line says how many were dropped."""
    monkeypatch.setattr(bnb, "max_open_nodes", lambda p: 6)
    capped = complete = 0
    for seed in range(60):
        case, c, problem = _random_problem(seed)
        ref = brute_force(problem)
        tree = branch_and_bound(problem, None, time_limit_s=5.0, best_first=True)
        assert tree.bound <= ref.expected_ms * (1 + 1e-9) + 1e-12, seed
        capped += tree.dropped > 0
        said = importlib.import_module("distree.solver.solve")._nodes(tree)     # what the plan's solver line says
        assert (f"{tree.dropped} open nodes dropped at the memory cap" in said) == (tree.dropped > 0), said
        if tree.complete:
            complete += tree.dropped > 0
            if np.isfinite(ref.expected_ms):
                assert tree.best.expected_ms == pytest.approx(ref.expected_ms, rel=1e-7, abs=1e-9), seed
            else:
                assert tree.best is None
    assert capped >= 10 and complete >= 3, (capped, complete)


def test_required_correct_with_confidence():
    assert required_correct(1000, 0.9, None) == 900
    k = required_correct(1000, 0.9, 0.95)
    assert clopper_pearson_lower(k, 1000, 0.95) >= 0.9 > clopper_pearson_lower(k - 1, 1000, 0.95)
    assert k > 900
    assert required_correct(10, 0.99, 0.95) == 11          # cannot be certified with 10 samples


def test_infeasible_accuracy_names_the_smallest_drop():
    case = synthetic_case(8, 3, 3, 2, 300, seed=0)
    c = Constraints(accuracy_drop=0.0, confidence=0.95)
    with pytest.raises(DistreeError, match="accuracy") as err:
        solve(case.chain, case.calibration, case.profile, case.topology, c)
    drop = float(re.search(r"smallest --accuracy-drop that works is ([0-9.]+)", str(err.value)).group(1))
    plan = solve(case.chain, case.calibration, case.profile, case.topology, dataclasses.replace(c, accuracy_drop=drop))
    _check_plan(plan, case, dataclasses.replace(c, accuracy_drop=drop))
    with pytest.raises(DistreeError, match="accuracy"):
        solve(case.chain, case.calibration, case.profile, case.topology,
              dataclasses.replace(c, accuracy_drop=max(0.0, drop - 0.002)))


def test_infeasible_memory_deadline_and_throughput_are_explained():
    case = synthetic_case(6, 2, 2, 2, 100, seed=4, memory_slack=0.05)
    small = dataclasses.replace(case.topology, devices=tuple(
        dataclasses.replace(d, memory_bytes=d.runtime_overhead_bytes + 1000) for d in case.topology.devices))
    with pytest.raises(DistreeError, match=r"memory: .* MiB more per device"):
        solve(case.chain, case.calibration, case.profile, small, Constraints())
    roomy = synthetic_case(6, 2, 2, 2, 100, seed=4)
    with pytest.raises(DistreeError, match="deadline") as err:
        solve(roomy.chain, roomy.calibration, roomy.profile, roomy.topology, Constraints(deadline_ms=0.01))
    needed = float(re.search(r"use --deadline-ms ([0-9.]+)", str(err.value)).group(1))
    c = Constraints(deadline_ms=needed)
    _check_plan(solve(roomy.chain, roomy.calibration, roomy.profile, roomy.topology, c), roomy, c)
    # a rate no plan sustains names the highest that one does (proven: a little more fails, there for want of the
    # accuracy that the exits lowering the busiest stage's time cost), which then works
    with pytest.raises(DistreeError, match="throughput") as err:
        solve(roomy.chain, roomy.calibration, roomy.profile, roomy.topology, Constraints(min_throughput=1e6))
    rate = float(re.search(r"the most any plan sustains is ([0-9.]+) requests/s .* use --min-throughput \1 or less",
                           str(err.value)).group(1))
    c = Constraints(min_throughput=rate)
    _check_plan(solve(roomy.chain, roomy.calibration, roomy.profile, roomy.topology, c), roomy, c)
    with pytest.raises(DistreeError, match="infeasible plan"):
        solve(roomy.chain, roomy.calibration, roomy.profile, roomy.topology, Constraints(min_throughput=rate * 1.02))
    # with the stages' request handling in the profile the same devices sustain less, and the message says why
    handled = synthetic_case(6, 2, 2, 2, 100, seed=4, handling_ms=(0.3, 0.1))
    with pytest.raises(DistreeError, match=r"ms of expected busy time \(compute and request handling\)") as err:
        solve(handled.chain, handled.calibration, handled.profile, handled.topology, Constraints(min_throughput=1e6))
    slower = float(re.search(r"the most any plan sustains is ([0-9.]+) requests/s", str(err.value)).group(1))
    assert slower < rate
    c = Constraints(min_throughput=slower)
    _check_plan(solve(handled.chain, handled.calibration, handled.profile, handled.topology, c), handled, c)


def test_a_profile_without_request_handling_says_that_a_throughput_bound_counts_compute_only(caplog):
    case = synthetic_case(6, 2, 2, 2, 100, seed=4)
    build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints(min_throughput=10.0))
    (record,) = [r for r in caplog.records if "serve:receive" in r.getMessage()]
    assert record.levelname == "WARNING" and "counts compute only" in record.getMessage()
    assert "dev0, dev1" in record.getMessage()


def test_a_plan_records_each_device_s_busy_time_and_the_rate_it_sustains():
    """What `distree plan` and `distree compile` print as the capacity: the busiest device's busy time per request
    (request handling included where the profile measured it), the cost model's own; a plan file from before has
    none and prints none."""
    for handling in (None, (0.2, 0.1)):
        case = synthetic_case(6, 2, 2, 2, 100, seed=4, handling_ms=handling)
        c = Constraints(accuracy_drop=0.02)
        plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
        problem, index = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
        ev = evaluate(problem, start_levels(plan, case.chain, case.calibration, index),
                      start_placement(plan, problem.devices))
        assert plan.busy_ms == pytest.approx({problem.devices[d]: ms for d, ms in enumerate(ev.busy_ms) if ms > 0})
        assert plan.handling_measured == (handling is not None)
        device, rate = plan.capacity()
        assert rate == pytest.approx(1000.0 / max(ev.busy_ms)) and plan.busy_ms[device] == max(ev.busy_ms)
        assert ("request handling)" in plan.capacity_line()) == (handling is not None)
        old = Plan.from_dict({k: v for k, v in plan.to_dict().items() if k not in ("busy_ms", "handling_measured")})
        assert old.capacity() is None and old.capacity_line() == ""


def test_sporadic_traffic_charges_each_hop_its_round_trip_after_idle_time(tmp_path):
    """`--traffic sporadic` (the default) charges a hop the profile's rpc:idle round trip after the longest gap, a
    lone request's; `steady` the back-to-back one. Each plan is the best one for what it was charged, and the
    steady plan is not the best for sporadic requests; the plan says how hops were charged,
    and that a profile without the idle entries charged them back to back."""
    dispatch = (0.01, 0.02, 0.3)
    case = synthetic_case(8, 3, 3, 3, 300, seed=2, dispatch_ms=dispatch, idle_rpc_ms=(1.0, 2.0, 4.0, 8.0, 12.0))
    plans, problems = {}, {}
    for traffic in ("sporadic", "steady"):
        c = Constraints(accuracy_drop=0.02, traffic=traffic)
        plans[traffic] = solve(case.chain, case.calibration, case.profile, case.topology, c)
        problems[traffic], index = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
        assert plans[traffic].status == "optimal" and plans[traffic].traffic == traffic
        assert plans[traffic].idle_hops_measured
    assert problems["sporadic"].hop_ms[0, 1] == pytest.approx((12.0 + 24.0) / 2 + dispatch[0])
    assert problems["steady"].hop_ms[0, 1] == pytest.approx((0.3 + 0.6) / 2 + dispatch[0])

    def cost(plan, traffic):
        return evaluate(problems[traffic], start_levels(plan, case.chain, case.calibration, index),
                        start_placement(plan, problems[traffic].devices)).expected_ms

    for own, other in (("sporadic", "steady"), ("steady", "sporadic")):
        assert cost(plans[own], own) == pytest.approx(plans[own].expected_latency_ms, rel=1e-9)
        assert cost(plans[own], own) <= cost(plans[other], own) + 1e-9
    assert cost(plans["steady"], "sporadic") > cost(plans["sporadic"], "sporadic") + 0.01     # the choice matters
    assert "sporadic requests" in plans["sporadic"].hops_line() and "back to back" in plans["steady"].hops_line()
    old = synthetic_case(8, 3, 3, 3, 300, seed=2, dispatch_ms=dispatch)
    plan = solve(old.chain, old.calibration, old.profile, old.topology, Constraints(accuracy_drop=0.02))
    assert not plan.idle_hops_measured and len(plan.stages) > 1 and "predates rpc:idle" in plan.hops_line()
    args = _write_inputs(tmp_path, case)
    for traffic in ("sporadic", "steady"):
        res = CliRunner().invoke(cli, ["plan", *args, "--accuracy-drop", "0.02", "--traffic", traffic])
        assert res.exit_code == 0 and f"expected latency {plans[traffic].expected_latency_ms:.3f} ms" in res.output
    res = CliRunner().invoke(cli, ["plan", *args, "--traffic", "bursty"])
    assert res.exit_code == 2 and "'bursty' is not one of 'sporadic', 'steady'" in res.output


def test_missing_profile_entry_is_a_user_error():
    case = synthetic_case(4, 1, 2, 1, 20, seed=1)
    partial = dataclasses.replace(case.profile, entries=case.profile.entries[1:])
    with pytest.raises(DistreeError, match="no entry for block:0 on dev0.*distree profile"):
        solve(case.chain, case.calibration, partial, case.topology, Constraints())


def _write_inputs(tmp_path, case):
    case.chain.save(tmp_path / "chain.json")
    case.calibration.save(tmp_path / "calibration.json")
    case.profile.save(tmp_path / "profile.json")
    keys = ("name", "target", "memory_bytes", "cores", "peak_gflops", "mem_gbps", "runtime_overhead_bytes")
    topo = {"devices": [{k: v for k, v in d.to_dict().items() if k in keys} for d in case.topology.devices],
            "links": [ln.to_dict() for ln in case.topology.links]}
    (tmp_path / "topo.json").write_text(json.dumps(topo))
    return ["--chain", str(tmp_path / "chain.json"), "--calibration", str(tmp_path / "calibration.json"),
            "--profile", str(tmp_path / "profile.json"), "--topology", str(tmp_path / "topo.json")]


def test_cli_plan_writes_plan_lp_and_table(tmp_path):
    case = synthetic_case(10, 4, 3, 3, 400, seed=8)
    args = _write_inputs(tmp_path, case)
    res = CliRunner().invoke(cli, ["plan", *args, "--accuracy-drop", "0.02", "--dump-lp", str(tmp_path / "m.lp"),
                                   "-o", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    assert "expected latency" in res.output and "status optimal" in res.output
    assert "costs: dev0 estimated, not measured; dev1 estimated, not measured; dev2 estimated" in res.output
    plan = Plan.load(tmp_path / "plan.json")
    _check_plan(plan, case, Constraints(accuracy_drop=0.02))
    lp = (tmp_path / "m.lp").read_text()
    for name in ("accuracy:", "memory_d0:", "assign_block0:", "all_requests_enter:", r"exit_first_c\d+_x\d+:"):
        assert re.search(name, lp), name
    assert plan.no_exit_latency_ms >= plan.expected_latency_ms
    # each device the plan leaves idle is priced: the plan's exits at the cheapest placement through it
    idle = [d.name for d in case.topology.devices if d.name not in {s.device for s in plan.stages}]
    assert idle and "devices without a stage" in res.output, "the case no longer leaves a device idle"
    for name in idle:
        found = re.search(rf"  {name}: the plan's exits placed through it predict ([0-9.]+) ms", res.output)
        assert found and float(found.group(1)) >= plan.expected_latency_ms - 5e-4, res.output


def test_cli_sweep_frontier_and_errors(tmp_path):
    case = synthetic_case(8, 3, 3, 2, 300, seed=9)
    args = _write_inputs(tmp_path, case)
    res = CliRunner().invoke(cli, ["plan", *args, "--sweep", "accuracy-drop=0,0.01,0.05",
                                   "--plot", str(tmp_path / "f.png"), "-o", str(tmp_path / "f.json")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    points = json.loads((tmp_path / "f.json").read_text())["points"]
    lat = [p["expected_latency_ms"] for p in points]
    assert lat == sorted(lat, reverse=True)          # a larger allowed drop never costs latency
    assert "0.0%" in res.output                      # proven gaps in percent
    bad = CliRunner().invoke(cli, ["plan", *args, "--confidence", "0.95", "--accuracy-drop", "0"])
    assert bad.exit_code == 2 and bad.output.startswith("error: infeasible plan: accuracy")
    assert "Traceback" not in bad.output
    # in a sweep the same point is a row, and its reason is printed whole, with the drop that would work
    res = CliRunner().invoke(cli, ["plan", *args, "--confidence", "0.95", "--sweep", "accuracy-drop=0,0.05"])
    assert res.exit_code == 0, res.output
    assert re.search(r"^drop 0: infeasible plan: accuracy: .* the smallest --accuracy-drop that works is [0-9.]+$",
                     res.output, re.M), res.output
    bad = CliRunner().invoke(cli, ["plan", *args, "--sweep", "depth=1"])
    assert bad.exit_code == 2 and "accuracy-drop=V1" in bad.output
    for sweep, message in (("accuracy-drop=0.01,-0.1", "error: --accuracy-drop -0.1 must be in [0, 1)"),
                           ("accuracy-drop=,", "error: the sweep has no accuracy drops")):
        bad = CliRunner().invoke(cli, ["plan", *args, "--sweep", sweep, "-o", str(tmp_path / "s.json")])
        assert bad.exit_code == 2 and bad.output.startswith(message), bad.output
    assert not (tmp_path / "s.json").exists()
    for limit, message in (("0", "error: --time-limit 0"), ("-5", "error: --time-limit -5"),
                           ("nan", "Error: Invalid value for '--time-limit': 'nan' is not a finite number")):
        bad = CliRunner().invoke(cli, ["plan", *args, "--time-limit", limit, "-o", str(tmp_path / "t.json")])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    for jobs in ("0", "-2"):
        bad = CliRunner().invoke(cli, ["plan", *args, "--jobs", jobs, "-o", str(tmp_path / "t.json")])
        assert bad.exit_code == 2 and bad.output.startswith(f"error: --jobs {jobs} must be at least 1"), bad.output
    assert not (tmp_path / "t.json").exists()


def test_cli_plan_starts_from_an_earlier_plan_and_sweeps_seed_each_drop_with_the_last(tmp_path, monkeypatch):
    """--start: the earlier plan's exits and thresholds, read onto this calibration's grids, seed the local search
    (its cost here reported), the solve ends no worse than it; a plan of another model or with unknown exits is a
    one-line error. A sweep solves its drops from the smallest up, each seeded with the plan before, and answers
    in the order asked."""
    case = synthetic_case(10, 4, 3, 3, 400, seed=8)
    args = _write_inputs(tmp_path, case)
    first = CliRunner().invoke(cli, ["plan", *args, "--accuracy-drop", "0.02", "-o", str(tmp_path / "plan.json")])
    assert first.exit_code == 0, first.output
    earlier = Plan.load(tmp_path / "plan.json")
    assert sum(len(s.exits) for s in earlier.stages) >= 2, "the case no longer enables exits"
    # the mapping is exact: placed afresh, the plan's own configuration costs what the plan says
    p, index = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints(accuracy_drop=0.02))
    levels = start_levels(earlier, case.chain, case.calibration, index)
    assert place(p, levels).expected_ms == pytest.approx(earlier.expected_latency_ms, rel=1e-12)
    own = start_placement(earlier, p.devices)          # and its own placement, where its devices are all here
    assert evaluate(p, levels, own).expected_ms == pytest.approx(earlier.expected_latency_ms, rel=1e-12)
    assert start_placement(earlier, tuple(d + "x" for d in p.devices)) is None
    # a threshold a little off the grid (a calibration made again) reads as the nearest level
    shifted = dataclasses.replace(earlier, stages=tuple(
        dataclasses.replace(s, exits=tuple(dataclasses.replace(e, threshold=e.threshold + 1e-6) for e in s.exits))
        for s in earlier.stages))
    assert np.array_equal(start_levels(shifted, case.chain, case.calibration, index), levels)
    res = CliRunner().invoke(cli, ["plan", *args, "--accuracy-drop", "0.05", "--start", str(tmp_path / "plan.json"),
                                   "-o", str(tmp_path / "again.json")])
    assert res.exit_code == 0, res.output
    assert f"started from a plan of {earlier.expected_latency_ms:.3f} ms here" in res.output, res.output
    again = Plan.load(tmp_path / "again.json")
    assert again.expected_latency_ms <= earlier.expected_latency_ms + 1e-9
    assert again.model_stats["start_feasible"] == 1.0
    # the seed reaches the local search, beside its own starts
    seen = []

    def spy(problem, **kw):
        seen.append([tuple(s) for s in kw.get("starts") or []])
        return local_search(problem, **kw)

    monkeypatch.setattr(importlib.import_module("distree.solver.solve"), "local_search", spy)
    solve(case.chain, case.calibration, case.profile, case.topology, Constraints(accuracy_drop=0.05, jobs=1),
          start=earlier)
    assert tuple(levels) in seen[0] and len(seen[0]) > 1
    # errors: one line, exit status 2, no output written
    wrong = tmp_path / "wrong.json"
    for broken, message in ((dataclasses.replace(earlier, model_sha256="f" * 64), "error: --start: the plan is for "
                             "model ffffffffffff"),
                            (dataclasses.replace(earlier, stages=tuple(
                                dataclasses.replace(s, exits=tuple(dataclasses.replace(e, name="nope")
                                                                   for e in s.exits)) for s in earlier.stages)),
                             "error: --start: the plan's exit nope")):
        broken.save(wrong)
        for sweep in ([], ["--sweep", "accuracy-drop=0.01,0.02"]):
            bad = CliRunner().invoke(cli, ["plan", *args, "--start", str(wrong), *sweep, "-o", str(tmp_path / "x.json")])
            assert bad.exit_code == 2 and bad.output.startswith(message) and bad.output.count("\n") == 1, bad.output
    bad = CliRunner().invoke(cli, ["plan", *args, "--start", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and "no such plan file" in bad.output, bad.output
    assert not (tmp_path / "x.json").exists()
    # a sweep: from the smallest drop up, each seeded with the plan before; rows in the order asked
    drops = [0.05, 0.0, 0.01]
    points = sweep_accuracy_drop(case.chain, case.calibration, case.profile, case.topology, Constraints(), drops)
    assert [pt.accuracy_drop for pt in points] == drops and all(pt.plan is not None for pt in points)
    looser, none, tight = (pt.plan for pt in points)
    assert "start_ms" not in none.model_stats
    assert tight.model_stats["start_ms"] <= none.expected_latency_ms + 1e-9
    assert looser.model_stats["start_ms"] <= tight.expected_latency_ms + 1e-9
    assert looser.expected_latency_ms <= tight.expected_latency_ms <= none.expected_latency_ms


def test_window_bound_never_exceeds_any_completion():
    """The window bound (shared thresholds, heads on the way) at any multiplier, any width and any decided
    prefix is at most the cost of every feasible completion, checked by enumerating all of them."""
    checked = 0
    for seed in range(60):
        case, c, problem = _random_problem(seed)
        if problem.n_exits == 0:
            continue
        priced = [bound_tables(problem)] + [bound_tables(problem, row) for row in problem.head_ms]   # every price
        configs = all_configurations(problem.n_levels)
        best = {}
        for levels in configs:
            found = place(problem, levels)
            if found is not None and found.feasible:
                ev = evaluate(problem, levels, found.placement)
                key = tuple(levels)
                best[key] = ev.expected_ms
        if not best:
            continue
        rng = np.random.default_rng(seed)
        N, K = problem.n_samples, problem.required_correct
        for _, tables in zip(range(6), itertools.cycle(priced)):
            depth = int(rng.integers(0, problem.n_exits + 1))
            prefix = tuple(int(x) for x in configs[rng.integers(len(configs))][:depth])
            completions = [v for k, v in best.items() if k[:depth] == prefix]
            if not completions:
                continue
            lv = np.array(prefix, dtype=int)
            passes = (problem.passed_level[:, :depth] >= lv[None]) & (lv[None] > 0)
            first = first_true(passes)
            survivors = first == depth
            gone = np.nonzero(~survivors)[0]
            heads = np.cumsum(tables.head[:depth] * (lv > 0))
            fixed = (tables.leave[first[gone]] + np.where(first[gone] > 0, heads[first[gone] - 1], 0.0)).sum()
            fixed_right = int(problem.correct_exit[gone, first[gone]].sum())
            paid = (heads[-1] if depth else 0.0) * survivors.sum()
            for lam in (0.0, 0.5, 3.0, 20.0):
                fast = window_bound(problem, tables, lam, survivors, depth, 1)        # the per-exit shortcut
                general = WindowTerms(problem, tables, 1, survivors, depth).value(lam)   # minus its rounding margin
                assert general <= fast + 1e-9 and general == pytest.approx(fast, rel=1e-4)
                for width in (1, 2, 3):
                    value = window_bound(problem, tables, lam, survivors, depth, width)
                    total = (fixed + paid - lam * fixed_right + value + lam * K) / N
                    assert total <= min(completions) + 1e-9, (seed, depth, lam, width)
                    checked += 1
    assert checked >= 500, checked


def _window_relaxation_by_simulation(problem, tables, width: int, lam: float, levels: np.ndarray) -> float:
    """The window relaxation of one configuration, sample by sample, written plainly (bounds.py, module docstring):
    heads before the first chance paid, exact inside the window, free choice past it; latency - lam * correct."""
    E, total = problem.n_exits, 0.0
    for s in range(problem.n_samples):
        chances = np.nonzero(problem.passed_level[s] > 0)[0]
        first = int(chances[0]) if len(chances) else E
        cost = float(sum(tables.head[k] for k in range(first) if levels[k] > 0))
        if first == E:                   # passes no exit at any level: the final classifier, every head on the way
            total += cost + tables.leave[E] - lam * problem.correct_final[s]
            continue
        for k in range(first, min(first + width, E)):
            if levels[k] > 0 and problem.passed_level[s, k] >= levels[k]:
                total += cost + tables.leave[k] - lam * problem.correct_exit[s, k]
                break
            cost += tables.head[k] if levels[k] > 0 else 0.0
        else:
            past = min(first + width, E)
            total += cost + min(tables.after[s, past], tables.after_right[s, past] - lam)
    return total


def test_window_tables_equal_a_sample_by_sample_simulation():
    """The window bound's dominance-sum tables and dynamic programme give exactly the minimum, over every
    configuration, of the relaxation simulated sample by sample (widths 1-3, several multipliers)."""
    checked = 0
    for seed in range(30):
        case, c, problem = _random_problem(seed)
        configs = all_configurations(problem.n_levels)
        if problem.n_exits == 0 or len(configs) > 700:
            continue
        tables = bound_tables(problem)
        for width in (1, 2, 3):
            terms = WindowTerms(problem, tables, width)
            for lam in (0.0, tables.lam, 2.0 * tables.lam + 0.5):
                plain = min(_window_relaxation_by_simulation(problem, tables, width, lam, lv) for lv in configs)
                fast = terms.value(lam)
                assert fast <= plain + 1e-9 and fast == pytest.approx(plain, rel=1e-9, abs=1e-9), (seed, width, lam)
                checked += 1
    assert checked >= 120, checked


def test_prefix_bound_never_exceeds_the_best_plan_below_a_node(monkeypatch):
    """The root's wide window carried along a node's levels, made exact for the samples the prefix decides
    (PrefixBound), at any width, multiplier and head price: every node the tree can create (the whole tree,
    nothing pruned) bounds at most the best feasible plan whose levels start with the node's, by enumeration;
    and a tree using it still finishes at the exhaustive optimum."""
    monkeypatch.setattr(bnb, "PREFIX_MIN_SHARE", 0.0)     # never dropped as not decisive enough: checked everywhere
    checked = exact = compared = 0
    for seed in range(50):
        case, c, problem = _random_problem(seed)
        if problem.n_exits == 0:
            continue
        best = {}
        for levels in all_configurations(problem.n_levels):
            found = place(problem, levels)
            if found is not None and found.feasible:
                best[tuple(int(x) for x in levels)] = found.expected_ms * problem.n_samples
        rng = np.random.default_rng(seed)
        priced = [bound_tables(problem)] + [bound_tables(problem, row) for row in problem.head_ms]
        for width in (1, 2, 3):
            tables = priced[int(rng.integers(len(priced)))]
            lam = float(rng.choice([0.0, tables.lam, 3.0 * tables.lam + 1.0]))
            prefix = WindowTerms(problem, tables, width).prefix_bound(lam, problem.required_correct)
            search = _Search(problem, None, tables, prefix)
            stack = search.root()
            while stack:
                node = stack.pop()
                below = [v for k, v in best.items() if k[:node.depth] == node.levels]
                assert node.bound <= min(below, default=np.inf) * (1 + 1e-9) + 1e-9, (seed, width, node.levels)
                checked += 1
                if node.depth < problem.n_exits:
                    kids = search.children(node)
                    compared += _check_prefix_children(problem, tables, prefix, node, kids)
                    stack.extend(kids)
        ref = min(best.values(), default=np.inf) / problem.n_samples
        tree = branch_and_bound(problem, None, 20.0, best_first=True, tables=priced[0],
                                prefix=widest_window_bound(problem, priced[0], 1.0))
        assert tree.complete
        if np.isfinite(ref):
            assert tree.best.expected_ms == pytest.approx(ref, rel=1e-7, abs=1e-9), seed
            exact += 1
    assert checked >= 3000 and exact >= 25 and compared >= 3000, (checked, exact, compared)


def _check_prefix_children(p, t, prefix, node, kids) -> int:
    """The wide window's per-child corrections (compiled: kernels.prefix_children) equal them computed plainly in
    numpy over the node's survivors: the decided samples' exact correction (as the tree stores it) and each
    child's wide bound (never above the child's own bound, which takes the larger). Returns how many children
    were compared."""
    if not kids:
        return 0
    j = node.depth
    rows = np.nonzero(np.unpackbits(node.packed, count=p.n_samples))[0]
    key = p.passed_level[rows, j]
    levels = np.array([kid.levels[-1] for kid in kids], dtype=int)
    cuts = np.where(levels > 0, levels, p.n_levels[j] + 1)
    heads_before = np.concatenate([[0.0], np.cumsum(t.head[:j] * (np.array(node.levels) > 0))])
    closes, free = prefix.closes[rows], prefix.free[rows]
    past = closes <= j
    paid = heads_before[j] - heads_before[np.minimum(closes, j)]
    with np.errstate(invalid="ignore"):
        go = np.where(past, t.leave[j] - prefix.lam * p.correct_exit[rows, j] + paid - free, 0.0)
        stay = np.where(closes <= j + 1, np.minimum(t.after[rows, j + 1], t.after_right[rows, j + 1] - prefix.lam)
                        + paid - free, 0.0)
    compiled = prefix.children(p, t, j, node.wide_prefix, node.wide_state, node.wide_decided, heads_before, levels,
                               cuts, node.packed, np.ascontiguousarray(p.passed_level[:, j]))
    for c, (kid, level, cut) in enumerate(zip(kids, levels, cuts)):
        leaving, staying = key >= cut, key < cut
        decided = node.wide_decided + (go[leaving].sum() if level > 0 else 0.0)
        survivors = stay[staying].sum() + (t.head[j] * past[staying].sum() if level > 0 else 0.0)
        wide = prefix.constant + kid.wide_prefix + prefix.to_go[j + 1][kid.wide_state] + decided + survivors
        assert kid.wide_decided == pytest.approx(decided, rel=1e-9, abs=1e-9), (node.levels, level)
        assert compiled.bound[c] == pytest.approx(wide, rel=1e-9, abs=1e-9), (node.levels, level)
        assert wide <= kid.bound * (1 + 1e-9) + 1e-9, (node.levels, level)
    return len(kids)


def _free_choice_by_sorting(need_right: int, base: np.ndarray, right: np.ndarray) -> float:
    """Free choice written plainly: everyone takes the cheapest option, then the cheapest upgrades."""
    with np.errstate(invalid="ignore"):
        up = right - base
    need = need_right - int((up <= 0).sum())
    if need <= 0:
        return float(base.sum())
    ups = np.sort(up[up > 0])[:need]
    return float(base.sum() + ups.sum()) if len(ups) == need and np.all(np.isfinite(ups)) else np.inf


def test_nested_bounds_equal_one_set_at_a_time():
    """The branch and bound bounds all children of a node in one pass (survivor sets nested by level, compiled
    loops: distree.solver.kernels); each equals the bound of its own survivor set computed alone by independent
    code (the general window dynamic programme at width 1; free choice by plain sorting)."""
    checked = 0
    for seed in range(40):
        case, c, problem = _random_problem(seed)
        if problem.n_exits == 0:
            continue
        tables = bound_tables(problem)
        rng = np.random.default_rng(seed)
        N, E = problem.n_samples, problem.n_exits
        for _ in range(5):
            depth = int(rng.integers(0, E + 1))
            survivors = rng.random(N) < rng.uniform(0.3, 1.0)
            key = problem.passed_level[:, depth] if depth < E else rng.integers(0, 4, N)
            cuts = np.unique(rng.integers(0, int(key.max()) + 2, 4))
            rows = np.nonzero(survivors)[0]
            lam = float(rng.uniform(0, 20))
            need = rng.integers(0, len(rows) + 2, len(cuts))
            nested = nested_window_bounds(problem, tables, lam, rows, key[rows], cuts, depth)
            free = nested_free_choice_ms(need, tables.after[rows, depth], tables.after_right[rows, depth],
                                         key[rows], cuts)
            for c_i, cut in enumerate(cuts):
                alone = survivors & (key < cut)
                assert nested[c_i] == pytest.approx(WindowTerms(problem, tables, 1, alone, depth).value(lam),
                                                    rel=1e-9, abs=1e-9)
                plain = _free_choice_by_sorting(int(need[c_i]), tables.after[alone, depth],
                                                tables.after_right[alone, depth])
                assert free[c_i] == pytest.approx(plain, rel=1e-9, abs=1e-9) or free[c_i] == plain == np.inf
                checked += 1
    assert checked >= 300, checked


def test_children_and_their_bounds_equal_plain_code():
    """A node's children and their bounds come from one compiled pass (kernels.children_bounds); on every node of
    whole trees they equal plain code: the levels whose leaving survivors differ, each child's decided latency,
    right answers and heads, and its bound (decided part plus the larger of the free choice by sorting and the
    width-1 window by the general dynamic programme). The tree's validity checks cannot see a bound that is too
    low; this can."""
    compared = 0
    for seed in range(60):
        case, c, problem = _random_problem(seed)
        if problem.n_exits == 0:
            continue
        search = _Search(problem, None, None, None)
        t, K, lam = search.tables, problem.required_correct, search.lam
        stack = search.root()
        while stack:
            node = stack.pop()
            if node.depth == problem.n_exits:
                continue
            kids = {kid.levels[-1]: kid for kid in search.children(node)}
            j = node.depth
            alive = np.unpackbits(node.packed, count=problem.n_samples).astype(bool)
            passed = problem.passed_level[:, j]
            plain = [0]
            for level in range(1, int(problem.n_levels[j]) + 1):
                leaving = int((alive & (passed >= level)).sum())
                if leaving == 0:
                    break
                if plain[-1] == 0 or leaving != int((alive & (passed >= plain[-1])).sum()):
                    plain.append(level)
            kept = []
            for level in plain:
                leave = alive & (passed >= level) if level else np.zeros_like(alive)
                stay = alive & ~leave
                fixed_ms = node.fixed_ms + (leave.sum() * (t.leave[j] + node.heads_ms) if leave.any() else 0.0)
                fixed_right = node.fixed_right + int(problem.correct_exit[leave, j].sum())
                heads_ms = node.heads_ms + (t.head[j] if level else 0.0)
                paid = fixed_ms + heads_ms * stay.sum()
                free = _free_choice_by_sorting(K - fixed_right, t.after[stay, j + 1], t.after_right[stay, j + 1])
                window = WindowTerms(problem, t, 1, stay, j + 1).value(lam)
                bound = max(paid + free, paid - lam * (fixed_right - K) + window)
                if problem.deadline_ms is not None and t.leave[-1] + heads_ms > problem.deadline_ms + 1e-9:
                    bound = np.inf
                if bound == np.inf:
                    continue                          # dropped (nothing beats no incumbent at infinity)
                kept.append(level)
                kid = kids[level]
                assert kid.fixed_ms == pytest.approx(fixed_ms, rel=1e-9, abs=1e-9), (seed, node.levels, level)
                assert kid.fixed_right == fixed_right and kid.heads_ms == pytest.approx(heads_ms), (seed, level)
                assert kid.bound == pytest.approx(bound, rel=1e-9, abs=1e-9), (seed, node.levels, level)
                compared += 1
            assert sorted(kids) == kept, (seed, node.levels)
            stack.extend(kids.values())
    assert compared >= 3000, compared


def _accuracy_cases() -> list:
    """Random instances, and correlated ones with more exits where recovering costs losses."""
    cases = [_random_problem(seed)[2] for seed in range(40)]
    cases += [build_problem(k.chain, k.calibration, k.profile, k.topology, Constraints())[0]
              for k in (synthetic_case(12, 7, 2, 1, 150, seed=s, exit_every=True) for s in range(6))]
    return [c for c in cases if c.n_exits]


def _prefixes_and_their_best_accuracy(problem):
    """(depth, packed survivors, their decided right answers, the most right answers any completion gives) for
    every prefix of levels: every completion enumerated, answers counted sample by sample."""
    passed, correct, final = problem.passed_level, problem.correct_exit, problem.correct_final
    configs = all_configurations(problem.n_levels)
    taken = (configs[:, None, :] > 0) & (passed[None] >= configs[:, None, :])       # [config, sample, exit]
    leaves_at = np.where(taken.any(2), taken.argmax(2), problem.n_exits)
    answers = np.concatenate([correct, final[:, None]], axis=1)
    right = answers[np.arange(problem.n_samples)[None], leaves_at].sum(1)
    for depth in range(problem.n_exits):
        prefixes = {}
        for config, total in zip(configs, right):
            key = tuple(int(x) for x in config[:depth])
            prefixes[key] = max(prefixes.get(key, -1), int(total))
        for prefix, most in prefixes.items():
            gone = np.zeros(problem.n_samples, dtype=bool)
            fixed_right = 0
            for j, level in enumerate(prefix):
                leave = ~gone & (level > 0) & (passed[:, j] >= level)
                fixed_right += int(correct[leave, j].sum())
                gone |= leave
            yield depth, ~gone, fixed_right, most


def test_bit_sets_give_the_survivors_and_the_samples_gone_that_a_walk_over_the_samples_gives():
    """Children's survivors and the samples gone by each exit (for twins) come from bit sets of the samples
    passing each level (kernels.passing_sets); replayed sample by sample on random prefixes, including levels
    that take no one and exits off."""
    from distree.solver.kernels import gone_by, nested_survivors, passing_sets
    rng = np.random.default_rng(7)
    for n in (1, 7, 8, 9, 64, 203):
        n_exits, max_level = 6, 4
        passed = rng.integers(0, max_level + 1, size=(n, n_exits))
        passing = passing_sets(passed, max_level)
        for _ in range(20):
            levels = rng.integers(0, max_level + 1, size=n_exits) * (rng.random(n_exits) < 0.6)
            left = np.full(n, n_exits)                    # the exit each sample leaves at (n_exits: none)
            for i in range(n):
                taken = np.nonzero((levels > 0) & (passed[i] >= levels))[0]
                left[i] = taken[0] if len(taken) else n_exits
            expected = np.array([(left <= j).sum() for j in range(n_exits)])
            assert np.array_equal(gone_by(passing, levels.astype(np.int64)), expected), (n, levels)
            depth = int(rng.integers(0, n_exits))
            alive = left >= depth                         # the survivors of the first ``depth`` exits
            cuts = np.array(sorted(set(rng.integers(0, max_level + 2, size=4).tolist())), dtype=np.int64)
            kids = nested_survivors(np.packbits(alive), passing[depth], cuts)
            for c, cut in enumerate(cuts):
                assert np.array_equal(np.unpackbits(kids[c])[:n].astype(bool), alive & (passed[:, depth] < cut))
                assert not np.unpackbits(kids[c])[n:].any()   # the padding stays clear


def test_reachable_right_answers_never_fall_below_the_best_completion():
    """kernels.reachable_right (the tree drops a node whose decided right answers plus it miss K): for every
    prefix of levels of random instances, and of correlated ones with more exits where recovering costs losses,
    the decided right answers plus the bound are at least the most right answers any completion gives, and the
    bound is below what the free choice allows (every survivor some later exit answers right) often enough to
    matter; a tree using it still ends at the brute-force optimum
    (test_random_instances_match_brute_force_and_replay)."""
    from distree.solver.kernels import reachable_right
    checked = tighter = 0
    cases = _accuracy_cases()
    for problem in cases:
        passed, correct, final = problem.passed_level, problem.correct_exit, problem.correct_final
        columns = bnb._columns(problem)
        for depth, alive, fixed_right, most in _prefixes_and_their_best_accuracy(problem):
            bound = reachable_right(np.packbits(alive), depth, *columns[4:7], int(problem.n_levels.max()),
                                    *columns[-3:])
            assert fixed_right + bound >= most, (depth, fixed_right, bound, most)
            free = int((alive & (final | (correct[:, depth:] & (passed[:, depth:] >= 1)).any(1))).sum())
            assert bound <= free
            tighter += bound < free
            checked += 1
    assert checked >= 2000 and tighter >= 200, (checked, tighter)
    short = 0
    for problem in cases[-6:]:          # the tree drops nodes by it and still ends at the optimum
        tree = branch_and_bound(problem, None, 20.0, best_first=True)
        found = np.inf if tree.best is None else tree.best.expected_ms
        assert tree.complete and found == pytest.approx(brute_force(problem).expected_ms, rel=1e-7)
        short += tree.short
    assert short > 0


def test_the_recovery_search_never_rules_out_an_accuracy_some_completion_reaches():
    """kernels.recovery_search (the tree drops a node it answers 0 for): for every prefix of the instances above,
    asked for the most right answers a completion gives it answers 1; asked for one more, it answers 0 at many
    prefixes the count of reachable right answers lets through (it is tighter), and 1 there when its budget of
    search nodes is too small to settle it (unknown is never a proof)."""
    from distree.solver.kernels import reachable_right, recovery_search
    checked = tighter = 0
    for problem in _accuracy_cases():
        columns = bnb._columns(problem)
        top = int(problem.n_levels.max())
        for depth, alive, fixed_right, most in _prefixes_and_their_best_accuracy(problem):
            node = (np.packbits(alive), depth, *columns[4:7], top, *columns[-3:])
            assert recovery_search(*node, most - fixed_right, 10 ** 6)
            beyond = most - fixed_right + 1
            if reachable_right(*node) >= beyond:
                checked += 1
                if not recovery_search(*node, beyond, 10 ** 6):
                    tighter += 1
                    assert recovery_search(*node, beyond, 0)
    assert checked >= 1500 and tighter >= 120, (checked, tighter)


def _relaxed_most_right(problem, depth, alive, with_spoils=True):
    """The most right answers of the relaxation kernels.recovery_search explores, by enumerating every completion
    from ``depth``: survivors right at the final classifier, plus those wrong there that some enabled exit they pass
    answers right (covered), minus those right there that an enabled exit they pass answers wrong, wrong at every
    exit before it (from ``depth``) they pass at any level (hit); ``with_spoils``: a survivor wrong at the final
    classifier that such an exit answers wrong is not covered (spoiled: it leaves wrongly there or earlier)."""
    passed, correct = problem.passed_level[alive, depth:], problem.correct_exit[alive, depth:]
    final = problem.correct_final[alive]
    tails = np.unique(all_configurations(problem.n_levels)[:, depth:], axis=0)
    passes = passed >= 1
    wrong_before = np.cumprod(np.concatenate([np.ones((len(passed), 1), bool), ~(passes & correct)[:, :-1]], 1),
                              1).astype(bool)
    recoverable = ~final & (passes & correct).any(1)
    covering = recoverable[:, None] & correct
    spoiling = recoverable[:, None] & ~correct & wrong_before
    hitting = final[:, None] & ~correct & wrong_before
    taken = (tails[:, None, :] > 0) & (passed[None] >= tails[:, None, :])              # [tail, survivor, exit]
    covered = (taken & covering).any(2)
    if with_spoils:
        covered &= ~(taken & spoiling).any(2)
    return int(final.sum()) + int((covered.sum(1) - (taken & hitting).any(2).sum(1)).max())


def _hard_scores(seed: int, n: int, exits: int, levels: int, hard_share: float, easy_right: float):
    """Random scores (passed levels, right at each exit, right at the final classifier) where a hard share of the
    samples passes only the lowest level, is right at an exit by chance and half the time wrong at the final
    classifier; the others pass any level and are right at an exit with probability ``easy_right``."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < hard_share
    final = ~(hard & (rng.random(n) < 0.5))
    correct = np.where(hard[:, None], rng.random((n, exits)) < 0.5, rng.random((n, exits)) < easy_right)
    passed = np.where(hard[:, None], rng.integers(0, 2, (n, exits)),
                      rng.integers(0, levels + 1, (n, exits))).astype(np.int64)
    return passed, correct, final


def test_the_recovery_search_finds_the_exact_optimum_of_its_relaxation():
    """kernels.recovery_search, given search nodes enough, answers 1 for exactly the right answers its relaxation
    reaches (enumerated independently, every completion): at every prefix of random scores with a hard 40% of the
    samples (right at an exit by chance, half of them wrong at the final classifier) the relaxed optimum is reached
    and one more is not. The relaxation is valid (the optimum is at least the most right answers any completion
    gives), and its spoils (a recovery the chain order rules out) lower it at many prefixes, where a search without
    them answers 1 one answer too far."""
    from types import SimpleNamespace
    from distree.solver.kernels import recovery_search, right_exits
    checked = spoiled = 0
    for seed in range(12):
        n, exits, levels = 80, 6, 2
        passed, correct, final = _hard_scores(seed, n, exits, levels, hard_share=0.4, easy_right=0.95)
        scores = SimpleNamespace(passed_level=passed, correct_exit=correct, correct_final=final,
                                 n_levels=np.full(exits, levels), n_exits=exits, n_samples=n)
        columns = (passed, correct, final, levels, *right_exits(passed, correct))
        for depth, alive, fixed_right, most in _prefixes_and_their_best_accuracy(scores):
            relaxed = _relaxed_most_right(scores, depth, alive)
            assert relaxed >= most - fixed_right, (seed, depth, relaxed, most - fixed_right)
            node = (np.packbits(alive), depth, *columns)
            assert recovery_search(*node, relaxed, 10 ** 6), (seed, depth, relaxed)
            assert not recovery_search(*node, relaxed + 1, 10 ** 6), (seed, depth, relaxed)
            spoiled += _relaxed_most_right(scores, depth, alive, with_spoils=False) > relaxed
            checked += 1
    assert checked >= 4000 and spoiled >= 100, (checked, spoiled)


def test_the_recovery_search_answers_unknown_when_its_budget_runs_out():
    """On larger random scores (a hard third of the samples passing only the lowest level, half of them wrong
    at the final classifier) the search proves short what the count lets through, and with no search nodes it
    answers 1 at some of them: the tree keeps such a node, never drops it unproven."""
    from distree.solver.kernels import reachable_right, recovery_search, right_exits
    proven = unsettled = 0
    for seed in range(12):
        n, exits, levels = 400, 16, 4
        passed, correct, final = _hard_scores(seed, n, exits, levels, hard_share=0.3, easy_right=0.97)
        columns = (passed, correct, final, levels, *right_exits(passed, correct))
        packed = np.packbits(np.ones(n, dtype=bool))
        reach = reachable_right(packed, 0, *columns)
        for need in range(reach - 10, reach + 1):
            if not recovery_search(packed, 0, *columns, need, 10 ** 6):
                proven += 1
                unsettled += bool(recovery_search(packed, 0, *columns, need, 0))
    assert proven >= 10 and unsettled >= 3, (proven, unsettled)


def test_narrowed_levels_keep_every_completion_that_meets_the_accuracy(monkeypatch):
    """_Search.narrow (kernels.narrow_levels, then kernels.narrowed_window) at every node of the whole tree of the
    instances above, the levels it rules out inherited as the tree does: it drops a node only when no completion
    meets the accuracy; every completion that meets it uses at each later exit either off or a level left; the
    narrowed bound is at most the best feasible plan below; the children it keeps still hold that plan (a child
    stands for every level taking the same survivors). With search nodes to spend on each probe and without;
    levels are ruled out and bounds raised often enough to matter."""
    monkeypatch.setattr(bnb, "RECOVERY_SLACK", 10 ** 6)        # the search at every node, not only the tight ones
    checked = banned = raised = 0
    for problem in _accuracy_cases():
        configs = all_configurations(problem.n_levels)
        passed, correct, final = problem.passed_level, problem.correct_exit, problem.correct_final
        taken = (configs[:, None, :] > 0) & (passed[None] >= configs[:, None, :])
        leaves_at = np.where(taken.any(2), taken.argmax(2), problem.n_exits)
        answers = np.concatenate([correct, final[:, None]], axis=1)
        meets = configs[answers[np.arange(problem.n_samples)[None], leaves_at].sum(1) >= problem.required_correct]
        cost = np.array([np.inf if (found := place(problem, levels)) is None or not found.feasible
                         else found.expected_ms * problem.n_samples for levels in meets])
        for probe_budget in (0, 10 ** 4):
            monkeypatch.setattr(bnb, "PROBE_BUDGET", probe_budget)
            search = _Search(problem, None, bound_tables(problem), None)
            stack = search.root()
            while stack:
                node = stack.pop()
                j = node.depth
                below = (meets[:, :j] == np.array(node.levels, dtype=int)).all(1)
                best = cost[below].min(initial=np.inf)
                if j == problem.n_exits:
                    continue
                narrowed = search.narrow(node)
                checked += 1
                if narrowed is None:
                    assert not below.any(), node.levels
                    continue
                if narrowed.limits is not None:
                    lo, hi = narrowed.limits[:, j:]
                    rest = meets[below, j:]
                    assert ((rest == 0) | ((rest >= lo) & (rest <= hi))).all(), node.levels
                    banned += bool((lo > 1).any() or (hi < problem.n_levels[j:]).any())
                    _check_narrowed_window(problem, search, node, narrowed.limits)
                assert narrowed.bound <= best * (1 + 1e-9) + 1e-9, node.levels
                raised += narrowed.bound > node.bound * (1 + 1e-9) + 1e-9
                kids = search.children(narrowed)
                alive = np.unpackbits(node.packed, count=problem.n_samples).astype(bool)
                takes = [((level > 0) & (passed[alive, j] >= level)).tobytes()
                         for level in range(problem.n_levels[j] + 1)]
                kept = {takes[kid.levels[-1]] for kid in kids}
                held = np.array([takes[level] in kept for level in meets[:, j]], dtype=bool)
                assert cost[below & held].min(initial=np.inf) == best or not np.isfinite(best), node.levels
                stack.extend(kids)
    assert checked >= 3000 and banned >= 300 and raised >= 100, (checked, banned, raised)
    spanning = 0                           # a child whose levels span the lowest level left stays, those below go
    for problem in _accuracy_cases():
        search = _Search(problem, None, bound_tables(problem), None)
        stack = search.root()
        while stack:
            node = stack.pop()
            j = node.depth
            if j == problem.n_exits:
                continue
            kids = search.children(node)
            alive = np.unpackbits(node.packed, count=problem.n_samples).astype(bool)
            takes = [((level > 0) & (problem.passed_level[alive, j] >= level)).tobytes()
                     for level in range(problem.n_levels[j] + 1)]
            for low in range(1, problem.n_levels[j]):
                if takes[low] == takes[low + 1] and takes[low] != takes[0]:
                    limits = search.all_levels.copy()
                    limits[0, j] = low + 1
                    kept = [kid.levels[-1] for kid in search.children(node._replace(limits=limits))]
                    assert kept == [kid.levels[-1] for kid in kids if kid.levels[-1] == 0 or takes[kid.levels[-1]]
                                    in takes[low + 1:]], (low, kept)
                    spanning += 1
            stack.extend(kids)
    assert spanning >= 100, spanning


def _check_narrowed_window(problem, search, node, limits) -> None:
    """kernels.narrowed_window equals the width-1 window of the problem whose scores pass only the levels left
    (a level below exit k's lowest passes none, one above its highest passes that), computed plainly; with every
    level left it is the window of the problem itself."""
    from distree.solver.bounds import BoundTables, first_chances
    from distree.solver.costs import option_tables
    from distree.solver.kernels import narrowed_window
    t, j = search.tables, node.depth
    alive = np.unpackbits(node.packed, count=problem.n_samples).astype(bool)
    for lo, hi in (limits, search.all_levels):
        passed = problem.passed_level.copy()
        passed[:, j:] = np.where(passed[:, j:] >= lo[j:], np.minimum(passed[:, j:], hi[j:]), 0)
        limited = problem.replace(passed_level=passed)
        plain = window_bound(limited, BoundTables(t.leave, *option_tables(limited, t.leave), t.head,
                                                  first_chances(limited)), search.lam, alive, j, 1)
        window, count = narrowed_window(node.packed, j, search.lam, lo, hi, t.leave, t.head, search.passed_by_sample,
                                        search.correct_by_sample, search.final, problem.n_levels)
        assert window == pytest.approx(plain, rel=1e-9, abs=1e-9) and count == alive.sum(), node.levels


def test_progress_tells_the_plan_and_a_gap_that_the_result_does_not_contradict(monkeypatch):
    """A solve that cannot prove its plan says what it is doing while it runs (a status line), and the gap it
    last told is never smaller than the one it returns (plans only improve, bounds only rise)."""
    monkeypatch.setattr(bnb, "PROGRESS_EVERY_S", 0.05)
    case = synthetic_case(40, 30, 6, 3, 1500, seed=3)
    told = []
    plan = solve(case.chain, case.calibration, case.profile, case.topology, Constraints(time_limit_s=4),
                 progress=told.append)
    assert plan.status != "optimal"                   # else this instance no longer exercises the tree
    assert told[0] == "plan: no plan yet; local search (0/4 s)"
    in_tree = [m for m in told if "best-first search" in m]
    assert len(in_tree) >= 3, told
    pattern = re.compile(r"^plan: ([0-9.]+) ms, gap ([0-9.]+)%; best-first search \(\d/4 s\)$")
    best, gap = (float(v) for v in pattern.match(in_tree[-1]).groups())
    assert plan.expected_latency_ms <= best + 5e-4
    assert plan.gap <= gap / 100 + 5e-4


def test_more_threshold_levels_than_the_solver_takes_are_refused_by_name():
    case = synthetic_case(4, 2, 3, 2, 100, seed=3)
    grids = list(case.calibration.thresholds)
    grids[1] = tuple(np.linspace(0.0, 1.0, MAX_LEVELS + 1))
    cal = dataclasses.replace(case.calibration, thresholds=tuple(grids))
    name = cal.exits[1].name
    with pytest.raises(DistreeError, match=f"exit {name} has {MAX_LEVELS + 1} threshold levels, the solver takes "
                                           f"at most {MAX_LEVELS}; re-run `distree calibrate --levels 8`"):
        build_problem(case.chain, cal, case.profile, case.topology, Constraints())


def test_with_many_levels_the_local_search_scores_window_by_window_and_stops_on_time(monkeypatch):
    """At 64 levels every pair of exits has 4,225 level combinations: all windows at once took 7.4 s and 0.4 GB
    (30 exits), and a descent checked its clock only between rounds (37 s a descent; a 10 s solve of the trained
    ResNet-110 at 64 levels died: "workers did not report within 30 s after the time limit")."""
    from distree.solver import heuristic

    case = synthetic_case(8, 7, MAX_LEVELS, 2, 300, seed=5, exit_every=True)
    p, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
    start = place(p, np.minimum(4, p.n_levels))
    scorer = _MoveScorer(p, start.levels, start.placement)
    assert scorer.moves(1) is not None and scorer.moves(2) is None
    scored: list[int] = []
    real = _MoveScorer.window
    monkeypatch.setattr(_MoveScorer, "window", lambda self, a, w: scored.append(a) or real(self, a, w))
    heuristic._best_window_move(p, scorer, start.levels, 2, np.inf)
    assert scored == list(range(p.n_exits - 1))
    scored.clear()
    move, score = heuristic._best_window_move(p, scorer, start.levels, 2, np.inf, stop_at=0.0)     # time is up
    assert scored == [] and move is None and score == np.inf


def test_dispatch_costs_are_charged_and_an_older_profile_is_refused():
    """A call per sub-segment and a decision per exit head evaluated (build_problem's docstring): the heads
    carry both, the final block and every hop one call, a hop also the mean of its two ends' round trips; a
    profile without those entries is a clear error."""
    case = synthetic_case(6, 3, 3, 2, 60, seed=4, dispatch_ms=(0.25, 0.5, 1.0))
    free = synthetic_case(6, 3, 3, 2, 60, seed=4)
    c = Constraints(accuracy_drop=0.05)
    with_dispatch, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
    without, _ = build_problem(free.chain, free.calibration, free.profile, free.topology, c)
    np.testing.assert_allclose(with_dispatch.head_ms, np.maximum(without.head_ms - 0.25, 0) + 0.5 + 0.25)
    np.testing.assert_allclose(with_dispatch.block_ms[:, :-1], np.maximum(without.block_ms[:, :-1] - 0.25, 0))
    np.testing.assert_allclose(with_dispatch.block_ms[:, -1], np.maximum(without.block_ms[:, -1] - 0.25, 0) + 0.25)
    hop = with_dispatch.cut_ms - without.cut_ms          # round trips of 1.0 and 2.0 ms at the two ends
    assert np.allclose(hop[0, 1], 1.5 + 0.25) and np.allclose(hop[1, 0], 1.5 + 0.25) and np.allclose(hop[0, 0], 0)
    for item in ("call", "rpc"):
        older = dataclasses.replace(case.profile, entries=tuple(m for m in case.profile.entries if m.item != item))
        with pytest.raises(DistreeError, match="lack the call, decide and rpc entries"):
            build_problem(case.chain, case.calibration, older, case.topology, c)


def test_a_sub_segment_pays_the_call_of_the_backend_that_takes_least_time_over_the_blocks():
    """ONNX Runtime wins every block but one by a hair and loses that one by far: TVM is what the compiler will
    mostly ship, so its call is charged (counting blocks won charged ORT's)."""
    case = synthetic_case(6, 3, 3, 2, 60, seed=4, dispatch_ms=(0.25, 0.5, 1.0))
    ort = []
    for m in case.profile.entries:
        if m.item.startswith("block:"):
            ms = m.median_ms + 100.0 if m.item == "block:0" else m.median_ms * 0.99
            ort.append(dataclasses.replace(m, backend="ort", median_ms=ms, p90_ms=ms))
        elif m.item == "call":
            ort.append(dataclasses.replace(m, backend="ort", median_ms=0.9, p90_ms=0.9))
    both = dataclasses.replace(case.profile, entries=case.profile.entries + tuple(ort))
    c = Constraints(accuracy_drop=0.05)
    tvm_only, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
    mixed, _ = build_problem(case.chain, case.calibration, both, case.topology, c)
    # heads are timed with TVM only, so they differ exactly by the call charged with each (0.25 vs ORT's 0.9)
    np.testing.assert_allclose(mixed.head_ms, tvm_only.head_ms)


def test_the_favourite_backend_is_the_cheaper_segment_and_its_blocks_are_charged():
    """ONNX Runtime's blocks are 20% faster inside a segment but its call costs 5 ms: on dev0 (30 ms of blocks) its
    segment is cheaper, on dev1 (5.5 ms) TVM's is; summing each block's standalone time, call and all, would have
    chosen TVM on both. The plan charges the favourite's own blocks."""
    case = synthetic_case(6, 3, 3, 2, 60, seed=4, dispatch_ms=(0.25, 0.5, 1.0))
    ort = []
    for m in case.profile.entries:
        if m.item.startswith("block:"):
            ms = 0.8 * (m.median_ms - 0.25) + 5.0
            ort.append(dataclasses.replace(m, backend="ort", median_ms=ms, p90_ms=ms))
        elif m.item == "call":
            ort.append(dataclasses.replace(m, backend="ort", median_ms=5.0, p90_ms=5.0))
    both = dataclasses.replace(case.profile, entries=case.profile.entries + tuple(ort))
    assert [favourite_backend(both, dev, 6) for dev in ("dev0", "dev1")] == ["ort", "tvm"]
    c = Constraints(accuracy_drop=0.05)
    tvm_only, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
    mixed, _ = build_problem(case.chain, case.calibration, both, case.topology, c)
    np.testing.assert_allclose(mixed.block_ms[0, :-1], 0.8 * tvm_only.block_ms[0, :-1])
    np.testing.assert_allclose(mixed.block_ms[1], tvm_only.block_ms[1])


def _first_stage(placement: np.ndarray) -> tuple[int, int]:
    """(device, last block) of a placement's first stage: the class it belongs to."""
    changes = np.nonzero(np.diff(placement))[0]
    return int(placement[0]), int(changes[0]) if len(changes) else len(placement) - 1


def _plans_by_first_stage(problem) -> dict[tuple[int, int], dict[tuple[int, ...], float]]:
    """Every feasible plan's total (sum over samples) by (device, last block) of its first stage and levels: the
    cheapest placement of each class for each configuration."""
    by_stage: dict[tuple[int, int], dict[tuple[int, ...], float]] = {}
    for pl in all_placements(problem.n_blocks, problem.n_devices, problem.free_order):
        for levels in all_configurations(problem.n_levels):
            ev = evaluate(problem, levels, pl)
            if ev.feasible:
                own = by_stage.setdefault(_first_stage(pl), {})
                key = tuple(int(x) for x in levels)
                own[key] = min(own.get(key, np.inf), ev.expected_ms * problem.n_samples)
    return by_stage


def _best_below(by_stage, cls: StageClass, levels: tuple[int, ...]) -> float:
    """The best plan whose placement is in ``cls`` and whose levels start with ``levels`` (inf: none)."""
    return min((v for (d, last), own in by_stage.items() for k, v in own.items()
                if d == cls.device and cls.first_end <= last <= cls.last_end and k[:len(levels)] == levels),
               default=np.inf)


def _enumerable_class_problems(seeds):
    """(seed, problem) of the random instances on several devices small enough to enumerate every configuration
    times every placement."""
    for seed in seeds:
        _, _, problem = _random_problem(seed)
        if problem.n_exits == 0 or problem.n_devices == 1:
            continue
        configs = all_configurations(problem.n_levels)
        if len(configs) * len(all_placements(problem.n_blocks, problem.n_devices, problem.free_order)) <= 3000:
            yield seed, problem


def _every_class_node(problem):
    """(search, node, split) for every node a search over placement classes can create: roots, children, and a
    node split into the classes partitioning its own (``split``: this one is); nothing pruned."""
    classes = PlacementClasses(problem)
    searches: dict[StageClass, _Search] = {}
    search = lambda cls: searches.setdefault(cls, _Search(problem, None, classes.tables(cls), None, cls))  # noqa: E731
    stack = [(cls, node) for cls in classes.roots() for node in search(cls).root()]
    while stack:
        cls, node = stack.pop()
        parts = classes.split(cls, node.depth)
        yield search(cls), node, bool(parts)
        if parts:
            stack.extend((part, kid) for part in parts for kid in search(part).rebound(node, None))
        elif node.depth < problem.n_exits:
            stack.extend((cls, kid) for kid in search(cls).children(node))


def test_placement_class_bounds_never_exceed_the_best_plan_of_their_class():
    """Every node a search over placement classes can create (roots, children, and a node split into the classes
    partitioning its own, nothing pruned) bounds at most the best feasible plan whose placement is in the node's
    class and whose levels start with the node's, by enumerating every configuration and placement; the forest
    finishes at the exhaustive optimum, and a stopped one keeps a valid bound."""
    checked = exact = split = 0
    for seed in range(120):
        case, c, problem = _random_problem(seed)
        if problem.n_exits == 0 or problem.n_devices == 1:
            continue
        ref = brute_force(problem)
        forest = branch_and_bound(problem, None, 20.0, best_first=seed % 2 == 0, classes=PlacementClasses(problem))
        assert forest.complete, seed
        if np.isfinite(ref.expected_ms):
            assert forest.best.expected_ms == pytest.approx(ref.expected_ms, rel=1e-7, abs=1e-9), seed
            exact += 1
        else:
            assert forest.best is None
        stopped = branch_and_bound(problem, None, 0.002, best_first=True, classes=PlacementClasses(problem))
        assert stopped.bound <= ref.expected_ms * (1 + 1e-9) + 1e-12, seed
    for seed, problem in _enumerable_class_problems(range(120)):
        by_stage = _plans_by_first_stage(problem)
        for search, node, parts in _every_class_node(problem):
            cls = search.stage_class
            assert node.bound <= _best_below(by_stage, cls, node.levels) * (1 + 1e-9) + 1e-9, (seed, cls, node.levels)
            checked += 1
            split += parts
    assert exact >= 40 and split >= 300 and checked >= 3000, (exact, split, checked)


def _with_a_dear_return(problem, rng):
    """``problem`` with one device's return made dear enough that returns break the triangle (carrying a sample on
    and returning from another device is cheaper), or None where the raise leaves the triangle whole."""
    returns = problem.return_ms.copy()
    returns[rng.integers(problem.n_devices)] += rng.uniform(0.5, 5.0) * (problem.block_ms.mean() + 0.1)
    dear = dataclasses.replace(problem, return_ms=returns)
    return None if bnb._returns_obey_triangle(dear) else dear


def test_the_chain_bound_never_exceeds_the_best_plan_below_a_node_and_often_beats_the_windows(monkeypatch):
    """The chain bound (:mod:`distree.solver.chain`) at every node of every placement class of the small random
    instances where it applies (each stage a later device), as drawn and with one device's return made dear
    (returns breaking the triangle, as the synthetic benchmark's links do), over all levels and over the node's
    narrowed ones, with accuracy priced at several multipliers (0 to 4x the class's root one): never above the
    best plan below the node in its class (every configuration and placement enumerated), and above the node's
    own bound at thousands of them; over every placement (a tree not split into classes), never above the best
    plan below the node nor the class's value; looking fewer exits ahead (``horizon``), never above its value
    looking at all (and below it at thousands); the children's values in one pass (``chain_bounds_by_level``, what
    a tree's children get) each equal to its own; a tree using it, split into classes or not, looking at every
    later exit or only the next, proves the optimum."""
    checked = tighter = broken = cut = by_level = 0
    rng = np.random.default_rng(0)
    for seed, drawn in _enumerable_class_problems(range(120)):
        if drawn.free_order:
            continue
        dear = _with_a_dear_return(drawn, rng)
        broken += dear is not None
        for problem in (drawn, dear) if dear is not None else (drawn,):
            by_stage = _plans_by_first_stage(problem)
            n = problem.n_samples
            optimum = min((v for own in by_stage.values() for v in own.values()), default=np.inf) / n
            for horizon, classes in itertools.product((99, 1), (PlacementClasses(problem), None)):
                monkeypatch.setattr(bnb, "CHAIN_HORIZON", horizon)
                chained_tree = Tree(problem, None, best_first=True, classes=classes, chain=True).run(60.0)
                assert chained_tree.bound <= optimum * (1 + 1e-9) + 1e-12, seed
                if classes is None and problem.deadline_ms is not None:
                    continue                    # leaves priced by a bound only: the undivided tree cannot finish
                assert chained_tree.complete and chained_tree.bound == pytest.approx(optimum, rel=1e-9), seed
                assert chained_tree.best is None if optimum == np.inf else \
                    chained_tree.best.expected_ms == pytest.approx(optimum, rel=1e-9), seed
            everywhere = chain_tables(problem, None)          # a tree not split into classes
            best_anywhere = lambda levels: min((v for own in by_stage.values() for k, v in own.items()  # noqa: E731
                                                if k[:len(levels)] == tuple(levels)), default=np.inf)
            for search, node, _ in _every_class_node(problem):
                if node.depth == problem.n_exits:
                    continue
                chained = chain_tables(problem, search.stage_class)
                narrowed = search.narrow(node)
                best = _best_below(by_stage, search.stage_class, tuple(node.levels))
                if narrowed is None:                # short of right answers: nothing below it
                    assert best == np.inf, (seed, search.stage_class, node.levels)
                    continue
                kids = search.children(node) if node.depth + 1 < problem.n_exits else []
                for limits in {id(x): x for x in (search.all_levels, narrowed.limits) if x is not None}.values():
                    for horizon in (99, 1):     # the children's in one pass: each child's own value, exactly
                        args = search._chain_args(limits, search.tables.lam, chained, search.stage_class.device,
                                                  horizon)
                        together = chain_bounds_by_level(node.packed, np.asarray(node.levels, dtype=np.int64),
                                                         np.array([k.levels[-1] for k in kids], dtype=np.int64),
                                                         *args) if kids else []
                        for kid, value in zip(kids, together):
                            alone = chain_bound(kid.packed, np.asarray(kid.levels, dtype=np.int64), *args)
                            assert value == pytest.approx(alone, rel=1e-12, abs=1e-9), (seed, kid.levels)
                            by_level += 1
                    for factor in (0.0, 0.5, 1.0, 2.0, 4.0):
                        lam = factor * search.tables.lam
                        value = search.chain_value(node, limits, lam, chained, search.stage_class.device, 99)
                        assert value <= best * (1 + 1e-9) + 1e-9, (seed, search.stage_class, node.levels, factor)
                        checked += 1
                        tighter += value > node.bound * (1 + 1e-9) + 1e-9
                        anywhere = search.chain_value(node, limits, lam, everywhere, -1, 99)
                        assert anywhere <= min(value, best_anywhere(node.levels)) * (1 + 1e-9) + 1e-9, seed
                        for horizon in (1, 2):      # nearer horizons: a weaker bound, never a stronger one
                            near = search.chain_value(node, limits, lam, chained, search.stage_class.device,
                                                      horizon)
                            assert near <= value * (1 + 1e-9) + 1e-9, (seed, node.levels, factor, horizon)
                            cut += near < value * (1 - 1e-9) - 1e-9
    assert broken >= 30 and checked >= 15000 and tighter >= 5000 and cut >= 3000 and by_level >= 5000, \
        (broken, checked, tighter, cut, by_level)


def test_the_tied_relaxation_of_the_node_benchmark_never_exceeds_the_best_plan_below_a_node(monkeypatch):
    """``benchmarks/solver_node_relaxations.py`` argues from the value of its tied relaxation (shared levels, each
    survivor leaving only where the chosen level admits it, the order-free accuracy relaxation on the same levels)
    that the nodes holding the ResNet-110 bound are dead; that is only so if it is a valid bound. At every node of
    every placement class of the small random instances, solved exactly by HiGHS, it is at most the best plan
    below the node, and above the node's own bound at hundreds of them."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from solver_node_relaxations import tied_relaxation

    checked = tighter = 0
    for seed, problem in _enumerable_class_problems(range(120)):
        by_stage = _plans_by_first_stage(problem)
        for search, node, _ in _every_class_node(problem):
            if node.depth == problem.n_exits:
                continue
            model, const = tied_relaxation(problem, search, node, search.all_levels)
            model.h.run()
            status = model.h.modelStatusToString(model.h.getModelStatus())
            assert status in ("Optimal", "Infeasible"), (seed, status)
            value = const + model.h.getInfo().objective_function_value if status == "Optimal" else np.inf
            best = _best_below(by_stage, search.stage_class, node.levels)
            assert value <= best * (1 + 1e-7) + 1e-7, (seed, search.stage_class, node.levels, value, best)
            checked += 1
            tighter += value > node.bound * (1 + 1e-7) + 1e-7
    assert checked >= 2500 and tighter >= 200, (checked, tighter)


def test_the_frontier_benchmark_searches_the_node_it_walks_to_and_proves_only_true_multipliers(monkeypatch):
    """``benchmarks/solver_node_frontier.py`` reads a node's latency-accuracy frontier off fresh trees walked down to
    the node's levels and placement class and searched from it alone, with the need lowered, and from those values
    the smallest multiplier at which the exact Lagrangian provably reaches the plan. On the small random instances,
    at the open nodes of a short tree and with the need as given and lowered: each search ends at the best plan
    below the node in its class (every configuration and placement enumerated), or finds the node short where none
    exists; and wherever a multiplier is called proven, the node's Lagrangian at it, enumerated, reaches the plan."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from solver_node_frontier import in_class_ms, proven_lagrangian, restricted_tree

    searched = proven = 0
    for seed, problem in _enumerable_class_problems(range(60)):
        n, need = problem.n_samples, problem.required_correct
        optimum = branch_and_bound(problem, None, 60.0, best_first=True, classes=PlacementClasses(problem))
        if optimum.best is None:
            continue
        grown = Tree(problem, None, best_first=True, classes=PlacementClasses(problem))
        reached, stack = [], [(i, node) for _, _, i, node in grown.open]
        while stack:                            # every node the tree's expansion makes, nothing pruned
            i, node = stack.pop()
            reached.append((grown.searches[i].stage_class, tuple(node.levels)))
            narrowed = grown.searches[i].narrow(node)
            if narrowed is not None and node.depth < problem.n_exits:
                stack.extend(grown.kids(i, narrowed) or [])
        rng = np.random.default_rng(seed)
        nodes = [reached[k] for k in rng.choice(len(reached), size=min(6, len(reached)), replace=False)]
        deficits = sorted({d for d in (-3, -1, 0, 1, 3, need) if 0 <= need - d <= n})
        by_deficit = {d: _plans_by_first_stage(dataclasses.replace(problem, required_correct=need - d))
                      for d in deficits}
        for cls, levels in nodes:
            values = {}
            for d, by_stage in by_deficit.items():
                walked = restricted_tree(dataclasses.replace(problem, required_correct=need - d), levels, cls)
                best = _best_below(by_stage, cls, levels) / n
                if walked is None:
                    assert best == np.inf, (seed, cls, levels, d)
                    values[d] = np.inf
                    continue
                result = walked[0].run(60.0)
                assert result.complete, (seed, cls, levels, d)
                values[d] = in_class_ms(problem, result.bound)
                assert values[d] == pytest.approx(best, rel=1e-9), (seed, cls, levels, d)
                searched += 1
            lam = proven_lagrangian(optimum.best.expected_ms, values, need, n)
            if lam is None:
                continue
            free = dataclasses.replace(problem, required_correct=0)
            for pl in all_placements(problem.n_blocks, problem.n_devices, problem.free_order):
                device, last = _first_stage(pl)
                if device != cls.device or not cls.first_end <= last <= cls.last_end:
                    continue
                for config in all_configurations(problem.n_levels):
                    if tuple(int(x) for x in config[:len(levels)]) != levels:
                        continue
                    ev = evaluate(free, config, pl)
                    if ev.feasible:
                        assert ev.expected_ms - lam * (ev.correct - need) / n >= optimum.best.expected_ms - 1e-9, \
                            (seed, cls, levels, lam)
            proven += 1
    assert searched >= 700 and proven >= 100, (searched, proven)


def test_a_tree_run_in_pieces_searches_as_one_run_does():
    """A solve runs its tree over placement classes briefly, kicks the plan, then lets the same tree go on
    (Tree): run in slices of ~64 nodes (run afresh, each slice would search the same first nodes again and never
    finish), it finishes at the plan one run proves, within the nodes that run takes (a run also counts the
    pruned nodes it pops after the last live one), with a valid bound whenever stopped; a better plan offered
    between slices is taken."""
    for seed in range(3):
        case = synthetic_case(12, 11, 4, 3, 600, seed=seed, exit_every=True)
        problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
        whole = branch_and_bound(problem, None, 60.0, best_first=True, classes=PlacementClasses(problem))
        assert whole.complete and whole.best is not None and whole.nodes > 1000, (seed, whole.nodes)
        tree = Tree(problem, None, best_first=True, classes=PlacementClasses(problem))
        assert tree.run(0.0).nodes == 0                # stops before its first node
        for slices in range(1, 10_000):
            piece = tree.run(1e-4)                     # the time is checked every 64 nodes
            assert piece.bound <= whole.best.expected_ms * (1 + 1e-9), seed
            if piece.complete:
                break
        assert piece.complete and slices > 5 and piece.nodes <= whole.nodes, (seed, slices)
        assert piece.best.expected_ms == pytest.approx(whole.best.expected_ms, rel=1e-9), seed
        offered = Tree(problem, None, best_first=True, classes=PlacementClasses(problem))
        offered.run(0.0)
        assert offered.run(60.0, incumbent=whole.best).best is whole.best    # nothing below it to find


def test_a_retuned_multiplier_bounds_the_lowest_open_nodes_highest_and_the_tree_stays_exact(monkeypatch):
    """Best first retunes the multiplier pricing accuracy (each search's root best times a factor) to the factor
    under which the lowest open nodes bound highest: every search then prices at it, searches made later too, and
    trees retuned early and often still bound below the brute-force optimum and prove it."""
    monkeypatch.setattr(bnb, "RETUNE_AT", 10)
    monkeypatch.setattr(bnb, "RETUNE_GROWTH", 2)
    retuned, moved = 0, 0
    real = Tree._retune

    def checked(tree: Tree) -> None:
        nonlocal retuned, moved
        lowest = sorted(tree.open)[:bnb.RETUNE_NODES]
        real(tree)
        if not lowest:
            return
        cutoff = tree._cutoff()
        score = {f: sum(min(tree.searches[i].bound_at(node, f), cutoff) for _, _, i, node in lowest)
                 for f in bnb.MULTIPLIER_FACTORS}
        assert score[tree.multiplier_factor] == max(score.values())
        assert all(s.lam == tree.multiplier_factor * s.tables.lam for s in tree.searches)
        retuned += 1
        moved += tree.multiplier_factor != 1.0

    monkeypatch.setattr(Tree, "_retune", checked)
    for seed in range(40):
        case, c, problem = _random_problem(seed)
        ref = brute_force(problem).expected_ms
        classes = PlacementClasses(problem) if seed % 2 else None
        tree = Tree(problem, None, best_first=True, classes=classes)
        result = tree.run(60.0)
        assert result.bound <= ref * (1 + 1e-9) + 1e-12, seed
        assert result.complete and (result.best is None) == (not np.isfinite(ref)), seed
        if np.isfinite(ref):
            assert result.best.expected_ms == pytest.approx(ref, rel=1e-9), seed
        if classes is not None and tree.multiplier_factor != 1.0:
            late = StageClass(device=0, first_end=0, last_end=problem.n_blocks - 1)
            s = tree.searches[tree._search_of(late)]
            assert s.lam == tree.multiplier_factor * s.tables.lam, seed
    assert retuned >= 20 and moved >= 5, (retuned, moved)


def test_a_node_dropped_for_its_twin_has_no_completion_better_than_the_twins():
    """Walking every node of the whole tree best first (nothing pruned by bound) and dropping each one ``twin_of``
    names a twin for, as the tree does: no dropped node has a completion better than its twin's best, each completion
    priced exactly (the configuration's best placement, memory and accuracy checked), and the leaves still reached
    hold the optimum; many twins have fewer survivors than the node they drop. Where returns do not obey the
    triangle, no node is dropped."""
    pairs = fewer = violated = 0
    for seed in range(24):
        rng = np.random.default_rng(seed)
        case = synthetic_case(n_blocks=int(rng.integers(6, 10)), n_exits=int(rng.integers(5, 7)),
                              n_levels=int(rng.integers(2, 4)), n_devices=int(rng.integers(1, 4)),
                              n_samples=int(rng.integers(15, 40)), seed=seed,
                              memory_slack=float(rng.uniform(0.9, 3.0)))
        problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology,
                                   Constraints(accuracy_drop=float(rng.choice([0.0, 0.03, 0.08]))))
        dear_first = np.where(np.arange(problem.n_devices) == 0, 100.0, 0.0)     # breaks it where D > 1
        problem = problem.replace(return_ms=dear_first if seed % 4 == 0 else np.zeros(problem.n_devices))
        configs = list(itertools.product(*(range(int(k) + 1) for k in problem.n_levels)))
        best_below: dict[tuple, float] = {}
        for config in configs:
            found = place(problem, np.array(config))
            cost = found.expected_ms if found is not None and found.feasible else np.inf
            for d in range(problem.n_exits + 1):
                best_below[config[:d]] = min(best_below.get(config[:d], np.inf), cost)
        search = _Search(problem, None, None, None)
        order = itertools.count()
        heap, reached = [(node.bound, next(order), node) for node in search.root()], np.inf
        survivors: dict[tuple, bytes] = {}
        while heap:             # best first, as the tree: a twin that exits more samples earlier tends to come first
            _, _, node = heapq.heappop(heap)
            twin = search.twin_of(node)
            if twin is not None:
                pairs += 1
                fewer += survivors[twin] != node.packed.tobytes()
                assert best_below[twin] <= best_below[node.levels] * (1 + 1e-9) + 1e-12, (seed, node.levels, twin)
                continue
            survivors[node.levels] = node.packed.tobytes()
            if node.depth == problem.n_exits:
                reached = min(reached, best_below[node.levels])
            else:
                for child in search.children(node):
                    heapq.heappush(heap, (child.bound, next(order), child))
        assert reached == best_below[()], seed
        if not bnb._returns_obey_triangle(problem):
            violated += 1
            assert search.twin_keys_left == 0 and not search.popped, seed
    assert pairs >= 600 and fewer >= 500 and violated >= 3, (pairs, fewer, violated)


def test_dives_hand_the_tree_the_best_plan_a_local_search_finds_from_its_open_nodes(monkeypatch):
    """Tree.dive starts a local search from each prefix of its lowest open nodes (trailing exits off dropped, every
    later exit off), shortest prefixes first and in bound order within a length, each once; the best plan found, if
    better than the tree's, becomes its plan (feasible); it stops after DIVE_PATIENCE fruitless dives in a row, and
    the tree goes on from there to the optimum it proves without diving."""
    def instance(size, seed):
        case = synthetic_case(*size, seed=seed, exit_every=True)
        problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology,
                                   Constraints(accuracy_drop=0.02))
        return problem, place(problem, np.zeros(problem.n_exits, dtype=int))        # no exit at all: a poor plan

    def searched(problem, start):
        found = local_search(problem, starts=[np.array(start + (0,) * (problem.n_exits - len(start)), dtype=int)])
        return np.inf if found is None else found.expected_ms

    def starts(nodes):
        """Each node's prefixes, shortest first, without their trailing zeros (the rest is off anyway), once."""
        order = []
        for length in range(1, 1 + max((n.depth for n in nodes), default=0)):
            for n in nodes:
                cut = list(n.levels[:length])
                while cut and cut[-1] == 0:
                    cut.pop()
                if len(cut) == length and tuple(cut) not in order:
                    order.append(tuple(cut))
        return order

    improved = 0
    monkeypatch.setattr(bnb, "DIVE_PATIENCE", 1000)
    monkeypatch.setattr(bnb, "DIVES_LISTED", 8)
    for seed in (0, 3, 4, 5, 6):
        problem, poor = instance((14, 10, 4, 2, 400), seed)
        tree = Tree(problem, poor, best_first=True)
        before = tree.run(1e-4).best.expected_ms      # 64 nodes (time is checked every 64); its leaves may have
        #                                               found better already
        lowest = [node for _, _, _, node in heapq.nsmallest(8, tree.open)]
        assert len(lowest) == 8 and max(n.depth for n in lowest) >= 2, seed
        tree.dive(60.0)
        assert list(tree.dived) == starts(lowest), seed
        assert all(ms == searched(problem, start) for start, ms in tree.dived.items()), seed
        assert tree.best.expected_ms == pytest.approx(min(min(tree.dived.values()), before), rel=1e-12), seed
        assert evaluate(problem, tree.best.levels, tree.best.placement).feasible
        improved += tree.best.expected_ms < before - 1e-9
    assert improved >= 3
    monkeypatch.setattr(bnb, "DIVE_PATIENCE", 2)
    monkeypatch.setattr(bnb, "DIVES_LISTED", 256)
    stopped = 0
    for seed in range(3):
        problem, poor = instance((12, 8, 4, 2, 300), seed)
        without = branch_and_bound(problem, poor, 60.0, best_first=True)
        tree = Tree(problem, poor, best_first=True)
        best = tree.run(1e-4).best.expected_ms
        expected, fruitless = [], 0           # the patience rule, replayed over the starts in order
        for start in starts([node for _, _, _, node in heapq.nsmallest(256, tree.open)]):
            if fruitless >= 2:
                break
            expected.append(start)
            found = searched(problem, start)
            fruitless = 0 if found < best - 1e-9 else fruitless + 1
            best = min(best, found)
        tree.dive(60.0)
        assert list(tree.dived) == expected and tree.best.expected_ms == pytest.approx(best, rel=1e-12), seed
        stopped += len(expected) < len(starts([node for _, _, _, node in tree.open]))
        proof = tree.run(60.0)
        assert without.complete and proof.complete
        assert proof.best.expected_ms == pytest.approx(without.best.expected_ms, rel=1e-9), seed
    assert stopped >= 1


def test_a_tree_dealt_to_forked_workers_proves_what_one_process_proves(monkeypatch):
    """run_tree with jobs > 1 grows the tree here until every worker can be dealt nodes, forks, and merges: it
    proves the optimum one process proves (from no plan at all: the workers find plans and share them), and
    stopped early its bound stays below the optimum; nothing is left open in this process afterwards."""
    forked = []
    original = parallel._run_forked
    monkeypatch.setattr(parallel, "_run_forked", lambda *a: forked.append(a[2]) or original(*a))
    for seed in (1, 2):
        case = synthetic_case(16, 15, 4, 3, 800, seed=seed, exit_every=True)     # 25-50k nodes, 2 s alone
        problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
        whole = branch_and_bound(problem, None, 60.0, best_first=True, classes=PlacementClasses(problem))
        assert whole.complete and whole.nodes > 20_000, (seed, whole.nodes)
        for jobs in (2, 3):
            tree = Tree(problem, None, best_first=True, classes=PlacementClasses(problem))
            dealt = run_tree(tree, 60.0, jobs=jobs)
            assert dealt.complete and dealt.best.expected_ms == pytest.approx(whole.best.expected_ms, rel=1e-9)
            assert dealt.bound == pytest.approx(whole.best.expected_ms, rel=1e-9) and not tree.open, seed
            assert dealt.classes >= 1 and dealt.nodes >= 0.5 * whole.nodes, (seed, dealt.nodes, whole.nodes)
            assert dealt.workers == jobs
        # stopped after a tenth of what one process needs here (2-3 s): what the workers left open caps the bound.
        # With the optimum known, a proof expands every node below it in any order: so many nodes it must take
        proof = branch_and_bound(problem, whole.best, 60.0, best_first=True, classes=PlacementClasses(problem))
        stopped = run_tree(Tree(problem, whole.best, best_first=True, classes=PlacementClasses(problem)), 0.3,
                           jobs=2)
        if stopped.complete:        # only on a machine ~10x faster than this 2-core VM
            assert stopped.nodes >= 0.9 * proof.nodes, (seed, stopped.nodes, proof.nodes)
            assert stopped.bound == pytest.approx(whole.best.expected_ms, rel=1e-9), seed
        else:
            assert stopped.bound < whole.best.expected_ms, seed
        assert stopped.best.expected_ms == pytest.approx(whole.best.expected_ms, rel=1e-9)
    assert forked == [2, 3, 2] * 2, forked


def test_side_by_side_runs_one_part_in_a_worker_and_returns_both():
    """side_by_side: on two cores ``there`` runs in a forked worker while ``here`` runs in this process, and both
    results come back (a local search's plan as it finds alone); then, while the worker still runs, ``then`` is
    called on what ``here`` returned until it says it is done (a solve grows its tree so); on one core both run
    here, one after the other, and ``then`` is not called."""
    import time
    case = synthetic_case(12, 8, 4, 2, 300, seed=1, exit_every=True)
    problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
    alone = local_search(problem)
    for jobs in (1, 2):
        here, slices = [], []
        (searched_in, found), screened = parallel.side_by_side(
            lambda: (time.sleep(0.5), os.getpid(), local_search(problem))[1:],
            lambda: here.append(os.getpid()) or "screened", 60.0, jobs,
            then=lambda screened: slices.append(screened) or len(slices) < 3)
        assert screened == "screened" and here == [os.getpid()]
        assert slices == (["screened"] * 3 if jobs == 2 else []), jobs
        assert (searched_in == os.getpid()) == (jobs == 1), jobs
        assert found.expected_ms == alone.expected_ms and np.array_equal(found.levels, alone.levels)


def test_forked_workers_see_each_others_plans():
    """A plan one worker finds is the others' cutoff from their next sync, and the parent receives it."""
    share = parallel.Share(best_total=np.inf, bound_total=90.0, jobs=2, n_samples=100)
    assert share.proven_total() == 90.0                 # what the tree had proven when it forked
    plan = Candidate(levels=np.array([1, 0]), placement=np.array([0, 0, 1]), expected_ms=2.5, feasible=True)
    worker = multiprocessing.get_context("fork").Process(target=share.found, args=(plan,))
    worker.start()
    worker.join()
    assert worker.exitcode == 0
    assert share.sync(proven_total=0.0) == 250.0
    found = share.plans_found()
    assert [f.expected_ms for f in found] == [2.5] and found[0].placement.tolist() == [0, 0, 1]
    assert share.proven_total() == 0.0                  # this worker's (index 0) bound, published by sync


@pytest.mark.parametrize("death, said", [
    (lambda: os._exit(3), "exit code 3, before reporting"),
    (lambda: os.kill(os.getpid(), signal.SIGKILL), r"exit code -9 \(SIGKILL: out of memory\?\), before reporting"),
])
def test_a_forked_worker_that_dies_is_an_error_not_a_silent_gap(monkeypatch, death, said):
    """A worker that crashes, or that the kernel's out-of-memory killer ends, is a one-line error saying what to
    do, never a bound from the workers that happened to survive."""
    case = synthetic_case(16, 15, 4, 3, 800, seed=1, exit_every=True)
    problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
    tree = Tree(problem, None, best_first=True, classes=PlacementClasses(problem))
    here, children = os.getpid(), _Search.children

    def dies_in_a_worker(self, node):
        if os.getpid() != here:
            death()
        return children(self, node)

    monkeypatch.setattr(_Search, "children", dies_in_a_worker)
    with pytest.raises(DistreeError, match=rf"worker distree-bnb-\d died, {said}; run with fewer --jobs"):
        run_tree(tree, 10.0, jobs=2)


def test_kicks_on_cores_are_the_best_of_one_seed_a_core(monkeypatch):
    """Kicks on N cores give what the best of seeds 0 .. N-1 gives run one after another (each stalls before its
    time here, so both are repeatable): on this instance seed 2 finds a better plan than seeds 0 and 1; on one
    core, seed 0's. A kicks worker that dies is a one-line error, as a tree worker's is."""
    case = synthetic_case(20, 12, 4, 2, 400, seed=10)
    problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology,
                               Constraints(accuracy_drop=0.01))
    start = local_search(problem)
    alone = [iterated_local_search(problem, start, time_limit_s=60.0, seed=k) for k in range(3)]
    assert alone[2].expected_ms < min(alone[0].expected_ms, alone[1].expected_ms)
    assert kicks_on_cores(problem, start, 60.0, 1).expected_ms == alone[0].expected_ms
    side_by_side = kicks_on_cores(problem, start, 60.0, 3)
    assert side_by_side.expected_ms == alone[2].expected_ms and np.array_equal(side_by_side.levels, alone[2].levels)
    here = os.getpid()

    def dies_in_a_worker(*args, **kwargs):
        if os.getpid() != here:
            os._exit(3)
        return iterated_local_search(*args, **kwargs)

    monkeypatch.setattr(parallel, "iterated_local_search", dies_in_a_worker)
    with pytest.raises(DistreeError, match=r"local-search worker distree-kicks-\d died, exit code 3, before "
                                           r"reporting; run with fewer --jobs"):
        kicks_on_cores(problem, start, 5.0, 2)


def test_a_solve_on_two_cores_grows_its_tree_while_one_core_kicks(monkeypatch, tmp_path):
    """Where the best-first tree follows the kicks, a solve on N >= 2 cores kicks in N - 1 forked workers (seeds
    0 .. N - 2) while the same tree grows in this process as they run, and the best kicked plan is the tree's
    from then on; on one core the kicks run here with nothing beside them."""
    import time
    case = synthetic_case(55, 54, 8, 3, 300, seed=1, exit_every=True)
    log = tmp_path / "kicks.log"
    real_kicks, real_run = iterated_local_search, Tree.run

    def kicks(*args, **kwargs):
        began = time.time()
        found = real_kicks(*args, **kwargs)
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {began} {time.time()} {found.expected_ms!r}\n")
        return found

    runs = []

    def run(tree, *args, **kwargs):
        began = time.time()
        result = real_run(tree, *args, **kwargs)
        runs.append((os.getpid(), began, time.time()))
        return result

    monkeypatch.setattr(parallel, "iterated_local_search", kicks)
    monkeypatch.setattr(Tree, "run", run)
    for jobs in (3, 2, 1):
        log.write_text("")
        runs.clear()
        plan = solve(case.chain, case.calibration, case.profile, case.topology,
                     Constraints(accuracy_drop=0.01, time_limit_s=6.0, jobs=jobs))
        kicked = [(int(a), float(b), float(c), float(d))
                  for a, b, c, d in (line.split() for line in log.read_text().splitlines())]
        assert len(kicked) == max(1, jobs - 1), (jobs, kicked)
        assert plan.expected_latency_ms <= min(ms for _, _, _, ms in kicked) * (1 + 1e-9), jobs
        for pid, began, ended, _ in kicked:
            beside = [max(0.0, min(ended, r_end) - max(began, r_began)) for _, r_began, r_end in runs]
            if jobs > 1:        # a tree run here while the kicks ran (before, a tree ran only after them)
                assert pid != os.getpid() and all(r_pid == os.getpid() for r_pid, _, _ in runs)
                assert max(beside) > 0, (jobs, beside, ended - began)
            else:
                assert pid == os.getpid() and max(beside) == 0, beside


def test_the_tree_beside_the_kicks_goes_on_to_every_core_once_they_end(monkeypatch):
    """Kicks that stall early (here: at once, as after 100 fruitless kicks, and with no dives before them) hand their
    core back: the tree beside them stops within a slice and goes on in forked workers on both cores, long before
    the kicks' share of the limit (here half of it) is over: it used to grow on one core for all of it."""
    import time
    solve_module = importlib.import_module("distree.solver.solve")
    case = synthetic_case(55, 54, 8, 3, 300, seed=1, exit_every=True)
    spans, forked = [], []
    real_beside, real_forked = solve_module.kicks_beside, parallel._run_forked

    def beside(p, start, time_limit_s, jobs, step, dive=None):
        began = time.perf_counter()
        found = real_beside(p, start, time_limit_s, jobs, step, dive)
        spans.append((time_limit_s, time.perf_counter() - began))
        return found

    monkeypatch.setattr(parallel, "iterated_local_search", lambda p, start, **kwargs: start)
    monkeypatch.setattr(Tree, "dive", lambda tree, time_limit_s: None)     # the kicks worker's dives: none either
    monkeypatch.setattr(solve_module, "kicks_beside", beside)
    monkeypatch.setattr(solve_module, "CLASS_KICKS_SHARE", 0.5)        # this case's route: placement classes
    monkeypatch.setattr(parallel, "_run_forked", lambda *a: forked.append(a[1]) or real_forked(*a))
    plan = solve(case.chain, case.calibration, case.profile, case.topology,
                 Constraints(accuracy_drop=0.01, time_limit_s=8.0, jobs=2))
    [(share, took)] = spans
    assert share > 3.0 and took < solve_module.TREE_SLICE_S + 0.5, (share, took)
    assert len(forked) == 1 and forked[0] > share, (forked, share)     # the forked tree got the kicks' time
    assert plan.bound_ms is not None and plan.expected_latency_ms > 0


def test_forked_work_returns_as_soon_as_the_last_worker_reports(monkeypatch):
    """Once every worker has reported, the parent does not wait out another poll: it used to wait on an empty list
    of pipes, which sleeps POLL_S (0.2 s past the time limit at each forked phase of a solve: kicks, then tree)."""
    waited, wait = [], multiprocessing.connection.wait
    monkeypatch.setattr(multiprocessing.connection, "wait",
                        lambda pipes, timeout=None: waited.append(len(pipes)) or wait(pipes, timeout))
    assert parallel._forked(lambda k: 10 * k, 2, 1.0, "test", "test", "nothing", None) == [0, 10]
    assert waited and min(waited) > 0


def test_solve_searches_placement_classes_where_they_raise_the_bound(monkeypatch):
    """Where the first stage's placement is what keeps the bound low, every tree a solve searches is over the
    classes (this instance is then proven in ~2 s; one tree over every placement takes 16 s, measured); where it
    is not, no class is built."""
    solve_module = importlib.import_module("distree.solver.solve")
    classes_module = importlib.import_module("distree.solver.classes")
    monkeypatch.setattr(solve_module, "MILP_MAX_ROWS", 10)          # the tree route
    built, original = [], solve_module.placement_classes

    def recording(p, whole, seconds):
        built.append(original(p, whole, seconds))
        return built[-1]

    monkeypatch.setattr(solve_module, "placement_classes", recording)
    searched, tree, forest = [], solve_module.branch_and_bound, solve_module.Tree

    def recording_tree(*args, **kwargs):
        searched.append(kwargs.get("classes") is not None)
        return tree(*args, **kwargs)

    def recording_forest(*args, **kwargs):
        searched.append(kwargs.get("classes") is not None)
        return forest(*args, **kwargs)

    monkeypatch.setattr(solve_module, "branch_and_bound", recording_tree)
    monkeypatch.setattr(solve_module, "Tree", recording_forest)
    case = synthetic_case(30, 8, 4, 3, 500, seed=2)
    c = Constraints(accuracy_drop=0.01, time_limit_s=20)
    plan = solve(case.chain, case.calibration, case.profile, case.topology, c)
    assert len(built) == 1 and built[0] is not None and searched and all(searched)
    problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, c)
    whole = bound_tables(problem)
    assert plan.status == "optimal" and plan.bound_ms == pytest.approx(plan.expected_latency_ms)
    assert re.match(r"proven by branch and bound over \d+ placement classes \(", plan.sol_status), plan.sol_status
    _check_plan(plan, case, c)
    one = synthetic_case(12, 4, 3, 1, 300, seed=2)                   # one device: no classes to search
    alone, _ = build_problem(one.chain, one.calibration, one.profile, one.topology, c)
    assert original(alone, bound_tables(alone), 10.0) is None
    assert original(problem, whole, 10.0) is not None
    monkeypatch.setattr(classes_module, "CLASS_MIN_GAIN", 1.0)      # a gain it does not reach: none built
    assert original(problem, whole, 10.0) is None


def test_a_screen_short_of_time_goes_device_by_device_coarse_to_fine(monkeypatch):
    """When the exact classes do not all fit the screen's time, it goes device by device (the one whose "runs
    everything" class bounds lowest first), every last block coarse to fine (so a failing screen fails early),
    until the time is spent: classes are still found to help where each one screened does; a class as low as the
    whole problem is seen where it comes within the time, whatever the time (no stride that a slower host would
    set to skip it), and not where it comes after (the screen only decides whether classes are worth searching:
    the search stays exact either way)."""
    assert _coarse_to_fine(112)[:7] == [0, 64, 32, 96, 16, 48, 80]
    for n in (112, 17, 200, 5, 1):
        assert sorted(_coarse_to_fine(n)) == list(range(n))
    case = synthetic_case(30, 8, 4, 3, 500, seed=2)
    problem, _ = build_problem(case.chain, case.calibration, case.profile, case.topology,
                               Constraints(accuracy_drop=0.01))
    whole = bound_tables(problem)
    classes_module = importlib.import_module("distree.solver.classes")
    tables, clock, screened = classes_module.PlacementClasses.tables, [0.0], []

    def timed(self, c):                       # each class takes 10 ms: 3 + 87 classes, 0.3 s allowed
        if c not in self._tables:
            screened.append(c)
            clock[0] += 0.01
        return tables(self, c)

    monkeypatch.setattr(classes_module.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(classes_module.PlacementClasses, "tables", timed)
    assert classes_module.placement_classes(problem, whole, 0.3) is not None
    ends = [c for c in screened if c.first_end < problem.n_blocks - 1]
    everything = {c.device: tables(classes_module.PlacementClasses(problem), c).root
                  for c in screened if c.first_end == problem.n_blocks - 1}
    closest = min(everything, key=everything.get)
    assert 25 <= len(ends) <= 29 and len(screened) == len(set(screened))
    assert [c.last_end for c in ends] == _coarse_to_fine(problem.n_blocks - 1)[:len(ends)]
    assert {c.device for c in ends} == {closest}
    early = StageClass(closest, 7, 7)         # the closest device, 19th of its ends: within the 0.3 s
    late = StageClass(max(everything, key=everything.get), 28, 28)   # the last device: after 2 x 29 classes

    def one_low(low):
        def low_there(self, c):
            found = timed(self, c)
            return dataclasses.replace(found, root=whole.root) if c == low else found
        return low_there

    monkeypatch.setattr(classes_module.PlacementClasses, "tables", one_low(early))
    assert classes_module.placement_classes(problem, whole, 0.3) is None
    monkeypatch.setattr(classes_module.PlacementClasses, "tables", one_low(late))
    assert classes_module.placement_classes(problem, whole, 0.3) is not None
    assert classes_module.placement_classes(problem, whole, 10.0) is None       # every class screened: seen


WARM_PROBE = """
import importlib, json, sys
from numba.core.registry import CPUDispatcher
from distree.solver import bnb, kernels
from distree.solver.classes import PlacementClasses
from distree.solver.problem import Constraints, build_problem
from distree.solver.synthetic import synthetic_case

def compiled():
    return {n: len(f.signatures) for n, f in vars(kernels).items() if isinstance(f, CPUDispatcher) and n[0] != "_"}

bnb.warm_up()
warm = compiled()
solve_module = importlib.import_module("distree.solver.solve")
solve_module.MILP_MAX_ROWS = 10                                   # the tree's route, placement classes screened
for k, exits in ((3, 11), (2, 30)):
    case = synthetic_case(12, exits, 4, k, 600, seed=k, exit_every=exits >= 11, dispatch_ms=(0.01, 0.02, 0.3))
    solve_module.solve(case.chain, case.calibration, case.profile, case.topology, Constraints(time_limit_s=3))
    p, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
    bnb.branch_and_bound(p, None, 1.0, best_first=True, classes=PlacementClasses(p))    # class splits, rebound
json.dump({"warm": warm, "after": compiled()}, sys.stdout)
"""


def test_the_warm_up_compiles_every_kernel_signature_a_solve_uses():
    """`scripts/setup.sh` runs `warm_up` so that a user's first solve does not spend ~7 s of its time limit in numba:
    solves along every route (the tree over placement classes, splits, the wide window, the MILP's wrappers) then
    need no kernel compiled for new argument types (a fresh process: other tests' calls do not count)."""
    probe = subprocess.run([sys.executable, "-c", WARM_PROBE], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    counts = json.loads(probe.stdout)
    assert counts["after"] == counts["warm"] and all(counts["warm"].values()), counts
