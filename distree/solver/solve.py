"""``solve``: heuristic warm start -> branch and bound -> MILP -> Plan; infeasibility explained; accuracy-drop sweeps."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from distree.errors import DistreeError
from distree.exits.confidence import clopper_pearson_lower
from distree.exits.types import Calibration
from distree.graph.chain import Chain
from distree.interrupt import ctrl_c_ends, requested
from distree.profiler.types import Profile
from distree.solver.bnb import OPTIMALITY_TOLERANCE, BnbResult, Tree, branch_and_bound
from distree.solver.bounds import BoundTables, bound_tables, widest_window, widest_window_bound, window_prefix_bound
from distree.solver.classes import PlacementClasses, placement_classes
from distree.solver.costs import Evaluation, best_placement, evaluate, outcome, relaxed_lower_bound, \
    unreached_exits_off
from distree.solver.heuristic import Candidate, default_starts, local_search, no_exit_plan
from distree.solver.milp import MilpResult, estimated_rows, solve_milp
from distree.solver.parallel import kicks_beside, kicks_on_cores, run_tree, side_by_side, usable_cores
from distree.solver.plan import INTERRUPTED, WITHIN_GAP, ExitChoice, Plan, Stage
from distree.solver.problem import Constraints, Problem, ProblemIndex, build_problem, check_constraints
from distree.solver.start import check_start, seed_candidate, start_levels, start_placement
from distree.targets.spec import Topology

# measured on the loaded 2-core x86 VM: the example's MILP (~144k rows) took 51.8 s to build, load and reach
# HiGHS's first incumbent; 6e-5 s/row (an idle-machine figure) let solves overrun --time-limit by 40%
BUILD_S_PER_ROW = 2e-4
# above this many rows HiGHS is not run once a feasible plan is known: the tree (over placement classes where they
# help) bounds faster. Measured: 22 trained exits (146k rows), HiGHS for 900 s: no better plan, bound 0.631 ms; the
# best-first tree: 0.946 in 37 s. At --time-limit 60 (eighteenth session, 2-core EPYC; tree = this route forced):
# a 4-layer ViT's 14 trained exits on 2 devices (88k rows): HiGHS 46% gap, the tree proves it in 45 s; synthetic
# 55 blocks / 54 exits / 300 samples (31k rows): HiGHS 9.9%, tree 3.5% (given 600 s HiGHS proves 0.76%); 40 / 16 /
# 800 (22k rows): both prove it, HiGHS in 48 s, the tree in 15 s; 30 / 12 / 800 (17k): 31 s vs 3.8 s; 30 / 8 /
# 1,000-1,500 (13-19k): both ~1-3 s; 30 / 8 / 500 (7k rows): HiGHS proves it in 19 s, the tree ends at 16%.
MILP_MAX_ROWS = 10_000
HEURISTIC_SHARE = 0.6          # of the time limit, at most, for the warm-start local search
PROBE_SHARE = 0.2              # of the time then left: a first branch and bound (proves small problems)
PROBE_MAX_S = 10.0             # but no longer: with --time-limit 600 it took 120 s on a case HiGHS then proved in
#                                0.8 s (55 blocks, 10 exits, 300 samples); what it has not proven by then, the MILP
#                                or the best-first tree (exact too) goes on with
KICKS_UNTIL = 0.8              # share of the time limit by which the iterated local search stops kicking
KICKS_BEFORE_MILP = 0.5        # share of the time left that kicks get, at most, before a MILP not yet proven;
#                                measured (60 s): 55 blocks / 54 exits / 300 samples 12.855 -> 12.818 ms, while the
#                                cases HiGHS proves stay proven (kicks stop after 100 without a gain)
# time for the widest window bound that fits (bounds.py): a share of the limit, but at least WIDE_BOUND_MIN_S where
# that stays under twice the share. Measured: ResNet-110 scale 10 s, width 4 (1 s) -> 5 (2 s): gap 6.6% -> 5.8%;
# 22 trained exits 60 s, width 6 (12 s) vs 5 (6 s): 29.9% vs 29.6% (the tree there needs the time more)
WIDE_BOUND_SHARE = 0.1
WIDE_BOUND_MIN_S = 2.0
# and, before the best-first tree, a wider window where a trial (WIDEN_TRIAL_SHARE of the limit) shows the wide
# window giving the highest bound for at least WIDEN_MIN_SHARE of the children judged, and the wider one fits
# WIDEN_SHARE of the limit (and half the time left). Measured at 60 s: ResNet-110 scale (trial: 99.8%) width 5 -> 6
# (17 s), bound 10.638 -> 10.696 ms, gap 5.6% -> 5.0%; 200 blocks (trial: 89%) width 7 -> 8 (9 s) cost the tree
# that time, 0.542% -> 0.566% back to back, so it is not widened; 22 trained exits (0.7%) are not either
WIDEN_SHARE = 0.35
WIDEN_TRIAL_SHARE = 0.03
WIDEN_MIN_SHARE = 0.95
# placement classes (classes.placement_classes), on the tree's route: their tables may take this share of the
# limit, and a first best-first search over them (instead of the depth-first probe) this share. Measured, 22
# trained exits on 3 devices: accuracy drop 0.05 proven in 1.3 s where one tree over every placement ends at a
# 9.1% gap in 30 s; drop 0.01, 60 s: 11.7% (13.1% with the classes after the 10 s depth-first probe)
CLASS_SHARE = 0.1
CLASS_TRIAL_SHARE = 0.05
DIVES_SHARE = 0.08             # then dives (bnb.Tree.dive) from that tree's open nodes, before the kicks
# both shares of the limit up to this many seconds, no more: a longer solve holds the plans a shorter one finds, as
# soon (Ctrl-C may end it any time), and the class tree, which goes on after them, gets the time. Measured on the
# trained ResNet-110, Ctrl-C at 12 s: 1.872 ms with the cap, 2.137 without it (600 s limit; at 60 s the same at
# 7 s); 60 s solves side by side: bounds 1.8275 / 1.8276 against 1.8274 / 1.8275; the 55-block 54-exit 300-sample
# case proven in 18.3 / 19.0 s against 19.6 / 19.5
EARLY_PHASES_MAX_S = 20.0
CLASS_KICKS_SHARE = 0.1       # then kicks, for this share at most: the classes' bound keeps rising with the tree's
#                               time. Measured (10 s, a trained ResNet-110, 3 devices): 0.1 -> plan 1.789 ms, gap
#                               20.5%; 0.3 -> 1.711, 17.7%; 0.5 -> 1.711, 19.3%. The 22 trained exits' kicks stall
#                               (100 kicks without a gain) within either share: proven as fast. Since the dives
#                               find that plan (1.872 ms on the files rebuilt in the twenty-ninth session) and the
#                               tree grows beside the kicks: 0.05 / 0.1 / 0.2 / 0.3 -> 10.20-10.30% / 10.33-10.66% /
#                               10.49-10.61% / 10.79-11.14% (3-4 solves each, interleaved); 0.1 keeps a second
#                               or more for instances whose dives miss
TREE_SLICE_S = 0.2            # the best-first tree's slices beside the kicks (it goes on to every core when they end)
REPORT_CONFIDENCE = 0.95      # the accuracy LCB is always reported; at this level unless --confidence says


def solve(chain: Chain, calibration: Calibration, profile: Profile, topology: Topology,
          constraints: Constraints, progress: Optional[Callable[[str], None]] = None,
          start: Optional[Plan] = None) -> Plan:
    """The plan of minimal expected latency under ``constraints`` (DistreeError if none exists); ``progress``
    hears one line at a time how far the solve is (for a status line: a solve may take all of --time-limit);
    ``start``: an earlier plan of the same model whose exits and thresholds seed the search
    (:mod:`distree.solver.start`). Ctrl-C ends the search with the best plan so far, status ``interrupted``
    (:mod:`distree.interrupt`)."""
    problem, index = build_problem(chain, calibration, profile, topology, constraints)
    seed = None if start is None else (start_levels(start, chain, calibration, index),
                                       start_placement(start, problem.devices))
    with ctrl_c_ends("the search", "its best plan so far"):
        return solve_problem(problem, index, chain, calibration, constraints, progress, seed)


def solve_problem(p: Problem, index: ProblemIndex, chain: Chain, calibration: Calibration,
                  constraints: Constraints, progress: Optional[Callable[[str], None]] = None,
                  seed: Optional[tuple[np.ndarray, Optional[np.ndarray]]] = None) -> Plan:
    """Local search -> a probing branch and bound (depth first) -> kicks (iterated local search) -> the MILP
    with the time left, when it can be built in time and is small enough to help (MILP_MAX_ROWS); else a
    best-first branch and bound with the time left, carrying the widest window bound that fits (widened first
    where a short trial of that tree shows the window deciding its bounds). ``seed``: levels the local search
    also starts from, and their placement where known (the plan records what the seed costs here as
    ``model_stats["start_ms"]``).

    Every stage runs against one deadline, t0 + time_limit_s; building and loading the MILP count too.
    """
    t0 = time.perf_counter()
    deadline = t0 + constraints.time_limit_s
    gap = constraints.gap               # both engines stop once their plan is proven within it
    jobs = usable_cores() if constraints.jobs is None else constraints.jobs

    def tell(best: Optional[Candidate], bound_ms: Optional[float], doing: str) -> None:
        if progress is not None:
            found = "no plan yet" if best is None else f"{best.expected_ms:.3f} ms" + (
                f", gap {_gap(best.expected_ms, bound_ms):.1%}" if bound_ms is not None else "")
            progress(f"plan: {found}; {doing} ({time.perf_counter() - t0:.0f}/{constraints.time_limit_s:g} s)")

    tell(None, None, "local search")
    seeded = None if seed is None else seed_candidate(p, *seed)
    rows = estimated_rows(p)
    limit = constraints.time_limit_s
    early_s = min(limit, EARLY_PHASES_MAX_S)       # what the class trial and the dives take their shares of
    tree_route = rows > MILP_MAX_ROWS and not constraints.dump_lp      # the tree's route in any case, given a plan

    def first_plan() -> tuple[Optional[Candidate], float, Optional[Candidate]]:
        # what the report needs besides the plan, priced now so that it counts within the limit, not after it
        found = local_search(p, time_limit_s=HEURISTIC_SHARE * limit,
                             starts=None if seed is None else [seed[0], *default_starts(p)])
        if seeded is not None and seeded.feasible and (found is None or seeded.expected_ms < found.expected_ms):
            found = seeded              # the search may wander off from an infeasible start it scored lower
        return found, relaxed_lower_bound(p), no_exit_plan(p)

    def screen() -> tuple[BoundTables, Optional[PlacementClasses]]:
        tables = bound_tables(p)
        return tables, placement_classes(p, tables, CLASS_SHARE * limit) if tree_route else None

    early: list[Tree] = []

    def grow_early(screened: tuple[BoundTables, Optional[PlacementClasses]]) -> bool:
        # the screen done before the first plan: the classes' tree grows meanwhile (its bound needs no plan)
        if screened[1] is None:
            return False
        if not early:
            early.append(Tree(p, None, best_first=True, classes=screened[1], rel_gap=gap, chain=True))
        return not early[0].run(TREE_SLICE_S).complete

    # on the tree's route the placement classes are screened while the first plan is searched for (on two cores)
    (warm, relaxed_ms, base), (tables, classes) = side_by_side(first_plan, screen, limit, jobs if tree_route else 1,
                                                               then=grow_early)
    if warm is None:
        classes = None
    forest = None
    if classes is not None:
        # best first over the classes from the start: proves at once where only the placement kept the bound low;
        # each class's nodes also bounded by the chain bound (dearer nodes, a higher bound within a minute)
        tell(warm, None, "best-first search over placement classes")
        forest = early[0] if early else Tree(p, None, best_first=True, classes=classes, rel_gap=gap, chain=True)
        tree = forest.run(max(0.0, CLASS_TRIAL_SHARE * early_s - forest.wall_s), incumbent=warm)  # on after the kicks
    else:
        tell(warm, None, "depth-first search")
        tree = branch_and_bound(p, warm, min(PROBE_MAX_S, PROBE_SHARE * max(0.0, deadline - time.perf_counter())),
                                tables=tables, rel_gap=gap)
    too_big = rows > MILP_MAX_ROWS and tree.best is not None    # with no plan yet, the MILP may still find one
    run_milp = (not too_big and rows * BUILD_S_PER_ROW <= 0.5 * (deadline - time.perf_counter())
                and not requested())
    wide_s = max(WIDE_BOUND_SHARE * limit, min(WIDE_BOUND_MIN_S, 2 * WIDE_BOUND_SHARE * limit))
    wide = None
    if not tree.complete and classes is None and not requested():
        tell(tree.best, tree.bound, "bounding")
        wide = widest_window_bound(p, tables, wide_s)
    if wide is not None and not run_milp and tree.best is not None and not constraints.dump_lp:
        wider = widest_window(p, min(WIDEN_SHARE * limit,
                                     0.5 * (deadline - time.perf_counter() - WIDEN_TRIAL_SHARE * limit)))
        if wider > wide.width:
            # a short best-first trial: does the wide window decide the tree's bounds here? (If not, that tree
            # goes on after the kicks)
            forest = Tree(p, tree.best, best_first=True, tables=tables, prefix=wide, rel_gap=gap)
            trial = forest.run(WIDEN_TRIAL_SHARE * limit)
            tree = dataclasses.replace(trial, bound=max(trial.bound, tree.bound))
            if not trial.complete and trial.wide_share >= WIDEN_MIN_SHARE:
                wide, forest = window_prefix_bound(p, tables, wider), None
    wide_bound = wide.total / p.n_samples if wide is not None else 0.0
    if not tree.complete and tree.best is not None and not constraints.dump_lp and not requested():
        tell(tree.best, max(tree.bound, wide_bound), "improving the plan")
        # dives (local searches from the best-first tree's lowest open nodes), then kicks: until KICKS_UNTIL of
        # the limit when the best-first tree follows (its bound settles within seconds), or for KICKS_BEFORE_MILP
        # of the time left, so that HiGHS starts from a better plan
        dives_s = DIVES_SHARE * early_s if forest is not None else 0.0
        kicks_s = (KICKS_BEFORE_MILP * (deadline - time.perf_counter() - dives_s) if run_milp else
                   CLASS_KICKS_SHARE * limit if classes is not None else
                   t0 + KICKS_UNTIL * constraints.time_limit_s - time.perf_counter() - dives_s)
        if run_milp or jobs == 1:
            if forest is not None:
                forest.dive(dives_s)
                tree = dataclasses.replace(tree, best=forest.best)
            tree = dataclasses.replace(tree, best=kicks_on_cores(p, tree.best, kicks_s, jobs))
        else:       # the best-first tree follows: it grows here while the other cores dive and kick
            if forest is None:
                forest = Tree(p, tree.best, best_first=True, tables=tables, prefix=wide, rel_gap=gap)
            kicks_end = time.perf_counter() + dives_s + kicks_s

            def grow() -> bool:         # a slice of tree, none past the kicks' end
                left = kicks_end - time.perf_counter()
                return left > 0 and not forest.run(min(TREE_SLICE_S, left)).complete

            def dive() -> Candidate:    # in a kicks worker, on its copy of the tree
                forest.dive(dives_s)
                return forest.best

            forest.offer(kicks_beside(p, tree.best, dives_s + kicks_s, jobs, grow, dive if dives_s else None))
            tree = dataclasses.replace(tree, best=forest.best)
    if not tree.complete and not run_milp and not constraints.dump_lp and not requested():
        probe_bound = tree.bound                          # valid whatever incumbent the probe had
        tell(tree.best, max(probe_bound, wide_bound), "best-first search")

        def told(found: Optional[Candidate], bound_ms: float) -> None:
            tell(found, max(bound_ms, probe_bound, wide_bound), "best-first search")

        if forest is None:
            forest = Tree(p, tree.best, best_first=True, tables=tables, prefix=wide, rel_gap=gap)
        tree = run_tree(forest, max(0.0, deadline - time.perf_counter()), jobs, incumbent=tree.best, progress=told)
        tree = dataclasses.replace(tree, bound=max(tree.bound, probe_bound))
    best = tree.best
    start = (best.levels, best.placement) if best is not None else None
    budget = deadline - time.perf_counter()
    engine = "branch-and-bound"                  # what produced the answer, for the plan's `solver` field
    if tree.complete and not constraints.dump_lp:
        if best is None:
            raise _infeasible(p, index, constraints)
        within = f"within --gap {gap:g} " if gap > OPTIMALITY_TOLERANCE else ""
        how = f"proven {within}by branch and bound{_over(tree)} ({_nodes(tree)}, {tree.wall_s:.2f} s)"
        result = MilpResult(best.levels, best.placement, best.expected_ms, tree.bound,
                            WITHIN_GAP if within else "optimal", how,
                            _gap(best.expected_ms, tree.bound) if within else 0.0, 0.0, 0, 0, 0)
    elif not run_milp and not constraints.dump_lp:
        if best is None and requested():
            raise KeyboardInterrupt         # stopped before any plan: nothing to keep
        if best is None:
            cheap = _placement_reasons(p)
            if cheap:
                raise DistreeError("infeasible plan: " + "; ".join(cheap))
            raise DistreeError(f"the MILP (~{rows} rows) cannot be built within --time-limit "
                               f"{constraints.time_limit_s:g} s and the heuristic found no feasible plan; "
                               f"raise --time-limit (about {rows * BUILD_S_PER_ROW * 4:.0f} s)")
        why = (f" over {MILP_MAX_ROWS}, where HiGHS bounds less than the tree" if too_big else
               ", Ctrl-C came first" if requested() else
               f" need ~{rows * BUILD_S_PER_ROW:.0f} s to build, over half of the time left")
        result = MilpResult(best.levels, best.placement, best.expected_ms, tree.bound, "feasible",
                            f"MILP not run: ~{rows} rows{why}; branch and bound{_over(tree)} stopped after "
                            f"{_nodes(tree)}",
                            float("inf"), 0.0, 0, rows, 0)
    else:
        engine = constraints.solver
        tell(best, max(tree.bound, wide_bound), f"MILP, ~{rows} rows")
        result = solve_milp(p, time_limit_s=max(1.0, budget), solver=constraints.solver, start=start,
                            dump_lp=constraints.dump_lp, rel_gap=gap)
    if result.status == "infeasible":
        if best is not None:
            raise RuntimeError("MILP reports infeasible but the heuristic found a feasible plan (solver bug)")
        raise _infeasible(p, index, constraints)
    if result.levels is None and best is None:
        if requested():
            raise KeyboardInterrupt
        raise DistreeError(f"no feasible plan found within --time-limit {constraints.time_limit_s:g} s "
                           f"(solver status {result.status}); raise --time-limit")
    levels, placement = (result.levels, result.placement) if result.levels is not None else start
    ev = evaluate(p, levels, placement)
    if best is not None and (not ev.feasible or best.expected_ms < ev.expected_ms - 1e-9):
        if result.status == "optimal":
            raise RuntimeError("proven optimum is worse than a heuristic plan (solver bug)")
        levels, placement = best.levels, best.placement
    levels = unreached_exits_off(p, levels)
    ev = evaluate(p, levels, placement)
    if not ev.feasible:
        raise RuntimeError(f"solver returned a plan that violates {ev.violations} (solver bug)")
    bound = max(result.bound, tree.bound, relaxed_ms, wide_bound)
    if result.status == "optimal":
        if bound > ev.expected_ms * (1 + 1e-6) + 1e-12:
            raise RuntimeError(f"lower bound {bound} exceeds the proven optimum {ev.expected_ms} (solver bug)")
        bound = min(bound, ev.expected_ms)
        gap = max(0.0, result.gap)
    else:
        gap = _gap(ev.expected_ms, bound)
    status = "optimal" if result.status == "optimal" or gap <= OPTIMALITY_TOLERANCE else result.status
    if status not in ("optimal", WITHIN_GAP) and requested():
        status = INTERRUPTED
        result = dataclasses.replace(result, sol_status=f"stopped by Ctrl-C after {time.perf_counter() - t0:.1f} "
                                                        f"s; {result.sol_status}")
    plan = make_plan(p, index, chain, calibration, constraints, engine, levels, placement, ev,
                     no_exit_ms=base.expected_ms if base is not None else float("nan"),
                     result=dataclasses.replace(result, bound=bound, status=status), gap=gap,
                     wall_s=time.perf_counter() - t0)
    if seed is None:
        return plan
    # what the seed costs here (none: no placement of its configuration fits the memory)
    start = {"start_feasible": 0.0} if seeded is None else {"start_ms": seeded.expected_ms,
                                                            "start_feasible": float(seeded.feasible)}
    return dataclasses.replace(plan, model_stats={**plan.model_stats, **start})


def _infeasible(p: Problem, index: ProblemIndex, c: Constraints) -> DistreeError:
    """The error that says why no plan exists; a Ctrl-C during the MILPs that look for the nearest setting aborts
    instead (what they found by then is not the nearest)."""
    why = explain_infeasible(p, index, c)
    if requested():
        raise KeyboardInterrupt
    return DistreeError(why)


def _over(tree: BnbResult) -> str:
    classes = f" over {tree.classes} placement classes" if tree.classes else ""
    return classes + (f" on {tree.workers} processes" if tree.workers > 1 else "")


def _nodes(tree: BnbResult) -> str:
    short = f", {tree.short} of them short of the right answers needed" if tree.short else ""
    dropped = (f"; {tree.dropped} open nodes dropped at the memory cap (the smallest bound dropped caps the proven "
               f"one)") if tree.dropped else ""
    return f"{tree.nodes} nodes{short}{dropped}"


def _gap(objective: float, bound: float) -> float:
    if not np.isfinite(bound):
        return float("inf")
    return max(0.0, (objective - bound) / max(abs(objective), 1e-12))


def make_plan(p: Problem, index: ProblemIndex, chain: Chain, calibration: Calibration, c: Constraints, engine: str,
              levels: np.ndarray, placement: np.ndarray, ev: Evaluation, no_exit_ms: float,
              result: MilpResult, gap: float, wall_s: float) -> Plan:
    o = outcome(p, levels)
    B = p.n_blocks
    stages = []
    bounds = [0] + [int(i) + 1 for i in np.nonzero(np.diff(placement))[0]] + [B]
    for first, end in zip(bounds, bounds[1:]):
        d = int(placement[first])
        exits = []
        heads_ms = 0.0
        for j in range(p.n_exits):
            if levels[j] > 0 and first <= p.exit_after[j] < end:
                col = index.exit_columns[j]
                exits.append(ExitChoice(name=calibration.exits[col].name, after_block=int(p.exit_after[j]),
                                        threshold=float(index.thresholds[j][levels[j] - 1]),
                                        exit_rate=float(o.exit_rate[j])))
                heads_ms += p.head_ms[d, j] * o.reach_exit[j]
        blocks_ms = float(p.block_ms[d, first:end] @ o.reach_block[first:end])
        came_from = p.source if first == 0 else int(placement[first - 1])
        transfer = float(p.cut_ms[came_from, d, first] * o.reach_block[first])
        stages.append(Stage(device=p.devices[d], first_block=first, last_block=end - 1, exits=tuple(exits),
                            compute_ms=blocks_ms + heads_ms, transfer_in_ms=transfer,
                            memory_bytes=int(ev.memory[d]), reach_rate=float(o.reach_block[first])))
    n = p.n_samples
    return Plan(
        model_sha256=chain.model_sha256, score_kind=calibration.score_kind, source=p.devices[p.source],
        stages=tuple(stages), expected_latency_ms=ev.expected_ms, worst_case_latency_ms=ev.worst_ms,
        no_exit_latency_ms=no_exit_ms, accuracy=ev.correct / n,
        accuracy_lcb=clopper_pearson_lower(ev.correct, n, c.confidence or REPORT_CONFIDENCE),
        full_model_accuracy=index.full_accuracy, confidence=c.confidence or REPORT_CONFIDENCE,
        accuracy_drop=c.accuracy_drop,
        memory_bytes={s.device: s.memory_bytes for s in stages},
        breakdown_ms=dict(ev.breakdown), solver=engine, status=result.status, gap=gap, wall_s=wall_s,
        sol_status=result.sol_status, bound_ms=result.bound, final_rate=float(o.final_rate),
        required_correct=p.required_correct, n_samples=n,
        model_stats={"variables": result.n_vars, "constraints": result.n_constraints,
                     "sample_classes": result.n_classes, "milp_wall_s": round(result.wall_s, 3)},
        busy_ms={p.devices[d]: float(ms) for d, ms in enumerate(ev.busy_ms) if ms > 0},
        handling_measured=p.handling_ms is not None,
        traffic=c.traffic, idle_hops_measured=p.hop_by_gap_ms is not None,
    )


# --- infeasibility ---------------------------------------------------------------------------------------

def explain_infeasible(p: Problem, index: ProblemIndex, c: Constraints) -> str:
    """Name the constraint that cannot be met and the nearest setting that would work."""
    reasons = _placement_reasons(p)
    if reasons:
        return "infeasible plan: " + "; ".join(reasons)
    best_correct = _max_correct(p, c)
    n = p.n_samples
    if best_correct is None:
        if p.busy_cap_ms is not None:
            return _throughput_reason(p, c)
        return "infeasible plan: deadline and memory together leave no plan; relax --deadline-ms or add memory"
    acc = best_correct / n
    reach = clopper_pearson_lower(best_correct, n, c.confidence) if c.confidence else acc
    drop = max(0.0, index.full_accuracy - reach)
    conf = f" (lower bound {reach:.4f} at --confidence {c.confidence:g})" if c.confidence else ""
    return (f"infeasible plan: accuracy: the best reachable accuracy is {acc:.4f} ({best_correct}/{n}){conf}, "
            f"below full-model accuracy {index.full_accuracy:.4f} - --accuracy-drop {c.accuracy_drop:g}; "
            f"the smallest --accuracy-drop that works is {np.ceil(drop * 1e4) / 1e4:.4f}")


def _throughput_reason(p: Problem, c: Constraints) -> str:
    """The highest --min-throughput a plan meeting the other constraints sustains: the least expected busy time of
    its busiest stage (a MILP; with the accuracy bound where some plan meets it, else at any accuracy)."""
    head = (f"infeasible plan: throughput: no plan keeps every stage under {p.busy_cap_ms:.3g} ms of expected "
            f"{'busy time (compute and request handling)' if p.handling_ms is not None else 'compute'} per request")
    free = p.replace(busy_cap_ms=None)
    for problem, accuracy in ((free, ""), (free.replace(required_correct=0), " at any accuracy")):
        r = solve_milp(problem, time_limit_s=c.time_limit_s, solver=c.solver, objective="bottleneck")
        if r.levels is not None:
            break
    else:
        return f"{head}; deadline and memory leave no plan either: relax --deadline-ms or add memory"
    busiest = float(evaluate(problem, r.levels, r.placement).busy_ms.max())
    rate = np.floor(1000.0 / busiest * 10) / 10            # rounded down: that setting works
    if r.status == "optimal":
        return (f"{head}; the most any plan sustains{accuracy} is {rate:g} requests/s (its busiest stage "
                f"{busiest:.3f} ms); use --min-throughput {rate:g} or less, or add a device")
    most = f", none more than {1000.0 / r.bound:.1f}" if r.bound > 0 else ""
    return (f"{head}; a plan found within --time-limit {c.time_limit_s:g} s sustains {rate:g} requests/s"
            f"{accuracy} (its busiest stage {busiest:.3f} ms{most}); use --min-throughput {rate:g} or less, or "
            f"add a device")


def _placement_reasons(p: Problem) -> list[str]:
    """Memory and deadline checks that need no MILP: exits off is the lightest and fastest no-exit path."""
    off = np.zeros(p.n_exits, dtype=int)
    bare = p.replace(deadline_ms=None, busy_cap_ms=None)
    if best_placement(bare, off) is None:
        extra = _extra_memory_needed(bare, off)
        return [f"memory: no placement of the {p.n_blocks} blocks fits the devices' memory; "
                f"about {extra / 2 ** 20:.1f} MiB more per device would work (or add a device)"]
    if p.deadline_ms is not None:
        fastest = _fastest_no_exit_path(bare, off)
        if fastest > p.deadline_ms:
            return [f"deadline: the fastest path with no exit taken needs {fastest:.3f} ms > --deadline-ms "
                    f"{p.deadline_ms:g}; use --deadline-ms {np.ceil(fastest * 1000) / 1000:g} or more"]
    return []


def _extra_memory_needed(p: Problem, levels: np.ndarray) -> float:
    lo, hi = 0.0, float(np.abs(p.block_param).sum() + np.abs(p.block_act).sum() + 1)
    for _ in range(40):
        mid = (lo + hi) / 2
        if best_placement(p.replace(capacity_bytes=p.capacity_bytes + mid), levels) is None:
            lo = mid
        else:
            hi = mid
    return hi


def _fastest_no_exit_path(p: Problem, levels: np.ndarray) -> float:
    found = best_placement(p, levels, deadline_weight=1e6)
    return evaluate(p, levels, found[0]).worst_ms


def _max_correct(p: Problem, c: Constraints) -> Optional[int]:
    """Most correct answers any plan meeting the other constraints gives (a MILP with that objective)."""
    r = solve_milp(p.replace(required_correct=0), time_limit_s=c.time_limit_s, solver=c.solver,
                   objective="correct")
    if r.levels is None:
        return None
    return evaluate(p, r.levels, r.placement).correct


# --- sweeps ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    accuracy_drop: float
    plan: Optional[Plan]
    error: str = ""


def sweep_accuracy_drop(chain: Chain, calibration: Calibration, profile: Profile, topology: Topology,
                        constraints: Constraints, drops: list[float],
                        progress: Optional[Callable[[str], None]] = None,
                        start: Optional[Plan] = None) -> list[SweepPoint]:
    """The latency-accuracy frontier: one solve per allowed drop, in the order given. They run from the smallest
    drop up, each seeded with the plan of the one before (``start`` seeds the first): a plan that keeps within a
    drop keeps within every larger one, so each solve starts from a feasible plan. A drop that no plan meets is a
    row that says why; a drop that is no drop at all (say -0.1) is an error, before any solve. Ctrl-C ends the
    solve under way with its best plan and leaves the drops after it unsolved (rows that say so)."""
    if not drops:
        raise DistreeError("the sweep has no accuracy drops; give some, e.g. accuracy-drop=0,0.01,0.02")
    swept = [dataclasses.replace(constraints, accuracy_drop=drop, dump_lp=None) for drop in drops]
    for c in swept:
        check_constraints(c)
    if start is not None:
        check_start(start, chain, calibration)
    points: dict[int, SweepPoint] = {}
    seed = start                        # the plan of the last drop solved (a plan within it is within the next)
    with ctrl_c_ends("the sweep", "its plans so far"):
        for k in sorted(range(len(drops)), key=lambda k: drops[k]):
            drop = drops[k]
            if requested():
                points[k] = SweepPoint(drop, None, "not solved: Ctrl-C ended the sweep")
                continue
            try:
                told = None if progress is None else (lambda msg, drop=drop: progress(f"accuracy drop {drop:g}: {msg}"))
                plan = solve(chain, calibration, profile, topology, swept[k], told, seed)
                points[k], seed = SweepPoint(drop, plan), plan
            except DistreeError as exc:
                points[k] = SweepPoint(drop, None, str(exc))
    return [points[k] for k in range(len(drops))]
