"""TVM: compile a unit for a device (cached by content hash), plan its memory, time it here or over RPC."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from distree.profiler.timing import TimingSettings, time_callable
from distree.profiler.units import Unit
from distree.serde import write_json_atomic
from distree.targets.schedules import SCHEDULES, schedule_defaults
from distree.targets.spec import DeviceSpec
from distree.targets.toolchain import cross_compiler, export_library, import_onnx, tvm_target

STATIC_PLAN = "tvm-static-plan + io tensors"

# The passes of TVM 0.27's default CPU build pipeline (relax/pipeline.py) up to the static memory plan.
_PLAN_PASSES = ("LegalizeOps", "RewriteDataflowReshape", "ToNonDataflow", "RemovePurityChecking",
                "CallTIRRewrite", "StaticPlanBlockMemory")


@dataclass(frozen=True)
class CompiledUnit:
    path: Path                      # exported library (.so)
    activation_bytes: int           # planned activation bytes, or the graph's estimate (see memory_source)
    memory_source: str





def compile_key(unit: Unit, device: DeviceSpec) -> str:
    import tvm

    doc = {"unit": unit.sha256, "target": device.target, "host": device.host, "tvm": tvm.__version__,
           "cc": cross_compiler(device), "linked_by": "toolchain.export_library", "schedules": SCHEDULES}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def compile_unit(unit: Unit, device: DeviceSpec, cache_dir: Path) -> CompiledUnit:
    """The unit compiled by ``tvm.compile`` for ``device``; reused when the same key was built before."""
    key = compile_key(unit, device)
    so = Path(cache_dir) / "tvm" / f"{key}.so"
    meta = so.with_suffix(".json")
    if so.is_file() and meta.is_file():
        try:
            doc = json.loads(meta.read_text())
            return CompiledUnit(so, int(doc["activation_bytes"]), doc["memory_source"])
        except (ValueError, KeyError, TypeError):
            pass                # damaged on disk: built again below
    import tvm

    mod = import_onnx(unit.model)
    target = tvm_target(device)
    activation_bytes, memory_source = planned_memory(mod, target, unit)
    ex = tvm.compile(schedule_defaults(mod, target).mod, target=target)
    so.parent.mkdir(parents=True, exist_ok=True)
    tmp = so.with_name(f".{so.name}.{os.getpid()}.tmp.so")
    export_library(ex, device, tmp)
    os.replace(tmp, so)
    write_json_atomic(meta, {"activation_bytes": activation_bytes, "memory_source": memory_source,
                             "unit": unit.item, "device": device.name})
    return CompiledUnit(so, activation_bytes, memory_source)



def planned_memory(mod, target, unit: Unit) -> tuple[int, str]:
    """Activation bytes: the unit's input and output tensors (the plan leaves them out: they cross the
    function boundary) plus the sum of ``alloc_storage`` sizes after StaticPlanBlockMemory; the graph's
    working-set estimate if planning fails."""
    import tvm
    from tvm import relax

    try:
        seq = tvm.transform.Sequential([getattr(relax.transform, name)() for name in _PLAN_PASSES])
        with target:
            planned = seq(mod)
        total = 0

        def visit(expr) -> None:
            nonlocal total
            if (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
                    and expr.op.name == "relax.memory.alloc_storage"):
                total += int(expr.args[0].values[0])

        relax.analysis.post_order_visit(planned["main"].body, visit)
        return total + unit.io_bytes, STATIC_PLAN
    except Exception as exc:  # noqa: BLE001 - any failure here is recorded in the provenance, not hidden
        return unit.workspace_bytes, f"graph-workspace-estimate (TVM plan failed: {type(exc).__name__})"


def set_threads(config_threadpool, threads: int) -> None:
    """``runtime.config_threadpool(mode=kBig, nthreads)``, here or on a remote."""
    config_threadpool(1, threads)


def time_vm(vm, dev, x, settings: TimingSettings) -> tuple[float, ...]:
    """Samples in ms of the VM's ``main`` on ``x`` (already on ``dev``), TVM's own evaluator."""
    vm.set_input("main", x)
    if settings.warmup:
        vm.time_evaluator("invoke_stateful", dev, number=1, repeat=settings.warmup)("main")
    res = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=settings.repeats,
                            min_repeat_ms=int(settings.min_repeat_ms))("main")
    return tuple(float(r) * 1e3 for r in res.results)


def time_tvm_local(compiled: CompiledUnit, unit: Unit, device: DeviceSpec,
                   settings: TimingSettings) -> tuple[float, ...]:
    """Time the unit here through the runtime's own runner (input copied in, outputs copied out, Python around
    it), as ONNX Runtime's ``session.run`` is timed: on a GPU those synchronous copies cost as much as a small
    segment's kernels (H200: ~0.06 ms a segment TVM's evaluator does not see); on a CPU the runner's call took
    3.1 us against the evaluator's 1.0, which the example's host plans missed two or three times a request."""
    import tvm

    from distree.runtime.backends import tvm_runner

    set_threads(tvm.get_global_func("runtime.config_threadpool"), settings.threads)
    run, x = tvm_runner(compiled.path, "cuda" if device.target["kind"] == "cuda" else "cpu"), unit.sample_input()
    return time_callable(lambda: run(x), settings)


def time_tvm_remote(session, compiled: CompiledUnit, unit: Unit, device: DeviceSpec,
                    settings: TimingSettings) -> tuple[float, ...]:
    """Upload the library to an RPC session, load it there and time it on the remote CPU (or GPU)."""
    import tvm
    from tvm import relax

    name = compiled.path.name
    session.upload(str(compiled.path), target=name)
    rmod = session.load_module(name)
    set_threads(session.get_function("runtime.config_threadpool"), settings.threads)
    dev = session.cuda() if device.target["kind"] == "cuda" else session.cpu()
    vm = relax.VirtualMachine(rmod, dev)
    return time_vm(vm, dev, tvm.runtime.tensor(unit.sample_input(), device=dev), settings)
