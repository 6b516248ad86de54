# Sourced by scripts that need a single-node cluster of their own: a network namespace, a
# docker-registry at 127.0.0.1:5000 and `skiff up` (API at 127.0.0.1:6443) inside it.
#
#   start_netns_cluster NAMESPACE NODE_NAME [SKIFF_UP_FLAGS...]   (needs $skiff: the skiff binary; root)
#
# Sets $ns, $work (a temporary directory), $pids (processes to stop: append yours), defines
# in_ns and wait_for, exports KUBECONFIG, and on exit stops every process in $pids (by PID),
# deletes the namespace and the directory. Returns once the node is Ready.

# wait_for SECONDS WHAT CMD...: runs CMD until it succeeds. Past the deadline it prints what it
# waited for (and CMD's last output) and fails, so no wait in a script can hang.
wait_for() {
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs)) out
  until out=$("$@" 2>&1); do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "timed out after ${secs}s waiting for $what${out:+ (last: ${out:0:300})}" >&2
      return 1
    fi
    sleep 0.1
  done
}

start_netns_cluster() {
  ns=$1
  local node=$2
  shift 2
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
  nsenter --net="/run/netns/$ns" "$skiff" up --data-dir "$work/skiff" --api-addr 127.0.0.1:6443 --name "$node" "$@" >"$work/skiff.log" 2>&1 &
  pids+=($!)
  wait_for 30 "the registry at 127.0.0.1:5000 (log: $work/registry.log)" in_ns curl -sf http://127.0.0.1:5000/v2/
  wait_for 30 "skiff up to write its kubeconfig (log: $work/skiff.log)" test -f "$work/skiff/kubeconfig"
  export KUBECONFIG=$work/skiff/kubeconfig
  wait_for 60 "node $node to be Ready (log: $work/skiff.log)" _node_ready "$node"
}

# `nsenter --net` rather than `ip netns exec`: the namespace's network with the host's mounts
# (cgroups included, which runc needs).
in_ns() { nsenter --net="/run/netns/$ns" "$@"; }

_node_ready() { in_ns "$skiff" get node "$1" 2>/dev/null | grep -q ' Ready'; }

_stop_netns_cluster() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  # OCI containers outlive the agent (as with any kubelet): stop them and their pod networks.
  [ -d "$work/skiff" ] && in_ns "$skiff" reset --data-dir "$work/skiff" >/dev/null 2>&1 || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
