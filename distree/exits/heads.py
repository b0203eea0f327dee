"""Train light exit heads on the frozen backbone and attach them to the ONNX graph.

A head is global average pooling + a linear layer (multinomial logistic regression with L2), fit with
scipy's L-BFGS on features that onnxruntime extracts from the fit split. Features are standardised for
the fit and the standardisation is folded into the Gemm weights, so the attached head is just
``GlobalAveragePool -> Flatten -> Gemm``. Heads only add nodes: every original tensor, and so the final
output, is computed exactly as before.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from distree.errors import DistreeError
from distree.exits.data import Dataset, check_dataset, check_fit_classes, split_fit_threshold
from distree.exits.progress import progress_bar
from distree.exits.runner import make_runner, tensor_elem_types, tensor_shapes
from distree.exits.scores import softmax
from distree.exits.types import ExitPoint
from distree.graph.chain import Chain

NODE_PREFIX = "distree_head_"       # every node / initializer distree adds starts with this
METADATA_KEY = "distree.exits"      # model metadata: JSON list of the ExitPoints attached
L2 = 1e-3                           # ridge strength on standardised features (per sample, mean CE)
MAX_ITER = 500


@dataclass(frozen=True)
class LinearHead:
    """logits = pool(tensor) @ weight.T + bias, with the standardisation already folded in."""

    output: str
    tensor: str
    weight: np.ndarray      # (K, C) float32
    bias: np.ndarray        # (K,) float32
    pooled: bool            # True: (N, C, H, W) input, global average pooled first
    fit_accuracy: float
    spatial: int            # H*W of the input (1 when not pooled), for flops

    @property
    def flops(self) -> int:
        k, c = self.weight.shape
        return c * self.spatial + 2 * c * k

    @property
    def param_bytes(self) -> int:
        return 4 * (self.weight.size + self.bias.size)

    @property
    def node_names(self) -> tuple[str, ...]:
        base = NODE_PREFIX + self.output
        return (base + "_gap", base + "_flatten", base + "_gemm") if self.pooled else (base + "_gemm",)


def num_classes(model: onnx.ModelProto, chain: Chain) -> int:
    """Classes of the final classifier: the last dim of its output."""
    shape = tensor_shapes(model).get(chain.output_name, ())
    if not shape or not isinstance(shape[-1], int) or shape[-1] < 2:
        raise DistreeError(f"final output {chain.output_name!r} has shape {shape}; distree needs (N, K) "
                           "class logits with K >= 2 and a static K")
    return int(shape[-1])


def head_supported(model: onnx.ModelProto, tensor: str) -> bool:
    """Pool + linear heads read float (N, C, H, W) or (N, C) tensors."""
    shape = tensor_shapes(model).get(tensor)
    return (shape is not None and len(shape) in (2, 4) and all(isinstance(d, int) and d > 0 for d in shape[1:])
            and tensor_elem_types(model).get(tensor) == onnx.TensorProto.FLOAT)


def candidate_blocks(model: onnx.ModelProto, chain: Chain) -> tuple[int, ...]:
    """Blocks after which a head can be trained: every block but the last whose output a head can read."""
    return tuple(b.index for b in chain.blocks[:-1] if head_supported(model, b.output))


def _pooled_features(model: onnx.ModelProto, data: Dataset, tensors: Sequence[str],
                     input_name: str) -> dict[str, np.ndarray]:
    """(N, C) float64 features per tensor: spatial mean for 4-D tensors, the tensor itself for 2-D ones."""
    def pool(v: np.ndarray) -> np.ndarray:
        return v.reshape(v.shape[0], v.shape[1], -1).mean(axis=2, dtype=np.float64)

    feats = {t: pool(data.x) for t in tensors if t == input_name}
    inner = [t for t in tensors if t != input_name]
    if not inner:
        return feats
    runner = make_runner(model, inner, data.x[:2])
    chunks: dict[str, list[np.ndarray]] = {t: [] for t in inner}

    def consume(_start: int, out: dict[str, np.ndarray]) -> None:
        for t in inner:
            chunks[t].append(pool(out[t]))

    with progress_bar(f"extracting features at {len(inner)} cut(s), batch {runner.batch_size}",
                      len(data)) as advance:
        runner.over(data.x, consume, advance)
    feats.update({t: np.concatenate(c) for t, c in chunks.items()})
    return feats


def fit_linear_head(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Multinomial logistic regression with L2; returns (weight (K, C), bias (K,), fit accuracy).

    Convex, started at zero: deterministic without a seed. Weights are returned in the units of the raw
    (unstandardised) features.
    """
    n, c = features.shape
    mu = features.mean(axis=0)
    sd = features.std(axis=0)
    sd = np.where(sd < 1e-8, 1.0, sd)
    z = (features - mu) / sd
    onehot = np.eye(k)[labels]

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: c * k].reshape(c, k)
        b = theta[c * k:]
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        logsum = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        logp = logits - logsum
        loss = -(onehot * logp).sum() / n + 0.5 * L2 * (w * w).sum()
        d = (np.exp(logp) - onehot) / n
        grad_w = z.T @ d + L2 * w
        return loss, np.concatenate([grad_w.ravel(), d.sum(axis=0)])

    # One BLAS thread: these fits are tiny, and OpenBLAS threads on a busy 2-core machine cost ~6x.
    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(loss_grad, np.zeros(c * k + k), jac=True, method="L-BFGS-B",
                       options={"maxiter": MAX_ITER})
    w = res.x[: c * k].reshape(c, k)
    b = res.x[c * k:]
    accuracy = float((softmax(z @ w + b).argmax(axis=1) == labels).mean())
    weight = (w / sd[:, None]).T                    # (K, C) in raw feature units
    bias = b - (mu / sd) @ w
    return weight.astype(np.float32), bias.astype(np.float32), accuracy


def _head_nodes(head: LinearHead) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    base = NODE_PREFIX + head.output
    w_name, b_name = base + "_weight", base + "_bias"
    inits = [numpy_helper.from_array(head.weight, w_name), numpy_helper.from_array(head.bias, b_name)]
    gemm_in = head.tensor
    nodes = []
    if head.pooled:
        nodes += [helper.make_node("GlobalAveragePool", [head.tensor], [base + "_pooled"], name=base + "_gap"),
                  helper.make_node("Flatten", [base + "_pooled"], [base + "_flat"], name=base + "_flatten", axis=1)]
        gemm_in = base + "_flat"
    nodes.append(helper.make_node("Gemm", [gemm_in, w_name, b_name], [head.output], name=base + "_gemm",
                                  transB=1))
    return nodes, inits


def attach_heads(model: onnx.ModelProto, heads: Sequence[LinearHead], exits: Sequence[ExitPoint]) -> onnx.ModelProto:
    """A copy of ``model`` with ``heads`` as extra outputs and ``exits`` recorded in its metadata."""
    m = copy.deepcopy(model)
    g = m.graph
    taken = ({n.name for n in g.node} | {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
             | {i.name for i in g.input} | {o.name for o in g.output})
    batch_dim = g.input[0].type.tensor_type.shape.dim[0]
    for head in heads:
        nodes, inits = _head_nodes(head)
        new_names = {n.name for n in nodes} | {o for n in nodes for o in n.output} | {i.name for i in inits}
        clash = sorted(new_names & taken)
        if clash:
            raise DistreeError(f"the model already has {clash[0]!r}; train exits on the original model "
                               "(without distree heads), or name existing exits with --exit-outputs")
        taken |= new_names
        g.node.extend(nodes)
        g.initializer.extend(inits)
        out = helper.make_tensor_value_info(head.output, onnx.TensorProto.FLOAT, [1, head.weight.shape[0]])
        out.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
        g.output.append(out)
    set_exit_metadata(m, exits)
    onnx.checker.check_model(m)
    return m


def set_exit_metadata(model: onnx.ModelProto, exits: Sequence[ExitPoint]) -> None:
    """Record ``exits`` in the model's metadata so a later ``declared_exits`` recovers them exactly."""
    for i, prop in reversed(list(enumerate(model.metadata_props))):
        if prop.key == METADATA_KEY:
            del model.metadata_props[i]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps([e.to_dict() for e in exits]))


def exit_metadata(model: onnx.ModelProto) -> tuple[ExitPoint, ...] | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return tuple(ExitPoint.from_dict(d) for d in json.loads(prop.value))
            except (ValueError, TypeError, KeyError) as exc:
                raise DistreeError(f"model metadata {METADATA_KEY!r} is corrupt ({exc}); "
                                   "re-run `distree exits` on the original model") from exc
    return None


def fit_heads(model: onnx.ModelProto, chain: Chain, data: Dataset, wanted: dict[str, str]) -> dict[str, LinearHead]:
    """Fit one head per tensor in ``wanted`` (tensor -> output name) on ``data`` (the fit split)."""
    k = num_classes(model, chain)
    check_fit_classes(data.y, k)
    shapes = tensor_shapes(model)
    feats = _pooled_features(model, data, list(wanted), chain.input_name)
    heads = {}
    with progress_bar(f"fitting {len(wanted)} linear head(s)", len(wanted)) as advance:
        for tensor, output in wanted.items():
            weight, bias, acc = fit_linear_head(feats[tensor], data.y, k)
            shape = shapes[tensor]
            spatial = int(np.prod(shape[2:])) if len(shape) == 4 else 1
            heads[tensor] = LinearHead(output, tensor, weight, bias, len(shape) == 4, acc, spatial)
            advance(1)
    return heads


def train_exits(model: onnx.ModelProto, chain: Chain, data: Dataset, at: Sequence[int] | None = None,
                seed: int = 0, fit_fraction: float = 0.5,
                declared: Sequence[ExitPoint] = ()) -> tuple[onnx.ModelProto, tuple[ExitPoint, ...]]:
    """Attach trained exits after blocks ``at`` (default: every candidate) plus an entry head per exit.

    With ``declared`` exits (already in the model) and ``at`` None, only the entry heads that the
    stability score needs are trained. Heads are fit on the fit split of ``data`` (see
    :func:`~distree.exits.data.split_fit_threshold`); the rest is left for thresholds.
    """
    check_dataset(data, "calibration data", chain.input_shape, num_classes(model, chain))
    blocks = _check_blocks(model, chain, at, declared)
    fit_idx, _ = split_fit_threshold(data, fit_fraction, seed)
    wanted: dict[str, str] = {chain.blocks[b].output: f"exit_b{b}" for b in blocks}
    entry_tensor = {e.after_block: chain.blocks[e.after_block].input for e in declared}
    entry_tensor |= {b: chain.blocks[b].input for b in blocks}
    for b, tensor in sorted(entry_tensor.items()):
        if head_supported(model, tensor):
            wanted.setdefault(tensor, f"entry_b{b}")
    heads = fit_heads(model, chain, data.subset(fit_idx), wanted)

    def entry_fields(after_block: int) -> dict:
        head = heads.get(entry_tensor[after_block])
        if head is None:
            return {}
        return {"entry_output": head.output, "entry_nodes": head.node_names, "entry_flops": head.flops,
                "entry_param_bytes": head.param_bytes}

    trained = [ExitPoint(name=heads[chain.blocks[b].output].output, after_block=b, source="trained",
                         head_nodes=heads[chain.blocks[b].output].node_names,
                         flops=heads[chain.blocks[b].output].flops,
                         param_bytes=heads[chain.blocks[b].output].param_bytes,
                         fit_accuracy=heads[chain.blocks[b].output].fit_accuracy, **entry_fields(b))
               for b in blocks]
    kept = [ExitPoint(**{**_fields(e), **entry_fields(e.after_block)}) for e in declared]
    exits = tuple(sorted([*kept, *trained], key=lambda e: (e.after_block, e.name)))
    return attach_heads(model, list(heads.values()), exits), exits


def _fields(e: ExitPoint) -> dict:
    return {f: getattr(e, f) for f in e.__dataclass_fields__}


def _check_blocks(model: onnx.ModelProto, chain: Chain, at: Sequence[int] | None,
                  declared: Sequence[ExitPoint]) -> tuple[int, ...]:
    candidates = candidate_blocks(model, chain)
    if at is None:
        return () if declared else candidates
    last = len(chain.blocks) - 1
    for b in at:
        if not 0 <= b < last:
            raise DistreeError(f"--at {b}: the model has blocks 0..{last} and an exit after the last block is the "
                               f"final classifier; pick blocks in 0..{last - 1} (see `distree inspect`)")
        if b not in candidates:
            raise DistreeError(f"--at {b}: block {b}'s output {chain.blocks[b].output!r} is not a float (N,C,H,W) "
                               f"or (N,C) tensor a pooled linear head can read; pick from {list(candidates)}")
    taken = {e.after_block for e in declared}
    dup = sorted(set(at) & taken)
    if dup:
        raise DistreeError(f"--at {dup[0]}: the model already has an exit after block {dup[0]}; drop it from --at")
    return tuple(sorted(set(at)))
