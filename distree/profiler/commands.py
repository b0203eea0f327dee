"""``distree profile``: per-block and per-exit-head latency and memory on one or more devices."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from distree.cli import NON_NEGATIVE, OUTPUT_DIR, OUTPUT_FILE
from distree.errors import DistreeError


@click.command("profile")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--device", "devices", multiple=True, metavar="NAME",
              help="A device from `distree devices` (repeat for several).")
@click.option("--topology", "topology_path", type=click.Path(path_type=Path), default=None,
              help="Profile the devices of this topology file (custom devices allowed).")
@click.option("--rpc", default=None, metavar="HOST:PORT",
              help="Measure on the device through its TVM RPC server (one device).")
@click.option("--estimate", "estimate", is_flag=True, help="Estimate from FLOPs, bytes and the device's figures.")
@click.option("--qemu", is_flag=True,
              help="Measure on an aarch64 RPC server emulated here (proves the artifacts run; not device timings).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["tvm", "ort"]),
              help="Backends to time (default: tvm and ort locally, tvm over RPC).")
@click.option("--exit-outputs", default=None, metavar="A,B",
              help="Which extra outputs are exits (default: the model's metadata or outputs named exit*).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Fix the input's symbolic dims, e.g. input=1,1,28,28.")
@click.option("--item", "items", multiple=True, metavar="ITEM",
              help="Only these items, e.g. block:0, exit:exit_1, call, decide:max_softmax, rpc.")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=15, show_default=True)
@click.option("--min-repeat-ms", type=NON_NEGATIVE, default=5.0, show_default=True,
              help="Each sample averages as many runs as fill this time.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--cache-dir", type=OUTPUT_DIR, default=None,
              help="Profile and compiled-artifact cache (default: $DISTREE_CACHE or .distree-cache).")
@click.option("--force", is_flag=True, help="Measure again even if a cached profile matches.")
@click.option("-o", "--output", type=OUTPUT_FILE, required=True, help="Where to write profile.json.")
def profile_cmd(model_path: Path, devices: tuple[str, ...], topology_path: Optional[Path], rpc: Optional[str],
                estimate: bool, qemu: bool, backends: tuple[str, ...], exit_outputs: Optional[str],
                input_shapes: tuple[str, ...], items: tuple[str, ...], warmup: int, repeats: int,
                min_repeat_ms: float, threads: int, cache_dir: Optional[Path], force: bool, output: Path) -> None:
    """Profile every block and exit head of MODEL.onnx on each device and write profile.json, with what the
    runtime adds: one call (`call`), an exit decision (`decide:<score>`) and a hop's gRPC round trip (`rpc`).

    \b
    distree profile model.onnx --device host -o profile.json              # measured here
    distree profile model.onnx --device pi4 -o pi4.json       # run on the Pi itself (then: compile --profile pi4.json)
    distree profile model.onnx --device pi4 --rpc 192.168.1.20:9090 -o p.json
    distree profile model.onnx --device pi4 --device jetson-orin-nano --estimate -o p.json
    distree profile model.onnx --device pi4 --qemu --item block:0 -o p.json   # emulated aarch64
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from distree.exits import declared_exits
    from distree.graph import build_chain, load_model
    from distree.graph.load import parse_shape_option
    from distree.profiler import TimingSettings, merge_profiles, profile_model
    from distree.profiler.profile import check_request, default_backends
    from distree.targets import get_device, load_topology

    mode = _mode(rpc, estimate, qemu)
    specs = _devices(devices, topology_path, get_device, load_topology)
    if mode == "rpc" and len(specs) != 1:
        raise DistreeError("--rpc measures one device: give exactly one --device")
    model = load_model(model_path, dict(parse_shape_option(s) for s in input_shapes) or None)
    chain = build_chain(model)
    names = [n.strip() for n in exit_outputs.split(",") if n.strip()] if exit_outputs is not None else None
    exits = declared_exits(model, chain, names)
    timing = TimingSettings(warmup=warmup, repeats=repeats, min_repeat_ms=min_repeat_ms, threads=threads)
    for dev in specs:           # refused requests fail before the progress bar starts
        check_request(dev, mode, rpc, tuple(backends) or default_backends(mode, dev))
    profiles = []
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        for dev in specs:
            task = bar.add_task(f"{dev.name} ({mode})", total=None)

            def progress(done: int, total: int, label: str, task=task, dev=dev) -> None:
                bar.update(task, completed=done, total=total, description=f"{dev.name} ({mode}) {label}")

            profiles.append(profile_model(model, chain, exits, dev, mode=mode, rpc=rpc, backends=backends or None,
                                          cache_dir=cache_dir, force=force, timing=timing, items=items or None,
                                          progress=progress))
    profile = merge_profiles(profiles)
    profile.save(output)
    out = Console(width=max(Console().width, 110))
    _print(profile, out)
    out.print(f"wrote {output}")


def _mode(rpc: Optional[str], estimate: bool, qemu: bool) -> str:
    chosen = [m for m, on in (("rpc", rpc is not None), ("estimate", estimate), ("qemu", qemu)) if on]
    if len(chosen) > 1:
        raise DistreeError(f"choose one of --rpc, --estimate, --qemu (got {', '.join(chosen)})")
    return chosen[0] if chosen else "local"


def _devices(devices, topology_path, get_device, load_topology):
    if devices and topology_path:
        raise DistreeError("give --device or --topology, not both")
    if topology_path:
        return load_topology(topology_path).devices
    if not devices:
        raise DistreeError("no device given: pass --device host (this machine) or a name from `distree devices`")
    return tuple(get_device(d) for d in devices)


def _print(profile, console) -> None:
    from rich.table import Table

    table = Table(title=f"profile of model {profile.model_sha256[:12]}")
    for col in ("device", "item", "backend", "median ms", "p90 ms", "memory KiB", "provenance"):
        table.add_column(col, justify="right" if "ms" in col or "KiB" in col else "left", no_wrap=True)
    for m in profile.entries:
        table.add_row(m.device, m.item, m.backend, f"{m.median_ms:.4f}", f"{m.p90_ms:.4f}",
                      f"{m.memory_bytes / 1024:.1f}", m.provenance)
    console.print(table)
    notes = {m.note for m in profile.entries if m.note}
    for note in sorted(notes):
        console.print(f"note: {note}")
    for device, settings in profile.settings.items():
        if settings.get("resumed_units"):
            console.print(f"note: {device}: {settings['resumed_units']} of {len(settings['items'])} units were "
                          "measured by an earlier run that stopped; this one measured the rest")
