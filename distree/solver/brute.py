"""Exact reference for small instances: every configuration times every placement.

Deliberately shares nothing with the MILP but the :class:`Problem` numbers: it enumerates all level
vectors and all placements (contiguous ranges, ordered devices unless ``free_order``) and scores them in
bulk with numpy. Exponential: meant for tests (<= ~12 blocks, 5 exits, 4 levels, 3 devices).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from distree.solver.problem import Problem

MAX_COMBINATIONS = 5_000_000


@dataclass(frozen=True)
class BruteResult:
    levels: np.ndarray | None
    placement: np.ndarray | None
    expected_ms: float            # inf when infeasible


def all_placements(n_blocks: int, n_devices: int, free_order: bool) -> np.ndarray:
    rows = []
    for k in range(1, min(n_blocks, n_devices) + 1):
        seqs = (itertools.permutations(range(n_devices), k) if free_order
                else itertools.combinations(range(n_devices), k))
        cuts_list = list(itertools.combinations(range(1, n_blocks), k - 1))
        for seq in seqs:
            for cuts in cuts_list:
                bounds = (0, *cuts, n_blocks)
                row = np.empty(n_blocks, dtype=int)
                for d, a, b in zip(seq, bounds, bounds[1:]):
                    row[a:b] = d
                rows.append(row)
    return np.array(rows)


def all_configurations(n_levels: np.ndarray) -> np.ndarray:
    rows = list(itertools.product(*[range(n + 1) for n in n_levels]))
    return np.array(rows, dtype=int).reshape(len(rows), len(n_levels))


def brute_force(p: Problem) -> BruteResult:
    P = all_placements(p.n_blocks, p.n_devices, p.free_order)
    C = all_configurations(p.n_levels)
    if len(P) * len(C) > MAX_COMBINATIONS:
        raise ValueError(f"{len(P)} placements x {len(C)} configurations is too many for brute force")
    B, E, D = p.n_blocks, p.n_exits, p.n_devices
    blocks = np.arange(B)
    # per-placement coefficient tables
    MS = p.block_ms[P, blocks]                                          # [P, B]
    CUT = np.empty_like(MS)
    CUT[:, 0] = p.cut_ms[p.source, P[:, 0], 0]
    CUT[:, 1:] = p.cut_ms[P[:, :-1], P[:, 1:], blocks[1:]]
    HD = P[:, p.exit_after]                                             # [P, E] device of each head
    HM = p.head_ms[HD, np.arange(E)]                                    # [P, E]
    RET_E = p.return_ms[HD]
    RET_F = p.return_ms[P[:, -1]]
    # per-configuration outcomes
    en = C > 0                                                          # [C, E]
    passes = (p.passed_level[None] >= C[:, None, :]) & en[:, None, :]    # [C, N, E]
    any_pass = passes.any(axis=2)
    first = np.where(any_pass, passes.argmax(axis=2), E) if E else np.zeros(any_pass.shape, int)   # [C, N]
    N = p.n_samples
    rate = np.stack([(first == j).mean(axis=1) for j in range(E)], axis=1) if E else np.zeros((len(C), 0))
    final_rate = (first == E).mean(axis=1)
    corr_table = np.concatenate([p.correct_exit, p.correct_final[:, None]], axis=1)   # [N, E+1]
    correct = corr_table[np.arange(N)[None, :], first].sum(axis=1)
    left_before = np.zeros((len(C), B + 1))
    for j in range(E):
        left_before[:, p.exit_after[j] + 1] += rate[:, j]
    reach = 1.0 - np.cumsum(left_before, axis=1)[:, :B]                 # [C, B]
    reach_next = np.concatenate([reach[:, 1:], np.zeros((len(C), 1))], axis=1)   # handed on after each block
    reach_exit = 1.0 - (np.cumsum(rate, axis=1) - rate)                 # [C, E]
    head_w = reach_exit * en
    expected = (reach @ (MS + CUT).T + head_w @ HM.T + rate @ RET_E.T
                + final_rate[:, None] * RET_F[None, :])                 # [C, P]
    feasible = (correct >= p.required_correct)[:, None] & np.ones(len(P), dtype=bool)[None, :]
    if p.deadline_ms is not None:
        worst = (MS.sum(1) + CUT.sum(1) + RET_F)[None, :] + en.astype(float) @ HM.T
        feasible &= worst <= p.deadline_ms + 1e-9
    for d in range(D):
        on_b = P == d                                                   # [P, B]
        used = on_b.any(axis=1)
        on_h = (HD == d)                                                # [P, E]
        param = (p.block_param[d][None, :] * on_b).sum(1)[None, :] + en.astype(float) @ (
            p.head_param[d][None, :] * on_h).T
        act_b = np.where(on_b, p.block_act[d][None, :], 0.0).max(axis=1)            # [P]
        act_h = np.where(on_h[None] & en[:, None, :], p.head_act[d][None, None, :], 0.0).max(
            axis=2, initial=0.0)                                                      # [C, P]
        need = param + np.maximum(act_b[None, :], act_h)
        feasible &= ~used[None, :] | (need <= p.capacity_bytes[d])
        if p.busy_cap_ms is not None:
            first, last = on_b.argmax(axis=1), B - 1 - on_b[:, ::-1].argmax(axis=1)             # [P]
            busy = (reach @ (MS * on_b).T + head_w @ (HM * on_h).T
                    + p.handling[d, 0] * reach[:, first] + p.handling[d, 1] * reach_next[:, last])
            feasible &= ~used[None, :] | (busy <= p.busy_cap_ms + 1e-9)
    if p.busy_cap_ms is not None:       # a source without a stage relays every request
        relays = ~(P == p.source).any(axis=1)
        feasible &= ~relays[None, :] | (p.handling[p.source].sum() <= p.busy_cap_ms + 1e-9)
    masked = np.where(feasible, expected, np.inf)
    c, k = np.unravel_index(np.argmin(masked), masked.shape)
    if not np.isfinite(masked[c, k]):
        return BruteResult(None, None, float("inf"))
    return BruteResult(C[c], P[k], float(masked[c, k]))
