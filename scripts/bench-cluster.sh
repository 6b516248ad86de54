#!/usr/bin/env bash
# Cross-node request cost on a three-node cluster in network namespaces (server, registry and
# a LAN bridge in one namespace, each agent in one of its own): wrk in node-1's namespace (where
# a host-network pod of node-1 would be) against
#  - a wasm pod on node-1 and one on node-2, at their pod IPs (pod network: same node vs across);
#  - node-1's NodePort of a service whose pod is on node-1 (the in-process hand-off) and of one
#    whose pod is on node-2 (a socket across the pod network);
# req/s and p99 of each, the cross-node figures as a ratio to the same-node baseline. Once per
# pod network backend in BENCH_POD_NETWORKS (default "host-gw vxlan"). The nodes share the
# machine's cores and its kernel, so "across nodes" costs veths, a bridge and routing (and
# VXLAN encapsulation), not a real wire.
# Needs root; run after `cargo build --release -p skiff` and samples/build.sh (SKIFF names
# another binary).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
skiff=${SKIFF:-$PWD/target/release/skiff}
secs=${BENCH_SECONDS:-5}
conns=${BENCH_CONNECTIONS:-32}
rounds=${BENCH_ROUNDS:-3}

if [ "${1:-}" != "--one" ]; then
  echo "cross-node requests: wrk -t2 -c$conns, ${secs}s per run, median of $rounds interleaved runs, from node-1's namespace"
  for mode in ${BENCH_POD_NETWORKS:-host-gw vxlan}; do
    "$0" --one "$mode"
  done
  exit 0
fi
mode=$2

. scripts/lib/netns-cluster.sh
start_netns_lan_cluster "skiff-bench-x-$$" 3 --pod-network "$mode"
k() { in_lan "$skiff" "$@"; }

k push samples/build/bootcamp-v1.wasm "$registry/bootcamp:v1" --insecure-registry "$registry" >/dev/null
for side in 1 2; do
  cat >"$work/d$side.yaml" <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: on-node-$side}
spec:
  replicas: 1
  selector: {matchLabels: {app: on-node-$side}}
  template:
    metadata: {labels: {app: on-node-$side}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node-$side}
      containers: [{name: app, image: $registry/bootcamp:v1, ports: [{containerPort: 8080}]}]
YAML
  k apply -f "$work/d$side.yaml" >/dev/null
  k rollout status "deployment/on-node-$side" --timeout 90 >/dev/null
  k expose "deployment/on-node-$side" --type=NodePort --port=80 --target-port=8080 >/dev/null
done
pod_ip() { k get pods -l "app=on-node-$1" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["status"]["podIP"])'; }
node_port() { k get svc "on-node-$1" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["spec"]["ports"][0]["nodePort"])'; }
urls=("http://$(pod_ip 1):8080/" "http://$(pod_ip 2):8080/" "http://$subnet.1:$(node_port 1)/" "http://$subnet.1:$(node_port 2)/")
for url in "${urls[@]}"; do
  wait_for 30 "$url to answer from node-1" in_node 1 curl -sf "$url"
done

# wrk → "req/s p50_ms p99_ms errors"
measure() {
  in_node 1 wrk -t2 -c"$conns" -d"${secs}s" --latency "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\s*$", t, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
errs = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
p50, p99 = ms("50%"), ms("99%")
print(f"{rps:.0f} {p50:.2f} {p99:.2f} {errs}")'
}
median() { python3 -c 'import sys, statistics; rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]; rows.sort(key=lambda r: r[0]); m = rows[len(rows) // 2]; print(f"{m[0]:.0f} {m[1]:.2f} {m[2]:.2f} {int(sum(r[3] for r in rows))}")'; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
row() { printf '  %-44s %7s req/s  p50 %6s ms  p99 %6s ms  errors %s%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}"; }

for i in 0 1 2 3; do : >"$work/m$i"; done
for _ in $(seq "$rounds"); do
  for i in 0 1 2 3; do measure "${urls[i]}" >>"$work/m$i"; done
done
read -r a_rps a_p50 a_p99 a_err < <(median <"$work/m0")
read -r b_rps b_p50 b_p99 b_err < <(median <"$work/m1")
read -r c_rps c_p50 c_p99 c_err < <(median <"$work/m2")
read -r d_rps d_p50 d_p99 d_err < <(median <"$work/m3")
echo "pod network $mode:"
row "pod IP, pod on the same node" "$a_rps" "$a_p50" "$a_p99" "$a_err"
row "pod IP, pod on another node" "$b_rps" "$b_p50" "$b_p99" "$b_err" \
  "   = $(ratio "$b_rps" "$a_rps") x req/s, $(ratio "$b_p99" "$a_p99") x p99 of same node"
row "NodePort, pod on the same node (in-process)" "$c_rps" "$c_p50" "$c_p99" "$c_err"
row "NodePort, pod on another node (socket)" "$d_rps" "$d_p50" "$d_p99" "$d_err" \
  "   = $(ratio "$d_rps" "$c_rps") x req/s, $(ratio "$d_p99" "$c_p99") x p99 of same node"
