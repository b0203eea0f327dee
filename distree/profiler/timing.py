"""How a latency is measured: warm-up, repeats of a batch of runs, median and p90."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from distree.serde import JsonRecord


@dataclass(frozen=True)
class TimingSettings(JsonRecord):
    """Each sample is the mean of as many runs as fill ``min_repeat_ms`` (at least one run).

    Tiny kernels last microseconds: one run per sample would measure the timer. ``threads`` = 1 by
    default: for models this small TVM's thread pool is slower than one thread (see notes/tvm-0.27.md).
    """

    warmup: int = 3
    repeats: int = 15
    min_repeat_ms: float = 5.0
    threads: int = 1


def summarize(samples_ms: tuple[float, ...]) -> tuple[float, float]:
    """(median, p90) of the samples."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    return float(np.median(arr)), float(np.percentile(arr, 90))


def time_callable(run: Callable[[], object], settings: TimingSettings) -> tuple[float, ...]:
    """Samples in ms of ``run`` under ``settings`` (the same scheme as TVM's ``time_evaluator``)."""
    for _ in range(settings.warmup):
        run()
    start = time.perf_counter()
    run()
    one_ms = (time.perf_counter() - start) * 1e3
    number = max(1, int(np.ceil(settings.min_repeat_ms / max(one_ms, 1e-6))))
    samples = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        for _ in range(number):
            run()
        samples.append((time.perf_counter() - start) * 1e3 / number)
    return tuple(samples)
