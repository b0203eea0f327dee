"""Good feasible plans fast: a warm start and an upper bound for the MILP, and baselines to report.

``local_search`` alternates (a) the exact best placement of the current exit configuration (dynamic
programme) with (b) the best change of the levels of one exit, or of two neighbouring exits when no single
change helps, under that placement (scored exactly for all combinations at once);
``iterated_local_search`` kicks the result out of its local optimum and descends again. ``no_exit_plan``
is the best plan with every exit off. ``portend_plan`` is PORTEND's search space (one global threshold
level, exits only at stage ends) solved by enumeration.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from distree.interrupt import requested
from distree.solver.costs import best_placement, evaluate, forwarded, reach_blocks, relay_fits
from distree.solver.problem import Problem

DEADLINE_WEIGHTS = (0.0, 0.01, 0.1, 1.0, 10.0, 1000.0)
WIDTHS = (1, 2)     # exits changed together by one local-search move: singles first, pairs when stuck
MOVES_MAX_CELLS = 5_000_000     # (candidate, device, exit) cells the memory check of all windows at once may hold


@dataclass(frozen=True)
class Candidate:
    levels: np.ndarray
    placement: np.ndarray
    expected_ms: float
    feasible: bool


def _orders(p: Problem) -> list[tuple[int, ...] | None]:
    if not p.free_order:
        return [None]
    if p.n_devices <= 4:
        return list(itertools.permutations(range(p.n_devices)))
    speed = np.argsort(p.block_ms.sum(axis=1))
    return [tuple(range(p.n_devices)), tuple(reversed(range(p.n_devices))), tuple(int(d) for d in speed),
            tuple(int(d) for d in speed[::-1])]


def place(p: Problem, levels: np.ndarray) -> Candidate | None:
    """Best placement found for a configuration: exact without a deadline, Lagrangian sweep with one."""
    best = None
    for order in _orders(p):
        for lam in DEADLINE_WEIGHTS if p.deadline_ms is not None else (0.0,):
            found = best_placement(p, levels, deadline_weight=lam, order=order)
            if found is None:
                break
            ev = evaluate(p, levels, found[0])
            if "deadline" in ev.violations:
                continue
            cand = Candidate(np.asarray(levels), found[0], ev.expected_ms, ev.feasible)
            if best is None or _key(cand) < _key(best):
                best = cand
            break
    return best


def _key(c: Candidate) -> tuple[bool, float]:
    return (not c.feasible, c.expected_ms)


class _MoveScorer:
    """Scores every level combination of a window of consecutive exits for a FIXED placement.

    Sample i currently leaves at ``first[i]`` (E = final). Changing the levels of exits a..a+w-1 moves only
    samples that reach a: to the first window exit they pass, else to the first enabled exit after the
    window they pass (or the end), which the window does not change. One pass scores all combinations.
    """

    def __init__(self, p: Problem, levels: np.ndarray, placement: np.ndarray):
        self.p, self.levels, self.pl = p, levels, placement
        B, E = p.n_blocks, p.n_exits
        blocks = p.block_ms[placement, np.arange(B)]
        cuts = np.empty(B)
        cuts[0] = p.cut_ms[p.source, placement[0], 0]
        cuts[1:] = p.cut_ms[placement[:-1], placement[1:], np.arange(1, B)]
        self.blocks = blocks
        prefix = np.cumsum(blocks + cuts)
        self.head_dev = placement[p.exit_after]
        self.hm = p.head_ms[self.head_dev, np.arange(E)]
        self.base = np.append(prefix[p.exit_after] + p.return_ms[self.head_dev],
                              prefix[-1] + p.return_ms[placement[-1]])
        self.fixed_worst = blocks.sum() + cuts.sum() + p.return_ms[placement[-1]]
        self.passes = (p.passed_level >= levels[None, :]) & (levels[None, :] > 0)
        # next[i, k]: the first enabled exit >= k that sample i passes (E: none), for every k at once
        col = np.where(self.passes, np.arange(E)[None, :], E)
        self.next = np.concatenate([np.minimum.accumulate(col[:, ::-1], axis=1)[:, ::-1],
                                    np.full((p.n_samples, 1), E)], axis=1)
        self.first = self.next[:, 0]
        self.corr = np.concatenate([p.correct_exit, p.correct_final[:, None]], axis=1).astype(int)
        self.on_device = [placement == d for d in range(p.n_devices)]
        # each used device's first and last block: its stage receives at one and hands on after the other
        self.stage_ends = {d: tuple(np.flatnonzero(on)[[0, -1]]) for d, on in enumerate(self.on_device) if on.any()}
        self.used = np.array([m.any() for m in self.on_device])
        # memory of a candidate = the blocks' (fixed) + the enabled heads' on each device: precomputed parts
        used = np.nonzero(self.used)[0]
        self.used_idx = used
        self.block_param = np.array([p.block_param[d, self.on_device[d]].sum() for d in used])
        self.block_act = np.array([p.block_act[d, self.on_device[d]].max() for d in used])
        self.head_on = self.head_dev[None, :] == used[:, None]                          # [U, E]
        self.head_param = p.head_param[self.head_dev, np.arange(E)]
        self.head_act = p.head_act[self.head_dev, np.arange(E)]

    def window(self, a: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Every level combination of exits a..a+width-1, the others as they are.

        Returns the combinations [V, w] and their penalised expected latency [V] (inf where a constraint
        other than accuracy breaks; a missing correct answer costs 1e6 ms / N). The samples that reach exit a
        are grouped by their passed levels at the window exits (a cell), so the work per window is
        O(samples + combinations x cells) rather than O(samples x combinations): measured 2x faster descents
        on the ResNet-110-scale case.
        """
        p, E, N = self.p, self.p.n_exits, self.p.n_samples
        w = min(width, E - a)
        radix = p.n_levels[a:a + w] + 1
        combos = np.array(list(itertools.product(*(range(r) for r in radix))), dtype=int)     # [V, w]
        V = len(combos)
        on = combos > 0
        reach = np.nonzero(self.first >= a)[0]
        after = self.next[reach, a + w]                                         # exit taken past the window
        cell = np.ravel_multi_index(tuple(p.passed_level[reach, a:a + w].T), tuple(radix))   # [R]
        C = len(combos)                                        # cells and combinations share one radix
        # slot taken in the window by every (combination, cell): the first window exit passed, else w
        passed = (combos[None, :, :] >= combos[:, None, :]) & on[:, None, :]     # [V, C, w] cell q >= level
        slot = np.where(passed.any(axis=2), passed.argmax(axis=2), w)           # [V, C]
        count = np.bincount(cell, minlength=C).astype(float)
        en_cur = self.levels > 0
        heads_now = self.hm * en_cur
        heads_now[a:a + w] = 0.0                               # window heads: per combination, below
        cum = np.cumsum(heads_now)
        pre = cum[a - 1] if a > 0 else 0.0                     # enabled heads before the window
        win_head = self.hm[a:a + w]
        # per (cell, slot): latency without the window heads a sample passes, and correct answers
        ms = np.empty((C, w + 1))
        right = np.empty((C, w + 1))
        for t in range(w):
            ms[:, t] = count * (self.base[a + t] + pre + win_head[t])
            right[:, t] = np.bincount(cell, weights=self.corr[reach, a + t], minlength=C)
        beyond = self.base[after] + np.append(cum, cum[-1])[after]
        ms[:, w] = np.bincount(cell, weights=beyond, minlength=C)
        right[:, w] = np.bincount(cell, weights=self.corr[reach, after], minlength=C)
        # window heads passed on the way to each slot (slot w: all enabled window heads)
        passed_heads = np.concatenate([np.zeros((V, 1)), np.cumsum(on * win_head, axis=1)], axis=1)   # [V, w+1]
        cols = np.arange(C)[None, :]
        gone = self.first[self.first < a]                      # samples leaving before the window: unchanged
        fixed_ms = (self.base[gone] + cum[gone]).sum()
        cost = (fixed_ms + ms[cols, slot].sum(axis=1)
                + (count[None, :] * np.take_along_axis(passed_heads, slot, axis=1)).sum(axis=1)) / N
        correct = self.corr[self.first < a, gone].sum() + right[cols, slot].sum(axis=1)
        en = np.repeat(en_cur[None, :], V, axis=0)
        en[:, a:a + w] = on
        out = cost + 1e6 * np.maximum(0, p.required_correct - correct) / N
        out[~self._fits(en, lambda: self._rates(a, w, slot, cell, count, after, gone))] = np.inf
        return combos, out

    def moves(self, width: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Every level combination of every window of ``width`` consecutive exits at once: combinations [V, w]
        (levels 0..L on each window exit, L the most levels of any exit) and their penalised expected latency
        [E - w + 1, V] by window start (inf where a level does not exist or a constraint other than accuracy
        breaks): what :meth:`window` gives one window at a time, from one pass over the (sample, window) pairs
        (measured: a descent on the ResNet-110-scale case 1.9 -> 0.65 s). None under a throughput bound (it needs
        each window's exit rates) or where the constraint check of every candidate at once, or its table of slots,
        would pass MOVES_MAX_CELLS: :meth:`window` then."""
        p, E, N, w = self.p, self.p.n_exits, self.p.n_samples, width
        if p.busy_cap_ms is not None or E < w:
            return None
        Lv = int(p.n_levels.max()) + 1
        A = E - w + 1
        if A * Lv ** w * len(self.used_idx) * E > MOVES_MAX_CELLS or Lv ** (2 * w) * (w + 1) > MOVES_MAX_CELLS:
            return None             # the second: its (combination, cell, slot) table; 64 levels, pairs: 54 M cells
        combos = np.array(list(itertools.product(range(Lv), repeat=w)), dtype=int)       # [V, w]; cells alike
        V = len(combos)
        on = combos > 0
        passed = (combos[None, :, :] >= combos[:, None, :]) & on[:, None, :]              # [V, C, w]
        slot = np.where(passed.any(axis=2), passed.argmax(axis=2), w)                       # [V, C]
        in_slot = (slot[:, :, None] == np.arange(w + 1)).astype(float)                      # [V, C, w + 1]
        en = self.levels > 0
        enabled_heads = np.cumsum(self.hm * en)
        done_ms = self.base + np.append(enabled_heads, enabled_heads[-1])    # [E + 1] leaving there, as it is
        # samples that leave before the window are not moved by it: prefix sums over where they leave
        first_ms = np.bincount(self.first, weights=done_ms[self.first], minlength=E + 1)
        first_right = np.bincount(self.first, weights=self.corr[np.arange(N), self.first], minlength=E + 1)
        fixed_ms = np.concatenate([[0.0], np.cumsum(first_ms)])[:A]
        fixed_right = np.concatenate([[0.0], np.cumsum(first_right)])[:A]
        # every (sample, window) the sample reaches, by its cell (the levels it passes at the window's exits)
        i, a = np.nonzero(self.first[:, None] >= np.arange(A)[None, :])
        key = a * V + np.ravel_multi_index(tuple(p.passed_level[i, a + t] for t in range(w)), (Lv,) * w)
        by_cell = lambda weights: np.bincount(key, weights, minlength=A * V).reshape(A, V)  # noqa: E731
        count = by_cell(None).astype(float)
        beyond = self.next[i, a + w]                        # the exit taken past the window (E: the end)
        right = np.stack([by_cell(self.corr[i, a + t]) for t in range(w)] + [by_cell(self.corr[i, beyond])])
        slot_right = np.einsum("sac,vcs->av", right, in_slot)
        slot_count = np.einsum("ac,vcs->avs", count, in_slot)                               # [A, V, w + 1]
        # heads of the window exits: as they are today inside done_ms, as the combination sets them here
        win = np.arange(w)[None, :] + np.arange(A)[:, None]                                 # [A, w]
        own = np.cumsum((self.hm * en)[win], axis=1)                                        # [A, w]
        new = np.cumsum(on[None, :, :] * self.hm[win][:, None, :], axis=2)                  # [A, V, w]
        leave_ms = done_ms[win][:, None, :] - own[:, None, :] + new                         # [A, V, w]
        cost = (fixed_ms[:, None] + (slot_count[:, :, :w] * leave_ms).sum(axis=2)
                + by_cell(done_ms[beyond]) @ in_slot[:, :, w].T
                + slot_count[:, :, w] * (new[:, :, -1] - own[:, None, -1])) / N
        correct = fixed_right[:, None] + slot_right
        out = cost + 1e6 * np.maximum(0, p.required_correct - np.round(correct)) / N
        out[(combos[None, :, :] > p.n_levels[win][:, None, :]).any(axis=2)] = np.inf
        en_all = np.repeat(en[None, None, :], A * V, axis=0).reshape(A, V, E)
        for t in range(w):
            en_all[np.arange(A), :, np.arange(A) + t] = on[None, :, t]
        out[~self._fits(en_all.reshape(A * V, E), None).reshape(A, V)] = np.inf
        return combos, out

    def _rates(self, a: int, w: int, slot: np.ndarray, cell: np.ndarray, count: np.ndarray, after: np.ndarray,
               gone: np.ndarray) -> np.ndarray:
        """[V, E + 1] exit rates of every combination of a window (only the throughput check needs them)."""
        E, N, C = self.p.n_exits, self.p.n_samples, len(count)
        counts = np.repeat(np.bincount(gone, minlength=E + 1)[None, :].astype(float), len(slot), axis=0)
        for t in range(w):
            counts[:, a + t] += ((slot == t) * count[None, :]).sum(axis=1)
        after_hist = np.zeros((C, E + 1))
        np.add.at(after_hist, (cell, after), 1.0)
        counts += (slot == w).astype(float) @ after_hist
        return counts / N

    def _fits(self, en: np.ndarray, rates) -> np.ndarray:
        """[V] which candidates (enabled exits ``en`` [V, E]; ``rates()`` their exit rates [V, E + 1], computed
        only for the throughput check) meet the deadline, memory and throughput."""
        p = self.p
        on = en[:, None, :] & self.head_on[None]                                        # [V, U, E]
        act = np.maximum(self.block_act[None], np.where(on, self.head_act, 0.0).max(axis=2))
        memory = self.block_param[None] + (on * self.head_param).sum(axis=2) + act
        ok = np.all(memory <= p.capacity_bytes[self.used_idx][None], axis=1)
        if p.deadline_ms is not None:
            ok &= self.fixed_worst + (self.hm * en).sum(axis=1) <= p.deadline_ms + 1e-9
        if p.busy_cap_ms is not None:
            if p.source not in self.used_idx and not relay_fits(p):
                return np.zeros(len(en), dtype=bool)
            rates = rates()
            for v in np.nonzero(ok)[0]:
                reach_b = reach_blocks(p, rates[v, :-1])
                reach_x = 1.0 - (np.cumsum(rates[v, :-1]) - rates[v, :-1])
                reach_next = forwarded(reach_b)
                for u, d in enumerate(self.used_idx):
                    on_b = self.on_device[d]
                    first, last = self.stage_ends[d]
                    busy = (self.blocks[on_b] @ reach_b[on_b] + self.hm[on[v, u]] @ reach_x[on[v, u]]
                            + p.handling[d] @ (reach_b[first], reach_next[last]))
                    ok[v] &= busy <= p.busy_cap_ms + 1e-9
        return ok


def _penalised(p: Problem, levels: np.ndarray, placement: np.ndarray) -> float:
    ev = evaluate(p, levels, placement)
    if set(ev.violations) - {"accuracy"}:
        return np.inf
    return ev.expected_ms + 1e6 * max(0, p.required_correct - ev.correct) / p.n_samples


def default_starts(p: Problem) -> list[np.ndarray]:
    """All exits off, and every exit at one common level (a cheap spread of starting points)."""
    top = int(p.n_levels.max()) if p.n_exits else 0
    return [np.minimum(g, p.n_levels) for g in range(top + 1)]


def _best_window_move(p: Problem, scorer: _MoveScorer, levels: np.ndarray, width: int,
                      to_beat: float, stop_at: float = np.inf) -> tuple[tuple[int, np.ndarray] | None, float]:
    """The best level change of ``width`` consecutive exits scoring below ``to_beat`` (None: there is none); past
    ``stop_at`` (or on Ctrl-C), the best among the windows scored so far: with many levels one round of windows
    can take many seconds (64 levels: 4,225 combinations a window, ~45 s for a descent on the ResNet-110 scale)."""
    best, best_score = None, to_beat
    every = scorer.moves(width)
    for a in range(p.n_exits - width + 1):
        if every is None and (time.perf_counter() > stop_at or requested()):
            break
        combos, scores = (every[0], every[1][a].copy()) if every is not None else scorer.window(a, width)
        scores[(combos == levels[a:a + width]).all(axis=1)] = np.inf
        v = int(np.argmin(scores))
        if scores[v] < best_score - 1e-12:
            best, best_score = (a, combos[v]), scores[v]
    return best, best_score


def local_search(p: Problem, max_rounds: int = 200, time_limit_s: float = np.inf,
                 starts: list[np.ndarray] | None = None, widths: tuple[int, ...] = WIDTHS) -> Candidate | None:
    """Best level change of a window of consecutive exits under the current placement, then re-place
    exactly; repeat. Windows of ``widths[0]`` exits first, wider ones only when no narrower move helps.

    Starts from the best of ``starts`` (default: all exits off, and every exit at one common level).
    """
    stop_at = time.perf_counter() + time_limit_s
    cur, cur_score = None, np.inf
    for levels in default_starts(p) if starts is None else starts:
        c = place(p, levels)
        if c is not None and _penalised(p, c.levels, c.placement) < cur_score:
            cur, cur_score = c, _penalised(p, c.levels, c.placement)
    if cur is None:
        return None
    for _ in range(max_rounds):
        if time.perf_counter() > stop_at or requested():
            break
        scorer = _MoveScorer(p, cur.levels, cur.placement)
        for width in widths:
            move, _ = _best_window_move(p, scorer, cur.levels, width, cur_score, stop_at)
            if move is not None:
                break
        if move is None:
            break
        trial = cur.levels.copy()
        trial[move[0]:move[0] + len(move[1])] = move[1]
        moved = place(p, trial)
        if moved is None:
            break
        cur, cur_score = moved, _penalised(p, moved.levels, moved.placement)
    return cur if cur.feasible else None


def iterated_local_search(p: Problem, start: Candidate, time_limit_s: float, stall_rounds: int = 100,
                          seed: int = 0) -> Candidate:
    """Kick the best plan (re-draw the levels of 2-5 random exits), descend again, keep it if better.

    Single-exit moves get stuck where two exits must change together (one taking over the samples of
    another); a kick escapes that. Measured on the example's 22 trained exits: 1.456 -> 1.401 ms in 11 s.
    Stops after ``time_limit_s`` or ``stall_rounds`` kicks in a row without a gain; seeded, so repeatable.
    """
    stop_at = time.perf_counter() + time_limit_s
    rng = np.random.default_rng(seed)
    best, stall = start, 0
    while p.n_exits and stall < stall_rounds and time.perf_counter() < stop_at and not requested():
        levels = best.levels.copy()
        kicked = rng.choice(p.n_exits, size=min(p.n_exits, int(rng.integers(2, 6))), replace=False)
        levels[kicked] = rng.integers(0, p.n_levels[kicked] + 1)
        found = local_search(p, time_limit_s=stop_at - time.perf_counter(), starts=[levels])
        if found is not None and found.expected_ms < best.expected_ms - 1e-12:
            best, stall = found, 0
        else:
            stall += 1
    return best


def no_exit_plan(p: Problem) -> Candidate | None:
    """Best plan with all exits off (placement by the exact DP; Lagrangian with a deadline)."""
    cand = place(p, np.zeros(p.n_exits, dtype=int))
    return cand if cand is not None and cand.feasible else None


def portend_plan(p: Problem, placements: np.ndarray) -> Candidate | None:
    """PORTEND's space: one global level for all enabled exits, exits only where a stage ends."""
    best = None
    top = int(p.n_levels.max()) if p.n_exits else 0
    for pl in placements:
        ends = set(np.nonzero(np.diff(pl))[0].tolist())
        at_end = np.array([a in ends for a in p.exit_after], dtype=bool)
        for g in range(top + 1):
            levels = np.where(at_end, np.minimum(g, p.n_levels), 0)
            ev = evaluate(p, levels, pl)
            if ev.feasible and (best is None or ev.expected_ms < best.expected_ms):
                best = Candidate(levels, pl, ev.expected_ms, True)
            if not at_end.any():
                break
    return best
