#!/usr/bin/env bash
# Idle memory of each skiff role, split into anonymous memory (the heap: what skiff itself
# holds) and file-backed memory (the binary's pages the kernel maps in, shared and reclaimable),
# each next to a baseline process (`sleep`) measured the same way:
#   - `skiff server` (control plane, embedded store), alone and with one agent joined;
#   - `skiff up` (server + agent + proxy + DNS in one process) in a network namespace;
#   - `skiff agent` joined to a separate `skiff server` in a second namespace.
# Every role is left idle for $IDLE_SECONDS (default 45) after it is ready. The whole is run
# twice: first with SKIFF_KEEP_PAGES=1, the baseline, where a role keeps every page of its
# executable that start-up touched; then as shipped, where each role gives those back 20 s
# after it starts (cli/src/trim.rs), so the second table shows what idling itself uses.
# Needs root; run from scripts/bench.sh (which builds first) or alone after
# `cargo build --release -p skiff` (or with SKIFF=path for another binary).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
skiff=${SKIFF:-$PWD/target/release/skiff}
idle=${IDLE_SECONDS:-45}
if [ -z "${SKIFF_BENCH_MEMORY_PASS:-}" ]; then
  echo "== baseline: start-up's pages kept (SKIFF_KEEP_PAGES=1)"
  SKIFF_BENCH_MEMORY_PASS=kept SKIFF_KEEP_PAGES=1 bash scripts/bench-memory.sh
  echo "== as shipped: start-up's pages given back"
  SKIFF_BENCH_MEMORY_PASS=shipped bash scripts/bench-memory.sh
  exit
fi

. scripts/lib/netns-cluster.sh
start_netns_cluster "skiff-bench-mem-$$" mem-up
up_pid=${pids[1]}

# A second namespace: `skiff server` and a `skiff agent` joined to it, as separate processes
# (started with nsenter itself, which execs them, so $! is their own PID).
ns2="skiff-bench-mem2-$$"
ip netns add "$ns2"
in_ns2() { nsenter --net="/run/netns/$ns2" "$@"; }
in_ns2 ip link set lo up
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; in_ns2 "$skiff" reset --data-dir "$work/agent" >/dev/null 2>&1 || true; ip netns del "$ns2" 2>/dev/null || true; _stop_netns_cluster' EXIT
nsenter --net="/run/netns/$ns2" "$skiff" server --data-dir "$work/server" --api-addr 127.0.0.1:6443 >"$work/server.log" 2>&1 &
server_pid=$!
pids+=("$server_pid")
# And a server no node joins: the control plane by itself.
nsenter --net="/run/netns/$ns2" "$skiff" server --data-dir "$work/server-alone" --api-addr 127.0.0.1:6444 >"$work/server-alone.log" 2>&1 &
alone_pid=$!
pids+=("$alone_pid")
wait_for 30 "the second skiff server to write its token (log: $work/server-alone.log)" test -s "$work/server-alone/token"
wait_for 30 "skiff server to write its token (log: $work/server.log)" test -s "$work/server/token"
nsenter --net="/run/netns/$ns2" "$skiff" agent --server https://127.0.0.1:6443 --token "$(cat "$work/server/token")" \
  --ca-cert "$work/server/ca.crt" --data-dir "$work/agent" --name mem-agent >"$work/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
agent_ready() { KUBECONFIG=$work/server/kubeconfig in_ns2 "$skiff" get node mem-agent | grep -q ' Ready'; }
wait_for 60 "skiff agent's node to be Ready (log: $work/agent.log)" agent_ready
KUBECONFIG=$work/server/kubeconfig in_ns2 "$skiff" get ns >/dev/null

sleep "$idle" &
base_pid=$!
pids+=("$base_pid")
sleep "$((idle - 1))"   # idle on purpose: this measures idle processes

# kB from /proc/PID/status → "total anon file" in MiB
mem() { awk '/^VmRSS/ {t=$2} /^RssAnon/ {a=$2} /^RssFile/ {f=$2} END {printf "%.1f %.1f %.1f\n", t/1024, a/1024, f/1024}' "/proc/$1/status"; }
read -r b_t b_a b_f < <(mem "$base_pid")
row() {
  read -r t a f < <(mem "$2")
  printf '  %-28s RSS %6.1f MiB = anonymous %6.1f + file-backed %6.1f%s\n' "$1" "$t" "$a" "$f" "${3:-}"
}
echo "idle memory after ${idle}s (baseline process \`sleep\`: RSS $b_t MiB = anonymous $b_a + file-backed $b_f)"
row "skiff server, no node" "$alone_pid" "   (goal <= 15 MiB; a k3s server idles above 500 MB)"
row "skiff server, one node" "$server_pid"
row "skiff agent (wasm + OCI)" "$agent_pid"
row "skiff up (server + agent)" "$up_pid"
