"""``distree devices``: the device catalog (or a topology file's devices) as a table or JSON."""

from __future__ import annotations

import json
from typing import Optional

import click

from distree.targets.catalog import GIB, list_devices, target_summary
from distree.targets.spec import DeviceSpec
from distree.targets.toolchain import tvm_device_here
from distree.targets.topology import load_topology


def _row(dev: DeviceSpec, where: Optional[str]) -> dict[str, str]:
    host = dev.host
    return {
        "name": dev.name,
        "target": target_summary(dev),
        "host": f"{host['kind']} {host.get('mcpu', '')}".strip() if host else "-",
        "memory": f"{dev.memory_bytes / GIB:.1f} GiB",
        "cores": str(dev.cores),
        "GFLOP/s (est.)": f"{dev.peak_gflops:g}",
        "GB/s (est.)": f"{dev.mem_gbps:g}",
        "runs here": {"cpu": "yes", "cuda": "yes, GPU"}.get(where, "no"),
        "notes": "; ".join(dev.notes) or dev.description,
    }


@click.command("devices")
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False),
              help="Show the devices and links of this topology file instead of the catalog.")
@click.option("--json", "as_json", is_flag=True, help="Print the full specs as JSON.")
@click.option("--sources", is_flag=True, help="Also list where each device's figures come from.")
def devices_cmd(topology_path: Optional[str], as_json: bool, sources: bool) -> None:
    """List the known devices: TVM target, host, memory, cores, estimate figures and notes.

    \b
    Custom devices and links come from a topology file (YAML or JSON), e.g.:
      devices: [pi4, {name: cam2, base: pi4, memory_gb: 2}]
      links: [{src: pi4, dst: cam2, bandwidth_mbps: 100, latency_ms: 2, jitter_ms: 0.5}]
      source: pi4
    """
    topology = load_topology(topology_path) if topology_path else None
    devices = topology.devices if topology else list_devices()
    if as_json:
        doc = topology.to_dict() if topology else {"devices": [d.to_dict() for d in devices]}
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="distree devices" + (f" ({topology_path})" if topology_path else ""))
    here = {d.name: tvm_device_here(d) for d in devices}
    rows = [_row(d, here[d.name][0]) for d in devices]
    for col in rows[0]:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    console = Console(width=max(Console().width, 160))
    console.print(table)
    elsewhere = [f"{name} ({why})" for name, (where, why) in here.items() if where is None]
    if elsewhere:
        console.print("not run here (distree run/serve/bench run their ONNX under ONNX Runtime instead): "
                      + "; ".join(elsewhere), highlight=False)
    if sources:
        for dev in devices:
            console.print(f"[bold]{dev.name}[/bold]: " + "; ".join(dev.sources or ("(none given)",)), highlight=False)
    else:
        console.print("estimate figures are datasheet peaks; `distree devices --sources` says where each comes from")
    if topology:
        links = Table(title=f"links (source: {topology.source_device}; pairs not listed: {topology.default_link})")
        for col in ("src", "dst", "Mbit/s", "latency ms", "jitter ms"):
            links.add_column(col)
        for ln in topology.links:
            links.add_row(ln.src, ln.dst, f"{ln.bandwidth_mbps:g}", f"{ln.latency_ms:g}", f"{ln.jitter_ms:g}")
        console.print(links)
