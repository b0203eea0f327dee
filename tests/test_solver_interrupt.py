"""Ctrl-C ends a solve's search and keeps its best plan (``distree.interrupt``): `distree plan` as a user runs
it, in its own process group, SIGINT sent to the whole group as a terminal sends it; the sweep; HiGHS's callback;
and the compile cache, which must not keep such a plan. And a solve killed outright leaves no worker behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctrl_c import ctrl_c_once_listening, wait_for
from distree.compiler.pipeline import _Cache
from distree.interrupt import ctrl_c_ends, listening, requested
from distree.solver.milp import solve_milp
from distree.solver.plan import INTERRUPTED, Plan
from distree.solver.problem import Constraints, build_problem
from distree.solver.synthetic import synthetic_case

ROOT = Path(__file__).resolve().parents[1]
RESNET110 = ROOT / "benchmarks" / "data" / "resnet110-trained"      # no proof within minutes: always interrupted
DISTREE = [sys.executable, "-m", "distree"]
FILES = ["--chain", str(RESNET110 / "chain.json.gz"), "--calibration", str(RESNET110 / "calibration.json.gz"),
         "--profile", str(RESNET110 / "profile.json.gz"), "--devices", "pi4,jetson-orin-nano,x86-server"]
LIMIT_S = 300


def _ctrl_c(args: list[str], after_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run distree in a process group of its own, SIGINT at default (a background shell ignores it), and send the
    group SIGINT ``after_s`` seconds in; what it printed and how long it ran after that."""
    def preexec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setpgid(0, 0)
    proc = subprocess.Popen([*DISTREE, *args], preexec_fn=preexec, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    time.sleep(after_s)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=LIMIT_S)
    assert not _running(proc.pid), f"processes left behind in the group: {_running(proc.pid)}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - sent


@pytest.mark.slow
def test_ctrl_c_ends_the_search_and_keeps_its_best_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    run, after = _ctrl_c(["plan", *FILES, "--time-limit", str(LIMIT_S), "-o", str(out)], 8.0)
    assert run.returncode == 0, run.stderr
    assert "Ctrl-C" in run.stderr and "status interrupted" in run.stdout
    assert after < LIMIT_S / 3, f"the solve went on {after:.0f} s after Ctrl-C"    # not to its limit
    plan = Plan.load(out)
    assert plan.status == INTERRUPTED and plan.gap > 0 and plan.wall_s < LIMIT_S / 2
    assert plan.sol_status.startswith("stopped by Ctrl-C")
    assert round(plan.accuracy * plan.n_samples) >= plan.required_correct     # a feasible plan, not a guess


def test_ctrl_c_is_left_alone_where_it_is_ignored() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_ends("the search", "its best plan so far"):
            assert not listening() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_no_worker_outlives_a_killed_solve() -> None:
    """Killed (a cancelled CI job, `timeout`, the OOM killer), a solve leaves no worker computing on to its limit."""
    proc = subprocess.Popen([*DISTREE, "plan", *FILES, "--time-limit", str(LIMIT_S), "--jobs", "2"], cwd=ROOT,
                            preexec_fn=lambda: os.setpgid(0, 0),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # three processes: the tree's two workers, which would go on to the limit (the earlier ones end sooner)
        assert wait_for(lambda: len(_running(proc.pid)) >= 3, 120.0), "the tree's workers were not forked"
        proc.kill()                     # SIGKILL: the parent runs no handler of its own
        proc.wait()
        assert wait_for(lambda: not _running(proc.pid), 10.0), f"workers left running: {_running(proc.pid)}"
    finally:
        subprocess.run(["pkill", "-KILL", "-g", str(proc.pid)])


def _running(group: int) -> list[str]:
    """Processes of ``group`` not yet dead (a killed one may stay a zombie until its new parent reaps it)."""
    pids = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def test_the_first_ctrl_c_asks_the_second_aborts_and_the_handler_is_restored(python_handles_sigint) -> None:
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_ends("the search", "its best plan so far"):
            assert listening() and not requested()
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(requested)
            os.kill(os.getpid(), signal.SIGINT)         # raises here, in this (the main) thread
            wait_for(lambda: False)
    assert not listening() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_leaves_the_later_drops_unsolved(tmp_path: Path) -> None:
    out = tmp_path / "frontier.json"
    run, _ = _ctrl_c(["plan", *FILES, "--time-limit", str(LIMIT_S), "--sweep", "accuracy-drop=0.02,0.01",
                      "-o", str(out)], 8.0)
    assert run.returncode == 0, run.stderr
    points = json.loads(out.read_text())["plans"]
    first, second = points                      # in the order given; 0.01 is solved first
    assert second is not None and second["status"] == INTERRUPTED
    assert first is None and "Ctrl-C ended the sweep" in run.stdout


def test_highs_stops_at_ctrl_c(python_handles_sigint) -> None:
    """The MILP (which the tree's route skips once Ctrl-C came) stops through HiGHS's interrupt callback: this
    model leaves a 9.9% gap after 60 s of HiGHS, so it would run to its limit."""
    case = synthetic_case(55, 54, 8, 3, 300, seed=1, exit_every=True)
    p, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
    t0 = time.perf_counter()
    with ctrl_c_ends("the search", "its best plan so far"):
        ctrl_c_once_listening(2.0)
        result = solve_milp(p, time_limit_s=LIMIT_S)
        assert requested()
    assert not requested() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert result.status != "optimal" and time.perf_counter() - t0 < LIMIT_S / 3       # not to its limit


def test_the_compile_cache_keeps_no_unfinished_result(tmp_path: Path) -> None:
    logged: list[str] = []
    cache = _Cache(tmp_path, logged.append)
    calls: list[int] = []

    def compute() -> dict:
        calls.append(1)
        return {"status": "interrupted"}

    saved: list[Path] = []
    for _ in range(2):
        cache.get("plan", "k", compute, save=lambda folder, value: saved.append(folder), load=lambda folder: {},
                  unfinished=lambda value: "Ctrl-C ended its search" if value["status"] == "interrupted" else "")
    assert len(calls) == 2 and not saved and not (tmp_path / "plan" / "k" / "done").exists()
    assert "plan: not cached (Ctrl-C ended its search)" in logged
