"""Exact branch and bound over exit levels in chain order, with a proven bound when stopped early.

A node fixes the levels of exits 0..j-1. Its survivors (samples no enabled prefix exit takes) and every
decided sample's exit and correctness are then exact. Its bound: decided samples pay the cheapest-path
cost of their exit (:func:`~distree.solver.costs.cheapest_leave_ms`) plus every enabled head before it;
survivors pay the enabled prefix heads plus the best *free* choice among later exits they can pass at
some level (or the end), with the accuracy count kept (:func:`~distree.solver.costs.free_choice_ms`); or,
when larger, the window bound (:mod:`distree.solver.bounds`: thresholds stay shared at each survivor's first
chance and heads it surely evaluates are paid; accuracy by the root's best Lagrange multiplier), which lifted
the proven bound on the ResNet-110-scale case from 9.53 to 10.28 ms in 10 s; or the root's widest window
carried along the node's levels and made exact for the samples they decide
(:class:`~distree.solver.bounds.PrefixBound`), which took the 200-block case from a 1.95% to a 0.56% proven gap
in 60 s.
Memory and the shared placement are relaxed, so the bound is valid for every completion. A node is cut
when it cannot reach the required correct count, or when the cheapest no-exit path plus its enabled heads
already misses the deadline. Children of a node are exit j at level 0 and
at each level whose set of leaving survivors differs (levels leaving the same survivors give the same
outcome). A leaf is a full configuration: its exact best placement (dynamic programme) prices it.

Search is depth first, children cheapest bound first, so good plans come early; or best first (always the
open node of smallest bound), which raises the proven bound fastest once a good plan is known. When the time
runs out, the proven bound is the smallest bound of any node or leaf still open, and a :class:`Tree` can be run
again from there (the solve's tree goes on after improving its plan). Survivor sets are stored as packed bits
(best first keeps many nodes open).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import numpy as np

from distree.interrupt import requested
from distree.solver.bounds import (BoundTables, PrefixBound, WideChildren, bound_tables, first_chances,
                                   window_prefix_bound)
from distree.solver.chain import ChainTables, chain_bound, chain_bounds_by_level, chain_tables
from distree.solver.classes import PlacementClasses, StageClass
from distree.solver.costs import best_placement, relaxed_lower_bound
from distree.solver.heuristic import Candidate, local_search, place
from distree.solver.kernels import (children_bounds, dominating_row, gone_by, narrow_levels, narrowed_window,
                                    nested_bounds, nested_survivors, passing_sets, reachable_right, recovery_search,
                                    right_exits, survivor_sum, upgrade_order)
from distree.solver.problem import Constraints, Problem, build_problem

if TYPE_CHECKING:
    from distree.solver.parallel import Share

OPTIMALITY_TOLERANCE = 1e-9     # relative: bound and incumbent this close -> proven optimal
# best first keeps open nodes up to MAX_OPEN_BYTES; past it only the best OPEN_NODES_KEPT share stays, and the
# smallest bound dropped caps the proven one. A node is its survivors (N/8 bytes), its levels (8 bytes an exit) and
# ~NODE_BYTES of Python (tracemalloc: 940 B a node at 2,500 samples and 22 exits, 1,500 B at 5,000 and 54). At the
# former cap of 200,000 nodes the example's 22 trained exits stopped at a 0.96% gap after 200 s; with room for
# 700,000 they are proven optimal in 240 s (375 MB peak RSS)
MAX_OPEN_BYTES = 2 ** 30
NODE_BYTES = 500
OPEN_NODES_KEPT = 0.9
# the root's wide window (PrefixBound) costs ~20% of the nodes; it is dropped when, over the first PREFIX_TRIAL
# children, it beat the node's own bounds for fewer than PREFIX_MIN_SHARE of them. Measured (20 s trees): decisive
# for 99.5% of children on the ResNet-110 scale and 85% on 200 blocks (bound 10.38 -> 10.64, 32.22 -> 32.72 ms), for
# 0.7% on the example's 22 trained exits (0.926 without it, 0.920 with it)
PREFIX_TRIAL = 5_000
PREFIX_MIN_SHARE = 0.1
# a node the count of reachable right answers lets through with at most RECOVERY_SLACK to spare is searched
# (kernels.recovery_search, up to RECOVERY_BUDGET search nodes, "unknown" past it). Trained ResNet-110, 20 s of tree
# from one plan: of 22,372 nodes searched all but 4 could not reach their accuracy (0.14 ms median; bound 1.447 ->
# 1.471 ms); with 10 to spare, 10,665 short at 0.68 ms median and 1,336 unknown at ~1.8 ms, it ended lower (1.432)
RECOVERY_SLACK = 5
RECOVERY_BUDGET = 5_000
# a node the count lets through with at most NARROW_SLACK to spare (or below one that did) has its later exits'
# levels narrowed (kernels.narrow_levels), each level forced on tested with PROBE_BUDGET search nodes (0: the count
# alone). Same tree: bound 1.447 -> 1.549 ms with the count alone, 1.532 with 30 search nodes, 1.488 with 200. With
# more to spare no level was ruled out (5,706 nodes on the trained ResNet-110, 912 on the synthetic one, where they
# cost 1.6 s of a 10 s solve)
PROBE_BUDGET = 0
NARROW_SLACK = 60
# the chain bound (Tree(chain=True)), accuracy priced at this times the class's root multiplier (the best of 0.5 /
# 1 / 1.5 / 2 at the trained ResNet-110's lowest open nodes: docs/solver.md, thirty-seventh session)
CHAIN_MULTIPLIER = 1.0
# and looking this many exits past the node (chain_bound's ``horizon``). Trained ResNet-110 (docs/solver.md,
# thirty-ninth session): 0.81 ms a node against 1.12 looking at every later exit, 0.0003 ms of the bound lost on
# average (at most 0.003); one tree's bound after 20k / 30k nodes 1.6894 / 1.7196 against 1.6895 / 1.7186, the 30k
# in 22.0 s against 28.8; 24 / 16 / 12 exits lose 0.003 / 0.01 / 0.025 ms a tree and gain no more time
CHAIN_HORIZON = 32
PROGRESS_EVERY_S = 1.0          # best first: how often ``progress`` hears the plan and the proven bound
# best first: the multiplier pricing accuracy in the bounds (each class's best at the root) is retuned to the
# factor of it that bounds the RETUNE_NODES lowest open nodes highest, after RETUNE_AT expanded nodes and again
# each time the count has grown RETUNE_GROWTH-fold. Deep nodes have most of their accuracy decided and want less of
# it: on the trained ResNet-110 the lowest open nodes after 20 s bound highest at 0.5-0.75x (each factor is a valid
# Lagrangian bound), and a tree held at 0.6x ends 0.02 ms higher (10 s solve: 11.5% -> 10.0%, 60 s: 4.2% -> 3.2%)
MULTIPLIER_FACTORS = (0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
RETUNE_AT = 2_000
RETUNE_GROWTH = 4
RETUNE_NODES = 64
# a node popped at the same depth (and class) as one popped before that it cannot beat, a twin (_Search.twin_of),
# is dropped: on the trained ResNet-110 a third of the open nodes after 20 s had a twin with the same survivors, and
# dropping them took the 20 s tree (one process) from 1.589 to 1.597-1.600 ms, 10 s solves from 10.1-10.7% to
# 9.6-9.9%; twins with fewer survivors (thirty-ninth session) drop twice as many nodes (~20% of those popped) and
# lift that tree's bound ~0.02 ms at the same CPU time (30 s: 1.740-1.753 against 1.720-1.728). The nodes
# remembered for it take at most TWIN_BYTES a tree (all its placement classes; each forked worker its own); past
# that, no new node is remembered
TWIN_BYTES = 2 ** 28
# best first never reaches a leaf while its bound is far below the plan, so its plan is what the local search and
# the kicks found before it. Tree.dive *dives* first: prefixes of its lowest open nodes, each with every later exit
# off, start local searches (heuristic.local_search, which may change any exit), and a better plan found is the
# tree's; it stops after DIVE_PATIENCE dives in a row that found nothing better. On a trained ResNet-110 whose
# kicks stall at 2.076-2.127 ms (the Pi 4 running blocks 0-15), exit 0 alone on leads to 1.872 ms (blocks 0-9),
# 0.09 s a dive. Diving on as the tree goes (10% of its time, halved after every 4 fruitless dives) found nothing
# more on it nor on the synthetic cases, and cost the 200-block case's 60 s gap 0.04 points (0.44-0.45% -> 0.49%,
# interleaved runs): not kept
DIVE_PATIENCE = 8
DIVE_DESCENT_MIN_S = 1.0       # a dive's descent may finish past the dives' time, by this much at most: at 8 levels
#                                one takes ~0.07 s on the trained ResNet-110; at 64, ~45 s (4,225 combinations a window)
DIVES_LISTED = 256      # Tree.dive: the open nodes it may start from, lowest bound first

Progress = Callable[[Optional[Candidate], float], None]     # (best plan known, proven bound in ms)


@dataclass(frozen=True)
class BnbResult:
    best: Candidate | None      # the best feasible plan known (the incumbent passed in, or better)
    bound: float                # proven lower bound on the optimum (inf: no feasible plan exists)
    complete: bool              # every node was decided: best is optimal (or none exists)
    nodes: int
    wall_s: float
    wide_share: float = float("nan")   # share of the children judged for which the wide window (prefix) was the
    #                                    highest bound (nan: no wide window, or no child judged)
    dropped: int = 0                   # open nodes dropped at max_open_nodes (best first)
    classes: int = 0                   # placement classes searched (0: one tree over every placement)
    workers: int = 1                   # processes the last run was dealt to (distree.solver.parallel)
    short: int = 0                     # nodes dropped because their survivors cannot give the right answers needed
    twinned: int = 0                   # nodes dropped because a twin popped before is at least as good


class _Node(NamedTuple):                # a tuple: made ~500,000 times a minute (a frozen dataclass costs 4x)
    bound: float                # total latency (sum over samples, not yet divided by N)
    depth: int                  # exits 0..depth-1 decided
    levels: tuple[int, ...]
    packed: np.ndarray          # survivors [N] bool, as np.packbits
    fixed_ms: float             # decided samples' latency
    fixed_right: int            # decided samples answered right
    heads_ms: float             # enabled prefix heads, paid by every survivor
    wide_prefix: float          # the root's wide window along these levels (PrefixBound.children)
    wide_state: int
    wide_decided: float
    limits: Optional[np.ndarray] = None   # [2, E] int8: the levels (lo..hi) exit k may still take, or off, where an
    #                                       accuracy bound ruled out others (kernels.narrow_levels); shared with
    #                                       the children (read only); None: every level
    narrowed: bool = False      # its bound already counts its own narrowed levels (_Search.narrow)
    chained: bool = False       # its bound already counts the chain bound over the levels ``limits`` leaves it


@functools.lru_cache(maxsize=2)
def _columns(p: Problem) -> tuple[np.ndarray, ...]:
    """Per exit (or depth) the samples' levels passed, right answers and first chances, each a contiguous row for
    the kernels, an all-zero key (one set: everyone below cut 1), and per sample its levels passed and right
    answers at each exit and at the final classifier, the bit sets passing each level at each exit
    (:func:`~distree.solver.kernels.passing_sets`), and its right exits (:func:`~distree.solver.kernels.right_exits`),
    for :meth:`_Search.narrow`; one copy for all of a problem's searches (a search per placement class). Levels
    passed are int8 (right exits' indices int16 past 127): at int64 these tables were 2.2 and 3.6 MB at 5,000 x 54,
    and the kernels reading them slow down ~3x when their data is out of cache (``children_bounds`` 204 against 68
    us a node; 158 against 44 at int8)."""
    top = int(p.n_levels.max(initial=0))
    passed = p.passed_level.astype(np.min_scalar_type(-top - 1))
    return (np.ascontiguousarray(passed.T), np.ascontiguousarray(p.correct_exit.T.astype(float)),
            np.ascontiguousarray(first_chances(p).T), np.zeros(p.n_samples, dtype=np.int64),
            np.ascontiguousarray(passed), np.ascontiguousarray(p.correct_exit),
            np.ascontiguousarray(p.correct_final), passing_sets(passed, top),
            *right_exits(passed, p.correct_exit))


class _Search:
    def __init__(self, p: Problem, incumbent: Candidate | None, tables: BoundTables | None,
                 prefix: PrefixBound | None, stage_class: StageClass | None = None, tol: float = OPTIMALITY_TOLERANCE,
                 twin_room: _TwinRoom | None = None, chain: bool = False):
        self.p = p
        self.tol = tol                      # relative: a node must bound below the incumbent by this much to stay
        self.stage_class = stage_class      # the placements its tables price (None: all)
        self.prefix = prefix
        self.prefix_tried = self.prefix_decisive = 0
        self.tables = bound_tables(p) if tables is None else tables
        self.leave, self.after, self.after_right = self.tables.leave, self.tables.after, self.tables.after_right
        self.after_by_depth: dict[int, np.ndarray] = {}   # columns of ``after`` that :meth:`rebound` read, contiguous
        self.head_price = self.tables.head
        self.lam = self.tables.lam
        self.order = upgrade_order(self.after, self.after_right)      # [E + 2, N] for the free choice
        (self.passed_by_exit, self.correct_by_exit, self.chance_by_depth, self.no_key, self.passed_by_sample,
         self.correct_by_sample, self.final, self.passing, *self.right_exits) = _columns(p)
        self.max_level = int(p.n_levels.max(initial=0))
        self.exit_after = p.exit_after.astype(np.int64)
        self.all_levels = np.stack([np.ones(p.n_exits, dtype=np.int8), p.n_levels.astype(np.int8)])
        self.best = incumbent
        self.ceiling = np.inf               # a plan this good (a sum over samples) is known elsewhere: prune by it
        self.exact_leaves = p.deadline_ms is None and (not p.free_order or p.n_devices <= 4)
        # the chain bound (distree.solver.chain), within the class or over every placement: each stage a later device
        self.chain = chain_tables(p, stage_class) if chain and not p.free_order else None
        self.open_leaf_bound = np.inf                     # leaves priced only by a bound (deadline, many orders)
        self.popped: dict[int, _Popped] = {}               # depth -> nodes popped there (twin_of)
        self.twin_room = _TwinRoom(p) if twin_room is None else twin_room

    def incumbent_total(self) -> float:
        return min(np.inf if self.best is None else self.best.expected_ms * self.p.n_samples, self.ceiling)

    def cutoff(self) -> float:
        return self.incumbent_total() * (1 - self.tol)

    @property
    def twin_keys_left(self) -> int:
        return self.twin_room.keys_left

    def root(self) -> list[_Node]:
        """The root, or nothing when its bound already meets the incumbent (or is infinite)."""
        N = self.p.n_samples
        wide = WideChildren.none(1)
        if self.prefix is not None:
            wide.bound[0] = self.prefix.total
        return self._one(0, (), np.packbits(np.ones(N, dtype=bool)), 0.0, 0, 0.0, wide)

    def _one(self, depth, levels, packed, fixed_ms, fixed_right, heads_ms, wide: WideChildren | None,
             parent: _Node | None = None) -> list[_Node]:
        """One node (all of ``packed`` survives), bounded by this search's tables: the root, or a node met by
        another placement class (``parent``: the same node there)."""
        cuts, fixed_ms, fixed_right, heads_ms = np.array([1]), np.array([fixed_ms]), np.array([fixed_right]), \
            np.array([heads_ms])
        bound = self._bound(depth, packed, fixed_ms, fixed_right, heads_ms, self.lam)
        return self._make(depth, [levels], packed, None, cuts, fixed_ms, fixed_right, heads_ms, bound, wide,
                          parent)

    def _bound(self, depth, packed, fixed_ms, fixed_right, heads_ms, lam) -> np.ndarray:
        """The bound of one node (all of ``packed`` survives; the rest as 1-element arrays) at multiplier ``lam``."""
        p, t = self.p, self.tables
        return nested_bounds(packed, self.no_key, np.array([1]), fixed_ms, fixed_right, heads_ms, p.required_correct,
                             depth, lam, self.chance_by_depth[depth], self.order[depth], t.leave, t.head, t.after,
                             t.after_right, self.passed_by_sample, p.correct_exit, p.correct_final, p.n_levels)

    def bound_at(self, node: _Node, factor: float) -> float:
        """``node``'s bound (levels ruled out aside) with accuracy priced at ``factor`` times the root's best
        multiplier."""
        return float(self._bound(node.depth, node.packed, np.array([node.fixed_ms]), np.array([node.fixed_right]),
                                 np.array([node.heads_ms]), factor * self.tables.lam)[0])

    def _make(self, depth, levels, packed, passing, cuts, fixed_ms, fixed_right, heads_ms, bound,
              wide: WideChildren | None, parent: _Node | None = None) -> list[_Node]:
        """The nodes at ``depth`` whose survivors are those of ``packed`` passing below cuts[c] at the exit just
        decided (``passing``: its rows of :func:`~distree.solver.kernels.passing_sets`; None: one node, all of
        ``packed``), with their ``bound``
        (:mod:`~distree.solver.kernels`: the free choice and the width-1 window), or the root's wide window
        along their levels (``wide``, :class:`~distree.solver.bounds.PrefixBound`) when higher; only those that
        can still beat the incumbent. A ``parent``'s bound holds for each of them too (it bounds every completion
        of the parent), and they keep its narrowed levels."""
        p = self.p
        if self.prefix is not None and wide is not None:
            self.prefix_tried += len(bound)
            self.prefix_decisive += int((wide.bound > bound).sum())
            bound = np.maximum(bound, wide.bound)
            if self.prefix_tried >= PREFIX_TRIAL and self.prefix_decisive < PREFIX_MIN_SHARE * self.prefix_tried:
                self.prefix = None
        if parent is not None:
            bound = np.maximum(bound, parent.bound)
        if p.deadline_ms is not None:      # the no-exit path already misses the deadline with these heads
            bound[self.leave[-1] + heads_ms > p.deadline_ms + 1e-9] = np.inf
        keep = np.nonzero(bound < self.cutoff())[0]
        kept = (np.tile(packed, (len(keep), 1)) if passing is None else
                nested_survivors(packed, passing, cuts[keep]))
        n = len(keep)
        bounds, ms, right, heads = (a[keep].tolist() for a in (bound, fixed_ms, fixed_right, heads_ms))
        carried = ([0.0] * n, [0] * n, [0.0] * n) if wide is None else \
            (a[keep].tolist() for a in (wide.prefix, wide.state, wide.decided))
        limits = None if parent is None else parent.limits
        return [_Node(bounds[i], depth, levels[c], kept[i], ms[i], right[i], heads[i], *w, limits)
                for i, (c, *w) in enumerate(zip(keep.tolist(), *carried))]

    def rebound(self, node: _Node, incumbent: Candidate | None) -> list[_Node]:
        """``node`` (decided by a class containing this search's) bounded with this search's tables; nothing when
        that cannot beat ``incumbent``. Its decided samples and heads keep their prices: both classes price the
        blocks and heads the node decided on the same first-stage device. Most such nodes are dropped at once
        (a stage that ends before the node's next exit sends every survivor over a hop), so the survivors'
        cheapest options, accuracy aside, are tried first (a tenth of the full bound's time)."""
        self.best = incumbent
        if node.depth not in self.after_by_depth:
            self.after_by_depth[node.depth] = np.ascontiguousarray(self.after[:, node.depth])
        count, options = survivor_sum(node.packed, self.after_by_depth[node.depth])
        if node.fixed_ms + node.heads_ms * count + options >= self.cutoff():
            return []
        return self._one(node.depth, node.levels, node.packed, node.fixed_ms, node.fixed_right, node.heads_ms, None,
                         node)

    def children(self, node: _Node) -> list[_Node]:
        """Exit j off (every survivor stays), and on at each level whose set of leaving survivors differs
        (levels leaving the same survivors give the same outcome); a level l child keeps the survivors
        passing below l, so the children's survivor sets are nested by level."""
        p, t, j = self.p, self.tables, node.depth
        passed = self.passed_by_exit[j]
        levels, cuts, fixed_ms, fixed_right, heads_ms, bound = children_bounds(
            node.packed, j, passed, self.correct_by_exit[j], node.fixed_ms, node.fixed_right, node.heads_ms,
            p.required_correct, self.lam, self.chance_by_depth[j + 1], self.order[j + 1], t.leave, t.head, t.after,
            t.after_right, self.passed_by_sample, p.correct_exit, p.correct_final, p.n_levels)
        if self.prefix is not None:
            heads_before = np.concatenate([[0.0], np.cumsum(self.head_price[:j] * (np.array(node.levels) > 0))])
            wide = self.prefix.children(p, self.tables, j, node.wide_prefix, node.wide_state, node.wide_decided,
                                        heads_before, levels, cuts, node.packed, passed)
        else:
            wide = None
        if node.limits is not None:        # a child stands for its level up to the next child's: drop those whose
            lo, hi = node.limits[:, j]      # levels are all ruled out
            upto = np.append(levels[1:] - 1, p.n_levels[j])
            bound[(levels > 0) & ((upto < lo) | (levels > hi))] = np.inf
        kids = self._make(j + 1, [node.levels + (lv,) for lv in levels.tolist()], node.packed, self.passing[j],
                          cuts, fixed_ms, fixed_right, heads_ms, bound, wide, node)
        return self._chained_children(node, kids)

    def _chained_children(self, node: _Node, kids: list[_Node]) -> list[_Node]:
        """``node``'s children bounded also by the chain bound over the levels ``node``'s narrowing leaves them, all
        in one pass (:func:`~distree.solver.chain.chain_bounds_by_level`: ~0.35 ms a child against ~1.1 for one
        call each on the trained ResNet-110), and only those that can still beat the incumbent. Four in five
        children were popped once only to be chained and pushed back (forty-first session); a child whose own
        narrowing then leaves the same levels needs no second call (:meth:`_chained`)."""
        if self.chain is None or node.depth + 1 >= self.p.n_exits or not kids:
            return kids
        limits = self.all_levels if node.limits is None else node.limits
        values = chain_bounds_by_level(node.packed, np.asarray(node.levels, dtype=np.int64),
                                       np.array([kid.levels[-1] for kid in kids], dtype=np.int64),
                                       *self._chain_args(limits, self.tables.lam * CHAIN_MULTIPLIER, self.chain,
                                                         self._chain_device(), CHAIN_HORIZON))
        cutoff = self.cutoff()
        return [kid._replace(bound=b, chained=True) for kid, b in
                zip(kids, np.maximum([kid.bound for kid in kids], values).tolist()) if b < cutoff]

    def narrow(self, node: _Node) -> _Node | None:
        """``node`` with the levels the accuracy bound leaves its later exits, and its bound over those, or None
        when its survivors cannot give the right answers it needs. First the sure losses that recovering any
        survivor costs (:func:`~distree.solver.kernels.reachable_right`): the free choice in the bounds lets every
        survivor that some later exit answers right be recovered, and on trained exits most cannot be without
        losing as many others; where that count leaves little to spare, a search over the levels that keeps only
        what accuracy depends on (:func:`~distree.solver.kernels.narrow_levels`), which then rules out each
        exit's levels that, forced on, cannot reach the accuracy either. A completion meeting the accuracy uses
        none of those, so the width-1 window over the levels left (:func:`~distree.solver.kernels.narrowed_window`)
        bounds the node: where a trained ResNet-110's lowest open nodes can reach their accuracy at all, it must
        keep its early exits strict, and their bound goes from 1.44 ms to 1.56-2.10 against a 1.70 ms plan."""
        p, t = self.p, self.tables
        need = p.required_correct - node.fixed_right
        reach = reachable_right(node.packed, node.depth, self.passed_by_sample, self.correct_by_sample, self.final,
                                self.max_level, *self.right_exits)
        if reach < need:
            return None
        if reach - need > NARROW_SLACK and node.limits is None:
            return self._chained(node._replace(narrowed=True), self.all_levels)
        limits = self.all_levels if node.limits is None else node.limits
        lo, hi = limits[0].copy(), limits[1].copy()
        if not narrow_levels(node.packed, node.depth, self.passed_by_sample, self.correct_by_sample, self.final,
                             self.max_level, *self.right_exits, need,
                             RECOVERY_BUDGET if reach - need <= RECOVERY_SLACK else 0, lo, hi,
                             PROBE_BUDGET if reach - need <= NARROW_SLACK else -1):
            return None
        same = np.array_equal(lo, limits[0]) and np.array_equal(hi, limits[1])
        if same and node.limits is None:
            return self._chained(node._replace(narrowed=True), self.all_levels)
        window, survivors = narrowed_window(node.packed, node.depth, self.lam, lo, hi, t.leave, t.head,
                                            self.passed_by_sample, self.correct_by_sample, self.final, p.n_levels)
        bound = node.fixed_ms + node.heads_ms * survivors - self.lam * (node.fixed_right - p.required_correct) + window
        limits = node.limits if same else np.stack([lo, hi])
        return self._chained(node._replace(bound=max(node.bound, bound), limits=limits, narrowed=True,
                                           chained=node.chained and same), limits)

    def _chained(self, node: _Node, limits: np.ndarray) -> _Node:
        """``node`` bounded also by the chain bound over the levels ``limits`` leaves it (where it applies): the
        placement, the heads and the answers of the exits it enables shared, which the window bound relaxes."""
        if self.chain is None or node.depth >= self.p.n_exits or node.chained:
            return node
        bound = self.chain_value(node, limits, self.tables.lam * CHAIN_MULTIPLIER, self.chain, self._chain_device(),
                                 CHAIN_HORIZON)
        return node._replace(bound=max(bound, node.bound), chained=True)

    def _chain_device(self) -> int:
        return -1 if self.stage_class is None else self.stage_class.device

    def chain_value(self, node: _Node, limits: np.ndarray, lam: float, tables: ChainTables, device: int,
                    horizon: int) -> float:
        """The chain bound (summed over samples) of ``node`` over the levels ``limits`` leaves it, accuracy priced
        at ``lam``, on the placements of ``tables`` with the first stage on ``device`` (-1: any), looking
        ``horizon`` exits ahead."""
        return chain_bound(node.packed, np.asarray(node.levels, dtype=np.int64),
                           *self._chain_args(limits, lam, tables, device, horizon))

    def _chain_args(self, limits: np.ndarray, lam: float, tables: ChainTables, device: int, horizon: int) -> tuple:
        """What the chain kernels take after the node's own survivors and levels."""
        p = self.p
        return (limits[0], limits[1], lam, self.passed_by_sample, self.correct_by_sample, self.final, p.n_levels,
                p.block_ms, p.head_ms, p.cut_ms, p.return_ms, self.exit_after, p.source, device, tables.allowed,
                tables.to_exit_after, p.required_correct, horizon)

    def twin_of(self, node: _Node) -> tuple[int, ...] | None:
        """The levels of a node popped before in this search at ``node``'s depth that ``node`` cannot beat (its
        *twin*), or None (``node`` is then remembered, while TWIN_BYTES last). Such a twin's survivors are among
        ``node``'s, it enabled no head ``node`` did not, has at least as many samples gone by each exit, and at least
        as many right as ``node`` plus those of ``node``'s extra survivors that could still be answered right
        (:func:`~distree.solver.kernels.dominating_row`): the same completion of the twin is then, on every
        placement, no slower (blocks, transfers and heads are paid by those still in flight; a sample gone earlier,
        matched to one gone later or still in flight, returns from an earlier device, which costs no more than
        carrying it on where returns obey the triangle, :func:`_returns_obey_triangle`), no less accurate and no
        harder to fit (memory, deadline, stage load), so the twin's subtree holds a plan at least as good as any in
        ``node``'s. Until the thirty-ninth session a twin had to have the very same survivors."""
        room, popped = self.twin_room, self.popped.get(node.depth)
        if popped is None and room.keys_left <= 0:
            return None
        levels = np.array(node.levels, dtype=np.int64)
        enabled = np.packbits(levels > 0)
        gone = gone_by(self.passing, levels)
        if popped is not None:
            row = dominating_row(popped.packed, popped.enabled, popped.right, popped.gone, popped.n, node.packed,
                                 enabled, node.fixed_right, gone, room.could_right[node.depth])
            if row >= 0:
                return popped.levels[row]
        if room.keys_left > 0:
            room.keys_left -= 1
            if popped is None:
                self.popped[node.depth] = popped = _Popped(len(node.packed), len(enabled), node.depth)
            popped.add(node.packed, enabled, node.fixed_right, gone, node.levels)
        return None

    def settle_leaf(self, node: _Node) -> None:
        """Price a full configuration exactly (or by a bound, where the placement DP is not exact)."""
        p = self.p
        levels = np.array(node.levels, dtype=int)
        found = place(p, levels)
        if found is not None and found.feasible and found.expected_ms * p.n_samples < self.incumbent_total():
            self.best = found
        if self.exact_leaves:
            return
        floor = node.bound / p.n_samples
        if not p.free_order or p.n_devices <= 4:
            orders = list(itertools.permutations(range(p.n_devices))) if p.free_order else [None]
            relaxed = p.replace(deadline_ms=None)
            costs = [r[1] for r in (best_placement(relaxed, levels, order=o) for o in orders) if r is not None]
            floor = max(floor, min(costs, default=np.inf))
        if floor * p.n_samples < self.cutoff():
            self.open_leaf_bound = min(self.open_leaf_bound, floor * p.n_samples)


class _TwinRoom:
    """How many more nodes the searches of one tree (a search per placement class) may remember for
    :meth:`_Search.twin_of`: TWIN_BYTES in all; none where returns do not obey the triangle. And, as bit sets by
    depth, the samples that could still be answered right from each exit on (at some later exit they pass at a
    level, or at the final classifier)."""

    def __init__(self, p: Problem) -> None:
        self.keys_left = TWIN_BYTES // (p.n_samples // 8 + 8 * p.n_exits + 300) if _returns_obey_triangle(p) else 0
        could = p.correct_final.astype(bool)
        right_later = np.empty((p.n_exits + 1, p.n_samples), dtype=bool)
        right_later[p.n_exits] = could
        for k in range(p.n_exits - 1, -1, -1):
            could = could | ((p.passed_level[:, k] >= 1) & p.correct_exit[:, k])
            right_later[k] = could
        self.could_right = np.packbits(right_later, axis=1)


class _Popped:
    """The nodes a search remembered at one depth for :meth:`_Search.twin_of`, as
    :func:`~distree.solver.kernels.dominating_row` reads them (arrays grown by doubling)."""

    def __init__(self, n_bytes: int, n_enabled_bytes: int, depth: int) -> None:
        self.n = 0
        self.packed = np.empty((8, n_bytes), dtype=np.uint8)
        self.enabled = np.empty((8, n_enabled_bytes), dtype=np.uint8)
        self.right = np.empty(8, dtype=np.int64)
        self.gone = np.empty((8, depth), dtype=np.int64)
        self.levels: list[tuple[int, ...]] = []

    def add(self, packed: np.ndarray, enabled: np.ndarray, right: int, gone: np.ndarray,
            levels: tuple[int, ...]) -> None:
        if self.n == len(self.right):
            self.packed, self.enabled, self.right, self.gone = (
                np.concatenate([a, np.empty_like(a)]) for a in (self.packed, self.enabled, self.right, self.gone))
        self.packed[self.n], self.enabled[self.n], self.right[self.n], self.gone[self.n] = packed, enabled, right, gone
        self.levels.append(levels)
        self.n += 1


def _returns_obey_triangle(p: Problem) -> bool:
    """Whether returning an answer from any device costs at most carrying the sample to another device and returning
    from there (what :meth:`_Search.twin_of` needs to call a sample gone earlier no dearer)."""
    D = p.n_devices
    other = ~np.eye(D, dtype=bool)[:, :, None]
    return bool(np.all(~other | (p.return_ms[:, None, None] <= p.cut_ms + p.return_ms[None, :, None] + 1e-12)))


def _dive_starts(nodes: list) -> list[tuple[int, ...]]:
    """The prefixes of ``nodes`` (open-list entries, lowest bound first) with their trailing exits off dropped (the
    rest of a start is off anyway), shortest first, in the nodes' order within a length, each once."""
    starts: dict[tuple[int, ...], None] = {}
    for length in range(1, max((node.depth for _, _, _, node in nodes), default=0) + 1):
        for _, _, _, node in nodes:
            start = node.levels[:length]
            while start and start[-1] == 0:
                start = start[:-1]
            if len(start) == length:
                starts.setdefault(start)
    return list(starts)


def max_open_nodes(p: Problem) -> int:
    return int(MAX_OPEN_BYTES // (p.n_samples / 8 + 8 * p.n_exits + NODE_BYTES))


class Tree:
    """A branch and bound that can be run again: a later :meth:`run` goes on from the open nodes the last one
    left (with a better incumbent, if one was found meanwhile), so a short first run's work is not thrown away.

    Search until proven or the run's time (depth first also stops at :func:`max_open_nodes` open; best first then
    drops its worst nodes, whose smallest bound caps the proven one); the bound is valid either way. ``prefix``:
    the root's wide window bound, which then bounds every node too. Best first tells ``progress`` the plan and
    the proven bound every PROGRESS_EVERY_S, and now and then retunes the multiplier that prices accuracy in the
    bounds to what its lowest open nodes want (:meth:`_retune`).

    ``classes``: bound each node within a class of placements (:mod:`distree.solver.classes`), starting from
    one tree per first device and splitting a node into the classes that partition its own where the split rule
    says; all trees searched as one (one incumbent, one open list). ``tables`` and ``prefix`` are then unused.

    ``rel_gap``: nodes that cannot beat the incumbent by this share are dropped (as MIP solvers' relative gap):
    ``complete`` then means the plan is within ``rel_gap`` of the optimum, and the bound says no more.

    ``chain``: bound each node also by the chain bound (:mod:`distree.solver.chain`), over its class's placements (or
    every placement where the tree is not split into classes): a node's children all at once, over the levels its
    narrowing leaves them, as they are made; a node again when its own narrowing leaves it fewer.
    A solve's default since the thirty-eighth session: on the trained ResNet-110 it lifts the lowest open nodes by
    0.12-0.16 ms; one call a node cost ~0.8-1.1 ms, 3-5x a node's other work, the children's one pass ~0.35 ms a
    child (docs/solver.md, forty-first session).

    On several cores (:func:`distree.solver.parallel.run_tree`) a best-first tree's open nodes are dealt to forked
    copies of it (:meth:`work_on`), and what they found comes back (:meth:`absorb`)."""

    def __init__(self, p: Problem, incumbent: Candidate | None, best_first: bool = False,
                 tables: BoundTables | None = None, prefix: PrefixBound | None = None,
                 classes: PlacementClasses | None = None, rel_gap: float = 0.0, chain: bool = False):
        t0 = time.perf_counter()
        self.p, self.best, self.best_first, self.classes = p, incumbent, best_first, classes
        self.tol = max(OPTIMALITY_TOLERANCE, rel_gap)
        self.chain = chain                  # each class's searches bound by the chain bound too
        self.ceiling = np.inf               # a plan this good (sum over samples) was found elsewhere (a sibling worker)
        self.share: Optional[Share] = None  # what a forked worker shares with its siblings
        self.cap_share = 1                  # the open-node cap is split among this many workers
        self.searches: list[_Search] = []
        self.index: dict[StageClass, int] = {}
        self.twin_room = _TwinRoom(p)       # shared by the searches
        self.multiplier_factor = 1.0        # every search's multiplier: this times its root's best (_retune)
        self.retune_at = RETUNE_AT
        if classes is None:
            self.searches.append(_Search(p, incumbent, tables, prefix, tol=self.tol, twin_room=self.twin_room,
                                         chain=chain))
            roots = [(0, root) for root in self.searches[0].root()]
        else:
            roots = [(i, root) for i in map(self._search_of, classes.roots()) for root in self.searches[i].root()]
        # (bound, tie-break, search, node): a heap, or a stack popping the cheapest root first
        self.open = sorted(((root.bound, k, i, root) for k, (i, root) in enumerate(roots)), reverse=not best_first)
        # smallest bound of a node no longer held here (dropped at the open-node cap, or left open by a forked
        # run: :mod:`distree.solver.parallel`); how many were dropped
        self.dropped_bound, self.dropped = np.inf, 0
        self.pushed, self.nodes = len(self.open), 0
        self.short = 0                      # nodes dropped by _Search.narrow
        self.twinned = 0                    # nodes dropped for a twin (_Search.twin_of)
        self.dived: dict[tuple[int, ...], float] = {}     # dive (a deterministic local search): start -> plan ms
        self.wall_s = time.perf_counter() - t0

    def _search_of(self, c: StageClass) -> int:
        if c not in self.index:
            self.index[c] = len(self.searches)
            self.searches.append(_Search(self.p, self.best, self.classes.tables(c), None, stage_class=c,
                                         tol=self.tol, twin_room=self.twin_room, chain=self.chain))
            self.searches[-1].ceiling = self.ceiling
            self.searches[-1].lam = self.multiplier_factor * self.searches[-1].tables.lam
        return self.index[c]

    def _lower_ceiling(self, total: float) -> None:
        """A sibling worker found a plan of this total: prune by it here too."""
        if total < self.ceiling:
            self.ceiling = total
            for s in self.searches:
                s.ceiling = total

    def incumbent_total(self) -> float:
        return min(np.inf if self.best is None else self.best.expected_ms * self.p.n_samples, self.ceiling)

    def offer(self, plan: Candidate | None) -> None:
        """Take ``plan`` when it beats this tree's (found elsewhere: the kicks, a forked worker)."""
        if plan is not None and (self.best is None or plan.expected_ms < self.best.expected_ms):
            self.best = plan

    def work_on(self, nodes: list, share: Share, workers: int) -> None:
        """Become one of ``workers`` forked workers (:mod:`distree.solver.parallel`): go on from ``nodes``, a share
        of the open ones, pruning also by the plans the others publish in ``share``."""
        heapq.heapify(nodes)
        self.open, self.share, self.cap_share = nodes, share, workers

    def absorb(self, results: list[BnbResult], before: BnbResult, wall_s: float) -> BnbResult:
        """The open nodes went to forked workers that ended with ``results`` (each counting from ``before``, the
        tree when they forked): take their best plan and their counts; what they left open bounds the proof as
        dropped nodes do, so this tree holds no open node any more."""
        self.open = []
        for r in results:
            self.offer(r.best)
            self.nodes += r.nodes - before.nodes
            self.dropped += r.dropped - before.dropped
            self.short += r.short - before.short
            self.twinned += r.twinned - before.twinned
            if not r.complete:
                self.dropped_bound = min(self.dropped_bound, r.bound * self.p.n_samples)
        self.wall_s += wall_s
        return dataclasses.replace(self.result(), classes=max(r.classes for r in results), workers=len(results))

    def _cutoff(self) -> float:
        return self.incumbent_total() * (1 - self.tol)

    def _retune(self) -> None:
        """Price accuracy, from here on, at the factor of each search's root multiplier (MULTIPLIER_FACTORS) under
        which the lowest open nodes bound highest (their sum, each capped at the cutoff): those nodes hold the
        proven bound, and any multiplier gives a valid bound, so nodes bounded before keep theirs."""
        lowest = heapq.nsmallest(RETUNE_NODES, self.open)
        if not lowest:
            return
        cutoff = self._cutoff()
        score = [sum(min(self.searches[i].bound_at(node, f), cutoff) for _, _, i, node in lowest)
                 for f in MULTIPLIER_FACTORS]
        self.price_accuracy_at(MULTIPLIER_FACTORS[int(np.argmax(score))])

    def price_accuracy_at(self, factor: float) -> None:
        """Every search, and every one made later, prices accuracy at ``factor`` times its root's best multiplier."""
        self.multiplier_factor = factor
        for s in self.searches:
            s.lam = factor * s.tables.lam

    def _proven_total(self, open_min: float) -> float:
        """The bound proven so far, given the smallest bound of an open node (sum over samples)."""
        return min(open_min, self.dropped_bound, min(s.open_leaf_bound for s in self.searches),
                   self.incumbent_total())

    def proven_total(self) -> float:
        """The bound proven so far (sum over samples)."""
        return self._proven_total(min((b for b, _, _, _ in self.open), default=np.inf))

    def run(self, time_limit_s: float, incumbent: Candidate | None = None,
            progress: Optional[Progress] = None) -> BnbResult:
        """Go on for ``time_limit_s`` (``incumbent``: a plan found meanwhile, taken when better); the result covers
        every run so far."""
        t0 = time.perf_counter()
        stop_at = t0 + time_limit_s
        p, best_first, open_nodes = self.p, self.best_first, self.open
        self.offer(incumbent)
        cap = max_open_nodes(p) // self.cap_share
        told_at = t0
        while open_nodes:
            if self.nodes % 64 == 0:
                now = time.perf_counter()
                if self.share is not None:
                    self._lower_ceiling(self.share.sync(self._proven_total(open_nodes[0][0])))
                if now > stop_at or requested() or (best_first and open_nodes[0][0] >= self.dropped_bound):
                    break                     # out of time, Ctrl-C, or nothing left to prove below the dropped nodes
                if progress is not None and best_first and now - told_at >= PROGRESS_EVERY_S:
                    told_at = now
                    progress(self.best, self._proven_total(open_nodes[0][0]) / p.n_samples)
            if len(open_nodes) > cap:
                if not best_first:
                    break
                keep = int(OPEN_NODES_KEPT * cap)
                open_nodes.sort()             # a sorted list is a heap
                self.dropped_bound = min(self.dropped_bound, open_nodes[keep][0])
                self.dropped += len(open_nodes) - keep
                del open_nodes[keep:]
            if best_first and self.nodes >= self.retune_at:
                self._retune()
                self.retune_at *= RETUNE_GROWTH
            _, _, i, node = heapq.heappop(open_nodes) if best_first else open_nodes.pop()
            self.nodes += 1
            if node.bound >= self._cutoff():
                continue
            s = self.searches[i]
            if node.depth < p.n_exits and not node.narrowed:
                if s.twin_of(node) is not None:
                    self.twinned += 1
                    continue
                narrowed = s.narrow(node)
                if narrowed is None:
                    self.short += 1
                    continue
                if narrowed.bound > node.bound:             # back in line (or out) with its higher bound
                    if narrowed.bound < self._cutoff():
                        self.pushed += 1
                        heapq.heappush(open_nodes, (narrowed.bound, self.pushed, i, narrowed)) if best_first else \
                            open_nodes.append((narrowed.bound, self.pushed, i, narrowed))
                    continue
                node = narrowed
            kids = self.kids(i, node)
            if kids is None:
                s.settle_leaf(node)
                if s.best is not self.best:
                    self.best = s.best
                    if self.share is not None:
                        self.share.found(self.best)
                continue
            if best_first:
                for j, kid in kids:
                    self.pushed += 1
                    heapq.heappush(open_nodes, (kid.bound, self.pushed, j, kid))
            else:
                for j, kid in sorted(kids, key=lambda k: -k[1].bound):     # depth first pops the cheapest first
                    self.pushed += 1
                    open_nodes.append((kid.bound, self.pushed, j, kid))
        self.wall_s += time.perf_counter() - t0
        return self.result()

    def kids(self, i: int, node: _Node) -> list[tuple[int, _Node]] | None:
        """The children of ``node`` (of search ``i``; narrowed already) with the searches they belong to: within each
        placement class that partitions its own where its class splits at this exit, else its children; None for a
        leaf (a full configuration, priced by :meth:`_Search.settle_leaf`)."""
        s = self.searches[i]
        s.best = self.best
        parts = self.classes.split(s.stage_class, node.depth) if self.classes is not None else []
        if parts:                             # the same node, bounded within each class that partitions its own
            kids = [(j, kid) for j in map(self._search_of, parts[:-1])
                    for kid in self.searches[j].rebound(node, self.best)]
            i = self._search_of(parts[-1])
            s = self.searches[i]
            if not parts[-1].exact:           # needs no split at this exit: its children at once (one bound less)
                s.best = self.best
                return kids + [(i, kid) for kid in s.children(node)]
            return kids + [(i, kid) for kid in s.rebound(node, self.best)]
        if node.depth == self.p.n_exits:
            return None
        return [(i, kid) for kid in s.children(node)]

    def dive(self, time_limit_s: float) -> None:
        """Local searches from the lowest open nodes' prefixes, each with every later exit off, shortest prefixes
        first (exit 0's level alone, then two exits, ...; in bound order within a length), each start once; a better
        plan becomes the tree's. For ``time_limit_s`` or until DIVE_PATIENCE dives in a row found nothing better.
        Whole prefixes alone were not enough: the trial tree's lowest nodes often enable exit 2, and every dive
        from there stalls at 2.024 ms on the trained ResNet-110 (7 of 15 solves ended there), while exit 0 alone,
        at any of levels 1-7, leads to 1.872. ``dived``: what each start found (ms; inf: nothing feasible)."""
        stop_at = time.perf_counter() + time_limit_s
        p, fruitless = self.p, 0
        for start in _dive_starts(heapq.nsmallest(DIVES_LISTED, self.open)):
            if time.perf_counter() >= stop_at or fruitless >= DIVE_PATIENCE or requested():
                break
            if start in self.dived:
                continue
            levels = np.zeros(p.n_exits, dtype=int)
            levels[:len(start)] = start
            found = local_search(p, starts=[levels],
                                 time_limit_s=max(stop_at - time.perf_counter(), DIVE_DESCENT_MIN_S))
            self.dived[start] = np.inf if found is None else found.expected_ms
            fruitless += 1
            if found is not None and found.expected_ms * p.n_samples < self.incumbent_total():
                self.best, fruitless = found, 0

    def result(self) -> BnbResult:
        N, cutoff = self.p.n_samples, self._cutoff()
        live = [b for b, _, _, _ in self.open if b < cutoff]
        bound_total = self._proven_total(min(live, default=np.inf))
        if self.tol > OPTIMALITY_TOLERANCE:   # nodes dropped by the gap bounded at least the cutoff, no more is known
            bound_total = min(bound_total, cutoff)
        complete = (not live and not any(np.isfinite(s.open_leaf_bound) for s in self.searches)
                    and self.dropped_bound >= cutoff)
        tried = sum(s.prefix_tried for s in self.searches)
        return BnbResult(best=self.best, bound=bound_total / N, complete=complete, nodes=self.nodes,
                         wall_s=self.wall_s,
                         wide_share=sum(s.prefix_decisive for s in self.searches) / tried if tried else float("nan"),
                         dropped=self.dropped, classes=len(self.searches) if self.classes is not None else 0,
                         short=self.short, twinned=self.twinned)


def branch_and_bound(p: Problem, incumbent: Candidate | None, time_limit_s: float,
                     best_first: bool = False, tables: BoundTables | None = None,
                     prefix: PrefixBound | None = None, progress: Optional[Progress] = None,
                     classes: PlacementClasses | None = None, rel_gap: float = 0.0) -> BnbResult:
    """One :class:`Tree` run for ``time_limit_s``, from its roots."""
    return Tree(p, incumbent, best_first, tables, prefix, classes, rel_gap).run(time_limit_s, progress=progress)


def warm_up() -> None:
    """Run every kernel (:mod:`distree.solver.kernels`) once on a tiny instance, so numba compiles them into its
    cache: ``scripts/setup.sh`` runs it, or a user's first solve would spend ~6 s of its time limit compiling."""
    from distree.solver.synthetic import synthetic_case     # here: it imports the profiler (ONNX, 0.6 s)

    case = synthetic_case(8, 4, 3, 2, 200, seed=0)
    p, _ = build_problem(case.chain, case.calibration, case.profile, case.topology, Constraints())
    tables = bound_tables(p)
    for prefix in (None, window_prefix_bound(p, tables, 2)):     # the wide window along the tree, or none
        search = _Search(p, None, tables, prefix)
        for node in search.root():
            for child in search.children(node):
                search.rebound(child, None)
                search.narrow(child)
                search.twin_of(child)         # remembered (gone_by), then its own twin (dominating_row)
                search.twin_of(child)
                recovery_search(child.packed, child.depth, search.passed_by_sample, search.correct_by_sample,
                                search.final, search.max_level, *search.right_exits, p.required_correct, 10)
                narrowed_window(child.packed, child.depth, search.lam, *search.all_levels, tables.leave, tables.head,
                                search.passed_by_sample, search.correct_by_sample, search.final, p.n_levels)
    whole = StageClass(0, 0, p.n_blocks - 1)          # the chain bounds (a solve's class searches use them)
    search = _Search(p, None, tables, None, stage_class=whole, chain=True)
    search.children(search.narrow(search.root()[0]))
    relaxed_lower_bound(p)
