//! The scheduler: a filter/score pipeline over a node cache, binding pending pods in batches
//! (one store transaction per batch).
//!
//! Filters: node Ready and schedulable (or the `unschedulable` taint tolerated, as daemon pods
//! do); taints (NoSchedule, NoExecute) tolerated; `nodeSelector`; required node affinity
//! (`matchExpressions` on labels, `matchFields` on `metadata.name`);
//! OCI pods only on nodes that run OCI containers; resource requests within allocatable;
//! `topologySpreadConstraints` with `whenUnsatisfiable: DoNotSchedule` (maxSkew over the
//! domains of any node label); required `podAntiAffinity`. Score: fewest pods of the same owner
//! on the node (spreading replicas), `ScheduleAnyway` spread constraints and preferred
//! anti-affinity terms (fewer matching pods in the node's domain is better), then least
//! requested. As kube-scheduler does on large clusters, only enough feasible nodes are scored
//! (at least 100, or 5%), starting where the last pod stopped.
//!
//! Spread domains are the nodes that are Ready and match the pod's `nodeSelector` (and, with
//! `nodeTaintsPolicy: Honor`, whose taints it tolerates): unlike kube-scheduler, a node that is
//! not Ready is no domain, so the replacements of a dead node's pods are not held Pending by the
//! empty domain it leaves. Terminating pods are not counted (as in kube-scheduler). Not
//! supported: `minDomains`, `matchLabelKeys`, `namespaceSelector`, the symmetric check of
//! existing pods' anti-affinity, and pod affinity.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use k8s_openapi::api::core::v1::{
    Node, NodeSelector, NodeSelectorRequirement, Pod, PodCondition, PodStatus, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use skiff_api::conditions::{self, Condition};
use skiff_api::quantity;
use skiff_api::selector::Selector;
use skiff_api::ApiError;

use super::api;
use crate::registry::Registry;

/// What a node offers and what is already asked of it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub taints: Vec<Taint>,
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
    /// The pods on this node, for spread constraints and anti-affinity.
    pub pod_labels: Vec<PodLabels>,
}

/// What spreading and anti-affinity need of a pod already on a node.
#[derive(Debug, Clone)]
pub struct PodLabels {
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub terminating: bool,
}

/// One `topologySpreadConstraint`.
#[derive(Debug, Clone)]
pub struct Spread {
    pub max_skew: i64,
    pub key: String,
    /// `DoNotSchedule` (a filter) rather than `ScheduleAnyway` (a score).
    pub hard: bool,
    /// None (no selector) matches no pod.
    pub selector: Option<Selector>,
    /// `nodeTaintsPolicy: Honor`: nodes with taints the pod does not tolerate are no domain.
    pub honor_taints: bool,
}

/// One `podAntiAffinity` term: no pod matching `selector` in `namespaces` may run (required)
/// or should run (preferred, by `weight`) in the node's `key` domain.
#[derive(Debug, Clone)]
pub struct AntiAffinity {
    pub key: String,
    pub selector: Option<Selector>,
    pub namespaces: Vec<String>,
    /// 0 for a required term.
    pub weight: i64,
}

fn selector(ls: Option<&LabelSelector>) -> Option<Selector> {
    ls.and_then(|l| Selector::from_label_selector(l).ok())
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> NodeInfo {
        let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let spec = node.spec.as_ref();
        let alloc = |k: &str, cpu: bool| {
            allocatable
                .and_then(|a| a.get(k))
                .and_then(|q| {
                    let q = q.0.as_str();
                    if cpu {
                        quantity::cpu_millis(q)
                    } else {
                        quantity::bytes(q)
                    }
                })
                .unwrap_or(0)
        };
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: spec.and_then(|s| s.taints.clone()).unwrap_or_default(),
            ready: conditions::is_true(
                node.status.as_ref().and_then(|s| s.conditions.as_deref()),
                "Ready",
            ),
            unschedulable: spec.and_then(|s| s.unschedulable) == Some(true),
            cpu: alloc("cpu", true),
            memory: alloc("memory", false),
            pods: alloc("pods", false),
            used_cpu: 0,
            used_memory: 0,
            used_pods: 0,
            owners: HashMap::new(),
            pod_labels: Vec::new(),
        }
    }

    pub fn add(&mut self, pod: &PodRequest) {
        self.used_cpu += pod.cpu;
        self.used_memory += pod.memory;
        self.used_pods += 1;
        if let Some(o) = &pod.owner {
            *self.owners.entry(o.clone()).or_insert(0) += 1;
        }
        self.pod_labels.push(PodLabels {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            terminating: pod.terminating,
        });
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
                    skiff_registry::is_container_image(&image, &me.insecure),
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
    pub fn pod_needs_oci(self: &Arc<Self>, pod: &Pod) -> Option<bool> {
        let spec = pod.spec.as_ref();
        match spec.and_then(|s| s.runtime_class_name.as_deref()) {
            Some("runc") => return Some(true),
            Some("wasm" | "wasmtime") => return Some(false),
            _ => {}
        }
        let mut needs = Some(false);
        for c in spec.into_iter().flat_map(|s| &s.containers) {
            match self.is_oci(c.image.as_deref().unwrap_or("")) {
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
    pub tolerations: Vec<Toleration>,
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub terminating: bool,
    pub spread: Vec<Spread>,
    pub anti_affinity: Vec<AntiAffinity>,
    /// `nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution`.
    pub node_affinity: Option<NodeSelector>,
}

impl PodRequest {
    pub fn from_pod(pod: &Pod) -> PodRequest {
        let spec = pod.spec.as_ref();
        let mut cpu = 0;
        let mut memory = 0;
        for c in spec.into_iter().flat_map(|s| &s.containers) {
            let res = c.resources.as_ref();
            let req = |k: &str| {
                res.and_then(|r| r.requests.as_ref())
                    .and_then(|m| m.get(k))
                    .or_else(|| res.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(k)))
                    .map(|q| q.0.as_str())
            };
            cpu += req("cpu").and_then(quantity::cpu_millis).unwrap_or(0);
            memory += req("memory").and_then(quantity::bytes).unwrap_or(0);
        }
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let spread: Vec<Spread> = spec
            .and_then(|s| s.topology_spread_constraints.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|c| Spread {
                max_skew: i64::from(c.max_skew.max(1)),
                hard: c.when_unsatisfiable != "ScheduleAnyway",
                selector: selector(c.label_selector.as_ref()),
                honor_taints: c.node_taints_policy.as_deref() == Some("Honor"),
                key: c.topology_key.clone(),
            })
            .collect();
        let mut anti_affinity = Vec::new();
        let affinity = spec.and_then(|s| s.affinity.as_ref());
        let node_affinity = affinity
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .clone()
            });
        if let Some(anti) = affinity.and_then(|a| a.pod_anti_affinity.as_ref()) {
            let term =
                |t: &k8s_openapi::api::core::v1::PodAffinityTerm, weight: i64| AntiAffinity {
                    key: t.topology_key.clone(),
                    selector: selector(t.label_selector.as_ref()),
                    namespaces: t
                        .namespaces
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| vec![namespace.clone()]),
                    weight,
                };
            for t in anti
                .required_during_scheduling_ignored_during_execution
                .iter()
                .flatten()
            {
                anti_affinity.push(term(t, 0));
            }
            for w in anti
                .preferred_during_scheduling_ignored_during_execution
                .iter()
                .flatten()
            {
                anti_affinity.push(term(&w.pod_affinity_term, i64::from(w.weight.max(1))));
            }
        }
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone());
        PodRequest {
            needs_oci: false,
            cpu,
            memory,
            namespace,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            spread,
            anti_affinity,
            node_affinity,
            owner,
            node_selector: spec
                .and_then(|s| s.node_selector.clone())
                .unwrap_or_default(),
            tolerations: spec.and_then(|s| s.tolerations.clone()).unwrap_or_default(),
        }
    }
}

/// The taint a cordoned node is treated as having: pods that tolerate it (daemon pods) may
/// still be placed there, as kube-scheduler's NodeUnschedulable plugin allows.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Whether `node` satisfies a required node selector: any term matches, and a term matches
/// when all its label expressions and field expressions (`metadata.name` only) hold; an
/// empty term matches nothing.
pub fn node_selector_matches(node: &NodeInfo, sel: &NodeSelector) -> bool {
    fn holds(value: Option<&str>, r: &NodeSelectorRequirement) -> bool {
        let values = r.values.as_deref().unwrap_or_default();
        let num = |v: &str| v.parse::<i64>().ok();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
            "NotIn" => value.is_none_or(|v| values.iter().all(|x| x != v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            "Gt" | "Lt" => {
                let (Some(have), Some(want)) =
                    (value.and_then(num), values.first().and_then(|w| num(w)))
                else {
                    return false;
                };
                if r.operator == "Gt" {
                    have > want
                } else {
                    have < want
                }
            }
            _ => false,
        }
    }
    sel.node_selector_terms.iter().any(|t| {
        let exprs = t.match_expressions.as_deref().unwrap_or_default();
        let fields = t.match_fields.as_deref().unwrap_or_default();
        (!exprs.is_empty() || !fields.is_empty())
            && exprs
                .iter()
                .all(|r| holds(node.labels.get(&r.key).map(String::as_str), r))
            && fields.iter().all(|r| {
                let value = (r.key == "metadata.name").then_some(node.name.as_str());
                value.is_some() && holds(value, r)
            })
    })
}

/// Whether `node` matches the pod's `nodeSelector` and required node affinity.
pub fn node_matches(node: &NodeInfo, pod: &PodRequest) -> bool {
    pod.node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
        && pod
            .node_affinity
            .as_ref()
            .is_none_or(|a| node_selector_matches(node, a))
}

/// Whether the pod tolerates every taint of `node` with one of `effects`.
pub fn tolerates_taints(node: &NodeInfo, tolerations: &[Toleration], effects: &[&str]) -> bool {
    node.taints
        .iter()
        .all(|t| !effects.contains(&t.effect.as_str()) || tolerates(tolerations, t))
}

/// Whether one of `tolerations` tolerates `taint` (an empty key with `Exists` tolerates
/// every taint; an empty effect every effect).
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let op = t.operator.as_deref().unwrap_or("Equal");
        let key_ok = t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() && op == "Exists")
            || t.key.as_deref() == Some(taint.key.as_str());
        let value_ok = op == "Exists"
            || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
        let effect_ok = t.effect.as_deref().is_none_or(str::is_empty)
            || t.effect.as_deref() == Some(&*taint.effect);
        key_ok && value_ok && effect_ok
    })
}

/// Why `node` cannot take `pod`, or None if it can.
pub fn filter(node: &NodeInfo, pod: &PodRequest) -> Option<&'static str> {
    if !node.ready {
        return Some("node(s) were not ready");
    }
    if node.unschedulable
        && !tolerates(
            &pod.tolerations,
            &Taint {
                key: UNSCHEDULABLE_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            },
        )
    {
        return Some("node(s) were unschedulable");
    }
    for t in &node.taints {
        let effect = t.effect.as_str();
        if (effect == "NoSchedule" || effect == "NoExecute") && !tolerates(&pod.tolerations, t) {
            return Some("node(s) had untolerated taint");
        }
    }
    if !node_matches(node, pod) {
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

fn taints_tolerated(node: &NodeInfo, pod: &PodRequest) -> bool {
    node.taints.iter().all(|t| {
        let effect = t.effect.as_str();
        !(effect == "NoSchedule" || effect == "NoExecute") || tolerates(&pod.tolerations, t)
    })
}

fn matching(
    node: &NodeInfo,
    namespaces: &[String],
    sel: &Option<Selector>,
    live_only: bool,
) -> i64 {
    let Some(sel) = sel else {
        return 0;
    };
    node.pod_labels
        .iter()
        .filter(|p| !(live_only && p.terminating))
        .filter(|p| namespaces.contains(&p.namespace) && sel.matches(&p.labels))
        .count() as i64
}

/// What a pod's spread constraints and anti-affinity terms see of the cluster: per constraint,
/// the matching pods per domain and the smallest count; per term, the matching pods per domain.
#[derive(Debug, Default)]
pub struct Topology {
    spread: Vec<(HashMap<String, i64>, i64)>,
    anti: Vec<HashMap<String, i64>>,
}

impl Topology {
    pub fn new(nodes: &[NodeInfo], pod: &PodRequest) -> Topology {
        let ns = std::slice::from_ref(&pod.namespace);
        let spread = pod
            .spread
            .iter()
            .map(|c| {
                let mut counts: HashMap<String, i64> = HashMap::new();
                for n in nodes {
                    let eligible = n.ready
                        && node_matches(n, pod)
                        && (!c.honor_taints || taints_tolerated(n, pod));
                    let Some(domain) = n.labels.get(&c.key).filter(|_| eligible) else {
                        continue;
                    };
                    *counts.entry(domain.clone()).or_insert(0) +=
                        matching(n, ns, &c.selector, true);
                }
                let min = counts.values().copied().min().unwrap_or(0);
                (counts, min)
            })
            .collect();
        let anti = pod
            .anti_affinity
            .iter()
            .map(|t| {
                let mut counts: HashMap<String, i64> = HashMap::new();
                for n in nodes {
                    if let Some(domain) = n.labels.get(&t.key) {
                        *counts.entry(domain.clone()).or_insert(0) +=
                            matching(n, &t.namespaces, &t.selector, false);
                    }
                }
                counts
            })
            .collect();
        Topology { spread, anti }
    }

    /// Why the spread constraints or anti-affinity keep `pod` off `node`, or None.
    pub fn filter(&self, node: &NodeInfo, pod: &PodRequest) -> Option<&'static str> {
        for (c, (counts, min)) in pod.spread.iter().zip(&self.spread) {
            if !c.hard {
                continue;
            }
            let Some(domain) = node.labels.get(&c.key) else {
                return Some(
                    "node(s) didn't match pod topology spread constraints (missing required label)",
                );
            };
            let me = i64::from(c.selector.as_ref().is_some_and(|s| s.matches(&pod.labels)));
            let skew = counts.get(domain).copied().unwrap_or(0) + me - min;
            if skew > c.max_skew {
                return Some("node(s) didn't match pod topology spread constraints");
            }
        }
        for (t, counts) in pod.anti_affinity.iter().zip(&self.anti) {
            if t.weight == 0
                && node
                    .labels
                    .get(&t.key)
                    .is_some_and(|d| counts.get(d).copied().unwrap_or(0) > 0)
            {
                return Some("node(s) didn't match pod anti-affinity rules");
            }
        }
        None
    }

    /// The penalty (higher is worse) of `ScheduleAnyway` constraints and preferred terms.
    pub fn penalty(&self, node: &NodeInfo, pod: &PodRequest) -> i64 {
        let mut p = 0;
        for (c, (counts, _)) in pod.spread.iter().zip(&self.spread) {
            if !c.hard {
                let domain = node.labels.get(&c.key);
                p += domain.map_or(1000, |d| counts.get(d).copied().unwrap_or(0)) * 1000;
            }
        }
        for (t, counts) in pod.anti_affinity.iter().zip(&self.anti) {
            if t.weight > 0 {
                let n = node
                    .labels
                    .get(&t.key)
                    .map_or(0, |d| counts.get(d).copied().unwrap_or(0));
                p += t.weight * n * 100;
            }
        }
        p
    }
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
            let topology = (!pod.spread.is_empty() || !pod.anti_affinity.is_empty())
                .then(|| Topology::new(nodes, pod));
            for step in 0..n {
                let i = (*start + step) % n;
                let why = filter(&nodes[i], pod)
                    .or_else(|| topology.as_ref().and_then(|t| t.filter(&nodes[i], pod)));
                match why {
                    Some(why) => *reasons.entry(why).or_insert(0) += 1,
                    None => {
                        feasible += 1;
                        let s = score(&nodes[i], pod)
                            - topology.as_ref().map_or(0, |t| t.penalty(&nodes[i], pod));
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
pub fn node_infos(nodes: &[Arc<Node>], pods: &[Arc<Pod>]) -> Vec<NodeInfo> {
    let mut infos: Vec<NodeInfo> = nodes.iter().map(|n| NodeInfo::from_node(n)).collect();
    let index: HashMap<String, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    for p in pods {
        if let Some(i) = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
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

pub fn is_pending(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty)
        && pod.metadata.deletion_timestamp.is_none()
        && spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|s| s == "default-scheduler" || s.is_empty())
}

/// Records a pod that fits nowhere: `PodScheduled=False` with the reason, and an Event.
pub fn mark_unschedulable(reg: &Registry, pod: &Pod, message: &str) -> Result<(), ApiError> {
    let mut status: PodStatus = pod.status.clone().unwrap_or_default();
    let mut conds = status.conditions.take().unwrap_or_default();
    let now = api::now();
    let c = PodCondition::new("PodScheduled", "False", "Unschedulable", message, &now);
    if !conditions::set(&mut conds, c, &now) {
        return Ok(());
    }
    status.conditions = Some(conds);
    api::update_status(reg, pod, &status)?;
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
    use serde_json::{json, Value};

    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).expect("a valid object")
    }

    fn node(name: &str, cpu: &str, taints: Value, labels: Value) -> NodeInfo {
        NodeInfo::from_node(&typed(
            json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
            "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}),
        ))
    }

    fn pod(cpu: &str, owner: Option<&str>) -> PodRequest {
        let owners = owner
            .map(|o| json!([{"uid": o, "controller": true, "kind": "ReplicaSet", "name": "rs"}]));
        let p = json!({"metadata": {"name": "p", "ownerReferences": owners},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}});
        PodRequest::from_pod(&typed(p))
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
        tolerant.tolerations = vec![typed(
            json!({"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}),
        )];
        assert!(filter(&tainted, &tolerant).is_none());
        let mut picky = pod("1m", None);
        picky.node_selector.insert("zone".into(), "x".into());
        assert!(filter(&n, &picky).is_some());
        assert!(filter(&node("c", "1", json!([]), json!({"zone": "x"})), &picky).is_none());
    }

    #[test]
    fn node_affinity_match_fields_and_expressions() {
        let a = node("a", "1", json!([]), json!({"zone": "x", "gen": "5"}));
        let b = node("b", "1", json!([]), json!({"zone": "y"}));
        let pinned = |spec: Value| {
            PodRequest::from_pod(&typed(
                json!({"metadata": {"name": "p"}, "spec": {"containers": [], "affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": spec}}}}}),
            ))
        };
        let to_b = pinned(
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]}]),
        );
        assert!(filter(&a, &to_b).is_some());
        assert!(filter(&b, &to_b).is_none());
        let mut nodes = vec![a.clone(), b.clone()];
        let mut start = 0;
        assert_eq!(schedule(&mut nodes, &[to_b], &mut start), vec![Ok(1)]);
        // Terms are ORed; within a term, expressions are ANDed.
        let either = pinned(json!([
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["x"]},
                                  {"key": "gen", "operator": "Gt", "values": ["4"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["nowhere"]}]}
        ]));
        assert!(filter(&a, &either).is_none());
        assert!(filter(&b, &either).is_some());
        let not_x = pinned(
            json!([{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["x"]}]}]),
        );
        assert!(filter(&a, &not_x).is_some());
        assert!(filter(&b, &not_x).is_none());
        // An empty term matches nothing.
        assert!(filter(&a, &pinned(json!([{}]))).is_some());
    }

    #[test]
    fn cordoned_nodes_take_pods_that_tolerate_unschedulable() {
        let mut n = node("a", "1", json!([]), json!({}));
        n.unschedulable = true;
        let mut p = pod("1m", None);
        assert_eq!(filter(&n, &p), Some("node(s) were unschedulable"));
        p.tolerations = vec![typed(
            json!({"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"}),
        )];
        assert!(filter(&n, &p).is_none());
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
            let deleted = deleting.then_some("2024-01-01T00:00:00Z");
            let p = json!({"metadata": {"name": "p", "deletionTimestamp": deleted},
                "spec": {"nodeName": "a", "containers": [{"name": "c", "resources": {"requests": {"cpu": "400m"}}}]},
                "status": {"phase": phase}});
            Arc::new(typed::<Pod>(p))
        };
        let infos = node_infos(
            &[Arc::new(typed(n.clone()))],
            &[on_a("Running", true), on_a("Running", false)],
        );
        assert_eq!((infos[0].used_pods, infos[0].used_cpu), (2, 800));
        assert_eq!(filter(&infos[0], &pod("100m", None)), Some("Too many pods"));
        // Finished pods give their slot back.
        let infos = node_infos(
            &[Arc::new(typed(n))],
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

    fn labelled(name: &str, zone: &str) -> NodeInfo {
        node(
            name,
            "64",
            json!([]),
            json!({"kubernetes.io/hostname": name, "zone": zone}),
        )
    }

    fn web(extra_spec: Value) -> PodRequest {
        let p = json!({"metadata": {"name": "w", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c"}]}});
        let p = skiff_api::patch::strategic_merge(&p, &json!({ "spec": extra_spec }));
        PodRequest::from_pod(&typed(p))
    }

    fn spread(key: &str, when: &str) -> Value {
        json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": when,
            "labelSelector": {"matchLabels": {"app": "web"}}}]})
    }

    fn per_node(nodes: &[NodeInfo], placed: &[Result<usize, String>]) -> Vec<usize> {
        (0..nodes.len())
            .map(|i| placed.iter().filter(|r| **r == Ok(i)).count())
            .collect()
    }

    #[test]
    fn spread_constraints_hold_max_skew_over_hostnames_and_zones() {
        let mut nodes = vec![
            labelled("a", "z1"),
            labelled("b", "z1"),
            labelled("c", "z2"),
        ];
        // Two web pods already on a: DoNotSchedule puts the next ones on b and c first.
        for _ in 0..2 {
            nodes[0].add(&web(json!({})));
        }
        let pods: Vec<PodRequest> = (0..4)
            .map(|_| web(spread("kubernetes.io/hostname", "DoNotSchedule")))
            .collect();
        let mut start = 0;
        let placed = schedule(&mut nodes, &pods, &mut start);
        assert_eq!(per_node(&nodes, &placed), vec![0, 2, 2], "{placed:?}");
        // Zones: z1 (a, b) holds 4, z2 (c) holds 2: only c keeps the skew within 1.
        let z = web(spread("zone", "DoNotSchedule"));
        let placed = schedule(&mut nodes, std::slice::from_ref(&z), &mut start);
        assert_eq!(placed, vec![Ok(2)]);
        // A node without the key is no place for a hard constraint.
        let mut bare = vec![node("x", "4", json!([]), json!({}))];
        let placed = schedule(&mut bare, &[z], &mut start);
        assert_eq!(
            placed,
            vec![Err("0/1 nodes are available: 1 node(s) didn't match pod topology spread constraints (missing required label).".into())]
        );
    }

    #[test]
    fn spread_ignores_not_ready_nodes_and_terminating_pods_and_soft_constraints_only_score() {
        let mut nodes = vec![labelled("a", "z"), labelled("b", "z"), labelled("c", "z")];
        nodes[2].ready = false;
        for n in nodes.iter_mut().take(2) {
            n.add(&web(json!({})));
        }
        // The dead node c is no domain: a and b (2, 2) take the replacements 3/3.
        let pods: Vec<PodRequest> = (0..2)
            .map(|_| web(spread("kubernetes.io/hostname", "DoNotSchedule")))
            .collect();
        let mut start = 0;
        let placed = schedule(&mut nodes, &pods, &mut start);
        assert_eq!(per_node(&nodes, &placed), vec![1, 1, 0], "{placed:?}");
        // Terminating pods do not count.
        let mut nodes = vec![labelled("a", "z"), labelled("b", "z")];
        let mut leaving = web(json!({}));
        leaving.terminating = true;
        for _ in 0..3 {
            nodes[0].add(&leaving);
        }
        nodes[1].add(&web(json!({})));
        let p = web(spread("kubernetes.io/hostname", "DoNotSchedule"));
        assert_eq!(schedule(&mut nodes, &[p], &mut start), vec![Ok(0)]);
        // ScheduleAnyway never refuses: with every node full of matches it still places.
        let mut nodes = vec![labelled("a", "z"), labelled("b", "z")];
        for _ in 0..5 {
            nodes[0].add(&web(json!({})));
        }
        let soft: Vec<PodRequest> = (0..3)
            .map(|_| web(spread("kubernetes.io/hostname", "ScheduleAnyway")))
            .collect();
        let placed = schedule(&mut nodes, &soft, &mut start);
        assert_eq!(per_node(&nodes, &placed), vec![0, 3], "{placed:?}");
    }

    #[test]
    fn anti_affinity_keeps_pods_apart() {
        let required = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "web"}}}]}}});
        let mut nodes = vec![labelled("a", "z"), labelled("b", "z")];
        let pods: Vec<PodRequest> = (0..3).map(|_| web(required.clone())).collect();
        let mut start = 0;
        let placed = schedule(&mut nodes, &pods, &mut start);
        assert_eq!(placed[..2].iter().filter(|r| r.is_ok()).count(), 2);
        assert_ne!(placed[0], placed[1]);
        assert_eq!(
            placed[2],
            Err("0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.".into())
        );
        // Other namespaces' pods do not count.
        let mut nodes = vec![labelled("a", "z")];
        let mut elsewhere = web(json!({}));
        elsewhere.namespace = "other".into();
        nodes[0].add(&elsewhere);
        assert_eq!(
            schedule(&mut nodes, &[web(required)], &mut start),
            vec![Ok(0)]
        );
        // Preferred: the node with a matching pod is avoided while another fits.
        let preferred = json!({"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "web"}}}}]}}});
        let mut nodes = vec![labelled("a", "z"), labelled("b", "z")];
        nodes[1].add(&web(json!({})));
        let mut start = 1;
        assert_eq!(
            schedule(&mut nodes, &[web(preferred.clone())], &mut start),
            vec![Ok(0)]
        );
        // ...and used when nothing else fits.
        let mut only = vec![nodes[1].clone()];
        assert_eq!(
            schedule(&mut only, &[web(preferred)], &mut start),
            vec![Ok(0)]
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
            typed::<Pod>(json!({"spec": {"containers": cs, "runtimeClassName": class}}))
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
