#!/usr/bin/env bash
# Job figures on one `skiff up` node in a network namespace of its own:
#  - wall time of a Job of 100 completions, parallelism 10, with the job-square sample as a
#    wasm command and as an OCI image (the same C program, static, over busybox), and the ratio;
#  - seconds from a CronJob's scheduled time to its pod Running (waits for the next minute).
# Needs root; run from scripts/bench.sh (which builds first) or alone after
# `cargo build --release -p skiff` and samples/build.sh.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
skiff=${SKIFF_BIN:-$PWD/target/release/skiff}   # SKIFF_BIN: another build (e.g. debug)
completions=${BENCH_JOB_COMPLETIONS:-100}
parallelism=${BENCH_JOB_PARALLELISM:-10}

. scripts/lib/netns-cluster.sh
start_netns_cluster "skiff-bench-jobs-$$" bench
k() { in_ns "$skiff" "$@"; }

k push samples/build/job-square.wasm 127.0.0.1:5000/job-square:v1 >/dev/null
in_ns skopeo copy --quiet --dest-tls-verify=false oci:samples/build/job-square-oci:v1 docker://127.0.0.1:5000/job-square-oci:v1

job_complete() { k get job "$1" -o json | python3 -c 'import json,sys; j=json.load(sys.stdin); sys.exit(0 if any(c["type"]=="Complete" and c["status"]=="True" for c in j.get("status",{}).get("conditions",[])) else 1)'; }

# Runs a Job of the given image; prints its wall time in seconds (create to Complete).
run_job() {
  local name=$1 image=$2
  cat >"$work/$name.yaml" <<YAML
apiVersion: batch/v1
kind: Job
metadata: {name: $name}
spec:
  completions: $completions
  parallelism: $parallelism
  completionMode: Indexed
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: $image}]
YAML
  local t0 t1
  t0=$(date +%s.%N)
  k apply -f "$work/$name.yaml" >/dev/null
  wait_for 600 "job $name to complete" job_complete "$name"
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}

# Warm both images (pull, compile) so the figures are about running pods.
k create job warm-wasm --image=127.0.0.1:5000/job-square:v1 >/dev/null
k create job warm-oci --image=127.0.0.1:5000/job-square-oci:v1 >/dev/null
both_warm() { job_complete warm-wasm && job_complete warm-oci; }
wait_for 120 "the warm-up jobs to complete" both_warm

wasm=$(run_job sq-wasm 127.0.0.1:5000/job-square:v1)
oci=$(run_job sq-oci 127.0.0.1:5000/job-square-oci:v1)
echo "job of $completions completions, parallelism $parallelism: wasm ${wasm}s, OCI ${oci}s, OCI/wasm $(python3 -c "print(f'{$oci / $wasm:.1f}x')")"

# A CronJob: from its scheduled minute to its pod Running.
k create cronjob tick --image=127.0.0.1:5000/job-square:v1 --schedule='*/1 * * * *' >/dev/null
cj_pod_running() {
  k get pods -o json | python3 -c '
import json, sys
from datetime import datetime
def t(s): return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").timestamp()
for p in json.load(sys.stdin)["items"]:
    if not p["metadata"].get("generateName", "").startswith("tick-"): continue
    cs = (p.get("status", {}).get("containerStatuses") or [{}])[0].get("state", {})
    started = (cs.get("running") or cs.get("terminated") or {}).get("startedAt")
    if started: print(started); sys.exit(0)
sys.exit(1)'
}
wait_for 150 "the CronJob's first pod to run" cj_pod_running
started=$(cj_pod_running)
scheduled=$(k get jobs -o json | python3 -c 'import json,sys; print(next(j["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"] for j in json.load(sys.stdin)["items"] if j["metadata"]["name"].startswith("tick-")))')
python3 -c "
from datetime import datetime
t = lambda s: datetime.strptime(s, '%Y-%m-%dT%H:%M:%SZ').timestamp()
print(f'cronjob scheduled time to pod running: {t(\"$started\") - t(\"$scheduled\"):.0f} s (1 s resolution)')"
