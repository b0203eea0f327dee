"""In-process runners for one segment: a TVM library (relax VM) or an ONNX model (ONNX Runtime).

Both take one input array and return the segment's outputs in manifest order, so the executor and the
compiler's latency measurement treat them alike.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from distree.errors import DistreeError
from distree.targets.toolchain import load_tvm_cuda_runtime

Runner = Callable[[np.ndarray], list[np.ndarray]]   # (a CUDA runner may also take and keep GPU tensors)


def ort_runner(path: Path | bytes, threads: int = 1) -> Runner:
    """ONNX Runtime session (graph optimization ALL, its default) with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        where = "segment model" if isinstance(path, bytes) else str(path)
        raise DistreeError(f"{where}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]}); "
                           "rebuild the bundle") from exc
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(names, {input_name: x})

    return run


_tvm_threads: Optional[int] = None


def set_tvm_threads(threads: int) -> None:
    """Size TVM's CPU thread pool (the notes: 1 thread is fastest for kernels this small): now if TVM is loaded,
    else when :func:`tvm_runner` first loads it (a stage that runs ONNX Runtime alone never imports TVM)."""
    global _tvm_threads
    _tvm_threads = threads
    if "tvm" in sys.modules:
        _configure_tvm_threads()


def _configure_tvm_threads() -> None:
    if _tvm_threads is not None:
        import tvm_ffi

        tvm_ffi.get_global_func("runtime.config_threadpool")(0, _tvm_threads)


def tvm_runner(path: Path, device: str = "cpu", keep_on_gpu: frozenset[int] = frozenset()) -> Runner:
    """A relax VM over a TVM library, on this machine's CPU or (``device="cuda"``) its first CUDA GPU.

    CPU: each call copies the input into a TVM tensor allocated once per shape (TVM's allocator aligns it as
    its kernels assume) and reads the outputs through DLPack: 1.7 us of overhead per call here, against 21 us
    for a fresh ``tvm.runtime.tensor`` per call and ``.numpy()`` per output. Outputs are copied out: one may be
    a view of the staging tensor (a segment that passes its input through), which the next call overwrites.
    CUDA: a host input is copied into a GPU tensor allocated once per shape; a GPU tensor (an output kept there
    by the segment before) is used as it is; outputs come back to host memory except those in ``keep_on_gpu``:
    each copy between host and GPU is a synchronous transfer, as long as the kernels of a small segment.
    Only ``tvm.runtime`` is used, so a runtime-only TVM install on the device is enough.
    """
    import tvm
    from tvm.runtime.vm import VirtualMachine

    _configure_tvm_threads()
    if device == "cuda":
        missing = load_tvm_cuda_runtime()
        if missing:
            raise DistreeError(f"{path}: {missing}; run it on a machine with TVM's CUDA runtime and a GPU")
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu()
    try:
        main = VirtualMachine(tvm.runtime.load_module(str(path)), dev)["main"]
    except Exception as exc:  # TVM raises its own error types
        raise DistreeError(f"{path}: TVM cannot load it ({str(exc).splitlines()[0]}); rebuild the bundle") from exc
    staging: dict[tuple, tuple[object, Optional[np.ndarray]]] = {}

    def stage_input(x: np.ndarray):
        key = (x.shape, x.dtype.str)
        if key not in staging:
            tensor = tvm.runtime.empty(x.shape, x.dtype.name, dev)
            staging[key] = (tensor, np.from_dlpack(tensor) if device == "cpu" else None)
        tensor, view = staging[key]
        if view is None:
            tensor.copyfrom(np.ascontiguousarray(x))
        else:
            np.copyto(view, x)
        return tensor

    def run(x) -> list:
        out = main(x if isinstance(x, tvm.runtime.Tensor) else stage_input(x))
        items = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
        if device == "cuda":
            return [o if k in keep_on_gpu else o.numpy() for k, o in enumerate(items)]
        return [np.from_dlpack(o).copy() for o in items]

    return run


def median_ms(run: Runner, x: np.ndarray, repeat: int = 20, warmup: int = 3,
              budget_s: float = 5.0) -> float:
    """Median wall time of ``run(x)`` in ms (stops early after ``budget_s`` for slow untuned code)."""
    for _ in range(warmup):
        run(x)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < repeat and (len(samples) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        run(x)
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def percentiles_ms(samples: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "median_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    return {"count": int(arr.size), "median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)),
            "p99_ms": float(np.percentile(arr, 99)), "mean_ms": float(arr.mean())}
