#!/usr/bin/env bash
# Set up everything distree needs on a fresh Debian machine with Python 3.11 (run as root; re-runnable).
#   scripts/setup.sh          the build machine's dependencies (distree[compile]) + training the example
#   scripts/setup.sh --test   also the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extras="train"
[ "${1:-}" = "--test" ] && extras="test"

apt_pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross dataset-fashion-mnist qemu-user-static debootstrap openssl)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# a fresh setup needs ~2.1 GB for .venv/ (torch 0.75, TVM 0.3) and the tests ~0.6 GB more for .distree-cache/;
# say so up front rather than let pip fail half-way with "No space left on device"
need_mb=$([ "$extras" = test ] && echo 3500 || echo 2800)
if [ ! -x .venv/bin/python ]; then
  free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ "$free_mb" -lt "$need_mb" ]; then
    echo "distree setup: only ${free_mb} MB free on $(df -P . | awk 'NR == 2 {print $6}'), a fresh setup needs ~${need_mb} MB: free some space and rerun" >&2
    exit 2
  fi
  python3.11 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".[${extras}]"
# numba compiles the solver's kernels into its cache once (~7 s), not inside a user's first --time-limit
.venv/bin/python -c "from distree.solver.bnb import warm_up; warm_up()"
echo "distree: setup done ($(.venv/bin/distree --version))"
