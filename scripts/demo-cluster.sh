#!/usr/bin/env bash
# Three nodes, one pod network: `skiff server` and a registry on a "LAN" (a bridge in a network
# namespace of its own), three `skiff agent`s each in a namespace of its own joined to it by a
# veth pair. A wasm Deployment spreads over the nodes; one node's NodePort is answered by pods
# on every node (each answer printed with the pod and node that gave it). Then one node dies
# (kill -9 of its agent, its link down) and the script prints how many seconds pass until its
# pods are Ready elsewhere, or what stands after the deadline.
#
# Needs root. Builds the release binary unless SKIFF names one. POD_NETWORK=vxlan runs the
# overlay instead of host-gw; NODE_GRACE / UNREACHABLE_TOLERATION (seconds, default 15 / 10, the
# server's defaults) are its failover settings, FAILOVER_DEADLINE (default 180) how long to wait.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if [ -z "${SKIFF:-}" ]; then
  scripts/setup.sh
  samples/build.sh >/dev/null
  cargo build --release -p skiff
  skiff=$PWD/target/release/skiff
else
  skiff=$SKIFF
fi
[ -f samples/build/bootcamp-v1.wasm ] || samples/build.sh >/dev/null

. scripts/lib/netns-cluster.sh
SERVER_FLAGS=(--node-monitor-grace-period "${NODE_GRACE:-15}" --default-unreachable-toleration-seconds "${UNREACHABLE_TOLERATION:-10}")
echo "starting a server and three nodes in network namespaces (pod network: ${POD_NETWORK:-host-gw})"
start_netns_lan_cluster "skiff-demo-$$" 3 --pod-network "${POD_NETWORK:-host-gw}"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; in_lan "$@"; }
json() { in_lan "$skiff" "$@" -o json; }
# pod -> node of the live pods of app=hello, as "POD NODE" lines.
pods_by_node() {
  json get pods -l app=hello | python3 -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    if "deletionTimestamp" not in p["metadata"]:
        print(p["metadata"]["name"], p["spec"].get("nodeName", "-"))'
}

step "$skiff" get nodes -o wide
# Each agent routes the other two nodes' pod CIDRs (routes it made carry proto 83).
has_routes() { [ "$(in_node "$1" ip -4 route show proto 83 | wc -l)" -eq 2 ]; }
for n in 1 2 3; do
  wait_for 30 "node-$n's routes to the other nodes' pod CIDRs" has_routes "$n"
  printf '  node-%s routes: %s\n' "$n" "$(in_node "$n" ip -4 route show proto 83 | tr '\n' ';')"
done
step "$skiff" push samples/build/bootcamp-v1.wasm "$registry/bootcamp:v1" --insecure-registry "$registry"
step "$skiff" create deployment hello --image="$registry/bootcamp:v1" --port=8080 --replicas=6
step "$skiff" rollout status deployments/hello --timeout 90
step "$skiff" get pods -o wide
step "$skiff" expose deployment/hello --type=NodePort --port=80 --target-port=8080
node_port=$(json get svc hello | python3 -c 'import json,sys; print(json.load(sys.stdin)["spec"]["ports"][0]["nodePort"])')

declare -A node_of
while read -r pod node; do node_of[$pod]=$node; done < <(pods_by_node)
echo
echo "12 requests to node-1's NodePort http://$subnet.1:$node_port/ (from the LAN):"
declare -A answered_from
for _ in $(seq 12); do
  body=$(in_lan curl -s --max-time 5 "http://$subnet.1:$node_port/" || echo "(no answer)")
  pod=$(sed -n 's/.*Running on: \([^ |]*\).*/\1/p' <<<"$body")
  printf '  %-60s <- pod %s on %s\n' "$(tr -d '\n' <<<"$body")" "${pod:--}" "${node_of[$pod]:-?}"
  [ -n "$pod" ] && answered_from[${node_of[$pod]:-?}]=1
done
echo "  answered by pods on: ${!answered_from[*]}"

echo
echo "pod to pod across nodes: node-2's namespace asks each pod at its pod IP"
json get pods -l app=hello | python3 -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    print(p["metadata"]["name"], p["spec"]["nodeName"], p["status"].get("podIP", ""))' |
while read -r pod node ip; do
  printf '  %-24s %-7s %-12s -> %s\n' "$pod" "$node" "$ip" "$(in_node 2 curl -s --max-time 5 "http://$ip:8080/" | tr -d '\n' || echo "(no answer)")"
done

echo
echo "node-3 dies: kill -9 of its agent, its link to the LAN down"
kill_agent 3
link_down 3
t0=$SECONDS
deadline=${FAILOVER_DEADLINE:-180}
# Ready: six live pods of app=hello Ready, none on node-3.
replaced() {
  json get pods -l app=hello | python3 -c '
import json, sys
pods = [p for p in json.load(sys.stdin)["items"] if "deletionTimestamp" not in p["metadata"]]
ready = [p for p in pods if p["spec"].get("nodeName") != "node-3" and any(
    c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))]
sys.exit(0 if len(ready) >= 6 else 1)'
}
node3_state() {
  json get node node-3 | python3 -c '
import json, sys
c = [c for c in json.load(sys.stdin)["status"].get("conditions", []) if c["type"] == "Ready"]
print({"True": "Ready", "False": "NotReady"}.get(c[0]["status"], "Unknown") if c else "Unknown")'
}
if wait_for "$deadline" "node-3's pods to be Ready on the other nodes" replaced; then
  printf '  node-3 is %s; its pods were Ready on the other nodes %s s after it died\n' "$(node3_state)" "$((SECONDS - t0))"
else
  printf '  after %s s node-3 is %s and its pods are not all Ready elsewhere:\n' "$deadline" "$(node3_state)"
fi
step "$skiff" get pods -o wide
echo
echo "the NodePort on node-1 after the failover:"
for _ in $(seq 6); do
  printf '  %s\n' "$(in_lan curl -s --max-time 5 "http://$subnet.1:$node_port/" | tr -d '\n' || echo '(no answer)')"
done
echo
echo "node-3 comes back (link up, agent restarted)"
link_up 3
start_agent 3
wait_for 60 "node-3 to be Ready again" _lan_node_ready node-3
step "$skiff" get nodes -o wide
printf '\ndone: three nodes in network namespaces shared one pod network; a NodePort on one node reached pods on all.\n'
