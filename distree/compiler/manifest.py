"""The bundle's self-description: manifest.json (every file, hash, tensor, backend) and thresholds.json."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import import_module, metadata
from pathlib import Path
from typing import Any, Optional

from distree import __version__
from distree.errors import DistreeError
from distree.serde import SCHEMA_VERSION, JsonRecord, read_json
from distree.solver.plan import Plan
from distree.targets.spec import DeviceSpec

MANIFEST = "manifest.json"
THRESHOLDS = "thresholds.json"
PLANNING = "planning"          # the chain, calibration, profile and topology the plan was made from
SCORE_DEFINITIONS = {
    "max_softmax": "p = softmax(exit logits); score = max_k p[k]; leave iff score >= threshold",
    "entropy": "p = softmax(exit logits); score = sum_k p[k] log p[k] (negative entropy, nats); "
               "leave iff score >= threshold",
    "stability": "p = softmax(exit logits), q = softmax(entry-head logits), c = argmax p; "
                 "score = min(p[c], q[c]); leave iff score >= threshold",
}


@dataclass(frozen=True)
class TensorSpec(JsonRecord):
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class SegmentArtifact(JsonRecord):
    """One sub-segment: blocks ``first_block..last_block``; outputs ``outputs[0]`` (forwarded) then exit tensors."""

    file: str                       # what the device runs (relative to the bundle): .so (tvm) or .onnx (ort)
    onnx_file: str                  # the segment's ONNX, always kept (ORT backend and verification)
    first_block: int
    last_block: int
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    exit: Optional[str]             # exit this segment ends at (its logits are an output)
    entry_output: Optional[str]     # entry-head logits (stability score only)
    is_final: bool                  # outputs[0] is the model's final logits
    backend: str                    # "tvm" or "ort"
    backend_reason: str
    tvm_ms: Optional[float]         # what chose the backend: median ms of each, where backend_reason says
    ort_ms: Optional[float]
    ratio: Optional[float]          # tvm_ms / ort_ms
    tvm_file: Optional[str] = None  # the TVM library, when one was built (kept even if ORT ships)
    tuned: bool = False
    cuda: Optional[str] = None      # how CUDA kernels ship (CUDA targets only)
    expected_ms: Optional[float] = None     # what it should take on its device, with the backend that ships
    expected_from: str = ""                 # "timed here" or "profile of <device> (<provenance>)"


@dataclass(frozen=True)
class DeviceArtifact(JsonRecord):
    name: str
    spec: DeviceSpec
    stage_index: int
    first_block: int
    last_block: int
    segments: tuple[SegmentArtifact, ...]


@dataclass(frozen=True)
class Manifest(JsonRecord):
    distree_version: str
    tvm_version: str
    ort_version: str
    model_sha256: str
    created_utc: str
    score_kind: str
    backend_mode: str               # tvm / ort / auto as requested
    ratio_measured_on: str          # "host proxy: <cpu>, N thread(s)[; <device>: on itself (<where>)]"
    source: str                     # device where requests arrive and answers return
    input: TensorSpec
    plan: Plan
    stages: tuple[DeviceArtifact, ...]
    files: dict[str, str]           # relative path -> sha256 of every file but manifest.json
    notes: tuple[str, ...] = ()     # what a user must know (substitutions, NVRTC, untuned code)


@dataclass(frozen=True)
class ThresholdEntry(JsonRecord):
    name: str
    after_block: int
    device: str
    threshold: float
    entry_output: Optional[str] = None


@dataclass(frozen=True)
class ThresholdTable(JsonRecord):
    """The static exit table: a sample leaves at the first exit (in order) whose score >= threshold."""

    score_kind: str
    score_definition: str
    exits: tuple[ThresholdEntry, ...]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    return {**_versions_checked(), "ort_version": _installed_version("onnxruntime", ("onnxruntime", "onnxruntime-gpu"))}


def _versions_checked() -> dict[str, str]:
    """What a bundle must have been made with to be read here; not ONNX Runtime's: a stage that runs TVM code never
    loads it (under qemu-user its aarch64 wheel dies on import)."""
    return {"distree_version": __version__, "tvm_version": _installed_version("tvm", ("apache-tvm",))}


def _installed_version(module: str, distributions: tuple[str, ...]) -> str:
    """A package's version from pip's metadata, where pip installed it: every command that opens a bundle checks
    versions, and importing TVM for its ``__version__`` costs 1-2 s (a Pi: several times that). Otherwise (a
    runtime-only TVM built on the device) from the module itself."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return import_module(module).__version__


def check_bundle_target(out: str | Path) -> None:
    """A bundle replaces its whole output folder, so that folder must be new, empty, or an earlier bundle:
    `-o ~/work` must not wipe ~/work."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    try:
        is_bundle = manifest.is_file() and read_json(manifest).get("kind") == "Manifest"
    except DistreeError:
        is_bundle = False
    if not is_bundle:
        raise DistreeError(f"{out} holds files but no distree bundle (no valid {MANIFEST}), and a bundle replaces "
                           f"its folder entirely; choose a new or empty folder for -o")


def read_manifest(bundle: Path) -> Manifest:
    """The manifest, refusing one from another schema or another distree/TVM version (one line)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise DistreeError(f"{bundle}: no such bundle directory; build one with `distree compile`")
    doc: dict[str, Any] = read_json(bundle / MANIFEST)
    if doc.get("kind") != "Manifest":
        raise DistreeError(f"{bundle / MANIFEST}: not a distree bundle manifest; rebuild with `distree compile`")
    made_by = f"distree {doc.get('distree_version', '?')} (TVM {doc.get('tvm_version', '?')}, " \
              f"schema {doc.get('schema_version', '?')})"
    here = _versions_checked()
    if doc.get("schema_version") != SCHEMA_VERSION or doc.get("distree_version") != here["distree_version"] \
            or doc.get("tvm_version") != here["tvm_version"]:
        raise DistreeError(
            f"{bundle}: made by {made_by}, this is distree {here['distree_version']} (TVM {here['tvm_version']}, "
            f"schema {SCHEMA_VERSION}); rebuild it with this version: distree compile model.onnx ... -o {bundle}")
    return Manifest.load(bundle / MANIFEST)


def read_thresholds(bundle: Path) -> ThresholdTable:
    return ThresholdTable.load(Path(bundle) / THRESHOLDS)
