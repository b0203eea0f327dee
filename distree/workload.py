"""The load a pipeline is put under: Poisson arrivals (open loop) or back-to-back requesters (closed loop).

One definition for ``distree simulate`` (the model of the pipeline) and ``distree infer`` (the served pipeline),
so that a simulated load point and a measured one mean the same thing and can be set side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Load:
    """Open loop (Poisson arrivals at ``rate`` req/s) or closed loop (``clients`` back-to-back requesters)."""

    rate: Optional[float] = None
    clients: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.clients is None):
            raise ValueError("give exactly one of rate or clients")
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise ValueError(f"rate must be a finite number of requests/s > 0, got {self.rate}")
        if self.clients is not None and self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")

    @property
    def label(self) -> str:
        return f"{self.rate:.4g} req/s" if self.rate is not None else f"{self.clients} client(s)"


def arrival_times_ms(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` Poisson arrival times (ms from the first request's clock zero) at ``rate`` req/s. The same generator
    state gives the same draws scaled by 1/rate: runs at two rates are comparable request by request."""
    return np.cumsum(rng.exponential(1000.0 / rate, n))
