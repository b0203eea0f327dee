"""Children distree starts die with it (``distree.lifetime``): a killed distree leaves no server listening."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ctrl_c import wait_for
from distree.lifetime import dies_with_this_process


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for init counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_launched_command_is_itself_its_streams_and_exit_status_its_own():
    proc = subprocess.run(dies_with_this_process([sys.executable, "-c", "import os, sys; print(os.getpid()); "
                                                  "print('to stderr', file=sys.stderr); raise SystemExit(3)"]),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stderr == "to stderr\n" and proc.stdout.strip().isdigit()


def test_a_killed_parent_takes_what_it_launched_with_it():
    """A distree killed by SIGKILL (the OOM killer) or SIGTERM (a cancelled job) ran nothing to stop its servers."""
    for sig in (signal.SIGKILL, signal.SIGTERM):
        parent = subprocess.Popen([sys.executable, "-c", "import subprocess, time\n"
                                   "from distree.lifetime import dies_with_this_process\n"
                                   "child = subprocess.Popen(dies_with_this_process(['sleep', '600']))\n"
                                   "print(child.pid, flush=True)\n"
                                   "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        if not wait_for(lambda: _gone(child), 10.0):
            os.kill(child, signal.SIGKILL)
            raise AssertionError(f"the launched process outlived its parent killed by {sig.name}")


def test_a_parent_gone_before_the_launcher_asked_stops_it_at_once():
    """The launcher checks its parent after asking: had it died in between, no signal would ever come."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "import os, subprocess, sys\n"
                           "from distree.lifetime import dies_with_this_process\n"
                           "argv = dies_with_this_process(['sleep', '600'])\n"
                           "argv[3] = str(os.getpid() + 10**6)      # a parent that is not this one\n"
                           "sys.exit(subprocess.run(argv).returncode)\n"], timeout=60)
    assert proc.returncode == 1 and time.monotonic() - start < 30
