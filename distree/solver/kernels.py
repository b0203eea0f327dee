"""The branch and bound's per-node arithmetic as compiled loops (numba).

A node of the tree bounds all its children at once: their survivor sets are nested by the level chosen at the
node's exit ({i survives: key[i] < cut}). In numpy that was ~25 calls on arrays of a few thousand samples per
node, and the calls' own overhead was most of the tree's time (py-spy, the example's 22 trained exits, 60 s:
70% in ``_Search.children``). Here survivors stay packed bits (``np.packbits`` order) and everything a node's
children need (which levels make children, their free choice, window bound and counts) comes from one pass over
them into per-key sums, accumulated over the keys, then a small pass per cut (:func:`children_bounds`): 2.5k ->
~17k nodes a second there (525,724 in 30-32 s; docs/solver.md, Speed). The per-sample helpers are plain ``njit``
functions, which LLVM inlines; numba's own ``inline="always"`` made the same pass 2.8x slower. Compiled on first
use and cached beside this file (``cache=True``; ``scripts/setup.sh`` runs :func:`distree.solver.bnb.warm_up`).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _alive(packed, i):
    return (packed[i >> 3] >> (7 - (i & 7))) & 1


@njit(cache=True)
def _in_sets(packed, key, i, n_keys):
    """Survivor ``i`` belongs to some nested set: alive, and its key below the largest cut (``n_keys``)."""
    return _alive(packed, i) and key[i] < n_keys


@njit(cache=True)
def survivor_sum(packed, values):
    """(survivors, the sum of their ``values``): one contiguous column (a strided one, a column of an [N, E]
    table, cost 2.5x as much in a tree over many placement classes, each with its own tables)."""
    count, total = 0, 0.0
    for i in range(len(values)):
        if _alive(packed, i):
            count += 1
            total += values[i]
    return count, total


# Each nested quantity below is a pass over the survivors into per-key sums (``_*_add``, one survivor at a time,
# so one pass can feed several), made cumulative over the keys up to the largest key seen (``used`` keys), then
# read per cut (``_*_finish``): the set of cut c is key < cuts[c], so its sums are those at key
# min(cuts[c], used) - 1 (none when that is negative). Keys at or above the largest cut belong to no set and are
# skipped.

@njit(cache=True)
def _accumulate(sums, used):
    """Cumulative over the first ``used`` keys (axis 0) in place, element by element (a slice sum would
    allocate per key)."""
    flat = sums.reshape(sums.shape[0], sums.size // max(sums.shape[0], 1))
    for k in range(1, used):
        for x in range(flat.shape[1]):
            flat[k, x] += flat[k - 1, x]


FREE_BASE, FREE_RIGHT, FREE_UPGRADABLE = 0, 1, 2     # the free choice's per-key sums


@njit(cache=True)
def _free_add(sums, k, base, right):
    """A survivor of key ``k`` whose cheapest option costs ``base`` and cheapest correct one ``right``."""
    sums[k, FREE_BASE] += base
    up = right - base
    if up <= 0:
        sums[k, FREE_RIGHT] += 1.0              # its cheapest option is right
    elif up < np.inf:
        sums[k, FREE_UPGRADABLE] += 1.0         # can be made right at a finite price


@njit(cache=True)
def _free_finish(sums, used, packed, key, cuts, need_right, base, right, order):
    """Each set's free choice from its (accumulated) sums: the cheapest upgrades until ``need_right[c]`` are right,
    walking ``order`` once for all sets. Sets that cannot reach it are known from the counts and stay out of the
    walk: most children are such (69% on the example's 22 trained exits and on the ResNet-110 scale), and each
    used to walk every sample."""
    n_keys = sums.shape[0]
    need = np.zeros(len(cuts))
    cost = np.zeros(len(cuts))
    open_cuts = 0
    for c in range(len(cuts)):
        k = min(cuts[c], used) - 1
        if k < 0:
            need[c] = need_right[c]
            if need[c] > 0:
                cost[c] = np.inf                # nobody, yet some must be right
            continue
        need[c] = need_right[c] - sums[k, FREE_RIGHT]
        cost[c] = sums[k, FREE_BASE]
        if need[c] > sums[k, FREE_UPGRADABLE]:
            cost[c] = np.inf                    # too few can be right
        elif need[c] > 0 and cost[c] < np.inf:
            open_cuts += 1
    for i in order:                             # the cheapest upgrades first, for every set at once
        if open_cuts == 0:
            break
        if not _in_sets(packed, key, i, n_keys):
            continue                            # (first: a bit and a byte, where base and right miss the cache)
        up = right[i] - base[i]
        if not up < np.inf:
            break                               # the rest are no upgrades (the open sets need none of them)
        for c in range(len(cuts)):
            if need[c] > 0 and cost[c] < np.inf and key[i] < cuts[c]:
                cost[c] += up
                need[c] -= 1.0
                open_cuts -= need[c] <= 0
    for c in range(len(cuts)):
        if not np.isfinite(cost[c]):
            cost[c] = np.inf                    # one with no way out (inf - inf), or too few can be right
    return cost


@njit(cache=True)
def nested_free_choice(packed, key, cuts, need_right, after, after_right, column, order):
    """:func:`distree.solver.costs.nested_free_choice_ms` of each nested survivor set: everyone takes its
    cheapest option (``after[:, column]``), then the cheapest upgrades to a correct one (``after_right``) until
    ``need_right[c]`` are right; inf when too few can be. ``order``: every sample by its upgrade's cost, those
    with none (<= 0, or inf - inf: no way out) last (:func:`upgrade_order`)."""
    n_keys = max(cuts.max(), 0)
    sums = np.zeros((n_keys, 3))
    used = 0
    for i in range(len(key)):
        if _in_sets(packed, key, i, n_keys):
            _free_add(sums, key[i], after[i, column], after_right[i, column])
            used = max(used, key[i] + 1)
    _accumulate(sums, used)
    return _free_finish(sums, used, packed, key, cuts, need_right, after[:, column], after_right[:, column], order)


def upgrade_order(after: np.ndarray, after_right: np.ndarray) -> np.ndarray:
    """[columns, N]: per column, the samples by the cost of upgrading from their cheapest option to their
    cheapest correct one, those with no upgrade last (what :func:`nested_free_choice` walks)."""
    with np.errstate(invalid="ignore"):
        up = after_right - after
    order = np.argsort(np.where(up > 0, up, np.nan), axis=0, kind="stable").T
    return np.ascontiguousarray(order, dtype=np.int32)    # one per placement class: half the bytes of int64


# the width-1 window's per-(key, exit) sums: [0, Lv) samples passing level l at their first chance, who leave
# there at levels <= l; [Lv, 2 Lv) the same samples' head and free choice after it, paid at levels > l; 2 Lv:
# everyone's free choice (exit off); 2 Lv + 1: how many have their first chance there. One array: 1.8x faster
# than four. Per key besides (``ends``): the final classifier of those with no chance left, the survivors' count
# and, for a node's children, how many are right at the node's exit


@njit(cache=True)
def _window_add(acc, ends, r, k, depth, lam, chance, leave, head, after, after_right, passed_level, correct_exit,
                correct_final):
    Lv = (acc.shape[2] - 2) // 2
    E = passed_level.shape[1]
    ends[k, 1] += 1.0
    j = chance[r]
    if j == E:
        ends[k, 0] += leave[E] - lam * correct_final[r]     # no chance left: the final classifier, exactly
        return
    free = min(after[r, j + 1], after_right[r, j + 1] - lam)
    level = passed_level[r, j]
    cell = acc[k, j - depth]
    cell[level] += leave[j] - lam * correct_exit[r, j]
    cell[Lv + level] += head[j] + free
    cell[2 * Lv] += free
    cell[2 * Lv + 1] += 1.0


@njit(cache=True)
def _window_finish(acc, ends, used, cuts, depth, head, n_levels):
    """Each set's width-1 window: a sum over exits of the cheapest level, each exit deciding only the survivors
    whose first chance it is."""
    n_ex = acc.shape[1]
    Lv = (acc.shape[2] - 2) // 2
    OFF, FIRST = 2 * Lv, 2 * Lv + 1
    out = np.zeros(len(cuts))
    leaving = np.zeros(Lv + 1)
    for c in range(len(cuts)):
        k = min(cuts[c], used) - 1
        if k < 0:
            continue                            # nobody: every level costs nothing
        total, decided, everyone = ends[k, 0], 0.0, ends[k, 1]
        for x in range(n_ex):
            cell = acc[k, x]
            decided += cell[FIRST]
            sure_heads = head[depth + x] * (everyone - decided)   # reached by all whose chance is later
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
def _window_sums(n_keys, depth, n_levels):
    Lv = 1
    for x in range(len(n_levels)):
        Lv = max(Lv, n_levels[x] + 1)
    return np.zeros((n_keys, len(n_levels) - depth, 2 * Lv + 2)), np.zeros((n_keys, 3))


@njit(cache=True)
def nested_window(packed, key, cuts, depth, lam, chance, leave, head, after, after_right, passed_level,
                  correct_exit, correct_final, n_levels):
    """:func:`distree.solver.bounds.nested_window_bounds` of each nested survivor set (width 1).
    ``chance``: each sample's first chance at or after ``depth`` (a column of ``BoundTables.first_chance``)."""
    # the shared pass (its free-choice sums unused; correct_final stands in for correct_here, also unused)
    _, acc, ends, used = _bound_sums(packed, key, max(cuts.max(), 0), depth, lam, chance, correct_final, leave, head,
                                     after, after_right, passed_level, correct_exit, correct_final, n_levels)
    return _window_finish(acc, ends, used, cuts, depth, head, n_levels)


@njit(cache=True)
def _bound_sums(packed, key, n_keys, depth, lam, chance, correct_here, leave, head, after, after_right,
                passed_level, correct_exit, correct_final, n_levels):
    """One pass over the survivors into every per-key sum the tree's bound needs (free choice, window, counts;
    ``correct_here``: right answers at the exit whose levels made the keys), accumulated over the keys."""
    free_sums = np.zeros((n_keys, 3))
    acc, ends = _window_sums(n_keys, depth, n_levels)
    used = 0
    for r in range(len(key)):
        if _in_sets(packed, key, r, n_keys):
            _free_add(free_sums, key[r], after[r, depth], after_right[r, depth])
            _window_add(acc, ends, r, key[r], depth, lam, chance, leave, head, after, after_right, passed_level,
                        correct_exit, correct_final)
            ends[key[r], 2] += correct_here[r]
            used = max(used, key[r] + 1)
    _accumulate(free_sums, used)
    _accumulate(acc, used)
    _accumulate(ends, used)
    return free_sums, acc, ends, used


@njit(cache=True)
def _bounds(free_sums, acc, ends, used, packed, key, cuts, fixed_ms, fixed_right, heads_ms, required, depth, lam,
            order, head, after, after_right, n_levels):
    """Each set's bound from the sums: its decided latency and enabled heads per survivor (``fixed_ms``,
    ``fixed_right``, ``heads_ms`` per set), plus the larger of its free choice (the accuracy count kept:
    ``required`` right answers in all) and its width-1 window at ``lam`` (accuracy as a Lagrangian)."""
    need = np.empty(len(cuts))
    for c in range(len(cuts)):
        need[c] = required - fixed_right[c]
    free = _free_finish(free_sums, used, packed, key, cuts, need, after[:, depth], after_right[:, depth], order)
    window = _window_finish(acc, ends, used, cuts, depth, head, n_levels)
    bound = np.empty(len(cuts))
    for c in range(len(cuts)):
        k = min(cuts[c], used) - 1
        paid = fixed_ms[c] + (heads_ms[c] * ends[k, 1] if k >= 0 else 0.0)
        bound[c] = max(paid + free[c], paid - lam * (fixed_right[c] - required) + window[c])
    return bound


@njit(cache=True)
def nested_bounds(packed, key, cuts, fixed_ms, fixed_right, heads_ms, required, depth, lam, chance, order, leave,
                  head, after, after_right, passed_level, correct_exit, correct_final, n_levels):
    """The branch and bound's bound (:func:`_bounds`) of each nested survivor set, in one pass over them."""
    n_keys = max(cuts.max(), 0)             # correct_final stands in for correct_here: no children to choose
    sums = _bound_sums(packed, key, n_keys, depth, lam, chance, correct_final, leave, head, after, after_right,
                       passed_level, correct_exit, correct_final, n_levels)
    return _bounds(*sums, packed, key, cuts, fixed_ms, fixed_right, heads_ms, required, depth, lam, order, head,
                   after, after_right, n_levels)


@njit(cache=True)
def children_bounds(packed, j, key, correct_here, fixed_ms, fixed_right, heads_ms, required, lam, chance, order, leave,
                    head, after, after_right, passed_level, correct_exit, correct_final, n_levels):
    """A node's children at exit ``j`` and their bounds (:func:`_bounds`), in one pass over its survivors: exit j
    off, and on at each level whose set of leaving survivors differs from the level below's (levels that leave
    the same survivors give the same outcome; past the last level that leaves anyone, enabling only adds a head).
    ``key``/``correct_here``: exit j's columns of ``passed_level``/``correct_exit`` (contiguous). Returns each
    child's level, cut (its survivors: key < cut), decided latency, decided right answers, enabled heads per
    survivor, and bound."""
    top = n_levels[j]
    sums = _bound_sums(packed, key, top + 1, j + 1, lam, chance, correct_here, leave, head, after,
                       after_right, passed_level, correct_exit, correct_final, n_levels)
    ends, used = sums[2], sums[3]
    everyone = ends[used - 1, 1] if used else 0.0
    right_all = ends[used - 1, 2] if used else 0.0
    levels = [0]
    leaving, right = np.zeros(top + 1), np.zeros(top + 1)   # survivors leaving at level l (passed >= l); right
    for level in range(1, top + 1):
        below = min(level, used) - 1
        leaving[level] = everyone - (ends[below, 1] if below >= 0 else 0.0)
        right[level] = right_all - (ends[below, 2] if below >= 0 else 0.0)
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
            out_ms[c] += leaving[level] * (leave[j] + heads_ms)
        out_right[c] += np.int64(np.round(right[level]))
        out_heads[c] += head[j]
    bound = _bounds(*sums, packed, key, cuts, out_ms, out_right, out_heads, required, j + 1, lam, order, head,
                    after, after_right, n_levels)
    return out_levels, cuts, out_ms, out_right, out_heads, bound


@njit(cache=True)
def prefix_children(packed, key, cuts, levels, j, decided, heads_before, closes, free, lam, leave, head, after,
                    after_right, correct_exit):
    """What :meth:`distree.solver.bounds.PrefixBound.children` adds per child at exit ``j`` (child c: level
    ``levels[c]``, survivors key < ``cuts[c]``), in one pass over the node's survivors: the exact correction of
    the samples the child's level decides past their window (``decided`` + theirs, for the children that enable
    exit j) and the survivors' part (those whose window closes by j + 1 take their rest, heads since their
    window paid; those past it evaluate exit j's head when it is on)."""
    n_keys = max(cuts.max(), 0)
    go = np.zeros(n_keys + 1)                   # per key: leaving at exit j, corrected (suffix sums below); the last
    #                                             holds every key >= the largest cut: they leave at each level that
    #                                             is on
    stays = np.zeros((n_keys, 2))               # per key: the rest of those staying; how many are past their window
    used = 0
    for r in range(len(key)):
        if not _alive(packed, r):
            continue
        k = key[r]
        closed = closes[r]
        paid = heads_before[j] - heads_before[min(closed, j)]    # heads evaluated since the window
        if closed <= j:                         # exit j lies past the sample's window
            go[min(k, n_keys)] += leave[j] - lam * correct_exit[r, j] + paid - free[r]
        if k >= n_keys:
            continue                            # in no child's survivors
        used = max(used, k + 1)
        if closed <= j:
            stays[k, 1] += 1.0
        if closed <= j + 1:
            stays[k, 0] += min(after[r, j + 1], after_right[r, j + 1] - lam) + paid - free[r]
    for k in range(n_keys - 1, -1, -1):         # go[k]: those with key >= k (a suffix sum: no inf - inf)
        go[k] += go[k + 1]
    _accumulate(stays, used)
    out_decided = np.empty(len(cuts))
    survivors = np.zeros(len(cuts))
    for c in range(len(cuts)):
        on = levels[c] > 0
        out_decided[c] = decided + (go[min(cuts[c], n_keys)] if on else 0.0)
        below = min(cuts[c], used) - 1
        if below >= 0:
            survivors[c] = stays[below, 0] + (head[j] * stays[below, 1] if on else 0.0)
    return out_decided, survivors


def passing_sets(passed: np.ndarray, max_level: int) -> np.ndarray:
    """[E, max_level + 2, bytes]: per exit j and level l, the samples passing l or above at j, packed as
    ``np.packbits`` (l = 0: every sample; max_level + 1: none), so that a node's children's survivors and the
    samples gone by each exit are a few bit operations (:func:`nested_survivors`, :func:`gone_by`) instead of a
    walk over every sample (22 and 34 us a call on a trained ResNet-110, 5,000 samples)."""
    levels = np.arange(max_level + 2)
    return np.packbits(passed.T[:, None, :] >= levels[None, :, None], axis=2)


@njit(cache=True)
def nested_survivors(packed, passing, cuts):
    """[len(cuts), bytes]: the survivors passing below each cut at one exit (``passing``: its rows of
    :func:`passing_sets`), packed as ``np.packbits``."""
    out = np.empty((len(cuts), len(packed)), dtype=np.uint8)
    for c in range(len(cuts)):
        for b in range(len(packed)):
            out[c, b] = packed[b] & ~passing[cuts[c], b]
    return out


_BYTE_ONES = np.array([bin(b).count("1") for b in range(256)], dtype=np.int64)


@njit(cache=True)
def gone_by(passing, levels):
    """[len(levels)]: how many samples have left by each exit of a decided prefix of ``levels`` (cumulative): each
    at the first exit whose level it passes (``passing``: :func:`passing_sets`)."""
    taken = np.zeros(passing.shape[2], dtype=np.uint8)
    gone = np.zeros(len(levels), dtype=np.int64)
    total = 0
    for j in range(len(levels)):
        if levels[j] > 0:
            for b in range(len(taken)):
                new = passing[j, levels[j], b] & ~taken[b]
                total += _BYTE_ONES[new]
                taken[b] |= new
        gone[j] = total
    return gone


@njit(cache=True)
def _within(row, of):
    """Whether the bit set ``row`` lies within ``of`` (read up to its first byte that says not)."""
    for b in range(len(row)):
        if row[b] & ~of[b]:
            return False
    return True


@njit(cache=True)
def dominating_row(packed, enabled, right, gone, n, node_packed, node_enabled, node_right, node_gone, could_right):
    """The first of the ``n`` nodes popped before (rows of ``packed`` survivors, ``enabled`` exits as bit sets,
    ``right`` answers decided, ``gone`` samples gone by each exit, all at the node's depth) that dominates the node
    (``node_*``), or -1: its survivors a subset of the node's, its enabled exits too, at least as many gone by each
    exit, and at least as many right as the node has plus those of the node's extra survivors that could still be
    answered right (``could_right``, a bit set). A row failing a test is left at its first byte that fails it."""
    for r in range(n):
        if right[r] < node_right or not _within(enabled[r], node_enabled) or not _within(packed[r], node_packed):
            continue
        if np.any(gone[r] < node_gone):
            continue
        extra = 0
        for b in range(packed.shape[1]):
            extra += _BYTE_ONES[node_packed[b] & ~packed[r, b] & could_right[b]]
        if right[r] >= node_right + extra:
            return r
    return -1


def right_exits(passed: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample, the exits it passes at some level and answers right there, in chain order, as compressed rows
    (:func:`reachable_right` walks only these for a survivor the final classifier gets wrong, not every exit
    left: 48 -> 20 us a node on a trained ResNet-110's lowest open nodes, ~780 survivors, ~45 exits left):
    ``start`` [N + 1] (sample i's rows are start[i]:start[i + 1]), their ``exit`` and passed ``level``."""
    hit = (passed >= 1) & correct
    start = np.concatenate([[0], np.cumsum(hit.sum(axis=1))]).astype(np.int64)
    rows, exits = np.nonzero(hit)                # row-major: by sample, then exit
    return start, exits.astype(np.min_scalar_type(-passed.shape[1])), passed[rows, exits]


@njit(cache=True)
def _survivor_indices(packed, n):
    """The survivors' sample indices, ascending."""
    out = np.empty(n, dtype=np.int64)
    count = 0
    for byte in range(len(packed)):
        bits = packed[byte]
        for b in range(8 if bits else 0):
            i = byte * 8 + b
            if i < n and (bits >> (7 - b)) & 1:
                out[count] = i
                count += 1
    return out[:count]


@njit(cache=True)
def reachable_right(packed, depth, passed, correct, final, max_level, right_start, right_exit, right_level):
    """An upper bound on the right answers the survivors can still give, whatever the exits from ``depth`` on do: the
    survivors right at the final classifier, plus the most that *recovering* the others (answered right at an
    exit where the final classifier is wrong) can net. Recovering ``s`` at exit k needs k's level at most s's
    passed level there, so k takes every survivor that arrives passing that level; a survivor right at the final
    classifier, wrong at k and wrong at every exit before k (from ``depth``) it passes is then surely lost (taken
    wrongly at k, or earlier). With L(s) the fewest such losses over s's exits, recovering a set R loses at least
    max L over R: so at most max_m (m - L_(m)) net, L sorted ascending. ``passed``/``correct``: [N, E] by sample
    (each survivor right at the final classifier walks its exits until one it passes rightly), ``final``: [N]
    bool; ``right_*``: :func:`right_exits` (what the others walk). O(survivors x exits)."""
    n, n_exits = passed.shape
    width = n_exits - depth
    lost = np.zeros((max(width, 1), max_level + 2), dtype=np.int64)   # [exit, level]: sure losses passing it
    wrong_final = np.empty(n, dtype=np.int64)                         # the survivors that may be recovered
    alive = _survivor_indices(packed, n)
    survivors, recoverable, total = len(alive), 0, 0
    for i in alive:
        if not final[i]:
            wrong_final[recoverable] = i
            recoverable += 1
            continue
        total += 1
        for k in range(depth, n_exits):
            level = passed[i, k]
            if level >= 1:
                if correct[i, k]:
                    break                  # it may leave here, rightly: no later exit surely loses it
                lost[k - depth, level] += 1
    for r in range(width):                 # lost[r, l]: those passing level l or above
        for level in range(max_level - 1, 0, -1):
            lost[r, level] += lost[r, level + 1]
    fewest = np.zeros(survivors + 1, dtype=np.int64)    # how many recoverable survivors have each L
    for a in range(recoverable):
        i = wrong_final[a]
        best = -1
        for row in range(right_start[i], right_start[i + 1]):
            k = right_exit[row]
            if k < depth:
                continue
            here = lost[k - depth, right_level[row]]
            if best < 0 or here < best:
                best = here
                if best == 0:
                    break
        if best >= 0:
            fewest[min(best, survivors)] += 1
    gain, m = 0, 0
    for losses in range(survivors + 1):    # the m-th smallest L: m - L_(m) at the last of each equal L
        m += fewest[losses]
        if fewest[losses]:
            gain = max(gain, m - losses)
    return total + gain


_M1, _M2, _M4, _H01 = (np.uint64(0x5555555555555555), np.uint64(0x3333333333333333),
                       np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0x0101010101010101))


@njit(cache=True)
def _ones(x):
    """Set bits of a uint64."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@njit(cache=True)
def _count(bits):
    total = 0
    for w in range(len(bits)):
        total += _ones(bits[w])
    return total


@njit(cache=True, inline="always")
def _allowed(level, k, lo, hi):
    """The level ``level`` passed at exit k comes to where only levels lo[k]..hi[k] may be chosen (0: none)."""
    return 0 if level < lo[k] else min(level, hi[k])


@njit(cache=True)
def _net_gain(decided, covered, spoiled, hit, covers, hits, rec_sample, right_start, right_exit, right_level, depth,
              lo, hi, fewest, votes):
    """The count of :func:`reachable_right` in the search of :func:`recovery_search`: of the recoverable survivors
    not yet covered, with L(s) the fewest *new* sure losses of covering s at an exit not yet ``decided``, at most
    max_m (m - L_(m)) more net right answers. ``votes[k]``: how many survivors have their fewest at exit k."""
    fewest[:] = 0
    votes[:] = 0
    top = len(fewest) - 1
    for a in range(len(rec_sample)):
        if ((covered[a >> 6] | spoiled[a >> 6]) >> np.uint64(a & 63)) & np.uint64(1):
            continue
        i = rec_sample[a]
        best, at = -1, -1
        for row in range(right_start[i], right_start[i + 1]):
            k = right_exit[row] - depth
            level = _allowed(right_level[row], right_exit[row], lo, hi)
            if k < 0 or level == 0 or decided[k]:
                continue
            here = 0
            for w in range(hit.shape[0]):
                here += _ones(hits[k, level, w] & ~hit[w])
            if best < 0 or here < best:
                best, at = here, k
                if best == 0:
                    break
        if best >= 0:
            fewest[min(best, top)] += 1
            votes[at] += 1
    gain, m = 0, 0
    for losses in range(top + 1):
        m += fewest[losses]
        if fewest[losses]:
            gain = max(gain, m - losses)
    return gain


@njit(cache=True)
def _greedy_net(useful, covers, spoils, hits, covered, spoiled, hit, max_level):
    """|covered - spoiled| - |hit| added by levels chosen greedily (each step the exit and level that net the most),
    to settle at once the nodes whose relaxation can reach their accuracy."""
    done = np.zeros(len(useful), dtype=np.bool_)
    value = 0
    while True:
        best, best_u, best_level = 0, -1, 0
        for u in range(len(useful)):
            if done[u]:
                continue
            k = useful[u]
            for level in range(1, max_level + 1):
                net = 0
                for w in range(covered.shape[0]):
                    net += _ones((covered[w] | covers[k, level, w]) & ~(spoiled[w] | spoils[k, level, w]))
                    net -= _ones(covered[w] & ~spoiled[w])
                for w in range(hit.shape[0]):
                    net -= _ones(hits[k, level, w] & ~hit[w])
                if net > best:
                    best, best_u, best_level = net, u, level
        if best_u < 0:
            return value
        done[best_u] = True
        value += best
        k = useful[best_u]
        for w in range(covered.shape[0]):
            covered[w] |= covers[k, best_level, w]
            spoiled[w] |= spoils[k, best_level, w]
        for w in range(hit.shape[0]):
            hit[w] |= hits[k, best_level, w]


@njit(cache=True)
def _recovery_sets(packed, depth, passed, correct, final, max_level, right_start, right_exit, right_level, lo, hi):
    """What the search of :func:`recovery_search` works on, with only levels lo[k]..hi[k] (or off) at exit k: the
    survivors right at the final classifier, the recoverable ones (indices), and per [exit from ``depth``, level]
    the bit sets of those covered, spoiled and hit passing that level or above; the exits that cover anyone.
    ``depth`` is below the last exit (:func:`narrow_levels` answers the rest)."""
    n, n_exits = passed.shape
    width = n_exits - depth
    rec = np.empty(n, dtype=np.int64)
    lossy = np.empty(n, dtype=np.int64)
    n_rec, n_lossy, right_now = 0, 0, 0
    for i in _survivor_indices(packed, n):
        if not final[i]:
            for row in range(right_start[i], right_start[i + 1]):
                if right_exit[row] >= depth and _allowed(right_level[row], right_exit[row], lo, hi):
                    rec[n_rec] = i
                    n_rec += 1
                    break
            continue
        right_now += 1
        for k in range(depth, n_exits):
            if _allowed(passed[i, k], k, lo, hi) >= 1:     # its first chance from here: a sure loss where wrong
                if not correct[i, k]:
                    lossy[n_lossy] = i
                    n_lossy += 1
                break
    wr, wt = max((n_rec + 63) >> 6, 1), max((n_lossy + 63) >> 6, 1)
    covers = np.zeros((width, max_level + 2, wr), dtype=np.uint64)   # [exit, level]: covered at that level
    spoils = np.zeros((width, max_level + 2, wr), dtype=np.uint64)   # [exit, level]: spoiled at that level
    hits = np.zeros((width, max_level + 2, wt), dtype=np.uint64)     # [exit, level]: hit at that level
    for a in range(n_rec):
        i = rec[a]
        bit = np.uint64(1) << np.uint64(a & 63)
        for row in range(right_start[i], right_start[i + 1]):
            level = _allowed(right_level[row], right_exit[row], lo, hi)
            if right_exit[row] >= depth and level:
                covers[right_exit[row] - depth, level, a >> 6] |= bit
        for k in range(depth, n_exits):
            level = _allowed(passed[i, k], k, lo, hi)
            if level >= 1:
                if correct[i, k]:
                    break
                spoils[k - depth, level, a >> 6] |= bit
    for t in range(n_lossy):
        i = lossy[t]
        for k in range(depth, n_exits):
            level = _allowed(passed[i, k], k, lo, hi)
            if level >= 1:
                if correct[i, k]:
                    break
                hits[k - depth, level, t >> 6] |= np.uint64(1) << np.uint64(t & 63)
    for k in range(width):                 # [k, l]: those passing level l or above
        for level in range(max_level - 1, 0, -1):
            for w in range(wr):
                covers[k, level, w] |= covers[k, level + 1, w]
                spoils[k, level, w] |= spoils[k, level + 1, w]
            for w in range(wt):
                hits[k, level, w] |= hits[k, level + 1, w]
    useful = np.empty(width, dtype=np.int64)
    n_useful = 0
    for k in range(width):
        for w in range(wr):
            if covers[k, 1, w]:
                useful[n_useful] = k
                n_useful += 1
                break
    return right_now, rec[:n_rec], n_lossy, covers, spoils, hits, useful[:n_useful]


@njit(cache=True)
def _search_recoveries(covers, spoils, hits, useful, rec_sample, n_lossy, right_start, right_exit, right_level, depth,
                       lo, hi, max_level, want, budget, forced, forced_level):
    """The search of :func:`recovery_search` on :func:`_recovery_sets`, with exit ``forced`` (from ``depth``; -1:
    none) on at ``forced_level``: 1 when ``want`` more right answers than the final classifier gives may be
    reached (or ``budget`` search nodes did not settle it), 0 when not."""
    width, wr, wt = covers.shape[0], covers.shape[2], hits.shape[2]
    n_useful = len(useful)
    fewest = np.zeros(n_lossy + 2, dtype=np.int64)
    votes = np.zeros(width, dtype=np.int64)
    decided = np.zeros(width, dtype=np.bool_)
    covered = np.zeros((n_useful + 1, wr), dtype=np.uint64)          # by search depth
    spoiled = np.zeros((n_useful + 1, wr), dtype=np.uint64)
    hit = np.zeros((n_useful + 1, wt), dtype=np.uint64)
    free = useful
    if forced >= 0:
        decided[forced] = True
        covered[0, :] = covers[forced, forced_level]
        spoiled[0, :] = spoils[forced, forced_level]
        hit[0, :] = hits[forced, forced_level]
        free = useful[useful != forced]
    n_free = len(free)
    value = _count(covered[0] & ~spoiled[0]) - _count(hit[0])
    if value >= want:
        return 1
    if n_free == 0 or value + _net_gain(decided, covered[0], spoiled[0], hit[0], covers, hits, rec_sample, right_start,
                                        right_exit, right_level, depth, lo, hi, fewest, votes) < want:
        return 0
    if budget <= 0:
        return 1                           # no search node to spend: only the count above could say "cannot"
    if value + _greedy_net(free, covers, spoils, hits, covered[0].copy(), spoiled[0].copy(), hit[0].copy(),
                           max_level) >= want:
        return 1                           # levels that reach it, found at once (the search would take long)
    exit_at = np.empty(n_free + 1, dtype=np.int64)                 # the exit decided at each depth
    level_at = np.empty(n_free + 1, dtype=np.int64)                # the next level to try there; -1: done
    exit_at[0] = np.argmax(votes)
    decided[exit_at[0]] = True
    level_at[0] = max_level
    s, nodes = 0, 0
    while s >= 0:
        level = level_at[s]
        if level < 0:
            decided[exit_at[s]] = False
            s -= 1
            continue
        k = exit_at[s]
        if level == 0:                     # off
            level_at[s] = -1
            covered[s + 1, :] = covered[s, :]
            spoiled[s + 1, :] = spoiled[s, :]
            hit[s + 1, :] = hit[s, :]
        else:
            level_at[s] = level - 1
            new, same = False, True
            for w in range(wr):
                fresh = covers[k, level, w] & ~covered[s, w]
                new = new or fresh != 0
                same = same and fresh == (covers[k, level + 1, w] & ~covered[s, w])
            if not new or same:            # covers no one new, or no one the level above does not
                continue
            for w in range(wr):
                covered[s + 1, w] = covered[s, w] | covers[k, level, w]
                spoiled[s + 1, w] = spoiled[s, w] | spoils[k, level, w]
            for w in range(wt):
                hit[s + 1, w] = hit[s, w] | hits[k, level, w]
        nodes += 1
        if nodes > budget:
            return 1
        value = _count(covered[s + 1] & ~spoiled[s + 1]) - _count(hit[s + 1])
        if value >= want:
            return 1
        if s + 1 == n_free:
            continue
        if value + _net_gain(decided, covered[s + 1], spoiled[s + 1], hit[s + 1], covers, hits, rec_sample, right_start,
                             right_exit, right_level, depth, lo, hi, fewest, votes) < want:
            continue
        s += 1
        exit_at[s] = np.argmax(votes)      # the exit most of the count's cheapest recoveries rely on
        decided[exit_at[s]] = True
        level_at[s] = max_level
    return 0


@njit(cache=True)
def recovery_search(packed, depth, passed, correct, final, max_level, right_start, right_exit, right_level, need,
                    budget):
    """Whether the survivors may still give ``need`` right answers, by a search over the levels of the exits from
    ``depth`` on that keeps only what accuracy depends on: 1 when some levels may reach it (or ``budget`` search
    nodes did not settle it), 0 when none can.

    The relaxation searched: a survivor the final classifier gets wrong counts as recovered when some exit it
    answers right at has a level it passes (*covered*) and no exit *spoils* it; a survivor right at the final
    classifier counts as lost when some exit has a level it passes, answers wrong at, and every exit before it
    (from ``depth``) it passes it answers wrong at as well (it is then surely taken wrongly there or earlier:
    *hit*); such an exit spoils a survivor wrong at the final classifier the same way (it leaves wrongly, never
    recovered); nothing else moves. So the right answers are at most (right at the final classifier) +
    |covered - spoiled| - |hit|, and the exits' order no longer matters. Spoils raised a trained ResNet-110's
    20 s tree from 1.648 to 1.694 ms: most levels an exit is probed at (:func:`narrow_levels`) spoil recoveries
    the count of the others relied on. :func:`reachable_right` bounds this without a search (recovering a set
    loses at least the largest of its members' losses) and lets a trained ResNet-110's lowest open nodes net
    23-41 where this relaxation allows 5-14 (HiGHS, exactly) and they need 16-37. Covered, spoiled and hit sets
    are bit sets; a greedy pass first settles the nodes it can reach at once; the search then decides next the
    exit most of the count's cheapest recoveries rely on (of 269 such nodes, 203 proven within 1,000 search nodes
    where chain order proves 171), tries an exit's level only where it covers someone new that the next level up
    does not (a higher level hits and spoils no more), leaves exits that cover no one off, and stops a branch
    where :func:`_net_gain` says it cannot reach ``need``."""
    n_exits = passed.shape[1]
    lo, hi = np.ones(n_exits, dtype=np.int8), np.full(n_exits, max_level, dtype=np.int8)
    return narrow_levels(packed, depth, passed, correct, final, max_level, right_start, right_exit, right_level, need,
                         budget, lo, hi, -1)


@njit(cache=True)
def narrow_levels(packed, depth, passed, correct, final, max_level, right_start, right_exit, right_level, need,
                  budget, lo, hi, probe_budget):
    """:func:`recovery_search` with exit k's levels limited to lo[k]..hi[k] (or off); with ``probe_budget`` >= 0,
    where the survivors may reach ``need``, each exit's range is then narrowed in place from both ends while that
    end level, forced on, cannot (by the same search, ``probe_budget`` search nodes each, "unknown" keeping the
    level; an exit whose every level is ruled out is left lo > hi: off). Levels ruled out here stay ruled out
    below the node (a child's relaxation is this one with one more exit decided), and a bound over only the levels
    left is a bound on every completion that meets the accuracy. A level that, forced on, surely loses no one is
    not probed (nor any beyond it from that end): it can be ruled out only where the recoveries it closes (at the
    exit's other levels) were needed, which on the trained ResNet-110's tree is 2% of the levels ruled out, and
    skipping those probes saves 35% of the narrowing's time (the 20 s tree: 10% more nodes, bound 1.558-1.563 ->
    1.563-1.572 ms over five and six runs)."""
    n_exits = passed.shape[1]
    if depth >= n_exits:
        return 1
    right_now, rec, n_lossy, covers, spoils, hits, useful = _recovery_sets(
        packed, depth, passed, correct, final, max_level, right_start, right_exit, right_level, lo, hi)
    want = need - right_now
    if want <= 0:
        return 1
    if want > len(rec) or not _search_recoveries(covers, spoils, hits, useful, rec, n_lossy, right_start, right_exit,
                                                 right_level, depth, lo, hi, max_level, want, budget, -1, 0):
        return 0
    if probe_budget >= 0:
        for k in range(depth, n_exits):
            for end in range(2):           # 0: from the lowest level up; 1: from the highest down
                while lo[k] <= hi[k]:
                    level = lo[k] if end == 0 else hi[k]
                    if _count(hits[k - depth, level]) == 0:
                        break              # it loses no one: seldom ruled out, and not worth a probe (see above)
                    if _search_recoveries(covers, spoils, hits, useful, rec, n_lossy, right_start, right_exit,
                                          right_level, depth, lo, hi, max_level, want, probe_budget, k - depth,
                                          level):
                        break
                    if end == 0:
                        lo[k] = level + 1
                    else:
                        hi[k] = level - 1
    return 1


@njit(cache=True)
def narrowed_window(packed, depth, lam, lo, hi, leave, head, passed, correct, final, n_levels):
    """The width-1 window (:func:`nested_window`) of one survivor set when exit k may only be off or at a level in
    lo[k]..hi[k] (:func:`narrow_levels`), from ``depth``: each survivor's first chance and cheapest options past it
    redone under those limits in one backward walk over its exits (a survivor passing only ruled-out levels of an
    exit cannot leave there); and how many survivors there are."""
    n, n_exits = passed.shape
    rows = _survivor_indices(packed, n)
    m = len(rows)
    # one survivor at a time, in row 0 (cache-resident; rows for all of them cost 1.7 MB a call at 1,000 x 54)
    chance = np.empty(1, dtype=np.int64)
    level = np.zeros((1, n_exits), dtype=np.int64)
    right = np.zeros((1, n_exits))
    right_final = np.empty(1)
    after = np.empty((1, n_exits + 2))
    after_right = np.empty((1, n_exits + 2))
    acc, ends = _window_sums(1, depth, n_levels)
    for r in range(m):
        i = rows[r]
        chance[0] = n_exits
        right_final[0] = 1.0 if final[i] else 0.0
        options, right_options = leave[n_exits], leave[n_exits] if final[i] else np.inf   # past k, walking back
        for k in range(n_exits - 1, depth - 1, -1):
            here = _allowed(passed[i, k], k, lo, hi)
            if here:
                chance[0], level[0, k], right[0, k] = k, here, 1.0 if correct[i, k] else 0.0
                after[0, k + 1], after_right[0, k + 1] = options, right_options
                options = min(options, leave[k])
                if correct[i, k]:
                    right_options = min(right_options, leave[k])
        _window_add(acc, ends, 0, 0, depth, lam, chance, leave, head, after, after_right, level, right, right_final)
    return _window_finish(acc, ends, 1 if m else 0, np.ones(1, dtype=np.int64), depth, head, n_levels)[0], m
