"""Sub-segments: the units each device runs, one per run of blocks that ends at an enabled exit or at the
stage end, so that a sample which leaves at an exit stops computing there (the solver's cost model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import onnx

from distree.errors import DistreeError
from distree.exits.types import ExitPoint
from distree.graph import Chain, extract_segment
from distree.solver.plan import ExitChoice, Plan


@dataclass(frozen=True)
class SegmentSpec:
    """Blocks ``first_block..last_block`` of ``device``; outputs ``forward`` then the exit tensors."""

    device: str
    stage_index: int
    index: int                      # position within the device's stage
    first_block: int
    last_block: int
    input: str
    forward: str                    # activation handed on (the final logits for the last segment)
    exit: Optional[ExitChoice]      # the exit this segment ends at, if any
    entry_output: Optional[str]     # the exit's entry-head logits (stability score only)
    is_final: bool                  # computes the model's final output

    @property
    def outputs(self) -> tuple[str, ...]:
        extra = [t for t in (self.exit.name if self.exit else None, self.entry_output) if t]
        return (self.forward, *extra)

    @property
    def stem(self) -> str:
        return f"s{self.stage_index}_seg{self.index}_b{self.first_block}-{self.last_block}"


def plan_segments(plan: Plan, chain: Chain, exits: tuple[ExitPoint, ...],
                  split_before: Optional[Mapping[str, frozenset[int]]] = None) -> tuple[SegmentSpec, ...]:
    """All sub-segments of the plan, in execution order; validates the plan against the chain first. A segment
    ends at each enabled exit and at the stage's end, and, on a device named in ``split_before``, before each block
    it lists (where a GPU's TVM code hands over to ONNX Runtime on its CPU, or back)."""
    check_plan_matches(plan, chain, exits)
    by_name = {e.name: e for e in exits}
    last_chain_block = len(chain.blocks) - 1
    specs: list[SegmentSpec] = []
    for s_idx, stage in enumerate(plan.stages):
        start = stage.first_block
        ends: list[tuple[int, Optional[ExitChoice]]] = [(e.after_block, e) for e in stage.exits]
        ends += [(b - 1, None) for b in (split_before or {}).get(stage.device, ())
                 if stage.first_block < b <= stage.last_block and b - 1 not in {end for end, _ in ends}]
        ends.sort(key=lambda end: end[0])
        if not ends or ends[-1][0] != stage.last_block:
            ends.append((stage.last_block, None))
        for k, (end, choice) in enumerate(ends):
            entry = None
            if choice is not None and plan.score_kind == "stability":
                entry = by_name[choice.name].entry_output
                if entry is None:
                    raise DistreeError(f"exit {choice.name} has no entry head but the plan uses the stability "
                                       "score; re-run `distree exits` to attach entry heads")
            specs.append(SegmentSpec(
                device=stage.device, stage_index=s_idx, index=k, first_block=start, last_block=end,
                input=chain.blocks[start].input, forward=chain.blocks[end].output, exit=choice,
                entry_output=entry, is_final=end == last_chain_block,
            ))
            start = end + 1
    return tuple(specs)


def check_plan_matches(plan: Plan, chain: Chain, exits: tuple[ExitPoint, ...]) -> None:
    """One-line errors for a plan made for another model or another chain."""
    fix = "re-run `distree plan` (or `distree compile`) for this model"
    if plan.model_sha256 and chain.model_sha256 and plan.model_sha256 != chain.model_sha256:
        raise DistreeError(f"the plan was made for model {plan.model_sha256[:12]}, not this model "
                           f"({chain.model_sha256[:12]}); {fix}")
    if not plan.stages:
        raise DistreeError(f"the plan has no stages; {fix}")
    expected = 0
    for stage in plan.stages:
        if stage.first_block != expected or stage.last_block < stage.first_block:
            raise DistreeError(f"plan stage on {stage.device} covers blocks {stage.first_block}.."
                               f"{stage.last_block}, expected to start at block {expected}; {fix}")
        expected = stage.last_block + 1
    if expected != len(chain.blocks):
        raise DistreeError(f"the plan covers blocks 0..{expected - 1} but the model has {len(chain.blocks)} "
                           f"blocks; {fix}")
    known = {e.name: e for e in exits}
    for stage in plan.stages:
        for choice in stage.exits:
            point = known.get(choice.name)
            if point is None:
                raise DistreeError(f"the plan enables exit {choice.name!r}, which the model does not have "
                                   f"(exits: {', '.join(known) or 'none'}); {fix}")
            if point.after_block != choice.after_block or not (
                    stage.first_block <= choice.after_block <= stage.last_block):
                raise DistreeError(f"the plan puts exit {choice.name} after block {choice.after_block} on "
                                   f"{stage.device} (blocks {stage.first_block}..{stage.last_block}), but the "
                                   f"model has it after block {point.after_block}; {fix}")


def segment_model(model: onnx.ModelProto, chain: Chain, spec: SegmentSpec) -> onnx.ModelProto:
    """The standalone ONNX of one sub-segment (graph's extractor; outputs in ``spec.outputs`` order)."""
    extra = spec.outputs[1:]
    return extract_segment(model, chain, spec.first_block, spec.last_block, extra_outputs=extra)
