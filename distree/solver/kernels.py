"""The branch and bound's per-node arithmetic as compiled loops (numba).

A node of the tree bounds all its children at once: their survivor sets are nested by the level chosen at the
node's exit ({i survives: key[i] < cut}). In numpy that was ~25 calls on arrays of a few thousand samples per
node, and the calls' own overhead was most of the tree's time (py-spy, the example's 22 trained exits, 60 s:
70% in ``_Search.children``). Here survivors stay packed bits (``np.packbits`` order) and each quantity is one
pass over them into per-key sums, accumulated over the keys, then a small pass per cut: with nodes as tuples,
2.5k -> 12.1k nodes a second there (README, Solver). Compiled on first use and cached beside this file
(``cache=True``; ``scripts/setup.sh`` runs :func:`distree.solver.bnb.warm_up`).
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
def child_levels(packed, passed, correct, top, leave, head, fixed_ms, fixed_right, heads_ms):
    """A node's children at its exit (``passed``/``correct``: that exit's columns; ``leave``/``head``: its
    prices): off, and on at each level whose set of leaving survivors differs from the level below's (levels
    that leave the same survivors give the same outcome; past the last level that leaves anyone, enabling only
    adds a head). Returns each child's level, cut (its survivors: passed < cut), decided latency, decided right
    answers and enabled heads per survivor."""
    leaving = np.zeros(top + 2)                 # survivors leaving at level l (passed >= l), and right there
    right = np.zeros(top + 2)
    for i in range(len(passed)):
        if _alive(packed, i):
            leaving[passed[i]] += 1.0
            right[passed[i]] += correct[i]
    for level in range(top - 1, -1, -1):
        leaving[level] += leaving[level + 1]
        right[level] += right[level + 1]
    levels = [0]
    for level in range(1, top + 1):
        if leaving[level] == 0:
            break
        if levels[-1] == 0 or leaving[level] != leaving[levels[-1]]:
            levels.append(level)
    n = len(levels)
    out_levels = np.zeros(n, dtype=np.int64)
    cuts = np.zeros(n, dtype=np.int64)
    out_ms = np.full(n, fixed_ms)
    out_right = np.full(n, fixed_right, dtype=np.int64)
    out_heads = np.full(n, heads_ms)
    cuts[0] = top + 1                           # off: every survivor stays
    for c in range(1, n):
        level = levels[c]
        out_levels[c] = level
        cuts[c] = level
        if leaving[level] > 0:                  # nobody leaving where no path leads (inf) pays nothing
            out_ms[c] += leaving[level] * (leave + heads_ms)
        out_right[c] += np.int64(np.round(right[level]))
        out_heads[c] += head
    return out_levels, cuts, out_ms, out_right, out_heads


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
    with none (<= 0, or inf - inf: no way out) last (:func:`upgrade_order`).

    Sets that cannot reach ``need_right`` are known from counts before the walk and take no part in it: most
    children are such (69% on the example's 22 trained exits and on the ResNet-110 scale), and each used to
    walk every sample."""
    base = after[:, column]
    right = after_right[:, column]
    n_keys = _key_count(key, packed)
    total = np.zeros(n_keys + 1)
    right_already = np.zeros(n_keys + 1)
    upgradable = np.zeros(n_keys + 1)           # could be made right at a finite price
    for i in range(len(key)):
        if _alive(packed, i):
            total[key[i] + 1] += base[i]
            up = right[i] - base[i]
            if up <= 0:
                right_already[key[i] + 1] += 1.0
            elif up < np.inf:
                upgradable[key[i] + 1] += 1.0
    for k in range(1, n_keys + 1):
        total[k] += total[k - 1]
        right_already[k] += right_already[k - 1]
        upgradable[k] += upgradable[k - 1]
    need = np.empty(len(cuts))
    cost = np.empty(len(cuts))
    open_cuts = 0
    for c in range(len(cuts)):
        k = min(cuts[c], n_keys)
        need[c] = need_right[c] - right_already[k]
        cost[c] = total[k]
        if need[c] > upgradable[k]:
            cost[c] = np.inf                    # too few can be right: out of the walk
            need[c] = 0.0
        open_cuts += need[c] > 0
    for i in order:                             # the cheapest upgrades first, for every set at once
        if open_cuts == 0:
            break
        up = right[i] - base[i]
        if not up < np.inf:
            break                               # the rest are no upgrades (the open sets need none of them)
        if not _alive(packed, i):
            continue
        for c in range(len(cuts)):
            if need[c] > 0 and key[i] < cuts[c]:
                cost[c] += up
                need[c] -= 1.0
                open_cuts -= need[c] <= 0
    for c in range(len(cuts)):
        if not np.isfinite(cost[c]):
            cost[c] = np.inf                    # one with no way out (or too few can be right)
    return cost


def upgrade_order(after: np.ndarray, after_right: np.ndarray) -> np.ndarray:
    """[columns, N]: per column, the samples by the cost of upgrading from their cheapest option to their
    cheapest correct one, those with no upgrade last (what :func:`nested_free_choice` walks)."""
    with np.errstate(invalid="ignore"):
        up = after_right - after
    order = np.argsort(np.where(up > 0, up, np.nan), axis=0, kind="stable").T
    return np.ascontiguousarray(order, dtype=np.int32)    # one per placement class: half the bytes of int64


@njit(cache=True)
def nested_window(packed, key, cuts, depth, lam, chance, leave, head, after, after_right, passed_level,
                  correct_exit, correct_final, n_levels):
    """:func:`distree.solver.bounds.nested_window_bounds` of each nested survivor set (width 1: a sum over
    exits of their cheapest level, each exit deciding only the survivors whose first chance it is).
    ``chance``: each sample's first chance at or after ``depth`` (a column of ``BoundTables.first_chance``)."""
    E = passed_level.shape[1]
    n_keys = _key_count(key, packed)
    n_ex = E - depth
    Lv = 1
    for x in range(len(n_levels)):
        Lv = max(Lv, n_levels[x] + 1)
    # per (key, exit): [0, Lv) samples passing level l at their first chance, who leave there at levels <= l;
    # [Lv, 2 Lv) the same samples' head and free choice after it, paid at levels > l; 2 Lv: everyone's free
    # choice (exit off); 2 Lv + 1: how many have their first chance there. One array: 1.8x faster than four
    OFF, FIRST = 2 * Lv, 2 * Lv + 1
    acc = np.zeros((n_keys, n_ex, 2 * Lv + 2))
    at_end = np.zeros(n_keys)                   # no chance left: the final classifier, exactly
    everyone = np.zeros(n_keys)
    for r in range(len(key)):
        if not _alive(packed, r):
            continue
        k = key[r]
        everyone[k] += 1.0
        j = chance[r]
        if j == E:
            at_end[k] += leave[E] - lam * correct_final[r]
            continue
        free = min(after[r, j + 1], after_right[r, j + 1] - lam)
        level = passed_level[r, j]
        cell = acc[k, j - depth]
        cell[level] += leave[j] - lam * correct_exit[r, j]
        cell[Lv + level] += head[j] + free
        cell[OFF] += free
        cell[FIRST] += 1.0
    for k in range(1, n_keys):                  # sums over the keys below each cut
        at_end[k] += at_end[k - 1]
        everyone[k] += everyone[k - 1]
        for x in range(n_ex):
            for i in range(2 * Lv + 2):
                acc[k, x, i] += acc[k - 1, x, i]
    out = np.zeros(len(cuts))
    leaving = np.zeros(Lv + 1)
    for c in range(len(cuts)):
        k = min(cuts[c], n_keys) - 1
        if k < 0:
            continue                            # nobody: every level costs nothing
        total, decided = at_end[k], 0.0
        for x in range(n_ex):
            cell = acc[k, x]
            decided += cell[FIRST]
            sure_heads = head[depth + x] * (everyone[k] - decided)   # reached by all whose chance is later
            top = n_levels[depth + x]
            leaving[top + 1] = 0.0
            for level in range(top, 0, -1):     # level l: samples passing >= l leave, the others skip
                leaving[level] = leaving[level + 1] + cell[level]
            best, skipping = cell[OFF], 0.0
            for level in range(1, top + 1):
                skipping += cell[Lv + level - 1]
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
