#!/usr/bin/env bash
# Prints skiff's benchmark figures, each next to a baseline measured in the same run.
# Needs root (the pod-start benchmark runs a cluster in a network namespace of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
# Tools installed with pip (kubectl, wasm-tools) and cargo (wit-bindgen) are found even when
# their directories are not on PATH yet.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

samples/build.sh >/dev/null
cargo build --release -p skiff
cargo bench -p skiff-control --bench control 2>/dev/null | sed -n '/^scheduler:/,$p'
scripts/setup.sh >/dev/null
cargo bench -p skiff-wasm --bench wasm 2>/dev/null | sed -n '/^bootcamp component/,$p'
cargo bench -p skiff-e2e --bench pod_start 2>/dev/null | sed -n '/^wasm pod start/,$p'
scripts/bench-services.sh
scripts/bench-cluster.sh
scripts/bench-jobs.sh

scripts/bench-memory.sh
scripts/bench-soak.sh
