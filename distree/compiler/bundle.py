"""Build the bundle: per device, its sub-segments as TVM libraries or ONNX Runtime models, plus the
threshold table and a manifest that hashes every file. Written atomically: a failed build leaves nothing."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import helper

from distree.compiler.manifest import (
    MANIFEST, SCORE_DEFINITIONS, THRESHOLDS, DeviceArtifact, Manifest, SegmentArtifact, TensorSpec,
    ThresholdEntry, ThresholdTable, sha256_file, versions,
)
from distree.compiler.segments import SegmentSpec, plan_segments, segment_model
from distree.compiler.tvm_build import compile_segment
from distree.targets.toolchain import cross_compiler, host_runnable
from distree.errors import DistreeError
from distree.exits.types import Calibration
from distree.graph import Chain
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
                 log: Log = lambda msg: None) -> Path:
    """Compile every stage of ``plan`` into ``out_dir`` (replaced atomically) and return it.

    ``backend``: ``tvm`` ships TVM everywhere, ``ort`` ONNX Runtime everywhere, ``auto`` TVM where its
    latency on this host (the proxy for the target) is at most ONNX Runtime's. ``tune_minutes`` > 0 tunes
    the host-target segments with MetaSchedule first (records in ``tuning_db``, reused across runs).
    """
    if backend not in BACKENDS:
        raise DistreeError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    specs = plan_segments(plan, chain, calibration.exits)
    devices = {stage.device: _device(topology, stage.device) for stage in plan.stages}
    if backend != "ort":
        for dev in devices.values():
            cross_compiler(dev)                 # fail before any work when a cross compiler is missing
    host = get_device("host")
    if tune_minutes > 0:
        local = [s for s in specs if host_runnable(devices[s.device])]
        remote = sorted({s.device for s in specs} - {s.device for s in local})
        if remote:
            log(f"not tuning {', '.join(remote)}: tuning runs on this machine only (MetaSchedule over RPC is not "
                "supported yet); their TVM code stays untuned")
        if local:
            tuning_db = _tune(model, chain, local, host, tune_minutes, tuning_db, log)
    set_tvm_threads(threads)
    out = Path(out_dir)
    with atomic_directory(out) as tmp, tempfile.TemporaryDirectory(prefix="distree-proxy-") as proxy_dir:
        artifacts: dict[int, list[SegmentArtifact]] = {}
        for n, spec in enumerate(specs, 1):
            dev = devices[spec.device]
            log(f"[{n}/{len(specs)}] {spec.device}: blocks {spec.first_block}..{spec.last_block}"
                + (f" -> exit {spec.exit.name}" if spec.exit else ""))
            artifacts.setdefault(spec.stage_index, []).append(_build_segment(
                model, chain, spec, dev, host, tmp, Path(proxy_dir), backend, tuning_db, threads,
                require_aot_cuda))
        table = _threshold_table(plan, calibration)
        table.save(tmp / THRESHOLDS)
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
            ratio_measured_on=f"host proxy: {host.description}, {threads} thread(s)",
            source=plan.source, input=TensorSpec(chain.input_name, tuple(chain.input_shape), chain.input_dtype),
            plan=plan, stages=stages, files=files, notes=_notes(stages, backend))
        manifest.save(tmp / MANIFEST)
    log(f"bundle written: {out}")
    return out



def _device(topology: Topology, name: str) -> DeviceSpec:
    try:
        return topology.device(name)
    except KeyError:
        raise DistreeError(f"the plan uses device {name!r}, which the topology does not list "
                           f"({', '.join(d.name for d in topology.devices)}); re-plan for this topology") from None


def _tune(model: onnx.ModelProto, chain: Chain, specs: tuple[SegmentSpec, ...], host: DeviceSpec,
          minutes: float, tuning_db: Optional[Path], log: Log) -> Path:
    """MetaSchedule on this machine for the host target, over the segments that run here."""
    from distree.compiler.tuning import tune

    db = Path(tuning_db or Path(".distree-cache") / "tuning")
    models = [segment_model(model, chain, s) for s in specs]
    log(f"tuning {len(models)} segment(s) for {host.name} for {minutes:g} min (records: {db})")
    result = tune(models, host.target, minutes, db)
    log(f"tuning: {result.trials} trials in {result.wall_s:.0f} s ({result.stopped})")
    return db


def _tensor_specs(values) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim),
                   np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name)
        for v in values)


def _build_segment(model: onnx.ModelProto, chain: Chain, spec: SegmentSpec, dev: DeviceSpec, host: DeviceSpec,
                   root: Path, proxy_dir: Path, backend: str, tuning_db: Optional[Path], threads: int,
                   require_aot_cuda: bool) -> SegmentArtifact:
    seg = segment_model(model, chain, spec)
    rel = Path(dev.name) / spec.stem
    onnx_rel = rel.with_suffix(".onnx")
    write_bytes_atomic(root / onnx_rel, seg.SerializeToString())
    (input_spec,) = _tensor_specs(seg.graph.input)
    outputs = _tensor_specs(seg.graph.output)
    common = dict(onnx_file=str(onnx_rel), first_block=spec.first_block, last_block=spec.last_block,
                  input=input_spec, outputs=outputs, exit=spec.exit.name if spec.exit else None,
                  entry_output=spec.entry_output, is_final=spec.is_final)
    if backend == "ort":
        return SegmentArtifact(file=str(onnx_rel), backend="ort", backend_reason="--backend ort",
                               tvm_ms=None, ort_ms=None, ratio=None, **common)
    so_rel = rel.with_suffix(".so")
    build = compile_segment(seg, dev, root / so_rel, tuning_db, require_aot_cuda)
    probe = np.random.default_rng(0).standard_normal(input_spec.shape).astype(input_spec.dtype)
    ort_ms = median_ms(ort_runner(seg.SerializeToString(), threads), probe)
    if dev.target.get("kind") == "cuda":
        tvm_ms, ratio = None, None
        reason = ("CUDA target: TVM ships (the GPU is why the device is used; this host's CPU cannot stand in "
                  "for it, and ONNX Runtime would run on the device's CPU)")
        chosen = "tvm"
    else:
        # the proxy gets the artifact's tuning state: host records must not make untuned device code look fast
        proxy = root / so_rel if host_runnable(dev) else compile_segment(
            seg, host, proxy_dir / f"{dev.name}_{spec.stem}.so", tuning_db if build.tuned else None).path
        tvm_ms = median_ms(tvm_runner(proxy), probe)
        ratio = tvm_ms / ort_ms
        chosen, reason = _choose(backend, ratio)
    return SegmentArtifact(file=str(so_rel if chosen == "tvm" else onnx_rel), backend=chosen,
                           backend_reason=reason, tvm_ms=tvm_ms, ort_ms=ort_ms, ratio=ratio,
                           tvm_file=str(so_rel), tuned=build.tuned, cuda=build.cuda, **common)


def _choose(backend: str, ratio: float) -> tuple[str, str]:
    if backend == "tvm":
        return "tvm", f"--backend tvm (TVM/ORT = {ratio:.2f} on the host proxy)"
    if ratio <= 1.0:
        return "tvm", f"auto: TVM/ORT = {ratio:.2f} <= 1 on the host proxy"
    return "ort", f"auto: TVM/ORT = {ratio:.2f} > 1 on the host proxy, so ONNX Runtime ships"


def _threshold_table(plan: Plan, calibration: Calibration) -> ThresholdTable:
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
    ort = [s for _, s in segs if s.backend == "ort"]
    if backend == "auto" and ort:
        worst = ", ".join(f"{s.ratio:.1f}x" for s in ort if s.ratio is not None)
        advice = ("their TVM builds used tuning records; more --tune-minutes may close the gap"
                  if all(s.tuned for s in ort) else
                  "untuned TVM CPU code is typically 40-100x slower: tune with --tune-minutes to close the gap")
        notes.append(f"{len(ort)} of {len(segs)} segment(s) ship as ONNX Runtime because TVM was slower on the "
                     f"host proxy (TVM/ORT {worst}); {advice}")
    untuned = sorted({name for name, s in segs if s.backend == "tvm" and not s.tuned})
    if untuned:
        notes.append(f"TVM segments on {', '.join(untuned)} are untuned (no MetaSchedule records for their target)")
    for name, s in segs:
        if s.cuda and "NVRTC" in s.cuda:
            notes.append(f"{s.file}: {s.cuda}")
    return tuple(notes)
