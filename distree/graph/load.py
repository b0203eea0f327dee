"""Load an ONNX model into the one normal form every later stage works on.

``load_model`` validates the file, fixes the input's symbolic dimensions, and returns a *normalized* copy:

- model-local functions (an exporter's module boundaries) are inlined: their ops are costed, cut between and
  imported by TVM like any others (a call of one was costed as one elementwise op and TVM could not import it);
- every node has a unique, order-independent name (unnamed nodes get ``<op>:<first output>``);
- initializers listed as graph inputs (old exporters) are removed from the inputs: they are weights;
- nodes are listed in a canonical topological order (Kahn's algorithm, ties broken by node name), so two
  files that list the same graph in different valid orders load to the same proto and the same hash;
- all dimensions are fixed (batch defaults to 1: distree serves batch-1 streams) and shapes are inferred;
  ``Shape`` of a tensor whose shape is static is folded into an initializer, and so is every small node
  computed from constants alone (the ``Gather``/``Concat``/``Cast`` arithmetic exporters emit for
  reshapes, e.g. in attention), so shape arithmetic never keeps an early activation alive (it would hide
  cut points and tie segments to earlier tensors) and TVM's importer sees literal shapes;
- tensors whose shapes ONNX inference cannot find (ops from other domains, e.g. ``com.microsoft``) get the
  shapes onnxruntime produces on a zero input (wrong only for data-dependent shapes, which classifiers lack).

Shapes are therefore those of the deployment batch. To run segments batched (e.g. for calibration), load
the model with the batch you want, ``load_model(path, {"input": (256, 1, 28, 28)})``: node and tensor names
are the same for every batch, so a chain built at batch 1 indexes the batch-256 model's segments too.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from distree.errors import DistreeError

log = logging.getLogger("distree.graph")

_MAX_FOLD_ROUNDS = 16
_FOLD_MAX_ELEMENTS = 4096      # constant folding evaluates shape arithmetic and scalars, never weights


def load_model(
    path: str | os.PathLike, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> onnx.ModelProto:
    """Read, check and normalize an ONNX classifier (see module doc); DistreeError on any bad input."""
    p = Path(path)
    model = _read(p)
    _check(model, p)
    model = _inline_local_functions(model)
    model = _single_input_model(model, p)
    model = _fix_input_dims(model, dict(input_shapes or {}), p)
    model = normalize(model)
    return _fill_shapes_by_running(_infer_and_fold(model, p), p)


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Unique order-independent node names and a canonical topological order (a copy)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _name_nodes(out.graph)
    ordered = canonical_order(out.graph)
    nodes = [onnx.NodeProto() for _ in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def model_sha256(model_or_path: onnx.ModelProto | str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a proto's deterministic serialization (what ``Chain`` records)."""
    if isinstance(model_or_path, onnx.ModelProto):
        data = model_or_path.SerializeToString(deterministic=True)
    else:
        p = Path(model_or_path)
        if not p.is_file():
            raise DistreeError(f"{p}: no such file; check the path")
        data = p.read_bytes()
    return hashlib.sha256(data).hexdigest()


# --- node inputs, including names that control-flow subgraphs read from the outer scope -----------------


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: explicit inputs plus outer-scope names used inside its subgraphs."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for g in _subgraphs(attr):
            names.extend(n for n in _outer_names(g) if n not in names)
    return names


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: list[str] = []
    for node in graph.node:
        for name in node_inputs(node):
            if name not in defined and name not in used:
                used.append(name)
        defined.update(o for o in node.output if o)
    used.extend(o.name for o in graph.output if o.name not in defined and o.name not in used)
    return used


def canonical_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Topological order that depends only on the graph, not on how the file lists it (ties: node name)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    waiting = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        deps = {producer[t] for t in node_inputs(node) if t in producer}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [(n.name, i) for i, n in enumerate(graph.node) if waiting[i] == 0]
    heapq.heapify(ready)
    order: list[onnx.NodeProto] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(graph.node[i])
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (graph.node[u].name, u))
    if len(order) != len(graph.node):
        raise DistreeError("the graph has a cycle; re-export the model (ONNX graphs must be acyclic)")
    return order


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for node in graph.node:
        name = node.name or f"{node.op_type}:{node.output[0] if node.output else ''}"
        if name in seen:
            name = f"{name}:{node.output[0] if node.output else len(seen)}"
        while name in seen:
            name += "'"
        seen.add(name)
        node.name = name


# --- reading and validation -----------------------------------------------------------------------------


def _read(p: Path) -> onnx.ModelProto:
    if not p.exists():
        raise DistreeError(f"{p}: no such file; check the path")
    if not p.is_file():
        raise DistreeError(f"{p}: is not a file; pass the path of a .onnx model")
    data = p.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError (and sometimes RuntimeWarning-ish errors)
        raise DistreeError(
            f"{p}: not an ONNX model or a truncated/corrupt file ({type(exc).__name__}); "
            "re-export it (e.g. torch.onnx.export) or copy the file again"
        ) from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        raise DistreeError(
            f"{p}: not an ONNX model (no graph found in {len(data)} bytes); pass a .onnx file exported with "
            "e.g. torch.onnx.export"
        )
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise DistreeError(
                f"{p}: its external weight data cannot be read ({exc}); keep the data files next to the model"
            ) from None
    return model


def _check(model: onnx.ModelProto, p: Path) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = _first_line(exc)
        raise DistreeError(
            f"{p}: fails the ONNX checker ({first}); re-export the model, or repair it so "
            "`python -c \"import onnx; onnx.checker.check_model('{p.name}')\"` passes"
        ) from None


def _inline_local_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    if not model.functions:
        return model
    from onnx import inliner

    inlined = inliner.inline_local_functions(model)
    domains = {f.domain for f in model.functions}
    kept = [o for o in inlined.opset_import if o.domain not in domains]      # no node uses them any more
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    return inlined


def _first_line(exc: BaseException) -> str:
    """The first line of an ONNX error (they run to many lines), or its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _single_input_model(model: onnx.ModelProto, p: Path) -> onnx.ModelProto:
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise DistreeError(
            f"{p}: has {len(inputs)} graph inputs ({names}); distree needs exactly one input tensor: re-export "
            "the model with a single input (fold the others into constants)"
        )
    if not inputs[0].type.HasField("tensor_type"):
        raise DistreeError(f"{p}: input {inputs[0].name} is not a tensor; re-export with a tensor input")
    elem_type = inputs[0].type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        dtype = onnx.TensorProto.DataType.Name(elem_type).lower()
        raise DistreeError(
            f"{p}: input {inputs[0].name} is {dtype}; distree compiles float32 classifiers (its calibration data "
            "and stage inputs are float32): export the float32 model (in torch: model.float() before "
            "torch.onnx.export), or quantize it as QDQ around a float32 input"
        )
    if len(model.graph.input) == 1:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def parse_shape_option(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1,3,32,32`` -> ("name", (1, 3, 32, 32)); DistreeError on anything else."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        shape = ()
    if not sep or not name.strip() or not shape or any(d <= 0 for d in shape):
        raise DistreeError(
            f"--input-shape {text!r}: expected NAME=D1,D2,... with positive integers, e.g. input=1,3,32,32"
        )
    return name.strip(), shape


def _fix_input_dims(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], p: Path) -> onnx.ModelProto:
    """Replace the input's symbolic dims; batch (dim 0) defaults to 1, any other unknown dim is an error."""
    value = model.graph.input[0]
    unknown = [k for k in shapes if k != value.name]
    if unknown:
        raise DistreeError(
            f"--input-shape names {', '.join(unknown)}, but the model's input is {value.name!r}; "
            f"use --input-shape {value.name}=..."
        )
    given = shapes.get(value.name)
    if value.type.tensor_type.HasField("shape"):
        current = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                   for d in value.type.tensor_type.shape.dim]
    elif given is not None:
        current = [None] * len(given)
    else:
        raise DistreeError(
            f"{p}: input {value.name!r} has no shape (rank unknown); give it with --input-shape {value.name}=1,..."
        )
    if given is not None:
        if len(given) != len(current):
            raise DistreeError(
                f"--input-shape {value.name}: gives rank {len(given)}, but the model's input has rank "
                f"{len(current)} {_fmt(current)}; give {len(current)} dimensions"
            )
        clash = [i for i, (c, g) in enumerate(zip(current, given)) if c is not None and c != g]
        if clash:
            raise DistreeError(
                f"--input-shape {value.name}: dims {clash} differ from the model's fixed shape {_fmt(current)}; "
                "only symbolic dims can be set"
            )
        final = list(given)
    else:
        missing = [i for i, c in enumerate(current) if c is None and i != 0]
        if missing:
            raise DistreeError(
                f"{p}: input {value.name!r} has unknown dims {missing} in shape {_fmt(current)}; fix them with "
                f"--input-shape {value.name}={','.join(str(c or 1) if i == 0 else str(c or 'D') for i, c in enumerate(current))}"
            )
        if current and current[0] is None:
            log.warning(f"note: batch dimension of input {value.name!r} set to 1 (distree answers one sample per "
                        "request)")
        elif current and current[0] != 1:
            raise DistreeError(
                f"{p}: input {value.name!r} has a fixed batch of {current[0]} {_fmt(current)}; distree serves one "
                "sample per request: export the model with batch 1 or a dynamic batch (in torch: "
                f"dynamic_axes={{{value.name!r}: {{0: 'N'}}}})"
            )
        final = [c if c is not None else 1 for c in current]
    if final == current:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shape = out.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for d in final:
        shape.dim.add().dim_value = d
    # Symbolic dims on outputs / value_info would contradict the fixed input; inference recomputes them.
    del out.graph.value_info[:]
    for o in out.graph.output:
        if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape"):
            o.type.tensor_type.ClearField("shape")
    return out


def _fmt(dims: Iterable[int | None]) -> str:
    return "(" + ",".join("?" if d is None else str(d) for d in dims) + ")"


# --- shape inference and folding shape arithmetic -------------------------------------------------------


def _infer(model: onnx.ModelProto, p: Path) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        first = _first_line(exc)
        raise DistreeError(
            f"{p}: ONNX shape inference failed ({first}); check --input-shape, or re-export the model with "
            "static shapes"
        ) from None


def _infer_and_fold(model: onnx.ModelProto, p: Path) -> onnx.ModelProto:
    for _ in range(_MAX_FOLD_ROUNDS):
        model = _infer(model, p)
        folded = _fold_static_shapes(model)
        folded = _fold_constant_nodes(folded if folded is not None else model) or folded
        if folded is None:
            return model
        model = folded
    return _infer(model, p)


def static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The shape if every dim is a known positive int, else None."""
    tt = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
    return None if any(d < 0 for d in dims) else dims


def _fold_static_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Replace ``Shape`` nodes whose input shape is static by initializers; None if there was nothing to fold."""
    infos = {v.name: v for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    weights = {t.name for t in model.graph.initializer}
    foldable: dict[int, np.ndarray] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.input[0] in weights:
            continue
        info = infos.get(node.input[0])
        shape = static_shape(info) if info is not None else None
        if shape is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", None)
        foldable[i] = np.array(shape[start:end], dtype=np.int64)
    return _as_initializers(model, {i: [value] for i, value in foldable.items()}) if foldable else None


def _fold_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Replace small nodes whose inputs are all constants by initializers of their values; None if none.

    Evaluated with ONNX's reference implementation, one node at a time in graph order (so chains of
    shape arithmetic fold in one pass). Inputs and outputs above ``_FOLD_MAX_ELEMENTS`` are left alone:
    transforming weights is the compiler's business, and a graph output is never folded away.
    """
    values: dict[str, np.ndarray] = {}
    small_weights = {t.name: t for t in model.graph.initializer if _elements(t.dims) <= _FOLD_MAX_ELEMENTS}
    shapes = {v.name: static_shape(v) for v in model.graph.value_info}
    graph_outputs = {o.name for o in model.graph.output}
    folded: dict[int, list[np.ndarray]] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = _small_constant(node)
            if value is not None:
                values[node.output[0]] = value
            continue
        inputs = [t for t in node.input if t]
        if not inputs or not _foldable_op(node) or any(t not in values and t not in small_weights for t in inputs):
            continue
        if any(shapes.get(o) is not None and _elements(shapes[o]) > _FOLD_MAX_ELEMENTS for o in node.output):
            continue          # known to be big before computing it (e.g. ConstantOfShape of a mask)
        args = [values[t] if t in values else numpy_helper.to_array(small_weights[t]) for t in inputs]
        arrays = _evaluate(model, node, inputs, args)
        if arrays is None or any(a.size > _FOLD_MAX_ELEMENTS for a in arrays):
            continue
        values.update(zip(node.output, arrays))
        if not graph_outputs.intersection(node.output):
            folded[i] = arrays
    return _as_initializers(model, folded) if folded else None


def _as_initializers(model: onnx.ModelProto, folded: dict[int, list[np.ndarray]]) -> onnx.ModelProto:
    """A copy with node ``i`` replaced by initializers of its outputs' values ``folded[i]``; initializers and
    ``Constant`` nodes that only folded nodes read are dropped, and so is the value info of folded tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [n for i, n in enumerate(model.graph.node) if i not in folded]
    for i, arrays in folded.items():
        out.graph.initializer.extend(numpy_helper.from_array(a, name)
                                     for name, a in zip(model.graph.node[i].output, arrays))
    _drop_unused_constants(out, kept, used_before={t for n in model.graph.node for t in n.input})
    names = {o for i in folded for o in model.graph.node[i].output} - {o.name for o in model.graph.output}
    vi = [v for v in out.graph.value_info if v.name not in names]
    del out.graph.value_info[:]
    out.graph.value_info.extend(vi)
    return out


def _elements(dims) -> int:
    return int(np.prod(tuple(dims), dtype=np.int64))


def _small_constant(node: onnx.NodeProto) -> np.ndarray | None:
    """A ``Constant`` node's value when it is small and numeric (a big one, e.g. weights some exporters emit as
    Constant nodes, is never copied out); None otherwise."""
    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t) if _elements(attr.t.dims) <= _FOLD_MAX_ELEMENTS else None
    dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if attr.name not in dtype:
        return None                                         # sparse or string values
    value = np.array(helper.get_attribute_value(attr), dtype=dtype[attr.name])
    return value if value.size <= _FOLD_MAX_ELEMENTS else None


_QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _foldable_op(node: onnx.NodeProto) -> bool:
    """Standard-domain ops whose value is a function of their inputs (no randomness, no subgraphs), except
    quantization ops: a DequantizeLinear of int8 weights is how a QDQ model tells runtimes to run int8 kernels."""
    return (node.domain in ("", "ai.onnx") and not node.op_type.startswith("Random")
            and node.op_type not in _QUANTIZATION_OPS
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute))


def _evaluate(model: onnx.ModelProto, node: onnx.NodeProto, names: list[str],
              args: list[np.ndarray]) -> list[np.ndarray] | None:
    """The node's outputs on these inputs by ONNX's reference evaluator, or None where it cannot run it."""
    from onnx.reference import ReferenceEvaluator

    graph = helper.make_graph(
        [node], "fold", [_tensor_info(name, a) for name, a in zip(names, args)],
        [onnx.ValueInfoProto(name=o) for o in node.output if o])
    probe = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        arrays = ReferenceEvaluator(probe).run(None, dict(zip(names, args)))
    except Exception as exc:  # the reference evaluator raises whatever its op implementation raises
        log.debug("not folding %s: %s", node.name, _first_line(exc))
        return None
    return [np.asarray(a) for a in arrays] if all(isinstance(a, (np.ndarray, np.generic)) for a in arrays) else None


def _drop_unused_constants(model: onnx.ModelProto, nodes: list[onnx.NodeProto], used_before: set[str]) -> None:
    """Set the graph's nodes, dropping initializers and ``Constant`` nodes that folding left without a reader."""
    used = {t for n in nodes for t in n.input} | {o.name for o in model.graph.output}
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes
                            if n.op_type != "Constant" or n.output[0] in used or n.output[0] not in used_before)
    weights = [t for t in model.graph.initializer if t.name in used or t.name not in used_before]
    del model.graph.initializer[:]
    model.graph.initializer.extend(weights)


def _fill_shapes_by_running(model: onnx.ModelProto, p: Path) -> onnx.ModelProto:
    """Record the shape of every tensor inference left open by running the model once on zeros."""
    import onnxruntime as ort

    known = {
        v.name for v in (*model.graph.input, *model.graph.value_info, *model.graph.output) if static_shape(v) is not None
    } | {t.name for t in model.graph.initializer}
    missing = [o for n in model.graph.node for o in n.output if o and o not in known]
    if not missing:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in missing if t not in outputs)
    value = model.graph.input[0]
    x = np.zeros(static_shape(value), helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        arrays = session.run(missing, {value.name: x})
    except Exception as exc:  # onnxruntime raises its own exception types for unsupported models
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DistreeError(
            f"{p}: shapes of {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} cannot be inferred and "
            f"onnxruntime cannot run the model to find them ({first}); re-export the model with static shapes"
        ) from None
    found = {name: a for name, a in zip(missing, arrays) if isinstance(a, np.ndarray)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for o in out.graph.output:
        if o.name in found:
            o.CopyFrom(_tensor_info(o.name, found.pop(o.name)))
    kept = [v for v in out.graph.value_info if v.name not in found]
    del out.graph.value_info[:]
    out.graph.value_info.extend([*kept, *(_tensor_info(name, a) for name, a in found.items())])
    return out


def _tensor_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))
