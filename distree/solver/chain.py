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
the answer that path gives. Those never let go reach the final classifier, exactly. Accuracy is priced by a
multiplier (any one gives a valid bound); the levels are the programme's choice, exit by exit.

Valid when each stage is a later device in the pipeline order (not ``--free-order``), and a sample that leaves
earlier is never dearer (returns obey the triangle: the relaxation lets a survivor leave at its first chance where
the plan may carry it on); memory, deadline and load are relaxed. Tested against enumeration on every node of every
placement class of the suite's small random instances (``tests/test_solver.py``).
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
    to_exit_after: np.ndarray    # [B, D, E + 1]: least cost to leave at exit t or any later one (t = E: the final)
    to_final: np.ndarray         # [B, D]: to the final classifier's answer


def chain_tables(p: Problem, c: StageClass) -> ChainTables:
    """Class ``c``'s tables, built once per class search (~0.3 ms on the trained ResNet-110)."""
    allowed = class_placements(p, c)
    allowed[:c.device] = False          # pipeline order: no device before the first stage's runs at all
    to_exit = cost_to_exits(p.block_ms, p.head_ms, p.cut_ms, p.return_ms, p.exit_after.astype(np.int64), allowed)
    after = to_exit.copy()
    for t in range(p.n_exits - 1, -1, -1):
        after[t] = np.minimum(after[t], after[t + 1])
    return ChainTables(allowed, np.ascontiguousarray(after.transpose(2, 1, 0)),
                       np.ascontiguousarray(to_exit[p.n_exits].T))


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
def _next_passable(row_passed, row_correct, lo, hi, after, right):
    """The first exit after ``after`` the sample passes at its loosest allowed level and answers ``right`` (or
    wrong); len(row) when none."""
    E = len(row_passed)
    for j in range(after + 1, E):
        if lo[j] <= hi[j] and row_passed[j] >= lo[j] and row_correct[j] == right:
            return j
    return E


@njit(cache=True)
def chain_bound(packed, levels, lo, hi, lam, passed, correct, final, n_levels, block_ms, head_ms, cut_ms, return_ms,
                exit_after, source, device, allowed, to_exit_after, to_final, required):
    """A lower bound (summed over samples, ms) on every completion of the node with prefix ``levels`` and survivors
    ``packed`` in the class of ``allowed`` (first stage on ``device``) whose levels lie in [``lo``, ``hi``] (the
    node's narrowing; ``lo > hi``: the exit stays off), accuracy priced at ``lam`` per right answer against
    ``required`` (module docstring). ``passed``/``correct``: [N, E] per sample; ``to_exit_after``: [B, D, E + 1] and
    ``to_final`` [B, D] (:class:`ChainTables`, transposed for the reads here)."""
    N, E = passed.shape
    D, B = block_ms.shape
    k = len(levels)
    # the prefix, exact: at each enabled exit, how many were in flight, left, left right
    alive = np.ones(N, dtype=np.bool_)
    before, gone, right = np.zeros(k), np.zeros(k), np.zeros(k)
    for j in range(k):
        if levels[j] > 0:
            for i in range(N):
                if alive[i]:
                    before[j] += 1
                    if passed[i, j] >= levels[j]:
                        alive[i] = False
                        gone[j] += 1
                        if correct[i, j]:
                            right[j] += 1
    n_states = E - k + 1                       # the last exit enabled: none since the node (0), or exit k - 1 + s
    n = 0
    for i in range(N):
        if (packed[i >> 3] >> (7 - (i & 7))) & 1:
            n += 1
    survivors = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)        # first chance (E: none)
    alive_from = np.zeros(n_states)            # survivors whose first chance is exit k + x (x = E - k: none)
    final_from = np.zeros(n_states)
    x = 0
    for i in range(N):
        if (packed[i >> 3] >> (7 - (i & 7))) & 1:
            c = E
            for j in range(k, E):
                if lo[j] <= hi[j] and passed[i, j] >= lo[j]:
                    c = j
                    break
            survivors[x] = i
            first[x] = c
            alive_from[c - k] += 1
            if final[i]:
                final_from[c - k] += 1
            x += 1
    order = np.argsort(first, kind="mergesort")            # by first chance: those leaving by exit j come first
    in_flight = np.zeros(n_states)             # alive in state s: first chance after exit k - 1 + s
    right_at_end = np.zeros(n_states)          # ... of whom the final classifier answers right
    total_alive, total_final = 0.0, 0.0
    for s in range(n_states - 1, -1, -1):
        total_alive += alive_from[s]
        total_final += final_from[s]
        in_flight[s] = total_alive
        right_at_end[s] = total_final
    next_right = np.full(n, -1)                # the next exit each passes and answers right / wrong, advanced lazily
    next_wrong = np.full(n, -1)
    value = np.full((n_states, D), np.inf)
    value[0, device] = cut_ms[source, device, 0] * N
    in_prefix = N * 1.0
    step = np.empty((n_states, D))
    best_from = np.empty((D, n_states))
    last_prefix = exit_after[k - 1] if k > 0 else -1
    top = 0
    for j in range(E):
        top = max(top, n_levels[j])
    hist = np.zeros((top + 2, D, n_states))
    base = np.zeros((D, n_states))
    leaving = 0                                # survivors (in ``order``) whose first chance is at most exit j
    for b in range(B):
        for s in range(n_states):
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
        value[:, :] = step
        for j in range(E):
            if exit_after[j] != b:
                continue
            if j < k:                            # a prefix exit: fixed, exact
                if levels[j] > 0:
                    for d in range(D):
                        value[0, d] += head_ms[d, j] * before[j] + return_ms[d] * gone[j] - lam * right[j]
                    in_prefix -= gone[j]
                continue
            while leaving < n and first[order[leaving]] <= j:
                leaving += 1
            if lo[j] > hi[j]:
                continue
            span = j - k + 1                     # first chances k .. j: states 0 .. j - k can reach exit j
            L = n_levels[j]
            hist[:L + 2, :, :span] = 0.0
            base[:, :span] = 0.0
            rest_of = to_exit_after[b]
            final_of = to_final[b]
            for y in range(leaving):
                x = order[y]
                i = survivors[x]
                c = first[x] - k
                if next_right[x] <= j:
                    next_right[x] = _next_passable(passed[i], correct[i], lo, hi, j, True)
                if next_wrong[x] <= j:
                    next_wrong[x] = _next_passable(passed[i], correct[i], lo, hi, j, False)
                nr, nw = next_right[x], next_wrong[x]
                lv = min(passed[i, j], L)
                here_right = lam if correct[i, j] else 0.0
                for d in range(D):
                    if not allowed[d, b]:
                        continue
                    rest = final_of[d] - (lam if final[i] else 0.0)
                    if nr < E:
                        rest = min(rest, rest_of[d, nr] - lam)
                    if nw < E:
                        rest = min(rest, rest_of[d, nw])
                    base[d, c] += rest
                    hist[lv, d, c] += return_ms[d] - here_right - rest
            for d in range(D):
                for s in range(span):
                    best_from[d, s] = np.inf
            for v in range(hi[j] + 1, L + 1):    # passing a level above hi passes hi: folded in from the start
                for d in range(D):
                    for s in range(span):
                        base[d, s] += hist[v, d, s]
            for lv in range(hi[j], lo[j] - 1, -1):
                # at level lv those passing it leave exactly (hist at levels >= lv, added as lv falls); from state
                # e = k - 1 + s the leavers are the first chances in (e, j]: a suffix sum over s
                for d in range(D):
                    suffix = 0.0
                    for s in range(span - 1, -1, -1):
                        base[d, s] += hist[lv, d, s]
                        suffix += base[d, s]
                        if suffix < best_from[d, s]:
                            best_from[d, s] = suffix
            target = j - k + 1
            for d in range(D):
                for s in range(span):
                    if value[s, d] < np.inf:
                        v = value[s, d] + head_ms[d, j] * in_flight[s] + best_from[d, s]
                        if v < value[target, d]:
                            value[target, d] = v
    end = np.inf
    for s in range(n_states):
        for d in range(D):
            if value[s, d] < np.inf:
                end = min(end, value[s, d] + return_ms[d] * in_flight[s] - lam * right_at_end[s])
    return end + lam * required
