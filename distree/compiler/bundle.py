"""Build the bundle: per device, its sub-segments as TVM libraries or ONNX Runtime models, plus the
threshold table and a manifest that hashes every file. Written atomically: a failed build leaves nothing."""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import onnx
from onnx import helper

from distree.compiler.manifest import (
    MANIFEST, PLANNING, SCORE_DEFINITIONS, THRESHOLDS, DeviceArtifact, Manifest, SegmentArtifact, TensorSpec,
    ThresholdEntry, ThresholdTable, check_bundle_target, sha256_file, versions,
)
from distree.compiler.segments import SegmentSpec, plan_segments, segment_model
from distree.compiler.tvm_build import compile_segment
from distree.targets.toolchain import check_tvm_imports, cross_compiler, host_runnable, tvm_cudart, tvm_target, \
    tvm_gap, tvm_lacks
from distree.errors import DistreeError
from distree.exits.types import Calibration
from distree.graph import Chain
from distree.profiler.types import Profile
from distree.profiler.items import CALL_ITEM, block_item, entry_item, exit_item
from distree.runtime.backends import median_ms, ort_runner, set_tvm_threads, tvm_runner
from distree.serde import atomic_directory, write_bytes_atomic
from distree.solver.plan import Plan
from distree.targets import get_device
from distree.targets.spec import DeviceSpec, Topology

BACKENDS = ("tvm", "ort", "auto")
Log = Callable[[str], None]


def build_bundle(model: onnx.ModelProto, chain: Chain, plan: Plan, topology: Topology, calibration: Calibration,
                 out_dir: str | Path, backend: str = "auto", tune_minutes: float = 0, *,
                 tuning_db: Optional[Path] = None, threads: int = 1, require_aot_cuda: bool = False,
                 rpc: Optional[Mapping[str, str]] = None, profile: Optional[Profile] = None,
                 log: Log = lambda msg: None) -> Path:
    """Compile every stage of ``plan`` into ``out_dir`` (replaced atomically) and return it.

    ``backend``: ``tvm`` ships TVM everywhere, ``ort`` ONNX Runtime everywhere, ``auto`` TVM where its
    latency on this host (the proxy for the target) is at most ONNX Runtime's. ``tune_minutes`` > 0 tunes
    each device's segments with MetaSchedule first, for up to that many minutes per device (records in
    ``tuning_db``, reused across runs): see :func:`tuning_sites` for where each device is measured
    (``rpc``: device name -> ``host:port`` of its TVM RPC server). The plan's inputs (chain, calibration,
    topology, and ``profile`` when given) go to ``planning/``, so the bundle alone can be simulated or re-planned.
    """
    if backend not in BACKENDS:
        raise DistreeError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    check_bundle_target(out_dir)
    devices = {stage.device: _device(topology, stage.device) for stage in plan.stages}
    gpus = [name for name, dev in devices.items() if dev.target.get("kind") == "cuda"] if backend == "auto" else []
    specs = plan_segments(plan, chain, calibration.exits,
                          split_before=dict.fromkeys(gpus, tvm_handovers(chain)) if gpus else None)
    if backend != "ort":
        for dev in devices.values():
            cross_compiler(dev)                 # fail before any work when a cross compiler is missing
    host = get_device("host")
    tuning_notes: tuple[str, ...] = ()
    if tune_minutes > 0 and backend == "ort":
        log("not tuning: --backend ort ships no TVM code")
    elif tune_minutes > 0:
        sites, tuning_notes = tuning_sites(list(devices.values()), rpc or {})
        for note in tuning_notes:
            log(f"not tuning {note}")
        for dev, address in sites:
            tuning_db = _tune(model, chain, [s for s in specs if s.device == dev.name], dev, address, tune_minutes,
                              tuning_db, log)
    set_tvm_threads(threads)
    out = Path(out_dir)
    with atomic_directory(out) as tmp, tempfile.TemporaryDirectory(prefix="distree-proxy-") as proxy_dir:
        artifacts: dict[int, list[SegmentArtifact]] = {}
        on_device: dict[str, DeviceTimes] = {}
        for n, spec in enumerate(specs, 1):
            dev = devices[spec.device]
            log(f"[{n}/{len(specs)}] {spec.device}: blocks {spec.first_block}..{spec.last_block}"
                + (f" -> exit {spec.exit.name}" if spec.exit else ""))
            times = _on_device(profile, dev, spec) if backend != "ort" else None
            artifact = _build_segment(model, chain, spec, dev, host, tmp, Path(proxy_dir), backend, tuning_db,
                                      threads, require_aot_cuda, times, profile)
            if times is not None and not artifact.tuned:       # chosen by the device's own times
                on_device[dev.name] = times
            artifacts.setdefault(spec.stage_index, []).append(artifact)
        table = threshold_table(plan, calibration)
        table.save(tmp / THRESHOLDS)
        (tmp / PLANNING).mkdir()
        for name, record in (("chain", chain), ("calibration", calibration), ("topology", topology),
                             ("profile", profile)):
            if record is not None:
                record.save(tmp / PLANNING / f"{name}.json")
        stages = tuple(
            DeviceArtifact(name=stage.device, spec=devices[stage.device], stage_index=i,
                           first_block=stage.first_block, last_block=stage.last_block,
                           segments=tuple(artifacts[i]))
            for i, stage in enumerate(plan.stages))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = Manifest(
            **versions(), model_sha256=chain.model_sha256,
            created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            score_kind=plan.score_kind, backend_mode=backend,
            ratio_measured_on=f"host proxy: {host.description}, {threads} thread(s)" + "".join(
                f"; {name}: on itself ({times.where})" for name, times in on_device.items()),
            source=plan.source, input=TensorSpec(chain.input_name, tuple(chain.input_shape), chain.input_dtype),
            plan=plan, stages=stages, files=files, notes=tuning_notes + _notes(stages, backend))
        manifest.save(tmp / MANIFEST)
    log(f"bundle written: {out}")
    return out



def _device(topology: Topology, name: str) -> DeviceSpec:
    try:
        return topology.device(name)
    except KeyError:
        raise DistreeError(f"the plan uses device {name!r}, which the topology does not list "
                           f"({', '.join(d.name for d in topology.devices)}); re-plan for this topology") from None


def tuning_sites(devices: list[DeviceSpec], rpc: Mapping[str, str]
                 ) -> tuple[list[tuple[DeviceSpec, Optional[str]]], tuple[str, ...]]:
    """Where each device's candidates are timed: ``(device, None)`` here, ``(device, "host:port")`` on
    its TVM RPC server; and one note per device that is not tuned (CUDA: distree does not tune GPUs).

    A CPU device of another architecture without an RPC address is a user error, raised before any work:
    tuning it here would time the wrong CPU, and shipping it untuned while tuning was asked is easy to
    miss. Devices named in ``rpc`` are tuned there even when this machine could run their code.
    """
    sites, notes = [], []
    for dev in devices:
        if dev.target.get("kind") != "llvm":
            notes.append(f"{dev.name}: its {dev.target.get('kind')} kernels ship untuned (TVM's default GPU "
                         "schedules): tuning them means MetaSchedule timing candidates on the GPU, which distree "
                         "does not do")
        elif dev.name in rpc:
            sites.append((dev, rpc[dev.name]))
        elif host_runnable(dev):
            sites.append((dev, None))
        else:
            raise DistreeError(f"--tune-minutes: {dev.name} is tuned on the device over TVM RPC; start its server "
                               "there (python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090) and pass "
                               f"--rpc {dev.name}=HOST:9090, or leave --tune-minutes at 0")
    return sites, tuple(notes)


def _tune(model: onnx.ModelProto, chain: Chain, specs: list[SegmentSpec], dev: DeviceSpec, rpc: Optional[str],
          minutes: float, tuning_db: Optional[Path], log: Log) -> Path:
    """MetaSchedule for one device over its segments: timed here (``rpc`` None) or on its RPC server."""
    from distree.compiler.tuning import tune

    db = Path(tuning_db or Path(".distree-cache") / "tuning")
    models = [m for m in (segment_model(model, chain, s) for s in specs) if not tvm_gap(m)]
    where = "on this machine" if rpc is None else f"on rpc://{rpc}"
    log(f"tuning {len(models)} segment(s) of {dev.name} {where} for {minutes:g} min (records: {db})")
    result = tune(models, tvm_target(dev), minutes, db, rpc=rpc, cc=cross_compiler(dev))
    log(f"tuning {dev.name}: {result.trials} trials in {result.wall_s:.0f} s ({result.stopped}; "
        f"{sum(t.earlier for t in result.tasks)} earlier records reused)")
    return db


def _tensor_specs(values) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim),
                   np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name)
        for v in values)


@dataclass(frozen=True)
class DeviceTimes:
    """A segment's TVM and ONNX Runtime times on the device itself, from a profile measured there."""

    tvm_ms: float
    ort_ms: float
    where: str


def profile_segment_ms(profile: Profile, device: str, spec: SegmentSpec, backend: str) -> Optional[float]:
    """The segment's time on ``device`` with ``backend`` by the profile: its blocks and heads without the call
    each standalone measurement paid, plus one call (the solver's accounting). None: an item lacks that backend."""
    items = [block_item(b) for b in range(spec.first_block, spec.last_block + 1)]
    items += [exit_item(spec.exit.name)] if spec.exit else []
    items += [entry_item(spec.exit.name)] if spec.entry_output else []
    try:
        call = profile.get(device, CALL_ITEM, backend).median_ms
        return call + sum(max(0.0, profile.get(device, item, backend).median_ms - call) for item in items)
    except KeyError:
        return None


def _on_device(profile: Optional[Profile], dev: DeviceSpec, spec: SegmentSpec) -> Optional[DeviceTimes]:
    """The segment's time per backend from the device's own profile (``distree profile`` run on it). None when
    the device's code runs here (its segment is timed directly) or the profile did not time both backends there."""
    if profile is None or host_runnable(dev) or dev.target.get("kind") != "llvm":
        return None
    settings = profile.settings.get(dev.name, {})
    if settings.get("provenance") != "local":
        return None
    tvm_ms, ort_ms = (profile_segment_ms(profile, dev.name, spec, b) for b in ("tvm", "ort"))
    if tvm_ms is None or ort_ms is None:
        return None
    return DeviceTimes(tvm_ms, ort_ms, settings.get("measured_on") or dev.name)


def _build_segment(model: onnx.ModelProto, chain: Chain, spec: SegmentSpec, dev: DeviceSpec, host: DeviceSpec,
                   root: Path, proxy_dir: Path, backend: str, tuning_db: Optional[Path], threads: int,
                   require_aot_cuda: bool, on_device: Optional[DeviceTimes], profile: Optional[Profile]
                   ) -> SegmentArtifact:
    seg = segment_model(model, chain, spec)
    rel = Path(dev.name) / spec.stem
    onnx_rel = rel.with_suffix(".onnx")
    write_bytes_atomic(root / onnx_rel, seg.SerializeToString())
    (input_spec,) = _tensor_specs(seg.graph.input)
    outputs = _tensor_specs(seg.graph.output)
    common = dict(onnx_file=str(onnx_rel), first_block=spec.first_block, last_block=spec.last_block,
                  input=input_spec, outputs=outputs, exit=spec.exit.name if spec.exit else None,
                  entry_output=spec.entry_output, is_final=spec.is_final)
    ort_only = "--backend ort" if backend == "ort" else _tvm_cannot_build(seg, dev, backend)
    if ort_only:
        return SegmentArtifact(file=str(onnx_rel), backend="ort", backend_reason=ort_only,
                               tvm_ms=None, ort_ms=None, ratio=None,
                               **_expected(profile, dev, spec, "ort", None), **common)
    so_rel = rel.with_suffix(".so")
    build = compile_segment(seg, dev, root / so_rel, tuning_db, require_aot_cuda)
    probe = np.random.default_rng(0).standard_normal(input_spec.shape).astype(input_spec.dtype)
    ort_ms = median_ms(ort_runner(seg.SerializeToString(), threads), probe)
    if dev.target.get("kind") == "cuda":
        tvm_ms, ratio = None, None
        reason = ("CUDA target: TVM ships (the GPU is why the device is used; this host's CPU cannot stand in "
                  "for it, and ONNX Runtime would run on the device's CPU)")
        chosen = "tvm"
    elif on_device is not None and not build.tuned:     # the device's profile timed this very (untuned) code
        tvm_ms, ort_ms = on_device.tvm_ms, on_device.ort_ms
        ratio = tvm_ms / ort_ms
        chosen, reason = _choose(backend, ratio, f"on {dev.name} itself ({on_device.where}; its profile's blocks)")
    else:
        # the proxy gets the artifact's tuning state: host records must not make untuned device code look fast
        proxy = build if host_runnable(dev) else compile_segment(
            seg, host, proxy_dir / f"{dev.name}_{spec.stem}.so", tuning_db if build.tuned else None)
        tvm_ms = median_ms(tvm_runner(proxy.path), probe)
        ratio = tvm_ms / ort_ms
        chosen, reason = _choose(backend, ratio, "on the host proxy")
        if build.tuned and not proxy.tuned:
            reason += (f" (the proxy is untuned: the records of {dev.name} are for its CPU, and this host has "
                       "none; tune host too for a like-for-like ratio)")
    here = (tvm_ms if chosen == "tvm" else ort_ms) if host_runnable(dev) else None
    return SegmentArtifact(file=str(so_rel if chosen == "tvm" else onnx_rel), backend=chosen,
                           backend_reason=reason, tvm_ms=tvm_ms, ort_ms=ort_ms, ratio=ratio,
                           tvm_file=str(so_rel), tuned=build.tuned, cuda=build.cuda,
                           **_expected(profile, dev, spec, chosen, here), **common)


def tvm_handovers(chain: Chain) -> frozenset[int]:
    """Blocks where TVM's importer starts or stops lacking an op: on a GPU a segment ends before each, so TVM's
    kernels keep the rest of the stage on the GPU and ONNX Runtime runs only what TVM cannot (on the CPU)."""
    lacks = [bool(tvm_lacks(block.ops)) for block in chain.blocks]
    return frozenset(b for b in range(1, len(lacks)) if lacks[b] != lacks[b - 1])


def _tvm_cannot_build(seg: onnx.ModelProto, dev: DeviceSpec, backend: str) -> Optional[str]:
    """Why ONNX Runtime must ship this segment under ``auto`` (ops TVM's importer lacks), or None; under ``tvm``
    such a segment is an error (the user asked for TVM everywhere)."""
    gap = tvm_gap(seg)
    if not gap:
        return None
    if backend == "tvm":
        check_tvm_imports(seg, where=f"{dev.name}: --backend tvm: ")
    import tvm

    where = " on the device's CPU" if dev.target.get("kind") == "cuda" else ""
    return f"auto: TVM {tvm.__version__}'s ONNX importer does not support {gap}, so ONNX Runtime ships{where}"


def _expected(profile: Optional[Profile], dev: DeviceSpec, spec: SegmentSpec, backend: str,
              here: Optional[float]) -> dict:
    """What the segment should take on its device (the runtime's deadline estimates): timed here when this
    machine runs the device's code, else the device's profile (measured there or estimated), else unknown."""
    if here is not None:
        return {"expected_ms": here, "expected_from": "timed here"}
    ms = profile_segment_ms(profile, dev.name, spec, backend) if profile is not None else None
    if ms is None:
        return {}
    provenance = profile.settings.get(dev.name, {}).get("provenance", "?")
    return {"expected_ms": ms, "expected_from": f"profile of {dev.name} ({provenance})"}


def _choose(backend: str, ratio: float, where: str) -> tuple[str, str]:
    if backend == "tvm":
        return "tvm", f"--backend tvm (TVM/ORT = {ratio:.2f} {where})"
    if ratio <= 1.0:
        return "tvm", f"auto: TVM/ORT = {ratio:.2f} <= 1 {where}"
    return "ort", f"auto: TVM/ORT = {ratio:.2f} > 1 {where}, so ONNX Runtime ships"


def threshold_table(plan: Plan, calibration: Calibration) -> ThresholdTable:
    entry_of = {e.name: e.entry_output for e in calibration.exits}
    exits = tuple(
        ThresholdEntry(name=c.name, after_block=c.after_block, device=stage.device, threshold=c.threshold,
                       entry_output=entry_of.get(c.name) if plan.score_kind == "stability" else None)
        for stage in plan.stages for c in sorted(stage.exits, key=lambda c: c.after_block))
    return ThresholdTable(score_kind=plan.score_kind, score_definition=SCORE_DEFINITIONS[plan.score_kind],
                          exits=exits)


def _notes(stages: tuple[DeviceArtifact, ...], backend: str) -> tuple[str, ...]:
    """What a user must know about this bundle, said in the manifest and the summary."""
    segs = [(st.name, s) for st in stages for s in st.segments]
    notes = []
    cannot = [(st, s) for st in stages for s in st.segments if backend == "auto" and s.backend == "ort"
              and s.ratio is None]          # auto ships ONNX Runtime untimed only where TVM cannot import
    if cannot:
        gpus = sorted({st.name for st, _ in cannot if st.spec.target.get("kind") == "cuda"})
        notes.append(f"{len(cannot)} of {len(segs)} segment(s) ship as ONNX Runtime because TVM cannot import "
                     f"them ({', '.join(s.file for _, s in cannot)}; each segment's reason names the ops)"
                     + (f"; on {', '.join(gpus)} they run on the CPU, not the GPU" if gpus else ""))
    ort = [s for _, s in segs if s.backend == "ort" and s.ratio is not None]
    if backend == "auto" and ort:
        worst = ", ".join(f"{s.ratio:.1f}x" for s in ort if s.ratio is not None)
        advice = ("their TVM builds used tuning records; more --tune-minutes may close the gap"
                  if all(s.tuned for s in ort) else
                  "their TVM code is untuned (distree's default CPU schedules): --tune-minutes may close the gap")
        where = ("on the host proxy" if all("host proxy" in s.backend_reason for s in ort) else
                 "where timed (each segment's reason says where)")
        notes.append(f"{len(ort)} of {len(segs)} segment(s) ship as ONNX Runtime because TVM was slower {where} "
                     f"(TVM/ORT {worst}); {advice}")
    untuned = sorted({name for name, s in segs if s.backend == "tvm" and not s.tuned})
    if untuned:
        notes.append(f"TVM segments on {', '.join(untuned)} are untuned (no MetaSchedule records for their target; "
                     "CPU kernels use distree's default schedules)")
    for name, s in segs:
        if s.cuda and "NVRTC" in s.cuda:
            notes.append(f"{s.file}: {s.cuda}")
    notes += [_cuda_needs(name) for name in dict.fromkeys(name for name, s in segs if s.backend == "tvm" and s.cuda
                                                          and "no CUDA kernels" not in s.cuda)]
    return tuple(notes)


def _cuda_needs(device: str) -> str:
    """Which CUDA a device must have to run its TVM CUDA code: what the libraries link, not what they were built
    for (a Jetson's JetPack fixes its CUDA: JetPack 6 ships 12.x)."""
    from distree.compiler.cuda_aot import find_nvcc, nvcc_release

    cudart, nvcc = tvm_cudart(), find_nvcc()
    release = nvcc_release(nvcc) if nvcc else None
    parts = ([f"TVM's CUDA runtime links {cudart}"] if cudart else []) + \
        ([f"nvcc {release} built its kernels"] if release else [])
    if cudart:
        major = cudart.rsplit(".", 1)[-1]
    else:
        major = release.split(".")[0] if release else "?"
    return (f"{device}: its CUDA code needs CUDA {major} or newer on the device ({'; '.join(parts) or 'unknown'}); "
            f"with an older CUDA there (JetPack 6 ships 12.x) `distree serve` runs the stage's ONNX under ONNX "
            f"Runtime on its CPU instead and says why")
