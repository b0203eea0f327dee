"""How a device's code is built with TVM: its target, its cross compiler, and the ONNX import.

Shared by the profiler (which compiles single blocks) and the compiler (which compiles segments), so both
build the same code the same way.
"""

from __future__ import annotations

import functools
import platform
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from distree.errors import DistreeError
from distree.targets.spec import DeviceSpec

if TYPE_CHECKING:      # onnx costs ~1 s to import: a device serving its stage never needs it
    import onnx

# target architecture -> (cross compiler, Debian packages that provide it and the target's libc)
CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu libc6-dev-arm64-cross")}


def target_arch(device: DeviceSpec) -> str:
    """CPU architecture of the code that runs on the device's CPU (the host for CUDA devices)."""
    cpu = device.host if device.host else device.target
    triple = str(cpu.get("mtriple") or platform.machine())
    return triple.split("-")[0].replace("arm64", "aarch64")


def host_arch() -> str:
    return platform.machine().replace("arm64", "aarch64").replace("AMD64", "x86_64")


def host_runnable(device: DeviceSpec) -> bool:
    """Whether this machine's CPU can load and run the device's TVM library (a CPU device) in process: same
    architecture, and every vector extension its code may use (x86-server's AVX-512 code on an AVX2 machine would
    stop with an illegal instruction)."""
    return device.target.get("kind") == "llvm" and tvm_device_here(device)[0] == "cpu"


def tvm_device_here(device: DeviceSpec) -> tuple[Optional[str], str]:
    """Where the device's TVM library runs in this process: ``("cpu", "")``, ``("cuda", "")`` (a CUDA GPU here
    that can run its kernels), or ``(None, why not)``. The runtime, ``verify`` and ``bench`` ask this, so a
    bundle copied to a Jetson (or to any machine with a fitting NVIDIA GPU) runs its CUDA stage on the GPU."""
    kind, arch = device.target.get("kind"), target_arch(device)
    if arch != host_arch():
        return None, f"its {arch} code cannot run on this {host_arch()} machine"
    if kind == "llvm":
        missing = missing_cpu_features(device) if compiler_loaded() else ()
        if missing:
            return None, f"its code may use {', '.join(missing)}, which this CPU ({host_cpu()}) lacks"
        return "cpu", ""
    if kind != "cuda":
        return None, f"distree runs TVM libraries on CPUs and CUDA GPUs, not {kind}"
    why = cuda_gpu_missing(str(device.target.get("arch", "")))
    return (None, why) if why else ("cuda", "")


def compiler_loaded() -> bool:
    """Whether TVM's compiler library (and with it LLVM's CPU tables) is loaded; a runtime-only install on a
    device has none, and runs the code built for that device."""
    import tvm

    return not tvm.base._RUNTIME_ONLY


def cuda_gpu_missing(arch: str) -> str:
    """Why this process cannot run kernels built for ``arch`` (``sm_87``) on GPU 0; empty when it can. The
    kernels are SASS for ``arch`` plus its PTX (``compile_fatbin``), so any GPU of that compute capability or
    newer runs them."""
    import tvm

    missing = load_tvm_cuda_runtime()
    if missing:
        return missing
    gpu = tvm.cuda(0)
    if not gpu.exist:
        return "no CUDA GPU is visible here (tvm.cuda(0) does not exist)"
    if not cuda_arch_runs_on(arch, gpu.compute_version):
        return f"this GPU ({gpu.device_name}) has compute capability {gpu.compute_version}, older than the code's {arch}"
    return ""


def cuda_arch_runs_on(arch: str, compute_version: str) -> bool:
    """Whether kernels built for ``arch`` (``sm_87``: SASS + PTX) run on a GPU of ``compute_version``
    (``"9.0"``): the same or a newer compute capability."""
    need = re.fullmatch(r"sm_(\d+)(\d)", arch)
    have = tuple(int(v) for v in compute_version.split("."))
    return need is None or have >= (int(need.group(1)), int(need.group(2)))


def _tvm_runtime_dir() -> Path:
    """Where the loaded TVM runtime library lies (its CUDA runtime library sits beside it)."""
    import tvm

    return Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent


@functools.lru_cache(maxsize=1)
def load_tvm_cuda_runtime() -> str:
    """Make TVM's CUDA runtime available; why it is not, or empty. A full TVM install loads it at import when
    it can; a runtime-only one (``TVM_USE_RUNTIME_LIB=1``, or no compiler library: what a device needs) never
    does, so distree loads ``libtvm_runtime_cuda`` itself (once per process: the answer does not change)."""
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    if tvm.get_global_func("device_api.cuda", True) is not None:
        return ""
    try:
        load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[_tvm_runtime_dir()],
                        mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return f"TVM's CUDA runtime does not load here ({first})"
    if tvm.get_global_func("device_api.cuda", True) is None:
        return "TVM's CUDA runtime loaded but registered no CUDA device"
    return ""


@functools.lru_cache(maxsize=1)
def tvm_cudart() -> Optional[str]:
    """The CUDA runtime library TVM's CUDA runtime links (``libcudart.so.13`` for the apache-tvm 0.27 wheels, x86
    and aarch64 alike): a device running CUDA stages needs that CUDA; None where this TVM has no CUDA runtime."""
    from distree.compiler.elf import needed_libraries

    lib = _tvm_runtime_dir() / "libtvm_runtime_cuda.so"
    return next((n for n in needed_libraries(lib) if n.startswith("libcudart.so")), None) if lib.is_file() else None


# Vector extensions TVM's CPU code uses: code built for a CPU that has one stops with an illegal instruction on a
# CPU without it (the rest of LLVM's feature lists are mostly tuning flags that differ within one ISA).
CODE_FEATURES = {
    "x86_64": ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni",
               "avx512bf16", "avx512fp16", "avxvnni", "amx-tile", "amx-int8", "amx-bf16"),
    "aarch64": ("neon", "fullfp16", "dotprod", "i8mm", "bf16", "sve", "sve2"),
}


def host_cpu() -> str:
    """This machine's CPU as LLVM names it (what ``mcpu`` would be for code built for it)."""
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


def missing_cpu_features(device: DeviceSpec) -> tuple[str, ...]:
    """The vector extensions the device's code may use that this machine's CPU lacks (same architecture
    assumed): running that code here would crash, so measuring it here is refused."""
    import tvm
    from tvm.target import codegen

    here = tvm.target.Target({"kind": "llvm", "mtriple": codegen.llvm_get_system_triple(), "mcpu": host_cpu()})
    wanted = set(codegen.llvm_get_cpu_features(tvm.target.Target(dict(device.target))))
    have = set(codegen.llvm_get_cpu_features(here))
    return tuple(f for f in CODE_FEATURES.get(target_arch(device), ()) if f in wanted and f not in have)


def cross_compiler(device: DeviceSpec) -> Optional[str]:
    """The C compiler that links the device's library (None: the host's default); checked up front."""
    arch = target_arch(device)
    if arch == host_arch():
        return None
    if arch not in CROSS_COMPILERS:
        raise DistreeError(f"device {device.name}: no cross compiler known for {arch}; distree builds for "
                           f"{', '.join([host_arch(), *CROSS_COMPILERS])}")
    cc, packages = CROSS_COMPILERS[arch]
    if shutil.which(cc) is None:
        raise DistreeError(f"device {device.name} needs the cross compiler {cc}, which is not on PATH; "
                           f"install the Debian package(s): apt-get install {packages}")
    return cc


def tvm_target(device: DeviceSpec):
    import tvm

    if device.host:
        return tvm.target.Target(dict(device.target), host=dict(device.host))
    return tvm.target.Target(dict(device.target))


def tvm_unsupported_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Op type -> node names of the ops TVM's ONNX importer has no converter for (its own check, which it runs
    before importing anything; the op type alone decides, whatever the domain)."""
    missing: dict[str, list[str]] = {}
    lacked = tvm_lacks(node.op_type for node in model.graph.node)
    for node in model.graph.node:
        if node.op_type in lacked:
            missing.setdefault(node.op_type, []).append(node.name)
    return missing


def tvm_lacks(op_types: Iterable[str]) -> set[str]:
    """The op types among ``op_types`` TVM's ONNX importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map().keys() | {"If", "Constant"}      # If and Constant: handled by the importer itself
    return set(op_types) - known


def check_tvm_imports(model: onnx.ModelProto, where: str = "") -> None:
    """DistreeError naming the ops TVM's importer lacks, before any work that would reach them."""
    import tvm

    gap = tvm_gap(model)
    if gap:
        raise DistreeError(f"{where}TVM {tvm.__version__}'s ONNX importer does not support {gap}; use `--backend "
                           "auto` (the default: ONNX Runtime for the segments holding them, TVM elsewhere) or "
                           "`--backend ort`, or re-export the model without these ops")


def tvm_gap(model: onnx.ModelProto) -> str:
    """The ops TVM's importer lacks in ``model``, in words (``Celu (2 nodes, e.g. 'act3')``); "" when none."""
    return ", ".join(f"{op} ({len(nodes)} node{'s' if len(nodes) > 1 else ''}, e.g. {nodes[0]!r})"
                     for op, nodes in sorted(tvm_unsupported_ops(model).items()))


def import_onnx(model: onnx.ModelProto):
    """Relax module of a segment with static input shapes (weights bound as constants).

    Graph inputs are renamed to C identifiers first: TVM turns them into kernel parameter names, and a
    cut tensor such as ``/b2/Relu_output_0`` would make the generated CUDA C source fail to compile.
    """
    from tvm.relax.frontend.onnx import from_onnx

    weights = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in weights and not all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim):
            raise DistreeError(f"input {value.name!r} has a dynamic shape; fix the shapes first "
                               "(distree.graph.load_model)")
    check_tvm_imports(model)
    model = _gathers_as_slices(_identifier_inputs(model))
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
              if i.name not in weights}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Renaming name")  # TVM renames tensors with '/' or '.'
        return from_onnx(model, shape_dict=shapes, keep_params_in_input=False)


def _gathers_as_slices(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Gather of one constant, non-negative index as Slice + Squeeze (a copy; opset 13+, where both take their
    axes as inputs). TVM's importer makes every Gather a ``take`` in its "fast" mode, which logs "Fast mode
    segfaults when there are out-of-bounds indices" once per op and build (48 lines for a 4-layer ViT, whose
    attention picks q, k and v that way); picking one row is a slice, and then there is nothing to warn about."""
    import numpy as np
    from onnx import helper, numpy_helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    constants = {t.name: t for t in model.graph.initializer}
    constants |= {n.output[0]: n.attribute[0].t for n in model.graph.node
                  if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}

    def single_index(node) -> Optional[int]:
        index = constants.get(node.input[1]) if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        if index is None or tuple(index.dims) != ():
            return None
        value = int(numpy_helper.to_array(index))
        return value if value >= 0 else None

    if opset < 13 or not any(single_index(n) is not None for n in model.graph.node):
        return model
    out = type(model)()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        index = single_index(node)
        if index is None:
            out.graph.node.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        y = node.output[0]
        out.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), f"{y}__{name}")
                                     for name, v in (("start", [index]), ("end", [index + 1]), ("axis", [axis])))
        out.graph.node.extend([
            helper.make_node("Slice", [node.input[0], f"{y}__start", f"{y}__end", f"{y}__axis"], [f"{y}__row"],
                             name=f"{node.name}__slice"),
            helper.make_node("Squeeze", [f"{y}__row", f"{y}__axis"], [y], name=f"{node.name}__squeeze")])
    return out


def _identifier_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    renames = {i.name: f"in{k}_" + re.sub(r"\W", "_", i.name).strip("_") for k, i in enumerate(model.graph.input)}
    out = type(model)()
    out.CopyFrom(model)
    for value in out.graph.input:
        value.name = renames[value.name]
    for node in out.graph.node:
        node.input[:] = [renames.get(t, t) for t in node.input]
    return out


def export_library(executable, device: DeviceSpec, path: Path, require_aot_cuda: bool = False) -> Optional[str]:
    """Link a ``tvm.compile`` result into ``path`` (.so) for the device, the one way the profiler and the compiler
    both do it: the device's cross compiler, and CUDA kernels compiled ahead of time by nvcc into a fatbin (else
    kept as source for NVRTC at load). Returns how CUDA kernels ship (None for a CPU device)."""
    from distree.compiler.cuda_aot import fatbin_packer, find_nvcc, nvcc_release

    cc = cross_compiler(device)
    kwargs = {"cc": cc} if cc else {}
    cuda, arch, nvcc = device.target.get("kind") == "cuda", str(device.target.get("arch", "")), find_nvcc()
    if cuda and nvcc is None and require_aot_cuda:
        raise DistreeError(f"device {device.name}: nvcc not found, so the CUDA kernels cannot be "
                           "compiled ahead of time; install the CUDA toolkit or drop --require-aot-cuda")
    converted: list[int] = []
    if cuda and nvcc is not None:
        kwargs["fpack_imports"] = fatbin_packer(arch, nvcc, converted.append)
    path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(path), **kwargs)
    if not cuda:
        return None
    if nvcc is None:
        return "CUDA source, compiled at load time by NVRTC on the device (nvcc not found here)"
    return (f"fatbin {arch} (nvcc {nvcc_release(nvcc)} ahead of time; no NVRTC needed on the device)"
            if sum(converted) else "no CUDA kernels in this segment")

