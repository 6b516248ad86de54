//! A fake node: registers a Node, heartbeats as an agent does (renews its Lease in
//! `kube-node-lease` often, posts its Ready condition seldom and when it comes back), and acts
//! as the kubelet for the pods bound to it — marks them Running and Ready (after a start
//! delay), and finishes their deletion (after a stop delay, as containers draining) — all
//! through the public API, as a real agent does. A pod whose image names `unready` runs but
//! never becomes ready. [`FakeNode::fail`] silences it (its pods stay bound, as on a node that
//! lost power); [`FakeNode::resume`] brings it back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use skiff_api::{meta, Resource};
use skiff_client::Client;

/// How a fake node behaves.
#[derive(Debug, Clone)]
pub struct FakeNodeOptions {
    /// Pods become Ready this long after they are bound.
    pub start_delay: Duration,
    /// A pod being deleted is finished this long after the node first sees it terminating.
    pub stop_delay: Duration,
    /// The node's allocatable `pods`.
    pub max_pods: u32,
    /// Between renewals of the node's Lease.
    pub lease_every: Duration,
    /// Between posts of the Node's Ready condition (also posted when the node comes back).
    pub status_every: Duration,
    /// Extra labels of the Node (zones, say).
    pub labels: Vec<(String, String)>,
}

impl Default for FakeNodeOptions {
    fn default() -> Self {
        FakeNodeOptions {
            start_delay: Duration::ZERO,
            stop_delay: Duration::ZERO,
            max_pods: 110,
            lease_every: Duration::from_millis(500),
            status_every: Duration::from_secs(5),
            labels: Vec::new(),
        }
    }
}

pub struct FakeNode {
    pub name: String,
    heartbeat: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl FakeNode {
    /// Registers node `name` (InternalIP `ip`) and starts serving it. Pods become Ready
    /// `start_delay` after they are bound.
    pub async fn start(
        client: Client,
        name: &str,
        ip: &str,
        start_delay: Duration,
    ) -> anyhow::Result<FakeNode> {
        let opts = FakeNodeOptions {
            start_delay,
            ..Default::default()
        };
        FakeNode::start_with(client, name, ip, opts).await
    }

    /// Registers node `name` (InternalIP `ip`) and starts serving it as `opts` say.
    pub async fn start_with(
        client: Client,
        name: &str,
        ip: &str,
        opts: FakeNodeOptions,
    ) -> anyhow::Result<FakeNode> {
        let nodes = Resource::lookup("nodes").expect("nodes");
        let max_pods = opts.max_pods.to_string();
        let mut node = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
            "status": {
                "capacity": {"cpu": "4", "memory": "8Gi", "pods": max_pods},
                "allocatable": {"cpu": "4", "memory": "8Gi", "pods": max_pods},
                "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "fake node is ready",
                                "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
                "nodeInfo": {"kubeletVersion": "v1.37.0-fake", "osImage": "fake", "kernelVersion": "", "containerRuntimeVersion": "fake://1",
                             "architecture": "amd64", "operatingSystem": "linux", "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""},
            }
        });
        for (k, v) in &opts.labels {
            node["metadata"]["labels"][k] = json!(v);
        }
        client.create_dyn(nodes, None, &node).await?;
        let heartbeat = Arc::new(AtomicBool::new(true));
        let hb = heartbeat.clone();
        let name_s = name.to_string();
        let ip_s = ip.to_string();
        let task = tokio::spawn(async move {
            let mut ready_at: std::collections::HashMap<String, tokio::time::Instant> =
                Default::default();
            let mut gone_at: std::collections::HashMap<String, tokio::time::Instant> =
                Default::default();
            let mut last_renew: Option<tokio::time::Instant> = None;
            let mut last_status = tokio::time::Instant::now();
            let mut was_silent = false;
            let mut next_ip = 2u32;
            loop {
                if !hb.load(Ordering::SeqCst) {
                    was_silent = true;
                } else if last_renew.is_none_or(|t| t.elapsed() >= opts.lease_every) {
                    last_renew = Some(tokio::time::Instant::now());
                    let renewed = renew_lease(&client, &name_s).await.is_ok();
                    if renewed
                        && (was_silent || last_status.elapsed() >= opts.status_every)
                        && post_ready(&client, &name_s).await.is_ok()
                    {
                        last_status = tokio::time::Instant::now();
                        was_silent = false;
                    }
                }
                if hb.load(Ordering::SeqCst) {
                    let _ = serve_pods(
                        &client,
                        &name_s,
                        &ip_s,
                        &opts,
                        &mut ready_at,
                        &mut gone_at,
                        &mut next_ip,
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(FakeNode {
            name: name.to_string(),
            heartbeat,
            task,
        })
    }

    /// Stops heartbeating and serving pods, as a node that lost power: its pods stay bound.
    pub fn fail(&self) {
        self.heartbeat.store(false, Ordering::SeqCst);
    }

    /// Heartbeats and serves pods again, as a node back on the network: renews its Lease and
    /// posts Ready at once.
    pub fn resume(&self) {
        self.heartbeat.store(true, Ordering::SeqCst);
    }
}

/// Renews (or creates) `kube-node-lease/NODE`.
async fn renew_lease(client: &Client, node: &str) -> anyhow::Result<()> {
    let leases = Resource::lookup("leases").expect("leases");
    let ns = Some("kube-node-lease");
    let t = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    match client.get_dyn(leases, ns, node).await {
        Ok(mut l) => {
            l["spec"]["renewTime"] = json!(t);
            client.replace_dyn(leases, ns, node, &l).await?;
        }
        Err(e) if e.code() == Some(404) => {
            let l = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 15, "acquireTime": t, "renewTime": t}});
            client.create_dyn(leases, ns, &l).await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Posts the Node's Ready=True condition with a fresh heartbeat.
async fn post_ready(client: &Client, node: &str) -> anyhow::Result<()> {
    let nodes = Resource::lookup("nodes").expect("nodes");
    let mut n = client.get_dyn(nodes, None, node).await?;
    if let Some(c) = n
        .pointer_mut("/status/conditions")
        .and_then(Value::as_array_mut)
        .and_then(|cs| cs.iter_mut().find(|c| c["type"] == "Ready"))
    {
        if c["status"] != "True" {
            c["lastTransitionTime"] = json!(now());
        }
        c["status"] = json!("True");
        c["reason"] = json!("KubeletReady");
        c["lastHeartbeatTime"] = json!(now());
    }
    client.replace_status_dyn(nodes, None, node, &n).await?;
    Ok(())
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_pods(
    client: &Client,
    node: &str,
    ip: &str,
    opts: &FakeNodeOptions,
    ready_at: &mut std::collections::HashMap<String, tokio::time::Instant>,
    gone_at: &mut std::collections::HashMap<String, tokio::time::Instant>,
    next_ip: &mut u32,
) -> anyhow::Result<()> {
    let delay = opts.start_delay;
    let pods = Resource::lookup("pods").expect("pods");
    let list = client
        .list_dyn(pods, None, None, Some(&format!("spec.nodeName={node}")))
        .await?;
    for p in list["items"].as_array().cloned().unwrap_or_default() {
        let ns = meta::namespace(&p).unwrap_or("default").to_string();
        let name = meta::name(&p).to_string();
        if meta::is_deleting(&p) {
            // Once the containers have stopped, finish the deletion.
            let uid = meta::uid(&p).to_string();
            let due = *gone_at
                .entry(uid.clone())
                .or_insert_with(|| tokio::time::Instant::now() + opts.stop_delay);
            if tokio::time::Instant::now() >= due {
                let _ = client
                    .delete_dyn(pods, Some(&ns), &name, None, Some(0))
                    .await;
                ready_at.remove(&uid);
                gone_at.remove(&uid);
            }
            continue;
        }
        // A finished pod stays finished, as a kubelet leaves it.
        if matches!(
            p.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        let uid = meta::uid(&p).to_string();
        let due = *ready_at
            .entry(uid.clone())
            .or_insert_with(|| tokio::time::Instant::now() + delay);
        let never_ready = p
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["image"].as_str().is_some_and(|i| i.contains("unready")))
            });
        let ready = tokio::time::Instant::now() >= due && !never_ready;
        let is_ready = p
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
        let running = p.pointer("/status/phase") == Some(&json!("Running"));
        if running && is_ready == ready {
            continue;
        }
        let pod_ip = p
            .pointer("/status/podIP")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| {
                *next_ip += 1;
                format!("10.99.{}.{}", (*next_ip >> 8) & 255, *next_ip & 255)
            });
        let containers: Vec<Value> = p.pointer("/spec/containers").and_then(Value::as_array).cloned().unwrap_or_default().iter().map(|c| json!({
            "name": c["name"], "image": c["image"], "imageID": "", "ready": ready, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": now()}},
        })).collect();
        let st = if ready { "True" } else { "False" };
        let mut next = p.clone();
        next["status"] = json!({
            "phase": "Running", "hostIP": ip, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "startTime": now(),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": st, "lastTransitionTime": now()},
                {"type": "Ready", "status": st, "lastTransitionTime": now()},
            ],
            "containerStatuses": containers,
        });
        let _ = client
            .replace_status_dyn(pods, Some(&ns), &name, &next)
            .await;
    }
    Ok(())
}
