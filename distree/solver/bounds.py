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

Measured at the root (``benchmarks/solver_scale.py`` cases): ResNet-110 scale 9.24 (free choice) -> 10.27
(width 1) -> 10.36 (2) -> 10.45 (3) -> 10.51 (4) -> 10.58 (5) -> 10.63 (6) ms, against a best plan of 11.26;
200 blocks on 8 devices 30.58 -> 31.71 (1) -> 32.31 (6) -> 32.40 (7) against 32.92. The branch and bound uses
width 1 at every node, for all children of a node in one pass (:func:`nested_window_bounds`); a solve adds the
widest window that fits its time once (:func:`widest_window_bound`; wider again, :func:`window_prefix_bound`, where
a trial tree shows it deciding), and the tree carries it along every node's levels (:class:`PrefixBound`).

What stays loose is accuracy, not latency: at the width-1 minimiser on the ResNet-110 scale the relaxation prices
latency within 0.1% but counts 216 right answers too many (samples past their window take a later exit where they
are right); docs/solver.md, "What keeps it open is the accuracy bound".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from distree.solver.costs import cheapest_leave_ms, option_tables
from distree.solver.kernels import nested_window, prefix_children
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
    root: float = -np.inf     # the width-1 bound of the whole problem at lam, in ms (the tree's root)


def first_chances(p: Problem) -> np.ndarray:
    """[N, E + 1] the first exit >= j each sample passes at some level (E: none)."""
    N, E = p.passed_level.shape
    chance = np.full((N, E + 1), E)
    for j in range(E - 1, -1, -1):
        chance[:, j] = np.where(p.passed_level[:, j] > 0, j, chance[:, j + 1])
    return chance


def bound_tables(p: Problem, head_price: np.ndarray | None = None, allowed: np.ndarray | None = None,
                 first_chance: np.ndarray | None = None) -> BoundTables:
    """The tables with heads charged ``head_price``, or else under the best prices tried: each head at its
    cheapest device, or every head at one device's cost (paths elsewhere credited,
    :func:`~distree.solver.costs.cheapest_leave_ms`). Measured: ResNet-110 scale width-1 root bound 10.19 ->
    10.27 ms, 200 blocks 31.49 -> 31.71, 22 trained exits (branch and bound, 20 s) 0.74 -> 0.86.
    ``allowed`` [D, B]: only placements running block b on a device allowed there (:mod:`distree.solver.classes`);
    ``first_chance``: :func:`first_chances` of ``p`` where the caller already has it (it depends on ``p`` only)."""
    N, E = p.passed_level.shape
    chance = first_chances(p) if first_chance is None else first_chance
    candidates = [head_price] if head_price is not None else \
        [p.head_ms.min(axis=0), *(row for row in p.head_ms if np.all(np.isfinite(row)))] if E else [np.zeros(0)]
    best = None
    for price in candidates:
        leave = cheapest_leave_ms(p, head_price=price, allowed=allowed)
        tables = BoundTables(leave, *option_tables(p, leave), price, chance)
        value, lam = best_multiplier(p, tables) if E else (window_bound(p, tables, 0.0) / N, 0.0)
        if best is None or value > best.root:
            best = dataclasses.replace(tables, lam=lam, root=value)
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
    alive = np.zeros(p.n_samples, dtype=bool)
    alive[rows] = True
    full_key = np.zeros(p.n_samples, dtype=np.int64)
    full_key[rows] = key
    return nested_window(np.packbits(alive), full_key, np.asarray(cuts, dtype=np.int64), depth, float(lam),
                         np.ascontiguousarray(t.first_chance[:, depth]), t.leave, t.head, t.after, t.after_right,
                         p.passed_level, p.correct_exit, p.correct_final, p.n_levels)


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
    """Any width (used for >= 2), built once for a set of survivors, as tables [window start, level
    combination] that a dynamic programme over exits combines (:meth:`value`; its state is the previous
    width - 1 levels).

    A survivor's fate inside its window depends only on its *pattern*, the levels it passes at the window's
    exits: it stays at slot i iff its level there is below the slot's threshold (or the slot is off). So every
    table entry is a dominance sum over a histogram of patterns (:func:`_dominance_sums`: one cumulative sum per
    axis), O(samples + combinations x width) per window start instead of O(samples x combinations): width 4 on
    the ResNet-110-scale case in 0.1 s instead of 3.3 s, which lets a solve afford width 5-6.
    The parts that do not depend on lam (latency, correct answers inside the window) are built here; the free
    choice of those who pass no window exit is one histogram per window start and lam.
    """

    def __init__(self, p: Problem, t: BoundTables, width: int, survivors: np.ndarray | None = None,
                 depth: int = 0):
        split = _Split(p, t, survivors, depth)
        E, Lv = p.n_exits, int(p.n_levels.max()) + 1
        self.width, self.levels_count, self.split = width, Lv, split
        n_ex, pad = E - depth, width - 1             # dummy exits past the end: always off
        start = split.chance - depth                 # window start: the survivor's first chance
        order = np.argsort(start, kind="stable")
        start, rows = start[order], split.rows[order]
        self.start, self.rows, self.n_samples, self.depth = start, rows, p.n_samples, depth
        self.every_sample = survivors is None
        slots = depth + start[:, None] + np.arange(width)[None, :]                      # [n, width] exits
        exit_at = np.minimum(slots, E - 1)
        passed = np.where(slots < E, p.passed_level[rows[:, None], exit_at], 0)
        correct = np.where(slots < E, p.correct_exit[rows[:, None], exit_at], False)
        leave = np.concatenate([t.leave[depth:E], np.full(pad, np.inf)])
        head = np.concatenate([t.head[depth:], np.zeros(pad)])
        n_levels = np.concatenate([p.n_levels[depth:], np.zeros(pad, int)])
        # built slot by slot over the combinations of slots 0..i, so only the last step is full size
        pattern = start.copy()                       # window start, then the levels passed at slots 0..i
        fixed, right = np.zeros((n_ex, 1)), np.zeros((n_ex, 1))
        stay = _dominance_sums(pattern, None, n_ex, Lv, 0, leave_last=False)   # stayed at slots < i
        for i in range(width):
            pattern = pattern * Lv + passed[:, i]
            stayed = _dominance_sums(pattern, None, n_ex, Lv, i + 1, leave_last=False).reshape(n_ex, Lv ** i, Lv)
            leaving = stay[:, :, None] - stayed      # [start, combination of slots < i, level at slot i]
            reachable = np.isfinite(leave[i:i + n_ex])
            leaving[reachable] *= leave[i:i + n_ex][reachable, None, None]
            leaving[~reachable] = np.where(leaving[~reachable] > 0, np.inf, 0.0)   # no path: impossible
            leaving += fixed[:, :, None]
            leaving[:, :, 1:] += head[i:i + n_ex, None, None] * stayed[:, :, 1:]   # on: its head is evaluated
            fixed = leaving.reshape(n_ex, Lv ** (i + 1))
            right = (right[:, :, None] + _dominance_sums(pattern, correct[:, i].astype(float), n_ex, Lv, i + 1,
                                                         leave_last=True).reshape(n_ex, Lv ** i, Lv))
            right = right.reshape(n_ex, Lv ** (i + 1))
            stay = stayed.reshape(n_ex, Lv ** (i + 1))
        self.fixed_ms, self.right = fixed, right
        beyond = np.minimum(depth + start + width, E)   # the final classifier stays an option
        self.after, self.after_right = t.after[rows, beyond], t.after_right[rows, beyond]
        first = np.searchsorted(start, np.arange(n_ex + 1))
        self.members = [slice(a, b) for a, b in zip(first[:-1], first[1:])]   # survivors per window start
        self.pattern = pattern - start * Lv ** width
        stuck = ~np.isfinite(np.minimum(self.after, self.after_right))        # no way out past the window
        self.impossible = (_dominance_sums(pattern[stuck], None, n_ex, Lv, width, leave_last=False) > 0
                           if stuck.any() else np.zeros((n_ex, Lv ** width), dtype=bool))
        self.unary = np.zeros((n_ex + pad, Lv))
        self.unary[:n_ex, 1:] = split.sure_heads[:, None]
        self.unary[np.arange(Lv)[None, :] > n_levels[:, None]] = np.inf

    def table(self, k: int, lam: float, free: np.ndarray) -> np.ndarray:
        """[V]: window start k's part of the bound for each level combination of its window, at ``lam``
        (``free``: each survivor's free choice past its window at that lam, 0 where it has none)."""
        Lv, w = self.levels_count, self.width
        s = self.members[k]
        table = self.fixed_ms[k] - lam * self.right[k]
        if s.stop > s.start:
            table = table + _dominance_sums(self.pattern[s], free[s], 1, Lv, w, leave_last=False)[0]
            # float rounding of those sums (one term per survivor, the rest adds zeros), taken off
            table -= (s.stop - s.start + 2 * w + 2) * 2.0 ** -53 * float(np.abs(free[s]).sum())
        table[self.impossible[k]] = np.inf
        return table

    def _free(self, lam: float) -> np.ndarray:
        free = np.minimum(self.after, self.after_right - lam)
        return np.where(np.isfinite(free), free, 0.0)

    def value(self, lam: float) -> float:
        """The window bound at multiplier ``lam`` (sum over the survivors, as :func:`window_bound`): a dynamic
        programme over exits whose state is the previous width - 1 levels."""
        Lv, w = self.levels_count, self.width
        free = self._free(lam)
        states = Lv ** (w - 1)
        cost = np.full(states, np.inf)
        cost[0] = 0.0                                 # the exits before depth count as off here
        for step in range(len(self.unary)):
            full = cost[:, None] + self.unary[step][None, :]   # index (previous w - 1 levels, this level)
            if step >= w - 1:
                full = full + self.table(step - (w - 1), lam, free).reshape(states, Lv)
            cost = full.reshape(Lv, states).min(axis=0)         # forget the oldest level
        return self.split.final_ms - lam * self.split.final_right + float(cost.min())

    def prefix_bound(self, lam: float, required_correct: int) -> "PrefixBound":
        """The bound at ``lam`` for every decided prefix of levels (the root's terms: all samples, depth 0)."""
        if self.depth != 0 or not self.every_sample:
            raise ValueError("prefix_bound needs the root's window terms (every sample, depth 0)")
        Lv, w = self.levels_count, self.width
        free = self._free(lam)
        states, steps = Lv ** (w - 1), len(self.unary)
        tables = np.stack([self.table(k, lam, free) for k in range(len(self.members))])
        to_go = np.zeros((steps + 1, states))
        successor = np.arange(states * Lv) % states
        for step in range(steps - 1, -1, -1):
            full = self.unary[step][None, :] + to_go[step + 1][successor].reshape(states, Lv)
            if step >= w - 1:
                full = full + tables[step - (w - 1)].reshape(states, Lv)
            to_go[step] = full.min(axis=1)
        constant = self.split.final_ms - lam * self.split.final_right + lam * required_correct
        closes = np.full(self.n_samples, len(self.members) + w)          # no window: never closes
        closes[self.rows] = self.start + w
        free_all = np.zeros(self.n_samples)
        free_all[self.rows] = free
        return PrefixBound(w, Lv, tables, self.unary, to_go, constant, lam, closes, free_all)


@dataclass(frozen=True, eq=False)
class WideChildren:
    """Per child of a branch-and-bound node: what :class:`PrefixBound` carries along its levels, and its bound."""

    prefix: np.ndarray        # sum of the tables of the windows its levels close, and their unary terms
    state: np.ndarray         # its last width - 1 levels, as one index
    decided: np.ndarray       # exact correction for the samples its levels decided past their window
    bound: np.ndarray         # total (sum over samples); -inf: no wide window

    @staticmethod
    def none(n: int) -> "WideChildren":
        return WideChildren(np.zeros(n), np.zeros(n, dtype=int), np.zeros(n), np.full(n, -np.inf))


@dataclass(frozen=True, eq=False)
class PrefixBound:
    """The root's window bound at one multiplier, for any decided prefix of levels: a branch-and-bound node
    whose exits 0..d-1 are decided is bounded by the cheapest completion of that same relaxation (a lower
    bound on every plan, so on every plan in the node's subtree), in O(1) per child: the tables of the windows
    its prefix closes plus the cheapest way on (``to_go``, a backward dynamic programme over the states).

    It is then made exact where the prefix decides more than the relaxation knows: a sample whose window lies
    inside the prefix and who passed it took its free choice in the relaxation, but the node knows where it left
    (or that it has not left yet, so only exits from d on remain) and which heads it evaluated on the way
    (:meth:`children`). Totals are sums over samples, as the tree's."""

    width: int
    levels_count: int
    tables: np.ndarray        # [E, V] window start k, levels of exits k..k+width-1 (inf: impossible)
    unary: np.ndarray         # [E + width - 1, Lv] heads surely evaluated (inf: no such level)
    to_go: np.ndarray         # [E + width, Lv ** (width - 1)] cheapest rest from exit s, given the previous levels
    constant: float           # the final classifier's part and lam * K
    lam: float
    closes: np.ndarray        # [N] first exit past each sample's window (> E: it has none)
    free: np.ndarray          # [N] its free choice past the window at lam, as the relaxation counts it

    @property
    def total(self) -> float:
        return self.constant + float(self.to_go[0][0])

    def children(self, p: Problem, t: BoundTables, j: int, prefix: float, state: int, decided: float,
                 heads_before: np.ndarray, levels: np.ndarray, cuts: np.ndarray, packed: np.ndarray,
                 key: np.ndarray) -> WideChildren:
        """The children of a node at depth ``j`` (its prefix sum, state = its last width - 1 levels, and the
        exact correction of its decided samples), at ``levels`` of exit j; child c keeps the node's survivors
        (``packed`` bits) whose ``key`` (level passed at exit j, every sample's) is below ``cuts[c]``.
        ``heads_before[i]``: the node's enabled heads of exits < i."""
        combo = state * self.levels_count + levels
        prefix = prefix + self.unary[j][levels]
        if j >= self.width - 1:
            prefix = prefix + self.tables[j - (self.width - 1)][combo]
        state = combo % self.to_go.shape[1]
        decided, survivors = prefix_children(packed, key, cuts, levels, j, decided, heads_before, self.closes,
                                             self.free, self.lam, t.leave, t.head, t.after, t.after_right,
                                             p.correct_exit)
        return WideChildren(prefix, state, decided,
                            self.constant + prefix + self.to_go[j + 1][state] + decided + survivors)


def _dominance_sums(index: np.ndarray, weights: np.ndarray | None, starts: int, Lv: int, digits: int,
                    leave_last: bool) -> np.ndarray:
    """[starts, Lv ** digits]: per window start and level combination c of the first ``digits`` slots, the
    sum of ``weights`` (None: counts) over the survivors that stay at each of those slots (level passed
    < c[i], or c[i] = 0: off). With ``leave_last`` the last slot instead counts those who leave there (level
    passed >= c > 0). ``index`` = start * Lv ** digits + the survivor's levels passed at those slots."""
    h = np.bincount(index, weights=weights, minlength=starts * Lv ** digits).astype(float, copy=False)
    h = h.reshape((starts,) + (Lv,) * digits)
    for axis in range(1, digits + 1):              # in place: these arrays are the largest of a solve
        view = np.flip(h, axis) if leave_last and axis == digits else h
        np.cumsum(view, axis=axis, out=view)       # [c] = sum over passed <= c (last, leaving: >= c)
    shift = tuple(range(1, digits if leave_last else digits + 1))
    if shift:
        h = np.roll(h, 1, axis=shift)              # [c] = sum over passed <= c - 1; [0] (off): everyone
    if leave_last and digits:
        h[..., 0] = 0.0                            # off: nobody leaves
    return h.reshape(starts, Lv ** digits)


def best_multiplier(p: Problem, t: BoundTables, width: int = 1, iterations: int = 30,
                    bracket: tuple[float, float] | None = None,
                    terms: WindowTerms | None = None) -> tuple[float, float]:
    """(bound in ms, lam): the window bound of the whole problem at its best multiplier in ``bracket`` (golden
    section; the Lagrangian is concave in lam; any lam gives a valid bound)."""
    N, K = p.n_samples, p.required_correct

    if terms is None and width > 1:
        terms = WindowTerms(p, t, width)

    def value(lam: float) -> float:
        inner = terms.value(lam) if terms is not None else window_bound(p, t, lam)
        return (inner + lam * K) / N

    finite = t.leave[np.isfinite(t.leave)]
    if not len(finite):
        return np.inf, 0.0                            # no exit and no end can be reached within memory
    lo, hi = bracket if bracket is not None else (0.0, 4.0 * float(finite.max()) + 1.0)
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


SECONDS_PER_CELL = 6e-7   # measured, per (window start, level combination): build + 10 multipliers (ResNet-110
#                           scale width 5: 3.2M cells in 1.2 s; 200 blocks width 7: 3.1M in 1.9 s)
MAX_CELLS = 3e7           # ~40 bytes a cell at the peak of the build: 1.2 GB at width 6 on the ResNet-110 scale


def widest_window(p: Problem, seconds: float) -> int:
    """The widest window whose (window start, level combination) cells fit ``seconds`` and MAX_CELLS (0 without
    exits): a wider window keeps more of each sample's path exact, so it is never weaker."""
    if not p.n_exits:
        return 0
    combos_per_slot = int(p.n_levels.max()) + 1
    width = 1
    while (width < p.n_exits
           and combos_per_slot ** (width + 1) * p.n_exits <= min(MAX_CELLS, seconds / SECONDS_PER_CELL)):
        width += 1
    return width


def window_prefix_bound(p: Problem, t: BoundTables, width: int) -> PrefixBound:
    """The window bound of the whole problem at ``width``, at its best multiplier near the width-1 one, with
    every prefix (for the branch and bound)."""
    terms = WindowTerms(p, t, width)
    _, lam = best_multiplier(p, t, width, iterations=10, bracket=(0.5 * t.lam, 4.0 * t.lam + 1.0), terms=terms)
    return terms.prefix_bound(lam, p.required_correct)


def widest_window_bound(p: Problem, t: BoundTables, seconds: float) -> PrefixBound | None:
    """:func:`window_prefix_bound` at the :func:`widest_window` that fits ``seconds``; None without exits."""
    width = widest_window(p, seconds)
    return window_prefix_bound(p, t, width) if width else None
