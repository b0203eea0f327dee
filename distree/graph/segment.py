"""Standalone ONNX models for block ranges, and merging blocks into a shorter chain."""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from distree.errors import DistreeError
from distree.graph.chain import Block, Chain
from distree.graph.cuts import GraphIndex


def extract_segment(
    model: onnx.ModelProto,
    chain: Chain,
    first_block: int,
    last_block: int,
    extra_outputs: Iterable[str] = (),
) -> onnx.ModelProto:
    """An ONNX model computing blocks ``first_block..last_block`` (inclusive).

    Its only input is ``blocks[first_block].input``; its outputs are ``blocks[last_block].output`` then
    ``extra_outputs`` (exit-head logits, or any tensor computable inside the range), each with its static
    shape. Constant subgraphs and weights are copied in. Chaining the segments of consecutive ranges
    reproduces the whole model. To cut many segments from one model, use :class:`SegmentExtractor`.
    """
    return SegmentExtractor(model, chain).extract(first_block, last_block, extra_outputs)


class SegmentExtractor:
    """Extracts many segments from one model, indexing the graph once (the model must not change meanwhile)."""

    def __init__(self, model: onnx.ModelProto, chain: Chain) -> None:
        self.model = model
        self.chain = chain
        self.index = GraphIndex(model, chain.output_name)
        self.value_info = {v.name: v for v in model.graph.value_info}
        self.initializers = {t.name: t for t in model.graph.initializer}

    def extract(self, first_block: int, last_block: int, extra_outputs: Iterable[str] = ()) -> onnx.ModelProto:
        """See :func:`extract_segment`."""
        chain, index, model = self.chain, self.index, self.model
        n = len(chain.blocks)
        if not (0 <= first_block <= last_block < n):
            raise DistreeError(f"block range {first_block}..{last_block} is outside the chain's blocks 0..{n - 1}")
        seg_input = chain.blocks[first_block].input
        outputs = list(dict.fromkeys([chain.blocks[last_block].output, *extra_outputs]))
        allowed = {name for b in chain.blocks[first_block : last_block + 1] for name in b.nodes}
        needed = _needed_nodes(index, seg_input, outputs, allowed, first_block, last_block)
        nodes = [node for node in index.nodes if node.name in needed]
        used = list(dict.fromkeys(t for node in nodes for t in index.inputs[node.name]))
        graph = helper.make_graph(
            nodes=nodes,
            name=f"{model.graph.name or 'model'}_blocks_{first_block}_{last_block}",
            inputs=[_value_info(index, seg_input)],
            outputs=[_value_info(index, o) for o in outputs],
            initializer=[self.initializers[t] for t in used if t in self.initializers],
            value_info=[
                self.value_info[t] for t in used if t in self.value_info and t != seg_input and t not in outputs
            ],
        )
        segment = helper.make_model(
            graph,
            opset_imports=list(model.opset_import),
            ir_version=model.ir_version,
            producer_name="distree",
        )
        segment.functions.extend(model.functions)
        onnx.checker.check_model(segment)
        return segment


def _needed_nodes(
    index: GraphIndex, seg_input: str, outputs: list[str], allowed: set[str], first: int, last: int
) -> set[str]:
    """Walk back from the outputs to the segment input; refuse anything that needs earlier activations."""
    needed: set[str] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or t == seg_input:
            continue
        seen.add(t)
        node = index.producer.get(t)
        if node is None:
            if t in index.constant:
                continue  # a weight
            raise _outside(t, outputs, first, last)  # the graph input, or no such tensor
        if node.name in index.backbone and node.name not in allowed:
            raise _outside(t, outputs, first, last)
        needed.add(node.name)
        stack.extend(index.inputs[node.name])
    return needed


def _outside(tensor: str, outputs: list[str], first: int, last: int) -> DistreeError:
    return DistreeError(
        f"outputs {outputs} of blocks {first}..{last} need tensor {tensor!r}, which is not computed "
        f"in that range; ask only for exits whose heads read blocks {first}..{last}"
    )


def _value_info(index: GraphIndex, tensor: str) -> onnx.ValueInfoProto:
    info = index.infos.get(tensor)
    if info is None:
        raise DistreeError(f"tensor {tensor!r} has no static shape; load the model with load_model first")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    return helper.make_tensor_value_info(tensor, elem, list(info.shape))


def coarsen(chain: Chain, max_blocks: int, keep: Iterable[str] = ()) -> Chain:
    """Merge adjacent blocks into at most ``max_blocks``, keeping the cuts with the smallest ``out_bytes``.

    ``keep`` names cut tensors (block outputs) that must stay cuts, e.g. where exits attach; they use up
    slots first. Ties between equally cheap cuts are broken towards balanced FLOPs: each kept cut is the one
    that most lowers the largest merged block's FLOPs. Merged blocks sum FLOPs and parameter bytes (a weight
    shared by two merged blocks counts twice) and take the largest working set.
    """
    if max_blocks < 1:
        raise DistreeError(f"--coarsen {max_blocks}: give at least 1 block")
    blocks = chain.blocks
    position = {b.output: b.index for b in blocks[:-1]}
    keep = list(dict.fromkeys(keep))
    unknown = [t for t in keep if t not in position and t != chain.output_name]
    if unknown:
        raise DistreeError(f"cannot keep {unknown[0]!r} as a cut: it is not a block output of this chain")
    forced = sorted(position[t] for t in keep if t in position)
    if len(forced) > max_blocks - 1:
        raise DistreeError(
            f"--coarsen {max_blocks}: {len(forced)} cuts must be kept (exits), so at least {len(forced) + 1} "
            "blocks are needed; raise N"
        )
    if len(blocks) <= max_blocks:
        return chain
    prefix = [0]
    for b in blocks:
        prefix.append(prefix[-1] + b.flops)
    kept = list(forced)  # cut after block i, sorted
    by_cost: dict[int, list[int]] = {}
    for i in range(len(blocks) - 1):
        if i not in forced:
            by_cost.setdefault(blocks[i].out_bytes, []).append(i)
    slots = max_blocks - 1 - len(forced)
    for cost in sorted(by_cost):
        if slots == 0:
            break
        group = by_cost[cost]
        chosen = group if len(group) <= slots else _balanced_pick(group, slots, kept, prefix)
        for c in chosen:
            bisect.insort(kept, c)
        slots -= len(chosen)
    return dataclasses.replace(chain, blocks=_merge(blocks, kept))


def _balanced_pick(candidates: list[int], count: int, kept: list[int], prefix: list[int]) -> list[int]:
    """Pick ``count`` cuts, each time the one that gives the smallest largest-block FLOPs (then: lowest index)."""
    kept = list(kept)
    pool = list(candidates)
    picked = []
    for _ in range(count):
        bounds = [0, *(k + 1 for k in kept), len(prefix) - 1]
        parts = [prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])]

        def split_cost(c: int) -> tuple[int, int, int]:
            j = bisect.bisect_left(kept, c)
            lo, hi, mid = prefix[bounds[j]], prefix[bounds[j + 1]], prefix[c + 1]
            local = max(mid - lo, hi - mid)
            return (max([local, *parts[:j], *parts[j + 1 :]]), local, c)

        best = min(pool, key=split_cost)
        pool.remove(best)
        bisect.insort(kept, best)
        picked.append(best)
    return picked


def _merge(blocks: tuple[Block, ...], cuts_after: list[int]) -> tuple[Block, ...]:
    merged = []
    start = 0
    for k, end in enumerate([*cuts_after, len(blocks) - 1]):
        group = blocks[start : end + 1]
        last = group[-1]
        merged.append(
            Block(
                index=k,
                nodes=tuple(n for b in group for n in b.nodes),
                ops=tuple(o for b in group for o in b.ops),
                input=group[0].input,
                output=last.output,
                output_shape=last.output_shape,
                output_dtype=last.output_dtype,
                flops=sum(b.flops for b in group),
                param_bytes=sum(b.param_bytes for b in group),
                out_bytes=last.out_bytes,
                workspace_bytes=max(b.workspace_bytes for b in group),
            )
        )
        start = end + 1
    return tuple(merged)
