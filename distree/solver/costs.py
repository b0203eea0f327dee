"""The cost model on a :class:`Problem`, and the exact best placement for a fixed exit configuration.

A *configuration* gives every exit a level (0 = off). A *placement* gives every block a device index;
each used device holds one contiguous range and, unless ``free_order``, devices appear in pipeline order.

Expected latency of a sample = compute of every block it reaches on that block's device + every enabled
head it reaches + the input transfer from the source + every device change it crosses + returning the
logits from the device where it leaves to the source. Averaged over samples, block b's compute and the
transfer into block b are weighted by ``reach[b]``, the share of samples not yet exited before b.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distree.solver.problem import Problem


@dataclass(frozen=True)
class Outcome:
    """Where samples leave under one configuration."""

    exit_rate: np.ndarray     # [E] share of samples leaving at each exit
    correct: int              # samples answered right
    reach_block: np.ndarray   # [B] share of samples that reach block b
    reach_exit: np.ndarray    # [E] share that reach exit j (evaluate its head, if enabled)
    final_rate: float         # share answered by the final classifier


def outcome(p: Problem, levels: np.ndarray) -> Outcome:
    levels = np.asarray(levels, dtype=int)
    N, E = p.passed_level.shape
    passes = (p.passed_level >= levels[None, :]) & (levels[None, :] > 0)
    any_pass = passes.any(axis=1)
    first = first_true(passes)
    counts = np.bincount(first, minlength=E + 1)
    correct = int(p.correct_final[~any_pass].sum())
    if E:
        rows = np.nonzero(any_pass)[0]
        correct += int(p.correct_exit[rows, first[rows]].sum())
    rate = counts[:E] / N
    return Outcome(exit_rate=rate, correct=correct, reach_block=reach_blocks(p, rate),
                   reach_exit=1.0 - (np.cumsum(rate) - rate), final_rate=counts[E] / N)


def unreached_exits_off(p: Problem, levels: np.ndarray) -> np.ndarray:
    """``levels`` with every enabled exit that no sample reaches turned off (an earlier one lets all that are left
    leave, as a grid's lowest level does): the same answers and expected latency, but the path on which no exit is
    taken (the worst case, a deadline) no longer runs their heads, nor does a bundle ship their segments. For the
    search the two tie, and it may leave them on."""
    levels = np.asarray(levels, dtype=int)
    left = np.round(outcome(p, levels).exit_rate * p.n_samples)       # samples leaving at each exit
    reached = p.n_samples - (np.cumsum(left) - left)
    return np.where((levels > 0) & (reached == 0), 0, levels)


def first_true(mask: np.ndarray) -> np.ndarray:
    """Column of the first True in each row; the column count where a row has none."""
    if mask.shape[1] == 0:
        return np.zeros(mask.shape[0], dtype=int)
    return np.where(mask.any(axis=1), mask.argmax(axis=1), mask.shape[1])


def reach_blocks(p: Problem, exit_rate: np.ndarray) -> np.ndarray:
    left_before = np.zeros(p.n_blocks + 1)
    np.add.at(left_before, p.exit_after + 1, exit_rate)
    return 1.0 - np.cumsum(left_before)[: p.n_blocks]


@dataclass(frozen=True)
class Evaluation:
    expected_ms: float
    worst_ms: float
    correct: int
    memory: np.ndarray        # [D] bytes needed (0 for unused devices)
    busy_ms: np.ndarray       # [D] expected compute per request
    breakdown: dict           # compute / heads / transfers / return
    feasible: bool
    violations: tuple[str, ...]


def evaluate(p: Problem, levels: np.ndarray, placement: np.ndarray) -> Evaluation:
    """Cost and constraint check of one (configuration, placement)."""
    levels = np.asarray(levels, dtype=int)
    pl = np.asarray(placement, dtype=int)
    o = outcome(p, levels)
    B = p.n_blocks
    en = levels > 0
    head_dev = pl[p.exit_after]
    blocks = p.block_ms[pl, np.arange(B)]
    heads = p.head_ms[head_dev, np.arange(p.n_exits)] * en
    cuts = np.empty(B)
    cuts[0] = p.cut_ms[p.source, pl[0], 0]
    cuts[1:] = p.cut_ms[pl[:-1], pl[1:], np.arange(1, B)]
    ret_exit = p.return_ms[head_dev]
    ret_final = p.return_ms[pl[-1]]
    breakdown = {
        "compute": float(blocks @ o.reach_block),
        "heads": float(heads @ o.reach_exit),
        "transfers": float(cuts @ o.reach_block),
        "return": float(ret_exit @ o.exit_rate + ret_final * o.final_rate),
    }
    worst = float(blocks.sum() + heads.sum() + cuts.sum() + ret_final)
    memory = np.zeros(p.n_devices)
    busy = np.zeros(p.n_devices)
    reach_next = forwarded(o.reach_block)
    for d in range(p.n_devices):
        on_b = pl == d
        if not on_b.any():
            continue
        on_h = (head_dev == d) & en
        act = max(p.block_act[d, on_b].max(), p.head_act[d, on_h].max(initial=0.0))
        memory[d] = p.block_param[d, on_b].sum() + p.head_param[d, on_h].sum() + act
        first, last = np.flatnonzero(on_b)[[0, -1]]
        busy[d] = (blocks[on_b] @ o.reach_block[on_b] + heads[on_h] @ o.reach_exit[on_h]
                   + p.handling[d] @ (o.reach_block[first], reach_next[last]))
    if p.source not in pl:
        busy[p.source] = relay_ms(p)
    violations = []
    if o.correct < p.required_correct:
        violations.append("accuracy")
    used = np.bincount(pl, minlength=p.n_devices) > 0
    if np.any(used & (memory > p.capacity_bytes)):
        violations.append("memory")
    if p.deadline_ms is not None and worst > p.deadline_ms + 1e-9:
        violations.append("deadline")
    if p.busy_cap_ms is not None and np.any(busy > p.busy_cap_ms + 1e-9):
        violations.append("throughput")
    if not valid_placement(p, pl):
        violations.append("placement")
    return Evaluation(expected_ms=sum(breakdown.values()), worst_ms=worst, correct=o.correct, memory=memory,
                      busy_ms=busy, breakdown=breakdown, feasible=not violations, violations=tuple(violations))


def relay_ms(p: Problem) -> float:
    """What a source that runs no stage is busy with per request: receiving it and handing it on (every one)."""
    return float(p.handling[p.source].sum())


def relay_fits(p: Problem) -> bool:
    """Whether the source may relay under the throughput bound; if not, every placement runs a stage on it."""
    return p.busy_cap_ms is None or relay_ms(p) <= p.busy_cap_ms + 1e-9


def forwarded(reach_block: np.ndarray) -> np.ndarray:
    """[..., B] the share handed on after each block: the next block's reach (0 after the last)."""
    return np.concatenate([reach_block[..., 1:], np.zeros_like(reach_block[..., :1])], axis=-1)


def valid_placement(p: Problem, pl: np.ndarray) -> bool:
    changes = np.nonzero(np.diff(pl))[0]
    order = [int(pl[0])] + [int(pl[c + 1]) for c in changes]
    if len(set(order)) != len(order):
        return False
    return p.free_order or order == sorted(order)


@dataclass(frozen=True)
class Segments:
    """Per (device, first block, last block): cost and feasibility of one stage, for one configuration."""

    cost: np.ndarray          # [D, B, B] expected ms of blocks s..e on d (compute + heads + exit returns)
    worst: np.ndarray         # [D, B, B] ms of blocks s..e on d on the no-exit path
    ok: np.ndarray            # [D, B, B] memory and throughput fit


def segments(p: Problem, levels: np.ndarray, o: Outcome) -> Segments:
    """Stage costs for every contiguous range on every device (O(D B^2), vectorised)."""
    D, B = p.n_devices, p.n_blocks
    en = np.asarray(levels) > 0
    exp_item = p.block_ms * o.reach_block[None, :]
    worst_item = p.block_ms.copy()
    busy_item = exp_item.copy()
    param_item = p.block_param.copy()
    act_item = p.block_act.copy()
    for j in np.nonzero(en)[0]:
        b = p.exit_after[j]
        exp_item[:, b] += p.head_ms[:, j] * o.reach_exit[j] + p.return_ms * o.exit_rate[j]
        busy_item[:, b] += p.head_ms[:, j] * o.reach_exit[j]
        worst_item[:, b] += p.head_ms[:, j]
        param_item[:, b] += p.head_param[:, j]
        act_item[:, b] = np.maximum(act_item[:, b], p.head_act[:, j])

    def range_sums(x: np.ndarray) -> np.ndarray:
        c = np.concatenate([np.zeros((D, 1)), np.cumsum(x, axis=1)], axis=1)
        return c[:, None, 1:] - c[:, :-1, None]          # [D, s, e] = sum x[s..e]

    upper = np.triu(np.ones((B, B), dtype=bool))
    act = np.full((D, B, B), np.inf)
    for s in range(B):
        act[:, s, s:] = np.maximum.accumulate(act_item[:, s:], axis=1)
    mem_ok = range_sums(param_item) + act <= p.capacity_bytes[:, None, None]
    ok = upper[None] & mem_ok
    if p.busy_cap_ms is not None:
        h = p.handling
        handling = (h[:, 0, None, None] * o.reach_block[None, :, None]
                    + h[:, 1, None, None] * forwarded(o.reach_block)[None, None, :])     # [D, s, e]
        ok &= range_sums(busy_item) + handling <= p.busy_cap_ms + 1e-9
    return Segments(cost=range_sums(exp_item), worst=range_sums(worst_item), ok=ok)


def best_placement(p: Problem, levels: np.ndarray, deadline_weight: float = 0.0,
                   order: tuple[int, ...] | None = None, through: int | None = None
                   ) -> tuple[np.ndarray, float] | None:
    """Exact cheapest placement of a fixed configuration, ignoring the deadline.

    Dynamic programme over (last block of a stage, device), devices in ``order`` (default: pipeline
    order). ``deadline_weight`` adds that multiple of the no-exit latency to the objective (a Lagrangian
    knob the heuristic turns when the deadline is violated). ``through``: only placements that run a stage on
    that device (what using a device the plan leaves idle would cost; the source, where relaying would break the
    throughput bound). None when no placement fits.
    """
    o = outcome(p, levels)
    seg = segments(p, levels, o)
    order = tuple(range(p.n_devices)) if order is None else order
    if through is None and not relay_fits(p):
        through = p.source
    if through is not None and through not in order:
        return None
    # with ``through``, a stage after it may only follow a path that ran a stage on it
    visited = 0 if through is None else order.index(through)
    D, B = p.n_devices, p.n_blocks
    lam = deadline_weight
    cost = seg.cost + lam * seg.worst
    INF = np.inf
    best = np.full((D, B), INF)              # best[d, e]: blocks 0..e placed, the stage on d ends at e
    back: dict[tuple[int, int], tuple[int, int]] = {}
    reach_in = o.reach_block
    for pos, d in enumerate(order):
        # entering d at block s: from the source (s = 0) or from an earlier device's stage ending at s-1
        enter = np.full(B, INF)
        came = np.full(B, -1)
        enter[0] = p.cut_ms[p.source, d, 0] * (1 + lam) if through is None or pos <= visited else INF
        for prev in order[visited if pos > visited else 0:pos]:
            via = best[prev, :-1] + p.cut_ms[prev, d, 1:] * (reach_in[1:] + lam)
            better = via < enter[1:]
            enter[1:] = np.where(better, via, enter[1:])
            came[1:] = np.where(better, prev, came[1:])
        total = np.where(seg.ok[d], enter[:, None] + cost[d], INF)   # [s, e]
        s_best = total.argmin(axis=0)
        best[d] = total[s_best, np.arange(B)]
        for e in range(B):
            if best[d, e] < INF:
                back[(d, e)] = (int(s_best[e]), int(came[s_best[e]]))
    final = best[:, B - 1] + p.return_ms * (o.final_rate + lam)
    final[list(order[:visited])] = INF
    d = int(np.argmin(final))
    if not np.isfinite(final[d]):
        return None
    pl = np.empty(B, dtype=int)
    e = B - 1
    while e >= 0:
        s, prev = back[(d, e)]
        pl[s:e + 1] = d
        e, d = s - 1, prev
    return pl, float(final.min())


def cheapest_leave_ms(p: Problem, head_price: np.ndarray | None = None,
                      allowed: np.ndarray | None = None) -> np.ndarray:
    """[E + 1] a lower bound on the latency of a sample leaving at exit j (last: the final classifier).

    The blocks up to the exit on the cheapest staged path to it: each stage a contiguous range whose
    blocks fit its device's memory (heads ignored), devices in pipeline order (any order with
    ``free_order``, revisits allowed), plus head j and returning the answer. Every feasible placement runs
    a sample along such a path, so bounds built on these costs are valid for all of them.

    With ``head_price`` [E] (what a bound will charge for each head evaluated before the exit), the path is
    also credited min(0, cost of head k on its device - price k) for every exit k before j: a bound charging
    leave[j] + the prices of the heads a sample evaluates then stays below its true latency on every path
    (the credit is at most the head's true cost minus its price, and never positive for a head skipped).
    Pricing heads at the source device's cost, not the cheapest device's, is what that buys.

    ``allowed`` [D, B] (default: all): the blocks each device may run, for a bound on a class of placements
    (:mod:`distree.solver.classes`); inf where no allowed path reaches.
    """
    D, B, E = p.n_devices, p.n_blocks, p.n_exits
    # a head priced inf is one no allowed path evaluates (a class bans its block everywhere): no credit, no inf - inf
    credit = np.zeros((D, E)) if head_price is None else \
        np.where(np.isfinite(head_price), np.minimum(0.0, p.head_ms - head_price[None, :]), 0.0)
    block = p.block_ms.copy()
    np.add.at(block, (slice(None), p.exit_after), credit)          # heads after block a are passed on a's device
    c = np.concatenate([np.zeros((D, 1)), np.cumsum(block, axis=1)], axis=1)
    ms = c[:, None, 1:] - c[:, :-1, None]                                   # [D, s, e] blocks s..e on d
    cp = np.concatenate([np.zeros((D, 1)), np.cumsum(p.block_param, axis=1)], axis=1)
    act = np.full((D, B, B), np.inf)
    for s in range(B):
        act[:, s, s:] = np.maximum.accumulate(p.block_act[:, s:], axis=1)
    fits = (cp[:, None, 1:] - cp[:, :-1, None]) + act <= p.capacity_bytes[:, None, None]
    if allowed is not None:                   # a range runs on d only if each of its blocks may
        banned = np.concatenate([np.zeros((D, 1)), np.cumsum(~allowed, axis=1)], axis=1)
        fits &= (banned[:, None, 1:] - banned[:, :-1, None]) == 0
    ms = np.where(fits & np.triu(np.ones((B, B), dtype=bool))[None], ms, np.inf)
    moves = ~np.eye(D, dtype=bool) if p.free_order else np.triu(np.ones((D, D), dtype=bool), k=1)  # [prev, d]
    enter = np.full((D, B), np.inf)           # enter[d, s]: cheapest arrival on d to run block s
    enter[:, 0] = p.cut_ms[p.source, :, 0]
    done = np.full((D, B), np.inf)            # done[d, e]: blocks 0..e run, the last stage on d ends at e
    for e in range(B):
        done[:, e] = (enter[:, :e + 1] + ms[:, :e + 1, e]).min(axis=1)
        if e + 1 < B:
            via = done[:, e][:, None] + p.cut_ms[:, :, e + 1]
            enter[:, e + 1] = np.where(moves, via, np.inf).min(axis=0)
    leave = []
    for j, a in enumerate(p.exit_after):
        not_before = (p.exit_after == a) & (np.arange(E) >= j)   # heads on block a from j on: not passed yet
        leave.append((done[:, a] - credit[:, not_before].sum(axis=1) + p.head_ms[:, j] + p.return_ms).min())
    return np.array(leave + [(done[:, -1] + p.return_ms).min()])


def free_choice_ms(need_right: int, base: np.ndarray, right: np.ndarray) -> float:
    """Total latency when every sample picks its own option freely and at least ``need_right`` are right.

    ``base[i]``: sample i's cheapest option, ``right[i]``: its cheapest correct one (inf: none). Solved
    exactly: everyone takes the cheapest option, then the cheapest upgrades to a correct one. inf when
    too few samples can be right.
    """
    return float(nested_free_choice_ms(np.array([need_right]), base, right, np.zeros(len(base), dtype=int),
                                       np.array([1]))[0])


def nested_free_choice_ms(need_right: np.ndarray, base: np.ndarray, right: np.ndarray, key: np.ndarray,
                          cuts: np.ndarray) -> np.ndarray:
    """:func:`free_choice_ms` of each nested set of samples {i: key[i] < cuts[c]} with ``need_right[c]``, in
    one pass (the children of a branch-and-bound node: their survivor sets are nested by the level chosen)."""
    from distree.solver.kernels import nested_free_choice, upgrade_order   # numba: not for evaluating plans (sim)

    n = len(base)
    after, after_right = np.asarray(base, dtype=float)[:, None], np.asarray(right, dtype=float)[:, None]
    return nested_free_choice(np.packbits(np.ones(n, dtype=bool)), np.asarray(key, dtype=np.int64),
                              np.asarray(cuts, dtype=np.int64), np.asarray(need_right, dtype=float), after,
                              after_right, 0, upgrade_order(after, after_right)[0])


def option_tables(p: Problem, leave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, E + 2] cheapest (and cheapest correct) option among exits >= j, for each j (last column: none)."""
    N = p.n_samples
    option_ok = np.concatenate([p.passed_level > 0, np.ones((N, 1), dtype=bool)], axis=1)
    correct = np.concatenate([p.correct_exit, p.correct_final[:, None]], axis=1)
    cost = np.where(option_ok, leave[None, :], np.inf)
    right = np.where(correct, cost, np.inf)
    after = np.minimum.accumulate(cost[:, ::-1], axis=1)[:, ::-1]
    after_right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    pad = np.full((N, 1), np.inf)
    return np.concatenate([after, pad], axis=1), np.concatenate([after_right, pad], axis=1)


def relaxed_lower_bound(p: Problem) -> float:
    """A valid lower bound on the expected latency of ANY feasible plan, in O(N E L + B D^2).

    Every plan either enables no exit or has a first enabled exit j1 at some level l1; we enumerate those.
    With (j1, l1) fixed, the samples passing it leave there exactly (nothing earlier is on). The others are
    relaxed: each may leave at any later exit it passes at some level (or at the end), independently of
    the others, paying head j1 and the head it leaves at; memory is free; every path over the devices is
    the cheapest one for its prefix (:func:`cheapest_leave_ms`). Only the accuracy count is kept, and that
    relaxed problem is solved exactly (:func:`free_choice_ms`). The branch and bound
    (:mod:`distree.solver.bnb`) extends this to any decided prefix of exits.
    """
    E, N = p.n_exits, p.n_samples
    leave = cheapest_leave_ms(p)
    after, after_right = option_tables(p, leave)
    head_min = p.head_ms.min(axis=0) if E else np.zeros(0)
    best = free_choice_ms(p.required_correct, after[:, E], after_right[:, E]) / N      # no exit enabled
    for j in range(E):
        for level in range(1, p.n_levels[j] + 1):
            leaves = p.passed_level[:, j] >= level
            rest = ~leaves
            fixed = leave[j] * leaves.sum() + head_min[j] * rest.sum()
            free = free_choice_ms(p.required_correct - int(p.correct_exit[leaves, j].sum()),
                                  after[rest, j + 1], after_right[rest, j + 1])
            best = min(best, (fixed + free) / N)
    return float(best)
