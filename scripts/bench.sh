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

# Idle control-plane memory: a fresh `skiff server`, left idle, against a baseline process
# (`sleep`) measured the same way.
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
./target/release/skiff server --data-dir "$dir" --api-addr "127.0.0.1:$port" >/dev/null 2>&1 &
pid=$!
sleep 30 &
base=$!
trap 'kill $pid $base 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -f "$dir/kubeconfig" ] && break; sleep 0.1; done
KUBECONFIG="$dir/kubeconfig" ./target/release/skiff get ns >/dev/null
sleep 5   # idle on purpose: this measures an idle server
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
base_rss=$(awk '/VmRSS/ {print $2}' /proc/$base/status)
echo "idle skiff server RSS: $((rss / 1024)) MB (baseline process: $((base_rss / 1024)) MB; target <= 30 MB, a k3s server idles at >= 500 MB)"
