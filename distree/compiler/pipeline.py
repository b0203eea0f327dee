"""``distree compile``: inspect -> exits -> calibrate -> profile -> plan -> build, each stage cached.

Every stage's result is stored under the cache directory, keyed by a hash of its inputs (model bytes,
data bytes, options, distree's own source and the keys of the stages before it), so a re-run with the same
inputs skips straight to the first stage whose inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import onnx

from distree.compiler.bundle import build_bundle, tuning_sites
from distree.compiler.manifest import Manifest, check_bundle_target, read_manifest, sha256_file
from distree.targets.toolchain import check_tvm_imports, cross_compiler, tvm_gap
from distree.errors import DistreeError
from distree.fingerprint import code_fingerprint
from distree.exits import Calibration, ExitPoint, calibrate, declared_exits, load_dataset, train_exits
from distree.exits.heads import headless_notes
from distree.graph import Chain, build_chain, load_model, model_sha256
from distree.profiler import Profile, cost_sources, device_part, merge_profiles, planning_items, profile_model
from distree.serde import write_bytes_atomic, write_json_atomic
from distree.sim.baselines import idle_device_costs
from distree.sim.inputs import Inputs, load_plan
from distree.solver import Constraints, Plan, check_constraints, solve
from distree.solver.plan import INTERRUPTED
from distree.solver.start import check_start
from distree.targets import load_topology, topology_for
from distree.targets.spec import Topology

T = TypeVar("T")
Log = Callable[[str], None]


@dataclass(frozen=True)
class CompileOptions:
    devices: tuple[str, ...] = ()
    topology: Optional[Path] = None
    accuracy_drop: float = 0.01
    confidence: Optional[float] = None
    deadline_ms: Optional[float] = None         # Constraints.deadline_ms: the no-exit path's latency bound
    min_throughput: Optional[float] = None      # Constraints.min_throughput: requests/s every stage sustains
    traffic: str = "sporadic"           # Constraints.traffic: what a hop costs in the plan
    score_kind: str = "max_softmax"
    backend: str = "auto"
    tune_minutes: float = 0.0
    time_limit_s: float = 60.0
    gap: float = 0.0                    # the solver stops once its plan is proven within this share of the optimum
    jobs: Optional[int] = None          # the solver's cores (None: every usable core)
    rpc: dict[str, str] = field(default_factory=dict)      # device -> host:port
    profiles: tuple[Path, ...] = ()     # profiles measured elsewhere (on the devices): their devices are not profiled
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    threads: int = 1
    seed: int = 0
    require_aot_cuda: bool = False
    start: Optional[Path] = None        # an earlier plan (Plan JSON or bundle) seeding the solve (`plan --start`)


@dataclass(frozen=True)
class CompileResult:
    bundle: Path
    plan: Plan
    manifest: Manifest
    stage_seconds: dict[str, float]
    cached: tuple[str, ...]         # stages answered from the cache
    wall_s: float
    devices: tuple[str, ...] = ()   # every device offered to the solver, in pipeline order
    costs: dict[str, str] = field(default_factory=dict)    # device -> where its costs come from (measured how, where)
    idle_ms: dict[str, Optional[float]] = field(default_factory=dict)  # device the plan leaves idle -> expected ms
    #                                   of the plan's exits placed through it (None: no such placement fits)


def compile_model(model_path: str | Path, data_path: str | Path, out_dir: str | Path, options: CompileOptions,
                  cache_dir: str | Path = ".distree-cache", log: Log = lambda msg: None,
                  progress: Log = lambda msg: None) -> CompileResult:
    """The whole chain from an ONNX classifier and calibration data to a verified-on-write bundle. ``log``
    hears each stage; ``progress``, how far a long one is (the item being profiled; the solver's best plan and
    gap)."""
    started = time.perf_counter()
    cache = _Cache(Path(cache_dir), log)
    constraints = Constraints(accuracy_drop=options.accuracy_drop, confidence=options.confidence,
                              deadline_ms=options.deadline_ms, min_throughput=options.min_throughput,
                              traffic=options.traffic, time_limit_s=options.time_limit_s, gap=options.gap,
                              jobs=options.jobs)
    check_constraints(constraints)         # these fail before any work: bad flags,
    check_bundle_target(out_dir)           # an -o folder that is not a bundle (it would be replaced),
    topology = _topology(options)          # unknown devices
    given = _given_profiles(options, topology)     # profiles of other devices or models, unreadable ones
    start = load_plan(options.start) if options.start else None     # a start plan that is not one
    if options.backend != "ort":
        for dev in topology.devices:
            cross_compiler(dev)                # so does a missing cross compiler
        if options.tune_minutes > 0:
            tuning_sites(list(topology.devices), options.rpc)   # and a remote CPU to tune without --rpc
    model_path, data_path = Path(model_path), Path(data_path)
    if not model_path.is_file():
        raise DistreeError(f"{model_path}: no such file; give the ONNX classifier to compile")
    model = cache.timed("inspect", lambda: load_model(model_path, options.input_shapes or None))
    if options.backend != "ort":
        _check_tvm_gaps(model, model_path, options, log)
    chain = build_chain(model)
    data = load_dataset(data_path, chain.input_shape)
    data_key = sha256_file(data_path)

    exits_key = _key("exits", code_fingerprint(), chain.model_sha256, data_key, options.score_kind, options.seed)
    model, exits = cache.get("exits", exits_key, lambda: _exits(model, chain, data, options, log),
                             save=_save_exits, load=_load_exits)
    chain = build_chain(model) if model_sha256(model) != chain.model_sha256 else chain

    cal_key = _key("calibrate", exits_key, chain.model_sha256)
    calibration = cache.get("calibrate", cal_key, lambda: calibrate(
        model, chain, exits, data, score_kind=options.score_kind, seed=options.seed), record=Calibration)

    prof_key = _key("profile", cal_key, topology.to_dict(), options.rpc, options.backend, options.threads,
                    {dev: sha256_file(path) for dev, (path, _) in given.items()})
    profile = cache.get("profile", prof_key, record=Profile,
                        compute=lambda: _profile(model, chain, exits, topology, options, given, cache.root, log,
                                                 progress))

    if start is not None:
        check_start(start, chain, calibration)     # of another model, or with exits these are not
    plan_key = _key("plan", prof_key, options.accuracy_drop, options.confidence, options.deadline_ms,
                    options.min_throughput, options.traffic, options.time_limit_s,
                    options.gap, constraints.jobs, start.to_dict() if start is not None else None)
    plan = cache.get("plan", plan_key, lambda: solve(chain, calibration, profile, topology, constraints, progress,
                                                     start), record=Plan,
                     unfinished=lambda plan: "Ctrl-C ended its search" if plan.status == INTERRUPTED else "")

    bundle = cache.timed("build", lambda: build_bundle(
        model, chain, plan, topology, calibration, out_dir, backend=options.backend,
        tune_minutes=options.tune_minutes, tuning_db=cache.root / "tuning", threads=options.threads,
        require_aot_cuda=options.require_aot_cuda, rpc=options.rpc, profile=profile, log=log))
    idle = idle_device_costs(Inputs(chain, calibration, profile, topology, samples=calibration), plan)
    return CompileResult(bundle=bundle, plan=plan, manifest=read_manifest(bundle), stage_seconds=cache.seconds,
                         cached=tuple(cache.hits), wall_s=time.perf_counter() - started,
                         devices=tuple(d.name for d in topology.devices), costs=cost_sources(profile), idle_ms=idle)


def _check_tvm_gaps(model: onnx.ModelProto, model_path: Path, options: CompileOptions, log: Log) -> None:
    """Ops TVM cannot import: an error under ``--backend tvm`` or with devices timed over RPC (which run TVM code
    only), else said once: the segments holding them ship as ONNX Runtime."""
    gap = tvm_gap(model)
    if not gap:
        return
    if options.backend == "tvm":
        check_tvm_imports(model, where=f"{model_path}: --backend tvm: ")
    if options.rpc:
        raise DistreeError(f"{model_path}: TVM cannot import {gap}, and a device timed "
                           f"over RPC ({', '.join(sorted(options.rpc))}) runs TVM code only; run `distree profile "
                           "--device NAME` on the device and pass --profile FILE instead of --rpc, or use --backend "
                           "ort")
    log(f"TVM cannot import {gap}: the segments holding them ship as ONNX Runtime")


def _topology(options: CompileOptions) -> Topology:
    if options.topology:
        return load_topology(options.topology)
    if not options.devices:
        raise DistreeError("no devices given; pass --devices pi4,jetson-orin-nano (see `distree devices`) "
                           "or --topology file.yaml")
    return topology_for(list(options.devices))


def _exits(model: onnx.ModelProto, chain: Chain, data, options: CompileOptions, log: Log
           ) -> tuple[onnx.ModelProto, tuple[ExitPoint, ...]]:
    """Declared exits when the model has them (plus entry heads for ``stability``); else trained ones (after
    every block a head can read; the others are named, with why)."""
    declared = declared_exits(model, chain)
    if declared and (options.score_kind != "stability" or all(e.entry_output for e in declared)):
        return model, declared
    if declared:
        return train_exits(model, chain, data, seed=options.seed, declared=declared)
    for line in headless_notes(model, chain):
        log(f"note: {line}")
    return train_exits(model, chain, data, seed=options.seed)


def _given_profiles(options: CompileOptions, topology: Topology) -> dict[str, tuple[Path, Profile]]:
    """device -> (file, its profile) for every device that --profile files cover, each device in one file."""
    names = [d.name for d in topology.devices]
    given: dict[str, tuple[Path, Profile]] = {}
    for path in options.profiles:
        if not Path(path).is_file():
            raise DistreeError(f"--profile {path}: no such file; give a profile.json written by `distree profile`")
        profile = Profile.load(path)
        for device in profile.devices:
            if device not in names:
                raise DistreeError(f"--profile {path} profiles {device}, which is not among the devices "
                                   f"({', '.join(names)}); name the device the same in --devices or the topology")
            if device in given:
                raise DistreeError(f"{device} is profiled in both {given[device][0]} and {path}; give one of them")
            if device in options.rpc:
                raise DistreeError(f"{device} has both --rpc and a --profile ({path}); give one of them")
            given[device] = (Path(path), profile)
    return given


def _profile(model: onnx.ModelProto, chain: Chain, exits: tuple[ExitPoint, ...], topology: Topology,
             options: CompileOptions, given: dict[str, tuple[Path, Profile]], cache_root: Path, log: Log,
             progress: Log) -> Profile:
    """Take the devices of --profile files from them, measure ``host`` locally, devices with --rpc over RPC and
    estimate the rest; one Profile for all."""
    parts = []
    needed = planning_items(chain, exits, options.score_kind)
    for dev in topology.devices:
        backends = {"tvm": ("tvm",), "ort": ("ort",), "auto": ("tvm", "ort")}[options.backend]
        if dev.name in given:
            path, measured = given[dev.name]
            log(f"profile {dev.name}: from {path}")
            parts.append(device_part(measured, str(path), dev.name, model_sha256(model), needed, backends))
            continue
        if dev.name in options.rpc:
            mode, rpc, backends = "rpc", options.rpc[dev.name], ("tvm",)
        else:
            mode, rpc = ("local" if dev.name == "host" else "estimate"), None

        def on_item(done: int, total: int, item: str, name: str = dev.name, how: str = mode) -> None:
            progress(f"profile {name} ({how}): {done}/{total} {item}")

        log(f"profile {dev.name} ({mode}) ...")
        parts.append(profile_model(model, chain, exits, dev, mode=mode, rpc=rpc, backends=backends,
                                   cache_dir=cache_root, progress=on_item))
        resumed = parts[-1].settings[dev.name].get("resumed_units")
        if resumed:
            log(f"profile {dev.name}: {resumed} units kept from an earlier run that stopped, the rest measured")
    return merge_profiles(parts)


def _save_exits(folder: Path, value: tuple[onnx.ModelProto, tuple[ExitPoint, ...]]) -> None:
    model, exits = value
    write_bytes_atomic(folder / "model.onnx", model.SerializeToString())
    write_json_atomic(folder / "exits.json", [e.to_dict() for e in exits])


def _load_exits(folder: Path) -> tuple[onnx.ModelProto, tuple[ExitPoint, ...]]:
    exits = tuple(ExitPoint.from_dict(d) for d in json.loads((folder / "exits.json").read_text()))
    return onnx.load(str(folder / "model.onnx")), exits


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _Cache:
    """Stage results on disk, keyed by content; records wall time and hits per stage."""

    def __init__(self, root: Path, log: Log) -> None:
        self.root, self.log = root, log
        self.seconds: dict[str, float] = {}
        self.hits: list[str] = []

    def timed(self, stage: str, compute: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        self.log(f"{stage} ...")
        value = compute()
        self.seconds[stage] = time.perf_counter() - t0
        return value

    def get(self, stage: str, key: str, compute: Callable[[], T], record=None,
            save: Optional[Callable[[Path, T], None]] = None, load: Optional[Callable[[Path], T]] = None,
            unfinished: Callable[[T], str] = lambda value: "") -> T:
        """The stage's stored result for ``key``, or ``compute()`` stored; not stored where ``unfinished(value)`` says
        why (a plan whose search Ctrl-C ended is not the answer for these inputs)."""
        folder = self.root / stage / key
        done = folder / "done"
        t0 = time.perf_counter()
        value, cached = None, done.is_file()
        if cached:
            try:
                value = record.load(folder / "value.json") if record else load(folder)
            except Exception as exc:    # a cache entry damaged on disk is a miss, not the user's error
                self.log(f"{stage}: the cached result in {folder} is unreadable ({_first_line(exc)}); computing it "
                         "again")
                cached = False
                done.unlink(missing_ok=True)
        if cached:
            self.hits.append(stage)
            self.log(f"{stage}: cached ({folder})")
        else:
            self.log(f"{stage} ...")
            value = compute()
            why = unfinished(value)
            if why:
                self.log(f"{stage}: not cached ({why})")
            else:
                if record:
                    value.save(folder / "value.json")
                else:
                    save(folder, value)
                write_bytes_atomic(done, b"")
        self.seconds[stage] = time.perf_counter() - t0
        return value
