"""Device catalog, topology files and ``distree devices``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from distree.cli import cli
from distree.errors import DistreeError
from distree.targets import (DEFAULT_LINK, LinkSpec, device_names, get_device, list_devices, load_topology,
                             topology_for)
from distree.targets.spec import Topology
from distree.targets.toolchain import host_arch, tvm_device_here


def test_catalog_has_the_issue_devices_with_sources():
    names = device_names()
    for n in ("host", "pi4", "pi5", "jetson-nano", "jetson-orin-nano", "x86-server"):
        assert n in names
    for dev in list_devices():
        assert dev.memory_bytes > 0 and dev.cores >= 1 and dev.peak_gflops > 0 and dev.mem_gbps > 0
        assert dev.sources, dev.name


def test_host_is_detected_from_this_machine():
    import os

    import psutil
    from tvm.target import codegen

    host = get_device("host")
    assert host.target["mcpu"] == codegen.llvm_get_system_cpu() != "native"
    assert host.cores == os.cpu_count()
    assert abs(host.memory_bytes - psutil.virtual_memory().total) < 1 << 20


def _tag(name: str) -> dict:
    import tvm

    return json.loads(str(tvm.target.list_tags()[name]))


@pytest.mark.parametrize("device,tag", [("pi4", "raspberry-pi/4b-aarch64"), ("jetson-orin-nano", "nvidia/jetson-orin-nano"),
                                        ("jetson-nano", "nvidia/jetson-nano")])
def test_catalog_agrees_with_tvm_tags(device, tag):
    dev, t = get_device(device), _tag(tag)
    assert dev.tvm_tag == tag
    if device == "pi4":
        for key in ("kind", "mtriple", "mcpu", "num-cores"):
            assert dev.target[key] == t[key]
        assert dev.target["mattr"] == list(t["mattr"])
    elif device == "jetson-orin-nano":
        assert dev.target == {"kind": "cuda", "arch": t["arch"]}
        # TVM's tag names the Xavier core as the host; the catalog corrects it to Orin's Cortex-A78AE.
        assert t["host"]["mcpu"] == "carmel" and dev.host["mcpu"] == "cortex-a78ae"
        assert dev.host["num-cores"] == t["host"]["num-cores"] and dev.host["mtriple"] == t["host"]["mtriple"]
    else:
        assert t["arch"] == "sm_53" and dev.target["kind"] == "llvm" and dev.target["mcpu"] == "cortex-a57"
        assert any("sm_53" in n for n in dev.notes)


@pytest.mark.parametrize("name", ["pi4", "pi5", "jetson-nano", "jetson-orin-nano", "x86-server", "host"])
def test_every_cpu_named_is_valid_for_llvm(name):
    from tvm.target import codegen

    dev = get_device(name)
    cpu_target = dev.host or dev.target
    assert codegen.llvm_is_valid_cpu(cpu_target["mcpu"], cpu_target["mtriple"])


def test_unknown_device_lists_known_ones():
    with pytest.raises(DistreeError, match="unknown device 'pi9'.*pi4.*jetson-orin-nano"):
        get_device("pi9")


def test_topology_for_uses_default_link():
    topo = topology_for(["pi4", "jetson-orin-nano"])
    assert [d.name for d in topo.devices] == ["pi4", "jetson-orin-nano"]
    assert topo.source_device == "pi4"
    ln = topo.link("jetson-orin-nano", "pi4")
    assert (ln.bandwidth_mbps, ln.latency_ms, ln.jitter_ms) == (
        DEFAULT_LINK["bandwidth_mbps"], DEFAULT_LINK["latency_ms"], DEFAULT_LINK["jitter_ms"])
    topo2 = topology_for(["pi4", "host"], links=[LinkSpec("pi4", "host", 1000.0, 0.5)])
    assert topo2.link("host", "pi4").bandwidth_mbps == 1000.0


def test_topology_yaml_with_custom_devices_and_list_links(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(
        "devices:\n"
        "  - pi4\n"
        "  - {name: cam2, base: pi4, memory_gb: 2}\n"
        "  - {name: box, target: {kind: llvm, mtriple: x86_64-linux-gnu, mcpu: skylake}, memory_gb: 16,\n"
        "     cores: 8, peak_gflops: 500, mem_gbps: 40}\n"
        "links:\n"
        "  - {src: pi4, dst: cam2, bandwidth_mbps: 50, latency_ms: 3, jitter_ms: 1}\n"
        "  - {src: cam2, dst: box, bandwidth_mbps: 1000, latency_ms: 0.2}\n"
        "source: cam2\n")
    topo = load_topology(p)
    cam2 = topo.device("cam2")
    assert cam2.memory_bytes == 2 << 30 and cam2.target == get_device("pi4").target
    assert topo.device("box").host is None and topo.device("box").cores == 8
    assert topo.link("cam2", "pi4").bandwidth_mbps == 50
    assert topo.link("box", "cam2").jitter_ms == 0.0
    assert topo.link("pi4", "box").bandwidth_mbps == DEFAULT_LINK["bandwidth_mbps"]
    assert topo.source_device == "cam2"


def test_a_topology_distree_saved_reads_back_as_a_topology_file(tmp_path):
    """A bundle's planning/topology.json (``Topology.save``) is accepted wherever a topology file is, e.g.
    `distree plan --topology bundle/planning/topology.json`; before, its header keys were "unknown"."""
    topo = topology_for(["pi4", "jetson-orin-nano"], links=[LinkSpec("pi4", "jetson-orin-nano", 300.0, 1.5, 0.2)],
                        source="jetson-orin-nano")
    topo.save(tmp_path / "topology.json")
    assert load_topology(tmp_path / "topology.json") == topo
    doc = json.loads((tmp_path / "topology.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**doc, "kind": "Profile"}))
    with pytest.raises(DistreeError, match="is a Profile file, expected a Topology file"):
        load_topology(tmp_path / "other.json")
    (tmp_path / "foreign.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "kind"}))
    with pytest.raises(DistreeError, match='is not a file distree wrote \\(it has no "kind"\\), expected a Topology'):
        Topology.load(tmp_path / "foreign.json")     # load_topology reads it as a topology a user wrote


def test_topology_json_matrix_links_are_directional(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"devices": ["pi4", "pi5"],
                             "links": {"bandwidth_mbps": [[0, 10], [20, 0]], "latency_ms": [[0, 1], [2, 0]]}}))
    topo = load_topology(p)
    assert topo.link("pi4", "pi5").bandwidth_mbps == 10
    assert topo.link("pi5", "pi4").bandwidth_mbps == 20


@pytest.mark.parametrize("text,message", [
    ("devices: [pi4]\nlinks:\n  - {src: pi4, dst: pi5, bandwidth_mbps: 1, latency_ms: 1}\n"
     "  - {src: pi4, dst: pi4, bandwidth_mbps: 1, latency_ms: 1}\n", r"links\[0\]\.dst: 'pi5' is not one of"),
    ("devices: [pi4, pi5]\nlinks:\n  - {src: pi4, dst: pi5, bandwidth_mbps: 1, latency_ms: 1}\n"
     "  - {src: pi5, dst: pi4, bandwidth_mbps: 0, latency_ms: 1}\n", r"links\[1\]\.bandwidth_mbps: must be > 0"),
    ("devices: [pi4, pi5]\nlinks:\n  - {src: pi4, dst: pi5, bandwidth_mbps: 1, latency_ms: -1}\n",
     r"links\[0\]\.latency_ms: must be >= 0"),
    ("devices: [pi4, pi5]\nlinks:\n  - {src: pi4, dst: pi5, bandwidth_mbps: fast, latency_ms: 1}\n",
     r"links\[0\]\.bandwidth_mbps: must be a number"),
    ("devices: [pi4, pi5]\nlinks:\n  - {src: pi4, dst: pi5, bandwidth_mbps: 1, latency_ms: .inf}\n",
     r"links\[0\]\.latency_ms: must be a finite number, got inf"),
    ("devices: [pi4, {name: x, base: pi4, memory_gb: .inf}]\n", r"devices\[1\]\.memory_gb: must be a finite number"),
    ("devices: [pi4, pi5]\nlinks: {bandwidth_mbps: [[0, 1]], latency_ms: [[0, 1], [1, 0]]}\n",
     r"links\.bandwidth_mbps: must be a 2x2 matrix"),
    ("devices: [pi4, {name: x, base: pi8}]\n", r"devices\[1\]\.base: unknown device 'pi8'"),
    ("devices: [pi4, {name: x, memory_gb: 1}]\n", r"devices\[1\]\.target: required"),
    ("devices: [pi4, {name: x, base: pi4, cores: 0}]\n", r"devices\[1\]\.cores: must be an integer >= 1"),
    ("devices: [pi4, {name: x, base: pi4, colour: red}]\n", r"devices\[1\]\.colour: unknown key"),
    ("devices: [pi4, pi4]\n", r"devices\[1\]\.name: duplicate device name 'pi4'"),
    ("devices: []\n", r"devices: must be a non-empty list"),
    ("devices: [pi4]\nsource: pi5\n", r"source: 'pi5' is not one of the devices"),
    ("devices: [pi4]\ndevice: [pi5]\n", r"device: unknown key"),
    ("devices: [pi4\n", r"not valid YAML"),
])
def test_topology_errors_name_the_key(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(DistreeError, match=message):
        load_topology(p)


def test_devices_command_table_and_json(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["devices"])
    assert res.exit_code == 0, res.output
    assert "jetson-orin-nano" in res.output and "cortex-a78ae" in res.output and "sm_53" in res.output
    # which devices' code runs on this machine, and why the others' does not, by this machine's own facts
    elsewhere = {d.name: why for d in list_devices() for where, why in [tvm_device_here(d)] if where is None}
    assert "host" not in elsewhere
    assert ("pi4" in elsewhere) == (host_arch() != "aarch64")
    notice = " ".join(res.output.split("not run here", 1)[1].split()) if elsewhere else ""
    for name, why in elsewhere.items():
        assert f"{name} ({why})" in notice
    res = runner.invoke(cli, ["devices", "--sources"])
    assert res.exit_code == 0 and "TVM tag raspberry-pi/4b-aarch64" in res.output
    res = runner.invoke(cli, ["devices", "--json"])
    doc = json.loads(res.output)
    assert {d["name"] for d in doc["devices"]} >= {"pi4", "host", "x86-server"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [pi4]\nlinks:\n  - {src: pi4, dst: nope, bandwidth_mbps: 1, latency_ms: 1}\n")
    res = runner.invoke(cli, ["devices", "--topology", str(bad)])
    assert res.exit_code == 2 and "links[0].dst" in res.output
