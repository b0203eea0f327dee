"""Placement classes: the branch and bound's bounds priced within one class of placements at a time.

The whole problem's bound tables (:func:`~distree.solver.bounds.bound_tables`) price a sample leaving at an exit
by the cheapest staged path to it and each head at its cheapest device, whatever path reaches it. When the
devices differ a lot (a Pi 4 feeding an Orin over Wi-Fi) that is loose: the plan keeps everything on the Pi
(a hop costs more than it saves) while the bound prices every head at the x86 server's 0.03 ms, not the Pi's
0.37. A class fixes the device of the first stage and a range of blocks where it ends; within a class the blocks
the first stage surely runs, and their heads, are priced on that device, and the classes of a split partition
the placements of their parent, so the smallest bound over the open nodes of all classes bounds every plan.

The search (:func:`~distree.solver.bnb.branch_and_bound` with ``classes``) starts from "the first stage runs on
device d" for each d and splits a class only when the tree reaches an exit past what the class has fixed: a node
deciding exit j (after block a) in "d's stage ends in [c, e]", c < a, becomes one node in each of "ends at b"
for c <= b < a and "ends in [a, e]". Decisions above the split are searched once, not once per class. Measured
on the example's 22 trained exits on 3 devices (2 cores, accuracy drop 0.01, the tree alone for 45 s from the
same plan): one tree over every placement 34.9% gap (30 s); one tree per exact class from the start 17.3%
(30 s); split as they go 12.4%, and 9.3% with the shortcuts of ``branch_and_bound`` at a split; the Pi 4 alone,
for comparison, 7.8%.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from distree.interrupt import requested
from distree.solver.bounds import BoundTables, bound_tables, first_chances
from distree.solver.problem import Problem

# classes are searched when their lowest root bound is this much (relative) above the whole problem's: then the
# placement relaxation, not accuracy, keeps the bound low
CLASS_MIN_GAIN = 0.005


@dataclass(frozen=True)
class StageClass:
    """The placements whose first stage runs on ``device`` and ends at a block in [``first_end``, ``last_end``]."""

    device: int
    first_end: int
    last_end: int

    @property
    def exact(self) -> bool:
        return self.first_end == self.last_end


def class_placements(p: Problem, c: StageClass) -> np.ndarray:
    """[D, B]: whether device d may run block b in a placement of class ``c``: the first stage's blocks only on its
    device, and that device nothing past the stage's last possible end."""
    allowed = np.ones((p.n_devices, p.n_blocks), dtype=bool)
    allowed[:, :c.first_end + 1] = False
    allowed[c.device, :c.first_end + 1] = True
    allowed[c.device, c.last_end + 1:] = False
    return allowed


def class_tables(p: Problem, c: StageClass, first_chance: np.ndarray | None = None) -> BoundTables:
    """Bound tables priced within the class. Each head is priced at its cheapest device allowed to run its
    block: the first stage's heads are then exact, so the prices of one device with paths elsewhere credited
    (:func:`~distree.solver.bounds.bound_tables`) add little for 4x the time."""
    allowed = class_placements(p, c)
    price = np.where(allowed[:, p.exit_after], p.head_ms, np.inf).min(axis=0)
    return bound_tables(p, head_price=price, allowed=allowed, first_chance=first_chance)


class PlacementClasses:
    """The classes a search may visit, their tables (built when first needed, then kept; one first-chance table
    shared by all) and the split rule."""

    def __init__(self, p: Problem):
        self.p = p
        self._first_chance = first_chances(p)
        self._tables: dict[StageClass, BoundTables] = {}

    def roots(self) -> list[StageClass]:
        """One class per first device. (Splitting off "it runs everything" at once, so that the rest must cross
        a hop, does not help: on the 22 trained exits the rest bounds lower, 0.472 against 0.488 ms.)"""
        return [StageClass(d, 0, self.p.n_blocks - 1) for d in range(self.p.n_devices)]

    def tables(self, c: StageClass) -> BoundTables:
        if c not in self._tables:
            self._tables[c] = class_tables(self.p, c, self._first_chance)
        return self._tables[c]

    def split(self, c: StageClass, depth: int) -> list[StageClass]:
        """The classes that partition ``c`` before a node deciding exit ``depth`` (none: no split needed): each
        end before that exit's block on its own, and the ends from there on together."""
        if c.exact or depth >= self.p.n_exits:
            return []
        block = int(self.p.exit_after[depth])
        if block <= c.first_end:
            return []
        exact = [StageClass(c.device, b, b) for b in range(c.first_end, min(block, c.last_end + 1))]
        return exact + ([StageClass(c.device, block, c.last_end)] if block <= c.last_end else [])


def placement_classes(p: Problem, whole: BoundTables, seconds: float) -> PlacementClasses | None:
    """The classes, when each exact class screened (each device, each last block) raises the root bound over
    ``whole``'s by CLASS_MIN_GAIN; else None. "One device runs everything" comes first: where the whole problem's
    bound is already as tight as a class allows, that is the class that shows it. Then device by device, those
    whose "runs everything" class bounds lowest first (their other classes are likeliest to fail), every last
    block coarse to fine, until ``seconds`` are spent: the screen only decides whether classes help, the search
    builds what it needs. Measured (2 cores): 69 exact classes of the example's 22 trained exits on 3 devices in
    0.6 s; on the ResNet-110 scale (165 classes, ~2 s in all) the third class, all on the fastest device, bounds
    the root as the whole problem does; a trained ResNet-110's 339 classes take 3.4 s (10 ms each). On 200 blocks
    x 8 devices only device 5's stages ending at blocks 27 and 28 bound that low (13.5 ms a class): a screen of
    every k-th block, k set by the time (until the thirty-eighth session), saw them or not as k fell, and the 60 s
    solve ended at a 0.4% or a 2.0% gap (the classes' search lacks the wide window) by the host's speed; going
    through device 5's blocks first sees block 28 ~0.4 s in."""
    if p.n_devices == 1 or p.n_exits == 0:
        return None
    floor = whole.root + CLASS_MIN_GAIN * abs(whole.root)
    everything = [StageClass(d, p.n_blocks - 1, p.n_blocks - 1) for d in range(p.n_devices)]
    classes = PlacementClasses(p)
    t0 = time.perf_counter()
    if classes.tables(everything[0]).root <= floor:
        return None
    if (time.perf_counter() - t0) * p.n_devices > seconds:
        return None
    if any(classes.tables(c).root <= floor for c in everything[1:]):
        return None
    closest = sorted(range(p.n_devices), key=lambda d: classes.tables(everything[d]).root)
    ends = _coarse_to_fine(p.n_blocks - 1)
    for d in closest:
        for b in ends:
            if time.perf_counter() - t0 > seconds or requested():
                return classes
            if classes.tables(StageClass(d, b, b)).root <= floor:
                return None
    return classes


def _coarse_to_fine(n: int) -> list[int]:
    """0 .. n - 1, halving the spacing as it goes (0, 64, 32, 96, 16, ...), so that a screen that fails fails
    early and one short of time has seen the whole range at a coarse spacing."""
    def spacing(i: int) -> int:             # the largest power of two dividing i (i = 0 comes first)
        return i & -i if i else n

    return sorted(range(n), key=lambda i: (-spacing(i), i))
