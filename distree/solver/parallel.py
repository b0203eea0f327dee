"""A best-first :class:`~distree.solver.bnb.Tree` run on several cores: its open nodes dealt out to forked workers;
the kicks of the iterated local search, one seed a core (:func:`kicks_on_cores`); and work in a worker beside work
in this process (:func:`side_by_side`).

The tree's open nodes, sorted by bound, are dealt round-robin to ``jobs`` forked processes (each inherits the
problem, its tables and numba's compiled kernels; nothing is copied but what a worker writes), and each goes on
best first with its share. Dealing by bound order gives every worker a like mix of easy and hard nodes: on the
example's 22 trained exits (pi4 + Orin, proof after 3 s of tree) the two halves took 12.7 and 12.4 s alone
against 26.0 s for the whole, and 13.9 s side by side on 2 cores; in `distree plan` with 2, 4 and 8 workers (4 and
8 on those 2 cores) each worker's node count was within 1.2% of the others', so no work is passed between them.

What the workers share (:class:`Share`): the best plan's total, by which each prunes (a plan found by one cuts
the others' trees at once), and each one's proven bound, for progress. A worker's bound is valid for its own
nodes; the run's bound is the smallest of them, the plan the best any worker holds, and the run is complete only
when every worker is. The tree then holds no open nodes (what the workers left open is its dropped bound): a
forked run is a solve's last.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from distree.errors import DistreeError
from distree.interrupt import requested
from distree.lifetime import die_with
from distree.solver.bnb import PROGRESS_EVERY_S
from distree.solver.heuristic import Candidate, iterated_local_search

if TYPE_CHECKING:
    from distree.solver.bnb import BnbResult, Progress, Tree
    from distree.solver.problem import Problem

MIN_NODES_PER_JOB = 64          # open nodes a worker gets at least: a tree with fewer is first grown in this process
OPENING_SLICE_S = 0.05          # in slices of this long
PUBLISH_EVERY_S = 0.5           # how often a worker publishes its proven bound
POLL_S = 0.2                    # how often the parent looks for plans found and tells progress
FREE_S_PER_NODE = 2e-6          # what freeing an open node takes (measured: 434k nodes, 0.8 s)
EXIT_GRACE_S = 30.0             # past the time limit, how long a worker may take to report before it counts as lost


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count); 1 where processes cannot
    be forked (the workers inherit the tree: they are not started afresh)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


class Share:
    """What the forked workers of one tree share (sums over samples, as the tree keeps them); each worker's
    copy knows its own index."""

    def __init__(self, best_total: float, bound_total: float, jobs: int, n_samples: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self._best = ctx.Value("d", best_total)
        self._bounds = ctx.Array("d", [bound_total] * jobs, lock=False)     # until each worker publishes its own
        self._found = ctx.SimpleQueue()
        self._n = n_samples
        self.worker = 0
        self._published = 0.0

    def sync(self, proven_total: float) -> float:
        """Publish this worker's proven bound (every PUBLISH_EVERY_S); the best plan's total any worker holds."""
        now = time.monotonic()
        if now - self._published >= PUBLISH_EVERY_S:
            self._bounds[self.worker] = proven_total
            self._published = now
        return self._best.value

    def found(self, best: Candidate) -> None:
        """A better plan: the siblings prune by it from their next sync, the parent shows it."""
        with self._best.get_lock():
            self._best.value = min(self._best.value, best.expected_ms * self._n)
        self._found.put(best)

    def proven_total(self) -> float:
        return float(min(self._bounds))

    def plans_found(self) -> list[Candidate]:
        plans = []
        while not self._found.empty():
            plans.append(self._found.get())
        return plans


def run_tree(tree: Tree, time_limit_s: float, jobs: int = 1, incumbent: Optional[Candidate] = None,
             progress: Optional[Progress] = None) -> BnbResult:
    """``tree.run`` on ``jobs`` cores: forked workers when the tree is best first and has enough open nodes
    for them, else in this process."""
    _check_jobs(jobs)
    tree.offer(incumbent)
    stop_at = time.perf_counter() + time_limit_s
    if jobs == 1 or not tree.best_first:
        return tree.run(time_limit_s, progress=progress)
    while len(tree.open) < MIN_NODES_PER_JOB * jobs:      # a tree from its root: open enough nodes to deal out
        result = tree.run(min(OPENING_SLICE_S, max(0.0, stop_at - time.perf_counter())), progress=progress)
        if result.complete or time.perf_counter() >= stop_at or requested():
            return result
    return _run_forked(tree, max(0.0, stop_at - time.perf_counter()), jobs, progress)


def _check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1 and "fork" not in multiprocessing.get_all_start_methods():
        raise DistreeError(f"--jobs {jobs} needs processes that can be forked, which this platform lacks; "
                           "use --jobs 1")


def _run_forked(tree: Tree, time_limit_s: float, jobs: int, progress: Optional[Progress]) -> BnbResult:
    t0 = time.perf_counter()
    n = tree.p.n_samples
    before = tree.result()
    dealt = sorted(tree.open)
    # the workers stop in time for this process to free its open nodes after them (freed while they run, each
    # page the workers share would be copied first); dealing them out counts too (434k nodes: 0.7 s, 0.8 s to free)
    stop_at = t0 + time_limit_s - FREE_S_PER_NODE * len(dealt)
    share = Share(tree.incumbent_total(), tree.proven_total(), jobs, n)
    told_at = time.monotonic()

    def meanwhile() -> None:
        nonlocal told_at
        for plan in share.plans_found():
            tree.offer(plan)
        if progress is not None and time.monotonic() - told_at >= PROGRESS_EVERY_S:
            told_at = time.monotonic()
            progress(tree.best, min(share.proven_total(), tree.incumbent_total()) / n)

    def work(k: int) -> BnbResult:
        share.worker = k
        tree.work_on(dealt[k::jobs], share, jobs)
        return tree.run(max(0.0, stop_at - time.perf_counter()))

    results = _forked(work, jobs, time_limit_s, "bnb", "branch-and-bound", "each worker holds its own open nodes",
                      meanwhile)
    return tree.absorb(results, before, time.perf_counter() - t0)


def kicks_on_cores(p: Problem, start: Candidate, time_limit_s: float, jobs: int) -> Candidate:
    """:func:`~distree.solver.heuristic.iterated_local_search` from ``start`` with seeds 0 .. jobs - 1 side by
    side in forked workers; the best plan (the lowest seed's among equals), so a run is as repeatable as one
    seed's. The kicks' luck varies: a trained ResNet-110 (3 devices, 3 s of kicks from the same plan) ends at
    1.7109, 1.7023, 1.7045 and 1.7895 ms with seeds 0-3."""
    _check_jobs(jobs)
    if jobs == 1 or time_limit_s <= 0:
        return iterated_local_search(p, start, time_limit_s=time_limit_s)
    return _kicks(p, start, time_limit_s, jobs, None)


def kicks_beside(p: Problem, start: Candidate, time_limit_s: float, jobs: int, step: Callable[[], bool],
                 dive: Optional[Callable[[], Candidate]] = None) -> Candidate:
    """Kicks from ``start`` in ``jobs`` - 1 forked workers (seeds 0 .. jobs - 2; the best plan, as
    :func:`kicks_on_cores` gives it), for ``jobs`` >= 2, while this process calls ``step()`` again and again, a
    short slice of work each (until it returns False). ``dive``: worker 0 first calls it (on its copy of what this
    process holds: a solve's dives from its tree's open nodes), and kicks from the better of its plan and ``start``
    for the rest of ``time_limit_s``. A solve grows its best-first tree here meanwhile: on a
    trained ResNet-110 the kicks found nothing after the dives, and the tree's 3 s more on a core took a 10 s solve
    from 13.1% to 11.0-11.3%. In slices, the tree goes on to every core as soon as the kicks end: they stop after
    100 kicks in a row without a gain, 4.3 s into that instance's 18 s share of a 60 s solve, whose tree then grew
    on one core for the rest of it (4.03% -> 3.60%)."""
    _check_jobs(jobs)
    if jobs < 2:
        raise ValueError(f"kicks beside other work need 2 or more jobs, got {jobs}")
    return _kicks(p, start, time_limit_s, jobs - 1, step, dive)


def _kicks(p: Problem, start: Candidate, time_limit_s: float, workers: int,
           meanwhile: Optional[Callable[[], Optional[bool]]], dive: Optional[Callable[[], Candidate]] = None
           ) -> Candidate:
    """Seeds 0 .. workers - 1 in forked workers (seed 0 after ``dive``, see :func:`kicks_beside`); the best plan,
    the lowest seed's among equals."""
    def work(k: int) -> Candidate:
        stop_at, begin = time.perf_counter() + time_limit_s, start
        if k == 0 and dive is not None:
            begin = min((dive(), start), key=lambda c: c.expected_ms)
        return iterated_local_search(p, begin, time_limit_s=max(0.0, stop_at - time.perf_counter()), seed=k)

    found = _forked(work, workers, time_limit_s, "kicks", "local-search", "each worker holds its own search state",
                    meanwhile)
    return min(found, key=lambda c: c.expected_ms)


def side_by_side(there: Callable[[], Any], here: Callable[[], Any], time_limit_s: float, jobs: int,
                 then: Optional[Callable[[Any], bool]] = None) -> tuple[Any, Any]:
    """``there()`` (done within ``time_limit_s``; its result picklable) and ``here()``, side by side where ``jobs``
    > 1: ``there`` in a forked worker. A solve's first plan (with what its report needs) and its placement
    classes' screen need nothing of each other: 0.58 + 0.73 s and 1.2 s of a 10 s solve of a trained ResNet-110.
    ``then``: once ``here()`` is done, while ``there`` still runs, ``then(what here() returned)`` again and again, a
    short slice of work each, until it returns False (a solve grows its tree there: the core would idle)."""
    _check_jobs(jobs)
    if jobs == 1:
        return there(), here()
    done: list = []
    going = [then is not None]

    def meanwhile() -> bool:            # _forked calls it once the worker runs: here() goes on meanwhile
        if not done:
            done.append(here())
        elif going[0]:
            going[0] = then(done[0])
        return going[0]

    [result] = _forked(lambda k: there(), 1, time_limit_s, "beside", "side-by-side",
                       "it holds its own copy of what it computes", meanwhile)
    return result, done[0] if done else here()


def _forked(work: Callable[[int], Any], jobs: int, time_limit_s: float, name: str, what: str, memory: str,
            meanwhile: Optional[Callable[[], Optional[bool]]]) -> list:
    """``work(k)`` for k = 0 .. jobs - 1, each in a forked process named distree-``name``-k (it inherits
    everything; only its result is sent back); their results in order of k. ``meanwhile`` runs while they work:
    again at once while it returns True (it then keeps each call short), else every POLL_S. A worker that dies
    before reporting is a DistreeError naming what to do (``what`` and ``memory`` word it)."""
    ctx = multiprocessing.get_context("fork")
    sys.stdout.flush()          # else a worker's exit flushes a copy of what this process had buffered
    sys.stderr.flush()
    gc.freeze()                 # a worker's collections would otherwise touch, and so copy, every inherited object
    workers, pipes = [], []
    for k in range(jobs):
        receive, send = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_work, args=(work, k, send, os.getpid()), daemon=True,
                             name=f"distree-{name}-{k}")
        worker.start()
        send.close()
        workers.append(worker)
        pipes.append(receive)
    results: dict[int, Any] = {}
    give_up = time.monotonic() + time_limit_s + EXIT_GRACE_S
    try:
        while len(results) < jobs:
            for k, pipe in enumerate(pipes):
                if k in results or not pipe.poll():
                    continue
                try:
                    results[k] = pipe.recv()
                except EOFError:        # it ended without a word: killed (out of memory?) or crashed
                    workers[k].join()
                    code = workers[k].exitcode
                    why = " (SIGKILL: out of memory?)" if code == -signal.SIGKILL else ""
                    raise DistreeError(f"{what} worker {workers[k].name} died, exit code {code}{why}, before "
                                       f"reporting; run with fewer --jobs ({memory}), or --jobs 1 to see whether "
                                       f"it fails alone") from None
            busy = meanwhile is not None and meanwhile()
            if time.monotonic() > give_up:
                raise RuntimeError(f"{what} workers did not report within {EXIT_GRACE_S:g} s after the time limit")
            waiting = [p for k, p in enumerate(pipes) if k not in results]
            if waiting:     # waiting on none would sleep POLL_S after the last result (0.2 s past every --time-limit)
                multiprocessing.connection.wait(waiting, timeout=0.0 if busy else POLL_S)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
            worker.join()
        gc.unfreeze()
    return [results[k] for k in range(jobs)]


def _work(work: Callable[[int], Any], k: int, send: multiprocessing.connection.Connection, parent: int) -> None:
    """In a forked worker: ``work(k)``, and send its result."""
    die_with(parent)
    # fresh stream objects: the inherited ones may hold what another thread of the parent (a status line)
    # buffered after the flush before the fork, and a worker's exit would write it again
    sys.stdout, sys.stderr = _fresh_stream(1), _fresh_stream(2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle: it ends the workers
    send.send(work(k))
    send.close()


def _fresh_stream(fd: int):
    try:
        return os.fdopen(os.dup(fd), "w")
    except OSError:             # no such descriptor (a daemon's): nothing to write to
        return open(os.devnull, "w")
