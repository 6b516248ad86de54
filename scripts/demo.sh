#!/usr/bin/env bash
# The main job, on a local single-node control plane: installs what is needed, builds skiff,
# starts `skiff server` on its own data dir and port, and walks the Kubernetes basics tutorial
# with the skiff CLI and with kubectl, printing each step. Stops what it started.
#
# Until the node agent lands (`skiff agent` / `skiff up`), pods are scheduled only once a node
# joins: this walk shows the control plane's side of it (deployments, replica sets, rollouts,
# services, rollbacks) with pods Pending.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release -p skiff
skiff=./target/release/skiff

dir=$(mktemp -d)
port=${SKIFF_DEMO_PORT:-16443}
"$skiff" server --data-dir "$dir" --api-addr "127.0.0.1:$port" >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -f "$dir/kubeconfig" ] && break; sleep 0.1; done
export KUBECONFIG="$dir/kubeconfig"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$skiff" version
step "$skiff" create deployment kubernetes-bootcamp --image=127.0.0.1:5000/bootcamp:v1 --port=8080
step "$skiff" get deployments,pods -o wide
step "$skiff" expose deployment/kubernetes-bootcamp --type=NodePort --port=8080
step "$skiff" get svc
step "$skiff" scale deployments/kubernetes-bootcamp --replicas=4
step "$skiff" get rs
step "$skiff" set image deployments/kubernetes-bootcamp bootcamp=127.0.0.1:5000/bootcamp:v2
step "$skiff" rollout history deployments/kubernetes-bootcamp
step "$skiff" rollout undo deployments/kubernetes-bootcamp
step kubectl get deployments,replicasets,services
step kubectl describe deployment kubernetes-bootcamp
step "$skiff" delete deployment kubernetes-bootcamp
step kubectl get all
