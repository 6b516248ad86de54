#!/usr/bin/env bash
# Soak: one `skiff up` node churned for $SOAK_SECONDS (default 600) with 200 pods a round —
# 150 wasm pods and 20 OCI pods of two deployments scaled up and down to zero, and 30
# run-to-completion wasm command pods (restartPolicy Never) created, finished and deleted —
# then everything deleted. The node's resources are read after a warm-up round (images pulled
# and compiled) and again once the churn ends and the node is empty; a node that runs for months
# must come back to where it started:
#   open files and RSS of the skiff process (also after $SOAK_SETTLE_SECONDS, default 90, of
#   idling), /32 host addresses on the pod bridge, pod network namespaces, OCI containers known
#   to runc, and the size of the agent's data dir (the image and compile caches excepted: they
#   are measured apart).
# Needs root; run from scripts/bench.sh or alone after `cargo build --release -p skiff` and
# samples/build.sh.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
skiff=${SKIFF:-$PWD/target/release/skiff}
soak=${SOAK_SECONDS:-600}
wasm_n=${SOAK_WASM_PODS:-150}
oci_n=${SOAK_OCI_PODS:-20}
jobs_n=${SOAK_COMMAND_PODS:-30}

. scripts/lib/netns-cluster.sh
start_netns_cluster "skiff-bench-soak-$$" soak --node-cidr-mask-size 22
up_pid=${pids[1]}
k() { in_ns "$skiff" "$@"; }
data=$work/skiff

k push samples/build/bootcamp-v1.wasm 127.0.0.1:5000/bootcamp:v1 >/dev/null
k push samples/build/hello-command.wasm 127.0.0.1:5000/hello:v1 >/dev/null
in_ns skopeo copy --quiet --dest-tls-verify=false "oci:samples/build/bootcamp-oci:v1" docker://127.0.0.1:5000/bootcamp-oci:v1
k create deployment soak-wasm --image=127.0.0.1:5000/bootcamp:v1 --port=8080 --replicas=0 >/dev/null
k create deployment soak-oci --image=127.0.0.1:5000/bootcamp-oci:v1 --port=8080 --replicas=0 >/dev/null

# pods in the namespace by phase: "total running ready succeeded other"
census() {
  k get pods -o json | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
ready = sum(1 for p in items if any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", [])))
succ = sum(1 for p in items if p.get("status", {}).get("phase") == "Succeeded")
print(len(items), ready, succ)'
}
all_up() { read -r total ready succ < <(census); echo "$ready/$((wasm_n + oci_n)) Ready, $succ/$jobs_n Succeeded"; [ "$ready" -ge "$((wasm_n + oci_n))" ] && [ "$succ" -ge "$jobs_n" ]; }
none_left() { read -r total _ _ < <(census); echo "$total pods left"; [ "$total" = 0 ]; }

round() {
  k scale deployment/soak-wasm --replicas="$wasm_n" >/dev/null
  k scale deployment/soak-oci --replicas="$oci_n" >/dev/null
  local i
  for i in $(seq "$jobs_n"); do
    k run "once-$1-$i" --image=127.0.0.1:5000/hello:v1 --restart=Never >/dev/null
  done
  wait_for 300 "round $1: every pod Ready or Succeeded" all_up
  k scale deployment/soak-wasm --replicas=0 >/dev/null
  k scale deployment/soak-oci --replicas=0 >/dev/null
  for i in $(seq "$jobs_n"); do k delete pod "once-$1-$i" >/dev/null; done
  wait_for 300 "round $1: every pod gone" none_left
}

# "fds rss_kib addrs netns containers data_kib"
caches="oci/images wasm compiled blobs"
sample() {
  local fds rss addrs nets ctrs size
  fds=$(ls "/proc/$up_pid/fd" | wc -l)
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$up_pid/status")
  addrs=$(in_ns ip -4 -o addr show dev skiff0 | grep -c '/32' || true)
  nets=$(ls /run/netns | grep -cE '^skiff-[0-9a-f]{8}-' || true)
  ctrs=$(runc --root "$data/agent/oci/runc" list -q 2>/dev/null | wc -l)
  size=$(du -sk --exclude=images --exclude=compiled --exclude=blobs "$data/agent" | cut -f1)
  echo "$fds $rss $addrs $nets $ctrs $size"
}

round warmup
read -r b_fds b_rss b_addrs b_nets b_ctrs b_size < <(sample)
echo "soak: ${soak}s of rounds of $((wasm_n + oci_n + jobs_n)) pods ($wasm_n wasm, $oci_n OCI, $jobs_n run-to-completion wasm commands) on one skiff up node"
start=$SECONDS
rounds=0
trend=()
while [ $((SECONDS - start)) -lt "$soak" ]; do
  rounds=$((rounds + 1))
  round "$rounds"
  # RSS after every 5th round: a level that keeps rising is a leak, one that flattens is a cache.
  if [ $((rounds % 5)) = 0 ]; then
    trend+=("$rounds:$(($(awk '/^VmRSS/ {print $2}' "/proc/$up_pid/status") / 1024))")
  fi
done
elapsed=$((SECONDS - start))
# Teardown of the last round finishes in the background: give it until the counts are back
# (or 60 s: a count that stays up is the finding, printed below).
back() { read -r fds rss addrs nets ctrs size < <(sample); [ "$addrs" -le "$b_addrs" ] && [ "$nets" -le "$b_nets" ] && [ "$ctrs" -le "$b_ctrs" ]; }
wait_for 60 "the node's addresses, namespaces and containers back to their level before the churn" back || true
read -r a_fds a_rss a_addrs a_nets a_ctrs a_size < <(sample)
# What stays once the node has been idle longer than the store's watch window (75 s): the
# window's old events go, and the allocator gives back what they held.
settle=${SOAK_SETTLE_SECONDS:-90}
sleep "$settle"   # idle on purpose: this measures an idle node
read -r i_fds i_rss _ < <(sample)
echo "  $rounds rounds in ${elapsed}s ($((rounds * (wasm_n + oci_n + jobs_n))) pods created and deleted)"
printf '  %-44s %10s %10s\n' "" "before" "after"
printf '  %-44s %10s %10s\n' "open files of skiff up" "$b_fds" "$a_fds"
printf '  %-44s %10s %10s\n' "RSS of skiff up (KiB)" "$b_rss" "$a_rss"
printf '  %-44s %10s %10s\n' "open files, RSS (KiB) after ${settle}s idle" "" "$i_fds $i_rss"
printf '  %-44s %10s %10s\n' "/32 addresses on skiff0" "$b_addrs" "$a_addrs"
printf '  %-44s %10s %10s\n' "pod network namespaces" "$b_nets" "$a_nets"
printf '  %-44s %10s %10s\n' "OCI containers known to runc" "$b_ctrs" "$a_ctrs"
printf '  %-44s %10s %10s\n' "agent data dir without image caches (KiB)" "$b_size" "$a_size"
echo "  RSS of skiff up (MiB) after round: ${trend[*]}"
printf '  %-44s %10s\n' "image and compile caches (KiB)" "$(du -sk "$data/agent" | cut -f1)"
# Where the resident memory is: the largest mappings by RSS (a wasm instance pool is one large
# reservation; the allocator's heap is many smaller anonymous arenas).
echo "  largest mappings of skiff up by RSS (MiB resident / MiB mapped, name):"
awk '/^[0-9a-f]+-[0-9a-f]+ / {name = ($6 == "" ? "[anonymous]" : $6)}
     /^Size:/ {size = $2 / 1024}
     /^Rss:/ {printf "%.1f %.0f %s\n", $2 / 1024, size, name}' "/proc/$up_pid/smaps" |
  sort -rn | sed -n 1,6p | while read -r rss size name; do printf '    %8s / %-8s %s\n' "$rss" "$size" "$name"; done
