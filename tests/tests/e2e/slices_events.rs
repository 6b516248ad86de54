//! EndpointSlices and events.k8s.io with the real kubectl against an in-process server and a
//! fake node: a Service's slices list its pods (split at 100 endpoints, merged back when the
//! Deployment shrinks), a selectorless Service's Endpoints are mirrored, the `kubernetes`
//! Service has its slice, and an Event created through
//! either API is read through the other, by `kubectl get events`, `kubectl get
//! events.events.k8s.io` and `kubectl events`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::fake_node::{FakeNode, FakeNodeOptions};
use skiff_e2e::{eventually, TestCluster};

fn write(cluster: &TestCluster, name: &str, text: &str) -> anyhow::Result<String> {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

fn json(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut a = args.to_vec();
    a.extend_from_slice(&["-o", "json"]);
    Ok(serde_json::from_str(&cluster.kubectl_ok(&a)?)?)
}

/// A slice as (number of endpoints, set of (pod, address)).
type Slice = (usize, BTreeSet<(String, String)>);

/// Each slice of the Service `web`.
fn slices(cluster: &TestCluster) -> anyhow::Result<Vec<Slice>> {
    let list = json(
        cluster,
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
        ],
    )?;
    let mut out = Vec::new();
    for s in list["items"].as_array().into_iter().flatten() {
        let eps: BTreeSet<(String, String)> = s["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["conditions"]["ready"] == true)
            .map(|e| {
                (
                    e["targetRef"]["name"].as_str().unwrap_or("").to_string(),
                    e["addresses"][0].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        out.push((s["endpoints"].as_array().map_or(0, Vec::len), eps));
    }
    out.sort();
    Ok(out)
}

/// (name, podIP) of the running pods of `web`.
fn pods(cluster: &TestCluster) -> anyhow::Result<BTreeSet<(String, String)>> {
    let list = json(cluster, &["get", "pods", "-l", "app=web"])?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                p["status"]["podIP"].as_str()?.to_string(),
            ))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_services_slices_list_its_pods() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let _node = FakeNode::start_with(
        cluster.client.clone(),
        "n1",
        "127.0.0.9",
        FakeNodeOptions {
            max_pods: 200,
            ..Default::default()
        },
    )
    .await?;

    // The API server's own Service has its slice, as the kube-apiserver writes it.
    let api = json(&cluster, &["get", "endpointslice", "kubernetes"])?;
    assert_eq!(api["addressType"], "IPv4", "{api}");
    assert_eq!(api["ports"][0]["name"], "https", "{api}");
    assert_eq!(
        api["metadata"]["labels"]["kubernetes.io/service-name"],
        "kubernetes"
    );

    cluster.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "--image=example.com/web:v1",
        "--replicas=105",
        "--port=8080",
    ])?;
    cluster.kubectl_ok(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ])?;
    let (split, want) = eventually(
        "105 ready endpoints in slices of 100 and 5",
        Duration::from_secs(120),
        || async {
            let want = pods(&cluster)?;
            let got = slices(&cluster)?;
            let counts: Vec<usize> = got.iter().map(|(n, _)| *n).collect();
            let all: BTreeSet<_> = got.iter().flat_map(|(_, e)| e.clone()).collect();
            Ok((want.len() == 105 && counts == [5, 100] && all == want).then_some((got, want)))
        },
    )
    .await?;
    assert_eq!(split.len(), 2);

    // The slice's labels, owner and port, as Kubernetes' controller writes them.
    let list = json(
        &cluster,
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
        ],
    )?;
    let s = &list["items"][0];
    assert_eq!(
        s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    assert_eq!(s["metadata"]["ownerReferences"][0]["kind"], "Service");
    assert_eq!(s["metadata"]["ownerReferences"][0]["name"], "web");
    assert_eq!(s["ports"][0]["port"], 8080);
    assert_eq!(s["endpoints"][0]["nodeName"], "n1");
    // kubectl's table of slices.
    let table = cluster.kubectl_ok(&[
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=web",
    ])?;
    assert!(
        table.contains("ADDRESSTYPE") && table.contains("IPv4") && table.contains("more..."),
        "{table}"
    );
    drop(want);

    // Scaled down to 3: one slice left, listing exactly the 3 pods.
    cluster.kubectl_ok(&["scale", "deployment", "web", "--replicas=3"])?;
    eventually(
        "one slice with the 3 remaining pods",
        Duration::from_secs(120),
        || async {
            let want = pods(&cluster)?;
            let got = slices(&cluster)?;
            Ok(
                (want.len() == 3 && got.len() == 1 && got[0].0 == 3 && got[0].1 == want)
                    .then_some(()),
            )
        },
    )
    .await?;

    // A Service without a selector: its hand-written Endpoints are mirrored into a slice.
    let f = write(&cluster, "db.yaml", SELECTORLESS)?;
    cluster.kubectl_ok(&["apply", "-f", &f])?;
    eventually(
        "the Endpoints of db mirrored into a slice",
        Duration::from_secs(30),
        || async {
            let list = json(
                &cluster,
                &[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=db",
                ],
            )?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            Ok((items.len() == 1
                && items[0]["endpoints"][0]["addresses"][0] == "192.168.1.5"
                && items[0]["ports"][0]["port"] == 5432
                && items[0]["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                    == "endpointslicemirroring-controller.k8s.io")
                .then_some(()))
        },
    )
    .await?;

    // The Service deleted: its slices go with it.
    cluster.kubectl_ok(&["delete", "service", "web"])?;
    eventually(
        "no slices of a deleted Service",
        Duration::from_secs(30),
        || async { Ok(slices(&cluster)?.is_empty().then_some(())) },
    )
    .await?;
    Ok(())
}

const SELECTORLESS: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: db
spec:
  ports:
  - name: pg
    port: 5432
---
apiVersion: v1
kind: Endpoints
metadata:
  name: db
subsets:
- addresses:
  - ip: 192.168.1.5
  ports:
  - name: pg
    port: 5432
"#;

const NEW_STYLE: &str = r#"
apiVersion: events.k8s.io/v1
kind: Event
metadata:
  name: web.scaled
eventTime: "EVENT_TIME"
reportingController: example.com/operator
reportingInstance: operator-1
action: Scaling
reason: ScaledUp
type: Normal
note: scaled web to 3
regarding:
  kind: Deployment
  namespace: default
  name: web
"#;

const OLD_STYLE: &str = r#"
apiVersion: v1
kind: Event
metadata:
  name: web.restarted
involvedObject:
  kind: Pod
  namespace: default
  name: web-1
reason: BackOff
message: back-off restarting failed container
type: Warning
count: 4
source:
  component: kubelet
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_are_one_storage_in_two_shapes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;

    // Created through events.k8s.io, read through v1. Its time is now: an Event that last
    // happened over an hour ago is deleted by the Event TTL controller.
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let new_style = NEW_STYLE.replace("EVENT_TIME", &now);
    let f = write(&cluster, "new.yaml", &new_style)?;
    cluster.kubectl_ok(&["create", "-f", &f])?;
    let core = json(&cluster, &["get", "events", "web.scaled"])?;
    assert_eq!(core["apiVersion"], "v1");
    assert_eq!(core["message"], "scaled web to 3", "{core}");
    assert_eq!(core["involvedObject"]["name"], "web");
    assert_eq!(core["reportingComponent"], "example.com/operator");

    // Created through v1, read through events.k8s.io.
    let f = write(&cluster, "old.yaml", OLD_STYLE)?;
    cluster.kubectl_ok(&["create", "-f", &f])?;
    let new = json(&cluster, &["get", "events.events.k8s.io", "web.restarted"])?;
    assert_eq!(new["apiVersion"], "events.k8s.io/v1");
    assert_eq!(new["note"], "back-off restarting failed container", "{new}");
    assert_eq!(new["regarding"]["name"], "web-1");
    assert_eq!(new["deprecatedCount"], 4);
    assert_eq!(new["deprecatedSource"]["component"], "kubelet");
    assert!(new.get("message").is_none(), "{new}");

    // Both listed through both APIs, and in kubectl's tables.
    let table = cluster.kubectl_ok(&["get", "events.events.k8s.io"])?;
    assert!(
        table.contains("scaled web to 3") && table.contains("deployment/web"),
        "{table}"
    );
    assert!(
        table.contains("back-off restarting failed container"),
        "{table}"
    );
    let events = cluster.kubectl_ok(&["events"])?;
    assert!(
        events.contains("ScaledUp") && events.contains("BackOff"),
        "{events}"
    );

    // A patch through events.k8s.io lands in the core shape.
    cluster.kubectl_ok(&[
        "patch",
        "events.events.k8s.io",
        "web.scaled",
        "--type=merge",
        "-p",
        r#"{"note":"scaled web to 4"}"#,
    ])?;
    let core = json(&cluster, &["get", "events", "web.scaled"])?;
    assert_eq!(core["message"], "scaled web to 4", "{core}");

    // events.k8s.io requires what Kubernetes requires of new Events.
    let bad = write(
        &cluster,
        "bad.yaml",
        &new_style
            .replace("web.scaled", "web.bad")
            .replace("reportingController: example.com/operator\n", ""),
    )?;
    let out = cluster.kubectl(&["create", "-f", &bad])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reportingController"), "{stderr}");

    // Deleted through one, gone from the other.
    cluster.kubectl_ok(&["delete", "events.events.k8s.io", "web.restarted"])?;
    let out = cluster.kubectl(&["get", "events", "web.restarted"])?;
    assert!(!out.status.success(), "deleted through events.k8s.io");
    Ok(())
}
