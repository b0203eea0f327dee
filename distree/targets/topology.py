"""Topology files (YAML or JSON): which devices, how they are linked, where requests arrive.

    devices:                      # pipeline order
      - pi4                       # a catalog name
      - {name: cam2, base: pi4, memory_gb: 2}          # a catalog entry with overrides
      - {name: box, target: {kind: llvm, mtriple: x86_64-linux-gnu, mcpu: skylake},
         memory_gb: 16, cores: 8, peak_gflops: 500, mem_gbps: 40}   # a full spec
    links:                        # a list (a link given one way is used both ways) ...
      - {src: pi4, dst: box, bandwidth_mbps: 100, latency_ms: 2, jitter_ms: 0.5}
    # ... or a matrix in device order (diagonal ignored):
    # links: {bandwidth_mbps: [[0, 100], [100, 0]], latency_ms: [[0, 2], [2, 0]]}
    source: pi4                   # where requests arrive (default: the first device)
    default_link: {bandwidth_mbps: 100, latency_ms: 2, jitter_ms: 0.5}   # for pairs not listed

Every error names the key path that is wrong, e.g. ``links[1].bandwidth_mbps: must be > 0``. A topology distree
wrote itself (``Topology.save``: a bundle's ``planning/topology.json``) is read as it was saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from distree.errors import DistreeError
from distree.targets.catalog import GIB, get_device
from distree.targets.spec import DEFAULT_LINK, DeviceSpec, LinkSpec, Topology

_TOP_KEYS = ("devices", "links", "source", "default_link")
_LINK_KEYS = ("bandwidth_mbps", "latency_ms", "jitter_ms")
_SPEC_KEYS = ("name", "base", "target", "host", "memory_gb", "memory_bytes", "cores", "peak_gflops",
              "mem_gbps", "runtime_overhead_bytes", "description", "sources", "notes")


class _Bad(DistreeError):
    def __init__(self, where: str, path: str, msg: str):
        super().__init__(f"{where}: {path}: {msg}")


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; errors name the file and the key path."""
    p = Path(path)
    if not p.is_file():
        raise DistreeError(f"{p}: no such topology file (give a YAML or JSON file: see distree devices --help)")
    text = p.read_text()
    try:
        doc = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistreeError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {first}") from exc
    if isinstance(doc, Mapping) and "kind" in doc:     # a file distree wrote, e.g. a bundle's planning/topology.json
        return Topology.load(p)
    return topology_from_dict(doc, where=str(p))


def topology_from_dict(doc: Any, where: str = "topology") -> Topology:
    """Validate the parsed form of a topology file (see the module docstring)."""
    if not isinstance(doc, Mapping):
        raise _Bad(where, "(top level)", "expected a mapping with a 'devices:' list")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise _Bad(where, unknown[0], f"unknown key; expected one of {', '.join(_TOP_KEYS)}")
    raw_devices = doc.get("devices")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise _Bad(where, "devices", "must be a non-empty list of device names or specs")
    devices = tuple(_device(where, f"devices[{i}]", d) for i, d in enumerate(raw_devices))
    names = [d.name for d in devices]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise _Bad(where, f"devices[{i}].name", f"duplicate device name {n!r}")
    default_link = _link_figures(where, "default_link", doc.get("default_link") or {}, dict(DEFAULT_LINK))
    links = _links(where, doc.get("links") or [], names)
    source = doc.get("source") or ""
    if source and source not in names:
        raise _Bad(where, "source", f"{source!r} is not one of the devices ({', '.join(names)})")
    return Topology(devices=devices, links=links, source=source, default_link=default_link)


def topology_for(device_names: Sequence[str], links: Optional[Iterable[LinkSpec | Mapping]] = None,
                 source: str = "") -> Topology:
    """A topology of catalog devices; pairs without a given link use ``DEFAULT_LINK``."""
    doc: dict[str, Any] = {"devices": list(device_names), "source": source}
    if links is not None:
        doc["links"] = [ln.to_dict() if isinstance(ln, LinkSpec) else dict(ln) for ln in links]
    return topology_from_dict(doc, where="topology")


def _device(where: str, path: str, raw: Any) -> DeviceSpec:
    if isinstance(raw, str):
        return _catalog(where, path, raw)
    if not isinstance(raw, Mapping):
        raise _Bad(where, path, "must be a catalog device name or a mapping")
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise _Bad(where, f"{path}.{unknown[0]}", f"unknown key; expected one of {', '.join(_SPEC_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _Bad(where, f"{path}.name", "required: a non-empty string")
    fields: dict[str, Any] = {}
    if "base" in raw:
        fields = {f.name: getattr(_catalog(where, f"{path}.base", raw["base"]), f.name)
                  for f in dataclasses.fields(DeviceSpec)}
    fields["name"] = name
    for key in ("target", "host"):
        if key in raw:
            value = raw[key]
            if not (isinstance(value, Mapping) and "kind" in value) and not (key == "host" and value is None):
                raise _Bad(where, f"{path}.{key}", "must be a TVM target dict with a 'kind', e.g. "
                           "{kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a72}")
            fields[key] = dict(value) if value is not None else None
    if "memory_gb" in raw and "memory_bytes" in raw:
        raise _Bad(where, f"{path}.memory_gb", "give memory_gb or memory_bytes, not both")
    if "memory_gb" in raw:
        fields["memory_bytes"] = int(_positive(where, f"{path}.memory_gb", raw["memory_gb"]) * GIB)
    if "memory_bytes" in raw:
        fields["memory_bytes"] = int(_positive(where, f"{path}.memory_bytes", raw["memory_bytes"]))
    if "cores" in raw:
        cores = raw["cores"]
        if not isinstance(cores, int) or isinstance(cores, bool) or cores < 1:
            raise _Bad(where, f"{path}.cores", f"must be an integer >= 1, got {cores!r}")
        fields["cores"] = cores
    for key in ("peak_gflops", "mem_gbps"):
        if key in raw:
            fields[key] = float(_positive(where, f"{path}.{key}", raw[key]))
    if "runtime_overhead_bytes" in raw:
        fields["runtime_overhead_bytes"] = int(_non_negative(where, f"{path}.runtime_overhead_bytes",
                                                             raw["runtime_overhead_bytes"]))
    if "description" in raw:
        fields["description"] = str(raw["description"])
    for key in ("sources", "notes"):
        if key in raw:
            fields[key] = tuple(str(s) for s in _as_list(where, f"{path}.{key}", raw[key]))
    if "base" in raw:
        fields["sources"] = (*fields.get("sources", ()), f"based on catalog device {raw['base']}")
    missing = [k for k in ("target", "memory_bytes", "cores", "peak_gflops", "mem_gbps") if k not in fields]
    if missing:
        key = "memory_gb" if missing[0] == "memory_bytes" else missing[0]
        raise _Bad(where, f"{path}.{key}", "required for a device without 'base' "
                   "(give it, or base the device on a catalog entry: base: pi4)")
    fields.setdefault("host", None)
    return DeviceSpec(**fields)


def _catalog(where: str, path: str, name: Any) -> DeviceSpec:
    if not isinstance(name, str):
        raise _Bad(where, path, f"must be a catalog device name, got {name!r}")
    try:
        return get_device(name)
    except DistreeError as exc:
        raise _Bad(where, path, str(exc)) from None


def _links(where: str, raw: Any, names: list[str]) -> tuple[LinkSpec, ...]:
    if isinstance(raw, Mapping):
        return _link_matrix(where, raw, names)
    if not isinstance(raw, list):
        raise _Bad(where, "links", "must be a list of {src, dst, bandwidth_mbps, latency_ms[, jitter_ms]} "
                   "or a mapping of matrices")
    out: list[LinkSpec] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(raw):
        path = f"links[{i}]"
        if not isinstance(item, Mapping):
            raise _Bad(where, path, "must be a mapping {src, dst, bandwidth_mbps, latency_ms[, jitter_ms]}")
        unknown = sorted(set(item) - {"src", "dst", *_LINK_KEYS})
        if unknown:
            raise _Bad(where, f"{path}.{unknown[0]}", f"unknown key; expected src, dst, {', '.join(_LINK_KEYS)}")
        for end in ("src", "dst"):
            if item.get(end) not in names:
                raise _Bad(where, f"{path}.{end}", f"{item.get(end)!r} is not one of the devices ({', '.join(names)})")
        if item["src"] == item["dst"]:
            raise _Bad(where, f"{path}.dst", "a link joins two different devices")
        if (item["src"], item["dst"]) in seen:
            raise _Bad(where, path, f"duplicate link {item['src']} -> {item['dst']}")
        seen.add((item["src"], item["dst"]))
        for key in ("bandwidth_mbps", "latency_ms"):
            if key not in item:
                raise _Bad(where, f"{path}.{key}", "required")
        figures = _link_figures(where, path, item, {"jitter_ms": 0.0})
        out.append(LinkSpec(src=item["src"], dst=item["dst"], **figures))
    return tuple(out)


def _link_matrix(where: str, raw: Mapping, names: list[str]) -> tuple[LinkSpec, ...]:
    unknown = sorted(set(raw) - set(_LINK_KEYS))
    if unknown:
        raise _Bad(where, f"links.{unknown[0]}", f"unknown matrix; expected {', '.join(_LINK_KEYS)}")
    for key in ("bandwidth_mbps", "latency_ms"):
        if key not in raw:
            raise _Bad(where, f"links.{key}", "required: an NxN matrix in device order")
    n = len(names)
    for key, matrix in raw.items():
        if not isinstance(matrix, list) or len(matrix) != n or any(
                not isinstance(row, list) or len(row) != n for row in matrix):
            raise _Bad(where, f"links.{key}", f"must be a {n}x{n} matrix (one row per device, in device order)")
    out = []
    for i in range(n):
        for j in range(n):
            if i != j:
                item = {key: raw[key][i][j] for key in raw}
                figures = _link_figures(where, f"links.{{}}[{i}][{j}]", item, {"jitter_ms": 0.0})
                out.append(LinkSpec(src=names[i], dst=names[j], **figures))
    return tuple(out)


def _link_figures(where: str, path: str, item: Mapping, defaults: dict[str, float]) -> dict[str, float]:
    """Bandwidth > 0, latency and jitter >= 0; ``path`` may hold ``{}`` where the key goes (matrix form)."""
    if not isinstance(item, Mapping):
        raise _Bad(where, path, "must be a mapping of bandwidth_mbps, latency_ms, jitter_ms")

    def at(key: str) -> str:
        return path.format(key) if "{}" in path else f"{path}.{key}"

    if path == "default_link":
        unknown = sorted(set(item) - set(_LINK_KEYS))
        if unknown:
            raise _Bad(where, at(unknown[0]), f"unknown key; expected {', '.join(_LINK_KEYS)}")
    figures = {**defaults}
    for key in _LINK_KEYS:
        if key in item:
            figures[key] = float((_positive if key == "bandwidth_mbps" else _non_negative)(where, at(key), item[key]))
    return figures


def _number(where: str, path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(where, path, f"must be a number, got {value!r}")
    if not math.isfinite(value):      # YAML's .inf and .nan: an infinite memory would reach int() as a traceback
        raise _Bad(where, path, f"must be a finite number, got {value!r}")
    return float(value)


def _positive(where: str, path: str, value: Any) -> float:
    v = _number(where, path, value)
    if not v > 0:
        raise _Bad(where, path, f"must be > 0, got {value!r}")
    return v


def _non_negative(where: str, path: str, value: Any) -> float:
    v = _number(where, path, value)
    if not v >= 0:
        raise _Bad(where, path, f"must be >= 0, got {value!r}")
    return v


def _as_list(where: str, path: str, value: Any) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _Bad(where, path, "must be a string or a list of strings")
    return value


def topology_from_flags(devices: Optional[str], topology_path: Optional[str | Path]) -> Topology:
    """The ``--devices a,b,...`` / ``--topology FILE`` pair that several commands take: exactly one of them."""
    if bool(devices) == bool(topology_path):
        raise DistreeError("give exactly one of --devices a,b,... or --topology FILE")
    if topology_path:
        return load_topology(topology_path)
    return topology_for([d.strip() for d in devices.split(",") if d.strip()])


def parse_host_port(text: str, option: str, example: str = "127.0.0.1:50051") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); a user error naming ``option`` when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DistreeError(f"{option} {text!r} is not HOST:PORT (e.g. {example})")
    return host.strip("[]"), int(port)
