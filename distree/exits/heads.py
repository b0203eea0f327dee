"""Train light exit heads on the frozen backbone and attach them to the ONNX graph.

A head is global average pooling + a linear layer (multinomial logistic regression with L2), fit with
scipy's L-BFGS on features that onnxruntime extracts from the fit split; on wide maps (at least 8 x 8) it
is average pooling to a 4 x 4 grid + a 1x1 conv to at most 16 channels (the cells' principal axes) + a
linear layer, so an early exit still sees where things are. Features are standardised for the fit and the
standardisation is folded into the Gemm weights, so the attached head is just
``GlobalAveragePool -> Flatten -> Gemm`` (or ``AveragePool -> Conv 1x1 -> Flatten -> Gemm``). Heads only
add nodes: every original tensor, and so the final output, is computed exactly as before. A head on a quantized
(uint8 / int8) tensor of an int8 model starts with a ``DequantizeLinear`` (:mod:`distree.exits.quantized`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from distree.errors import DistreeError
from distree.exits.data import Dataset, check_dataset, check_fit_classes, split_fit_threshold
from distree.exits.progress import progress_bar
from distree.exits.quantized import QUANTIZED_TYPES, Quantization, only_dequantized, quantization_of
from distree.exits.runner import make_runner, tensor_elem_types, tensor_shapes
from distree.exits.types import HEAD_KINDS, ExitPoint
from distree.graph.chain import Chain

NODE_PREFIX = "distree_head_"       # every node / initializer distree adds starts with this
METADATA_KEY = "distree.exits"      # model metadata: JSON list of the ExitPoints attached
SPLIT_METADATA_KEY = "distree.exits.fit_split"   # model metadata: the FitSplit the heads were fit on
GRID = 4                            # conv heads pool wide maps to a GRID x GRID grid ...
REDUCED_CHANNELS = 16               # ... and reduce them to at most this many channels with a 1x1 conv
WIDE = 8                            # maps at least WIDE x WIDE are wide: ``auto`` gives them conv heads
L2_PATH = (1e-1, 1e-2, 1e-3, 1e-4)  # ridge strengths tried on standardised features (mean CE + l2/2 |W|^2)
HOLDOUT_EVERY = 5                   # every 5th fit sample picks the strength
MAX_ITER = 500
NOISE_SPREAD = 1e-6                 # features whose spread is below this share of the widest one's are constant


@dataclass(frozen=True)
class Pooling:
    """How a head reduces its input before the linear layer.

    ``grid == 0``: global average pool (or nothing for an (N, C) input). ``grid == g``: average pool with
    a (H // g, W // g) window (at least 1) and the same stride, which gives about a g x g grid of cells
    (the last rows/columns that do not fill a window are dropped), then a 1x1 conv to ``reduced``
    channels; for wide maps, where a global mean would throw away where things are.
    An (N, A, B) input is a transformer's tokens (N, L, D) or a 1-D map (N, C, L), and nothing in the graph
    says which: the head reads both means, over B then over A (A + B features). On a 4-layer ViT the mean over
    tokens alone reaches 0.79-0.83 after each layer, the mean over the last axis alone 0.54-0.64.
    """

    shape: tuple[int, ...]      # (C, H, W), (A, B) or (C,)
    grid: int = 0
    reduced: int = 0

    @property
    def window(self) -> tuple[int, int]:
        return max(1, self.shape[1] // self.grid), max(1, self.shape[2] // self.grid)

    @property
    def cells(self) -> tuple[int, int]:
        (kh, kw) = self.window
        return self.shape[1] // kh, self.shape[2] // kw

    def apply(self, v: np.ndarray) -> np.ndarray:
        """(N, C) global means, (N, C, g, g) grid means, (N, A + B) means of an (N, A, B) input, or ``v`` itself
        for (N, C); float64."""
        if len(self.shape) == 1:
            return v.astype(np.float64)
        if len(self.shape) == 2:
            return np.concatenate([v.mean(axis=2, dtype=np.float64), v.mean(axis=1, dtype=np.float64)], axis=1)
        if not self.grid:
            return v.reshape(v.shape[0], v.shape[1], -1).mean(axis=2, dtype=np.float64)
        (kh, kw), (gh, gw) = self.window, self.cells
        cells = v[:, :, :gh * kh, :gw * kw].reshape(v.shape[0], v.shape[1], gh, kh, gw, kw)
        return cells.mean(axis=(3, 5), dtype=np.float64)


def choose_pooling(shape: tuple[int, ...], head: str) -> Pooling:
    """``linear``: global pool; ``conv``: grid pool + 1x1 conv; ``auto``: conv for wide maps only."""
    if head not in HEAD_KINDS:
        raise DistreeError(f"--head {head!r}: use one of {', '.join(HEAD_KINDS)}")
    wide = len(shape) == 3 and min(shape[1:]) >= WIDE
    if head == "conv" and len(shape) == 3 and min(shape[1:]) >= GRID or head == "auto" and wide:
        return Pooling(shape, GRID, min(shape[0], REDUCED_CHANNELS))
    return Pooling(shape)


@dataclass(frozen=True)
class LinearHead:
    """logits = linear(reduce(pool(tensor))), with the standardisation folded into ``weight``/``bias``."""

    output: str
    tensor: str
    pooling: Pooling
    weight: np.ndarray                  # (K, F) float32
    bias: np.ndarray                    # (K,) float32
    fit_accuracy: float
    reduce_weight: np.ndarray | None = None     # (C', C) 1x1 conv of grid heads (PCA of the pooled cells)
    reduce_bias: np.ndarray | None = None       # (C',)
    quantization: Quantization | None = None    # of ``tensor``, when it is quantized

    @property
    def flops(self) -> int:
        k, f = self.weight.shape
        shape, pool = self.pooling.shape, int(np.prod(self.pooling.shape))
        conv = 0 if self.reduce_weight is None else 2 * self.reduce_weight.size * int(np.prod(self.pooling.cells))
        dequantize = 0 if self.quantization is None else 2 * pool
        return dequantize + {3: pool, 2: 2 * pool}.get(len(shape), 0) + conv + 2 * f * k

    @property
    def param_bytes(self) -> int:
        extra = 0 if self.reduce_weight is None else self.reduce_weight.size + self.reduce_bias.size
        return 4 * (self.weight.size + self.bias.size + extra)

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in _head_nodes(self)[0])


def num_classes(model: onnx.ModelProto, chain: Chain) -> int:
    """Classes of the final classifier: the last dim of its output."""
    shape = tensor_shapes(model).get(chain.output_name, ())
    if len(shape) != 2 or not isinstance(shape[-1], int) or shape[-1] < 2:
        squeeze = (" (end the model with a Flatten, in torch x.flatten(1), and export again)"
                   if len(shape) > 2 and all(d == 1 for d in shape[2:]) else "")
        raise DistreeError(f"final output {chain.output_name!r} has shape {shape}; distree needs (N, K) "
                           f"class logits with K >= 2 and a static K{squeeze}")
    return int(shape[-1])


def why_no_head(model: onnx.ModelProto, tensor: str) -> str | None:
    """Why a pool + linear head cannot read ``tensor`` (None: it can). Heads read (N, C, H, W), (N, A, B) or
    (N, C) tensors whose first axis is the batch: its size is the input's (1 once loaded). A time-major (L, N, D)
    sequence, such as a GRU's input, is not (its head would answer L rows per sample). The tensor is float, or
    quantized with a known scale and zero point and read by more than DequantizeLinear ops (whose outputs have
    heads of their own)."""
    shapes = tensor_shapes(model)
    shape = shapes.get(tensor)
    batch = shapes.get(model.graph.input[0].name, (None,))[0]
    elem_type = tensor_elem_types(model).get(tensor)
    if not (shape is not None and len(shape) in (2, 3, 4) and shape[0] == batch
            and all(isinstance(d, int) and d > 0 for d in shape[1:])):
        return (f"is not a static (N,C,H,W), (N,A,B) or (N,C) tensor with the batch first (shape "
                f"{'unknown' if shape is None else shape})")
    if elem_type == onnx.TensorProto.FLOAT:
        return None
    if elem_type not in QUANTIZED_TYPES or quantization_of(model, tensor) is None:
        return ("is neither float nor quantized with a per-tensor scale and zero point that the op writing it "
                "holds as constants")
    if only_dequantized(model, tensor):
        return "is read only by DequantizeLinear, whose float output holds the same values (a head belongs there)"
    return None


def head_supported(model: onnx.ModelProto, tensor: str) -> bool:
    return why_no_head(model, tensor) is None


def headless_notes(model: onnx.ModelProto, chain: Chain) -> list[str]:
    """One line per block (but the last) whose output no head can read, saying why: training at every candidate
    leaves them out."""
    reasons = ((b, why_no_head(model, b.output)) for b in chain.blocks[:-1])
    return [f"no exit after block {b.index}: its output {b.output!r} {reason}" for b, reason in reasons if reason]


def candidate_blocks(model: onnx.ModelProto, chain: Chain) -> tuple[int, ...]:
    """Blocks after which a head can be trained: every block but the last whose output a head can read."""
    return tuple(b.index for b in chain.blocks[:-1] if head_supported(model, b.output))


def _pooled_features(model: onnx.ModelProto, data: Dataset, pooling: dict[str, Pooling],
                     quantized: dict[str, Quantization | None], input_name: str) -> dict[str, np.ndarray]:
    """Pooled float64 features of every tensor in ``pooling``, from one batched pass over ``data``; a quantized
    tensor's are dequantized (after pooling: the means of an affine map are the map of the means)."""

    def features(t: str, v: np.ndarray) -> np.ndarray:
        pooled = pooling[t].apply(v)
        return pooled if quantized[t] is None else quantized[t].dequantize(pooled)

    feats = {t: features(t, data.x) for t in pooling if t == input_name}
    inner = [t for t in pooling if t != input_name]
    if not inner:
        return feats
    runner = make_runner(model, inner, data.x[:2])
    chunks: dict[str, list[np.ndarray]] = {t: [] for t in inner}

    def consume(_start: int, out: dict[str, np.ndarray]) -> None:
        for t in inner:
            chunks[t].append(features(t, out[t]))

    with progress_bar(f"extracting features at {len(inner)} cut(s), batch {runner.batch_size}",
                      len(data)) as advance:
        runner.over(data.x, consume, advance)
    feats.update({t: np.concatenate(c) for t, c in chunks.items()})
    return feats


def channel_reduction(cells: np.ndarray, reduced: int) -> tuple[np.ndarray, np.ndarray]:
    """1x1 conv (weight (C', C), bias (C',)) projecting grid cells (N, C, g, g) on their top principal axes."""
    vectors = cells.transpose(0, 2, 3, 1).reshape(-1, cells.shape[1])
    mean = vectors.mean(axis=0)
    _, eigvec = np.linalg.eigh(np.atleast_2d(np.cov(vectors - mean, rowvar=False)))
    weight = eigvec[:, ::-1][:, :reduced].T              # largest variance first
    return weight, -weight @ mean


def _fit_softmax_regression(z: np.ndarray, labels: np.ndarray, k: int, l2: float, start: np.ndarray) -> np.ndarray:
    """Minimise mean cross-entropy + l2/2 |W|^2 (bias free) from ``start``; theta = [W (C*K), b (K)]."""
    n, c = z.shape
    onehot = np.eye(k)[labels]

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: c * k].reshape(c, k)
        logits = z @ w + theta[c * k:]
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        d = (np.exp(logp) - onehot) / n
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * (w * w).sum()
        return loss, np.concatenate([(z.T @ d + l2 * w).ravel(), d.sum(axis=0)])

    from scipy.optimize import minimize     # the build machine's package: fitting heads is its job, reading a
                                            # model's exits is a device's too

    return minimize(loss_grad, start, jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITER}).x


def _accuracy(z: np.ndarray, labels: np.ndarray, theta: np.ndarray, k: int) -> float:
    c = z.shape[1]
    return float(((z @ theta[: c * k].reshape(c, k) + theta[c * k:]).argmax(axis=1) == labels).mean())


def fit_linear_head(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Multinomial logistic regression; returns (weight (K, C), bias (K,), held-out accuracy).

    The L2 strength is picked from ``L2_PATH`` (strongest first, warm-started) by accuracy on every
    fifth sample, then the head is refit on all of them. Convex and started at zero, so deterministic
    without a seed. Weights are returned in the units of the raw (unstandardised) features.
    """
    n, c = features.shape
    mu = features.mean(axis=0)
    sd = features.std(axis=0)
    # A feature that varies only by rounding (a LayerNorm output's mean over its normalised axis: ~1e-8) is a
    # constant: scaled to unit variance its noise got weights of ~1e8, and logits that changed with the order
    # ONNX Runtime summed in. Spreads are compared with the widest feature's.
    sd = np.where(sd <= NOISE_SPREAD * sd.max(initial=0.0), 1.0, sd)
    z = (features - mu) / sd
    held = np.arange(n) % HOLDOUT_EVERY == 0
    theta = np.zeros(c * k + k)
    best = (-1.0, L2_PATH[0], theta)
    for l2 in L2_PATH:
        theta = _fit_softmax_regression(z[~held], labels[~held], k, l2, theta)
        accuracy = _accuracy(z[held], labels[held], theta, k)
        if accuracy > best[0]:
            best = (accuracy, l2, theta)
    accuracy, l2, theta = best
    theta = _fit_softmax_regression(z, labels, k, l2, theta)
    w, b = theta[: c * k].reshape(c, k), theta[c * k:]
    weight = (w / sd[:, None]).T                    # (K, C) in raw feature units
    bias = b - (mu / sd) @ w
    return weight.astype(np.float32), bias.astype(np.float32), accuracy


def _head_nodes(head: LinearHead) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    base = NODE_PREFIX + head.output
    inits = [numpy_helper.from_array(head.weight, base + "_weight"), numpy_helper.from_array(head.bias, base + "_bias")]
    nodes = []
    x = head.tensor
    if head.quantization is not None:
        q = head.quantization
        inits += [numpy_helper.from_array(np.array(q.scale, np.float32), base + "_scale"),
                  numpy_helper.from_array(np.array(q.zero_point, onnx.helper.tensor_dtype_to_np_dtype(q.elem_type)),
                                          base + "_zero_point")]
        nodes.append(helper.make_node("DequantizeLinear", [x, base + "_scale", base + "_zero_point"],
                                      [base + "_dequantized"], name=base + "_dequantize"))
        x = base + "_dequantized"
    if head.pooling.grid:
        kernel = list(head.pooling.window)
        nodes.append(helper.make_node("AveragePool", [x], [base + "_pooled"], name=base + "_pool",
                                      kernel_shape=kernel, strides=kernel))
        c_out, c_in = head.reduce_weight.shape
        inits += [numpy_helper.from_array(head.reduce_weight.reshape(c_out, c_in, 1, 1).astype(np.float32),
                                          base + "_reduce_weight"),
                  numpy_helper.from_array(head.reduce_bias.astype(np.float32), base + "_reduce_bias")]
        nodes.append(helper.make_node("Conv", [base + "_pooled", base + "_reduce_weight", base + "_reduce_bias"],
                                      [base + "_reduced"], name=base + "_reduce", kernel_shape=[1, 1]))
        x = base + "_reduced"
    elif len(head.pooling.shape) == 3:
        nodes.append(helper.make_node("GlobalAveragePool", [x], [base + "_pooled"], name=base + "_gap"))
        x = base + "_pooled"
    elif len(head.pooling.shape) == 2:        # (N, A, B): the mean over B, then the one over A (via a transpose)
        nodes += [helper.make_node("GlobalAveragePool", [x], [base + "_mean_b"], name=base + "_gap_b"),
                  helper.make_node("Flatten", [base + "_mean_b"], [base + "_flat_b"], name=base + "_flatten_b"),
                  helper.make_node("Transpose", [x], [base + "_t"], name=base + "_transpose", perm=[0, 2, 1]),
                  helper.make_node("GlobalAveragePool", [base + "_t"], [base + "_mean_a"], name=base + "_gap_a"),
                  helper.make_node("Flatten", [base + "_mean_a"], [base + "_flat_a"], name=base + "_flatten_a"),
                  helper.make_node("Concat", [base + "_flat_b", base + "_flat_a"], [base + "_means"],
                                   name=base + "_concat", axis=1)]
        x = base + "_means"
    if len(head.pooling.shape) == 3:
        nodes.append(helper.make_node("Flatten", [x], [base + "_flat"], name=base + "_flatten", axis=1))
        x = base + "_flat"
    nodes.append(helper.make_node("Gemm", [x, base + "_weight", base + "_bias"], [head.output], name=base + "_gemm",
                                  transB=1))
    return nodes, inits


def attach_heads(model: onnx.ModelProto, heads: Sequence[LinearHead], exits: Sequence[ExitPoint]) -> onnx.ModelProto:
    """A copy of ``model`` with ``heads`` as extra outputs and ``exits`` recorded in its metadata."""
    m = copy.deepcopy(model)
    g = m.graph
    taken = ({n.name for n in g.node} | {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
             | {i.name for i in g.input} | {o.name for o in g.output})
    batch_dim = g.input[0].type.tensor_type.shape.dim[0]
    known = taken - {n.name for n in g.node}
    for head in heads:
        if head.tensor not in known:
            raise DistreeError(f"tensor {head.tensor!r} that a head reads is not in the model to attach to; "
                               "attach to the model the heads were trained on")
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


def _set_metadata(model: onnx.ModelProto, key: str, value: object) -> None:
    for i, prop in reversed(list(enumerate(model.metadata_props))):
        if prop.key == key:
            del model.metadata_props[i]
    model.metadata_props.add(key=key, value=json.dumps(value))


def _metadata(model: onnx.ModelProto, key: str) -> object | None:
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                return json.loads(prop.value)
            except ValueError as exc:
                raise DistreeError(f"model metadata {key!r} is corrupt ({exc}); "
                                   "re-run `distree exits` on the original model") from exc
    return None


def set_exit_metadata(model: onnx.ModelProto, exits: Sequence[ExitPoint]) -> None:
    """Record ``exits`` in the model's metadata so a later ``declared_exits`` recovers them exactly."""
    _set_metadata(model, METADATA_KEY, [e.to_dict() for e in exits])


def exit_metadata(model: onnx.ModelProto) -> tuple[ExitPoint, ...] | None:
    doc = _metadata(model, METADATA_KEY)
    try:
        return None if doc is None else tuple(ExitPoint.from_dict(d) for d in doc)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DistreeError(f"model metadata {METADATA_KEY!r} is corrupt ({exc}); "
                           "re-run `distree exits` on the original model") from exc


@dataclass(frozen=True)
class FitSplit:
    """Which samples the heads were fit on: the seeded split of the data with this digest."""

    seed: int
    fit_fraction: float
    data_sha256: str


def data_digest(data: Dataset) -> str:
    return hashlib.sha256(np.ascontiguousarray(data.x).tobytes() + np.ascontiguousarray(data.y).tobytes()).hexdigest()


def fit_split_metadata(model: onnx.ModelProto) -> FitSplit | None:
    doc = _metadata(model, SPLIT_METADATA_KEY)
    return None if doc is None else FitSplit(int(doc["seed"]), float(doc["fit_fraction"]), str(doc["data_sha256"]))


def fit_heads(model: onnx.ModelProto, chain: Chain, data: Dataset, wanted: dict[str, str],
              head: str = "auto") -> dict[str, LinearHead]:
    """Fit one head per tensor in ``wanted`` (tensor -> output name) on ``data`` (the fit split)."""
    k = num_classes(model, chain)
    check_fit_classes(data.y, k)
    shapes = tensor_shapes(model)
    pooling = {t: choose_pooling(tuple(shapes[t][1:]), head) for t in wanted}
    types = tensor_elem_types(model)
    quantized = {t: quantization_of(model, t) if types.get(t) in QUANTIZED_TYPES else None for t in wanted}
    feats = _pooled_features(model, data, pooling, quantized, chain.input_name)

    def fit(tensor: str, output: str, f: np.ndarray) -> LinearHead:
        pool = pooling[tensor]
        reduce_w = reduce_b = None
        if pool.grid:
            reduce_w, reduce_b = channel_reduction(f, pool.reduced)
            f = np.einsum("dc,ncij->ndij", reduce_w, f) + reduce_b[None, :, None, None]
            reduce_w, reduce_b = reduce_w.astype(np.float32), reduce_b.astype(np.float32)
        weight, bias, acc = fit_linear_head(f.reshape(len(f), -1), data.y, k)
        advance(1)
        return LinearHead(output, tensor, pool, weight, bias, acc, reduce_w, reduce_b, quantized[tensor])

    from concurrent.futures import ThreadPoolExecutor

    import scipy.optimize  # noqa: F401 - loaded before the limit below, which reaches only BLAS libraries loaded
    from threadpoolctl import threadpool_limits

    # One head per core, one BLAS thread each: the fits are small (OpenBLAS threads on a busy 2-core machine
    # cost ~6x), and numpy releases the GIL in their matrix products. Each fit is deterministic on its own.
    workers = max(1, min(len(wanted), os.cpu_count() or 1))
    with progress_bar(f"fitting {len(wanted)} head(s)", len(wanted)) as advance, \
            threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as executor:
        futures = {tensor: executor.submit(fit, tensor, output, feats.pop(tensor))
                   for tensor, output in wanted.items()}
        return {tensor: future.result() for tensor, future in futures.items()}


def train_exits(model: onnx.ModelProto, chain: Chain, data: Dataset, at: Sequence[int] | None = None,
                seed: int = 0, fit_fraction: float = 0.5,
                declared: Sequence[ExitPoint] = (), head: str = "auto",
                attach_to: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, tuple[ExitPoint, ...]]:
    """Attach trained exits after blocks ``at`` (default: every candidate) plus an entry head per exit.

    With ``declared`` exits (already in the model) and ``at`` None, only the entry heads that the
    stability score needs are trained. ``head`` picks the head shape (:func:`choose_pooling`). Heads are
    attached to ``attach_to`` when given (the same model as read from its file, before ``load_model``
    fixed its batch size: the written model then runs at any batch, like the original), else to ``model``.
    Heads are fit on the fit split of ``data`` (see
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
    heads = fit_heads(model, chain, data.subset(fit_idx), wanted, head)

    def entry_fields(after_block: int) -> dict:
        entry = heads.get(entry_tensor[after_block])
        if entry is None:
            return {}
        return {"entry_output": entry.output, "entry_nodes": entry.node_names, "entry_flops": entry.flops,
                "entry_param_bytes": entry.param_bytes}

    def trained_exit(b: int) -> ExitPoint:
        h = heads[chain.blocks[b].output]
        return ExitPoint(name=h.output, after_block=b, source="trained", head_nodes=h.node_names, flops=h.flops,
                         param_bytes=h.param_bytes, fit_accuracy=h.fit_accuracy, **entry_fields(b))

    trained = [trained_exit(b) for b in blocks]
    kept = [dataclasses.replace(e, **entry_fields(e.after_block)) for e in declared]
    exits = tuple(sorted([*kept, *trained], key=lambda e: (e.after_block, e.name)))
    attached = attach_heads(model if attach_to is None else attach_to, list(heads.values()), exits)
    _set_metadata(attached, SPLIT_METADATA_KEY, dataclasses.asdict(FitSplit(seed, fit_fraction, data_digest(data))))
    return attached, exits


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
            raise DistreeError(f"--at {b}: no head can read block {b}'s output {chain.blocks[b].output!r}: it "
                               f"{why_no_head(model, chain.blocks[b].output)}; pick from {list(candidates)}")
    taken = {e.after_block for e in declared}
    dup = sorted(set(at) & taken)
    if dup:
        raise DistreeError(f"--at {dup[0]}: the model already has an exit after block {dup[0]}; drop it from --at")
    return tuple(sorted(set(at)))
