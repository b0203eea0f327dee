"""Processes distree starts must not outlive it.

When distree is killed (SIGTERM from a cancelled CI job or ``timeout``, SIGKILL from the OOM killer) nothing of its
own runs to stop what it started: the solver's forked workers went on to their time limit on every core, and a
server it started (the emulated aarch64 TVM RPC server, the profiler's gRPC peer, a loopback stage) listened on for
good. On Linux the kernel can kill a child when its parent dies (``prctl(PR_SET_PDEATHSIG)``, kept across
``exec``); a forked worker asks for it itself (:func:`die_with`), a command is started through a two-line launcher
that asks and then becomes the command (:func:`dies_with_this_process`). Elsewhere children still outlive it.

The kernel sends the signal when the *thread* that started the child ends: start such children from a thread
that lives as long as they should (the main thread, in distree).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Sequence

PR_SET_PDEATHSIG = 1            # prctl(2)

# what the launcher runs: no distree import (the child may run with another PYTHONPATH, e.g. an aarch64 root's)
_LAUNCHER = ("import ctypes, os, sys\n"
             "try:\n"
             f"    ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGKILL)})\n"
             "except (OSError, AttributeError):\n"
             "    pass\n"
             "if os.getppid() != int(sys.argv[1]):\n"
             "    os._exit(1)\n"
             "os.execvp(sys.argv[2], sys.argv[2:])\n")


def die_with(parent: int) -> None:
    """Have the kernel kill this (forked) process when the thread of ``parent`` that forked it ends; exit now if
    ``parent`` died before the call (nothing would signal this one then). A no-op where prctl is missing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):   # not Linux
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def dies_with_this_process(command: Sequence[str]) -> list[str]:
    """``command`` (an argv) started through a launcher that has it killed when this process dies, for
    ``subprocess.Popen``; the launcher ``exec``s it, so the child's pid, streams and exit status are its own."""
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command]
