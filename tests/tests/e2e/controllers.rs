//! The reference walk against the control plane with two fake nodes: create, scale 1→4→2,
//! a rolling update whose availability is checked at every step of the watch stream,
//! rollback, and a node that stops heartbeating having its pods replaced on the other node.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use skiff_api::{meta, Resource};
use skiff_client::{verbs, Client};
use skiff_e2e::{eventually, fake_node::FakeNode, TestCluster};

const MERGE: &str = "application/merge-patch+json";
const SMP: &str = "application/strategic-merge-patch+json";

fn res(n: &str) -> &'static Resource {
    Resource::lookup(n).unwrap()
}

/// Ready, non-terminating pods of the deployment, by node.
async fn ready_pods(c: &Client, app: &str) -> anyhow::Result<Vec<Value>> {
    let list = c
        .list_dyn(
            res("pods"),
            Some("default"),
            Some(&format!("app={app}")),
            None,
        )
        .await?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(pod_ready)
        .collect())
}

fn pod_ready(p: &Value) -> bool {
    !meta::is_deleting(p)
        && p.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
}

/// Sets the bootcamp deployment's replicas through its scale subresource.
async fn scale(c: &Client, replicas: i64) -> anyhow::Result<()> {
    c.patch_dyn(
        res("deployments"),
        Some("default"),
        "bootcamp",
        Some("scale"),
        MERGE,
        &json!({"spec": {"replicas": replicas}}),
    )
    .await?;
    Ok(())
}

async fn wait_rolled_out(c: &Client, name: &str, replicas: i64, image: &str) -> anyhow::Result<()> {
    eventually(
        &format!("deployment {name} rolled out to {replicas} x {image}"),
        Duration::from_secs(30),
        || async {
            let d = c.get_dyn(res("deployments"), Some("default"), name).await?;
            let (done, _) = verbs::rollout_status(&d)?;
            let pods = ready_pods(c, name).await?;
            let right_image = pods
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == image);
            let total = c
                .list_dyn(
                    res("pods"),
                    Some("default"),
                    Some(&format!("app={name}")),
                    None,
                )
                .await?["items"]
                .as_array()
                .map_or(0, Vec::len);
            Ok((done
                && d["spec"]["replicas"] == replicas
                && pods.len() as i64 == replicas
                && total as i64 == replicas
                && right_image)
                .then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_walk_with_fake_nodes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|c| {
        c.controllers.node_grace = Duration::from_secs(3);
        c.cluster.default_unreachable_toleration_seconds = 1;
    })
    .await?;
    let c = cluster.client.clone();
    let _a = FakeNode::start(c.clone(), "node-a", "127.0.0.2", Duration::from_millis(300)).await?;
    let b = FakeNode::start(c.clone(), "node-b", "127.0.0.3", Duration::from_millis(300)).await?;

    // create
    let d = verbs::deployment(
        "bootcamp",
        &["127.0.0.1:5000/bootcamp:v1".into()],
        Some(8080),
        1,
    );
    c.create_dyn(res("deployments"), Some("default"), &d)
        .await?;
    wait_rolled_out(&c, "bootcamp", 1, "127.0.0.1:5000/bootcamp:v1").await?;

    // scale 1 → 4: replicas spread over both nodes
    scale(&c, 4).await?;
    wait_rolled_out(&c, "bootcamp", 4, "127.0.0.1:5000/bootcamp:v1").await?;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in ready_pods(&c, "bootcamp").await? {
        *per_node
            .entry(p["spec"]["nodeName"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        vec![2, 2],
        "replicas spread over nodes: {per_node:?}"
    );

    // scale 4 → 2
    scale(&c, 2).await?;
    wait_rolled_out(&c, "bootcamp", 2, "127.0.0.1:5000/bootcamp:v1").await?;

    // set image, watching pods: ready pods never drop below replicas - maxUnavailable (2 - 0).
    let (mut pods, mut stream) =
        skiff_e2e::list_and_watch_pods(&c, "default", "app=bootcamp").await?;
    let d = c
        .get_dyn(res("deployments"), Some("default"), "bootcamp")
        .await?;
    c.patch_dyn(
        res("deployments"),
        Some("default"),
        "bootcamp",
        None,
        SMP,
        &verbs::set_image_patch(
            &d,
            &[("bootcamp".into(), "127.0.0.1:5000/bootcamp:v2".into())],
        )?,
    )
    .await?;
    let mut min_ready = usize::MAX;
    let mut events = 0;
    let watched = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            events += 1;
            let name = meta::name(&ev.object).to_string();
            if ev.kind == "DELETED" {
                pods.remove(&name);
            } else {
                pods.insert(name, ev.object);
            }
            let ready = pods.values().filter(|p| pod_ready(p)).count();
            min_ready = min_ready.min(ready);
            let v2_ready = pods
                .values()
                .filter(|p| {
                    pod_ready(p)
                        && p["spec"]["containers"][0]["image"] == "127.0.0.1:5000/bootcamp:v2"
                })
                .count();
            if v2_ready == 2 && pods.len() == 2 {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("watch ended early")
    })
    .await;
    watched
        .map_err(|_| anyhow::anyhow!("rollout did not finish in 30 s: pods {:?}", pods.keys()))??;
    assert!(
        events > 4,
        "the rollout was observed step by step ({events} events)"
    );
    assert!(
        min_ready >= 2,
        "availability dropped to {min_ready} ready pods during the rollout"
    );
    wait_rolled_out(&c, "bootcamp", 2, "127.0.0.1:5000/bootcamp:v2").await?;
    let d = c
        .get_dyn(res("deployments"), Some("default"), "bootcamp")
        .await?;
    assert_eq!(meta::annotations(&d)[skiff_api::REVISION_ANNOTATION], "2");

    // rollout undo → v1 again, as revision 3, reusing the first ReplicaSet
    let rss = c
        .list_dyn(res("replicasets"), Some("default"), None, None)
        .await?;
    let items = rss["items"].as_array().cloned().unwrap_or_default();
    let (patch, to) = verbs::rollback_patch(&d, &items, None)?;
    assert_eq!(to, 1);
    c.patch_dyn(
        res("deployments"),
        Some("default"),
        "bootcamp",
        None,
        "application/json-patch+json",
        &patch,
    )
    .await?;
    wait_rolled_out(&c, "bootcamp", 2, "127.0.0.1:5000/bootcamp:v1").await?;
    let rss = c
        .list_dyn(res("replicasets"), Some("default"), None, None)
        .await?;
    assert_eq!(
        rss["items"].as_array().map_or(0, Vec::len),
        2,
        "rollback reuses the old ReplicaSet"
    );
    let d = c
        .get_dyn(res("deployments"), Some("default"), "bootcamp")
        .await?;
    assert_eq!(meta::annotations(&d)[skiff_api::REVISION_ANNOTATION], "3");

    // node-b stops heartbeating: it goes NotReady and its pods are replaced on node-a.
    let on_b = ready_pods(&c, "bootcamp")
        .await?
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "node-b")
        .count();
    assert!(on_b > 0, "the test needs a pod on node-b");
    b.fail();
    eventually("node-b NotReady", Duration::from_secs(15), || async {
        let n = c.get_dyn(res("nodes"), None, "node-b").await?;
        let ready = n
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["status"].clone());
        Ok((ready == Some(json!("Unknown"))).then_some(()))
    })
    .await?;
    eventually(
        "pods replaced on node-a",
        Duration::from_secs(20),
        || async {
            let pods = ready_pods(&c, "bootcamp").await?;
            Ok(
                (pods.len() == 2 && pods.iter().all(|p| p["spec"]["nodeName"] == "node-a"))
                    .then_some(()),
            )
        },
    )
    .await?;

    // delete: the deployment's ReplicaSets and pods are collected.
    c.delete_dyn(
        res("deployments"),
        Some("default"),
        "bootcamp",
        Some("Background"),
        None,
    )
    .await?;
    eventually("dependents collected", Duration::from_secs(15), || async {
        let rs = c
            .list_dyn(res("replicasets"), Some("default"), None, None)
            .await?;
        let pods = c
            .list_dyn(res("pods"), Some("default"), Some("app=bootcamp"), None)
            .await?;
        let left: Vec<&Value> = pods["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["spec"]["nodeName"] != "node-b")
                    .collect()
            })
            .unwrap_or_default();
        Ok((rs["items"].as_array().is_some_and(Vec::is_empty) && left.is_empty()).then_some(()))
    })
    .await?;
    cluster.server.shutdown().await?;
    Ok(())
}

/// The message of a pod's `PodScheduled=False` condition, once it has one.
async fn unschedulable_message(c: &Client, pod: &str) -> anyhow::Result<String> {
    eventually(
        &format!("PodScheduled=False on {pod}"),
        Duration::from_secs(10),
        || async {
            let p = c.get_dyn(res("pods"), Some("default"), pod).await?;
            Ok(p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                })
                .map(|c| c["message"].as_str().unwrap_or("").to_string()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_says_why_and_is_retried() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    let pod = json!({"metadata": {"name": "big"}, "spec": {"containers": [{"name": "a", "image": "x:v1", "resources": {"requests": {"cpu": "2"}}}]}});
    c.create_dyn(res("pods"), Some("default"), &pod).await?;
    let msg = unschedulable_message(&c, "big").await?;
    assert_eq!(msg, "no nodes available to schedule pods");
    // A node with 4 CPUs joins: the pod is retried and bound.
    let _small = FakeNode::start(c.clone(), "small", "127.0.0.4", Duration::ZERO).await?;
    eventually("big bound to small", Duration::from_secs(10), || async {
        Ok(
            (c.get_dyn(res("pods"), Some("default"), "big").await?["spec"]["nodeName"] == "small")
                .then_some(()),
        )
    })
    .await?;
    let huge = json!({"metadata": {"name": "huge"}, "spec": {"containers": [{"name": "a", "image": "x:v1", "resources": {"requests": {"cpu": "64"}}}]}});
    c.create_dyn(res("pods"), Some("default"), &huge).await?;
    let msg = unschedulable_message(&c, "huge").await?;
    assert_eq!(msg, "0/1 nodes are available: 1 Insufficient cpu.");
    eventually(
        "a FailedScheduling event",
        Duration::from_secs(5),
        || async {
            let events = c
                .list_dyn(
                    res("events"),
                    Some("default"),
                    None,
                    Some("involvedObject.name=huge"),
                )
                .await?;
            Ok(events["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["reason"] == "FailedScheduling")
                .then_some(()))
        },
    )
    .await?;
    // A bigger node joins: the pod is retried and bound there.
    let nodes = res("nodes");
    let mut n = json!({"metadata": {"name": "big-node"}, "status": {"allocatable": {"cpu": "128", "memory": "64Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()}]}});
    n = c.create_dyn(nodes, None, &n).await?;
    assert!(
        n["spec"]["podCIDR"]
            .as_str()
            .is_some_and(|s| s.starts_with("10.88.")),
        "a pod CIDR is allocated: {}",
        n["spec"]
    );
    eventually(
        "huge bound to big-node",
        Duration::from_secs(10),
        || async {
            Ok(
                (c.get_dyn(res("pods"), Some("default"), "huge").await?["spec"]["nodeName"]
                    == "big-node")
                    .then_some(()),
            )
        },
    )
    .await?;
    cluster.server.shutdown().await?;
    Ok(())
}
