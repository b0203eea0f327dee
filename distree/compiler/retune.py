"""``distree retune``: choose a bundle's exit thresholds again on new labelled data, without compiling.

The thresholds are a static table (DESIGN), so when the inputs drift (``distree stats`` says DRIFT) or the accuracy
promise changes, only the table has to change: the placement, the exits compiled into the segments and their code
stay. The new data runs through the bundle's own sub-segments (every one, whatever the thresholds say), which gives
every compiled exit's scores and answers as the devices compute them; the solver then chooses the thresholds again
for that placement and those exits. A segment computes its exit's head whenever a sample reaches it, whether or not
the threshold lets anyone leave, so the solver is given each head as part of the block it follows: it may still
turn an exit "off", which the table writes as a threshold no score reaches (the head still runs: recompile to drop
it). Each exit's grid holds its current threshold, so on the new data the retuned table is never worse than the one
it replaces wherever that one meets the accuracy bound.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from distree.compiler.bundle import threshold_table
from distree.compiler.manifest import MANIFEST, PLANNING, THRESHOLDS, Manifest, check_bundle_target, read_manifest, \
    read_thresholds, sha256_file
from distree.compiler.verify import check_files
from distree.errors import DistreeError
from distree.exits.calibrate import Behaviour, evaluate_arrays, threshold_grid
from distree.exits.data import Dataset, check_labels
from distree.exits.progress import progress_bar
from distree.exits.scores import exit_scores, never_threshold, predictions
from distree.exits.types import DEFAULT_LEVELS, MAX_LEVELS, Calibration
from distree.graph.chain import Chain
from distree.interrupt import ctrl_c_ends
from distree.profiler.types import Profile
from distree.runtime.backends import set_tvm_threads
from distree.runtime.executor import StageExecutor, check_input
from distree.runtime.policy import ExitPolicy
from distree.serde import JsonRecord, atomic_directory
from distree.solver.costs import evaluate, outcome
from distree.solver.plan import ExitChoice, Plan
from distree.solver.problem import SPORADIC, Constraints, Problem, ProblemIndex, build_problem, check_constraints, \
    required_correct
from distree.solver.solve import solve_problem
from distree.solver.start import start_levels, start_placement
from distree.targets.spec import Topology

CALIBRATION_FILE = f"{PLANNING}/calibration.json"
CHANGED = (MANIFEST, THRESHOLDS, CALIBRATION_FILE)     # what every device needs again after a retune
RETUNED = "thresholds retuned"                          # the manifest note's start (one note: the latest retune)
MAX_RETUNE_LEVELS = MAX_LEVELS - 2                      # each grid also holds the current threshold and "off"


@dataclass(frozen=True)
class TableOnData(JsonRecord):
    """A threshold table on the new data, on the bundle's placement."""

    thresholds: dict[str, float]
    exit_rates: dict[str, float]        # per exit in pipeline order, then ``final``
    expected_ms: float
    accuracy: float
    meets_bound: bool                   # answers at least the required count right


@dataclass(frozen=True)
class HeldOut(JsonRecord):
    """Both tables on labelled samples the retune did not choose on (``--test``)."""

    samples: int
    full_model_accuracy: float
    accuracy_drop: float
    current: dict[str, float]           # accuracy, then each exit's share and ``final``'s
    retuned: dict[str, float]


@dataclass(frozen=True)
class Retuned(JsonRecord):
    bundle: str                         # the bundle written
    samples: int
    full_model_accuracy: float          # on the new data, as the bundle computes it
    required_correct: int
    confidence: Optional[float]         # the accuracy bound's, where it is held at one
    before: TableOnData                 # the bundle's own table
    after: TableOnData
    plan: Plan
    changed_files: tuple[str, ...]      # every other file is the bundle's, byte for byte
    substitutions: tuple[str, ...]      # artifacts that ran in another form here to score the data
    held_out: Optional[HeldOut] = None


def retune(bundle: str | Path, data: Dataset, out: str | Path, constraints: Constraints,
           levels: int = DEFAULT_LEVELS, threads: int = 1,
           progress: Optional[Callable[[str], None]] = None, test: Optional[Dataset] = None) -> Retuned:
    """Write ``out``: ``bundle`` with the thresholds of minimal expected latency on ``data`` under ``constraints``
    (its placement and compiled exits kept; ``out`` may be ``bundle`` itself, replaced atomically). ``test``:
    labelled samples to report both tables on, out of the sample they were chosen on."""
    bundle, out = Path(bundle), Path(out)
    check_constraints(constraints)
    if not 1 <= levels <= MAX_RETUNE_LEVELS:
        raise DistreeError(f"--levels {levels}: give 1 to {MAX_RETUNE_LEVELS} threshold levels per exit, e.g. "
                           f"{DEFAULT_LEVELS}")
    manifest = read_manifest(bundle)
    check_files(bundle, manifest.files)             # every file as compiled: they are copied as they are
    chain, planned, profile, topology = _planning(bundle)
    check_bundle_target(out)
    for given, flag in ((data, "--data"), (test, "--test")):
        if given is not None:
            check_input(manifest.input, given.x, "the bundle")
            check_labels(given.y, chain.blocks[-1].output_shape[-1], flag)
    _check_one_exit_per_block(manifest.plan)
    names = [d.name for d in topology.devices]
    if any(stage.device not in names for stage in manifest.plan.stages):
        raise DistreeError(f"{bundle / PLANNING / 'topology.json'} lacks a device the bundle runs on; the bundle's "
                           "planning/ folder was edited: compile the bundle again")
    ranks = [names.index(stage.device) for stage in manifest.plan.stages]
    if ranks != sorted(ranks):          # compiled with --free-order into another order: that order is the pinned one
        constraints = dataclasses.replace(constraints, free_order=True)
    scorer = BundleScorer(bundle, manifest, threads)
    calibration = bundle_calibration(scorer, planned, data, levels)
    p, index = build_problem(chain, calibration, profile, topology, constraints)
    placement = start_placement(manifest.plan, p.devices)
    current = start_levels(manifest.plan, chain, calibration, index)
    with ctrl_c_ends("the search", "its best plan so far"):
        solved = solve_problem(heads_with_blocks(p, placement), index, chain, calibration, constraints, progress,
                               seed=(current, placement))
    chosen = start_levels(solved, chain, calibration, index)
    chosen[chosen == 0] = p.n_levels[chosen == 0]           # "off": the grid's last level, which nobody passes
    plan = _bundle_plan(solved, p, index, calibration, chosen, placement, manifest.plan)
    before = _on_data(p, index, calibration, current, placement)
    after = _on_data(p, index, calibration, chosen, placement)
    held_out = None if test is None else _held_out(scorer, test, before, after, constraints.accuracy_drop)
    _write(bundle, out, manifest, plan, calibration, len(data))
    return Retuned(bundle=str(out), samples=len(data), full_model_accuracy=index.full_accuracy,
                   required_correct=p.required_correct, confidence=constraints.confidence,
                   before=before, after=after, plan=plan, changed_files=CHANGED,
                   substitutions=scorer.substitutions,
                   held_out=held_out)


def bundle_constraints(plan: Plan, **given) -> Constraints:
    """What the bundle was planned under, as far as its plan records it (the accuracy drop, whether the required
    count was held at a confidence, the traffic), with the ``given`` values that are not None over it."""
    plain = required_correct(plan.n_samples, plan.full_model_accuracy - plan.accuracy_drop, None)
    planned = Constraints(accuracy_drop=plan.accuracy_drop,
                          confidence=None if plan.required_correct == plain else plan.confidence,
                          traffic=plan.traffic or SPORADIC)
    return dataclasses.replace(planned, **{k: v for k, v in given.items() if v is not None})


class BundleScorer:
    """The bundle's stages loaded once (artifacts that cannot run here as their ONNX: ``substitutions``), to score
    labelled samples through every sub-segment, one sample at a time, as the devices run them."""

    def __init__(self, bundle: Path, manifest: Manifest, threads: int = 1) -> None:
        set_tvm_threads(threads)
        self.table = read_thresholds(bundle)
        policy = ExitPolicy(self.table)
        self.stages = [StageExecutor(bundle, manifest, i, policy, threads) for i in range(len(manifest.stages))]
        self.substitutions = tuple(s for stage in self.stages for s in stage.substitutions)

    @property
    def exit_names(self) -> list[str]:
        return [e.name for e in self.table.exits]

    def behaviour(self, data: Dataset) -> Behaviour:
        """Every compiled exit's score and correctness on ``data``, and the final classifier's (last column)."""
        names = self.exit_names
        logits: dict[str, list[np.ndarray]] = {name: [] for name in names}
        entry: dict[str, list[np.ndarray]] = {name: [] for name in names}
        final = []
        with progress_bar(f"scoring {len(names)} exit(s) + final on the bundle", len(data)) as advance:
            for i in range(len(data)):
                act = data.x[i:i + 1]
                for stage in self.stages:
                    heads, act = stage.every_exit(act)
                    for name, out in heads.items():
                        logits[name].append(np.array(out.logits).reshape(1, -1))
                        if out.entry is not None:
                            entry[name].append(np.array(out.entry).reshape(1, -1))
                final.append(np.array(act).reshape(1, -1))
                advance(1)
        kind = self.table.score_kind
        scores = np.stack([exit_scores(np.concatenate(logits[n]), kind,
                                       np.concatenate(entry[n]) if entry[n] else None) for n in names], axis=1)
        correct = np.stack([predictions(np.concatenate(logits[n])) == data.y for n in names]
                           + [predictions(np.concatenate(final)) == data.y], axis=1)
        return Behaviour(scores=scores, correct=correct)


def bundle_calibration(scorer: BundleScorer, planned: Calibration, data: Dataset, levels: int) -> Calibration:
    """The bundle's compiled exits measured on ``data`` by its own sub-segments. Each exit's grid: ``levels``
    quantiles of its new scores, its current threshold, and a threshold no score reaches."""
    b = scorer.behaviour(data)
    names, kind = scorer.exit_names, scorer.table.score_kind
    exit_of = {e.name: e for e in planned.exits}
    current = {e.name: e.threshold for e in scorer.table.exits}
    never = never_threshold(kind)
    grids = tuple((*sorted({*threshold_grid(b.scores[:, j], levels), current[n]} - {never}), never)
                  for j, n in enumerate(names))
    return Calibration(
        model_sha256=planned.model_sha256, score_kind=kind, exits=tuple(exit_of[n] for n in names),
        scores=tuple(tuple(float(s) for s in row) for row in b.scores),
        correct=tuple(tuple(bool(c) for c in row) for row in b.correct), thresholds=grids,
        split_sizes={"fit": 0, "threshold": len(data), "test": 0}, seed=planned.seed, fit_fraction=0.0)


def heads_with_blocks(p: Problem, placement: np.ndarray) -> Problem:
    """``p`` on one placement with every exit compiled in: each block may sit only where ``placement`` puts it
    (elsewhere it needs more memory than the device has), and each head's time and memory count with the block it
    follows, since its segment computes it for every sample that gets there. An exit off then costs what it costs
    on, which is what a compiled bundle does (exits after distinct blocks: :func:`_check_one_exit_per_block`)."""
    block_ms, block_param = p.block_ms.copy(), p.block_param.copy()
    for j, b in enumerate(p.exit_after):
        block_ms[:, b] += p.head_ms[:, j]
        block_param[:, b] += p.head_param[:, j]
    elsewhere = np.arange(p.n_devices)[:, None] != np.asarray(placement)[None, :]
    too_big = np.maximum(p.capacity_bytes, 0)[:, None] + 1
    return p.replace(block_ms=block_ms, block_param=np.where(elsewhere, too_big, block_param),
                     head_ms=np.zeros_like(p.head_ms), head_param=np.zeros_like(p.head_param))


def _check_one_exit_per_block(plan: Plan) -> None:
    after = [c.after_block for stage in plan.stages for c in stage.exits]
    twice = sorted({b for b in after if after.count(b) > 1})
    if twice:
        raise DistreeError(f"the bundle has two exits after block {twice[0]}, where the second head runs only for "
                           "the samples the first keeps; retune cannot price that: compile again with the new "
                           "data (`distree compile ... --data NEW.npz`)")


def _planning(bundle: Path) -> tuple[Chain, Calibration, Profile, Topology]:
    folder = bundle / PLANNING
    missing = [f"{name}.json" for name in ("chain", "calibration", "profile", "topology")
               if not (folder / f"{name}.json").is_file()]
    if missing:
        raise DistreeError(f"{folder} lacks {', '.join(missing)}: retune re-plans from what `distree compile` kept "
                           "there; retune the bundle as compiled (not a device's copy), or compile again")
    return (Chain.load(folder / "chain.json"), Calibration.load(folder / "calibration.json"),
            Profile.load(folder / "profile.json"), Topology.load(folder / "topology.json"))


def _bundle_plan(solved: Plan, p: Problem, index: ProblemIndex, calibration: Calibration, chosen: np.ndarray,
                 placement: np.ndarray, old: Plan) -> Plan:
    """The solved plan as the bundle runs it: every compiled exit in its stage (those off at a threshold nobody
    reaches), compute and heads apart in the breakdown, and the checks that the two agree."""
    ev = evaluate(p, chosen, placement)
    if abs(ev.expected_ms - solved.expected_latency_ms) > 1e-9 * max(1.0, ev.expected_ms):
        raise RuntimeError(f"retune: the table costs {ev.expected_ms} ms with its heads apart and "
                           f"{solved.expected_latency_ms} ms with them in their blocks (bug)")
    o = outcome(p, chosen)
    choices = [ExitChoice(name=calibration.exits[col].name, after_block=int(p.exit_after[j]),
                          threshold=float(index.thresholds[j][chosen[j] - 1]), exit_rate=float(o.exit_rate[j]))
               for j, col in enumerate(index.exit_columns)]
    stages = tuple(dataclasses.replace(stage, exits=tuple(
        c for c in choices if stage.first_block <= c.after_block <= stage.last_block)) for stage in solved.stages)
    return dataclasses.replace(solved, stages=stages, breakdown_ms=dict(ev.breakdown),
                               no_exit_latency_ms=old.no_exit_latency_ms)


def _on_data(p: Problem, index: ProblemIndex, calibration: Calibration, levels: np.ndarray,
             placement: np.ndarray) -> TableOnData:
    ev, o = evaluate(p, levels, placement), outcome(p, levels)
    names = [calibration.exits[col].name for col in index.exit_columns]
    return TableOnData(
        thresholds={n: float(index.thresholds[j][levels[j] - 1]) for j, n in enumerate(names)},
        exit_rates={**{n: float(o.exit_rate[j]) for j, n in enumerate(names)}, "final": float(o.final_rate)},
        expected_ms=ev.expected_ms, accuracy=ev.correct / p.n_samples, meets_bound=ev.correct >= p.required_correct)


def _held_out(scorer: BundleScorer, test: Dataset, before: TableOnData, after: TableOnData,
              accuracy_drop: float) -> HeldOut:
    """Both tables on ``test``, scored by the bundle's own segments as the retune data was."""
    b, names = scorer.behaviour(test), scorer.exit_names

    def on_test(table: TableOnData) -> dict[str, float]:
        found = evaluate_arrays(b.scores, b.correct, [table.thresholds[n] for n in names], names)
        return {"accuracy": found.accuracy, **found.exit_rates}

    return HeldOut(samples=len(test.y), full_model_accuracy=float(b.correct[:, -1].mean()),
                   accuracy_drop=accuracy_drop, current=on_test(before), retuned=on_test(after))


def _write(bundle: Path, out: Path, manifest: Manifest, plan: Plan, calibration: Calibration, samples: int) -> None:
    """``out``: the bundle's files as they are, and the new table, calibration and manifest (atomically)."""
    with atomic_directory(out) as tmp:
        for name in manifest.files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle / name, tmp / name)
        threshold_table(plan, calibration).save(tmp / THRESHOLDS)
        calibration.save(tmp / CALIBRATION_FILE)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        files = {**manifest.files, **{name: sha256_file(tmp / name) for name in (THRESHOLDS, CALIBRATION_FILE)}}
        note = f"{RETUNED} {now} on {samples} labelled samples (`distree retune`); compiled {manifest.created_utc}"
        notes = (*(n for n in manifest.notes if not n.startswith(RETUNED)), note)
        dataclasses.replace(manifest, plan=plan, files=files, notes=notes).save(tmp / MANIFEST)
