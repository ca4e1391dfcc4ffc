#!/usr/bin/env bash
# Rebuilds the extension for an editable install (`pip install -e . --no-build-isolation`
# once) and swaps it in atomically, so running processes keep their old copy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile quick -p merge_fast_py "$@"
cp target/quick/lib_core.so python/merge_fast/._core.abi3.so.new
mv -f python/merge_fast/._core.abi3.so.new python/merge_fast/_core.abi3.so
