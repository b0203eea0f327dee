"""The device catalog: one row per known device, built by two small factories.

TVM targets are written out as dicts (TVM 0.27 takes dicts only) copied from TVM's own target tags where
one exists (``tvm_tag``; ``tests/test_targets.py`` checks that they still agree with the installed TVM),
with the corrections noted per row. ``peak_gflops`` and ``mem_gbps`` are used only by the estimate
mode of the profiler; each row says where they come from (``sources``).

Peak FP32 GFLOP/s = cores x clock (GHz) x FP32 FLOP per cycle per core; memory GB/s = bus width x
transfer rate. These are datasheet ceilings, not achieved rates: the estimator calibrates an efficiency
factor against measurements on this machine and applies it to every row.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Optional

from distree.errors import DistreeError
from distree.targets.spec import DeviceSpec

GIB = 1 << 30


def _cpu(name: str, *, mtriple: str, mcpu: str, cores: int, memory_gb: float, ghz: float,
         flop_per_cycle: int, mem_gbps: float, description: str, sources: tuple[str, ...],
         mattr: tuple[str, ...] = (), tvm_tag: str = "", notes: tuple[str, ...] = ()) -> DeviceSpec:
    """A CPU-only device: LLVM target, no separate host."""
    target: dict[str, Any] = {"kind": "llvm", "mtriple": mtriple, "mcpu": mcpu, "num-cores": cores}
    if mattr:
        target["mattr"] = list(mattr)
    return DeviceSpec(
        name=name, target=target, host=None, memory_bytes=int(memory_gb * GIB), cores=cores,
        peak_gflops=round(cores * ghz * flop_per_cycle, 1), mem_gbps=mem_gbps, description=description,
        sources=sources, tvm_tag=tvm_tag, notes=notes,
    )


def _jetson(name: str, *, arch: str, host_mcpu: str, host_cores: int, memory_gb: float, gpu_gflops: float,
            mem_gbps: float, description: str, sources: tuple[str, ...], tvm_tag: str,
            notes: tuple[str, ...] = ()) -> DeviceSpec:
    """A Jetson module: CUDA target with an aarch64 host (CPU and GPU share the module's memory)."""
    host = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": host_mcpu, "mattr": ["+neon"],
            "num-cores": host_cores}
    return DeviceSpec(
        name=name, target={"kind": "cuda", "arch": arch}, host=host, memory_bytes=int(memory_gb * GIB),
        cores=host_cores, peak_gflops=gpu_gflops, mem_gbps=mem_gbps, description=description,
        sources=sources, tvm_tag=tvm_tag, notes=notes,
    )


_STATIC: tuple[DeviceSpec, ...] = (
    _cpu("pi4", mtriple="aarch64-linux-gnu", mcpu="cortex-a72", mattr=("+neon",), cores=4, memory_gb=4,
         ghz=1.5, flop_per_cycle=8, mem_gbps=12.8, tvm_tag="raspberry-pi/4b-aarch64",
         description="Raspberry Pi 4 Model B 4 GB, Cortex-A72 x4 @ 1.5 GHz, 64-bit OS",
         sources=("TVM tag raspberry-pi/4b-aarch64 (target)",
                  "Raspberry Pi 4 product brief: BCM2711 Cortex-A72 x4 @ 1.5 GHz, LPDDR4-3200",
                  "8 FP32 FLOP/cycle/core assumed: one 128-bit NEON FMA per cycle (Cortex-A72)",
                  "LPDDR4-3200 x 32-bit bus = 12.8 GB/s")),
    _cpu("pi5", mtriple="aarch64-linux-gnu", mcpu="cortex-a76", mattr=("+neon",), cores=4, memory_gb=8,
         ghz=2.4, flop_per_cycle=16, mem_gbps=17.1,
         description="Raspberry Pi 5 8 GB, Cortex-A76 x4 @ 2.4 GHz (no TVM tag; target written by hand)",
         sources=("Raspberry Pi 5 product brief: BCM2712 Cortex-A76 x4 @ 2.4 GHz, LPDDR4X-4267",
                  "Arm Cortex-A76 optimization guide: 2x 128-bit FMA pipes -> 16 FP32 FLOP/cycle",
                  "LPDDR4X-4267 x 32-bit bus = 17.1 GB/s")),
    _cpu("jetson-nano", mtriple="aarch64-linux-gnu", mcpu="cortex-a57", mattr=("+neon",), cores=4,
         memory_gb=4, ghz=1.43, flop_per_cycle=8, mem_gbps=25.6, tvm_tag="nvidia/jetson-nano",
         description="NVIDIA Jetson Nano 4 GB, CPU only: Cortex-A57 x4 @ 1.43 GHz",
         sources=("TVM tag nvidia/jetson-nano (GPU sm_53; the tag has no host, CPU target written by hand)",
                  "Jetson Nano data sheet: Cortex-A57 x4 @ 1.43 GHz, 4 GB LPDDR4 64-bit 25.6 GB/s",
                  "8 FP32 FLOP/cycle/core assumed: one 128-bit NEON FMA per cycle (Cortex-A57)"),
         notes=("GPU not used: its Maxwell GPU is sm_53 and CUDA 13 cannot compile sm_53 ahead of time, "
                "so distree targets the Cortex-A57 CPU only",)),
    _jetson("jetson-orin-nano", arch="sm_87", host_mcpu="cortex-a78ae", host_cores=6, memory_gb=8,
            gpu_gflops=1280.0, mem_gbps=68.0, tvm_tag="nvidia/jetson-orin-nano",
            description="NVIDIA Jetson Orin Nano 8 GB: Ampere GPU sm_87 (1024 CUDA cores) + Cortex-A78AE x6",
            sources=("TVM tag nvidia/jetson-orin-nano (CUDA sm_87)",
                     "Jetson Orin Nano data sheet: 1024 CUDA cores @ 625 MHz -> 1.28 TFLOP/s FP32, "
                     "8 GB LPDDR5 128-bit 68 GB/s, Cortex-A78AE x6 @ 1.5 GHz"),
            notes=("host CPU set to cortex-a78ae: TVM's tag names carmel (the Xavier core)",)),
    _cpu("x86-server", mtriple="x86_64-linux-gnu", mcpu="cascadelake", cores=16, memory_gb=64,
         ghz=2.5, flop_per_cycle=64, mem_gbps=140.8,
         description="Generic x86-64 server: 16 AVX-512 cores @ 2.5 GHz, 6-channel DDR4-2933",
         sources=("Intel Xeon (Cascade Lake) 2x AVX-512 FMA units -> 64 FP32 FLOP/cycle",
                  "6 channels x DDR4-2933 x 8 bytes = 140.8 GB/s",
                  "a nominal machine, not a product: give your own in a topology file")),
)

# FP32 FLOP per cycle per core by the widest FMA the host CPU has (two FMA pipes assumed).
_HOST_FLOP_PER_CYCLE = (("avx512f", 64), ("fma", 32), ("avx", 16), ("asimd", 16))
_HOST_MEM_GBPS = 51.2  # nominal: 2 channels DDR4-3200; the estimator calibrates against this figure


def _cpu_flags_and_mhz(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[set[str], float]:
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return set(flags.group(1).split()) if flags else set(), float(mhz.group(1)) if mhz else 2000.0


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@functools.lru_cache(maxsize=1)
def host_device() -> DeviceSpec:
    """This machine, detected through TVM's LLVM (``mcpu: native`` is not accepted by LLVM 22)."""
    from tvm.target import codegen

    cores = os.cpu_count() or 1
    flags, mhz = _cpu_flags_and_mhz()
    flop_per_cycle = next((n for flag, n in _HOST_FLOP_PER_CYCLE if flag in flags), 8)
    triple = codegen.llvm_get_system_triple()
    mcpu = codegen.llvm_get_system_cpu()
    return _cpu(
        "host", mtriple=triple, mcpu=mcpu, cores=cores, memory_gb=_physical_memory_bytes() / GIB,
        ghz=mhz / 1000, flop_per_cycle=flop_per_cycle, mem_gbps=_HOST_MEM_GBPS,
        description=f"this machine: {mcpu}, {cores} cores @ {mhz:.0f} MHz",
        sources=("detected: tvm llvm_get_system_triple/llvm_get_system_cpu, os.cpu_count, physical pages (sysconf)",
                 f"/proc/cpuinfo: {mhz:.0f} MHz, {flop_per_cycle} FP32 FLOP/cycle from its ISA flags",
                 f"memory bandwidth {_HOST_MEM_GBPS} GB/s is nominal (2 ch DDR4-3200), not measured"),
    )


def list_devices() -> tuple[DeviceSpec, ...]:
    """Every catalog device, ``host`` (this machine) first."""
    return (host_device(), *_STATIC)


def device_names() -> tuple[str, ...]:
    return ("host", *(d.name for d in _STATIC))


def get_device(name: str) -> DeviceSpec:
    """The catalog entry ``name``; a DistreeError lists the known names."""
    if name == "host":
        return host_device()
    for dev in _STATIC:
        if dev.name == name:
            return dev
    raise DistreeError(
        f"unknown device {name!r}; known devices: {', '.join(device_names())} "
        "(or describe it in a topology file: distree devices --help)"
    )


def target_summary(dev: DeviceSpec) -> str:
    """One-line form of the TVM target, e.g. ``llvm cortex-a72`` or ``cuda sm_87``."""
    t = dev.target
    detail: Optional[str] = t.get("mcpu") or t.get("arch")
    return f"{t['kind']} {detail}" if detail else str(t["kind"])
