//! Failover on a cluster of namespaces (`skiff_e2e::cluster`) with the default timings: a node
//! whose agent dies and whose link goes down has its pods Ready on the other nodes within
//! the failover time, while a steady load through a NodePort on a surviving node loses
//! requests only for a few seconds; a partitioned node keeps serving its pods on its own
//! side, and when it comes back the pods that were replaced elsewhere stop on it.
//! Needs root, iproute2, iptables, runc, the CNI plugins, docker-registry, skopeo and curl.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use skiff_e2e::cluster::{Cluster, ClusterOptions};
use skiff_e2e::eventually;
use skiff_e2e::load::Load;

/// What the defaults promise (node monitor grace + default toleration + a restart), and the
/// slack a loaded test machine gets on top of it.
const FAILOVER: Duration = Duration::from_secs(30);
const SLACK: Duration = Duration::from_secs(20);

fn deployment(c: &Cluster, name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      topologySpreadConstraints:\n      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{app: {name}}}}}}}\n      containers:\n      - {{name: app, image: {}/bootcamp:v1, ports: [{{containerPort: 8080}}], readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}}}\n",
        c.registry()
    )
}

/// Ready pods of `app` by node (pods being deleted left out).
fn ready_by_node(
    c: &Cluster,
    app: &str,
) -> anyhow::Result<BTreeMap<String, Vec<(String, String)>>> {
    let v = c.json(&["get", "pods", "-l", &format!("app={app}")])?;
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for p in v["items"].as_array().into_iter().flatten() {
        let ready = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if p["metadata"].get("deletionTimestamp").is_some() || !ready {
            continue;
        }
        let (Some(name), Some(ip), Some(node)) = (
            p["metadata"]["name"].as_str(),
            p["status"]["podIP"].as_str(),
            p["spec"]["nodeName"].as_str(),
        ) else {
            continue;
        };
        out.entry(node.to_string())
            .or_default()
            .push((name.to_string(), ip.to_string()));
    }
    Ok(out)
}

fn node_ready(c: &Cluster, node: &str) -> anyhow::Result<Option<bool>> {
    let v = c.json(&["get", "node", node])?;
    Ok(v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .map(|c| c["status"] == "True"))
}

/// Six replicas spread two per node, Ready; returns them by node.
async fn spread_six(
    c: &Cluster,
    app: &str,
) -> anyhow::Result<BTreeMap<String, Vec<(String, String)>>> {
    c.push_samples(&[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    c.apply(&format!("{app}.yaml"), &deployment(c, app, 6))?;
    eventually(
        "6 Ready pods, 2 on each node",
        Duration::from_secs(120),
        || async {
            let by_node = ready_by_node(c, app)?;
            let spread = by_node.len() == 3 && by_node.values().all(|p| p.len() == 2);
            Ok(spread.then_some(by_node))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_s_pods_are_ready_elsewhere_within_the_failover_time() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(dir.path(), ClusterOptions::default()).await?;
    spread_six(&c, "ha").await?;
    c.skiff(&[
        "expose",
        "deployment",
        "ha",
        "--type",
        "NodePort",
        "--port",
        "8080",
    ])?;
    let svc = c.json(&["get", "service", "ha"])?;
    let port = svc["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("nodePort");
    let target = format!("{}:{port}", c.nodes[0].ip);
    eventually(
        "the NodePort on node-1 to answer",
        Duration::from_secs(30),
        || async { Ok(c.curl(0, &format!("http://{target}/")).ok()) },
    )
    .await?;

    // Steady requests through node-1's NodePort, from the LAN, while node-3 dies.
    let load = Load::start(&c.lan.name, &target, 4);
    eventually(
        "the load to get answers",
        Duration::from_secs(20),
        || async { Ok((load.report().ok > 50).then_some(())) },
    )
    .await?;
    let dead = c.nodes[2].name.clone();
    c.kill_agent(2)?;
    c.set_link(2, false)?;
    let died = Instant::now();

    // Watch the load while waiting: when did the last failure happen?
    let mut failed_before = load.report().failed;
    let mut last_failure: Option<Duration> = None;
    let replaced = loop {
        let r = load.report();
        if r.failed > failed_before {
            failed_before = r.failed;
            last_failure = Some(died.elapsed());
        }
        let by_node = ready_by_node(&c, "ha")?;
        let total: usize = by_node.values().map(Vec::len).sum();
        if total == 6 && !by_node.contains_key(&dead) {
            break died.elapsed();
        }
        anyhow::ensure!(
            died.elapsed() < FAILOVER + SLACK,
            "the dead node's pods were not Ready elsewhere within {:?}: {by_node:?}\n{}",
            FAILOVER + SLACK,
            c.agent_logs(10)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(node_ready(&c, &dead)?, Some(false), "{dead} is not Ready");
    // A little more load after the move: nothing may fail any longer.
    let settled = load.report().failed;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish()?;
    let last = match last_failure {
        Some(t) => format!(", the last {:.1} s after the death", t.as_secs_f64()),
        None => String::new(),
    };
    println!(
        "failover: pods Ready elsewhere {:.1} s after the node died (default goal {} s; \
         Kubernetes' defaults ~340 s); {} of {} requests through a surviving node's NodePort \
         failed{last}",
        replaced.as_secs_f64(),
        FAILOVER.as_secs(),
        report.failed,
        report.ok + report.failed,
    );
    assert_eq!(
        report.failed, settled,
        "requests failed after the pods had moved: {:?}",
        report.errors
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_serves_locally_and_gives_up_replaced_pods_on_return(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Cluster::start(dir.path(), ClusterOptions::default()).await?;
    let before = spread_six(&c, "part").await?;
    let cut = c.nodes[2].name.clone();
    let local = before[&cut].clone();
    c.set_link(2, false)?;
    // Cut off, the node's own pods still answer on its side.
    for (pod, ip) in &local {
        let body = c.curl(2, &format!("http://{ip}:8080/"))?;
        assert!(
            body.contains(pod.as_str()),
            "{pod} on the cut-off node: {body}"
        );
    }
    eventually(
        "the cut-off node's pods Ready on the other nodes",
        FAILOVER + SLACK,
        || async {
            let by_node = ready_by_node(&c, "part")?;
            let total: usize = by_node.values().map(Vec::len).sum();
            Ok((total == 6 && !by_node.contains_key(&cut)).then_some(()))
        },
    )
    .await?;
    // Still serving locally while the rest of the cluster has replaced them.
    let (pod, ip) = &local[0];
    assert!(c
        .curl(2, &format!("http://{ip}:8080/"))?
        .contains(pod.as_str()));
    c.set_link(2, true)?;
    eventually("the node Ready again", Duration::from_secs(60), || async {
        Ok((node_ready(&c, &cut)? == Some(true)).then_some(()))
    })
    .await?;
    // The replaced pods stop on it; the others were not disturbed.
    for (pod, ip) in &local {
        eventually(
            &format!("{pod} ({ip}) stopped on {cut}"),
            Duration::from_secs(60),
            || async {
                let out = c.on_node(
                    2,
                    &[
                        "curl",
                        "-s",
                        "--max-time",
                        "1",
                        &format!("http://{ip}:8080/"),
                    ],
                )?;
                let body = String::from_utf8_lossy(&out.stdout);
                Ok((!body.contains(pod.as_str())).then_some(()))
            },
        )
        .await?;
    }
    let after = ready_by_node(&c, "part")?;
    for (node, pods) in &before {
        if *node != cut {
            for p in pods {
                assert!(
                    after.get(node).is_some_and(|now| now.contains(p)),
                    "{} on {node} was disturbed: {after:?}",
                    p.0
                );
            }
        }
    }
    Ok(())
}
