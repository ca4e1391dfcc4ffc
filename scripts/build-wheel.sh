#!/usr/bin/env bash
# Builds the release wheel users install with `pip install merge-fast`: one abi3 wheel
# (cp39-abi3) per platform, linked against glibc 2.17 through zig so it is
# manylinux2014-compliant and installs on any x86_64 Linux with Python >= 3.9, no Rust needed.
# Usage: scripts/build-wheel.sh [OUT_DIR]   (default: dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
python3 -m pip install -q "maturin>=1.7,<2.0" "ziglang>=0.13"
python3 -m maturin build --release --strip --compatibility manylinux2014 --zig --out "$out" >&2
ls "$out"/merge_fast-*-cp39-abi3-manylinux*.whl
