"""The load shared by `distree simulate` and `distree infer`: one meaning for --rate and --clients."""

from __future__ import annotations

import numpy as np
import pytest

from distree.workload import Load, arrival_times_ms


@pytest.mark.parametrize("kwargs", [{}, {"rate": 10.0, "clients": 2}, {"rate": 0.0}, {"rate": -5.0},
                                    {"clients": 0}])
def test_a_load_is_exactly_one_of_a_positive_rate_or_at_least_one_client(kwargs):
    with pytest.raises(ValueError):
        Load(**kwargs)


def test_labels_name_the_load():
    assert Load(rate=250.0).label == "250 req/s" and Load(clients=3).label == "3 client(s)"


def test_the_same_seed_at_two_rates_gives_the_same_arrivals_scaled():
    slow = arrival_times_ms(100.0, 5000, np.random.default_rng(7))
    fast = arrival_times_ms(400.0, 5000, np.random.default_rng(7))
    assert np.all(np.diff(slow) > 0) and np.allclose(slow, 4.0 * fast)
    assert np.mean(np.diff(slow)) == pytest.approx(10.0, rel=0.05)      # 100 req/s: 10 ms apart on average
