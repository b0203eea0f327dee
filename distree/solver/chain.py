"""The chain bound: a dynamic programme along the chain that keeps the placement, the heads and the exits' own
answers shared, for a node of the branch and bound within a placement class.

The window bound (:mod:`distree.solver.bounds`) lets every survivor past its first chance pick its own exit, on its
own cheapest path, paying no head on the way; at the trained ResNet-110's lowest open nodes that relaxes the
stage end, the heads and the collateral losses of a shared level together, and the bound stays ~10% under the plan
(docs/solver.md, thirty-seventh session). Here the survivors still *alive* pay blocks, cuts and heads exactly, on
one placement in the class that the programme chooses: a survivor is alive until its *first chance*, the first
exit (from the node's on) it passes at the loosest level the node's narrowing allows, since before that no
completion meeting the accuracy can take it. The programme walks the blocks with the state (last exit it enabled,
device); enabling exit j at level l from state e lets go the survivors whose first chance lies in (e, j]: those
passing l at j truly leave there (alive, passing), their answer exact; the others go on in truth, and leave the
programme with a lower bound on their own rest: the cheapest path in the class to their next exit they pass and
answer right, or wrong, or the final classifier, its head and return, no other head (:func:`cost_to_exits`), and
the answer that path gives. The least cost to leave at an exit or any later one rises with the exit, so that
rest is the cheaper of two paths: to the next exit passed and answered right (or, with none, the final classifier,
right or not), less the multiplier where right; and to the next one passed and answered wrong (or the final).
Those never let go reach the final classifier, exactly. Accuracy is priced by a
multiplier (any one gives a valid bound); the levels are the programme's choice, exit by exit. The programme may
stop at a horizon, a number of exits past the node's: everyone still in flight at its last exit's block leaves with
the same rest bound from there (the cheapest path to the next exit passed past the horizon, right or wrong), which
no continuation undercuts, so the bound stays valid, a little weaker, and costs only the exits near the node.

Valid when each stage is a later device in the pipeline order (not ``--free-order``: the rests' paths only move
on); memory, deadline and load are relaxed. No sample leaves the programme before the plan could let it go (a
survivor let go at an exit it does not pass is charged its own later path), so returns need not obey the triangle
(the thirty-seventh session asked for it; the thirty-eighth found no step that uses it and dropped it). Tested
against enumeration on every node of every placement class of the suite's small random instances, as drawn and
with one device's return made dear (``tests/test_solver.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from distree.solver.classes import StageClass, class_placements
from distree.solver.problem import Problem

UNREACHABLE = 1e18          # a path the class does not allow (finite: it is summed over samples)


@dataclass(frozen=True)
class ChainTables:
    """A class's placement data for :func:`chain_bound`: where each device may run each block, and the least cost
    from any (device, block done) on to leaving at each exit or at the final classifier."""

    allowed: np.ndarray          # [D, B] bool
    to_exit_after: np.ndarray    # [B, E + 1, D]: least cost to leave at exit t or any later one (t = E: the final)


def chain_tables(p: Problem, c: StageClass | None) -> ChainTables:
    """Class ``c``'s tables (None: every placement, the first stage on any device), built once per search (~0.3 ms
    on the trained ResNet-110)."""
    if c is None:
        allowed = np.ones((p.n_devices, p.n_blocks), dtype=bool)
    else:
        allowed = class_placements(p, c)
        allowed[:c.device] = False      # pipeline order: no device before the first stage's runs at all
    to_exit = cost_to_exits(p.block_ms, p.head_ms, p.cut_ms, p.return_ms, p.exit_after.astype(np.int64), allowed)
    after = to_exit.copy()
    for t in range(p.n_exits - 1, -1, -1):
        after[t] = np.minimum(after[t], after[t + 1])
    return ChainTables(allowed, np.ascontiguousarray(after.transpose(2, 0, 1)))


@njit(cache=True)
def cost_to_exits(block_ms, head_ms, cut_ms, return_ms, exit_after, allowed):
    """[E + 1, D, B]: from device d with block b done, the least cost of blocks, cuts (each stage a later device),
    the head and the return to leave at exit t (t = E: the final classifier's answer); UNREACHABLE where no allowed
    path leads there."""
    D, B = block_ms.shape
    E = len(exit_after)
    cost = np.full((E + 1, D, B), UNREACHABLE)
    for t in range(E + 1):
        end = B - 1 if t == E else exit_after[t]
        for d in range(D):
            if allowed[d, end]:
                cost[t, d, end] = return_ms[d] + (0.0 if t == E else head_ms[d, t])
        for b in range(end - 1, -1, -1):
            for d in range(D):
                best = UNREACHABLE
                for d2 in range(d, D):
                    if allowed[d2, b + 1] and cost[t, d2, b + 1] < UNREACHABLE:
                        step = block_ms[d2, b + 1] + cost[t, d2, b + 1] + (cut_ms[d, d2, b + 1] if d2 != d else 0.0)
                        best = min(best, step)
                cost[t, d, b] = best
    return cost


@njit(cache=True)
def chain_bound(packed, levels, lo, hi, lam, passed, correct, final, n_levels, block_ms, head_ms, cut_ms, return_ms,
                exit_after, source, device, allowed, to_exit_after, required, horizon):
    """A lower bound (summed over samples, ms) on every completion of the node with prefix ``levels`` and survivors
    ``packed`` in the class of ``allowed`` (first stage on ``device``) whose levels lie in [``lo``, ``hi``] (the
    node's narrowing; ``lo > hi``: the exit stays off), accuracy priced at ``lam`` per right answer against
    ``required`` (module docstring); ``device`` -1: the first stage on any device ``allowed`` lets run block 0.
    ``passed``/``correct``: [N, E] per sample; ``to_exit_after``: [B, E + 1, D] (:class:`ChainTables`, transposed
    for the reads here). ``horizon``: the programme looks that many exits past the node's; at the block of the last
    of them everyone still in flight leaves it with the rest bound of a survivor let go (their next exits passed
    from there on), so a node pays only for the exits near it (``bnb.CHAIN_HORIZON``).

    Samples are read row by row and the survivors taken group by group of first chance, each group's sums over
    the later exits a block small enough to stay in cache: ~1.1 ms a node on the trained ResNet-110 (~1,200
    survivors, ~55,000 (survivor, later exit) pairs), half a pass exit by exit over all survivors (2.1 ms); 0.8 ms
    with a horizon of 32 exits."""
    N, E = passed.shape
    k = len(levels)
    W = min(E - k, horizon)                     # the exits looked at; state s: the last enabled is k - 1 + s (0: none)
    before, gone, right = _prefix_counts(levels, passed, correct, k)
    first = np.full(N, -1)
    for i in range(N):
        if (packed[i >> 3] >> (7 - (i & 7))) & 1:
            first[i] = _first_chance(i, k, W, lo, hi, passed)
    t = _group_sums(W, n_levels.max(), block_ms.shape[0])
    _add_survivors(t, _counting_sort(first, W + 1)[0], first, k, W, lam, lo, hi, passed, correct, final, n_levels,
                   exit_after, to_exit_after)
    return _programme(t, levels, before, gone, right, k, W, lam, lo, hi, n_levels, block_ms, head_ms, cut_ms,
                      return_ms, exit_after, source, device, allowed, N, required)


@njit(cache=True)
def chain_bounds_by_level(packed, levels, child_levels, lo, hi, lam, passed, correct, final, n_levels, block_ms,
                          head_ms, cut_ms, return_ms, exit_after, source, device, allowed, to_exit_after, required,
                          horizon):
    """:func:`chain_bound` of each child of the node (prefix ``levels``, survivors ``packed``) that sets its next
    exit k to a level of ``child_levels`` (0: off), all over the same ``lo``/``hi``, in one pass: a
    level l child keeps the survivors passing below l at exit k, so the children's survivors are nested by level,
    and the group sums of one are those of the one below plus the survivors passing exactly at its level."""
    N, E = passed.shape
    k = len(levels)
    kc = k + 1                                  # the children's depth
    W = min(E - kc, horizon)
    top_k = n_levels[k]
    child = np.empty(kc, dtype=levels.dtype)
    child[:k] = levels
    before = np.zeros(kc)
    gone = np.zeros(kc)
    right = np.zeros(kc)
    before[:k], gone[:k], right[:k] = _prefix_counts(levels, passed, correct, k)
    first = np.full(N, -1)
    passes_k = np.full(N, -1)                   # the level each survivor passes at exit k
    right_at = np.zeros(top_k + 1)
    for i in range(N):
        if (packed[i >> 3] >> (7 - (i & 7))) & 1:
            first[i] = _first_chance(i, kc, W, lo, hi, passed)
            passes_k[i] = min(passed[i, k], top_k)
            right_at[passes_k[i]] += correct[i, k]
    by_level, at_level = _counting_sort(passes_k, top_k + 1)     # at_level[l]: how many pass below level l
    t = _group_sums(W, n_levels.max(), block_ms.shape[0])
    values = np.full(len(child_levels), np.inf)
    added = 0                                   # survivors passing below this level are in the sums
    for c in np.argsort(np.where(child_levels == 0, top_k + 1, child_levels)):     # ascending, off (all stay) last
        lv = child_levels[c]
        upto = top_k + 1 if lv == 0 else lv
        if upto > added:
            _add_survivors(t, by_level[at_level[added]:at_level[upto]], first, kc, W, lam, lo, hi, passed, correct,
                           final, n_levels, exit_after, to_exit_after)
            added = upto
        child[k] = lv
        before[k] = at_level[top_k + 1] if lv > 0 else 0.0
        gone[k] = at_level[top_k + 1] - at_level[lv] if lv > 0 else 0.0
        right[k] = right_at[lv:].sum() if lv > 0 else 0.0
        values[c] = _programme(t, child, before, gone, right, kc, W, lam, lo, hi, n_levels, block_ms, head_ms, cut_ms,
                               return_ms, exit_after, source, device, allowed, N, required)
    return values


@njit(cache=True)
def _prefix_counts(levels, passed, correct, k):
    """The prefix, exact: at each enabled exit, how many were in flight, left, left right."""
    N = passed.shape[0]
    before, gone, right = np.zeros(k), np.zeros(k), np.zeros(k)
    for i in range(N):
        for j in range(k):
            if levels[j] > 0:
                before[j] += 1
                if passed[i, j] >= levels[j]:
                    gone[j] += 1
                    right[j] += correct[i, j]
                    break
    return before, gone, right


@njit(cache=True)
def _first_chance(i, k, W, lo, hi, passed):
    """Survivor ``i``'s first chance, as exits past ``k`` (W: none before the horizon)."""
    for j in range(k, k + W):
        if lo[j] <= hi[j] and passed[i, j] >= lo[j]:
            return j - k
    return W


@njit(cache=True)
def _counting_sort(key, n_keys):
    """The samples whose ``key`` is >= 0 (the survivors), ordered by it, and where each key's run starts
    ([n_keys + 1]: the last is how many)."""
    start = np.zeros(n_keys + 1, dtype=np.int64)
    for i in range(len(key)):
        if key[i] >= 0:
            start[key[i] + 1] += 1
    for c in range(n_keys):
        start[c + 1] += start[c]
    order = np.empty(start[n_keys], dtype=np.int64)
    fill = start[:n_keys].copy()
    for i in range(len(key)):
        if key[i] >= 0:
            order[fill[key[i]]] = i
            fill[key[i]] += 1
    return order, start


@njit(cache=True)
def _group_sums(W, top, D):
    """Empty sums of what each group of survivors (by first chance c, as exits past the node's) brings to each exit
    from c on, by the level passed there: how many, how many right, their rests' lower bounds per device (the
    cheapest path to the next exit passed and answered right, less the multiplier; or wrong); what each group
    leaves the programme with at the horizon's block (group W: no chance before it); each group's size and the
    final classifier's right answers among it."""
    return (np.zeros((W, W, top + 1)), np.zeros((W, W, top + 1)), np.zeros((W, W, top + 1, D)), np.zeros((W + 1, D)),
            np.zeros(W + 1), np.zeros(W + 1))


@njit(cache=True)
def _last_block(k, W, E, B, exit_after):
    """The block where the programme stops: that of the last exit before the horizon (the last block: none)."""
    return B - 1 if k + W == E else exit_after[k + W - 1]


@njit(cache=True)
def _add_survivors(sums, order, first, k, W, lam, lo, hi, passed, correct, final, n_levels, exit_after,
                   to_exit_after):
    """Add the survivors ``order`` (first chances ``first``) to ``sums`` (:func:`_group_sums`), each one's row read
    once backward from the horizon, its next exits passed right and wrong kept at hand."""
    count, count_right, rest_sum, beyond, alive_from, final_from = sums
    E = passed.shape[1]
    D = rest_sum.shape[3]
    past = k + W
    last_block = _last_block(k, W, E, to_exit_after.shape[0], exit_after)
    for y in range(len(order)):
        i = order[y]
        c = first[i]
        alive_from[c] += 1
        final_from[c] += final[i]
        next_right, next_wrong = _next_passed(i, past, lo, hi, passed, correct)
        if past < E:
            paid = lam if next_right < E or final[i] else 0.0
            for d in range(D):
                beyond[c, d] += _rest(to_exit_after, last_block, d, next_right, next_wrong, paid)
        for j in range(past - 1, k + c - 1, -1):
            if lo[j] > hi[j]:
                continue
            passes, answer = passed[i, j], correct[i, j]
            jj, lv, b = j - k, min(passes, n_levels[j]), exit_after[j]
            count[c, jj, lv] += 1.0
            count_right[c, jj, lv] += answer
            paid = lam if next_right < E or final[i] else 0.0
            for d in range(D):
                rest_sum[c, jj, lv, d] += _rest(to_exit_after, b, d, next_right, next_wrong, paid)
            if passes >= lo[j]:
                if answer:
                    next_right = j
                else:
                    next_wrong = j


@njit(cache=True)
def _programme(sums, levels, before, gone, right, k, W, lam, lo, hi, n_levels, block_ms, head_ms, cut_ms, return_ms,
               exit_after, source, device, allowed, N, required):
    """The programme over (last exit enabled, device) along the blocks, from the prefix's exact counts and the
    survivors' group sums (read only: the children of one node share them). A block's step walks only the states
    an exit passed so far makes reachable, and the exits read there only (forty-second session: 15% of a chain pass)."""
    count, count_right, rest_sum, beyond, alive_from, final_from = sums
    D, B = block_ms.shape
    E = len(n_levels)
    top = count.shape[2] - 1
    past = k + W
    last_block = _last_block(k, W, E, B, exit_after)
    in_flight = np.zeros(W + 1)                # alive in state s: first chance after exit k - 1 + s
    right_at_end = np.zeros(W + 1)             # ... of whom the final classifier answers right
    total_alive, total_final = 0.0, 0.0
    for s in range(W, -1, -1):
        total_alive += alive_from[s]
        total_final += final_from[s]
        in_flight[s] = total_alive
        right_at_end[s] = total_final
    value = np.full((W + 1, D), np.inf)
    for d in range(D):
        if d == device or (device < 0 and allowed[d, 0]):
            value[0, d] = cut_ms[source, d, 0] * N
    in_prefix = N * 1.0
    step = np.empty((W + 1, D))
    best_from = np.empty((D, W + 1))
    hist = np.empty((top + 1, D, W + 1))
    base = np.empty((D, W + 1))
    last_prefix = exit_after[k - 1] if k > 0 else -1
    reach = 0                                    # states 0 .. reach can hold a value (state s: exit k - 1 + s passed)
    j_next = 0                                   # the first exit at this block or later (exit_after non-decreasing)
    for b in range(last_block + 1):
        for s in range(reach + 1):
            m = in_flight[s] if b > last_prefix else (in_prefix if s == 0 else 0.0)
            for d in range(D):
                if not allowed[d, b]:
                    step[s, d] = np.inf
                    continue
                v = value[s, d]
                if b > 0:
                    for d0 in range(d):
                        if value[s, d0] < np.inf:
                            v = min(v, value[s, d0] + cut_ms[d0, d, b] * m)
                step[s, d] = v + block_ms[d, b] * m
        value[:reach + 1, :] = step[:reach + 1, :]
        while j_next < past and exit_after[j_next] < b:
            j_next += 1
        for j in range(j_next, past):
            if exit_after[j] != b:
                break
            if j < k:                            # a prefix exit: fixed, exact
                if levels[j] > 0:
                    for d in range(D):
                        value[0, d] += head_ms[d, j] * before[j] + return_ms[d] * gone[j] - lam * right[j]
                    in_prefix -= gone[j]
                continue
            if lo[j] > hi[j]:
                continue
            jj = j - k
            span = jj + 1                        # first chances k .. j: states 0 .. jj can reach exit j
            L = n_levels[j]
            # from state s, group s's leavers at level lv: the rests of all, and for those passing lv their exact
            # leaving instead (hist); the levels above hi pass hi, so they are folded in from the start
            for s in range(span):
                for d in range(D):
                    total = 0.0
                    for v in range(L + 1):
                        r = rest_sum[s, jj, v, d]
                        total += r
                        hist[v, d, s] = return_ms[d] * count[s, jj, v] - lam * count_right[s, jj, v] - r
                    base[d, s] = total
                    best_from[d, s] = np.inf
            for v in range(hi[j] + 1, L + 1):
                for d in range(D):
                    for s in range(span):
                        base[d, s] += hist[v, d, s]
            for lv in range(hi[j], lo[j] - 1, -1):
                # from state e = k - 1 + s the leavers are the groups s .. jj: a suffix sum over s
                for d in range(D):
                    suffix = 0.0
                    for s in range(span - 1, -1, -1):
                        base[d, s] += hist[lv, d, s]
                        suffix += base[d, s]
                        if suffix < best_from[d, s]:
                            best_from[d, s] = suffix
            target = jj + 1
            reach = max(reach, target)
            for d in range(D):
                for s in range(span):
                    if value[s, d] < np.inf:
                        v = value[s, d] + head_ms[d, j] * in_flight[s] + best_from[d, s]
                        if v < value[target, d]:
                            value[target, d] = v
    end = np.inf
    for d in range(D):
        left = 0.0                               # in state s, groups s .. W are in flight at the horizon
        for s in range(W, -1, -1):
            left += beyond[s, d]
            if value[s, d] < np.inf:
                final_ms = left if past < E else return_ms[d] * in_flight[s] - lam * right_at_end[s]
                end = min(end, value[s, d] + final_ms)
    return end + lam * required


@njit(cache=True)
def _rest(to_exit_after, b, d, next_right, next_wrong, paid):
    """A survivor's rest bound from device ``d`` with block ``b`` done: the least cost to leave at an exit rises with
    the exit, so it is the cheaper of the path to its next exit passed and answered right (or the final classifier),
    less ``paid`` where that answer is right, and to its next one answered wrong (module docstring)."""
    return min(to_exit_after[b, next_right, d] - paid, to_exit_after[b, next_wrong, d])


@njit(cache=True)
def _next_passed(i, first, lo, hi, passed, correct):
    """Sample ``i``'s first exit from ``first`` on that it passes at the loosest level allowed and answers right,
    and the first it answers wrong (E: none)."""
    E = passed.shape[1]
    next_right, next_wrong = E, E
    for j in range(first, E):
        if lo[j] <= hi[j] and passed[i, j] >= lo[j]:
            if correct[i, j]:
                if next_right == E:
                    next_right = j
            elif next_wrong == E:
                next_wrong = j
            if next_right < E and next_wrong < E:
                break
    return next_right, next_wrong
