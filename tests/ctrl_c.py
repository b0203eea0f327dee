"""Ctrl-C as a user sends it, for the tests of ``distree.interrupt`` (the solver's and tuning's)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``condition`` for up to ``seconds`` (Python runs a signal's handler between bytecodes of the main
    thread: this gives it some)."""
    until = time.monotonic() + seconds
    while not condition() and time.monotonic() < until:
        time.sleep(0.01)
    return condition()


def ctrl_c_once_listening(after_s: float, also: Callable[[], bool] = lambda: True) -> threading.Thread:
    """A thread that sends this process SIGINT ``after_s`` seconds after a search starts listening for it
    (``distree.interrupt.listening``) and ``also()`` holds, as a user's Ctrl-C; it gives up after 10 minutes."""
    from distree.interrupt import listening

    def send() -> None:
        if wait_for(lambda: listening() and also(), 600.0):
            time.sleep(after_s)
            if listening():
                os.kill(os.getpid(), signal.SIGINT)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread
