"""``distree verify``: a bundle is intact (hashes, versions, file list) and each device's files load.

Libraries built for this machine are loaded and run on zeros next to their ONNX (outputs must agree);
libraries for another architecture are checked as far as possible here (ELF machine, TVM symbol, CUDA
kernel format) and reported as skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from distree.compiler.cuda_aot import cuda_module_formats
from distree.compiler.elf import elf_machine, symbol_bytes
from distree.compiler.manifest import MANIFEST, DeviceArtifact, SegmentArtifact, read_manifest, read_thresholds, \
    sha256_file
from distree.targets.toolchain import host_runnable, target_arch, tvm_device_here
from distree.errors import DistreeError
from distree.runtime.backends import ort_runner, tvm_runner
from distree.serde import JsonRecord

LIBRARY_SYMBOL = "__tvm_ffi__library_bin"


@dataclass(frozen=True)
class FileCheck(JsonRecord):
    file: str
    status: str                     # "ran", "checked" (not loadable here) or "skipped"
    detail: str


@dataclass(frozen=True)
class VerifyReport(JsonRecord):
    bundle: str
    made_by: str
    files: int
    checks: tuple[FileCheck, ...]


def verify_bundle(path: str | Path, emulate: bool = False, devices: Optional[Sequence[str]] = None,
                  against_onnx: bool = True) -> VerifyReport:
    """Check everything; the first problem is a DistreeError that names the file.

    ``emulate``: also run aarch64 CPU libraries under qemu-user and compare them with their ONNX.
    ``devices``: only these devices' folders and the shared top-level files (what a device copied to serve
    its stage needs; other devices' folders may be absent).
    ``against_onnx``: compare every TVM library that runs here with its ONNX under ONNX Runtime; without it (what
    ``distree serve`` checks on start) a TVM library runs on zeros and its output shapes are checked, so a stage
    of TVM code never loads ONNX Runtime (a Pi starts sooner; under qemu-user its aarch64 wheel dies on import).
    """
    bundle = Path(path)
    manifest = read_manifest(bundle)
    check_files(bundle, manifest.files, None if devices is None else set(devices))
    table = read_thresholds(bundle)
    known = {e.name for e in table.exits}
    checks: list[FileCheck] = []
    for stage in manifest.stages:
        if devices is not None and stage.name not in devices:
            continue
        for seg in stage.segments:
            if seg.exit and seg.exit not in known:
                raise DistreeError(f"{bundle / 'thresholds.json'}: has no threshold for exit {seg.exit}; "
                                   "rebuild the bundle")
            checks.extend(_check_segment(bundle, stage, seg, against_onnx))
    if emulate:
        checks = _emulate(bundle, manifest, checks)
    return VerifyReport(bundle=str(bundle), made_by=f"distree {manifest.distree_version}, TVM "
                        f"{manifest.tvm_version}, ONNX Runtime {manifest.ort_version}",
                        files=len(manifest.files), checks=tuple(checks))


def check_files(bundle: Path, files: dict[str, str], devices: Optional[set[str]] = None) -> None:
    """Every file the manifest lists is there with its SHA-256, and no other (``devices``: only theirs and the
    shared top-level files)."""
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    if devices is not None:
        def wanted(rel: str) -> bool:
            return Path(rel).parent == Path(".") or Path(rel).parts[0] in devices
        present = {rel for rel in present if wanted(rel)}
        files = {rel: digest for rel, digest in files.items() if wanted(rel)}
    for rel in sorted(set(files) - present):
        raise DistreeError(f"{bundle / rel}: listed in the manifest but missing; rebuild or re-copy the bundle")
    for rel in sorted(present - set(files)):
        raise DistreeError(f"{bundle / rel}: not part of the bundle (not in the manifest); remove it")
    for rel, digest in sorted(files.items()):
        if sha256_file(bundle / rel) != digest:
            raise DistreeError(f"{bundle / rel}: SHA-256 does not match the manifest (modified or corrupted); "
                               "rebuild or re-copy the bundle")


def _check_segment(bundle: Path, stage: DeviceArtifact, seg: SegmentArtifact,
                   against_onnx: bool = True) -> list[FileCheck]:
    zeros = np.zeros(seg.input.shape, dtype=seg.input.dtype)
    lib = bundle / seg.tvm_file if seg.tvm_file else None
    where, why_not = tvm_device_here(stage.spec) if lib else (None, "")
    if lib and where is not None and seg.backend == "tvm" and not against_onnx:     # what the stage will run
        _check_machine(lib, stage)
        outs = tvm_runner(lib, where)(zeros)
        _check_shapes(lib, seg, outs)
        return [FileCheck(seg.tvm_file, "ran", "TVM ran it on zeros; output shapes match the manifest (`distree "
                          "verify` compares it with its ONNX under ONNX Runtime)")]
    reference = ort_runner(bundle / seg.onnx_file)(zeros)
    _check_shapes(bundle / seg.onnx_file, seg, reference)
    checks = [FileCheck(seg.onnx_file, "ran", "ONNX Runtime ran it on zeros; output shapes match the manifest")]
    if lib is None:
        return checks
    machine = _check_machine(lib, stage)
    if where is not None:
        outs = tvm_runner(lib, where)(zeros)
        for spec, got, ref in zip(seg.outputs, outs, reference):
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-3, atol=1e-4):
                raise DistreeError(f"{lib}: output {spec.name} differs from its ONNX under ONNX Runtime on zeros "
                                   f"(max |diff| {np.abs(got - ref).max():.3g}); rebuild the bundle")
        on = "this CPU" if where == "cpu" else "this machine's CUDA GPU"
        checks.append(FileCheck(seg.tvm_file, "ran", f"TVM ran it on zeros on {on}; outputs match ONNX Runtime"))
        return checks
    formats = cuda_module_formats(symbol_bytes(lib, LIBRARY_SYMBOL))
    detail = f"{machine} ELF with a TVM library; not run here: {why_not}"
    if stage.spec.target.get("kind") == "cuda":
        shipped = "fatbin" if seg.cuda and seg.cuda.startswith("fatbin") else "cuda"
        if formats and set(formats) != {shipped}:
            raise DistreeError(f"{lib}: CUDA kernels are stored as {formats}, the manifest says {seg.cuda}; "
                               "rebuild the bundle")
        detail += f"; CUDA kernels: {seg.cuda}"
    where_else = "on the device" if stage.spec.target.get("kind") == "cuda" else "on the device or under qemu"
    checks.append(FileCheck(seg.tvm_file, "checked", f"{detail} (run it {where_else})"))
    return checks


def _check_machine(lib: Path, stage: DeviceArtifact) -> str:
    machine, want = elf_machine(lib), target_arch(stage.spec)
    if machine != want:
        raise DistreeError(f"{lib}: is an {machine} library, {stage.name} needs {want}; rebuild the bundle")
    return machine


def _emulate(bundle: Path, manifest, checks: list[FileCheck]) -> list[FileCheck]:
    """Run every aarch64 CPU library under qemu on zeros; its outputs must match ONNX Runtime's."""
    from distree.compiler.emulated import run_on_aarch64

    segs = [s for st in manifest.stages for s in st.segments
            if s.tvm_file and st.spec.target.get("kind") == "llvm" and target_arch(st.spec) == "aarch64"
            and not host_runnable(st.spec)]
    if not segs:
        return checks
    zeros = [np.zeros(s.input.shape, dtype=s.input.dtype) for s in segs]
    results = run_on_aarch64([bundle / s.tvm_file for s in segs], zeros)
    ran = set()
    for seg, x, outs in zip(segs, zeros, results):
        for spec, got, ref in zip(seg.outputs, outs, ort_runner(bundle / seg.onnx_file)(x)):
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-3, atol=1e-4):
                raise DistreeError(f"{bundle / seg.tvm_file}: output {spec.name} under qemu differs from its ONNX "
                                   f"(max |diff| {np.abs(got - ref).max():.3g}); rebuild the bundle")
        ran.add(seg.tvm_file)
    return [FileCheck(c.file, "ran", "aarch64 TVM runtime under qemu-user ran it on zeros; outputs match "
                      "ONNX Runtime") if c.file in ran else c for c in checks]


def _check_shapes(path: Path, seg: SegmentArtifact, outs: list[np.ndarray]) -> None:
    got = [tuple(o.shape) for o in outs]
    want = [tuple(o.shape) for o in seg.outputs]
    if got != want:
        raise DistreeError(f"{path}: outputs have shapes {got}, the manifest says {want}; rebuild the bundle")
