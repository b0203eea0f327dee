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
(width 1) -> 10.28 (2) -> 10.37 (3) -> 10.43 (4) ms, against a best plan of 11.26; 200 blocks on 8 devices 30.58
-> 31.49 (1) -> 32.10 (6) against 32.96. The branch and bound uses width 1 at every node, for all children of
a node in one pass (:func:`nested_window_bounds`); a solve adds the widest window that fits its time once
(:func:`widest_window_bound`).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from distree.solver.costs import cheapest_leave_ms, option_tables, sums_below
from distree.solver.problem import Problem


@dataclass(frozen=True, eq=False)
class BoundTables:
    """Per-problem numbers every window bound needs (computed once)."""

    leave: np.ndarray         # [E + 1] cheapest cost of leaving at exit j (last: the final classifier)
    after: np.ndarray         # [N, E + 2] cheapest option among exits >= j (last column: none)
    after_right: np.ndarray   # [N, E + 2] cheapest correct option among exits >= j
    head: np.ndarray          # [E] each head at its cheapest device
    first_chance: np.ndarray  # [N, E + 1] first exit >= j the sample passes at some level (E: none)
    lam: float = 0.0          # the best width-1 multiplier under these prices (the tree uses it at every node)


def bound_tables(p: Problem, head_price: np.ndarray | None = None) -> BoundTables:
    """The tables with heads charged ``head_price``, or else under the best prices tried: each head at its
    cheapest device, or every head at one device's cost (paths elsewhere credited,
    :func:`~distree.solver.costs.cheapest_leave_ms`). Measured: ResNet-110 scale width-1 root bound 10.19 ->
    10.27 ms, 200 blocks 31.49 -> 31.71, 22 trained exits (branch and bound, 20 s) 0.74 -> 0.86."""
    N, E = p.passed_level.shape
    chance = np.full((N, E + 1), E)
    for j in range(E - 1, -1, -1):
        chance[:, j] = np.where(p.passed_level[:, j] > 0, j, chance[:, j + 1])
    candidates = [head_price] if head_price is not None else \
        [p.head_ms.min(axis=0), *(row for row in p.head_ms if np.all(np.isfinite(row)))] if E else [np.zeros(0)]
    best, best_value = None, -np.inf
    for price in candidates:
        leave = cheapest_leave_ms(p, head_price=price)
        tables = BoundTables(leave, *option_tables(p, leave), price, chance)
        value, lam = best_multiplier(p, tables) if E else (0.0, 0.0)
        if best is None or value > best_value:
            best, best_value = dataclasses.replace(tables, lam=lam), value
    return best


def window_bound(p: Problem, t: BoundTables, lam: float, survivors: np.ndarray | None = None, depth: int = 0,
                 width: int = 1) -> float:
    """min over the levels of exits depth.. of sum over ``survivors`` of (latency - lam * correct), relaxed as
    the module says; survivors have not left before exit ``depth`` (the heads they evaluated before are not in
    it). Add lam * K and the decided samples' (latency - lam * correct) for a bound on the whole plan."""
    if width == 1:
        rows = np.arange(p.n_samples) if survivors is None else np.nonzero(survivors)[0]
        return float(nested_window_bounds(p, t, lam, rows, np.zeros(len(rows), dtype=int), np.array([1]), depth)[0])
    return WindowTerms(p, t, width, survivors, depth).value(lam)


def nested_window_bounds(p: Problem, t: BoundTables, lam: float, rows: np.ndarray, key: np.ndarray,
                         cuts: np.ndarray, depth: int) -> np.ndarray:
    """The width-1 :func:`window_bound` of each nested survivor set {rows[i]: key[i] < cuts[c]}, in one pass.

    Width 1 is a sum of per-exit minima: each exit's level only affects the samples whose first chance it is.
    The per-(exit, level) sums are built once with the key as one more axis and accumulated over it, so the
    children of a branch-and-bound node (survivor sets nested by the level chosen) cost about one bound."""
    E = p.n_exits
    below = lambda flat_index, weights, size: sums_below(flat_index, weights, key, size, cuts)  # noqa: E731

    chance = t.first_chance[rows, depth]
    done = chance == E                        # no chance left: the final classifier, exactly
    at_end = below(key[done], t.leave[E] - lam * p.correct_final[rows[done]], 1)[:, 0]
    if depth == E:
        return at_end
    n_ex, Lv = E - depth, int(p.n_levels.max()) + 1
    r, k, j = rows[~done], key[~done], chance[~done]
    local = j - depth
    free = np.minimum(t.after[r, j + 1], t.after_right[r, j + 1] - lam)
    passed = p.passed_level[r, j]
    cells = (k * n_ex + local) * Lv + passed
    by_leave = below(cells, t.leave[j] - lam * p.correct_exit[r, j], n_ex * Lv).reshape(-1, n_ex, Lv)
    by_skip = below(cells, t.head[j] + free, n_ex * Lv).reshape(-1, n_ex, Lv)   # on, not passed: head, go on
    off = below(k * n_ex + local, free, n_ex)
    # exit depth + x is surely evaluated by every survivor whose first chance is later (or none)
    first_here = below(k * n_ex + local, None, n_ex)
    everyone = below(key, None, 1)
    sure_heads = t.head[depth:] * (everyone - np.cumsum(first_here, axis=1))
    # level l: samples with passed >= l leave, the others skip
    leave_at = np.cumsum(by_leave[:, :, ::-1], axis=2)[:, :, ::-1]
    skip_at = np.concatenate([np.zeros((len(cuts), n_ex, 1)), np.cumsum(by_skip, axis=2)[:, :, :-1]], axis=2)
    cost = np.concatenate([off[:, :, None], (leave_at + skip_at)[:, :, 1:] + sure_heads[:, :, None]], axis=2)
    cost[:, np.arange(Lv)[None, :] > p.n_levels[depth:, None]] = np.inf
    return at_end + cost.min(axis=2).sum(axis=1)


class _Split:
    """Survivors by first chance; those with none go to the end; heads surely evaluated per exit."""

    def __init__(self, p: Problem, t: BoundTables, survivors: np.ndarray | None, depth: int):
        rows = np.arange(p.n_samples) if survivors is None else np.nonzero(survivors)[0]
        E = p.n_exits
        chance = t.first_chance[rows, depth]
        done = chance == E
        self.final_ms = float(t.leave[E] * done.sum()) if done.any() else 0.0   # inf * 0 would be nan
        self.final_right = int(p.correct_final[rows[done]].sum())
        self.rows, self.chance = rows[~done], chance[~done]
        # exit k (depth <= k < E) is reached by every survivor whose first chance is later
        later = len(rows) - np.cumsum(np.bincount(self.chance - depth, minlength=E - depth))
        self.sure_heads = t.head[depth:] * later                                        # [E - depth]


class WindowTerms:
    """Any width (used for >= 2), built once for a set of survivors: every level combination of each window,
    split into the parts that do not depend on lam (latency, correct answers of those who leave inside the
    window) and the samples who pass no window exit (they take their free choice, which does: one matrix product
    per lam). :meth:`value` is then a dynamic programme over exits whose state is the previous width - 1 levels.
    """

    def __init__(self, p: Problem, t: BoundTables, width: int, survivors: np.ndarray | None = None,
                 depth: int = 0):
        split = _Split(p, t, survivors, depth)
        E, Lv = p.n_exits, int(p.n_levels.max()) + 1
        self.width, self.levels_count, self.split = width, Lv, split
        n_ex, pad = E - depth, width - 1             # dummy exits past the end: always off
        passed = np.concatenate([p.passed_level[split.rows, depth:], np.zeros((len(split.rows), pad), int)], 1)
        correct = np.concatenate([p.correct_exit[split.rows, depth:], np.zeros((len(split.rows), pad), bool)], 1)
        leave = np.concatenate([t.leave[depth:E], np.full(pad, np.inf)])
        head = np.concatenate([t.head[depth:], np.zeros(pad)])
        n_levels = np.concatenate([p.n_levels[depth:], np.zeros(pad, int)])
        combos = np.array(list(itertools.product(range(Lv), repeat=width)), dtype=int)   # [V, width]
        on = combos > 0
        local = split.chance - depth
        self.fixed_ms = np.zeros((n_ex, len(combos)))        # latency of the window part, lam-free
        self.right = np.zeros((n_ex, len(combos)))           # correct answers given inside the window
        self.free_parts = []                                 # (k, [V, n] 1 where no window exit is passed, a, b)
        for k in np.unique(local):
            members = np.nonzero(local == k)[0]
            heads_before = np.concatenate([np.zeros((len(combos), 1)), np.cumsum(on * head[k:k + width], axis=1)],
                                          axis=1)                                             # [V, w + 1]
            taken = np.full((len(combos), len(members)), width, dtype=np.int8)              # window slot taken
            for slot in range(width - 1, -1, -1):
                level = combos[:, slot][:, None]
                taken[(passed[members, k + slot][None, :] >= level) & (level > 0)] = slot
            for slot in range(width + 1):            # per slot, so no [V, n] index arrays are built
                here = taken == slot
                count = here.sum(axis=1)
                self.fixed_ms[k] += count * heads_before[:, slot]
                if slot < width and np.isfinite(leave[k + slot]):
                    self.fixed_ms[k] += count * leave[k + slot]
                    self.right[k] += (here & correct[members, k + slot][None, :]).sum(axis=1)
                elif slot < width:
                    self.fixed_ms[k][count > 0] = np.inf  # that exit cannot be reached within memory
            inside = taken < width
            beyond = min(depth + k + width, E)       # the final classifier stays an option
            r = split.rows[members]
            self.free_parts.append((k, (~inside).astype(np.float32), t.after[r, beyond], t.after_right[r, beyond]))
        self.unary = np.zeros((n_ex + pad, Lv))
        self.unary[:n_ex, 1:] = split.sure_heads[:, None]
        self.unary[np.arange(Lv)[None, :] > n_levels[:, None]] = np.inf

    def value(self, lam: float) -> float:
        """The window bound at multiplier ``lam`` (sum over the survivors, as :func:`window_bound`)."""
        tables = self.fixed_ms - lam * self.right
        for k, none_passed, after, after_right in self.free_parts:
            free = np.minimum(after, after_right - lam)
            finite = np.isfinite(free)
            free32 = np.where(finite, free, 0.0).astype(np.float32)   # single precision keeps the masks small;
            rounding = (len(free) + 2) * 2.0 ** -24 * float(np.abs(free32).sum())   # its worst error, taken off
            tables[k] += (none_passed @ free32).astype(float) - rounding
            if not finite.all():                      # a sample with no way out: that combination is impossible
                tables[k][none_passed[:, ~finite].any(axis=1)] = np.inf
        Lv, w = self.levels_count, self.width
        states = Lv ** (w - 1)
        cost = np.full(states, np.inf)
        cost[0] = 0.0                                 # the exits before depth count as off here
        for step in range(len(self.unary)):
            full = cost[:, None] + self.unary[step][None, :]   # index (previous w - 1 levels, this level)
            if step - (w - 1) >= 0:
                full = full + tables[step - (w - 1)].reshape(states, Lv)
            cost = full.reshape(Lv, states).min(axis=0)         # forget the oldest level
        return self.split.final_ms - lam * self.split.final_right + float(cost.min())


def best_multiplier(p: Problem, t: BoundTables, width: int = 1, iterations: int = 30) -> tuple[float, float]:
    """(bound in ms, lam): the window bound of the whole problem at its best multiplier (golden section; the
    Lagrangian is concave in lam)."""
    N, K = p.n_samples, p.required_correct

    terms = WindowTerms(p, t, width) if width > 1 else None

    def value(lam: float) -> float:
        inner = terms.value(lam) if terms is not None else window_bound(p, t, lam)
        return (inner + lam * K) / N

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


SECONDS_PER_CELL = 1e-7   # measured: width 4 on the ResNet-110-scale case, 33M (combination, sample) cells, 3.3 s
MAX_CELLS = 6e7           # single-precision masks: ~240 MB at this size, plus ~120 MB while building


def widest_window_bound(p: Problem, t: BoundTables, seconds: float) -> tuple[float, int]:
    """(bound in ms, width) at the widest window whose (level combination, sample) cells fit ``seconds`` and
    MAX_CELLS; a wider window keeps more of each sample's path exact, so it is never weaker."""
    combos_per_slot = int(p.n_levels.max()) + 1 if p.n_exits else 1
    width = 1
    while (width < p.n_exits
           and combos_per_slot ** (width + 1) * p.n_samples <= min(MAX_CELLS, seconds / SECONDS_PER_CELL)):
        width += 1
    return best_multiplier(p, t, width, iterations=20 if width > 1 else 30)[0], width
