#!/usr/bin/env bash
# The main job: installs what is needed, builds skiff and the wasm bootcamp app, starts a local
# OCI registry and a single-node `skiff up`, and walks the Kubernetes basics tutorial with the
# bootcamp app as wasm, printing each step and its answers; then an OCI build of the same app
# joins the service. Then stops what it started.
#
# Everything runs inside a network namespace of its own (`skiff-demo`), so the pod network,
# the registry and the API touch nothing else on the machine. Needs root.
# The app is reached through its NodePort on the node's address, as in the tutorial.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tools installed with pip (kubectl, wasm-tools) and cargo (wit-bindgen) are found even when
# their directories are not on PATH yet.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

scripts/setup.sh
samples/build.sh >/dev/null
cargo build --release -p skiff
skiff=$PWD/target/release/skiff

. scripts/lib/netns-cluster.sh
start_netns_cluster skiff-demo edge-1

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; in_ns "$@"; }
node_ip=127.0.0.1
curl_svc() {  # N requests through the NodePort, each answer printed
  for _ in $(seq "$1"); do printf '  curl http://%s:%s/  ->  ' "$node_ip" "$node_port"; in_ns curl -s "http://$node_ip:$node_port/"; done
}
# A stream of requests through the NodePort until told to stop; tallies answers and failures.
stream_start() {
  : >"$work/stream"
  (while [ ! -f "$work/stream.stop" ]; do
     in_ns curl -s -o - -w '\n' --max-time 5 "http://$node_ip:$node_port/" | head -1 | grep . >>"$work/stream" || echo FAILED >>"$work/stream"
   done) &
  stream_pid=$!
}
stream_stop() {
  touch "$work/stream.stop"; wait "$stream_pid"; rm -f "$work/stream.stop"
  printf '  requests during the change: %s, failed: %s; answers by version: v=1 %s, v=2 %s\n' \
    "$(wc -l <"$work/stream")" "$(grep -c FAILED "$work/stream" || true)" \
    "$(grep -c 'v=1' "$work/stream" || true)" "$(grep -c 'v=2' "$work/stream" || true)"
}

step "$skiff" push samples/build/bootcamp-v1.wasm 127.0.0.1:5000/bootcamp:v1
step "$skiff" push samples/build/bootcamp-v2.wasm 127.0.0.1:5000/bootcamp:v2
step "$skiff" get nodes -o wide
step "$skiff" create deployment kubernetes-bootcamp --image=127.0.0.1:5000/bootcamp:v1 --port=8080
step "$skiff" rollout status deployments/kubernetes-bootcamp --timeout 60
step "$skiff" get deployments,pods -o wide
step "$skiff" expose deployment/kubernetes-bootcamp --type=NodePort --port=8080
step "$skiff" get svc
node_port=$(in_ns "$skiff" get svc kubernetes-bootcamp -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["spec"]["ports"][0]["nodePort"])')
step "$skiff" describe svc kubernetes-bootcamp
curl_svc 2
step "$skiff" scale deployments/kubernetes-bootcamp --replicas=4
step "$skiff" rollout status deployments/kubernetes-bootcamp --timeout 60
step "$skiff" get pods -o wide
curl_svc 8
stream_start
step "$skiff" set image deployments/kubernetes-bootcamp bootcamp=127.0.0.1:5000/bootcamp:v2
step "$skiff" rollout status deployments/kubernetes-bootcamp --timeout 60
stream_stop
curl_svc 4
stream_start
step kubectl rollout undo deployments/kubernetes-bootcamp
step kubectl rollout status deployments/kubernetes-bootcamp --timeout=60s
stream_stop
curl_svc 4
pod=$(in_ns "$skiff" get pods -l app=kubernetes-bootcamp -o name | head -1 | cut -d/ -f2)
step "$skiff" logs "$pod"
step kubectl get deployments,replicasets,pods,services

# Mixed workloads: the same app as an OCI container (runc, built from source without a base
# image) joins the service; answers come from wasm pods (v=1) and containers (v=2) alike.
step skopeo copy --quiet --dest-tls-verify=false oci:samples/build/bootcamp-oci:v2 docker://127.0.0.1:5000/bootcamp-oci:v2
cat >"$work/bootcamp-oci.yaml" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bootcamp-oci}
spec:
  replicas: 2
  selector: {matchLabels: {app: kubernetes-bootcamp, runtime: runc}}
  template:
    metadata: {labels: {app: kubernetes-bootcamp, runtime: runc}}
    spec:
      containers:
      - {name: bootcamp, image: 127.0.0.1:5000/bootcamp-oci:v2, ports: [{containerPort: 8080}]}
YAML
step kubectl apply -f "$work/bootcamp-oci.yaml"
step "$skiff" rollout status deployments/bootcamp-oci --timeout 60
step "$skiff" get pods -o wide
curl_svc 8
oci_pod=$(in_ns "$skiff" get pods -l runtime=runc -o name | head -1 | cut -d/ -f2)
step "$skiff" exec "$oci_pod" -- ps
step "$skiff" delete deployment bootcamp-oci
step "$skiff" delete deployment kubernetes-bootcamp
step "$skiff" delete service kubernetes-bootcamp
printf '\ndone: the walk ran on a single-node skiff cluster with the bootcamp app as wasm, reached through its NodePort,\nthen behind the same service with OCI containers of the same app.\n'
