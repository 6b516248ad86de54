//! Kubernetes semantics of the control plane, through the API and the real kubectl with fake
//! nodes: graceful deletion survives updates, Recreate waits for old pods, terminating pods
//! hold their node, Services keep what was allocated for them, proportional scaling, and the
//! pod garbage collector.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use skiff_api::{meta, Resource};
use skiff_client::{verbs, Client};
use skiff_e2e::fake_node::{FakeNode, FakeNodeOptions};
use skiff_e2e::{eventually, TestCluster};

const MERGE: &str = "application/merge-patch+json";
const SMP: &str = "application/strategic-merge-patch+json";

fn res(n: &str) -> &'static Resource {
    Resource::lookup(n).unwrap()
}

async fn node(c: &Client, name: &str, opts: FakeNodeOptions) -> anyhow::Result<FakeNode> {
    FakeNode::start_with(c.clone(), name, "127.0.0.9", opts).await
}

fn pod(name: &str, image: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"test": "semantics"}},
           "spec": {"containers": [{"name": "c", "image": image}], "terminationGracePeriodSeconds": 30}})
}

fn is_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

async fn wait_ready(c: &Client, name: &str) -> anyhow::Result<Value> {
    eventually(
        &format!("pod {name} ready"),
        Duration::from_secs(15),
        || async {
            let p = c.get_dyn(res("pods"), Some("default"), name).await?;
            Ok(is_ready(&p).then_some(p))
        },
    )
    .await
}

async fn pods_of(c: &Client, selector: &str) -> anyhow::Result<Vec<Value>> {
    let list = c
        .list_dyn(res("pods"), Some("default"), Some(selector), None)
        .await?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// ReplicaSet sizes of a deployment, by image.
async fn rs_sizes(c: &Client, app: &str) -> anyhow::Result<BTreeMap<String, i64>> {
    let list = c
        .list_dyn(
            res("replicasets"),
            Some("default"),
            Some(&format!("app={app}")),
            None,
        )
        .await?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|rs| {
            (
                rs["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                rs["spec"]["replicas"].as_i64().unwrap_or(0),
            )
        })
        .collect())
}

async fn wait_sizes(c: &Client, app: &str, want: &[(&str, i64)]) -> anyhow::Result<()> {
    let want: BTreeMap<String, i64> = want.iter().map(|(i, n)| (i.to_string(), *n)).collect();
    eventually(
        &format!("ReplicaSets of {app} at {want:?}"),
        Duration::from_secs(20),
        || async {
            let got = rs_sizes(c, app).await?;
            Ok((got == want).then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn set_image(c: &Client, app: &str, image: &str) -> anyhow::Result<()> {
    let d = c.get_dyn(res("deployments"), Some("default"), app).await?;
    let container = d["spec"]["template"]["spec"]["containers"][0]["name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let patch = verbs::set_image_patch(&d, &[(container, image.into())])?;
    c.patch_dyn(res("deployments"), Some("default"), app, None, SMP, &patch)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_to_a_terminating_pod_do_not_delete_it() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    // The node takes 4 s to stop a pod's containers.
    let _n = node(
        &c,
        "drainer",
        FakeNodeOptions {
            stop_delay: Duration::from_secs(4),
            ..Default::default()
        },
    )
    .await?;
    c.create_dyn(res("pods"), Some("default"), &pod("p", "x:v1"))
        .await?;
    wait_ready(&c, "p").await?;
    cluster.kubectl_ok(&["delete", "pod", "p", "--wait=false"])?;
    // The kubelet's not-ready status write, a label edit: the pod stays, still terminating.
    c.patch_dyn(
        res("pods"),
        Some("default"),
        "p",
        Some("status"),
        MERGE,
        &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
    )
    .await?;
    cluster.kubectl_ok(&["label", "pod", "p", "drained=yes"])?;
    let p = c.get_dyn(res("pods"), Some("default"), "p").await?;
    assert!(
        meta::is_deleting(&p),
        "still terminating: {}",
        p["metadata"]
    );
    assert_eq!(p["metadata"]["labels"]["drained"], "yes");
    // The node finishes the deletion once its containers stopped.
    eventually("p gone", Duration::from_secs(15), || async {
        match c.get_dyn(res("pods"), Some("default"), "p").await {
            Err(e) if e.code() == Some(404) => Ok(Some(())),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(None),
        }
    })
    .await?;

    // Foreground cascade: the pods wait for their node; so do their owners.
    let d = verbs::deployment("fg", &["x:v1".into()], None, 2);
    c.create_dyn(res("deployments"), Some("default"), &d)
        .await?;
    eventually("fg ready", Duration::from_secs(15), || async {
        let ps = pods_of(&c, "app=fg").await?;
        Ok((ps.len() == 2 && ps.iter().all(is_ready)).then_some(()))
    })
    .await?;
    cluster.kubectl_ok(&[
        "delete",
        "deploy",
        "fg",
        "--cascade=foreground",
        "--wait=false",
    ])?;
    // The collector has dealt with the pods (their foreground finalizer is gone), and they
    // are still there, terminating, until the node finishes them.
    eventually(
        "fg's pods terminating without finalizers",
        Duration::from_secs(4),
        || async {
            let ps = pods_of(&c, "app=fg").await?;
            anyhow::ensure!(ps.len() == 2, "a pod went before its node stopped it");
            Ok(ps
                .iter()
                .all(|p| meta::is_deleting(p) && meta::finalizers(p).is_empty())
                .then_some(()))
        },
    )
    .await?;
    assert!(
        c.get_dyn(res("deployments"), Some("default"), "fg")
            .await
            .is_ok(),
        "the deployment waits for its dependents"
    );
    eventually("fg and its pods gone", Duration::from_secs(20), || async {
        let gone = matches!(c.get_dyn(res("deployments"), Some("default"), "fg").await, Err(e) if e.code() == Some(404));
        Ok((gone && pods_of(&c, "app=fg").await?.is_empty()).then_some(()))
    })
    .await?;
    cluster.server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_waits_until_old_pods_are_gone() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    let _n = node(
        &c,
        "slow-stop",
        FakeNodeOptions {
            stop_delay: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await?;
    let mut d = verbs::deployment("rec", &["x:v1".into()], None, 2);
    d["spec"]["strategy"] = json!({"type": "Recreate"});
    c.create_dyn(res("deployments"), Some("default"), &d)
        .await?;
    eventually("rec ready", Duration::from_secs(15), || async {
        let ps = pods_of(&c, "app=rec").await?;
        Ok((ps.len() == 2 && ps.iter().all(is_ready)).then_some(()))
    })
    .await?;
    let (mut pods, mut stream) = skiff_e2e::list_and_watch_pods(&c, "default", "app=rec").await?;
    set_image(&c, "rec", "x:v2").await?;
    let image = |p: &Value| {
        p["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            let name = meta::name(&ev.object).to_string();
            if ev.kind == "DELETED" {
                pods.remove(&name);
            } else {
                pods.insert(name, ev.object);
            }
            let old = pods.values().filter(|p| image(p) == "x:v1").count();
            let new: Vec<&Value> = pods.values().filter(|p| image(p) == "x:v2").collect();
            anyhow::ensure!(
                old == 0 || new.is_empty(),
                "{} new pods beside {old} old ones (terminating included)",
                new.len()
            );
            if old == 0 && new.len() == 2 && new.iter().all(|p| is_ready(p)) {
                return Ok(());
            }
        }
        anyhow::bail!("watch ended early")
    })
    .await
    .map_err(|_| anyhow::anyhow!("the Recreate rollout did not finish in 30 s"))??;
    cluster.server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_pods_hold_their_node_slot() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    let _n = node(
        &c,
        "two-slots",
        FakeNodeOptions {
            stop_delay: Duration::from_secs(3),
            max_pods: 2,
            ..Default::default()
        },
    )
    .await?;
    for p in ["a", "b"] {
        c.create_dyn(res("pods"), Some("default"), &pod(p, "x:v1"))
            .await?;
        wait_ready(&c, p).await?;
    }
    cluster.kubectl_ok(&["delete", "pod", "a", "--wait=false"])?;
    c.create_dyn(res("pods"), Some("default"), &pod("c", "x:v1"))
        .await?;
    // While a's containers stop, c does not fit.
    let why = eventually("c found unschedulable", Duration::from_secs(10), || async {
        let p = c.get_dyn(res("pods"), Some("default"), "c").await?;
        anyhow::ensure!(
            p["spec"]["nodeName"].as_str().is_none_or(str::is_empty),
            "c was bound while a still terminated"
        );
        Ok(p.pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
            })
            .map(|c| c["message"].as_str().unwrap_or("").to_string()))
    })
    .await?;
    assert_eq!(why, "0/1 nodes are available: 1 Too many pods.");
    // Once a is gone, c is bound.
    wait_ready(&c, "c").await?;
    cluster.server.shutdown().await?;
    Ok(())
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: keep
spec:
  type: NodePort
  selector: {app: keep}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: admin, port: 81, targetPort: 8081}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_keep_what_was_allocated_and_zero_means_allocate() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    let file = cluster.dir.path().join("svc.yaml");
    std::fs::write(&file, SERVICE)?;
    let file = file.to_string_lossy().to_string();
    cluster.kubectl_ok(&["create", "-f", &file])?;
    let before = c.get_dyn(res("services"), Some("default"), "keep").await?;
    // A PUT of the manifest as written: no clusterIP, no nodePorts.
    cluster.kubectl_ok(&["replace", "-f", &file])?;
    let after = c.get_dyn(res("services"), Some("default"), "keep").await?;
    assert_eq!(after["spec"]["clusterIP"], before["spec"]["clusterIP"]);
    assert_eq!(after["spec"]["clusterIPs"], before["spec"]["clusterIPs"]);
    let node_ports = |s: &Value| {
        s["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].clone(), p["nodePort"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(node_ports(&after), node_ports(&before));
    // Ports matched by name, whatever their order.
    let mut swapped = after.clone();
    swapped["spec"]["ports"] = json!([{"name": "admin", "port": 81, "targetPort": 8081}, {"name": "http", "port": 80, "targetPort": 8080}]);
    swapped["spec"]["clusterIP"] = json!("");
    let stored = c
        .replace_dyn(res("services"), Some("default"), "keep", &swapped)
        .await?;
    assert_eq!(stored["spec"]["clusterIP"], before["spec"]["clusterIP"]);
    let mut want = node_ports(&before);
    want.reverse();
    assert_eq!(node_ports(&stored), want);

    // kubectl's protobuf carries nodePort: 0, which asks for an allocation.
    let out = cluster.kubectl_ok(&["create", "service", "nodeport", "np", "--tcp=80:8080"])?;
    assert!(out.contains("service/np created"), "{out}");
    let np = c.get_dyn(res("services"), Some("default"), "np").await?;
    let port = np["spec"]["ports"][0]["nodePort"].as_i64().unwrap_or(0);
    assert!((30000..=32767).contains(&port), "{}", np["spec"]);
    let out = cluster.kubectl_ok(&["create", "service", "clusterip", "cip", "--tcp=80:8080"])?;
    assert!(out.contains("service/cip created"), "{out}");
    let cip = c.get_dyn(res("services"), Some("default"), "cip").await?;
    assert!(
        cip["spec"]["ports"][0].get("nodePort").is_none(),
        "{}",
        cip["spec"]
    );
    assert!(cip["spec"]["clusterIP"]
        .as_str()
        .is_some_and(|s| s.starts_with("10.96.")));
    cluster.server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_mid_rollout_and_paused_is_proportional() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = cluster.client.clone();
    let _n = node(&c, "scaler", FakeNodeOptions::default()).await?;
    let mut d = verbs::deployment("prop", &["x:v1".into()], None, 4);
    d["spec"]["strategy"] =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    c.create_dyn(res("deployments"), Some("default"), &d)
        .await?;
    wait_sizes(&c, "prop", &[("x:v1", 4)]).await?;
    eventually("prop ready", Duration::from_secs(15), || async {
        let ps = pods_of(&c, "app=prop").await?;
        Ok((ps.len() == 4 && ps.iter().all(is_ready)).then_some(()))
    })
    .await?;
    // A rollout that cannot progress: its pods never become ready.
    set_image(&c, "prop", "x:unready").await?;
    wait_sizes(&c, "prop", &[("x:v1", 4), ("x:unready", 1)]).await?;
    // Scaled down to 2 (max 3 with the surge): the old ReplicaSet gives up its share.
    cluster.kubectl_ok(&["scale", "deploy/prop", "--replicas=2"])?;
    wait_sizes(&c, "prop", &[("x:v1", 2), ("x:unready", 1)]).await?;
    // And up again to 6 (max 7).
    cluster.kubectl_ok(&["scale", "deploy/prop", "--replicas=6"])?;
    wait_sizes(&c, "prop", &[("x:v1", 5), ("x:unready", 2)]).await?;
    // Down to 1 (max 2): the new ReplicaSet, above that, shrinks too.
    cluster.kubectl_ok(&["scale", "deploy/prop", "--replicas=1"])?;
    wait_sizes(&c, "prop", &[("x:v1", 1), ("x:unready", 1)]).await?;

    // A paused deployment is scaled, and nothing is rolled out.
    let d = verbs::deployment("paused", &["x:v1".into()], None, 2);
    c.create_dyn(res("deployments"), Some("default"), &d)
        .await?;
    wait_sizes(&c, "paused", &[("x:v1", 2)]).await?;
    cluster.kubectl_ok(&["rollout", "pause", "deploy/paused"])?;
    cluster.kubectl_ok(&["scale", "deploy/paused", "--replicas=3"])?;
    wait_sizes(&c, "paused", &[("x:v1", 3)]).await?;
    set_image(&c, "paused", "x:v2").await?;
    cluster.kubectl_ok(&["scale", "deploy/paused", "--replicas=1"])?;
    wait_sizes(&c, "paused", &[("x:v1", 1)]).await?;
    cluster.kubectl_ok(&["rollout", "resume", "deploy/paused"])?;
    wait_sizes(&c, "paused", &[("x:v1", 0), ("x:v2", 1)]).await?;
    cluster.server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_deleted_node_are_collected() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|c| {
        c.controllers.pod_gc_period = Duration::from_millis(200);
        c.controllers.orphan_pod_quarantine = Duration::from_millis(500);
    })
    .await?;
    let c = cluster.client.clone();
    let n = node(&c, "doomed", FakeNodeOptions::default()).await?;
    cluster.kubectl_ok(&["create", "namespace", "short-lived"])?;
    c.create_dyn(res("pods"), Some("short-lived"), &pod("orphan", "x:v1"))
        .await?;
    eventually("orphan running", Duration::from_secs(15), || async {
        let p = c
            .get_dyn(res("pods"), Some("short-lived"), "orphan")
            .await?;
        Ok(is_ready(&p).then_some(()))
    })
    .await?;
    // The node is powered off and removed.
    n.fail();
    cluster.kubectl_ok(&["delete", "node", "doomed"])?;
    // The namespace's deletion is not held up by a pod no kubelet will finish.
    cluster.kubectl_ok(&["delete", "namespace", "short-lived", "--wait=false"])?;
    eventually("namespace gone", Duration::from_secs(15), || async {
        match c.get_dyn(res("namespaces"), None, "short-lived").await {
            Err(e) if e.code() == Some(404) => Ok(Some(())),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(None),
        }
    })
    .await?;
    cluster.server.shutdown().await?;
    Ok(())
}

/// Events expire: one last seen more than the TTL ago goes, and beyond the limit the oldest
/// go first, so a cluster that churns pods does not keep every Event it ever recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_expire_by_age_and_by_count() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|c| {
        c.controllers.max_events = 5;
    })
    .await?;
    let c = &cluster.client;
    let events = Resource::lookup("events").unwrap();
    let at = |secs_ago: i64| {
        (chrono::Utc::now() - chrono::Duration::seconds(secs_ago))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let event = |name: &str, last: String| {
        json!({"metadata": {"name": name},
               "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
               "reason": "Test", "message": name, "type": "Normal",
               "firstTimestamp": last, "lastTimestamp": last, "count": 1})
    };
    // Two hours old: beyond the default TTL of one hour.
    c.create_dyn(events, Some("default"), &event("stale", at(7200)))
        .await?;
    // Eight recent ones, e0 the oldest; with the stale one gone, three more must go.
    for i in 0..8 {
        c.create_dyn(
            events,
            Some("default"),
            &event(&format!("e{i}"), at(600 - i * 10)),
        )
        .await?;
    }
    let kept = eventually(
        "events expired down to 5",
        Duration::from_secs(40),
        || async {
            let list = c.list_dyn(events, Some("default"), None, None).await?;
            let mut names: Vec<String> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| meta::name(e).to_string())
                .collect();
            names.sort();
            Ok((names.len() <= 5).then_some(names))
        },
    )
    .await?;
    assert_eq!(
        kept,
        ["e3", "e4", "e5", "e6", "e7"],
        "the newest five are kept"
    );
    Ok(())
}
