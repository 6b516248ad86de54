//! DaemonSets with fake nodes: one pod per eligible node pinned by `matchFields`, taints and
//! tolerations, nodes coming and going, a nodeSelector change, rolling updates held to
//! maxUnavailable (or surging) as a watch records them, OnDelete, and the real kubectl's
//! `rollout status/history/undo ds/NAME`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use skiff_api::{meta, Resource};
use skiff_client::Client;
use skiff_e2e::fake_node::{FakeNode, FakeNodeOptions};
use skiff_e2e::{eventually, list_and_watch_pods, PodWatch, TestCluster};

const MERGE: &str = "application/merge-patch+json";

fn res(n: &str) -> &'static Resource {
    Resource::lookup(n).unwrap()
}

async fn nodes(c: &Client, names: &[&str], start_delay: Duration) -> anyhow::Result<Vec<FakeNode>> {
    let mut out = Vec::new();
    for n in names {
        let opts = FakeNodeOptions {
            start_delay,
            ..Default::default()
        };
        out.push(FakeNode::start_with(c.clone(), n, "127.0.0.9", opts).await?);
    }
    Ok(out)
}

fn daemonset(name: &str, image: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"ds": name}},
                 "template": {"metadata": {"labels": {"ds": name}},
                              "spec": {"containers": [{"name": "c", "image": image}]}}}})
}

fn is_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn node_of(p: &Value) -> String {
    p.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn image_of(p: &Value) -> String {
    p.pointer("/spec/containers/0/image")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

async fn live_pods(c: &Client, ds: &str) -> anyhow::Result<Vec<Value>> {
    let list = c
        .list_dyn(
            res("pods"),
            Some("default"),
            Some(&format!("ds={ds}")),
            None,
        )
        .await?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !meta::is_deleting(p))
        .collect())
}

/// Waits until the DaemonSet's live pods are exactly one ready pod of `image` on each of
/// `want` nodes, and returns them by node.
async fn wait_placed(
    c: &Client,
    ds: &str,
    want: &[&str],
    image: &str,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(
        &format!("one ready {image} pod of {ds} on each of {want:?}"),
        Duration::from_secs(30),
        || async {
            let pods = live_pods(c, ds).await?;
            let by_node: BTreeMap<String, Value> =
                pods.iter().map(|p| (node_of(p), p.clone())).collect();
            let good = pods.len() == want.len()
                && by_node.keys().cloned().collect::<BTreeSet<_>>() == want
                && pods.iter().all(|p| is_ready(p) && image_of(p) == image);
            Ok(good.then_some(by_node))
        },
    )
    .await
}

async fn wait_status(c: &Client, ds: &str, want: Value) -> anyhow::Result<Value> {
    eventually(
        &format!("status of {ds} to have {want}"),
        Duration::from_secs(30),
        || async {
            let d = c.get_dyn(res("daemonsets"), Some("default"), ds).await?;
            let st = &d["status"];
            let matches = want
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| st.get(k).unwrap_or(&json!(0)) == v)
                && st["observedGeneration"] == d["metadata"]["generation"];
            Ok(matches.then_some(d))
        },
    )
    .await
}

async fn patch_ds(c: &Client, ds: &str, body: Value) -> anyhow::Result<()> {
    c.patch_dyn(res("daemonsets"), Some("default"), ds, None, MERGE, &body)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pod_per_eligible_node_as_nodes_taints_and_selectors_change() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|c| {
        c.controllers.pod_gc_period = Duration::from_millis(200);
        c.controllers.orphan_pod_quarantine = Duration::from_millis(500);
    })
    .await?;
    let c = &cluster.client;
    let mut fleet = nodes(c, &["n1", "n2", "n3", "tainted"], Duration::ZERO).await?;
    c.patch_dyn(
        res("nodes"),
        None,
        "tainted",
        None,
        MERGE,
        &json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}}),
    )
    .await?;
    c.create_dyn(
        res("daemonsets"),
        Some("default"),
        &daemonset("agent", "img:v1"),
    )
    .await?;

    // One pod on each untainted node, pinned there by matchFields and bound by the scheduler.
    let placed = wait_placed(c, "agent", &["n1", "n2", "n3"], "img:v1").await?;
    for (node, p) in &placed {
        let terms = &p["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        assert_eq!(
            terms,
            &json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]),
            "pod on {node}"
        );
        let tolerations = p["spec"]["tolerations"].as_array().unwrap();
        for key in [
            "node.kubernetes.io/unreachable",
            "node.kubernetes.io/unschedulable",
        ] {
            assert!(
                tolerations.iter().any(|t| t["key"] == key),
                "{key} tolerated: {tolerations:?}"
            );
        }
        assert!(meta::labels(p).contains_key("controller-revision-hash"));
        assert_eq!(
            meta::labels(p)
                .get("pod-template-generation")
                .map(String::as_str),
            Some("1")
        );
    }
    wait_status(
        c,
        "agent",
        json!({"desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberReady": 3,
               "numberAvailable": 3, "updatedNumberScheduled": 3, "numberMisscheduled": 0}),
    )
    .await?;

    // Tolerating the taint puts a pod on the tainted node too (a rolling update).
    patch_ds(
        c,
        "agent",
        json!({"spec": {"template": {"spec": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}}}}),
    )
    .await?;
    wait_placed(c, "agent", &["n1", "n2", "n3", "tainted"], "img:v1").await?;

    // A cordoned node keeps its daemon pod; a new node gets one.
    c.patch_dyn(
        res("nodes"),
        None,
        "n1",
        None,
        MERGE,
        &json!({"spec": {"unschedulable": true}}),
    )
    .await?;
    fleet.extend(nodes(c, &["n5"], Duration::ZERO).await?);
    let placed = wait_placed(c, "agent", &["n1", "n2", "n3", "tainted", "n5"], "img:v1").await?;
    // The cordoned node's pod, deleted, is replaced there: the scheduler lets it on.
    let on_n1 = meta::name(&placed["n1"]).to_string();
    c.delete_dyn(res("pods"), Some("default"), &on_n1, None, None)
        .await?;
    let placed = wait_placed(c, "agent", &["n1", "n2", "n3", "tainted", "n5"], "img:v1").await?;
    assert_ne!(meta::name(&placed["n1"]), on_n1);

    // A deleted node loses its pod.
    fleet.retain(|n| n.name != "n2");
    c.delete_dyn(res("nodes"), None, "n2", None, None).await?;
    wait_placed(c, "agent", &["n1", "n3", "tainted", "n5"], "img:v1").await?;

    // A nodeSelector moves the pods to the nodes that match it.
    for n in ["n3", "n5"] {
        c.patch_dyn(
            res("nodes"),
            None,
            n,
            None,
            MERGE,
            &json!({"metadata": {"labels": {"disk": "ssd"}}}),
        )
        .await?;
    }
    patch_ds(
        c,
        "agent",
        json!({"spec": {"template": {"spec": {"nodeSelector": {"disk": "ssd"}}}}}),
    )
    .await?;
    wait_placed(c, "agent", &["n3", "n5"], "img:v1").await?;
    wait_status(
        c,
        "agent",
        json!({"desiredNumberScheduled": 2, "currentNumberScheduled": 2, "numberReady": 2,
               "numberMisscheduled": 0, "updatedNumberScheduled": 2}),
    )
    .await?;
    // A node that stops matching loses its pod.
    c.patch_dyn(
        res("nodes"),
        None,
        "n5",
        None,
        MERGE,
        &json!({"metadata": {"labels": {"disk": null}}}),
    )
    .await?;
    wait_placed(c, "agent", &["n3"], "img:v1").await?;

    // Deleting the DaemonSet takes its pods and revisions.
    c.delete_dyn(res("daemonsets"), Some("default"), "agent", None, None)
        .await?;
    eventually(
        "pods and revisions of agent gone",
        Duration::from_secs(20),
        || async {
            let pods = c
                .list_dyn(res("pods"), Some("default"), Some("ds=agent"), None)
                .await?;
            let revs = c
                .list_dyn(
                    res("controllerrevisions"),
                    Some("default"),
                    Some("ds=agent"),
                    None,
                )
                .await?;
            let empty = |l: &Value| l["items"].as_array().is_none_or(|a| a.is_empty());
            Ok((empty(&pods) && empty(&revs)).then_some(()))
        },
    )
    .await?;
    drop(fleet);
    Ok(())
}

/// Follows a rollout to `image` on `node_count` nodes through the pod watch. Returns the most
/// nodes seen at once without a ready pod, and the most nodes seen with two live pods.
async fn follow_rollout(
    c: &Client,
    ds: &str,
    mut pods: BTreeMap<String, Value>,
    mut stream: PodWatch,
    node_count: usize,
    image: &str,
) -> anyhow::Result<(usize, usize)> {
    let mut worst_unavailable = 0;
    let mut worst_doubled = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let live: Vec<&Value> = pods.values().filter(|p| !meta::is_deleting(p)).collect();
        let mut per_node: BTreeMap<String, (usize, bool)> = BTreeMap::new();
        for p in &live {
            let e = per_node.entry(node_of(p)).or_insert((0, false));
            e.0 += 1;
            e.1 |= is_ready(p);
        }
        let available = per_node.values().filter(|(_, r)| *r).count();
        worst_unavailable = worst_unavailable.max(node_count.saturating_sub(available));
        worst_doubled = worst_doubled.max(per_node.values().filter(|(n, _)| *n > 1).count());
        let done = live.len() == node_count
            && per_node.len() == node_count
            && live.iter().all(|p| is_ready(p) && image_of(p) == image);
        if done {
            return Ok((worst_unavailable, worst_doubled));
        }
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!("timed out waiting for {ds} to roll out {image}: {pods:#?}")
            })?
            .ok_or_else(|| anyhow::anyhow!("pod watch ended"))??;
        let name = meta::name(&ev.object).to_string();
        if ev.kind == "DELETED" {
            pods.remove(&name);
        } else {
            pods.insert(name, ev.object);
        }
        let _ = c;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_within_max_unavailable_surge_and_on_delete() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = &cluster.client;
    let names = ["r1", "r2", "r3", "r4"];
    let _fleet = nodes(c, &names, Duration::from_millis(300)).await?;
    c.create_dyn(
        res("daemonsets"),
        Some("default"),
        &daemonset("roll", "img:v1"),
    )
    .await?;
    wait_placed(c, "roll", &names, "img:v1").await?;
    wait_status(
        c,
        "roll",
        json!({"numberAvailable": 4, "updatedNumberScheduled": 4}),
    )
    .await?;

    // maxUnavailable 1 (the default): never more than one node without a ready pod.
    let (pods, stream) = list_and_watch_pods(c, "default", "ds=roll").await?;
    patch_ds(
        c,
        "roll",
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "img:v2"}]}}}}),
    )
    .await?;
    let (unavailable, doubled) = follow_rollout(c, "roll", pods, stream, 4, "img:v2").await?;
    assert_eq!(
        unavailable, 1,
        "at most (and at some point) one node unavailable"
    );
    assert_eq!(doubled, 0, "no surge pods");
    wait_status(
        c,
        "roll",
        json!({"numberAvailable": 4, "updatedNumberScheduled": 4, "numberUnavailable": 0}),
    )
    .await?;

    // maxUnavailable 2: two at a time.
    let (pods, stream) = list_and_watch_pods(c, "default", "ds=roll").await?;
    patch_ds(
        c,
        "roll",
        json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 2}},
                        "template": {"spec": {"containers": [{"name": "c", "image": "img:v3"}]}}}}),
    )
    .await?;
    let (unavailable, _) = follow_rollout(c, "roll", pods, stream, 4, "img:v3").await?;
    assert_eq!(
        unavailable, 2,
        "at most (and at some point) two nodes unavailable"
    );

    // maxSurge 1, maxUnavailable 0: the new pod starts beside the old, none unavailable.
    wait_status(
        c,
        "roll",
        json!({"numberAvailable": 4, "updatedNumberScheduled": 4}),
    )
    .await?;
    let (pods, stream) = list_and_watch_pods(c, "default", "ds=roll").await?;
    patch_ds(
        c,
        "roll",
        json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                        "template": {"spec": {"containers": [{"name": "c", "image": "img:v4"}]}}}}),
    )
    .await?;
    let (unavailable, doubled) = follow_rollout(c, "roll", pods, stream, 4, "img:v4").await?;
    assert_eq!(unavailable, 0, "surge keeps every node available");
    assert_eq!(doubled, 1, "one node at a time runs old and new");

    // OnDelete: the template changes, the pods stay until deleted.
    wait_status(
        c,
        "roll",
        json!({"numberAvailable": 4, "updatedNumberScheduled": 4}),
    )
    .await?;
    patch_ds(
        c,
        "roll",
        json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null},
                        "template": {"spec": {"containers": [{"name": "c", "image": "img:v5"}]}}}}),
    )
    .await?;
    wait_status(
        c,
        "roll",
        json!({"updatedNumberScheduled": 0, "numberAvailable": 4}),
    )
    .await?;
    let before = live_pods(c, "roll").await?;
    assert!(
        before.iter().all(|p| image_of(p) == "img:v4"),
        "{before:#?}"
    );
    let r2 = before.iter().find(|p| node_of(p) == "r2").unwrap();
    c.delete_dyn(res("pods"), Some("default"), meta::name(r2), None, None)
        .await?;
    eventually(
        "r2's pod replaced with v5",
        Duration::from_secs(20),
        || async {
            let pods = live_pods(c, "roll").await?;
            let on_r2: Vec<&Value> = pods.iter().filter(|p| node_of(p) == "r2").collect();
            Ok((pods.len() == 4
                && on_r2.len() == 1
                && image_of(on_r2[0]) == "img:v5"
                && pods
                    .iter()
                    .filter(|p| node_of(p) != "r2")
                    .all(|p| image_of(p) == "img:v4"))
            .then_some(()))
        },
    )
    .await?;
    wait_status(c, "roll", json!({"updatedNumberScheduled": 1})).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rollout_status_history_and_undo() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = &cluster.client;
    let names = ["k1", "k2", "k3"];
    let _fleet = nodes(c, &names, Duration::from_millis(100)).await?;
    let file = cluster.dir.path().join("ds.json");
    std::fs::write(&file, serde_json::to_vec(&daemonset("web", "img:v1"))?)?;
    let f = file.to_str().unwrap();
    cluster.kubectl_ok(&["apply", "-f", f])?;
    let out = cluster.kubectl_ok(&["rollout", "status", "ds/web", "--timeout=60s"])?;
    assert!(
        out.contains("daemon set \"web\" successfully rolled out"),
        "{out}"
    );

    let out = cluster.kubectl_ok(&["get", "ds", "web"])?;
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "NODE",
            "SELECTOR",
            "AGE"
        ]
    );
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..7],
        ["web", "3", "3", "3", "3", "3", "<none>"],
        "{out}"
    );

    cluster.kubectl_ok(&["set", "image", "ds/web", "c=img:v2"])?;
    let out = cluster.kubectl_ok(&["rollout", "status", "ds/web", "--timeout=60s"])?;
    assert!(out.contains("successfully rolled out"), "{out}");
    wait_placed(c, "web", &names, "img:v2").await?;

    let out = cluster.kubectl_ok(&["get", "controllerrevisions"])?;
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "CONTROLLER", "REVISION", "AGE"]);
    assert!(out.contains("daemonset.apps/web"), "{out}");
    assert_eq!(out.lines().count(), 3, "two revisions: {out}");

    let out = cluster.kubectl_ok(&["rollout", "history", "ds/web"])?;
    let revisions: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, ["1", "2"], "{out}");
    let out = cluster.kubectl_ok(&["rollout", "history", "ds/web", "--revision=1"])?;
    assert!(out.contains("img:v1"), "{out}");

    let out = cluster.kubectl_ok(&["rollout", "undo", "ds/web"])?;
    assert!(out.contains("rolled back"), "{out}");
    let out = cluster.kubectl_ok(&["rollout", "status", "ds/web", "--timeout=60s"])?;
    assert!(out.contains("successfully rolled out"), "{out}");
    wait_placed(c, "web", &names, "img:v1").await?;
    // The first revision came back as the newest; no third one was made.
    let out = cluster.kubectl_ok(&["rollout", "history", "ds/web"])?;
    let revisions: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, ["2", "3"], "{out}");

    // The same with the skiff CLI: undo goes back to v2, whose revision becomes the newest.
    let skiff = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(skiff_e2e::skiff_binary()?)
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        anyhow::ensure!(
            out.status.success(),
            "skiff {} failed: {}{stdout}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    };
    let out = skiff(&["rollout", "undo", "ds/web"])?;
    assert!(
        out.contains("daemonset.apps/web rolled back (to revision 2)"),
        "{out}"
    );
    let out = skiff(&["rollout", "status", "ds/web", "--timeout", "60"])?;
    assert!(
        out.contains("daemon set \"web\" successfully rolled out"),
        "{out}"
    );
    wait_placed(c, "web", &names, "img:v2").await?;
    let out = skiff(&["rollout", "history", "ds/web"])?;
    let revisions: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, ["3", "4"], "{out}");

    // OnDelete has no rollout status to wait for, as kubectl says.
    patch_ds(
        c,
        "web",
        json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null}}}),
    )
    .await?;
    let out = cluster.kubectl(&["rollout", "status", "ds/web", "--timeout=5s"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RollingUpdate"), "{err}");
    Ok(())
}

/// On a real `skiff up` (registry, agent, wasmtime, in a network namespace of the test's
/// own): the daemon pod is a wasm pod answering at its pod IP, rolled to v2 and back.
/// Needs root, iproute2, curl, docker-registry and the samples (`samples/build.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_daemon_pod_answers_at_its_pod_ip() -> anyhow::Result<()> {
    use skiff_e2e::netns::{Netns, SkiffUp};

    fn answer(up: &SkiffUp, ns: &Netns) -> anyhow::Result<String> {
        let pods = up.pod_ips(ns, "app=bootcamp-ds")?;
        anyhow::ensure!(pods.len() == 1, "one live daemon pod: {pods:?}");
        let (name, ip) = &pods[0];
        let body = ns.run(&[
            "curl",
            "-sf",
            "--max-time",
            "5",
            &format!("http://{ip}:8080/"),
        ])?;
        Ok(body.replace(name.as_str(), "POD"))
    }

    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(
        &ns,
        &[
            ("bootcamp-v1.wasm", "bootcamp:v1"),
            ("bootcamp-v2.wasm", "bootcamp:v2"),
        ],
    )?;
    let manifest = |tag: &str| {
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "bootcamp"},
            "spec": {"selector": {"matchLabels": {"app": "bootcamp-ds"}},
                     "template": {"metadata": {"labels": {"app": "bootcamp-ds"}},
                                  "spec": {"containers": [{"name": "bootcamp",
                                      "image": format!("127.0.0.1:5000/bootcamp:{tag}"),
                                      "ports": [{"containerPort": 8080}]}]}}}})
    };
    let file = dir.path().join("ds.json");
    let f = file.to_str().unwrap();
    std::fs::write(&file, serde_json::to_vec(&manifest("v1"))?)?;
    up.skiff(&ns, &["apply", "-f", f])?;
    up.skiff(
        &ns,
        &["rollout", "status", "ds/bootcamp", "--timeout", "60"],
    )?;
    let pod = up.json(&ns, &["get", "pods", "-l", "app=bootcamp-ds"])?;
    assert_eq!(pod["items"][0]["spec"]["nodeName"], "edge-1");
    eventually(
        "the daemon pod answering v=1",
        Duration::from_secs(20),
        || async {
            Ok(answer(&up, &ns)
                .ok()
                .filter(|b| b == "Hello Kubernetes bootcamp! | Running on: POD | v=1\n"))
        },
    )
    .await?;

    std::fs::write(&file, serde_json::to_vec(&manifest("v2"))?)?;
    up.skiff(&ns, &["apply", "-f", f])?;
    up.skiff(
        &ns,
        &["rollout", "status", "ds/bootcamp", "--timeout", "60"],
    )?;
    eventually(
        "the daemon pod answering v=2",
        Duration::from_secs(20),
        || async {
            Ok(answer(&up, &ns)
                .ok()
                .filter(|b| b == "Hello Kubernetes bootcamp! | Running on: POD | v=2\n"))
        },
    )
    .await?;

    up.skiff(&ns, &["rollout", "undo", "ds/bootcamp"])?;
    up.skiff(
        &ns,
        &["rollout", "status", "ds/bootcamp", "--timeout", "60"],
    )?;
    eventually(
        "the daemon pod answering v=1 again",
        Duration::from_secs(20),
        || async {
            Ok(answer(&up, &ns)
                .ok()
                .filter(|b| b == "Hello Kubernetes bootcamp! | Running on: POD | v=1\n"))
        },
    )
    .await?;
    let table = up.skiff(&ns, &["get", "ds"])?;
    assert!(table.starts_with("NAME"), "{table}");
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..6], ["bootcamp", "1", "1", "1", "1", "1"], "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_daemon_pods_are_replaced_with_backoff() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = &cluster.client;
    let _fleet = nodes(c, &["f1", "f2"], Duration::ZERO).await?;
    c.create_dyn(
        res("daemonsets"),
        Some("default"),
        &daemonset("fail", "img:v1"),
    )
    .await?;
    let placed = wait_placed(c, "fail", &["f1", "f2"], "img:v1").await?;
    // The pod on f1 fails, as a kubelet reports it: it is deleted and replaced; a second
    // failure on the node is deleted only when the node's backoff (1 s) has passed.
    let mut gone_at = Vec::new();
    let mut failed = placed["f1"].clone();
    for _ in 0..2 {
        let name = meta::name(&failed).to_string();
        failed["status"]["phase"] = json!("Failed");
        c.replace_status_dyn(res("pods"), Some("default"), &name, &failed)
            .await?;
        eventually(
            &format!("failed {name} deleted"),
            Duration::from_secs(30),
            || async {
                let pods = live_pods(c, "fail").await?;
                Ok(pods.iter().all(|p| meta::name(p) != name).then_some(()))
            },
        )
        .await?;
        gone_at.push(tokio::time::Instant::now());
        failed = eventually(
            &format!("a ready pod on f1 in place of {name}"),
            Duration::from_secs(30),
            || async {
                let pods = live_pods(c, "fail").await?;
                let on_f1: Vec<&Value> = pods.iter().filter(|p| node_of(p) == "f1").collect();
                Ok((on_f1.len() == 1 && is_ready(on_f1[0])).then(|| on_f1[0].clone()))
            },
        )
        .await?;
    }
    let gap = gone_at[1] - gone_at[0];
    assert!(
        gap >= Duration::from_millis(900),
        "failed pods on one node deleted {gap:?} apart"
    );
    let events = c
        .list_dyn(res("events"), Some("default"), None, None)
        .await?;
    let found = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["reason"] == "FailedDaemonPod");
    assert!(found, "a FailedDaemonPod event");
    wait_status(
        c,
        "fail",
        json!({"desiredNumberScheduled": 2, "numberReady": 2}),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_orphans_are_adopted_and_released_pods_let_go() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = &cluster.client;
    let _fleet = nodes(c, &["o1", "o2"], Duration::ZERO).await?;
    // A pod that matches the selector, made before the DaemonSet, already on o1.
    let orphan = json!({"metadata": {"name": "orphan", "labels": {"ds": "adopt"}},
        "spec": {"nodeName": "o1", "containers": [{"name": "c", "image": "img:v0"}]}});
    c.create_dyn(res("pods"), Some("default"), &orphan).await?;
    c.create_dyn(
        res("daemonsets"),
        Some("default"),
        &daemonset("adopt", "img:v1"),
    )
    .await?;
    // Adopted (so o1 gets no second pod beside it), then replaced by the rollout.
    let placed = wait_placed(c, "adopt", &["o1", "o2"], "img:v1").await?;
    assert_ne!(meta::name(&placed["o1"]), "orphan");
    // A pod relabelled out of the selector is released, and its node gets a new one.
    let name = meta::name(&placed["o2"]).to_string();
    c.patch_dyn(
        res("pods"),
        Some("default"),
        &name,
        None,
        MERGE,
        &json!({"metadata": {"labels": {"ds": "gone"}}}),
    )
    .await?;
    eventually(
        "the relabelled pod released",
        Duration::from_secs(20),
        || async {
            let p = c.get_dyn(res("pods"), Some("default"), &name).await?;
            Ok(meta::controller_uid(&p).is_none().then_some(()))
        },
    )
    .await?;
    wait_placed(c, "adopt", &["o1", "o2"], "img:v1").await?;
    Ok(())
}
