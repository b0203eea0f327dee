"""Latency estimates from FLOPs, bytes and a device's figures, calibrated against this machine.

    compute_ms = dense_flops / (peak * eff_compute) + other_flops / (peak * eff_other)
    latency_ms = max(compute_ms, bytes / (bandwidth * eff_memory)) + ops * op_ms + call_ms

Dense FLOPs are those of Conv / Gemm / MatMul; the rest (elementwise, pooling, normalization) runs at a
different efficiency, above all in untuned TVM. ``peak`` is the device's peak FP32 GFLOP/s per core times the threads used (capped at its cores; the
whole GPU for CUDA devices); ``bytes`` = parameter bytes + input and output bytes. ``eff_compute``,
``eff_other``, ``eff_memory``, ``op_ms`` and ``call_ms`` (the fixed cost of one invocation) are fitted by least squares on log latency against measurements on the
calibration machine (one set per backend), stored in ``estimate_calibration.json`` with the command that
produced them. On another device the efficiencies carry over and ``op_ms`` and ``call_ms`` scale with its
per-core throughput (CPU; on a GPU each op is a CUDA kernel launch and the call stays on the host CPU). These are estimates: every one says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from distree.errors import DistreeError
from distree.profiler.units import Unit
from distree.serde import JsonRecord
from distree.targets.spec import DeviceSpec

CALIBRATION_FILE = Path(__file__).with_name("estimate_calibration.json")
CUDA_LAUNCH_MS = 0.01  # per kernel launch on a Jetson-class GPU (order of 5-10 us, NVIDIA CUDA best practices)
# A GPU device's host CPU per-core peak when the spec does not give it: Cortex-A78AE @ 1.5 GHz x 16 FLOP/cycle.
HOST_CORE_GFLOPS_FALLBACK = 24.0
# TVM's CUDA kernels ship with its default GPU schedules, untuned, and no Jetson was measured: a GPU's TVM estimate
# keeps the efficiencies untuned TVM code reached on a CPU before distree scheduled CPU kernels itself (the
# calibration of the 2-core znver3 VM, benchmarks/profile_fidelity.py --calibrate), not those of distree's CPU
# schedules, which no GPU runs. Rough, as it always was (README, Limits).
UNTUNED_GPU_EFFICIENCY = {"eff_compute": 0.01345, "eff_other": 0.04141, "eff_memory": 1.0}


@dataclass(frozen=True)
class EstimateCoefficients(JsonRecord):
    backend: str
    eff_compute: float          # achieved / peak FLOP rate of dense ops (Conv, Gemm, MatMul)
    eff_memory: float           # achieved / nominal memory bandwidth
    op_ms: float                # per-ONNX-op overhead on the calibration machine
    per_core_gflops: float      # the calibration machine's per-core peak (scales op_ms to other CPUs)
    median_rel_error: float     # on the calibration rows
    max_rel_error: float
    rows: int
    call_ms: float = 0.0            # fixed cost per invocation (session.run / VM call) on the calibration machine
    eff_other: float = 0.0          # achieved / peak FLOP rate of the other ops; 0: as eff_compute (older files)


@dataclass(frozen=True)
class EstimateCalibration(JsonRecord):
    machine: str                # the device it was fitted on, e.g. "host: znver3, 2 cores @ 2250 MHz"
    command: str                # how to reproduce it
    threads: int
    coefficients: tuple[EstimateCoefficients, ...]

    def for_backend(self, backend: str) -> EstimateCoefficients:
        for c in self.coefficients:
            if c.backend == backend:
                return c
        raise DistreeError(f"no estimate calibration for backend {backend!r} in {CALIBRATION_FILE.name}; re-run "
                           f"{self.command}")


def load_calibration(path: Path = CALIBRATION_FILE) -> EstimateCalibration:
    if not Path(path).is_file():
        raise DistreeError(f"{path}: no estimate calibration; create it with "
                           "python benchmarks/profile_fidelity.py --calibrate")
    doc = json.loads(Path(path).read_text())
    return EstimateCalibration.from_dict(doc)


def effective_peak_gflops(device: DeviceSpec, threads: int) -> float:
    if device.target.get("kind") == "cuda":
        return device.peak_gflops
    return device.peak_gflops / device.cores * min(threads, device.cores)


def unit_bytes(unit: Unit) -> int:
    return unit.param_bytes + unit.io_bytes


def per_core_gflops(device: DeviceSpec) -> float:
    """Peak per core of the CPU that runs the host side (a GPU device's host CPU)."""
    if device.target.get("kind") == "cuda":
        return HOST_CORE_GFLOPS_FALLBACK
    return device.peak_gflops / device.cores


def host_cpu_view(device: DeviceSpec) -> DeviceSpec:
    """The device as the CPU that runs ONNX Runtime on it: a GPU device's host CPU (its cores at
    :func:`per_core_gflops`), a CPU device itself."""
    if device.target.get("kind") != "cuda":
        return device
    return dataclasses.replace(device, target=dict(device.host or {"kind": "llvm"}), host=None,
                               peak_gflops=per_core_gflops(device) * device.cores)


def _cpu_slowdown(coef: EstimateCoefficients, device: DeviceSpec) -> float:
    """How much slower one core of ``device`` (its host CPU for a GPU) is than the calibration machine's."""
    return coef.per_core_gflops / per_core_gflops(device)


def estimate_ms(dense_flops: float, other_flops: float, nbytes: float, ops: int, device: DeviceSpec,
                coef: EstimateCoefficients, threads: int) -> float:
    if device.target.get("kind") == "cuda" and coef.backend == "tvm":
        coef = dataclasses.replace(coef, **UNTUNED_GPU_EFFICIENCY)
    peak = effective_peak_gflops(device, threads) * 1e9
    compute = dense_flops / (peak * coef.eff_compute) + other_flops / (peak * (coef.eff_other or coef.eff_compute))
    memory = nbytes / (device.mem_gbps * 1e9 * coef.eff_memory)
    slow = _cpu_slowdown(coef, device)
    op_ms = CUDA_LAUNCH_MS if device.target.get("kind") == "cuda" else coef.op_ms * slow
    return max(compute, memory) * 1e3 + ops * op_ms + coef.call_ms * slow


def unit_estimate_ms(unit: Unit, device: DeviceSpec, coef: EstimateCoefficients, threads: int) -> float:
    return estimate_ms(unit.dense_flops, unit.flops - unit.dense_flops, unit_bytes(unit), unit.num_ops, device, coef,
                       threads)


Row = tuple[float, float, float, int, float]  # dense FLOPs, other FLOPs, bytes, ops, measured ms


def fit_coefficients(backend: str, rows: Sequence[Row], device: DeviceSpec, threads: int) -> EstimateCoefficients:
    """Least squares on log latency over rows measured on ``device``."""
    from scipy.optimize import least_squares

    if len(rows) < 6:
        raise DistreeError(f"fitting the estimate needs at least 6 measured items, got {len(rows)}")
    data = np.asarray(rows, dtype=np.float64)
    per_core = device.peak_gflops / device.cores

    def coef(p: np.ndarray) -> EstimateCoefficients:
        e = np.exp(p)
        return EstimateCoefficients(backend, float(e[0]), float(e[1]), float(e[2]), per_core, 0.0, 0.0, len(rows),
                                    call_ms=float(e[3]), eff_other=float(e[4]))

    def predict(p: np.ndarray) -> np.ndarray:
        c = coef(p)
        return np.array([estimate_ms(d, o, b, int(n), device, c, threads) for d, o, b, n, _ in data])

    # efficiencies in (0, 1]: a fit that wants more than the datasheet says the term does not matter
    bounds = (np.log([1e-4, 1e-4, 1e-6, 1e-6, 1e-4]), np.log([1.0, 1.0, 10.0, 10.0, 1.0]))
    start = np.log([0.1, 0.1, 0.005, 0.005, 0.1])
    fit = least_squares(lambda p: np.log(predict(p)) - np.log(data[:, 4]), start, bounds=bounds, method="trf")
    rel = np.abs(predict(fit.x) - data[:, 4]) / data[:, 4]
    best = coef(fit.x)
    return dataclasses.replace(best, median_rel_error=float(np.median(rel)), max_rel_error=float(np.max(rel)))
