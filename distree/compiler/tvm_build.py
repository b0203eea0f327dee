"""Compile one ONNX segment with TVM for a catalog device: host, aarch64 (cross-linked) or CUDA + aarch64."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx

from distree.targets.schedules import schedule_defaults
from distree.targets.spec import DeviceSpec
from distree.targets.toolchain import export_library, import_onnx, tvm_target


@dataclass(frozen=True)
class TvmBuild:
    """What a build produced; ``cuda`` says how CUDA kernels ship (None for CPU targets)."""

    path: Path
    cuda: Optional[str]             # "fatbin sm_87 (nvcc, ahead of time)" or "CUDA source (NVRTC at load)"
    tuned: bool
    default_scheduled: int = 0      # kernels laid out by distree's default CPU schedules (no record covered them)


def compile_segment(model: onnx.ModelProto, device: DeviceSpec, out_path: Path,
                    tuning_db: Optional[Path] = None, require_aot_cuda: bool = False) -> TvmBuild:
    """Build ``model`` for ``device`` into ``out_path`` (.so); apply tuning records from ``tuning_db``, and
    distree's default CPU schedules to the kernels no record covers."""
    import tvm

    target = tvm_target(device)
    mod = import_onnx(model)
    tuned = False
    if tuning_db is not None:
        from distree.compiler.tuning import apply_tuning, has_records

        tuned = has_records(tuning_db, target)
        if tuned:
            mod = apply_tuning(mod, target, tuning_db)
    scheduled = schedule_defaults(mod, target)
    executable = tvm.compile(scheduled.mod, target=target)
    cuda = export_library(executable, device, out_path, require_aot_cuda)
    return TvmBuild(path=out_path, cuda=cuda, tuned=tuned, default_scheduled=scheduled.scheduled)
