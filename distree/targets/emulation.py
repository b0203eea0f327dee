"""Run aarch64 code on this x86 machine: an aarch64 Debian root + Python + TVM, under qemu-user.

Why: proves that artifacts cross-compiled for a Raspberry Pi 4 load and run, gives the profiler an emulated
aarch64 "device" behind TVM RPC, and lets a test serve a Pi's stage with distree's own server in a pipeline (the
root holds grpcio, click and PyYAML for that; ONNX Runtime's aarch64 wheel dies on import under qemu-user, so only
TVM stages). Emulated timings are NOT Pi timings; whoever uses them says so.

The root is built once and cached (default ``<cache>/aarch64-root``, cache = ``$DISTREE_CACHE`` or
``.distree-cache``): ``debootstrap --foreign`` fetches the arm64 packages of this machine's Debian
release (from the mirror named in its apt sources) and every package is unpacked with ``dpkg-deb`` (no
chroot, no binfmt_misc needed); the aarch64 wheels of apache-tvm, apache-tvm-ffi and numpy go in with
``pip install --platform``. Requires ``qemu-user-static`` and ``debootstrap`` (Debian packages), root
(debootstrap) and access to the Debian and PyPI package registries while building.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from distree.errors import DistreeError
from distree.lifetime import dies_with_this_process
from distree.serde import atomic_directory

QEMU = "qemu-aarch64-static"
PYTHON = "usr/bin/python3.11"
SITE = "opt/distree/site-packages"
DEBIAN_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "zlib1g",
                   "libffi8")
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "ml_dtypes",
          "typing_extensions", "psutil", "cloudpickle", "tornado", "packaging",
          "grpcio==1.85.3", "click==8.5.1", "pyyaml==6.0.4")    # the last three: a distree stage served there
_MARKER = ".distree-aarch64-root.json"


def default_cache_dir() -> Path:
    """Where distree caches builds and profiles: ``$DISTREE_CACHE`` or ``.distree-cache`` in the CWD."""
    return Path(os.environ.get("DISTREE_CACHE") or ".distree-cache")


def _recipe() -> dict:
    return {"debian": list(DEBIAN_PACKAGES), "wheels": list(WHEELS), "python": PYTHON}


def _recipe_hash() -> str:
    return hashlib.sha256(json.dumps(_recipe(), sort_keys=True).encode()).hexdigest()[:16]


def aarch64_root_ready(root: Path) -> bool:
    marker = root / _MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("recipe_hash") == _recipe_hash()


def ensure_aarch64_root(root: Optional[Path] = None, log=print) -> Path:
    """The cached aarch64 root, built first if missing or built from another recipe."""
    root = Path(root) if root else default_cache_dir() / "aarch64-root"
    if aarch64_root_ready(root):
        return root
    for tool in (QEMU, "debootstrap", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DistreeError(f"{tool} not found: install the Debian packages qemu-user-static and debootstrap")
    if os.geteuid() != 0:
        raise DistreeError("building the aarch64 root needs root (debootstrap); run once as root or pass a "
                           "prebuilt root")
    suite, mirror = _debian_release_and_mirror()
    started = time.monotonic()
    with atomic_directory(root) as tmp:
        log(f"aarch64 root: debootstrap --foreign arm64 {suite} ...")
        _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
              f"--include={','.join(DEBIAN_PACKAGES)}", suite, str(tmp), mirror], "debootstrap")
        archives = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
        log(f"aarch64 root: unpacking {len(archives)} packages ...")
        for deb in archives:
            _unpack_deb(deb, tmp)
            deb.unlink()
        log("aarch64 root: installing aarch64 wheels ...")
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(tmp / SITE),
              *_platform_args(), "--implementation", "cp", "--python-version", "3.11",
              "--abi", "cp311", "--only-binary=:all:", *WHEELS], "pip install (aarch64 wheels)")
        check = run_aarch64(["-c", "import numpy, tvm, platform; print(platform.machine(), tvm.__version__)"],
                            tmp, timeout=600)
        if check.returncode != 0 or "aarch64" not in check.stdout:
            raise DistreeError(f"the aarch64 root at {tmp} does not run python+tvm: {check.stderr[-800:]}")
        build_s = time.monotonic() - started
        (tmp / _MARKER).write_text(json.dumps({"recipe_hash": _recipe_hash(), **_recipe(), "suite": suite,
                                               "build_s": round(build_s, 1), "check": check.stdout.strip()}))
        log(f"aarch64 root: ready in {build_s:.0f} s ({check.stdout.strip()})")
    return root


def run_aarch64(argv: Sequence[str], root: Path, *, timeout: float = 900, env: Optional[dict] = None,
                **popen) -> subprocess.CompletedProcess:
    """Run ``python3.11 *argv`` of the aarch64 root under qemu-user; text output captured."""
    return subprocess.run(aarch64_command(argv, root), env=aarch64_env(root, env), capture_output=True,
                          text=True, timeout=timeout, **popen)


def aarch64_command(argv: Sequence[str], root: Path) -> list[str]:
    root = Path(root).resolve()
    return [QEMU, "-L", str(root), str(root / PYTHON), *argv]


def aarch64_env(root: Path, extra: Optional[dict] = None) -> dict:
    """Environment for the emulated Python: only its own packages, no host site-packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LD_"))}
    env["PYTHONPATH"] = str(Path(root).resolve() / SITE)
    env["PYTHONNOUSERSITE"] = "1"
    env["TVM_NUM_THREADS"] = env.get("TVM_NUM_THREADS", "1")
    env.update(extra or {})
    return env


RPC_SERVER_SCRIPT = Path(__file__).with_name("rpc_inprocess_server.py")


@contextlib.contextmanager
def aarch64_rpc_server(root: Path, host: str = "127.0.0.1", start_timeout_s: float = 300) -> Iterator[str]:
    """An in-process TVM RPC server run by the emulated aarch64 Python; yields ``host:port``.

    Importing TVM under qemu takes 20-45 s (more on a loaded machine), hence the long start timeout.
    The server is one qemu process; it is killed on exit, and with this process if that is killed.
    """
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(dies_with_this_process(aarch64_command([str(RPC_SERVER_SCRIPT), "--host", host, "--port",
                                                                    "0"], root)),
                            env=aarch64_env(root), stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], start_timeout_s)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("distree-rpc-ready"):
            log.seek(0)
            raise DistreeError(f"the emulated aarch64 RPC server did not start within {start_timeout_s:g} s: "
                               f"{log.read()[-800:] or 'no output'}")
        yield f"{host}:{int(line.split()[1])}"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def _platform_args(glibc_minor: int = 36) -> list[str]:
    """pip does not widen an explicit ``--platform``: list every manylinux tag that glibc 2.<minor> runs."""
    tags = ["manylinux2014_aarch64", *(f"manylinux_2_{m}_aarch64" for m in range(17, glibc_minor + 1))]
    return [arg for tag in tags for arg in ("--platform", tag)]


def _unpack_deb(deb: Path, root: Path) -> None:
    """Unpack a .deb into ``root``, keeping the merged-/usr symlinks (lib -> usr/lib) that debootstrap made."""
    data = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], stdin=data.stdout,
                         capture_output=True)
    data.stdout.close()
    if data.wait() != 0 or tar.returncode != 0:
        raise DistreeError(f"could not unpack {deb.name}: {tar.stderr.decode()[-400:]}")


def _debian_release_and_mirror() -> tuple[str, str]:
    """This machine's Debian codename and the first Debian mirror in its apt sources."""
    codename = ""
    osr = Path("/etc/os-release")
    if osr.is_file():
        m = re.search(r"^VERSION_CODENAME=(\S+)", osr.read_text(), re.M)
        codename = m.group(1) if m else ""
    mirror = os.environ.get("DISTREE_DEBIAN_MIRROR", "")
    if not mirror:
        for src in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
            if src.is_file():
                m = re.search(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?\s", src.read_text(), re.M)
                if m:
                    mirror = m.group(1)
                    break
    if not codename or not mirror:
        raise DistreeError("cannot tell this machine's Debian release and mirror (needed to build the aarch64 "
                           "root): set DISTREE_DEBIAN_MIRROR, on Debian")
    return codename, mirror


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise DistreeError(f"{what} failed (exit {res.returncode}): {(res.stderr or res.stdout)[-800:]}")
