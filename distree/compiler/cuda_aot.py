"""Ahead-of-time CUDA: replace the CUDA C source that TVM embeds in a module with an nvcc-built fatbin.

Why: the apache-tvm wheel's CUDA codegen keeps kernels as CUDA C source (``fmt == "cuda"``) and its runtime
compiles them with NVRTC when the module is loaded. A Jetson without NVRTC (or with a different CUDA) then
cannot load the artifact. We compile the source with nvcc here and store it as ``fmt == "fatbin"``, which the
runtime hands straight to ``cuModuleLoadData``.

How: ``export_library`` accepts ``fpack_imports``; we take TVM's own C packing of the import tree
(``__tvm_ffi__library_bin``), rewrite the payload of each ``cuda`` module (layout: fmt string, function
map, data string; see TVM's ``CUDAModuleNode::SaveToBytes``) and write the C file back.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from distree.errors import DistreeError

_ARRAY = re.compile(r"__tvm_ffi__library_bin\[(\d+)\] = \{(.*?)\};", re.S)
_NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__")


def find_nvcc() -> Optional[str]:
    """nvcc on PATH, else the default CUDA install location."""
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


@functools.lru_cache(maxsize=4)
def nvcc_release(nvcc: str) -> str:
    """``13.0`` for nvcc 13.0: the kernels it builds need a driver for that CUDA major version or newer."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "?"


def compile_fatbin(source: str, arch: str, nvcc: str) -> bytes:
    """nvcc the kernels for ``arch`` (e.g. ``sm_87``): SASS for that GPU plus PTX for newer ones."""
    cc = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="distree-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = [nvcc, "--fatbin", *_NVCC_FLAGS, "-gencode", f"arch=compute_{cc},code=sm_{cc}",
               "-gencode", f"arch=compute_{cc},code=compute_{cc}", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DistreeError(f"nvcc could not compile the CUDA kernels for {arch}: {last}; "
                               "use a CUDA toolkit that supports this GPU, or build without --require-aot-cuda")
        return out.read_bytes()


@dataclass
class _Reader:
    data: bytes
    pos: int = 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self) -> bytes:
        n = self.u64()
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value


def _pack(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def rewrite_cuda_payloads(blob: bytes, compile_source: Callable[[str], bytes]) -> tuple[bytes, int]:
    """The import-tree blob with every ``cuda`` source module turned into a fatbin; and how many were."""
    r = _Reader(blob)
    r.u64()                                     # total size, rewritten below
    header_start = r.pos
    for _ in range(2):                          # import-tree row pointers, child indices
        for _ in range(r.u64()):
            r.u64()
    out = bytearray(blob[header_start:r.pos])
    converted = 0
    while r.pos < len(blob):
        kind = r.raw()
        out += _pack(kind)
        if kind == b"_lib":
            continue
        payload = r.raw()
        if kind == b"cuda":
            payload = _cuda_payload_to_fatbin(payload, compile_source)
            converted += 1
        out += _pack(payload)
    return struct.pack("<Q", len(out)) + bytes(out), converted


def _cuda_payload_to_fatbin(payload: bytes, compile_source: Callable[[str], bytes]) -> bytes:
    p = _Reader(payload)
    fmt = p.raw()
    fmap_start = p.pos
    # the function map has its own dmlc layout; the data string is the last field, so find it from the end
    for cut in range(len(payload) - 8, fmap_start - 1, -1):
        (n,) = struct.unpack_from("<Q", payload, cut)
        if cut + 8 + n == len(payload):
            fmap, source = payload[fmap_start:cut], payload[cut + 8:]
            break
    else:
        raise DistreeError("could not read the CUDA module TVM produced (unexpected layout); "
                           "build without ahead-of-time CUDA or report this TVM version")
    if fmt != b"cuda":
        return payload
    return _pack(b"fatbin") + fmap + _pack(compile_source(source.decode()))


def fatbin_packer(arch: str, nvcc: str, on_converted: Callable[[int], None]):
    """An ``fpack_imports`` for ``export_library`` that stores CUDA kernels as an sm_XX fatbin."""
    from tvm.runtime import _ffi_api

    def pack(mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        c_text = _ffi_api.ModulePackImportsToC(mod, is_system_lib, prefix)
        match = _ARRAY.search(c_text)
        if match is None:
            raise DistreeError("TVM's packed-imports C file has an unexpected form; build without "
                               "ahead-of-time CUDA or report this TVM version")
        blob = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", match.group(2)))
        new_blob, converted = rewrite_cuda_payloads(blob, lambda src: compile_fatbin(src, arch, nvcc))
        on_converted(converted)
        body = ",".join(f"0x{b:02x}" for b in new_blob)
        new_text = c_text[:match.start()] + f"__tvm_ffi__library_bin[{len(new_blob)}] = {{{body}}};" + \
            c_text[match.end():]
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        Path(path).write_text(new_text)
        return path

    return pack


def cuda_module_formats(blob: bytes) -> list[str]:
    """The ``fmt`` of every CUDA module in an import-tree blob (``fatbin`` after AOT, ``cuda`` for source)."""
    r = _Reader(blob)
    r.u64()
    for _ in range(2):
        for _ in range(r.u64()):
            r.u64()
    formats = []
    while r.pos < len(blob):
        kind = r.raw()
        if kind == b"_lib":
            continue
        payload = r.raw()
        if kind == b"cuda":
            formats.append(_Reader(payload).raw().decode())
    return formats
