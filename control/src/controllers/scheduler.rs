//! The scheduler: a filter/score pipeline over a node cache, binding pending pods in batches
//! (one store transaction per batch).
//!
//! Filters: node Ready and schedulable; taints (NoSchedule, NoExecute) tolerated; `nodeSelector`;
//! OCI pods only on nodes that run OCI containers; resource requests within allocatable. Score: fewest pods of the same owner on the node
//! (spreading replicas), then least requested. As kube-scheduler does on large clusters, only
//! enough feasible nodes are scored (at least 100, or 5%), starting where the last pod stopped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use serde_json::{json, Value};
use skiff_api::{meta, quantity, ApiError, Resource};

use super::nodelifecycle::is_ready;
use crate::registry::{set_condition, Registry, Sub, WriteOptions};

/// What a node offers and what is already asked of it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub taints: Vec<Value>,
    pub ready: bool,
    pub unschedulable: bool,
    pub cpu: i64,
    pub memory: i64,
    pub pods: i64,
    pub used_cpu: i64,
    pub used_memory: i64,
    pub used_pods: i64,
    /// Pods per owner uid on this node.
    pub owners: HashMap<String, i64>,
}

impl NodeInfo {
    pub fn from_node(node: &Value) -> NodeInfo {
        let alloc = |k: &str, cpu: bool| {
            node.pointer(&format!("/status/allocatable/{k}"))
                .and_then(Value::as_str)
                .and_then(|q| {
                    if cpu {
                        quantity::cpu_millis(q)
                    } else {
                        quantity::bytes(q)
                    }
                })
                .unwrap_or(0)
        };
        NodeInfo {
            name: meta::name(node).to_string(),
            labels: meta::labels(node),
            taints: node
                .pointer("/spec/taints")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            ready: is_ready(node),
            unschedulable: node.pointer("/spec/unschedulable") == Some(&json!(true)),
            cpu: alloc("cpu", true),
            memory: alloc("memory", false),
            pods: alloc("pods", false),
            used_cpu: 0,
            used_memory: 0,
            used_pods: 0,
            owners: HashMap::new(),
        }
    }

    pub fn add(&mut self, pod: &PodRequest) {
        self.used_cpu += pod.cpu;
        self.used_memory += pod.memory;
        self.used_pods += 1;
        if let Some(o) = &pod.owner {
            *self.owners.entry(o.clone()).or_insert(0) += 1;
        }
    }
}

/// Which images are OCI container images rather than wasm, as their registries say. Asked
/// once per image in the background (the scheduling pass never waits on a registry), and
/// only while some node cannot run OCI containers.
pub struct ImageKinds {
    known: Mutex<HashMap<String, (bool, Instant)>>,
    asking: Mutex<HashSet<String>>,
    insecure: Vec<String>,
    wake: Arc<Notify>,
}

/// How long an answer is kept; a registry that could not be asked is asked again sooner.
const KIND_TTL: Duration = Duration::from_secs(600);
const KIND_RETRY: Duration = Duration::from_secs(30);

impl ImageKinds {
    pub fn new(insecure: Vec<String>, wake: Arc<Notify>) -> Arc<ImageKinds> {
        Arc::new(ImageKinds {
            known: Mutex::default(),
            asking: Mutex::default(),
            insecure,
            wake,
        })
    }

    /// Records what an image is (tests, and pods that say it with a runtime class).
    pub fn insert(&self, image: &str, oci: bool) {
        self.known
            .lock()
            .expect("kinds")
            .insert(image.to_string(), (oci, Instant::now() + KIND_TTL));
    }

    /// Whether `image` is an OCI container image; None while the registry is being asked
    /// (the scheduler is woken when it answers).
    pub fn is_oci(self: &Arc<Self>, image: &str) -> Option<bool> {
        if let Some((oci, until)) = self.known.lock().expect("kinds").get(image) {
            if *until > Instant::now() {
                return Some(*oci);
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Some(false);
        };
        if self.asking.lock().expect("kinds").insert(image.to_string()) {
            let me = self.clone();
            let image = image.to_string();
            rt.spawn(async move {
                let asked = tokio::time::timeout(
                    Duration::from_secs(10),
                    skiff_oci::image::is_container_image(&image, &me.insecure),
                )
                .await;
                // A registry that cannot say puts no constraint on the pod: the node's pull
                // reports the error.
                let (oci, ttl) = match asked {
                    Ok(Ok(oci)) => (oci, KIND_TTL),
                    _ => (false, KIND_RETRY),
                };
                me.known
                    .lock()
                    .expect("kinds")
                    .insert(image.clone(), (oci, Instant::now() + ttl));
                me.asking.lock().expect("kinds").remove(&image);
                me.wake.notify_one();
            });
        }
        None
    }

    /// Whether `pod` needs a node that runs OCI containers; None while that is being found
    /// out. `runtimeClassName: runc` or `wasm` says it without asking a registry.
    pub fn pod_needs_oci(self: &Arc<Self>, pod: &Value) -> Option<bool> {
        match pod
            .pointer("/spec/runtimeClassName")
            .and_then(Value::as_str)
        {
            Some("runc") => return Some(true),
            Some("wasm" | "wasmtime") => return Some(false),
            _ => {}
        }
        let mut needs = Some(false);
        for c in pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match self.is_oci(c["image"].as_str().unwrap_or("")) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => needs = None,
            }
        }
        needs
    }
}

/// What a pod asks of a node.
#[derive(Debug, Clone)]
pub struct PodRequest {
    /// It has OCI containers: only nodes with runc fit.
    pub needs_oci: bool,
    pub cpu: i64,
    pub memory: i64,
    pub owner: Option<String>,
    pub node_selector: std::collections::BTreeMap<String, String>,
    pub tolerations: Vec<Value>,
}

impl PodRequest {
    pub fn from_pod(pod: &Value) -> PodRequest {
        let mut cpu = 0;
        let mut memory = 0;
        for c in pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = |k: &str| {
                c.pointer(&format!("/resources/requests/{k}"))
                    .or(c.pointer(&format!("/resources/limits/{k}")))
                    .and_then(Value::as_str)
            };
            cpu += req("cpu").and_then(quantity::cpu_millis).unwrap_or(0);
            memory += req("memory").and_then(quantity::bytes).unwrap_or(0);
        }
        PodRequest {
            needs_oci: false,
            cpu,
            memory,
            owner: meta::controller_uid(pod),
            node_selector: meta::string_map(pod.pointer("/spec/nodeSelector")),
            tolerations: pod
                .pointer("/spec/tolerations")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

fn tolerates(tolerations: &[Value], taint: &Value) -> bool {
    tolerations.iter().any(|t| {
        let op = t["operator"].as_str().unwrap_or("Equal");
        let key_ok = t
            .get("key")
            .and_then(Value::as_str)
            .is_none_or(|k| k.is_empty() && op == "Exists")
            || t["key"] == taint["key"];
        let value_ok = op == "Exists"
            || t.get("value").and_then(Value::as_str).unwrap_or("")
                == taint.get("value").and_then(Value::as_str).unwrap_or("");
        let effect_ok = t
            .get("effect")
            .and_then(Value::as_str)
            .is_none_or(|e| e.is_empty())
            || t["effect"] == taint["effect"];
        key_ok && value_ok && effect_ok
    })
}

/// Why `node` cannot take `pod`, or None if it can.
pub fn filter(node: &NodeInfo, pod: &PodRequest) -> Option<&'static str> {
    if !node.ready {
        return Some("node(s) were not ready");
    }
    if node.unschedulable {
        return Some("node(s) were unschedulable");
    }
    for t in &node.taints {
        let effect = t["effect"].as_str().unwrap_or("");
        if (effect == "NoSchedule" || effect == "NoExecute") && !tolerates(&pod.tolerations, t) {
            return Some("node(s) had untolerated taint");
        }
    }
    if !pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
    {
        return Some("node(s) didn't match Pod's node affinity/selector");
    }
    if pod.needs_oci
        && node
            .labels
            .get(skiff_api::OCI_NODE_LABEL)
            .map(String::as_str)
            == Some("false")
    {
        return Some("node(s) cannot run OCI containers (no runc)");
    }
    if node.pods > 0 && node.used_pods >= node.pods {
        return Some("Too many pods");
    }
    if pod.cpu > 0 && node.used_cpu + pod.cpu > node.cpu {
        return Some("Insufficient cpu");
    }
    if pod.memory > 0 && node.used_memory + pod.memory > node.memory {
        return Some("Insufficient memory");
    }
    None
}

/// Higher is better.
pub fn score(node: &NodeInfo, pod: &PodRequest) -> i64 {
    let same_owner = pod
        .owner
        .as_ref()
        .and_then(|o| node.owners.get(o))
        .copied()
        .unwrap_or(0);
    let frac = |used: i64, cap: i64| if cap > 0 { used * 100 / cap } else { 0 };
    let load = (frac(node.used_cpu + pod.cpu, node.cpu)
        + frac(node.used_memory + pod.memory, node.memory)
        + frac(node.used_pods + 1, node.pods))
        / 3;
    -same_owner * 1000 - load
}

/// Picks nodes for `pods` over `nodes`, updating the nodes' usage as it goes. Returns, per pod,
/// the chosen node index or the reasons it fits nowhere.
pub fn schedule(
    nodes: &mut [NodeInfo],
    pods: &[PodRequest],
    start: &mut usize,
) -> Vec<Result<usize, String>> {
    let n = nodes.len();
    let enough = if n <= 100 { n } else { (n * 5 / 100).max(100) };
    pods.iter()
        .map(|pod| {
            let mut best: Option<(i64, usize)> = None;
            let mut feasible = 0;
            let mut reasons: HashMap<&'static str, usize> = HashMap::new();
            for step in 0..n {
                let i = (*start + step) % n;
                match filter(&nodes[i], pod) {
                    Some(why) => *reasons.entry(why).or_insert(0) += 1,
                    None => {
                        feasible += 1;
                        let s = score(&nodes[i], pod);
                        if best.is_none_or(|(b, _)| s > b) {
                            best = Some((s, i));
                        }
                        if feasible >= enough {
                            break;
                        }
                    }
                }
            }
            *start = (*start + 1) % n.max(1);
            if n == 0 {
                return Err("no nodes available to schedule pods".to_string());
            }
            match best {
                Some((_, i)) => {
                    nodes[i].add(pod);
                    Ok(i)
                }
                None => {
                    let mut rs: Vec<String> = reasons
                        .into_iter()
                        .map(|(r, c)| format!("{c} {r}"))
                        .collect();
                    rs.sort();
                    Err(format!("0/{n} nodes are available: {}.", rs.join(", ")))
                }
            }
        })
        .collect()
}

/// Builds node infos from the caches: nodes with the requests of the pods already on them
/// (terminating ones included: only Succeeded and Failed pods are left out).
pub fn node_infos(nodes: &[Arc<Value>], pods: &[Arc<Value>]) -> Vec<NodeInfo> {
    let mut infos: Vec<NodeInfo> = nodes.iter().map(|n| NodeInfo::from_node(n)).collect();
    let index: HashMap<String, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    for p in pods {
        if let Some(i) = p
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .and_then(|n| index.get(n))
        {
            // A terminating pod still holds its resources, slot and address until it is
            // gone; only a finished one has given them back.
            if !super::pods::is_terminal(p) {
                infos[*i].add(&PodRequest::from_pod(p));
            }
        }
    }
    infos
}

pub fn is_pending(pod: &Value) -> bool {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        && !meta::is_deleting(pod)
        && pod
            .pointer("/spec/schedulerName")
            .and_then(Value::as_str)
            .is_none_or(|s| s == "default-scheduler" || s.is_empty())
}

/// Records a pod that fits nowhere: `PodScheduled=False` with the reason, and an Event.
pub fn mark_unschedulable(reg: &Registry, pod: &Value, message: &str) -> Result<(), ApiError> {
    let already = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "PodScheduled"))
        .is_some_and(|c| c["status"] == "False" && c["message"] == message);
    if already {
        return Ok(());
    }
    let mut next = pod.clone();
    set_condition(&mut next, "PodScheduled", "False", "Unschedulable", message);
    let pods = Resource::lookup("pods").expect("pods");
    reg.update(
        pods,
        meta::namespace(pod),
        meta::name(pod),
        next,
        Sub::Status,
        &WriteOptions::default(),
    )?;
    super::events::record(
        reg,
        pod,
        "Warning",
        "FailedScheduling",
        message,
        "default-scheduler",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: &str, taints: Value, labels: Value) -> NodeInfo {
        NodeInfo::from_node(
            &json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
            "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}),
        )
    }

    fn pod(cpu: &str, owner: Option<&str>) -> PodRequest {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}});
        if let Some(o) = owner {
            p["metadata"]["ownerReferences"] =
                json!([{"uid": o, "controller": true, "kind": "ReplicaSet", "name": "rs"}]);
        }
        PodRequest::from_pod(&p)
    }

    #[test]
    fn filters_resources_taints_and_selectors() {
        let n = node("a", "1", json!([]), json!({}));
        assert!(filter(&n, &pod("500m", None)).is_none());
        assert_eq!(filter(&n, &pod("2", None)), Some("Insufficient cpu"));
        let tainted = node(
            "b",
            "1",
            json!([{"key": "dedicated", "value": "edge", "effect": "NoSchedule"}]),
            json!({}),
        );
        assert_eq!(
            filter(&tainted, &pod("1m", None)),
            Some("node(s) had untolerated taint")
        );
        let mut tolerant = pod("1m", None);
        tolerant.tolerations = vec![
            json!({"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}),
        ];
        assert!(filter(&tainted, &tolerant).is_none());
        let mut picky = pod("1m", None);
        picky.node_selector.insert("zone".into(), "x".into());
        assert!(filter(&n, &picky).is_some());
        assert!(filter(&node("c", "1", json!([]), json!({"zone": "x"})), &picky).is_none());
    }

    #[test]
    fn spreads_replicas_and_explains_failures() {
        let mut nodes = vec![
            node("a", "4", json!([]), json!({})),
            node("b", "4", json!([]), json!({})),
        ];
        let pods: Vec<PodRequest> = (0..4).map(|_| pod("100m", Some("rs1"))).collect();
        let mut start = 0;
        let placed = schedule(&mut nodes, &pods, &mut start);
        let on_a = placed.iter().filter(|r| **r == Ok(0)).count();
        assert_eq!(on_a, 2, "{placed:?}");
        let big = schedule(&mut nodes, &[pod("64", None)], &mut start);
        assert_eq!(
            big[0],
            Err("0/2 nodes are available: 2 Insufficient cpu.".to_string())
        );
    }

    #[test]
    fn terminating_pods_hold_their_node_until_gone() {
        let n = json!({"metadata": {"name": "a"}, "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "2"},
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        let on_a = |phase: &str, deleting: bool| {
            let mut p = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "a", "containers": [{"name": "c", "resources": {"requests": {"cpu": "400m"}}}]},
                               "status": {"phase": phase}});
            if deleting {
                p["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
            }
            Arc::new(p)
        };
        let infos = node_infos(
            &[Arc::new(n.clone())],
            &[on_a("Running", true), on_a("Running", false)],
        );
        assert_eq!((infos[0].used_pods, infos[0].used_cpu), (2, 800));
        assert_eq!(filter(&infos[0], &pod("100m", None)), Some("Too many pods"));
        // Finished pods give their slot back.
        let infos = node_infos(
            &[Arc::new(n)],
            &[on_a("Succeeded", false), on_a("Failed", true)],
        );
        assert_eq!((infos[0].used_pods, infos[0].used_cpu), (0, 0));
    }

    #[test]
    fn oci_pods_go_to_nodes_that_run_oci_containers() {
        let mut nodes = vec![
            node(
                "wasm-only",
                "4",
                json!([]),
                json!({"skiff.dev/oci": "false"}),
            ),
            node("full", "4", json!([]), json!({"skiff.dev/oci": "true"})),
        ];
        let oci = PodRequest {
            needs_oci: true,
            ..pod("100m", None)
        };
        let mut start = 0;
        for _ in 0..3 {
            assert_eq!(
                schedule(&mut nodes, std::slice::from_ref(&oci), &mut start)[0],
                Ok(1)
            );
        }
        let mut only = vec![nodes[0].clone()];
        assert_eq!(
            schedule(&mut only, &[oci], &mut start)[0],
            Err("0/1 nodes are available: 1 node(s) cannot run OCI containers (no runc).".into())
        );
        // A wasm pod still fits the wasm-only node.
        assert_eq!(
            schedule(&mut only, &[pod("100m", None)], &mut start)[0],
            Ok(0)
        );
    }

    #[tokio::test]
    async fn what_a_pod_needs_comes_from_its_runtime_class_or_its_images() {
        let kinds = ImageKinds::new(vec![], Arc::new(Notify::new()));
        kinds.insert("reg/app:oci", true);
        kinds.insert("reg/app:wasm", false);
        let with = |images: &[&str], class: Option<&str>| {
            let cs: Vec<Value> = images
                .iter()
                .map(|i| json!({"name": "c", "image": i}))
                .collect();
            json!({"spec": {"containers": cs, "runtimeClassName": class}})
        };
        assert_eq!(
            kinds.pod_needs_oci(&with(&["reg/app:wasm"], None)),
            Some(false)
        );
        assert_eq!(
            kinds.pod_needs_oci(&with(&["reg/app:wasm", "reg/app:oci"], None)),
            Some(true)
        );
        assert_eq!(
            kinds.pod_needs_oci(&with(&["reg/app:wasm"], Some("runc"))),
            Some(true)
        );
        assert_eq!(
            kinds.pod_needs_oci(&with(&["reg/unknown:1"], Some("wasm"))),
            Some(false)
        );
        // Not known yet: asked in the background, the pod waits.
        assert_eq!(
            kinds.pod_needs_oci(&with(&["127.0.0.1:1/nothing:1"], None)),
            None
        );
    }
}
