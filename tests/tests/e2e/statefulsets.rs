//! StatefulSets with fake nodes and the real kubectl: pods created in order (each Ready before
//! the next), removed in reverse, all at once with `Parallel`; a rolling update with a
//! partition replaces only the ordinals at or above it, highest first; one claim per ordinal,
//! bound to a volume on the pod's node and kept after scale down.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use skiff_api::{meta, Resource};
use skiff_client::Client;
use skiff_e2e::fake_node::{FakeNode, FakeNodeOptions};
use skiff_e2e::{eventually, list_and_watch_pods, PodWatch, TestCluster};

fn res(n: &str) -> &'static Resource {
    Resource::lookup(n).unwrap()
}

fn set(name: &str, replicas: i32, policy: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": policy,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "c", "image": "example/app:v1",
                                                  "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                                      "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}}]
        }
    })
}

fn is_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The watch's events, in order, as (type, pod name, ready, terminating), until `done` says
/// enough or `within` passes.
async fn record(
    watch: &mut PodWatch,
    within: Duration,
    log: &mut Vec<(String, String, bool, bool)>,
    done: impl Fn(&[(String, String, bool, bool)]) -> bool,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !done(log) {
        let ev = tokio::time::timeout_at(deadline, watch.next())
            .await
            .map_err(|_| anyhow::anyhow!("timed out waiting for {what}; saw {log:?}"))?
            .ok_or_else(|| anyhow::anyhow!("watch ended waiting for {what}"))??;
        if ev.kind == "BOOKMARK" {
            continue;
        }
        log.push((
            ev.kind.clone(),
            meta::name(&ev.object).to_string(),
            is_ready(&ev.object),
            meta::is_deleting(&ev.object),
        ));
    }
    Ok(())
}

fn first(
    log: &[(String, String, bool, bool)],
    f: impl Fn(&(String, String, bool, bool)) -> bool,
) -> Option<usize> {
    log.iter().position(f)
}

async fn wait_set(
    c: &Client,
    name: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    eventually(what, Duration::from_secs(30), || async {
        let s = c
            .get_dyn(res("statefulsets"), Some("default"), name)
            .await?;
        Ok(f(&s).then_some(s))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_ready_scale_down_rolling_update_and_claims() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = &cluster.client;
    let opts = FakeNodeOptions {
        start_delay: Duration::from_millis(300),
        stop_delay: Duration::from_millis(200),
        ..Default::default()
    };
    let _node = FakeNode::start_with(c.clone(), "sts-node", "127.0.0.9", opts).await?;
    let (_, mut watch) = list_and_watch_pods(c, "default", "app=web").await?;
    c.create_dyn(
        res("statefulsets"),
        Some("default"),
        &set("web", 3, "OrderedReady"),
    )
    .await?;

    // In order: web-N is created only after web-(N-1) is Ready.
    let mut log = Vec::new();
    record(
        &mut watch,
        Duration::from_secs(30),
        &mut log,
        |l| l.iter().any(|e| e.1 == "web-2" && e.2),
        "web-2 ready",
    )
    .await?;
    for (prev, next) in [("web-0", "web-1"), ("web-1", "web-2")] {
        let ready = first(&log, |e| e.1 == prev && e.2).expect("prev ready");
        let added = first(&log, |e| e.0 == "ADDED" && e.1 == next).expect("next added");
        assert!(
            ready < added,
            "{next} created before {prev} was Ready: {log:?}"
        );
    }
    let p = c.get_dyn(res("pods"), Some("default"), "web-1").await?;
    assert_eq!(p["spec"]["hostname"], "web-1");
    assert_eq!(p["spec"]["subdomain"], "web");
    assert_eq!(
        p["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"],
        "web-1"
    );
    assert_eq!(p["metadata"]["labels"]["apps.kubernetes.io/pod-index"], "1");
    assert_eq!(
        p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "data-web-1"
    );

    // One claim per ordinal, bound to a volume on the pod's node.
    for i in 0..3 {
        let name = format!("data-web-{i}");
        let claim = eventually(
            &format!("{name} bound"),
            Duration::from_secs(15),
            || async {
                let pvc = c.get_dyn(res("pvc"), Some("default"), &name).await?;
                Ok((pvc["status"]["phase"] == "Bound").then_some(pvc))
            },
        )
        .await?;
        let vol = claim["spec"]["volumeName"].as_str().unwrap().to_string();
        assert_eq!(vol, format!("pvc-{}", meta::uid(&claim)));
        let pv = c.get_dyn(res("pv"), None, &vol).await?;
        assert_eq!(
            pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
                ["values"][0],
            "sts-node"
        );
        assert_eq!(pv["spec"]["claimRef"]["name"], name.as_str());
        assert_eq!(pv["status"]["phase"], "Bound");
    }
    let table = cluster.kubectl_ok(&["get", "pvc"])?;
    assert!(
        table.contains("STATUS") && table.contains("data-web-0") && table.contains("Bound"),
        "{table}"
    );
    let table = cluster.kubectl_ok(&["get", "sc"])?;
    assert!(
        table.contains("local-path (default)") && table.contains("WaitForFirstConsumer"),
        "{table}"
    );
    let s = wait_set(c, "web", "status of 3 ready", |s| {
        s["status"]["readyReplicas"] == 3
    })
    .await?;
    assert_eq!(
        s["status"]["currentRevision"],
        s["status"]["updateRevision"]
    );
    let out = cluster.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=20s"])?;
    assert!(
        out.contains("partitioned roll out complete: 3 new pods have been updated"),
        "{out}"
    );

    // Scale down to 1: web-2 goes first, then web-1, one at a time; the claims stay.
    cluster.kubectl_ok(&["scale", "sts/web", "--replicas=1"])?;
    let mut log = Vec::new();
    record(
        &mut watch,
        Duration::from_secs(30),
        &mut log,
        |l| l.iter().any(|e| e.0 == "DELETED" && e.1 == "web-1"),
        "web-1 deleted",
    )
    .await?;
    let gone2 = first(&log, |e| e.0 == "DELETED" && e.1 == "web-2").expect("web-2 deleted");
    let term1 = first(&log, |e| e.1 == "web-1" && e.3).expect("web-1 terminating");
    assert!(
        gone2 < term1,
        "web-1 removed before web-2 was gone: {log:?}"
    );
    for i in 0..3 {
        let pvc = c
            .get_dyn(res("pvc"), Some("default"), &format!("data-web-{i}"))
            .await?;
        assert_eq!(pvc["status"]["phase"], "Bound", "data-web-{i} kept");
    }

    // Back to 3, then a rolling update with partition 1: web-2 then web-1, never web-0.
    cluster.kubectl_ok(&["scale", "sts/web", "--replicas=3"])?;
    let before = wait_set(c, "web", "3 ready again", |s| {
        s["status"]["readyReplicas"] == 3 && s["status"]["replicas"] == 3
    })
    .await?;
    let web0 = c.get_dyn(res("pods"), Some("default"), "web-0").await?;
    // A fresh watch: only what the update does.
    let (_, mut watch) = list_and_watch_pods(c, "default", "app=web").await?;
    let mut log = Vec::new();
    c.patch_dyn(
        res("statefulsets"),
        Some("default"),
        "web",
        None,
        "application/merge-patch+json",
        &json!({"spec": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}},
                         "template": {"metadata": {"annotations": {"rev": "2"}}}}}),
    )
    .await?;
    record(
        &mut watch,
        Duration::from_secs(30),
        &mut log,
        |l| {
            let a = l.iter().rposition(|e| e.0 == "ADDED" && e.1 == "web-1");
            a.is_some_and(|a| l[a..].iter().any(|e| e.1 == "web-1" && e.2))
        },
        "web-1 replaced and ready",
    )
    .await?;
    let term2 = first(&log, |e| e.1 == "web-2" && e.3).expect("web-2 replaced");
    let term1 = first(&log, |e| e.1 == "web-1" && e.3).expect("web-1 replaced");
    assert!(term2 < term1, "highest ordinal first: {log:?}");
    assert!(
        !log.iter().any(|e| e.1 == "web-0"),
        "web-0 is below the partition: {log:?}"
    );
    let after = wait_set(c, "web", "2 updated", |s| {
        s["status"]["updatedReplicas"] == 2
    })
    .await?;
    assert_ne!(
        after["status"]["updateRevision"],
        before["status"]["updateRevision"]
    );
    let web0_now = c.get_dyn(res("pods"), Some("default"), "web-0").await?;
    assert_eq!(meta::uid(&web0_now), meta::uid(&web0));
    let out = cluster.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=20s"])?;
    assert!(
        out.contains("partitioned roll out complete: 2 new pods"),
        "{out}"
    );

    // Below the partition, a deleted pod comes back at the current (old) revision.
    let old_rev = meta::labels(&web0)["controller-revision-hash"].clone();
    cluster.kubectl_ok(&["delete", "pod", "web-0"])?;
    let back = eventually("web-0 back", Duration::from_secs(30), || async {
        let p = c.get_dyn(res("pods"), Some("default"), "web-0").await.ok();
        Ok(p.filter(|p| meta::uid(p) != meta::uid(&web0) && is_ready(p)))
    })
    .await?;
    assert_eq!(meta::labels(&back)["controller-revision-hash"], old_rev);
    assert!(back["metadata"]["annotations"].get("rev").is_none());

    // Deleting the set takes its pods; the claims stay (whenDeleted: Retain).
    cluster.kubectl_ok(&["delete", "sts", "web"])?;
    eventually("web's pods gone", Duration::from_secs(30), || async {
        let list = c
            .list_dyn(res("pods"), Some("default"), Some("app=web"), None)
            .await?;
        Ok(list["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(()))
    })
    .await?;
    for i in 0..3 {
        c.get_dyn(res("pvc"), Some("default"), &format!("data-web-{i}"))
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_creates_all_at_once_and_claims_go_when_scaled_down() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let c = &cluster.client;
    let opts = FakeNodeOptions {
        start_delay: Duration::from_secs(3),
        ..Default::default()
    };
    let _node = FakeNode::start_with(c.clone(), "par-node", "127.0.0.9", opts).await?;
    let (_, mut watch) = list_and_watch_pods(c, "default", "app=db").await?;
    let mut s = set("db", 3, "Parallel");
    s["spec"]["persistentVolumeClaimRetentionPolicy"] = json!({"whenScaled": "Delete"});
    // Through kubectl apply, as a user would (its server-side field validation included).
    let manifest = cluster.dir.path().join("db.json");
    std::fs::write(&manifest, serde_json::to_vec(&s)?)?;
    cluster.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()])?;
    let mut log = Vec::new();
    record(
        &mut watch,
        Duration::from_secs(30),
        &mut log,
        |l| l.iter().any(|e| e.2),
        "a db pod ready",
    )
    .await?;
    let first_ready = first(&log, |e| e.2).unwrap();
    for n in ["db-0", "db-1", "db-2"] {
        let added = first(&log, |e| e.0 == "ADDED" && e.1 == n)
            .ok_or_else(|| anyhow::anyhow!("{n} not created: {log:?}"))?;
        assert!(added < first_ready, "{n} waited for another pod: {log:?}");
    }
    wait_set(c, "db", "3 ready", |s| s["status"]["readyReplicas"] == 3).await?;
    let table = cluster.kubectl_ok(&["get", "sts", "db"])?;
    assert!(table.contains("READY") && table.contains("3/3"), "{table}");
    let table = cluster.kubectl_ok(&["get", "pv"])?;
    assert!(
        table.contains("RECLAIM POLICY")
            && table.contains("default/data-db-0")
            && table.contains("Delete"),
        "{table}"
    );

    // whenScaled: Delete — the claims of removed ordinals go, with their volumes.
    let pvc2 = c.get_dyn(res("pvc"), Some("default"), "data-db-2").await?;
    let vol2 = eventually("data-db-2 bound", Duration::from_secs(15), || async {
        let p = c.get_dyn(res("pvc"), Some("default"), "data-db-2").await?;
        Ok(p["spec"]["volumeName"].as_str().map(String::from))
    })
    .await?;
    let _ = pvc2;
    cluster.kubectl_ok(&["scale", "sts/db", "--replicas=2"])?;
    eventually(
        "data-db-2 and its volume deleted",
        Duration::from_secs(30),
        || async {
            let pvc = c.get_dyn(res("pvc"), Some("default"), "data-db-2").await;
            let pv = c.get_dyn(res("pv"), None, &vol2).await;
            Ok((pvc.is_err() && pv.is_err()).then_some(()))
        },
    )
    .await?;
    c.get_dyn(res("pvc"), Some("default"), "data-db-1").await?;
    Ok(())
}

// ---- On a real node (`skiff up` in a namespace of the test's own). Needs root, iproute2,
// curl, dig, docker-registry, runc and the samples (`samples/build.sh`).

use skiff_e2e::netns::{Netns, SkiffUp};

const COUNTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  serviceName: web
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: counter
        image: 127.0.0.1:5000/counter:v1
        ports: [{name: http, containerPort: 8080}]
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 16Mi}}
"#;

fn curl(ns: &Netns, ip: &str) -> anyhow::Result<String> {
    ns.run(&[
        "curl",
        "-sf",
        "--max-time",
        "5",
        &format!("http://{ip}:8080/"),
    ])
}

fn pod_ip(up: &SkiffUp, ns: &Netns, name: &str) -> anyhow::Result<Option<String>> {
    Ok(up
        .pod_ips(ns, "app=web")?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, ip)| ip))
}

fn ready_pod(up: &SkiffUp, ns: &Netns, name: &str) -> anyhow::Result<Option<Value>> {
    let p = up.json(ns, &["get", "pod", name])?;
    Ok((is_ready(&p) && p["metadata"].get("deletionTimestamp").is_none()).then_some(p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_keeps_its_count_and_pods_have_dns_names() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(&ns, &[("counter.wasm", "counter:v1")])?;
    let manifest = dir.path().join("counter.yaml");
    std::fs::write(&manifest, COUNTER)?;
    up.skiff(&ns, &["apply", "-f", manifest.to_str().unwrap()])?;
    let out = up.skiff(&ns, &["rollout", "status", "sts/web", "--timeout", "90"])?;
    assert!(out.contains("roll out complete"), "{out}");

    // The count lives on the claim's volume.
    let ip0 = pod_ip(&up, &ns, "web-0")?.expect("web-0 has an address");
    assert_eq!(curl(&ns, &ip0)?, "count=1 | Running on: web-0\n");
    assert_eq!(curl(&ns, &ip0)?, "count=2 | Running on: web-0\n");
    let ip1 = pod_ip(&up, &ns, "web-1")?.expect("web-1 has an address");
    assert_eq!(curl(&ns, &ip1)?, "count=1 | Running on: web-1\n");

    // Per-pod DNS and SRV for the named port.
    let dns = up.json(&ns, &["get", "svc", "kube-dns", "-n", "kube-system"])?;
    let dns_ip = dns["spec"]["clusterIP"].as_str().unwrap().to_string();
    let dig = |name: &str, ty: &str| {
        ns.run(&[
            "dig",
            "+short",
            "+time=2",
            "+tries=2",
            &format!("@{dns_ip}"),
            name,
            ty,
        ])
    };
    eventually("web-0's DNS name", Duration::from_secs(20), || async {
        Ok(dig("web-0.web.default.svc.cluster.local", "A")
            .ok()
            .filter(|a| a.trim() == ip0))
    })
    .await?;
    let all = dig("web.default.svc.cluster.local", "A")?;
    assert!(all.contains(&ip0) && all.contains(&ip1), "{all}");
    let srv = dig("_http._tcp.web.default.svc.cluster.local", "SRV")?;
    assert!(
        srv.contains("8080 web-0.web.default.svc.cluster.local.")
            && srv.contains("8080 web-1.web.default.svc.cluster.local."),
        "{srv}"
    );

    // Deleted, web-0 comes back with the same name on the same node, and counts on.
    let old = up.json(&ns, &["get", "pod", "web-0"])?;
    up.skiff(&ns, &["delete", "pod", "web-0"])?;
    let new = eventually("web-0 back and Ready", Duration::from_secs(60), || async {
        Ok(ready_pod(&up, &ns, "web-0")?.filter(|p| meta::uid(p) != meta::uid(&old)))
    })
    .await?;
    assert_eq!(new["spec"]["nodeName"], old["spec"]["nodeName"]);
    let ip0 = new["status"]["podIP"].as_str().unwrap().to_string();
    let body = eventually("web-0 answering", Duration::from_secs(20), || async {
        Ok(curl(&ns, &ip0).ok())
    })
    .await?;
    assert_eq!(body, "count=3 | Running on: web-0\n");

    // The claims are Bound to volumes in the node's data directory, and kept on scale down.
    let pvc = up.json(&ns, &["get", "pvc", "data-web-0"])?;
    assert_eq!(pvc["status"]["phase"], "Bound");
    let vol = pvc["spec"]["volumeName"].as_str().unwrap();
    let on_disk = std::fs::read_to_string(up.dir.join("agent/storage").join(vol).join("count"))?;
    assert_eq!(on_disk.trim(), "3");
    up.skiff(&ns, &["scale", "sts/web", "--replicas=1"])?;
    eventually("web-1 gone", Duration::from_secs(60), || async {
        Ok(up
            .skiff_output(&ns, &["get", "pod", "web-1"])?
            .status
            .success()
            .then_some(())
            .xor(Some(())))
    })
    .await?;
    let pvc1 = up.json(&ns, &["get", "pvc", "data-web-1"])?;
    assert_eq!(pvc1["status"]["phase"], "Bound", "kept after scale down");

    // A deleted claim takes its volume with it.
    up.skiff(&ns, &["delete", "pvc", "data-web-1"])?;
    let vol1 = pvc1["spec"]["volumeName"].as_str().unwrap().to_string();
    eventually(
        "data-web-1's volume deleted",
        Duration::from_secs(20),
        || async {
            Ok((!up
                .skiff_output(&ns, &["get", "pv", &vol1])?
                .status
                .success())
            .then_some(()))
        },
    )
    .await?;
    let dir1 = up.dir.join("agent/storage").join(&vol1);
    eventually(
        "data-web-1's directory removed",
        Duration::from_secs(40),
        || async { Ok((!dir1.exists()).then_some(())) },
    )
    .await?;
    assert!(
        up.dir.join("agent/storage").join(vol).exists(),
        "data-web-0's stays"
    );
    Ok(())
}

const OCI_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: writer}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: writer
    image: 127.0.0.1:5000/bootcamp-oci:v1
    command: ["sh", "-c", "echo run >> /data/log; wc -l < /data/log > /data/seen; sleep 3600"]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes:
  - name: data
    persistentVolumeClaim: {claimName: oci-data}
"#;

const OCI_CLAIM: &str = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: oci-data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_pod_sees_its_claims_files_after_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_images(&ns, &[("bootcamp-oci:v1", "bootcamp-oci:v1")])?;
    let claim = dir.path().join("claim.yaml");
    std::fs::write(&claim, OCI_CLAIM)?;
    let pod = dir.path().join("pod.yaml");
    std::fs::write(&pod, OCI_POD)?;
    up.skiff(&ns, &["apply", "-f", claim.to_str().unwrap()])?;
    // WaitForFirstConsumer: no volume until a pod using the claim is scheduled.
    let pvc = up.json(&ns, &["get", "pvc", "oci-data"])?;
    assert_eq!(pvc["status"]["phase"], "Pending");
    up.skiff(&ns, &["apply", "-f", pod.to_str().unwrap()])?;
    let vol = eventually("oci-data bound", Duration::from_secs(30), || async {
        let pvc = up.json(&ns, &["get", "pvc", "oci-data"])?;
        Ok((pvc["status"]["phase"] == "Bound")
            .then(|| pvc["spec"]["volumeName"].as_str().map(String::from))
            .flatten())
    })
    .await?;
    let seen = up.dir.join("agent/storage").join(&vol).join("seen");
    let lines = |want: &'static str| {
        let seen = seen.clone();
        async move {
            eventually(
                &format!("the writer to see {want} line(s)"),
                Duration::from_secs(60),
                || async {
                    Ok(std::fs::read_to_string(&seen)
                        .ok()
                        .filter(|s| s.trim() == want)
                        .map(|_| ()))
                },
            )
            .await
        }
    };
    lines("1").await?;
    up.skiff(&ns, &["delete", "pod", "writer"])?;
    eventually("writer gone", Duration::from_secs(30), || async {
        Ok((!up
            .skiff_output(&ns, &["get", "pod", "writer"])?
            .status
            .success())
        .then_some(()))
    })
    .await?;
    up.skiff(&ns, &["apply", "-f", pod.to_str().unwrap()])?;
    // The second run finds the first one's line on the volume.
    lines("2").await?;
    let p = up.json(&ns, &["get", "pod", "writer"])?;
    assert_eq!(p["spec"]["nodeName"], "edge-1");
    Ok(())
}
