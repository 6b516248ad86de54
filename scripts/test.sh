#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests (real kubectl,
# a real registry, the skiff binary with wasmtime, network namespaces; root needed). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tools installed with pip (kubectl, wasm-tools) and cargo (wit-bindgen) are found even when
# their directories are not on PATH yet.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# A one-off build (CI) keeps no incremental state: a GB less on disk, and no slower.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

# A build needs about 5 GB free (the debug target dir peaks near 4 GB): say what there is, so a
# run that fills the disk is recognised at once.
echo "disk: $(df -h . | awk 'NR==2 {print $4 " free on " $6}')"
scripts/setup.sh
# The wasm samples are fixtures built from source, never checked in.
samples/build.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start the skiff binary itself.
cargo build -p skiff
# Every test binary runs even when one fails, so a red run shows all that failed.
cargo test --workspace --no-fail-fast
