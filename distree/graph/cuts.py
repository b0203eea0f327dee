"""Cut points and the chain of blocks.

Definitions (the graph is the *backbone*: non-constant nodes that are ancestors of the final output; nodes that
only feed extra outputs are exit heads and belong to no block):

- A *constant* tensor is an initializer or an output of a node whose inputs are all constant (``Constant``,
  ``Identity``/``Reshape`` of a weight, folded ``Shape``...). Constants can be recomputed anywhere, so they never
  count as live; every segment that needs one gets its own copy.
- A tensor ``t`` is a *cut point* iff every backbone node is either an ancestor of ``t`` (its producer
  included) or computed from ``t``, and no other tensor made by the ancestors is read by the rest.

Algorithm: one pass over any topological order, keeping the set of live tensors (made so far, still read
later). ``t`` made by node ``n`` is a cut iff the live set right after ``n`` is exactly ``{t}``. This is
order-independent: if ``t`` is a cut, its ancestors come before ``n`` and everything else after in *every*
order, so the live set after ``n`` is exactly ``{t}``; conversely if the live set after ``n`` is ``{t}``,
every earlier node reaches the final output only through ``t`` (so is an ancestor of ``t``) and every later
node reads only ``t`` or later tensors. Cost: O(nodes + edges).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import onnx

from distree.errors import DistreeError
from distree.graph.chain import Block, Chain
from distree.graph.cost import TensorInfo, node_flops, tensor_infos
from distree.graph.load import canonical_order, model_sha256, node_inputs


class GraphIndex:
    """Producers, consumers, constants and backbone of one model, computed once."""

    def __init__(self, model: onnx.ModelProto, final_output: str | None = None) -> None:
        graph = model.graph
        if not graph.output:
            raise DistreeError("the model has no graph output; re-export it with its logits as output")
        self.model = model
        self.nodes: list[onnx.NodeProto] = canonical_order(graph)
        self.by_name = {n.name: n for n in self.nodes}
        if len(self.by_name) != len(self.nodes):
            dup = next(name for name, count in Counter(n.name for n in self.nodes).items() if count > 1)
            raise DistreeError(
                f"node name {dup!r} is used by several nodes; give every node a unique name "
                "(distree.graph.load_model and distree.graph.load.normalize do)"
            )
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.inputs = {n.name: node_inputs(n) for n in self.nodes}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output if o}
        weights = {t.name for t in graph.initializer}
        graph_inputs = [i.name for i in graph.input if i.name not in weights]
        if len(graph_inputs) != 1:
            raise DistreeError(f"the model has {len(graph_inputs)} graph inputs; distree needs exactly one")
        self.input_name = graph_inputs[0]
        self.final_output = final_output or graph.output[0].name
        if not any(o.name == self.final_output for o in graph.output):
            names = ", ".join(o.name for o in graph.output)
            raise DistreeError(f"{self.final_output!r} is not a graph output (outputs: {names}); name one of them")
        self.extra_outputs = tuple(o.name for o in graph.output if o.name != self.final_output)
        self.constant = self._constants(weights)
        self.backbone = self._ancestors_of(self.final_output)

    @cached_property
    def infos(self) -> dict[str, TensorInfo]:
        return tensor_infos(self.model)

    def _constants(self, weights: set[str]) -> set[str]:
        constant = set(weights)
        for node in self.nodes:
            if all(i in constant for i in self.inputs[node.name]) and not node.op_type.startswith("Random"):
                constant.update(o for o in node.output if o)
        return constant

    def is_constant_node(self, node: onnx.NodeProto) -> bool:
        return all(o in self.constant for o in node.output if o) and any(o for o in node.output)

    def _ancestors_of(self, tensor: str) -> set[str]:
        """Names of the non-constant nodes that ``tensor`` depends on (its producer included)."""
        return self.walk_back(tensor)[0]

    def walk_back(self, tensor: str, stop: frozenset[str] | set[str] = frozenset()) -> tuple[set[str], set[str]]:
        """Non-constant nodes ``tensor`` depends on, not walking past nodes named in ``stop``.

        Returns (nodes walked through, ``stop`` nodes reached)."""
        walked: set[str] = set()
        reached: set[str] = set()
        stack, seen = [tensor], set()
        while stack:
            t = stack.pop()
            if t in seen or t in self.constant:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is None:
                continue
            if node.name in stop:
                reached.add(node.name)
            elif node.name not in walked:
                walked.add(node.name)
                stack.extend(self.inputs[node.name])
        return walked, reached

    @cached_property
    def backbone_order(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.name in self.backbone]

    def live_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Distinct non-constant tensors a node reads."""
        return list(dict.fromkeys(i for i in self.inputs[node.name] if i not in self.constant))

    def constant_closure(self, tensors: set[str]) -> list[onnx.NodeProto]:
        """Constant-only nodes needed to compute ``tensors`` (in graph order)."""
        needed: set[str] = set()
        stack = [t for t in tensors if t in self.constant]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or node.name in needed:
                continue
            needed.add(node.name)
            stack.extend(self.inputs[node.name])
        return [n for n in self.nodes if n.name in needed]

    def constant_bytes(self, tensors: set[str]) -> int:
        return sum(self.infos[t].nbytes for t in tensors if t in self.constant and t in self.infos)


def find_cuts(index: GraphIndex) -> list[tuple[str, int]]:
    """``(tensor, position in backbone order)`` of every cut point; the graph input first (position -1)."""
    order = index.backbone_order
    remaining: Counter[str] = Counter()
    for node in order:
        remaining.update(index.live_inputs(node))
    if index.input_name not in remaining:
        raise DistreeError(
            f"the final output {index.final_output!r} does not depend on the input {index.input_name!r}; "
            "export the classifier so its output is computed from its input"
        )
    live = {index.input_name}
    cuts = [(index.input_name, -1)]
    for pos, node in enumerate(order):
        for t in index.live_inputs(node):
            remaining[t] -= 1
            if remaining[t] == 0:
                live.discard(t)
        made = [o for o in node.output if o and (remaining[o] > 0 or o == index.final_output)]
        live.update(made)
        if len(live) == 1 and made == list(live):
            cuts.append((made[0], pos))
    if cuts[-1][0] != index.final_output:
        raise DistreeError(f"internal: final output {index.final_output!r} is not the last cut")
    return cuts


def build_chain(model: onnx.ModelProto, final_output: str | None = None) -> Chain:
    """Split the model (as returned by :func:`load_model`) into the chain of blocks between its cut points.

    ``final_output`` defaults to the first graph output; other outputs are exits (see :func:`exit_heads`).
    Raises DistreeError when there is no cut point besides the input and the output.
    """
    index = GraphIndex(model, final_output)
    cuts = find_cuts(index)
    if len(cuts) < 3:
        raise DistreeError(
            f"no cut point: no single tensor between input {index.input_name!r} and output "
            f"{index.final_output!r} carries everything the rest needs, so the model cannot be split; "
            "distree needs a model built from chained layers/blocks (e.g. a CNN, ResNet or transformer)"
        )
    order = index.backbone_order
    blocks = []
    for k in range(len(cuts) - 1):
        (start, p0), (end, p1) = cuts[k], cuts[k + 1]
        blocks.append(_block(index, k, start, end, order[p0 + 1 : p1 + 1]))
    inp = _info(index, index.input_name)
    return Chain(
        model_sha256=model_sha256(model),
        input_name=index.input_name,
        input_shape=inp.shape,
        input_dtype=inp.dtype,
        output_name=index.final_output,
        exit_outputs=index.extra_outputs,
        blocks=tuple(blocks),
    )


def _info(index: GraphIndex, tensor: str) -> TensorInfo:
    info = index.infos.get(tensor)
    if info is None:
        raise DistreeError(
            f"tensor {tensor!r} has no static shape; load the model with distree.graph.load_model "
            "(and --input-shape for symbolic dims) before building the chain"
        )
    return info


def _block(index: GraphIndex, k: int, start: str, end: str, nodes: list[onnx.NodeProto]) -> Block:
    out = _info(index, end)
    read = {t for n in nodes for t in index.inputs[n.name]}
    return Block(
        index=k,
        nodes=tuple(n.name for n in nodes),
        ops=tuple(n.op_type for n in nodes),
        input=start,
        output=end,
        output_shape=out.shape,
        output_dtype=out.dtype,
        flops=sum(node_flops(n, index.infos) for n in nodes),
        param_bytes=index.constant_bytes(read),
        out_bytes=out.nbytes,
        workspace_bytes=_peak_live_bytes(index, start, end, nodes),
    )


def _peak_live_bytes(index: GraphIndex, start: str, end: str, nodes: list[onnx.NodeProto]) -> int:
    """Peak bytes of live activations while running ``nodes`` in order (input and output included)."""
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in index.live_inputs(n):
            last_use[t] = i
    size = {t: index.infos[t].nbytes if t in index.infos else 0 for t in (start, *last_use, end)}
    live = {start: size[start]}
    peak = sum(live.values())
    for i, n in enumerate(nodes):
        for o in n.output:
            if o and (o in last_use or o == end):
                live[o] = index.infos[o].nbytes if o in index.infos else 0
        peak = max(peak, sum(live.values()))
        for t in index.live_inputs(n):
            if last_use[t] == i and t != end:
                live.pop(t, None)
    return peak


@dataclass(frozen=True)
class ExitHead:
    """A model-declared exit: the non-backbone nodes computing extra output ``name`` and where it attaches.

    ``after_block`` is the last block whose tensors the head reads (-1 if it reads only the graph input); a
    head reading a tensor strictly inside block b attaches after b, where that tensor is still available.
    """

    name: str
    after_block: int
    nodes: tuple[str, ...]
    flops: int
    param_bytes: int


def exit_heads(model: onnx.ModelProto, chain: Chain) -> dict[str, ExitHead]:
    """The head of every extra graph output of ``model`` (those not part of the chain's backbone)."""
    index = GraphIndex(model, chain.output_name)
    block_of = {name: b.index for b in chain.blocks for name in b.nodes}
    heads = {}
    for name in index.extra_outputs:
        head, reads = _head_nodes(index, name)
        attach = max((block_of[r] for r in reads), default=-1)
        nodes = [index.by_name[h] for h in head]
        read = {t for n in nodes for t in index.inputs[n.name]}
        heads[name] = ExitHead(
            name=name,
            after_block=attach,
            nodes=head,
            flops=sum(node_flops(n, index.infos) for n in nodes),
            param_bytes=index.constant_bytes(read),
        )
    return heads


def exit_attachments(model: onnx.ModelProto, chain: Chain) -> dict[str, int]:
    """``{extra output name: block index it attaches after}`` (see :class:`ExitHead`)."""
    return {name: head.after_block for name, head in exit_heads(model, chain).items()}


def _head_nodes(index: GraphIndex, output: str) -> tuple[tuple[str, ...], set[str]]:
    """Non-backbone, non-constant nodes computing ``output``, and the backbone nodes they read from."""
    head, reads = index.walk_back(output, stop=index.backbone)
    return tuple(n.name for n in index.nodes if n.name in head), reads
