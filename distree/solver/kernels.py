"""The branch and bound's per-node arithmetic as compiled loops (numba).

A node of the tree bounds all its children at once: their survivor sets are nested by the level chosen at the
node's exit ({i survives: key[i] < cut}). In numpy that was ~25 calls on arrays of a few thousand samples per
node, and the calls' own overhead was most of the tree's time (py-spy, the example's 22 trained exits, 60 s:
70% in ``_Search.children``). Here survivors stay packed bits (``np.packbits`` order) and each quantity is one
pass over them into per-key sums, accumulated over the keys, then a small pass per cut. Compiled on first use
and cached beside this file (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _alive(packed, i):
    return (packed[i >> 3] >> (7 - (i & 7))) & 1


@njit(cache=True)
def _key_count(key, packed):
    n_keys = 1
    for i in range(len(key)):
        if _alive(packed, i):
            n_keys = max(n_keys, key[i] + 1)
    return n_keys


@njit(cache=True)
def level_tallies(packed, passed, correct, top):
    """[top + 1] survivors leaving at each level of an exit (passed >= l) and those of them right there."""
    leaving = np.zeros(top + 2)
    right = np.zeros(top + 2)
    for i in range(len(passed)):
        if _alive(packed, i):
            leaving[passed[i]] += 1.0
            right[passed[i]] += correct[i]
    for level in range(top - 1, -1, -1):
        leaving[level] += leaving[level + 1]
        right[level] += right[level + 1]
    return leaving[:top + 1], right[:top + 1]


@njit(cache=True)
def survivor_sum(packed, values, column):
    """(survivors, the sum of their ``values[:, column]``)."""
    count, total = 0, 0.0
    for i in range(values.shape[0]):
        if _alive(packed, i):
            count += 1
            total += values[i, column]
    return count, total


@njit(cache=True)
def nested_counts(packed, key, cuts):
    """[len(cuts)] survivors with key < cut."""
    counts = np.zeros(_key_count(key, packed) + 1)
    for i in range(len(key)):
        if _alive(packed, i):
            counts[key[i] + 1] += 1.0
    for k in range(1, len(counts)):
        counts[k] += counts[k - 1]
    out = np.empty(len(cuts))
    for c in range(len(cuts)):
        out[c] = counts[min(cuts[c], len(counts) - 1)]
    return out


@njit(cache=True)
def nested_free_choice(packed, key, cuts, need_right, after, after_right, column, order):
    """:func:`distree.solver.costs.nested_free_choice_ms` of each nested survivor set: everyone takes its
    cheapest option (``after[:, column]``), then the cheapest upgrades to a correct one (``after_right``) until
    ``need_right[c]`` are right; inf when too few can be. ``order``: every sample by its upgrade's cost, those
    with none (<= 0, or inf - inf: no way out) last (:func:`upgrade_order`)."""
    base = after[:, column]
    right = after_right[:, column]
    n_keys = _key_count(key, packed)
    total = np.zeros(n_keys + 1)
    right_already = np.zeros(n_keys + 1)
    for i in range(len(key)):
        if _alive(packed, i):
            total[key[i] + 1] += base[i]
            if right[i] - base[i] <= 0:
                right_already[key[i] + 1] += 1.0
    for k in range(1, n_keys + 1):
        total[k] += total[k - 1]
        right_already[k] += right_already[k - 1]
    need = np.empty(len(cuts))
    cost = np.empty(len(cuts))
    open_cuts = 0
    for c in range(len(cuts)):
        k = min(cuts[c], n_keys)
        need[c] = need_right[c] - right_already[k]
        cost[c] = total[k]
        open_cuts += need[c] > 0
    for i in order:                             # the cheapest upgrades first, for every set at once
        if open_cuts == 0:
            break
        up = right[i] - base[i]
        if not up > 0:
            break                               # the rest are no upgrades
        if not _alive(packed, i):
            continue
        for c in range(len(cuts)):
            if need[c] > 0 and key[i] < cuts[c]:
                cost[c] += up
                need[c] -= 1.0
                open_cuts -= need[c] <= 0
    for c in range(len(cuts)):
        if need[c] > 0 or not np.isfinite(cost[c]):
            cost[c] = np.inf                    # too few can be right, or one with no way out
    return cost


def upgrade_order(after: np.ndarray, after_right: np.ndarray) -> np.ndarray:
    """[columns, N]: per column, the samples by the cost of upgrading from their cheapest option to their
    cheapest correct one, those with no upgrade last (what :func:`nested_free_choice` walks)."""
    with np.errstate(invalid="ignore"):
        up = after_right - after
    return np.ascontiguousarray(np.argsort(np.where(up > 0, up, np.nan), axis=0, kind="stable").T)


@njit(cache=True)
def nested_window(packed, key, cuts, depth, lam, first_chance, leave, head, after, after_right, passed_level,
                  correct_exit, correct_final, n_levels):
    """:func:`distree.solver.bounds.nested_window_bounds` of each nested survivor set (width 1: a sum over
    exits of their cheapest level, each exit deciding only the survivors whose first chance it is)."""
    E = passed_level.shape[1]
    n_keys = _key_count(key, packed)
    n_ex = E - depth
    Lv = 1
    for x in range(len(n_levels)):
        Lv = max(Lv, n_levels[x] + 1)
    by_leave = np.zeros((n_keys, n_ex, Lv))     # samples passing level l at their first chance leave there
    by_skip = np.zeros((n_keys, n_ex, Lv))      # or, below the level, pay the head and choose freely after it
    off = np.zeros((n_keys, n_ex))              # exit off: everyone whose first chance it is chooses freely
    first_here = np.zeros((n_keys, n_ex))
    at_end = np.zeros(n_keys)                   # no chance left: the final classifier, exactly
    everyone = np.zeros(n_keys)
    for r in range(len(key)):
        if not _alive(packed, r):
            continue
        k = key[r]
        everyone[k] += 1.0
        j = first_chance[r, depth]
        if j == E:
            at_end[k] += leave[E] - lam * correct_final[r]
            continue
        x = j - depth
        free = min(after[r, j + 1], after_right[r, j + 1] - lam)
        level = passed_level[r, j]
        by_leave[k, x, level] += leave[j] - lam * correct_exit[r, j]
        by_skip[k, x, level] += head[j] + free
        off[k, x] += free
        first_here[k, x] += 1.0
    for k in range(1, n_keys):                  # sums over the keys below each cut
        by_leave[k] += by_leave[k - 1]
        by_skip[k] += by_skip[k - 1]
        off[k] += off[k - 1]
        first_here[k] += first_here[k - 1]
        at_end[k] += at_end[k - 1]
        everyone[k] += everyone[k - 1]
    out = np.zeros(len(cuts))
    leaving = np.zeros(Lv + 1)
    for c in range(len(cuts)):
        k = min(cuts[c], n_keys) - 1
        if k < 0:
            continue                            # nobody: every level costs nothing
        total, decided = at_end[k], 0.0
        for x in range(n_ex):
            decided += first_here[k, x]
            sure_heads = head[depth + x] * (everyone[k] - decided)   # reached by all whose chance is later
            top = n_levels[depth + x]
            leaving[top + 1] = 0.0
            for level in range(top, 0, -1):     # level l: samples passing >= l leave, the others skip
                leaving[level] = leaving[level + 1] + by_leave[k, x, level]
            best, skipping = off[k, x], 0.0
            for level in range(1, top + 1):
                skipping += by_skip[k, x, level - 1]
                best = min(best, leaving[level] + skipping + sure_heads)
            total += best
        out[c] = total
    return out


@njit(cache=True)
def pack_nested(packed, key, cuts):
    """[len(cuts), bytes]: the survivor set key < cut of each cut, packed as ``np.packbits``."""
    out = np.zeros((len(cuts), len(packed)), dtype=np.uint8)
    for i in range(len(key)):
        if _alive(packed, i):
            bit = np.uint8(1 << (7 - (i & 7)))
            for c in range(len(cuts)):
                if key[i] < cuts[c]:
                    out[c, i >> 3] |= bit
    return out
