"""Ctrl-C ends a long search, not the program: a solve returns the best plan it holds, with its proven gap and the
status ``interrupted`` (:data:`~distree.solver.plan.INTERRUPTED`), as HiGHS, Gurobi and CPLEX do; tuning keeps
the records it has measured and the build goes on with them; profiling stops after the unit under way, every unit
measured kept for the same command to resume (a profile with units missing plans nothing). A second Ctrl-C aborts as
usual.

A proof may take far longer than a user wants to wait (the trained ResNet-110: still 1.3% open after 600 s), and so
may tuning (minutes a device); what they hold by then is what the user wants. While :func:`ctrl_c_ends` is on,
SIGINT sets a flag in shared memory, made before any worker is forked; the search looks at :func:`requested` where
it looks at its clock (the tree every 64 nodes, the local searches of the kicks and dives every step, HiGHS
through its interrupt callback, tuning before each round), in this process and in its forked workers (which
ignore SIGINT themselves), and ends as if its time were up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from multiprocessing.sharedctypes import RawValue
from typing import Iterator, Optional

_flag: Optional[RawValue] = None    # set while a search listens for Ctrl-C


def requested() -> bool:
    """Whether the user asked the search under way to stop (always False outside :func:`ctrl_c_ends`)."""
    return _flag is not None and bool(_flag.value)


def listening() -> bool:
    """Whether a Ctrl-C now would end a search (HiGHS is given its interrupt callback only then)."""
    return _flag is not None


@contextlib.contextmanager
def ctrl_c_ends(what: str, keeps: str) -> Iterator[None]:
    """Within it, the first Ctrl-C (SIGINT) asks ``what`` to stop and says on stderr that it ``keeps`` what it
    found; the second raises KeyboardInterrupt. A no-op outside the main thread, where SIGINT is not Python's own
    handler (a background job ignores it; a caller may have its own), or when already on (a sweep's solves)."""
    global _flag
    if (_flag is not None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    flag = RawValue("b", 0)

    def on_sigint(signum, frame) -> None:
        if flag.value:
            raise KeyboardInterrupt
        flag.value = 1
        # os.write, not print: a handler may run while the main thread is inside a write to stderr
        os.write(2, f"\ndistree: Ctrl-C: {what} stops and keeps {keeps} (Ctrl-C again aborts)\n".encode())

    _flag = flag
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _flag = None
