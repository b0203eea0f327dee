"""``distree compile`` and ``distree verify``: thin adapters over the pipeline and the bundle checker."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import click

from distree.cli import (DEADLINE_OPTION, MIN_THROUGHPUT_OPTION, NON_NEGATIVE, NUMBER, OUTPUT_DIR, OUTPUT_FILE_OR_STDOUT,
                         TRAFFIC_OPTION)
from distree.errors import DistreeError


def _console():
    from rich.console import Console

    return Console(stderr=True, log_path=False, width=max(Console(stderr=True).width, 150))


@contextlib.contextmanager
def _stdout_to_stderr():
    """Keep stdout for the result: libraries (HiGHS, MetaSchedule) print banners and tables on fd 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _parse_rpc(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        dev, sep, addr = v.partition("=")
        if not sep or ":" not in addr:
            raise DistreeError(f"--rpc {v!r}: write it as device=host:port, e.g. --rpc pi4=192.168.1.20:9090")
        out[dev] = addr
    return out


def _parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    out = {}
    for v in values:
        name, sep, dims = v.partition("=")
        try:
            out[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sep = ""
        if not sep:
            raise DistreeError(f"--input-shape {v!r}: write it as name=1,1,28,28")
    return out


@click.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--devices", default="", help="Comma-separated catalog devices in pipeline order, e.g. pi4,jetson-orin-nano.")
@click.option("--topology", type=click.Path(dir_okay=False), help="Topology file (devices + links) instead of --devices.")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="Calibration .npz (x, y).")
@click.option("-o", "--output", required=True, type=OUTPUT_DIR, help="Bundle directory to write.")
@click.option("--accuracy-drop", default=0.01, show_default=True, type=NUMBER, help="Allowed accuracy loss vs the full model.")
@click.option("--confidence", default=None, type=NUMBER, help="Hold the accuracy bound at this one-sided confidence.")
@DEADLINE_OPTION
@MIN_THROUGHPUT_OPTION
@TRAFFIC_OPTION
@click.option("--score", "score_kind", default="max_softmax", show_default=True,
              type=click.Choice(["max_softmax", "entropy", "stability"]), help="Exit score.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "tvm", "ort"]),
              help="auto: TVM where it beats ONNX Runtime on this host (proxy), else ONNX Runtime.")
@click.option("--tune-minutes", default=0.0, show_default=True, type=NON_NEGATIVE,
              help="MetaSchedule budget per device: host here, other CPUs on the device (needs --rpc); CUDA is not "
                   "tuned. Ctrl-C ends tuning after the round under way and builds with the records measured "
                   "(they are kept for the next run); a second Ctrl-C aborts.")
@click.option("--time-limit", default=60.0, show_default=True, type=NUMBER,
              help="Solver time limit (s). Ctrl-C during the plan stage ends the search and builds its best plan "
                   "(not cached); a second Ctrl-C aborts.")
@click.option("--gap", default=0.0, show_default=True, type=NUMBER,
              help="Stop once the plan is proven within this share of the optimum (0.02: 2%; 0: prove it optimal).")
@click.option("--jobs", default=None, type=int,
              help="Cores for the solver's branch and bound (default: every core this process may use).")
@click.option("--rpc", multiple=True,
              help="A device's TVM RPC server, device=host:port (repeatable): profiled there, and tuned there with --tune-minutes.")
@click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False),
              help="A profile measured on a device (`distree profile MODEL --device NAME` run there; repeatable): "
                   "its devices are not profiled here.")
@click.option("--input-shape", multiple=True, help="Fix an input's shape: name=1,1,28,28.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="Threads for host measurements.")
@click.option("--require-aot-cuda", is_flag=True, help="Fail instead of shipping CUDA source when nvcc is missing.")
@click.option("--start", "start", default=None, type=click.Path(),
              help="An earlier plan of this model (a bundle, e.g. the one -o replaces, or a Plan JSON) seeding the "
                   "solve: the new plan is no slower wherever that one still fits (`distree plan --start`).")
@click.option("--cache-dir", default=".distree-cache", show_default=True, type=OUTPUT_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON on stdout.")
def compile_cmd(model: str, devices: str, topology: Optional[str], data: str, output: str, accuracy_drop: float,
                confidence: Optional[float], deadline_ms: Optional[float], min_throughput: Optional[float],
                traffic: str, score_kind: str, backend: str, tune_minutes: float, time_limit: float,
                gap: float, jobs: Optional[int], rpc: tuple[str, ...], profiles: tuple[str, ...],
                input_shape: tuple[str, ...], threads: int,
                require_aot_cuda: bool, start: Optional[str], cache_dir: Path, as_json: bool) -> None:
    """Compile MODEL into a bundle: inspect, exits, calibrate, profile, plan, build (each stage cached)."""
    from distree.compiler.pipeline import CompileOptions, compile_model
    from distree.compiler.summary import print_summary, summary_dict

    options = CompileOptions(
        devices=tuple(d.strip() for d in devices.split(",") if d.strip()), topology=Path(topology) if topology else None,
        accuracy_drop=accuracy_drop, confidence=confidence, deadline_ms=deadline_ms, min_throughput=min_throughput,
        traffic=traffic, score_kind=score_kind, backend=backend,
        tune_minutes=tune_minutes, time_limit_s=time_limit, gap=gap, jobs=jobs, rpc=_parse_rpc(rpc),
        profiles=tuple(map(Path, profiles)), input_shapes=_parse_shapes(input_shape), threads=threads,
        require_aot_cuda=require_aot_cuda, start=Path(start) if start else None)
    console = _console()
    with console.status("compiling ...") as status, _stdout_to_stderr():
        def log(msg: str) -> None:
            status.update(msg)
            console.log(msg)

        result = compile_model(model, data, output, options, cache_dir=cache_dir, log=log, progress=status.update)
    if as_json:
        click.echo(json.dumps(summary_dict(result), indent=2))
    else:
        print_summary(result, console)


@click.command("retune")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Labelled .npz (x, y) of what the devices see now, e.g. a labelled sample of recent requests.")
@click.option("-o", "--output", required=True, type=OUTPUT_DIR,
              help="Bundle directory to write; BUNDLE itself to replace it (atomically).")
@click.option("--test", "test", default=None, type=click.Path(dir_okay=False),
              help="Labelled .npz to report both tables on, apart from --data (how well the choice carries over).")
@click.option("--accuracy-drop", type=NUMBER, default=None,
              help="Allowed accuracy loss against the full model on --data [default: the bundle's].")
@click.option("--confidence", type=NUMBER, default=None,
              help="Hold the accuracy bound at this one-sided confidence [default: the bundle's].")
@click.option("--min-throughput", type=NUMBER, default=None,
              help="Requests/s each stage must sustain (expected busy time <= 1/rate).")
@click.option("--traffic", type=click.Choice(["sporadic", "steady"]), default=None,
              help="What a hop costs (as `distree compile --traffic`) [default: the bundle's].")
@click.option("--levels", type=click.IntRange(1, 62), default=8, show_default=True,
              help="Threshold levels per exit (quantiles of its new scores), besides its current threshold.")
@click.option("--time-limit", type=NUMBER, default=60.0, show_default=True,
              help="Solver time limit (s); Ctrl-C ends the search and writes its best table.")
@click.option("--jobs", type=int, default=None, help="Cores for the solver's branch and bound.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="Threads per segment runtime while scoring --data.")
@click.option("--json", "json_path", type=OUTPUT_FILE_OR_STDOUT, default=None,
              help="Write the report (JSON) here; - for standard output.")
def retune_cmd(bundle: str, data: str, output: Path, test: Optional[str], accuracy_drop: Optional[float],
               confidence: Optional[float],
               min_throughput: Optional[float], traffic: Optional[str], levels: int, time_limit: float,
               jobs: Optional[int], threads: int, json_path: Optional[Path]) -> None:
    """Choose BUNDLE's exit thresholds again on new labelled data: same placement, same compiled exits, no
    compiling; only manifest.json, thresholds.json and planning/calibration.json change."""
    from distree.compiler.manifest import read_manifest
    from distree.compiler.retune import bundle_constraints, retune
    from distree.compiler.summary import print_retuned
    from distree.exits.data import load_dataset
    from distree.serde import write_json_atomic

    constraints = bundle_constraints(read_manifest(Path(bundle)).plan, accuracy_drop=accuracy_drop,
                                     confidence=confidence, min_throughput=min_throughput, traffic=traffic,
                                     time_limit_s=time_limit, jobs=jobs)
    dataset, held_out = load_dataset(data), load_dataset(test) if test else None
    console = _console()
    with console.status("retune ...") as status, _stdout_to_stderr():
        result = retune(bundle, dataset, output, constraints, levels=levels, threads=threads, progress=status.update,
                        test=held_out)
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_retuned(result)
    if json_path:
        write_json_atomic(json_path, result.to_dict())


@click.command("verify")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--emulate", is_flag=True, help="Also run aarch64 CPU libraries under qemu-user (slow: minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(bundle: str, emulate: bool, as_json: bool) -> None:
    """Check a bundle: file hashes, versions, and that every device's files load (run what runs here)."""
    from distree.compiler.verify import verify_bundle

    report = verify_bundle(bundle, emulate=emulate)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"{bundle}: OK ({report.files} files, made by {report.made_by})")
    for check in report.checks:
        click.echo(f"  {check.status:8s} {check.file}: {check.detail}")
