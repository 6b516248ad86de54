# Sourced by scripts that need a single-node cluster of their own: a network namespace, a
# docker-registry at 127.0.0.1:5000 and `skiff up` (API at 127.0.0.1:6443) inside it; or a
# cluster of several nodes in namespaces of their own on one bridge (start_netns_lan_cluster,
# below).
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

# A cluster of several nodes, each a network namespace of its own on one "LAN": a bridge in
# a namespace of its own (the server's namespace), one veth pair per node.
#
#   start_netns_lan_cluster PREFIX NODES [SKIFF_AGENT_FLAGS...]   (needs $skiff; root)
#
# Namespaces: $lan (bridge lan0 with $server_ip, `skiff server` on $server_ip:6443 and
# docker-registry on $registry) and ${node_ns[N]} for node N (1..NODES): `skiff agent` named
# node-N at $subnet.N, data dir $work/node-N, log $work/node-N.log. Extra `skiff server`
# flags go in $SERVER_FLAGS (an array, set before the call). Defines in_lan, in_node N CMD...,
# kill_agent N (kill -9 by PID), link_down N / link_up N (the node's cable to the LAN), and
# sets $work, $pids, KUBECONFIG (the CLI runs with in_lan). On exit everything stops: processes
# by PID, each node's containers (`skiff reset`), the namespaces (and with them the veths).
start_netns_lan_cluster() {
  local prefix=$1 count=$2
  shift 2
  agent_flags=("$@")
  work=$(mktemp -d)
  pids=()
  node_ns=()
  agent_pid=()
  subnet=192.168.$((20 + $$ % 200))
  server_ip=$subnet.254
  registry=$server_ip:5000
  lan=$prefix-lan
  trap _stop_netns_lan_cluster EXIT
  ip netns del "$lan" 2>/dev/null || true
  ip netns add "$lan"
  in_lan ip link set lo up
  # A MAC set by hand never changes as ports join (else nodes that cached it are cut off).
  in_lan ip link add lan0 address 02:00:00:00:00:fe type bridge
  in_lan ip addr add "$server_ip/24" dev lan0
  in_lan ip link set lan0 up
  cat >"$work/registry.yml" <<YAML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: $registry}
YAML
  nsenter --net="/run/netns/$lan" docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
  pids+=($!)
  nsenter --net="/run/netns/$lan" "$skiff" server --data-dir "$work/server" --api-addr "$server_ip:6443" ${SERVER_FLAGS[@]+"${SERVER_FLAGS[@]}"} >"$work/server.log" 2>&1 &
  pids+=($!)
  wait_for 30 "the registry at $registry (log: $work/registry.log)" in_lan curl -sf "http://$registry/v2/"
  wait_for 30 "skiff server to write its kubeconfig (log: $work/server.log)" test -f "$work/server/kubeconfig"
  export KUBECONFIG=$work/server/kubeconfig
  local n
  for n in $(seq "$count"); do
    node_ns[n]=$prefix-n$n
    ip netns del "${node_ns[n]}" 2>/dev/null || true
    ip netns add "${node_ns[n]}"
    in_node "$n" ip link set lo up
    in_lan ip link add "lan$n" type veth peer name eth0 netns "${node_ns[n]}"
    in_lan ip link set "lan$n" master lan0 up
    in_node "$n" ip addr add "$subnet.$n/24" dev eth0
    in_node "$n" ip link set eth0 up
    in_node "$n" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
    start_agent "$n"
  done
  for n in $(seq "$count"); do
    wait_for 60 "node node-$n to be Ready (log: $work/node-$n.log)" _lan_node_ready "node-$n"
  done
}

# The flags that join an agent: kept in one place, so another way of joining changes only this.
join_flags() {
  printf '%s\n' --server "https://$server_ip:6443" --token "$(cat "$work/server/token")" --ca-cert "$work/server/ca.crt"
}

# start_agent N: (re)starts node N's agent, appending to its log.
start_agent() {
  local n=$1
  local join
  mapfile -t join < <(join_flags)
  nsenter --net="/run/netns/${node_ns[n]}" "$skiff" agent "${join[@]}" --data-dir "$work/node-$n" --name "node-$n" \
    --node-ip "$subnet.$n" --agent-addr "$subnet.$n:10250" --insecure-registry "$registry" \
    --heartbeat-seconds 1 ${agent_flags[@]+"${agent_flags[@]}"} >>"$work/node-$n.log" 2>&1 &
  agent_pid[n]=$!
  pids+=($!)
}

in_lan() { nsenter --net="/run/netns/$lan" "$@"; }
in_node() { local n=$1; shift; nsenter --net="/run/netns/${node_ns[n]}" "$@"; }
kill_agent() { kill -9 "${agent_pid[$1]}" 2>/dev/null || true; wait "${agent_pid[$1]}" 2>/dev/null || true; }
link_down() { in_lan ip link set "lan$1" down; }
link_up() { in_lan ip link set "lan$1" up; }

_lan_node_ready() { in_lan "$skiff" get node "$1" 2>/dev/null | grep -q ' Ready'; }

_stop_netns_lan_cluster() {
  local p n
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for n in "${!node_ns[@]}"; do
    [ -d "$work/node-$n" ] && in_node "$n" "$skiff" reset --data-dir "$work/node-$n" >/dev/null 2>&1 || true
    ip netns del "${node_ns[n]}" 2>/dev/null || true
  done
  ip netns del "$lan" 2>/dev/null || true
  rm -rf "$work"
}
