# Sourced by scripts that need a single-node cluster of their own: a network namespace, a
# docker-registry at 127.0.0.1:5000 and `skiff up` (API at 127.0.0.1:6443) inside it.
#
#   start_netns_cluster NAMESPACE NODE_NAME   (needs $skiff: the skiff binary; root)
#
# Sets $ns, $work (a temporary directory), $pids (processes to stop: append yours), defines
# in_ns, exports KUBECONFIG, and on exit stops every process in $pids (by PID), deletes the
# namespace and the directory. Returns once the node is Ready.

start_netns_cluster() {
  ns=$1
  local node=$2
  work=$(mktemp -d)
  pids=()
  trap _stop_netns_cluster EXIT
  ip netns del "$ns" 2>/dev/null || true
  ip netns add "$ns"
  in_ns ip link set lo up
  cat >"$work/registry.yml" <<YAML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:5000}
YAML
  # nsenter execs the command, so $! is the server's own PID (not so through a function).
  nsenter --net="/run/netns/$ns" docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
  pids+=($!)
  nsenter --net="/run/netns/$ns" "$skiff" up --data-dir "$work/skiff" --api-addr 127.0.0.1:6443 --name "$node" >"$work/skiff.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do in_ns curl -sf http://127.0.0.1:5000/v2/ >/dev/null 2>&1 && [ -f "$work/skiff/kubeconfig" ] && break; sleep 0.1; done
  export KUBECONFIG=$work/skiff/kubeconfig
  until in_ns "$skiff" get nodes 2>/dev/null | grep -q ' Ready'; do sleep 0.2; done
}

# `nsenter --net` rather than `ip netns exec`: the namespace's network with the host's mounts
# (cgroups included, which runc needs).
in_ns() { nsenter --net="/run/netns/$ns" "$@"; }

_stop_netns_cluster() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  # OCI containers outlive the agent (as with any kubelet): stop them and their pod networks.
  [ -d "$work/skiff" ] && in_ns "$skiff" reset --data-dir "$work/skiff" >/dev/null 2>&1 || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
