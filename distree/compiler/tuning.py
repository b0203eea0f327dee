"""MetaSchedule tuning under a wall-clock budget, with a reusable record cache (issue 7).

Why a scheduler of our own: TVM's ``tune_relax`` has no time limit and its gradient scheduler starves
small tasks; TVM's own untuned CPU code was 6-60x slower than ONNX Runtime (per block, measured here; distree's
default schedules, :mod:`distree.targets.schedules`, now bring it to about par, and tuning goes on from there).
:func:`tune` therefore drives
MetaSchedule's ``tune_tasks`` with :class:`_BudgetScheduler`, which

* stops at the deadline (it predicts whether one more round still fits), or at Ctrl-C once the round under way
  ends (:mod:`distree.interrupt`: what was measured is kept, as at the deadline),
* gives every task without records a first round (most expensive first), then shares trials so that
  each task's trials (earlier runs included) follow its share of the model's latency (calls x best
  time so far): small tasks get their round, the expensive convolutions get the rest, and
* joins every measurement before the next build, so timings are not taken while the builder runs.

Records live in a MetaSchedule JSON database under ``db_dir/<target key>/``. Workloads are keyed by
the structure of each fused TIR function's anchor block (MetaSchedule's "anchor-block" equality: the conv
of conv+add+relu and of conv+add+add+relu is one task, its schedule applied to both), so a second run
extends the same records and a database tuned on a whole model applies to every segment cut from it.
The database files are replaced atomically at the end of a run; a killed run (or a second Ctrl-C) leaves the old
ones.

Where candidates run: on this machine for targets of its architecture; for a remote CPU (a Raspberry Pi)
they are built here, linked with the target's cross compiler, and timed on the device's TVM RPC server
(:class:`_RpcRunner`: one direct ``host:port`` session, the same connection ``distree profile --rpc``
uses; MetaSchedule's stock RPCRunner needs a tracker that the device's server would have to register
with, and starts a session per candidate in worker processes). CUDA targets are not tuned: that needs
MetaSchedule measuring on the GPU, which distree has no path (and no GPU here) for.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from distree.targets.schedules import prepare, schedule_defaults
from distree.targets.toolchain import host_arch, import_onnx
from distree.errors import DistreeError
from distree.interrupt import ctrl_c_ends, requested

_log = logging.getLogger(__name__)

_DB_FILES = ("database_workload.json", "database_tuning_record.json")
_MODULE_EQUALITY = "anchor-block"

# Search settings that work on a small shared CPU (see notes/tvm-0.27.md): a smaller population and
# one genetic iteration keep each round's search to seconds instead of minutes.
_POPULATION = 128
_GENETIC_ITERS = 1
_TRIALS_PER_ROUND = 16
_BUILD_TIMEOUT_S = 120.0
_RUN_TIMEOUT_S = 60.0
_BUILDS_PER_WORKER = 64


@dataclass(frozen=True)
class TaskReport:
    """One tuning task (a fused TIR function) after a run."""

    name: str
    weight: int                    # how many times the model calls it
    flops: float                   # per call
    trials: int                    # measured in this run
    earlier: int                   # records the database held before this run (reused, not re-measured)
    best_us: float | None          # best time per call in the database after the run (None: no record)


@dataclass(frozen=True)
class TuningResult:
    """What :func:`tune` did: where the records are, how many trials it measured and how long it took."""

    db_dir: Path
    trials: int
    wall_s: float
    stopped: str                   # "deadline", "max_trials" or "exhausted" (no task has candidates left)
    measured_on: str = "local"     # "local" (this machine) or "rpc://host:port"
    tasks: tuple[TaskReport, ...] = field(default=())


# --------------------------------------------------------------------------------------------------
# Targets and the pipeline shared by tuning and applying


def as_target(target: tvm.target.Target | Mapping[str, Any]) -> tvm.target.Target:
    """A TVM target from a Target or a dict (TVM 0.27 takes dicts only)."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, Mapping):
        return tvm.target.Target(dict(target))
    raise DistreeError(f"target must be a TVM Target or a dict like {{'kind': 'llvm'}}, got {type(target).__name__}")


def target_key(target: tvm.target.Target | Mapping[str, Any]) -> str:
    """Folder name for a target's records: readable prefix plus a hash of the full target."""
    t = as_target(target)
    text = str(t)
    attrs = json.loads(text) if text.startswith("{") else {}
    cpu = attrs.get("mcpu") or attrs.get("arch") or "generic"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{t.kind.name}-{cpu}-{digest}"


def records_dir(db_dir: str | os.PathLike, target: tvm.target.Target | Mapping[str, Any]) -> Path:
    return Path(db_dir) / target_key(target)



# --------------------------------------------------------------------------------------------------
# Applying records


def has_records(db_dir: str | os.PathLike, target: tvm.target.Target | Mapping[str, Any]) -> bool:
    """Whether ``db_dir`` holds at least one tuning record for ``target``."""
    path = records_dir(db_dir, target) / _DB_FILES[1]
    return path.is_file() and path.stat().st_size > 0


def _open_database(folder: Path) -> ms.database.JSONDatabase:
    return ms.database.JSONDatabase(
        path_workload=str(folder / _DB_FILES[0]),
        path_tuning_record=str(folder / _DB_FILES[1]),
        allow_missing=True,
        module_equality=_MODULE_EQUALITY,
    )


def apply_tuning(
    mod: tvm.IRModule, target: tvm.target.Target | Mapping[str, Any], db_dir: str | os.PathLike | None
) -> tvm.IRModule:
    """``mod`` legalized and fused, with every fused function found in the records replaced by its
    tuned schedule; compile the result with ``tvm.compile(result, target=target)``.

    Functions without a record keep TVM's default (untuned) code. Without records for ``target``
    (see :func:`has_records`) ``mod`` is returned unchanged.
    """
    t = as_target(target)
    if db_dir is None or not has_records(db_dir, t):
        return mod
    database = _open_database(records_dir(db_dir, t))
    prepared = prepare(mod, t)
    with t, database, tvm.transform.PassContext(opt_level=3):
        # MetaScheduleApplyDatabase marks what it replaced "tirx.is_scheduled": the default schedules skip those
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)


def build_tvm(
    model: onnx.ModelProto | tvm.IRModule,
    target: tvm.target.Target | Mapping[str, Any],
    db_dir: str | os.PathLike | None = None,
) -> tvm.runtime.Executable:
    """Compile an ONNX model (or a Relax module) for ``target``, with tuned schedules when ``db_dir``
    holds records for it and distree's default schedules for the kernels they do not cover."""
    t = as_target(target)
    mod = import_onnx(model) if isinstance(model, onnx.ModelProto) else model
    return tvm.compile(schedule_defaults(apply_tuning(mod, t, db_dir), t).mod, target=t)


# --------------------------------------------------------------------------------------------------
# Tuning


def extract_tasks(models: Iterable[tvm.IRModule], target: tvm.target.Target) -> list[ms.ExtractedTask]:
    """The tuning tasks of all ``models``; functions that are one workload for the database (same anchor
    block) are one task whose weight is their total number of calls."""
    workloads = ms.database.MemoryDatabase(module_equality=_MODULE_EQUALITY)
    keys: list[Any] = []
    merged: list[ms.ExtractedTask] = []
    for mod in models:
        for task in ms.relax_integration.extract_tasks(prepare(mod, target), target,
                                                       module_equality=_MODULE_EQUALITY):
            key = workloads.commit_workload(task.dispatched[0])
            pos = next((i for i, k in enumerate(keys) if k.same_as(key)), None)
            if pos is None:
                keys.append(key)
                merged.append(task)
            else:
                same = merged[pos]
                merged[pos] = ms.ExtractedTask(task_name=same.task_name, mod=same.mod, target=same.target,
                                               dispatched=same.dispatched, weight=int(same.weight) + int(task.weight))
    return merged


@dataclass
class _TaskStats:
    """What the scheduler knows about one task during a run."""

    weight: int
    flops: float
    earlier: int = 0               # records from earlier runs
    trials: int = 0                # trials in this run
    failed: int = 0                # of which no time came back (build/run error, or the device was lost)
    best_s: float = math.inf       # best measured time per call (this run or earlier records)

    def measured(self) -> int:
        return self.earlier + self.trials

    def cost_s(self) -> float:
        """Estimated share of the model's latency: calls x best time (a FLOP guess before any record)."""
        per_call = self.best_s if math.isfinite(self.best_s) else self.flops / 50e9 + 2e-6
        return self.weight * per_call


@derived_object
class _StatsCallback(ms.measure_callback.PyMeasureCallback):
    """Counts trials and tracks the best time of each task as results arrive."""

    def __init__(self, stats: list[_TaskStats]) -> None:
        self.stats = stats

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        s = self.stats[task_id]
        for result in runner_results:
            s.trials += 1
            s.failed += result.error_msg is not None or not result.run_secs
            if result.error_msg is None and result.run_secs:
                secs = sorted(float(x) for x in result.run_secs)
                s.best_s = min(s.best_s, secs[len(secs) // 2])


@derived_object
class _BudgetScheduler(ms.task_scheduler.PyTaskScheduler):
    """Round-robin first round (largest estimated cost first), then trials in proportion to each task's
    share of latency; stops when the next round would not finish before the deadline."""

    def __init__(self, stats: list[_TaskStats], names: list[str], deadline: float, max_trials: int | None,
                 halted: Callable[[], str | None] = lambda: None) -> None:
        super().__init__()
        self.halted = halted          # a reason to stop now (the device stopped answering), else None
        self.stats = stats
        self.names = names
        self.deadline = deadline
        self.max_trials = max_trials
        self.round_s = 0.0            # running estimate of one round's duration (the first always runs)
        self.last_pick: float | None = None
        self.rounds = 0
        self.stopped = "exhausted"

    def next_task_id(self) -> int:
        outer = self._outer()
        for task_id, record in enumerate(outer.tasks_):
            if not record.is_terminated and record.runner_futures is not None:
                outer.join_running_task(task_id)
        now = time.monotonic()
        if self.last_pick is not None:
            last = now - self.last_pick
            self.round_s = last if self.rounds == 1 else 0.5 * (self.round_s + last)
        live = [i for i, record in enumerate(outer.tasks_) if not record.is_terminated]
        if not live:
            return -1
        if (reason := self.halted()) is not None:
            self.stopped = reason
            return -1
        if self.rounds and now + self.round_s > self.deadline:      # the first round always runs
            self.stopped = "deadline"
            return -1
        if self.max_trials is not None and sum(s.trials for s in self.stats) >= self.max_trials:
            self.stopped = "max_trials"
            return -1
        untried = [i for i in live if self.stats[i].measured() == 0]
        if untried:
            pick = max(untried, key=lambda i: self.stats[i].cost_s())
        else:
            total = sum(self.stats[i].cost_s() for i in live)
            pick = min(live, key=lambda i: self.stats[i].measured() / (self.stats[i].cost_s() / total))
        self.last_pick = now
        self.rounds += 1
        s = self.stats[pick]
        _log.info("round %d: %s (%d trials, best %s), %.0f s left", self.rounds, self.names[pick], s.measured(),
                  f"{s.best_s * 1e6:.1f} us" if math.isfinite(s.best_s) else "none", self.deadline - now)
        return pick


def _lean_build_function():
    """MetaSchedule's default build minus ``import tvm.s_tir.tensor_intrin`` (CPU schedules here use no
    tensor intrinsics, and that import takes minutes on a loaded 2-core machine, so builds timed out).

    Returned as a closure so that cloudpickle ships it by value: build workers then need only ``tvm``,
    not this package.
    """

    def build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return build


def _shared_library_export(cc: str | None):
    """Export a built candidate as a shared library linked here by ``cc`` (None: this machine's default),
    which the device loads as is; MetaSchedule's default export is a .tar that the device would have to
    link itself. A closure, so that cloudpickle ships it by value."""

    def export(rt_mod) -> str:
        import os
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="distree-candidate-"), "candidate.so")
        rt_mod.export_library(path, **({"cc": cc} if cc else {}))
        return path

    return export


@derived_object
class _PooledBuilder(ms.builder.PyBuilder):
    """MetaSchedule's LocalBuilder with one worker pool for the whole run.

    LocalBuilder starts a fresh pool every round (against a slow leak), i.e. new interpreters that import
    tvm: 5-18 s per round on the loaded 2-core machine. Here each worker is recycled after
    ``_BUILDS_PER_WORKER`` builds instead.
    """

    def __init__(self, timeout_s: float, f_export: Callable[[Any], str] | None = None) -> None:
        from tvm.support.popen_pool import PopenPoolExecutor

        self.timeout_s = timeout_s
        self.f_build = _lean_build_function()
        self.f_export = f_export      # None: MetaSchedule's default (a .tar that this machine links)
        self.pool = PopenPoolExecutor(max_workers=os.cpu_count() or 1, timeout=timeout_s,
                                      maximum_process_uses=_BUILDS_PER_WORKER)

    def build(self, build_inputs):
        from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func
        from tvm.support.popen_pool import StatusKind

        jobs = [(self.f_build, self.f_export, x.mod, x.target, None) for x in build_inputs]
        results = []
        for done in self.pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
            if done.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_s} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {done.value}"))
        return results

    def shutdown(self) -> None:
        self.pool.shutdown()


@derived_object
class _DoneFuture(ms.runner.PyRunnerFuture):
    """A measurement that already finished (the RPC runner measures synchronously)."""

    def __init__(self, run_secs: list[float] | None, error: str | None) -> None:
        super().__init__()
        self.run_secs, self.error = run_secs, error

    def done(self) -> bool:
        return True

    def result(self) -> ms.runner.RunnerResult:
        return ms.runner.RunnerResult(self.run_secs, self.error)


@derived_object
class _RpcRunner(ms.runner.PyRunner):
    """Times candidates on a device's TVM RPC server at ``host:port``, one candidate after another.

    One session serves the whole run (servers serve one session at a time; a new one per candidate
    costs a handshake each). The device runs one TVM thread, as the local runner does. A candidate that
    fails is an error result for it alone; when the session breaks, one reconnect is tried (a forking
    ``tvm.exec.rpc_server`` survives a crashing candidate), and if that fails, or a measurement outlasts
    ``timeout_s``, the device is marked lost: the rest get errors and the scheduler stops (:meth:`lost`).
    """

    def __init__(self, address: str, evaluator: ms.runner.EvaluatorConfig, timeout_s: float) -> None:
        super().__init__()
        self.address, self.evaluator, self.timeout_s = address, evaluator, timeout_s
        self.session = None
        self.lost_reason: str | None = None
        self.rng = np.random.default_rng(0)

    def lost(self) -> str | None:
        return self.lost_reason

    def run(self, runner_inputs) -> list:
        return [_DoneFuture(*self._measure_with_timeout(x)) for x in runner_inputs]

    def _measure_with_timeout(self, runner_input) -> tuple[list[float] | None, str | None]:
        if self.lost_reason is not None:
            return None, self.lost_reason
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["secs"] = self._measure(runner_input)
            except Exception as exc:  # noqa: BLE001 - TVM raises TVMError/RuntimeError from the remote
                outcome["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"

        worker = threading.Thread(target=work, daemon=True, name=f"tuning-rpc-{self.address}")
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            self.lost_reason = f"device lost: rpc://{self.address} did not finish a measurement in {self.timeout_s:g} s"
            return None, self.lost_reason
        if "secs" in outcome:
            return outcome["secs"], None
        self.close()
        try:
            self.connect()
        except DistreeError as exc:
            self.lost_reason = f"device lost: {exc}"
        return None, outcome["error"]

    def connect(self):
        """The session, opened if needed (a DistreeError naming the address when the device is unreachable)."""
        if self.session is None:
            from distree.profiler.rpc import connect

            session = connect(self.address)
            session.get_function("runtime.config_threadpool")(1, 1)
            self.session = session
        return self.session

    def close(self) -> None:
        """Let the session go: the server then takes the next client (a profiler, a run)."""
        self.session = None
        import gc

        gc.collect()  # closes the socket, so the server takes the next session

    def _measure(self, runner_input) -> list[float]:
        from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

        session = self.connect()
        name = f"candidate_{self.rng.integers(1 << 62):x}.so"
        session.upload(runner_input.artifact_path, name)
        module = session.load_module(name)
        device = session.device(runner_input.device_type, 0)
        args = []
        for info in runner_input.args_info:
            kind, dtype, shape = info.as_json()
            if kind != "TENSOR":
                raise DistreeError(f"cannot make an argument of kind {kind} for a remote measurement")
            args.append(tvm.runtime.tensor(self.rng.standard_normal(shape).astype(dtype), device=device))
        secs = run_evaluator_common(module, device, self.evaluator, [args])
        session.remove(name)  # after a failure the session is replaced, and the server drops its files
        return secs


def _import_tensor_intrin_quickly() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (TuneContext needs it) with a shallow ``inspect.stack``.

    Each of its ~500 ``@T.prim_func`` calls ``inspect.stack()``, whose frame lookup scans every loaded
    module per frame: measured 400 s here under load. The parser reads only the nearest frames' source
    lines and the frames themselves further out, so frames beyond the third are given without source.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def shallow_stack(context: int = 1) -> list[inspect.FrameInfo]:
        infos = []
        frame = sys._getframe(1)
        while frame is not None:
            if len(infos) < 3:
                info = inspect.getframeinfo(frame, context)
                infos.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            else:
                infos.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                               frame.f_code.co_name, None, None, positions=None))
            frame = frame.f_back
        return infos

    full_stack = inspect.stack
    inspect.stack = shallow_stack
    try:
        importlib.import_module("tvm.s_tir.tensor_intrin")
    finally:
        inspect.stack = full_stack


def _single_thread_runtime() -> None:
    """Runner workers measure with one TVM thread, as the deployed small model runs."""
    os.environ["TVM_NUM_THREADS"] = "1"


def _quiet_meta_schedule_logger() -> None:
    """Warnings only (its console log is per trial), and no unnamed handlers: MetaSchedule's logging setup
    lists its logger's handlers by name and fails on one without (pytest's capture handlers land there
    after a first run in the same process)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.setLevel(logging.WARNING)
    for handler in [h for h in logger.handlers if h.get_name() is None]:
        logger.removeHandler(handler)


def _earlier_records(database: ms.database.Database, task: ms.ExtractedTask) -> tuple[int, float]:
    """(number of records, best time per call in s) the database already holds for ``task``."""
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return 0, math.inf
    records = database.get_top_k(database.commit_workload(mod), 1 << 20)
    if not records or not records[0].run_secs:
        return len(records), math.inf
    secs = sorted(float(x) for x in records[0].run_secs)
    return len(records), secs[len(secs) // 2]


def _flops(task: ms.ExtractedTask) -> float:
    return float(tvm.s_tir.analysis.estimate_tir_flops(task.dispatched[0]))


def tune(
    onnx_segments: onnx.ModelProto | list[onnx.ModelProto],
    target: tvm.target.Target | Mapping[str, Any],
    minutes: float,
    db_dir: str | os.PathLike,
    seed: int = 0,
    trials_per_round: int = _TRIALS_PER_ROUND,
    max_trials: int | None = None,
    rpc: str | None = None,
    cc: str | None = None,
) -> TuningResult:
    """Tune the fused functions of ``onnx_segments`` for ``target`` for at most ``minutes`` of wall-clock
    time, adding the records to ``db_dir`` (existing records are reused).

    Candidates are built here. Without ``rpc`` they are timed here (targets of this machine's
    architecture only); with ``rpc`` (``host:port`` of the device's TVM RPC server) they are linked by
    ``cc`` (the target's cross compiler; None for this architecture) and timed on the device.
    A round measures ``trials_per_round`` candidates of one task; the first round runs (unless Ctrl-C came
    first), later ones only if they are predicted to end before the deadline, and none once ``max_trials`` (if
    given) have been measured. A device that stops answering ends the run: the records measured so far
    are kept and a DistreeError says so. Ctrl-C ends it too, keeping them (``stopped``: "Ctrl-C").
    """
    started = time.monotonic()
    if not minutes > 0:
        raise DistreeError(f"tuning needs a positive number of minutes, got {minutes}")
    models = [onnx_segments] if isinstance(onnx_segments, onnx.ModelProto) else list(onnx_segments)
    if not models:
        raise DistreeError("nothing to tune: give at least one ONNX model")
    t = as_target(target)
    _check_where_measured(t, rpc, cc)
    deadline = started + minutes * 60.0
    evaluator = ms.runner.EvaluatorConfig(number=5, repeat=3, min_repeat_ms=20)
    remote = _RpcRunner(rpc, evaluator, _RUN_TIMEOUT_S) if rpc is not None else None
    if remote is not None:
        remote.connect()                       # an unreachable device fails here, before any work
    final_dir = records_dir(db_dir, t)
    # Layout-only functions (reshape, no arithmetic) have nothing to gain and would each cost a round.
    tasks = [x for x in extract_tasks((import_onnx(m) for m in models), t) if _flops(x) > 0]
    if not tasks:
        raise DistreeError("the model has no TVM functions with arithmetic to tune")
    final_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tuning.", dir=final_dir.parent))
    builder = None
    try:
        for name in _DB_FILES:
            if (final_dir / name).is_file():
                shutil.copy2(final_dir / name, scratch / name)
        database = _open_database(scratch)
        stats = []
        for x in tasks:
            earlier, best_s = _earlier_records(database, x)
            stats.append(_TaskStats(weight=int(x.weight), flops=_flops(x), earlier=earlier, best_s=best_s))
        _import_tensor_intrin_quickly()
        builder = _PooledBuilder(_BUILD_TIMEOUT_S, _shared_library_export(cc) if remote is not None else None)

        def halted() -> str | None:         # a reason to stop before the next round
            return "Ctrl-C" if requested() else remote.lost() if remote is not None else None

        scheduler = _BudgetScheduler(stats, [x.task_name for x in tasks], deadline, max_trials, halted)
        _quiet_meta_schedule_logger()
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks,
            work_dir=str(scratch / "logs"),
            strategy=ms.search_strategy.EvolutionarySearch(
                population_size=_POPULATION, genetic_num_iters=_GENETIC_ITERS
            ),
            seed=seed,
        )
        with ctrl_c_ends("tuning", "the records measured so far"):    # a round under way ends first
            ms.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(scratch / "logs"),
                max_trials_global=1 << 30,
                num_trials_per_iter=trials_per_round,
                builder=builder,
                runner=remote or ms.runner.LocalRunner(timeout_sec=_RUN_TIMEOUT_S, evaluator_config=evaluator,
                                                       initializer=_single_thread_runtime),
                database=database,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _StatsCallback(stats)],
                task_scheduler=scheduler,
                module_equality=_MODULE_EQUALITY,
            )
        reports = tuple(
            TaskReport(name=x.task_name, weight=s.weight, flops=s.flops, trials=s.trials, earlier=s.earlier,
                       best_us=None if not math.isfinite(b := _earlier_records(database, x)[1]) else b * 1e6)
            for x, s in zip(tasks, stats)
        )
        for name in _DB_FILES:
            if (scratch / name).is_file():
                os.replace(scratch / name, final_dir / name)
    finally:
        if builder is not None:
            builder.shutdown()
        if remote is not None:
            remote.close()
        shutil.rmtree(scratch, ignore_errors=True)
    result = TuningResult(
        db_dir=Path(db_dir),
        trials=sum(s.trials for s in stats),
        wall_s=time.monotonic() - started,
        stopped=scheduler.stopped,
        measured_on="local" if rpc is None else f"rpc://{rpc}",
        tasks=reports,
    )
    if result.stopped.startswith("device lost"):
        timed = sum(x.trials - x.failed for x in stats)
        raise DistreeError(f"tuning for {target_key(t)} stopped: {result.stopped}; the {timed} candidates timed "
                           f"before were kept in {final_dir}; restart the device's RPC server and rerun")
    return result


def _check_where_measured(target: tvm.target.Target, rpc: str | None, cc: str | None) -> None:
    """Refuse what cannot be measured: CUDA, or another architecture without its RPC server."""
    if target.kind.name != "llvm":
        raise DistreeError(f"tuning supports llvm (CPU) targets only, not {target.kind.name}: tuning CUDA "
                           "means measuring candidates on the GPU, which distree does not do")
    here = host_arch()
    arch = str(target.attrs.get("mtriple", "") or here).split("-")[0].replace("arm64", "aarch64")
    if rpc is None and arch != here:
        raise DistreeError(f"target {arch} is not this {here} machine: its candidates must be timed on the device "
                           "over TVM RPC; pass the address of its RPC server (distree compile --rpc DEVICE=HOST:PORT)")
    if rpc is not None and arch != here and cc is None:
        raise DistreeError(f"tuning for {arch} over RPC needs its cross compiler (cc) to link the candidates")
