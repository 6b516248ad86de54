#!/usr/bin/env bash
# Service proxy figures, all from one run with one load tool (wrk) on one `skiff up` node:
#  - throughput and p50/p99 latency straight to a pod, through skiff's NodePort, and through
#    nginx as an L7 proxy in front of the same pods, for wasm pods (skiff serves those
#    in-process) and for a plain HTTP server reached over sockets (nginx serving a static
#    answer, standing in for an OCI pod: a service without selector and its own Endpoints);
#  - requests failed during a rolling update of 4 replicas and a scale 4 -> 2 under load.
# Everything runs in a network namespace of its own. Needs root; run from scripts/bench.sh
# (which builds first) or alone after `cargo build --release -p skiff` and samples/build.sh.
set -euo pipefail
shopt -s inherit_errexit   # a failed wait inside $(...) fails the script too
cd "$(dirname "$0")/.."
skiff=$PWD/target/release/skiff
secs=${BENCH_SECONDS:-5}
conns=${BENCH_CONNECTIONS:-32}

. scripts/lib/netns-cluster.sh
start_netns_cluster "skiff-bench-svc-$$" bench
k() { in_ns "$skiff" "$@"; }

k push samples/build/bootcamp-v1.wasm 127.0.0.1:5000/bootcamp:v1 >/dev/null
k push samples/build/bootcamp-v2.wasm 127.0.0.1:5000/bootcamp:v2 >/dev/null
k create deployment kubernetes-bootcamp --image=127.0.0.1:5000/bootcamp:v1 --port=8080 --replicas=2 >/dev/null
k rollout status deployment/kubernetes-bootcamp --timeout 60 >/dev/null
k expose deployment/kubernetes-bootcamp --type=NodePort --port=8080 >/dev/null
wasm_np=$(k get svc kubernetes-bootcamp -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["spec"]["ports"][0]["nodePort"])')
mapfile -t wasm_ips < <(k get pods -l app=kubernetes-bootcamp -o json | python3 -c 'import json,sys; [print(p["status"]["podIP"]) for p in json.load(sys.stdin)["items"]]')

# The socket-path backend: nginx answering a static body at 10.88.0.250:8081.
static_ip=10.88.0.250
in_ns ip addr add "$static_ip/32" dev skiff0
mkdir -p "$work/nginx"
cat >"$work/nginx/static.conf" <<CONF
worker_processes 1;
pid $work/nginx/static.pid;
error_log $work/nginx/static-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen $static_ip:8081; location / { return 200 "Hello from a static backend\n"; } }
}
CONF
nsenter --net="/run/netns/$ns" nginx -p "$work/nginx" -c "$work/nginx/static.conf" -g 'daemon off;' &
pids+=($!)
cat >"$work/static-svc.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: static}
spec: {type: NodePort, ports: [{port: 8081, targetPort: 8081}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: static}
subsets: [{addresses: [{ip: $static_ip}], ports: [{port: 8081}]}]
YAML
k apply -f "$work/static-svc.yaml" >/dev/null
static_np=$(k get svc static -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["spec"]["ports"][0]["nodePort"])')

# nginx as an L7 proxy in front of the same endpoints (keep-alive upstreams, as skiff pools).
upstream_wasm=""
for ip in "${wasm_ips[@]}"; do upstream_wasm+="server $ip:8080; "; done
cat >"$work/nginx/proxy.conf" <<CONF
worker_processes auto;
pid $work/nginx/proxy.pid;
error_log $work/nginx/proxy-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream wasm { $upstream_wasm keepalive 64; }
  upstream static { server $static_ip:8081; keepalive 64; }
  server { listen 127.0.0.1:18080; location / { proxy_pass http://wasm; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:18081; location / { proxy_pass http://static; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF
nsenter --net="/run/netns/$ns" nginx -p "$work/nginx" -c "$work/nginx/proxy.conf" -g 'daemon off;' &
pids+=($!)
for url in "http://127.0.0.1:$wasm_np/" "http://127.0.0.1:$static_np/" http://127.0.0.1:18080/ http://127.0.0.1:18081/ "http://$static_ip:8081/"; do
  wait_for 30 "$url to answer" in_ns curl -sf "$url"
done

# wrk → "req/s p50_ms p99_ms errors"
measure() {
  in_ns wrk -t2 -c"$conns" -d"${secs}s" --latency "$1" | python3 -c '
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
row() { printf '  %-38s %9s req/s  p50 %6s ms  p99 %6s ms  errors %s%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

# Each target is measured $rounds times, interleaved with the others so that drift in the
# machine's speed hits all alike; the median of each is shown.
rounds=${BENCH_ROUNDS:-3}
median() { python3 -c 'import sys, statistics; rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]; rows.sort(key=lambda r: r[0]); m = rows[len(rows) // 2]; print(f"{m[0]:.0f} {m[1]:.2f} {m[2]:.2f} {int(sum(r[3] for r in rows))}")'; }
compare() {  # label-prefix direct-url skiff-url nginx-url target
  local f=$work/cmp; : >"$f.d"; : >"$f.s"; : >"$f.n"
  for _ in $(seq "$rounds"); do
    measure "$2" >>"$f.d"; measure "$3" >>"$f.s"; measure "$4" >>"$f.n"
  done
  read -r d_rps d_p50 d_p99 d_err < <(median <"$f.d")
  read -r s_rps s_p50 s_p99 s_err < <(median <"$f.s")
  read -r x_rps x_p50 x_p99 x_err < <(median <"$f.n")
  row "$1, direct to the pod" "$d_rps" "$d_p50" "$d_p99" "$d_err"
  row "$1, via skiff NodePort" "$s_rps" "$s_p50" "$s_p99" "$s_err" "   = $(ratio "$s_rps" "$d_rps") x direct ($5)"
  row "$1, via nginx L7 proxy" "$x_rps" "$x_p50" "$x_p99" "$x_err" "   = $(ratio "$x_rps" "$d_rps") x direct; skiff / nginx = $(ratio "$s_rps" "$x_rps")"
}

echo "service proxy: wrk -t2 -c$conns, ${secs}s per run, median of $rounds interleaved runs (wrk, pods and proxies share the machine's cores)"
compare "wasm pods (2)" "http://${wasm_ips[0]}:8080/" "http://127.0.0.1:$wasm_np/" http://127.0.0.1:18080/ "in-process path; target >= 0.90"
compare "socket backend" "http://$static_ip:8081/" "http://127.0.0.1:$static_np/" http://127.0.0.1:18081/ "target >= 0.80"

# Failures under steady load while the deployment rolls and shrinks.
k scale deployment/kubernetes-bootcamp --replicas=4 >/dev/null
k rollout status deployment/kubernetes-bootcamp --timeout 60 >/dev/null
under_load() {
  local out=$work/wrk-$1.txt
  in_ns wrk -t2 -c"$conns" -d"${secs}s" "http://127.0.0.1:$wasm_np/" >"$out" &
  local w=$!
  sleep 1   # load running before the change starts
  shift
  "$@" >/dev/null
  wait "$w"
  python3 - "$out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
reqs = int(re.search(r"(\d+) requests in", t).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
errs = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
print(f"{reqs} requests, {errs} failed")
PY
}
# Settled at N: N Ready pods of the deployment's current ReplicaSet, and no other pod of the
# deployment still running or terminating (finished pods do not count).
settled() {
  k get deployment kubernetes-bootcamp -o json >"$work/deploy.json" &&
    k get replicasets -l app=kubernetes-bootcamp -o json >"$work/rs.json" &&
    k get pods -l app=kubernetes-bootcamp -o json >"$work/pods.json" &&
    python3 - "$1" "$work" <<'PY'
import json, sys
want, work = int(sys.argv[1]), sys.argv[2]
rev_key = "deployment.kubernetes.io/revision"
rev = json.load(open(f"{work}/deploy.json"))["metadata"].get("annotations", {}).get(rev_key)
hashes = [rs["metadata"]["labels"].get("pod-template-hash")
          for rs in json.load(open(f"{work}/rs.json"))["items"]
          if rs["metadata"].get("annotations", {}).get(rev_key) == rev]
ready = others = 0
for p in json.load(open(f"{work}/pods.json"))["items"]:
    md, st = p["metadata"], p.get("status", {})
    current = md.get("labels", {}).get("pod-template-hash") in hashes
    is_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
    if current and is_ready and not md.get("deletionTimestamp"):
        ready += 1
    elif st.get("phase") not in ("Succeeded", "Failed"):
        others += 1
print(f"{ready} Ready pods of the current ReplicaSet, {others} other pods running or terminating")
sys.exit(0 if ready == want and others == 0 else 1)
PY
}
rollout() { k set image deployment/kubernetes-bootcamp bootcamp=127.0.0.1:5000/bootcamp:v2 && k rollout status deployment/kubernetes-bootcamp --timeout 60; }
shrink() { k scale deployment/kubernetes-bootcamp --replicas=2 && wait_for 60 "the deployment to settle at 2 pods" settled 2; }
wait_for 60 "the deployment to settle at 4 pods" settled 4
result=$(under_load rollout rollout)
echo "  rolling update of 4 replicas under load: $result (target 0 failed)"
result=$(under_load shrink shrink)
echo "  scale 4 -> 2 under load:                 $result (target 0 failed)"
