#!/usr/bin/env bash
# Build (once) the cached aarch64 Debian root + Python + TVM that runs pi4 artifacts under qemu-user.
# Needs root, the Debian packages qemu-user-static and debootstrap, and the Debian/PyPI registries.
# Cache: ${DISTREE_CACHE:-.distree-cache}/aarch64-root (about 600 MB; ~5 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -c 'import sys; from distree.targets.emulation import ensure_aarch64_root; print(ensure_aarch64_root(log=lambda m: print(m, file=sys.stderr)))'
