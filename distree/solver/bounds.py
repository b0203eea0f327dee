"""The window bound: a lower bound on the expected latency that keeps each exit's threshold shared.

The free-choice bound (:func:`~distree.solver.costs.free_choice_ms`) lets every sample pick its own exit,
so a sample that would answer wrongly at an early exit simply skips it, and nobody pays for evaluating heads
on the way. Both are what makes it weak (measured: most of the gap on the ResNet-110-scale case). This bound
keeps both, for part of each sample's path:

* a sample's *first chance* is the first exit (at or after ``depth``) it passes at some level. Every enabled
  exit before it is surely evaluated on that sample, so its head is paid (exactly, whatever the levels);
* from its first chance on, for ``width`` exits, the sample behaves exactly: it leaves at the first enabled one
  whose level it passes (right or wrong, since the level is shared), paying the heads it evaluates;
* past that window it picks freely among later exits (heads after the window are not charged).

Accuracy enters as a Lagrangian: latency - lam * (correct - K) for a multiplier lam >= 0; any lam gives a valid
bound. Costs are those of the cheapest staged path to each exit (placement relaxed as in
:func:`~distree.solver.costs.cheapest_leave_ms`) and each head at its cheapest device. With the samples split
this way the exits interact only within a window, so the best levels are a dynamic programme over exits whose
state is the levels of the previous ``width - 1`` exits; width 1 is a sum of independent per-exit minima.

Measured at the root (``benchmarks/solver_scale.py`` cases): ResNet-110 scale 9.24 (free choice) -> 10.19
(width 1) -> 10.37 (width 3) ms, against a best plan of 11.27; 200 blocks on 8 devices 30.58 -> 31.49 -> 31.86
against 32.96.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from distree.solver.costs import cheapest_leave_ms, option_tables
from distree.solver.problem import Problem


@dataclass(frozen=True, eq=False)
class BoundTables:
    """Per-problem numbers every window bound needs (computed once)."""

    leave: np.ndarray         # [E + 1] cheapest cost of leaving at exit j (last: the final classifier)
    after: np.ndarray         # [N, E + 2] cheapest option among exits >= j (last column: none)
    after_right: np.ndarray   # [N, E + 2] cheapest correct option among exits >= j
    head: np.ndarray          # [E] each head at its cheapest device
    first_chance: np.ndarray  # [N, E + 1] first exit >= j the sample passes at some level (E: none)


def bound_tables(p: Problem) -> BoundTables:
    leave = cheapest_leave_ms(p)
    after, after_right = option_tables(p, leave)
    N, E = p.passed_level.shape
    chance = np.full((N, E + 1), E)
    for j in range(E - 1, -1, -1):
        chance[:, j] = np.where(p.passed_level[:, j] > 0, j, chance[:, j + 1])
    head = p.head_ms.min(axis=0) if E else np.zeros(0)
    return BoundTables(leave, after, after_right, head, chance)


def window_bound(p: Problem, t: BoundTables, lam: float, survivors: np.ndarray | None = None, depth: int = 0,
                 width: int = 1) -> float:
    """min over the levels of exits depth.. of sum over ``survivors`` of (latency - lam * correct), relaxed as
    the module says; survivors have not left before exit ``depth`` (the heads they evaluated before are not in
    it). Add lam * K and the decided samples' (latency - lam * correct) for a bound on the whole plan."""
    rows = np.arange(p.n_samples) if survivors is None else np.nonzero(survivors)[0]
    E = p.n_exits
    chance = t.first_chance[rows, depth]
    done = chance == E
    total = float((t.leave[E] - lam * p.correct_final[rows[done]]).sum())
    if depth == E:
        return total
    rows, chance = rows[~done], chance[~done]
    # heads surely evaluated: exit k (depth <= k < E) is reached by every survivor whose first chance is later
    later = len(rows) + int(done.sum()) - np.cumsum(np.bincount(chance - depth, minlength=E - depth))
    sure_heads = t.head[depth:] * later                                                 # [E - depth]
    free = np.minimum(t.after[rows, chance + width], t.after_right[rows, chance + width] - lam) \
        if width == 1 else None
    if width == 1:
        return total + _single_exit_windows(p, t, lam, rows, chance, free, sure_heads, depth)
    return total + _window_dp(p, t, lam, rows, chance, sure_heads, depth, width)


def _single_exit_windows(p, t, lam, rows, chance, free, sure_heads, depth) -> float:
    """Width 1: each exit's level only affects the samples whose first chance it is; a sum of minima."""
    E, Lmax = p.n_exits, int(p.n_levels.max())
    passed = p.passed_level[rows, chance]
    leave_now = t.leave[chance] - lam * p.correct_exit[rows, chance]
    skip = t.head[chance] + free                     # level on but not passed: evaluate the head, go on
    cells = (chance - depth) * (Lmax + 1) + passed
    shape = (E - depth, Lmax + 1)
    by_leave = np.bincount(cells, weights=leave_now, minlength=shape[0] * shape[1]).reshape(shape)
    by_skip = np.bincount(cells, weights=skip, minlength=shape[0] * shape[1]).reshape(shape)
    off = np.bincount(chance - depth, weights=free, minlength=shape[0])
    # level l: samples with passed >= l leave, the others skip
    leave_at = np.cumsum(by_leave[:, ::-1], axis=1)[:, ::-1]              # sum over passed >= l
    skip_at = np.concatenate([np.zeros((shape[0], 1)), np.cumsum(by_skip, axis=1)[:, :-1]], axis=1)  # passed < l
    cost = np.concatenate([off[:, None], (leave_at + skip_at)[:, 1:] + sure_heads[:, None]], axis=1)
    cost[np.arange(Lmax + 1)[None, :] > p.n_levels[depth:, None]] = np.inf
    return float(cost.min(axis=1).sum())


def _window_dp(p, t, lam, rows, chance, sure_heads, depth, width) -> float:
    """Width >= 2: dynamic programme over exits; the state is the levels of the previous width - 1 exits."""
    E, Lv = p.n_exits, int(p.n_levels.max()) + 1
    n_ex = E - depth
    pad = width - 1                                   # dummy exits past the end: always off
    passed = np.concatenate([p.passed_level[rows, depth:], np.zeros((len(rows), pad), int)], axis=1)
    correct = np.concatenate([p.correct_exit[rows, depth:], np.zeros((len(rows), pad), bool)], axis=1)
    leave = np.concatenate([t.leave[depth:E], np.full(pad, np.inf)])
    head = np.concatenate([t.head[depth:], np.zeros(pad)])
    n_levels = np.concatenate([p.n_levels[depth:], np.zeros(pad, int)])
    combos = np.array(list(itertools.product(range(Lv), repeat=width)), dtype=int)     # [V, width]
    on = combos > 0
    local = chance - depth
    tables = np.zeros((n_ex, len(combos)))
    for k in np.unique(local):
        members = np.nonzero(local == k)[0]
        r = rows[members]
        passes = (passed[members, k:k + width][None] >= combos[:, None, :]) & on[:, None, :]   # [V, n, w]
        first = passes.argmax(axis=2)
        heads_before = np.concatenate([np.zeros((len(combos), 1)), np.cumsum(on * head[k:k + width], axis=1)],
                                      axis=1)                                                 # [V, w + 1]
        leaving = (leave[k + first] - lam * correct[members[None, :], k + first]
                   + np.take_along_axis(heads_before, first, axis=1))
        beyond = min(depth + k + width, E)           # the final classifier stays an option
        free = np.minimum(t.after[r, beyond], t.after_right[r, beyond] - lam)
        tables[k] = np.where(passes.any(axis=2), leaving, heads_before[:, width:] + free[None, :]).sum(axis=1)
    unary = np.zeros((n_ex + pad, Lv))
    unary[:n_ex, 1:] = sure_heads[:, None]
    unary[np.arange(Lv)[None, :] > n_levels[:, None]] = np.inf
    states = Lv ** (width - 1)
    cost = np.full(states, np.inf)
    cost[0] = 0.0                                     # the exits before depth count as off here
    for step in range(n_ex + pad):
        full = cost[:, None] + unary[step][None, :]   # index (previous width - 1 levels, this level)
        if step - pad >= 0:
            full = full + tables[step - pad].reshape(states, Lv)
        cost = full.reshape(Lv, states).min(axis=0)   # forget the oldest level
    return float(cost.min())


def best_multiplier(p: Problem, t: BoundTables, width: int = 1, iterations: int = 30) -> tuple[float, float]:
    """(bound in ms, lam): the window bound of the whole problem at its best multiplier (golden section; the
    Lagrangian is concave in lam)."""
    N, K = p.n_samples, p.required_correct

    def value(lam: float) -> float:
        return (window_bound(p, t, lam, width=width) + lam * K) / N

    finite = t.leave[np.isfinite(t.leave)]
    if not len(finite):
        return np.inf, 0.0                            # no exit and no end can be reached within memory
    lo, hi = 0.0, 4.0 * float(finite.max()) + 1.0
    g = (5 ** 0.5 - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = value(a), value(b)
    for _ in range(iterations):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = value(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = value(b)
    return (fa, a) if fa >= fb else (fb, b)
