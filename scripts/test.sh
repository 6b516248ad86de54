#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests (real kubectl,
# a real `skiff server` process killed with -9). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The end-to-end tests start the skiff binary itself.
cargo build -p skiff
cargo test --workspace
