"""``profile_model``: the cost of every block and exit head on one device, measured or estimated.

Modes (each Measurement's provenance says which):
- ``local``: compile each item for this machine and time it with TVM and ONNX Runtime;
- ``rpc``: cross-compile for the device, upload to its TVM RPC server (``host:port``) and time it there;
- ``qemu``: the same against an aarch64 RPC server emulated here under qemu-user (proves aarch64
  artifacts run; the timings are of the emulator, not of a Pi, and say so);
- ``estimate``: from FLOPs and bytes and the device's figures (see :mod:`distree.profiler.estimate`).

Profiles are cached under ``<cache>/profiles/`` by a key over the model, chain, exits, device, mode, settings,
tool versions and distree's own source; ``force=True`` measures again. A run that stops before the end (Ctrl-C, a
lost device, a crash) keeps every unit it measured in ``<key>.partial.jsonl`` beside, one line a unit, and the
same request picks up where it stopped: on a Pi over TVM RPC a large model takes minutes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import onnx

from distree import __version__
from distree.errors import DistreeError
from distree.fingerprint import code_fingerprint
from distree.interrupt import ctrl_c_ends, requested
from distree.exits.types import SCORE_KINDS, ExitPoint
from distree.graph import Chain, model_sha256
from distree.profiler import estimate as est
from distree.profiler import tvm_backend
from distree.profiler.dispatch import decide_entries, hop_entries
from distree.profiler.ort_backend import time_ort
from distree.targets.schedules import SCHEDULES
from distree.profiler.timing import TimingSettings, summarize
from distree.profiler.types import Measurement, Profile
from distree.profiler.items import CALL_ITEM, HOP_ITEMS, RPC_ITEM, block_item, decide_item, entry_item, exit_item
from distree.profiler.units import Unit, profile_units
from distree.serde import write_bytes_atomic
from distree.targets.emulation import default_cache_dir
from distree.targets.spec import DeviceSpec
from distree.targets.toolchain import host_arch, host_cpu, import_onnx, missing_cpu_features, \
    target_arch, tvm_device_here, tvm_gap, tvm_target

MODES = ("local", "rpc", "qemu", "estimate")
PARTIAL_SUFFIX = ".partial.jsonl"
ORT_ONLY_MEMORY = "graph-workspace-estimate (ONNX Runtime only: no TVM memory plan)"
QEMU_NOTE = "emulated under qemu-user on an x86 machine: proves the aarch64 artifact runs; NOT a device timing"
Progress = Callable[[int, int, str], None]


def default_backends(mode: str, device: Optional[DeviceSpec] = None) -> tuple[str, ...]:
    """ONNX Runtime is timed only here; over RPC only TVM artifacts can run on the device; a CUDA device ships TVM
    kernels only (ONNX Runtime would run on its CPU, which the compiler never ships there)."""
    gpu = device is not None and device.target.get("kind") == "cuda"
    return ("tvm",) if mode in ("rpc", "qemu") or gpu else ("tvm", "ort")


def profile_model(model: onnx.ModelProto, chain: Chain, exits: Sequence[ExitPoint], device: DeviceSpec,
                  mode: str = "local", rpc: Optional[str] = None, backends: Optional[Sequence[str]] = None,
                  cache_dir: Optional[Path] = None, force: bool = False, timing: Optional[TimingSettings] = None,
                  items: Optional[Sequence[str]] = None, progress: Optional[Progress] = None,
                  aarch64_root: Optional[Path] = None) -> Profile:
    """Profile every block and exit head, the cost of a call, an exit decision and a hop (or only ``items``, e.g.
    ``("block:0", "exit:exit_1")``)."""
    backends = tuple(backends) if backends else default_backends(mode, device)
    timing = timing or TimingSettings()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    check_request(device, mode, rpc, backends)
    decide_kinds = [k for k in SCORE_KINDS if items is None or decide_item(k) in items]
    with_rpc = items is None or bool(set(HOP_ITEMS) & set(items))     # timed together
    units = profile_units(model, chain, exits, items)
    gaps = tvm_gaps(units) if "tvm" in backends else {}
    unit_backends = backends_per_unit(units, backends, gaps, device, mode)
    key, versions = _cache_key(model, chain, exits, device, mode, rpc, backends, timing, units,
                               [*map(decide_item, decide_kinds), *(HOP_ITEMS if with_rpc else ())])
    cached = cache_dir / "profiles" / f"{key}.json"
    if cached.is_file() and not force:
        try:
            return Profile.load(cached)
        except DistreeError as exc:     # damaged on disk: a miss, measured again, not the user's error
            logging.getLogger(__name__).warning("%s; measuring %s again", exc, device.name)
    partial = cached.with_suffix(PARTIAL_SUFFIX)
    if force:       # what it replaces goes first: stopped, a run without --force resumes this one
        cached.unlink(missing_ok=True)
    kept = {} if force else _kept_units(partial, units)
    resumed = len(kept)
    _write_kept(partial, kept)      # drops a line torn by a kill, so that the next one starts a line of its own

    def kept_note() -> str:
        again = "the same command again without --force" if force else "the same command again"
        return f"{len(kept)} of {len(units)} units are measured and kept: run {again} to resume"

    with ctrl_c_ends(f"profiling {device.name}", "every unit it measured"):
        try:
            with _measurer(device, mode, rpc, timing, cache_dir, aarch64_root) as (measure, provenance, note):
                entries: list[Measurement] = []
                for done, unit in enumerate(units):
                    if requested():
                        raise KeyboardInterrupt(f"profiling {device.name} stopped; {kept_note()}")
                    if progress:
                        progress(done, len(units), unit.item + (" (measured by an earlier run)" if unit.item in kept
                                                                else ""))
                    if unit.item not in kept:
                        kept[unit.item] = _measure_remote(measure, unit, unit_backends[unit.item], provenance, note,
                                                          device, mode, kept_note)
                        _keep(partial, unit.item, kept[unit.item])
                    entries.extend(kept[unit.item])
                entries.extend(decide_entries(device, int(chain.blocks[-1].output_shape[-1]), timing,
                                              measured_here=mode == "local", score_kinds=decide_kinds))
                if with_rpc:
                    entries.extend(hop_entries(device, timing, measured_here=mode == "local"))
        except Exception as exc:
            if requested():     # the Ctrl-C reached the processes the profiler starts as well (an emulated device's
                #                 server, the gRPC peer): they failed
                raise KeyboardInterrupt(f"profiling {device.name} stopped; {kept_note()}") from exc
            raise
    if progress:
        progress(len(units), len(units), "done")
    settings = {device.name: {"mode": mode, "provenance": provenance, "backends": list(backends),
                              **({"ort_only": gaps} if gaps else {}),
                              "timing": timing.to_dict(), "items": [u.item for u in units],
                              "tvm_build": f"tvm.compile, untuned, {SCHEDULES}", "cache_key": key,
                              **({"measured_on": _measured_on(device)} if mode == "local" else {}),
                              **({"resumed_units": resumed} if resumed else {}),
                              **({"estimate_calibration": _calibration_summary()} if mode == "estimate" else {})}}
    profile = Profile(model_sha256=versions["model_sha256"], entries=tuple(entries), versions=versions,
                      settings=settings)
    profile.save(cached)
    partial.unlink(missing_ok=True)
    return profile


def _kept_units(path: Path, units: Sequence[Unit]) -> dict[str, list[Measurement]]:
    """item -> its measurements, for the ``units`` an earlier run of the same request measured before it stopped
    (``path``: its ``.partial.jsonl``); a line it did not finish (killed while writing) is measured again."""
    wanted = {u.item for u in units}
    kept: dict[str, list[Measurement]] = {}
    if not path.is_file():
        return kept
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
            entries = [Measurement.from_dict(m) for m in doc["entries"]]
        except (ValueError, KeyError, TypeError):
            continue
        if doc["item"] in wanted:
            kept[doc["item"]] = entries
    return kept


def _measure_remote(measure: Measure, unit: Unit, backends: tuple[str, ...], provenance: str, note: str,
                    device: DeviceSpec, mode: str, kept_note: Callable[[], str]) -> list[Measurement]:
    """``measure(unit)``; over TVM RPC a failure (most often a device lost) is a one-line error that says what
    is kept."""
    try:
        return measure(unit, backends, provenance, note)
    except Exception as exc:
        if mode not in ("rpc", "qemu") or requested():
            raise
        said = str(exc).strip().splitlines() or [type(exc).__name__]
        raise DistreeError(f"timing {unit.item} on {device.name} over TVM RPC ({provenance}) failed: "
                           f"{said[-1][:200]}; {kept_note()} once its RPC server is up again") from exc


def _keep(path: Path, item: str, entries: Sequence[Measurement]) -> None:
    """Append one unit's measurements as one line, flushed before the next unit starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(_kept_line(item, entries))


def _write_kept(path: Path, kept: dict[str, list[Measurement]]) -> None:
    if not kept:
        path.unlink(missing_ok=True)
        return
    write_bytes_atomic(path, "".join(_kept_line(item, entries) for item, entries in kept.items()).encode())


def _kept_line(item: str, entries: Sequence[Measurement]) -> str:
    return json.dumps({"item": item, "entries": [m.to_dict() for m in entries]}) + "\n"


def tvm_gaps(units: Sequence[Unit]) -> dict[str, str]:
    """item -> why TVM cannot build it (the ops its ONNX importer lacks), for the units it cannot."""
    gaps = {unit.item: tvm_gap(unit.model) for unit in units}
    return {item: gap for item, gap in gaps.items() if gap}


def backends_per_unit(units: Sequence[Unit], backends: tuple[str, ...], gaps: dict[str, str], device: DeviceSpec,
                      mode: str) -> dict[str, tuple[str, ...]]:
    """item -> the backends it is timed with: ``backends``, except that a unit TVM cannot import is timed with
    ONNX Runtime alone (what the compiler ships for a segment holding it), and then the call with ONNX Runtime
    too (that segment pays ONNX Runtime's call); ``gaps``: :func:`tvm_gaps` of the units. Over RPC (and qemu)
    only TVM code runs: a one-line error."""
    if gaps and mode in ("rpc", "qemu"):
        item, reason = next(iter(gaps.items()))
        raise DistreeError(f"{item} holds {reason}, which TVM's ONNX importer does not support, and over "
                           f"{mode} only TVM code runs on the device: run `distree profile --device {device.name}` "
                           "on the device itself (it times ONNX Runtime too), or estimate it (--estimate)")
    chosen = {}
    for unit in units:
        if unit.item in gaps:
            chosen[unit.item] = ("ort",)
        elif gaps and unit.item == CALL_ITEM:
            chosen[unit.item] = tuple(dict.fromkeys((*backends, "ort")))
        else:
            chosen[unit.item] = backends
    return chosen


def merge_profiles(profiles: Sequence[Profile]) -> Profile:
    """One profile over several devices (same model); a later profile's entry replaces an earlier one's."""
    if not profiles:
        raise DistreeError("nothing to merge: give at least one profile")
    shas = {p.model_sha256 for p in profiles}
    if len(shas) > 1:
        raise DistreeError(f"profiles are of different models ({', '.join(sorted(s[:12] for s in shas))}); "
                           "profile the same model for every device")
    entries: dict[tuple[str, str, str], Measurement] = {}
    settings: dict = {}
    versions: dict[str, str] = {}
    for p in profiles:
        entries.update({(m.device, m.item, m.backend): m for m in p.entries})
        settings.update(p.settings)
        versions.update({k: v for k, v in p.versions.items() if k != "cache_key"})
    return Profile(model_sha256=profiles[0].model_sha256, entries=tuple(entries.values()), versions=versions,
                   settings=settings)


def planning_items(chain: Chain, exits: Sequence[ExitPoint], score_kind: str) -> tuple[str, ...]:
    """The items the solver reads for every device: blocks, heads, a call, the exit decision and a hop."""
    heads = [exit_item(e.name) for e in exits]
    if score_kind == "stability":
        heads += [entry_item(e.name) for e in exits if e.entry_output]
    return (*(block_item(b.index) for b in chain.blocks), *heads, CALL_ITEM, decide_item(score_kind), RPC_ITEM)


def device_part(profile: Profile, source: str, device: str, model_sha: str, items: Sequence[str],
                backends: Sequence[str]) -> Profile:
    """``device``'s entries of a profile made elsewhere (``distree profile`` run on the device), restricted to
    ``backends`` (the Python and gRPC items whatever they are), after checking that they are of this model and
    cover ``items``."""
    if profile.model_sha256 != model_sha:
        raise DistreeError(f"{source} profiles model {profile.model_sha256[:12]}, this compile plans model "
                           f"{model_sha[:12]} (with its exit heads): profile on {device} the .onnx you compile, one "
                           "with exits declared (`distree exits MODEL --data DATA -o MODEL_EXITS.onnx` writes one)")
    keep = tuple(m for m in profile.entries if m.device == device
                 and (m.backend in backends or m.item in HOP_ITEMS or m.item.startswith("decide:")))
    have = {m.item for m in keep}
    missing = [item for item in items if item not in have]
    if missing:
        which = f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        raise DistreeError(f"{source} lacks {which} for {device} (kernels timed with {' or '.join(backends)}): run "
                           f"`distree profile MODEL --device {device}` there again, without --item, with this distree "
                           "(profiles from before it measured dispatch lack call, decide and rpc)")
    return Profile(model_sha256=model_sha, entries=keep, versions=profile.versions,
                   settings={device: {**profile.settings.get(device, {}), "from_file": source}})


def check_request(device: DeviceSpec, mode: str, rpc: Optional[str], backends: tuple[str, ...]) -> None:
    """A one-line error for a request that cannot be measured (mode, backends, this machine), before any work."""
    if mode not in MODES:
        raise DistreeError(f"unknown profiling mode {mode!r}; use one of {', '.join(MODES)}")
    bad = [b for b in backends if b not in ("tvm", "ort")]
    if bad:
        raise DistreeError(f"unknown backend {bad[0]!r}; use tvm and/or ort")
    if mode == "rpc" and not rpc:
        raise DistreeError("rpc profiling needs the device's TVM RPC server: --rpc HOST:PORT")
    if mode in ("rpc", "qemu") and "ort" in backends:
        raise DistreeError(f"{mode} profiling times TVM artifacts on the device; ONNX Runtime is timed only "
                           "locally: drop the ort backend")
    if mode == "local" and device.target.get("kind") == "cuda" and "ort" in backends:
        raise DistreeError(f"{device.name} runs TVM kernels on its GPU (ONNX Runtime would run on its CPU, which "
                           "distree never ships for a CUDA device): drop the ort backend")
    if mode == "local" and device.name != "host":
        _check_runs_here(device)
    if mode == "qemu":
        cpu = device.target
        if cpu.get("kind") != "llvm" or not str(cpu.get("mtriple", "")).startswith("aarch64"):
            raise DistreeError(f"--qemu emulates aarch64 CPUs; {device.name} targets {cpu.get('kind')} "
                               f"{cpu.get('mtriple') or cpu.get('arch', '')}: use --rpc or --estimate")


def _check_runs_here(device: DeviceSpec) -> None:
    """Local profiling times the device's own code on this machine: on the device itself (a Pi profiling
    ``pi4``), or on a machine of the same ISA that has every vector extension the code uses."""
    elsewhere = (f"run `distree profile ... --device {device.name}` on {device.name} itself, or use --rpc HOST:PORT "
                 "(its TVM RPC server), --qemu (aarch64 CPUs, emulated) or --estimate")
    if device.target.get("kind") == "cuda":
        where, why_not = tvm_device_here(device)
        if where != "cuda":
            raise DistreeError(f"local profiling runs {device.name}'s kernels on this machine's GPU, and {why_not}; "
                               f"{elsewhere}")
        return
    if device.target.get("kind") != "llvm" or target_arch(device) != host_arch():
        kind = device.target.get("kind")
        built_for = f"{target_arch(device)} CPUs" if kind == "llvm" else f"{kind} (a GPU)"
        raise DistreeError(f"local profiling runs {device.name}'s code on this machine, an {host_arch()} CPU, and "
                           f"{device.name}'s code is built for {built_for}; {elsewhere}")
    missing = missing_cpu_features(device)
    if missing:
        raise DistreeError(f"{device.name}'s code may use {', '.join(missing)}, which this machine's CPU "
                           f"({host_cpu()}) lacks; {elsewhere}")


def _local_note(device: DeviceSpec) -> str:
    """What a local measurement stands for when this machine is not the device's CPU model (or, for a GPU
    device, which GPU ran its kernels)."""
    if device.target.get("kind") == "cuda":
        return f"kernels timed on this machine's {_gpu_here()}"
    cpu = device.target.get("mcpu")
    if device.name == "host" or cpu == host_cpu():
        return ""
    return f"measured on this machine ({host_cpu()}) standing in for {device.name} ({cpu})"


def _gpu_here() -> str:
    import tvm

    gpu = tvm.cuda(0)
    return f"{gpu.device_name} (compute capability {gpu.compute_version})"


def _measured_on(device: DeviceSpec) -> str:
    """Where a local profile ran: this machine, its CPU, and the GPU for a CUDA device."""
    gpu = f"{_gpu_here()} with " if device.target.get("kind") == "cuda" else ""
    return f"{platform.node()}: {gpu}{host_cpu()}, {os.cpu_count()} cores"


def _cache_key(model, chain, exits, device, mode, rpc, backends, timing, units,
               timed_items) -> tuple[str, dict[str, str]]:
    import numpy
    import onnxruntime
    import tvm

    versions = {"distree": __version__, "distree_source": code_fingerprint(), "tvm": tvm.__version__,
                "onnxruntime": onnxruntime.__version__,
                "onnx": onnx.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
                "model_sha256": model_sha256(model),
                "device_sha256": _sha(device.to_dict())}
    if mode == "estimate":
        versions["estimate_calibration_sha256"] = _sha(json.loads(est.CALIBRATION_FILE.read_text())
                                                       if est.CALIBRATION_FILE.is_file() else None)
    doc = {"versions": versions, "chain": chain.to_dict(), "exits": [e.to_dict() for e in exits], "mode": mode,
           "rpc": rpc or "", "backends": list(backends), "timing": timing.to_dict(),
           "units": [u.sha256 for u in units], "timed_items": timed_items}
    key = _sha(doc)
    return key, {**versions, "cache_key": key}


def _sha(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _calibration_summary() -> dict:
    cal = est.load_calibration()
    return {"machine": cal.machine, "command": cal.command,
            **{c.backend: {"eff_compute": c.eff_compute, "eff_memory": c.eff_memory, "op_ms": c.op_ms,
                           "median_rel_error_on_calibration": c.median_rel_error} for c in cal.coefficients}}


Measure = Callable[[Unit, tuple[str, ...], str, str], list[Measurement]]


@contextlib.contextmanager
def _measurer(device: DeviceSpec, mode: str, rpc: Optional[str], timing: TimingSettings, cache_dir: Path,
              aarch64_root: Optional[Path]) -> Iterator[tuple[Measure, str, str]]:
    """(measure function, provenance, note) for the mode; remote sessions and servers live inside."""
    if mode == "estimate":
        cal = est.load_calibration()
        yield (lambda unit, backends, prov, note: _estimate(unit, backends, device, cal, timing, prov, note)), \
            "estimate", f"estimated from {device.name}'s catalog figures, calibrated on {cal.machine}"
        return
    if mode == "local":
        yield (lambda unit, backends, prov, note: measure_unit(unit, backends, device, timing, cache_dir, None,
                                                           prov, note)), "local", _local_note(device)
        return
    from distree.profiler.rpc import connect

    if mode == "rpc":
        session = connect(rpc)
        try:
            yield (lambda unit, backends, prov, note: measure_unit(unit, backends, device, timing, cache_dir,
                                                               session, prov, note)), f"rpc://{rpc}", ""
        finally:
            del session
            gc.collect()  # closes the socket: the device's server is free for the next session
        return
    from distree.targets.emulation import aarch64_rpc_server, ensure_aarch64_root

    root = ensure_aarch64_root(aarch64_root, log=lambda msg: print(msg, file=sys.stderr))
    with aarch64_rpc_server(root) as address:
        session = connect(address)
        try:
            yield (lambda unit, backends, prov, note: measure_unit(unit, backends, device, timing, cache_dir,
                                                               session, prov, note)), "qemu-emulated", QEMU_NOTE
        finally:
            del session
            gc.collect()


def _entry(device: DeviceSpec, unit: Unit, backend: str, provenance: str, samples: tuple[float, ...],
           median: float, p90: float, activation_bytes: int, memory_source: str, threads: int,
           note: str) -> Measurement:
    return Measurement(device=device.name, item=unit.item, backend=backend, provenance=provenance,
                       samples_ms=samples, median_ms=median, p90_ms=p90, param_bytes=unit.param_bytes,
                       activation_bytes=activation_bytes, memory_source=memory_source, threads=threads,
                       flops=unit.flops, note=note)


def measure_unit(unit: Unit, backends: tuple[str, ...], device: DeviceSpec, timing: TimingSettings,
                 cache_dir: Path, session=None, provenance: str = "local", note: str = "") -> list[Measurement]:
    """Compile (cached) and time one unit with each backend, here or over an RPC session."""
    compiled = tvm_backend.compile_unit(unit, device, cache_dir) if "tvm" in backends else None
    memory = ((compiled.activation_bytes, compiled.memory_source) if compiled is not None
              else (unit.workspace_bytes, ORT_ONLY_MEMORY))
    out = []
    for backend in backends:
        if backend == "tvm":
            samples = (tvm_backend.time_tvm_remote(session, compiled, unit, device, timing) if session is not None
                       else tvm_backend.time_tvm_local(compiled, unit, device, timing))
        else:
            samples = time_ort(unit, timing)
        out.append(_entry(device, unit, backend, provenance, samples, *summarize(samples), *memory, timing.threads,
                          note))
    return out


def _estimate(unit: Unit, backends: tuple[str, ...], device: DeviceSpec, cal: est.EstimateCalibration,
              timing: TimingSettings, provenance: str, note: str) -> list[Measurement]:
    if "tvm" in backends:        # TVM plans the memory of the code it would build (no compile happens)
        activation_bytes, memory_source = tvm_backend.planned_memory(import_onnx(unit.model), tvm_target(device),
                                                                     unit)
    else:
        activation_bytes, memory_source = unit.workspace_bytes, ORT_ONLY_MEMORY
    out = []
    for backend in backends:
        runs_on = est.host_cpu_view(device) if backend == "ort" else device     # distree runs ORT on CPUs only
        ms = est.unit_estimate_ms(unit, runs_on, cal.for_backend(backend), timing.threads)
        out.append(_entry(device, unit, backend, provenance, (), ms, ms, activation_bytes, memory_source,
                          timing.threads, note))
    return out
