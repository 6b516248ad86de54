//! The DaemonSet controller, after Kubernetes' `pkg/controller/daemon`: one pod per eligible
//! node, pinned there by required node affinity on `metadata.name` (the scheduler binds it);
//! template versions kept as ControllerRevisions (`controller-revision-hash` on revisions and
//! pods, history pruned to `revisionHistoryLimit`); `RollingUpdate` within `maxUnavailable`, or
//! with `maxSurge` the new pod first, and `OnDelete`; failed daemon pods replaced with a
//! per-node backoff.
//!
//! A node is eligible (should run the pod) when it matches the template's `nodeSelector` and
//! required node affinity and its NoSchedule and NoExecute taints are tolerated by the template
//! with the tolerations every daemon pod gets; a running pod may stay while only its NoExecute
//! taints are tolerated. Cordoned nodes still get daemon pods: they tolerate
//! `node.kubernetes.io/unschedulable`. Pods on nodes that no longer exist are the pod garbage
//! collector's; pods not yet bound to a node that is gone are deleted here. Orphan pods that
//! match the selector are adopted and pods that stop matching released, as for ReplicaSets.
//! Not done: hash collisions (`collisionCount`).

use k8s_openapi::api::core::v1::Node;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodTemplateSpec, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};
use skiff_api::ApiError;

use super::api::{self, encode};
use super::deployment::{normalized, template_hash};
use super::pods;
use super::replicaset::{now_unix, selector};
use super::runtime::{split_key, Action, Cache, Reconciler};
use super::scheduler::{self, NodeInfo, PodRequest, UNSCHEDULABLE_TAINT};
use crate::registry::{Registry, Sub};

/// The label naming the template version of a revision and of the pods made from it.
pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";
/// The DaemonSet's generation when a pod was made (older clients read it).
pub const TEMPLATE_GENERATION_LABEL: &str = "pod-template-generation";

const MANAGER: &str = "daemonset-controller";

/// First and longest wait before a failed daemon pod on a node is replaced again.
const FAILED_BACKOFF_START: Duration = Duration::from_secs(1);
const FAILED_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

/// The uid of the controller owning an object.
fn controller_uid(m: &ObjectMeta) -> Option<&str> {
    m.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// The tolerations the Kubernetes DaemonSet controller gives every daemon pod, so it keeps
/// running through node trouble and lands on cordoned nodes.
pub fn add_daemon_tolerations(spec: &mut k8s_openapi::api::core::v1::PodSpec) {
    let mut wanted = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        (UNSCHEDULABLE_TAINT, "NoSchedule"),
    ];
    if spec.host_network == Some(true) {
        wanted.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for (key, effect) in wanted {
        let t = Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some(effect.into()),
            ..Default::default()
        };
        // As `AddOrUpdateTolerationInPodSpec`: one matching the same taint is replaced.
        tolerations.retain(|x| {
            !(x.key == t.key
                && x.effect == t.effect
                && x.operator.as_deref().unwrap_or("Equal") == "Exists")
        });
        tolerations.push(t);
    }
}

/// Pins `spec` to `node`: its required node affinity becomes the one term
/// `metadata.name In [node]` (Kubernetes' `ReplaceDaemonSetPodNodeNameNodeAffinity`).
pub fn pin_to_node(spec: &mut k8s_openapi::api::core::v1::PodSpec, node: &str) {
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![node.into()]),
            }]),
            match_expressions: None,
        }],
    });
}

/// The node a daemon pod is for: where it is bound, or where its affinity pins it.
pub fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(n.clone());
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms.iter().find_map(|t| {
        t.match_fields.as_ref()?.iter().find_map(|r| {
            (r.key == "metadata.name" && r.operator == "In")
                .then(|| r.values.as_ref()?.first().cloned())
                .flatten()
        })
    })
}

/// Whether `node` should run the daemon pod, and whether a pod already there may keep
/// running (only NoExecute taints count for that). `pod` is the template as a daemon pod.
pub fn eligibility(node: &NodeInfo, pod: &PodRequest) -> (bool, bool) {
    if !scheduler::node_matches(node, pod) {
        return (false, false);
    }
    let run = scheduler::tolerates_taints(node, &pod.tolerations, &["NoSchedule", "NoExecute"]);
    let keep = scheduler::tolerates_taints(node, &pod.tolerations, &["NoExecute"]);
    (run, keep)
}

/// The revision data of a template: the strategic merge patch that restores it (what
/// `kubectl rollout undo` sends back).
pub fn revision_data(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(m) = t.as_object_mut() {
        m.insert("$patch".into(), json!("replace"));
    }
    json!({"spec": {"template": t}})
}

/// The template a revision's data restores, comparable with [`normalized`] templates.
fn revision_template(rev: &ControllerRevision) -> Option<Value> {
    // A revision's data is free-form JSON (a RawExtension): this controller wrote it as a patch.
    let mut t = rev.data.0.pointer("/spec/template")?.clone();
    t.as_object_mut()?.remove("$patch");
    Some(normalized(&t))
}

/// Which old revisions to delete to keep at most `limit`: those no live pod uses, oldest
/// first. `revs` are (name, revision, hash); `current` is the current revision's name.
pub fn revisions_to_prune(
    revs: &[(String, i64, String)],
    current: &str,
    in_use: &[String],
    limit: usize,
) -> Vec<String> {
    let mut old: Vec<&(String, i64, String)> = revs
        .iter()
        .filter(|(n, _, h)| n != current && !in_use.contains(h))
        .collect();
    if old.len() <= limit {
        return Vec::new();
    }
    old.sort_by_key(|(_, r, _)| *r);
    let excess = old.len() - limit;
    old.into_iter()
        .take(excess)
        .map(|(n, _, _)| n.clone())
        .collect()
}

/// What the rollout needs to know of one daemon pod.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonPod {
    pub name: String,
    /// Made from the current template.
    pub updated: bool,
    pub ready: bool,
    pub available: bool,
    pub deleting: bool,
    pub phase: String,
    pub created: String,
}

impl DaemonPod {
    fn from_pod(p: &Pod, hash: &str, generation: i64, min_ready: i64, now: i64) -> DaemonPod {
        let no_labels = BTreeMap::new();
        let labels = p.metadata.labels.as_ref().unwrap_or(&no_labels);
        DaemonPod {
            name: p.metadata.name.clone().unwrap_or_default(),
            updated: labels.get(REVISION_HASH_LABEL).map(String::as_str) == Some(hash)
                || (!labels.contains_key(REVISION_HASH_LABEL)
                    && labels.get(TEMPLATE_GENERATION_LABEL) == Some(&generation.to_string())),
            ready: pods::is_ready(p),
            available: pods::is_available(p, min_ready, now),
            deleting: p.metadata.deletion_timestamp.is_some(),
            phase: p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default(),
            created: p
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
        }
    }
}

/// One node as the controller sees it.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub name: String,
    /// The node exists.
    pub exists: bool,
    pub should_run: bool,
    pub should_continue: bool,
    /// Its daemon pods, oldest first.
    pub pods: Vec<DaemonPod>,
}

/// What one pass does.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Nodes that get a new pod.
    pub create: Vec<String>,
    /// Pods to delete.
    pub delete: Vec<String>,
    /// Failed pods found, with their node: deleted (and replaced) as the backoff allows.
    pub failed: Vec<(String, String)>,
}

/// One pod per node that should run one (Kubernetes' `podsShouldBeOnNode`): nodes without a
/// pod get one; extra pods go (with surge, the oldest updated and the oldest old pod stay
/// until the updated one is available); finished pods go; nodes that may no longer run the
/// pod lose it.
pub fn manage(nodes: &[NodeState], surge: bool) -> Plan {
    let mut plan = Plan::default();
    for n in nodes {
        if !n.exists {
            // Pods pinned to a node that is gone will never be bound.
            plan.delete.extend(
                n.pods
                    .iter()
                    .filter(|p| !p.deleting)
                    .map(|p| p.name.clone()),
            );
            continue;
        }
        if n.should_run && n.pods.is_empty() {
            plan.create.push(n.name.clone());
            continue;
        }
        if !n.should_continue {
            plan.delete.extend(
                n.pods
                    .iter()
                    .filter(|p| !p.deleting)
                    .map(|p| p.name.clone()),
            );
            continue;
        }
        let mut running = Vec::new();
        for p in n.pods.iter().filter(|p| !p.deleting) {
            match p.phase.as_str() {
                "Failed" => plan.failed.push((n.name.clone(), p.name.clone())),
                "Succeeded" => plan.delete.push(p.name.clone()),
                _ => running.push(p),
            }
        }
        if !surge {
            plan.delete
                .extend(running.iter().skip(1).map(|p| p.name.clone()));
            continue;
        }
        let mut oldest_new = None;
        let mut oldest_old = None;
        for p in running {
            let slot = if p.updated {
                &mut oldest_new
            } else {
                &mut oldest_old
            };
            if slot.is_none() {
                *slot = Some(p);
            } else {
                plan.delete.push(p.name.clone());
            }
        }
        if let (Some(new), Some(old)) = (oldest_new, oldest_old) {
            if !old.ready || new.available {
                plan.delete.push(old.name.clone());
            }
        }
    }
    plan
}

/// The updated and the old pod on a node, or None when there are several of one kind
/// (Kubernetes' `findUpdatedPodsOnNode`).
fn updated_and_old(n: &NodeState) -> Option<(Option<&DaemonPod>, Option<&DaemonPod>)> {
    let (mut new, mut old) = (None, None);
    for p in n.pods.iter().filter(|p| !p.deleting) {
        let slot = if p.updated { &mut new } else { &mut old };
        if slot.is_some() {
            return None;
        }
        *slot = Some(p);
    }
    Some((new, old))
}

/// One step of a rolling update (Kubernetes' `rollingUpdate`). Without surge: old pods are
/// deleted while at most `max_unavailable` nodes lack an available pod (unavailable old pods
/// at once); [`manage`] then makes their replacements. With surge: new pods start beside
/// old ones on at most `max_surge` nodes, and an old pod goes once its replacement is
/// available.
pub fn rolling_update(nodes: &[NodeState], max_surge: i64, max_unavailable: i64) -> Plan {
    let mut plan = Plan::default();
    let nodes = nodes.iter().filter(|n| n.exists && !n.pods.is_empty());
    if max_surge == 0 {
        let mut unavailable = 0;
        let mut replace = Vec::new();
        let mut candidates = Vec::new();
        for n in nodes {
            let Some((new, old)) = updated_and_old(n) else {
                unavailable += 1;
                continue;
            };
            match (new, old) {
                (None, None) | (Some(_), Some(_)) => unavailable += 1,
                (Some(new), None) => {
                    if !new.available {
                        unavailable += 1;
                    }
                }
                (None, Some(old)) => {
                    if !old.available {
                        replace.push(old.name.clone());
                    } else if unavailable < max_unavailable {
                        candidates.push(old.name.clone());
                    }
                }
            }
        }
        let room = (max_unavailable - unavailable).clamp(0, candidates.len() as i64) as usize;
        plan.delete = replace;
        plan.delete.extend(candidates.into_iter().take(room));
        return plan;
    }
    let mut surged = 0;
    let mut allowed = Vec::new();
    let mut candidates = Vec::new();
    for n in nodes {
        let Some((new, old)) = updated_and_old(n) else {
            surged += 1;
            continue;
        };
        match (new, old) {
            (_, None) => {}
            (None, Some(old)) => {
                if !n.should_run {
                    continue;
                }
                if !old.available {
                    allowed.push(n.name.clone());
                } else if surged < max_surge {
                    candidates.push(n.name.clone());
                }
            }
            (Some(new), Some(old)) => {
                if new.available {
                    plan.delete.push(old.name.clone());
                } else {
                    surged += 1;
                }
            }
        }
    }
    let room = (max_surge - surged).clamp(0, candidates.len() as i64) as usize;
    plan.create = allowed;
    plan.create.extend(candidates.into_iter().take(room));
    plan
}

/// Resolves an int-or-percent against `total`, rounding up (as the DaemonSet controller does).
fn scaled(v: Option<&IntOrString>, total: i64, default: i64) -> i64 {
    match v {
        None => default,
        Some(IntOrString::Int(i)) => i64::from(*i),
        Some(IntOrString::String(s)) => {
            let p: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            (p * total + 99) / 100
        }
    }
}

/// (maxSurge, maxUnavailable) of a rolling DaemonSet over `desired` nodes; never both zero.
pub fn surge_and_unavailable(ds: &DaemonSet, desired: i64) -> (i64, i64) {
    let ru = ds
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let surge = scaled(ru.and_then(|r| r.max_surge.as_ref()), desired, 0);
    let mut unavailable = scaled(ru.and_then(|r| r.max_unavailable.as_ref()), desired, 1);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable)
}

fn is_on_delete(ds: &DaemonSet) -> bool {
    ds.spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        == Some("OnDelete")
}

pub struct DaemonSetController {
    pub reg: Arc<Registry>,
    pub daemonsets: Arc<Cache<DaemonSet>>,
    pub pods: Arc<Cache<Pod>>,
    pub nodes: Arc<Cache<Node>>,
    pub revisions: Arc<Cache<ControllerRevision>>,
    /// Revisions of this controller's last pod and revision writes per key.
    expect: Mutex<HashMap<String, (u64, u64)>>,
    /// Per DaemonSet and node: failed pods replaced so far and when the next may be.
    backoff: Mutex<HashMap<(String, String), (u32, Instant)>>,
}

impl DaemonSetController {
    pub fn new(
        reg: Arc<Registry>,
        daemonsets: Arc<Cache<DaemonSet>>,
        pods: Arc<Cache<Pod>>,
        nodes: Arc<Cache<Node>>,
        revisions: Arc<Cache<ControllerRevision>>,
    ) -> Self {
        DaemonSetController {
            reg,
            daemonsets,
            pods,
            nodes,
            revisions,
            expect: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
        }
    }

    fn note(&self, key: &str, pods_rev: u64, revs_rev: u64) {
        if pods_rev == 0 && revs_rev == 0 {
            return;
        }
        let mut e = self.expect.lock().expect("expect");
        let cur = e.entry(key.to_string()).or_insert((0, 0));
        cur.0 = cur.0.max(pods_rev);
        cur.1 = cur.1.max(revs_rev);
    }

    /// The current revision (made or renumbered as needed) and the revisions of this
    /// DaemonSet. Returns (hash, revision number, revisions, last write's revision).
    fn sync_revisions(
        &self,
        ds: &DaemonSet,
        template: &Value,
    ) -> Result<(String, Vec<ControllerRevision>, u64), ApiError> {
        let ns = ds.metadata.namespace.as_deref();
        let uid = ds.metadata.uid.as_deref().unwrap_or("");
        let name = ds.metadata.name.as_deref().unwrap_or("");
        let mut revs: Vec<ControllerRevision> = self
            .revisions
            .list(ns)
            .iter()
            .filter(|v| controller_uid(&v.metadata) == Some(uid))
            .map(|v| (**v).clone())
            .collect();
        let want = normalized(template);
        let max = revs.iter().filter_map(|r| r.revision).max().unwrap_or(0);
        let mut last = 0;
        let hash = match revs
            .iter_mut()
            .find(|r| revision_template(r).as_ref() == Some(&want))
        {
            Some(cur) => {
                // A template seen before (a rollback): its revision becomes the newest.
                if cur.revision.unwrap_or(0) < max {
                    cur.revision = Some(max + 1);
                    *cur = api::update(&self.reg, &*cur)?;
                    last = api::revision(&cur.metadata);
                }
                cur.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(REVISION_HASH_LABEL).cloned())
                    .unwrap_or_else(|| template_hash(&want))
            }
            None => {
                let hash = template_hash(&want);
                let mut labels: BTreeMap<String, String> = ds
                    .spec
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default();
                labels.insert(REVISION_HASH_LABEL.into(), hash.clone());
                let rev = ControllerRevision {
                    metadata: ObjectMeta {
                        name: Some(format!("{name}-{hash}")),
                        namespace: ns.map(String::from),
                        labels: Some(labels),
                        annotations: ds.metadata.annotations.clone().map(|mut a| {
                            a.remove("kubectl.kubernetes.io/last-applied-configuration");
                            a.remove("deprecated.daemonset.template.generation");
                            a
                        }),
                        owner_references: Some(vec![pods::controller_ref(ds)]),
                        ..Default::default()
                    },
                    data: RawExtension(revision_data(template)),
                    revision: Some(max + 1),
                };
                match api::create(&self.reg, ns, &rev) {
                    Ok(out) => {
                        last = api::revision(&out.metadata);
                        revs.push(out);
                    }
                    // Made by an earlier pass the cache has not shown yet.
                    Err(e) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
                hash
            }
        };
        Ok((hash, revs, last))
    }
}

impl Reconciler for DaemonSetController {
    fn name(&self) -> &'static str {
        "daemonset"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let want = self.expect.lock().expect("expect").get(key).copied();
        if let Some((p, r)) = want {
            if p > 0 {
                self.pods.wait_for(p).await;
            }
            if r > 0 {
                self.revisions.wait_for(r).await;
            }
        }
        let Some(ds) = self.daemonsets.get(key) else {
            self.expect.lock().expect("expect").remove(key);
            let prefix = (key.to_string(), String::new());
            self.backoff
                .lock()
                .expect("backoff")
                .retain(|k, _| k.0 != prefix.0);
            return Ok(Action::AwaitChange);
        };
        if ds.metadata.deletion_timestamp.is_some() {
            return Ok(Action::AwaitChange);
        }
        let (ns, _) = split_key(key);
        let spec = ds.spec.clone();
        let generation = ds.metadata.generation.unwrap_or(0);
        let template = encode(&spec.template)?;
        let (hash, revs, revs_rev) = self.sync_revisions(&ds, &template)?;
        self.note(key, 0, revs_rev);

        // The template as a daemon pod, for eligibility.
        let mut daemon_template: PodTemplateSpec = spec.template.clone();
        let pod_spec = daemon_template.spec.get_or_insert_with(Default::default);
        add_daemon_tolerations(pod_spec);
        let request = PodRequest::from_pod(&Pod {
            metadata: ObjectMeta {
                namespace: ns.map(String::from),
                ..Default::default()
            },
            spec: daemon_template.spec.clone(),
            status: None,
        });

        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        let now = now_unix();
        let uid = ds.metadata.uid.clone().unwrap_or_default();
        let mut by_node: BTreeMap<String, Vec<(DaemonPod, Arc<Pod>)>> = BTreeMap::new();
        let selector = selector(&spec.selector)?;
        let mut claimed = 0;
        let no_labels = BTreeMap::new();
        for mut p in self.pods.list(ns) {
            let controller = controller_uid(&p.metadata).map(String::from);
            let matches = !selector.is_empty()
                && selector.matches(p.metadata.labels.as_ref().unwrap_or(&no_labels));
            let ours = controller.as_deref() == Some(uid.as_str());
            let pod_name = p.metadata.name.clone().unwrap_or_default();
            let refs: Vec<OwnerReference> = p.metadata.owner_references.clone().unwrap_or_default();
            // As Kubernetes' ControllerRefManager: adopt matching orphans, release pods
            // that no longer match.
            if ours && !matches && !selector.is_empty() {
                let left: Vec<&OwnerReference> = refs.iter().filter(|o| o.uid != uid).collect();
                let body = json!({"metadata": {"ownerReferences": left,
                    "resourceVersion": p.metadata.resource_version}});
                if let Ok(o) = api::patch::<Pod>(&self.reg, ns, &pod_name, &body, Sub::Main) {
                    claimed = claimed.max(api::revision(&o.metadata));
                }
                continue;
            }
            if !ours {
                if controller.is_some() || !matches || !pods::is_active(&p) {
                    continue;
                }
                let mut refs = refs;
                refs.push(pods::controller_ref(&*ds));
                let body = json!({"metadata": {"ownerReferences": refs,
                    "resourceVersion": p.metadata.resource_version}});
                match api::patch::<Pod>(&self.reg, ns, &pod_name, &body, Sub::Main) {
                    Ok(o) => {
                        claimed = claimed.max(api::revision(&o.metadata));
                        p = Arc::new(o);
                    }
                    Err(_) => continue,
                }
            }
            if let Some(node) = target_node(&p) {
                let facts = DaemonPod::from_pod(&p, &hash, generation, min_ready, now);
                by_node.entry(node).or_default().push((facts, p));
            }
        }
        let mut states = Vec::new();
        for n in self.nodes.list(None) {
            let info = NodeInfo::from_node(&n);
            let (should_run, should_continue) = eligibility(&info, &request);
            let mut pods: Vec<(DaemonPod, Arc<Pod>)> =
                by_node.remove(&info.name).unwrap_or_default();
            pods.sort_by(|a, b| a.0.created.cmp(&b.0.created).then(a.0.name.cmp(&b.0.name)));
            states.push((
                NodeState {
                    name: info.name.clone(),
                    exists: true,
                    should_run,
                    should_continue,
                    pods: pods.iter().map(|p| p.0.clone()).collect(),
                },
                pods,
            ));
        }
        for (node, pods) in by_node {
            // Pods of nodes that are gone: the unbound ones are deleted here.
            let unbound: Vec<DaemonPod> = pods
                .iter()
                .filter(|p| {
                    p.1.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .is_none_or(str::is_empty)
                })
                .map(|p| p.0.clone())
                .collect();
            states.push((
                NodeState {
                    name: node,
                    exists: false,
                    should_run: false,
                    should_continue: false,
                    pods: unbound,
                },
                Vec::new(),
            ));
        }
        let nodes: Vec<NodeState> = states.iter().map(|s| s.0.clone()).collect();
        let desired = nodes.iter().filter(|n| n.should_run).count() as i64;
        let (max_surge, max_unavailable) = surge_and_unavailable(&ds, desired);
        let rolling = !is_on_delete(&ds);
        let surge = rolling && max_surge > 0;

        let mut plan = manage(&nodes, surge);
        let mut requeue: Option<Duration> = None;
        // Failed pods: deleted when the node's backoff allows, then replaced next pass.
        {
            let mut backoff = self.backoff.lock().expect("backoff");
            let at = Instant::now();
            for (node, pod) in std::mem::take(&mut plan.failed) {
                let k = (key.to_string(), node.clone());
                match backoff.get(&k).copied() {
                    Some((_, until)) if until > at => {
                        let wait = until - at;
                        requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
                    }
                    prev => {
                        let n = prev.map_or(0, |p| p.0 + 1);
                        let wait = FAILED_BACKOFF_START
                            .saturating_mul(1 << n.min(10))
                            .min(FAILED_BACKOFF_MAX);
                        backoff.insert(k, (n, at + wait));
                        super::events::record(
                            &self.reg,
                            &*ds,
                            "Warning",
                            "FailedDaemonPod",
                            &format!(
                                "Found failed daemon pod {}/{pod} on node {node}, will try to kill it",
                                ns.unwrap_or("default")
                            ),
                            MANAGER,
                        );
                        plan.delete.push(pod);
                    }
                }
            }
        }
        // The rollout moves on only from a pass that changed nothing, as Kubernetes waits
        // for its expectations.
        if rolling && plan.create.is_empty() && plan.delete.is_empty() {
            let step = rolling_update(&nodes, max_surge, max_unavailable);
            plan.create = step.create;
            plan.delete = step.delete;
        }

        let mut last = claimed;
        let mut result = Ok(());
        for node in &plan.create {
            let mut t = spec.template.clone();
            let meta_t = t.metadata.get_or_insert_with(ObjectMeta::default);
            let labels = meta_t.labels.get_or_insert_with(BTreeMap::new);
            labels.insert(REVISION_HASH_LABEL.into(), hash.clone());
            labels.insert(TEMPLATE_GENERATION_LABEL.into(), generation.to_string());
            let pod_spec = t.spec.get_or_insert_with(Default::default);
            add_daemon_tolerations(pod_spec);
            pin_to_node(pod_spec, node);
            let pod = pods::from_template(&*ds, &t);
            match api::create(&self.reg, ns, &pod) {
                Ok(p) => {
                    last = last.max(api::revision(&p.metadata));
                    super::events::record(
                        &self.reg,
                        &*ds,
                        "Normal",
                        "SuccessfulCreate",
                        &format!("Created pod: {}", p.metadata.name.as_deref().unwrap_or("")),
                        MANAGER,
                    );
                }
                Err(e) => {
                    super::events::record(
                        &self.reg,
                        &*ds,
                        "Warning",
                        "FailedCreate",
                        &format!("Error creating: {}", e.message),
                        MANAGER,
                    );
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            for pod in &plan.delete {
                match api::delete::<Pod>(&self.reg, ns, pod, &Default::default()) {
                    Ok(rev) => {
                        last = last.max(rev);
                        super::events::record(
                            &self.reg,
                            &*ds,
                            "Normal",
                            "SuccessfulDelete",
                            &format!("Deleted pod: {pod}"),
                            MANAGER,
                        );
                    }
                    Err(e) if e.code == 404 => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        self.note(key, last, 0);
        result?;

        // History: old revisions no live pod uses, beyond the limit.
        let in_use: Vec<String> = states
            .iter()
            .flat_map(|s| s.1.iter())
            .filter(|p| p.1.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                p.1.metadata
                    .labels
                    .as_ref()?
                    .get(REVISION_HASH_LABEL)
                    .cloned()
            })
            .collect();
        let listed: Vec<(String, i64, String)> = revs
            .iter()
            .map(|r| {
                let h = r
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(REVISION_HASH_LABEL).cloned())
                    .unwrap_or_default();
                (
                    r.metadata.name.clone().unwrap_or_default(),
                    r.revision.unwrap_or(0),
                    h,
                )
            })
            .collect();
        let current = listed
            .iter()
            .find(|r| r.2 == hash)
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        for n in revisions_to_prune(&listed, &current, &in_use, limit) {
            match api::delete::<ControllerRevision>(&self.reg, ns, &n, &Default::default()) {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }

        // Status, from the pods as they are now (Kubernetes' `updateDaemonSetStatus`).
        let mut status = DaemonSetStatus {
            observed_generation: ds.metadata.generation,
            collision_count: ds.status.as_ref().and_then(|s| s.collision_count),
            conditions: ds.status.as_ref().and_then(|s| s.conditions.clone()),
            ..Default::default()
        };
        let mut waiting_for_available = false;
        for (n, pods) in states.iter().filter(|s| s.0.exists) {
            let live: Vec<&DaemonPod> = pods
                .iter()
                .map(|p| &p.0)
                .filter(|p| !p.deleting && p.phase != "Succeeded" && p.phase != "Failed")
                .collect();
            if n.should_run {
                status.desired_number_scheduled += 1;
                let Some(p) = live.first() else {
                    continue;
                };
                status.current_number_scheduled += 1;
                if p.ready {
                    status.number_ready += 1;
                    if p.available {
                        *status.number_available.get_or_insert(0) += 1;
                    } else {
                        waiting_for_available = true;
                    }
                }
                if p.updated {
                    *status.updated_number_scheduled.get_or_insert(0) += 1;
                }
            } else if !live.is_empty() {
                status.number_misscheduled += 1;
            }
        }
        let available = status.number_available.unwrap_or(0);
        status.number_available = Some(available);
        status.updated_number_scheduled = Some(status.updated_number_scheduled.unwrap_or(0));
        status.number_unavailable = Some(status.desired_number_scheduled - available);
        let next_status = encode(&status)?;
        let zeroed = |v: &Value| normalized(&json!({ "s": v }));
        if zeroed(&encode(&ds.status)?) != zeroed(&next_status) {
            match api::update_status(&self.reg, &*ds, &status) {
                Ok(_) => {}
                // A newer DaemonSet is on its way; its change requeues the key.
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        if waiting_for_available {
            let wait = Duration::from_secs(1);
            requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
        }
        Ok(match requeue {
            Some(d) => Action::RequeueAfter(d),
            None => Action::AwaitChange,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, taints: Value, labels: Value) -> NodeInfo {
        NodeInfo::from_node(
            &serde_json::from_value(
                json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
            "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}),
            )
            .unwrap(),
        )
    }

    fn daemon_request(spec: Value) -> PodRequest {
        let mut t: PodTemplateSpec = serde_json::from_value(json!({"spec": spec})).unwrap();
        add_daemon_tolerations(t.spec.as_mut().unwrap());
        PodRequest::from_pod(&Pod {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: t.spec,
            status: None,
        })
    }

    #[test]
    fn eligibility_follows_selector_affinity_and_taints() {
        let plain = daemon_request(json!({"containers": [{"name": "c", "image": "i"}]}));
        let a = node("a", json!([]), json!({"disk": "ssd"}));
        assert_eq!(eligibility(&a, &plain), (true, true));
        let picky = daemon_request(
            json!({"containers": [{"name": "c", "image": "i"}], "nodeSelector": {"disk": "ssd"}}),
        );
        assert_eq!(eligibility(&a, &picky), (true, true));
        let b = node("b", json!([]), json!({"disk": "hdd"}));
        assert_eq!(eligibility(&b, &picky), (false, false));
        let affine = daemon_request(json!({"containers": [], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "NotIn", "values": ["ssd"]}]}]}}}}));
        assert_eq!(eligibility(&a, &affine), (false, false));
        assert_eq!(eligibility(&b, &affine), (true, true));

        // A NoSchedule taint: no new pod, but a running one stays; NoExecute: neither.
        let dedicated = node(
            "c",
            json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
            json!({}),
        );
        assert_eq!(eligibility(&dedicated, &plain), (false, true));
        let evicting = node(
            "d",
            json!([{"key": "dedicated", "value": "gpu", "effect": "NoExecute"}]),
            json!({}),
        );
        assert_eq!(eligibility(&evicting, &plain), (false, false));
        let tolerant = daemon_request(json!({"containers": [], "tolerations": [
            {"key": "dedicated", "operator": "Exists"}]}));
        assert_eq!(eligibility(&evicting, &tolerant), (true, true));

        // The tolerations every daemon pod gets: node trouble and cordons do not keep it off.
        for (key, effect) in [
            ("node.kubernetes.io/not-ready", "NoExecute"),
            ("node.kubernetes.io/unreachable", "NoExecute"),
            ("node.kubernetes.io/disk-pressure", "NoSchedule"),
            ("node.kubernetes.io/memory-pressure", "NoSchedule"),
            ("node.kubernetes.io/pid-pressure", "NoSchedule"),
            ("node.kubernetes.io/unschedulable", "NoSchedule"),
        ] {
            let n = node("e", json!([{"key": key, "effect": effect}]), json!({}));
            assert_eq!(eligibility(&n, &plain), (true, true), "{key}");
        }
        let no_net = node(
            "f",
            json!([{"key": "node.kubernetes.io/network-unavailable", "effect": "NoSchedule"}]),
            json!({}),
        );
        assert_eq!(eligibility(&no_net, &plain), (false, true));
        let host = daemon_request(json!({"containers": [], "hostNetwork": true}));
        assert_eq!(eligibility(&no_net, &host), (true, true));
    }

    #[test]
    fn pods_are_pinned_by_match_fields() {
        let mut t: PodTemplateSpec = serde_json::from_value(json!({"spec": {"containers": [],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}}}))
        .unwrap();
        let spec = t.spec.as_mut().unwrap();
        pin_to_node(spec, "n1");
        let pod = Pod {
            spec: Some(spec.clone()),
            ..Default::default()
        };
        assert_eq!(target_node(&pod).as_deref(), Some("n1"));
        let terms = &pod.spec.as_ref().unwrap().affinity.as_ref().unwrap();
        let terms = terms.node_affinity.as_ref().unwrap();
        let terms = &terms
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms;
        assert_eq!(
            serde_json::to_value(terms).unwrap(),
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}])
        );
        let req = PodRequest::from_pod(&pod);
        assert!(scheduler::node_matches(
            &node("n1", json!([]), json!({})),
            &req
        ));
        assert!(!scheduler::node_matches(
            &node("n2", json!([]), json!({})),
            &req
        ));
    }

    fn dp(name: &str, updated: bool, available: bool) -> DaemonPod {
        DaemonPod {
            name: name.into(),
            updated,
            ready: available,
            available,
            deleting: false,
            phase: "Running".into(),
            created: name.into(),
        }
    }

    fn ns(name: &str, pods: Vec<DaemonPod>) -> NodeState {
        NodeState {
            name: name.into(),
            exists: true,
            should_run: true,
            should_continue: true,
            pods,
        }
    }

    #[test]
    fn manage_keeps_one_pod_per_eligible_node() {
        let mut off = ns("c", vec![dp("c1", true, true)]);
        off.should_run = false;
        off.should_continue = false;
        let mut failed = dp("d1", true, false);
        failed.phase = "Failed".into();
        let mut gone = ns("x", vec![dp("x1", true, false)]);
        gone.exists = false;
        let nodes = vec![
            ns("a", vec![]),
            ns("b", vec![dp("b1", true, true), dp("b2", true, true)]),
            off,
            ns("d", vec![failed]),
            gone,
        ];
        let plan = manage(&nodes, false);
        assert_eq!(plan.create, vec!["a"]);
        assert_eq!(plan.delete, vec!["b2", "c1", "x1"]);
        assert_eq!(plan.failed, vec![("d".to_string(), "d1".to_string())]);
        // A terminating pod holds its node until it is gone.
        let mut t = dp("e1", false, true);
        t.deleting = true;
        assert_eq!(manage(&[ns("e", vec![t])], false), Plan::default());
    }

    #[test]
    fn rolling_update_stays_within_max_unavailable() {
        let old = |n: &str| ns(n, vec![dp(&format!("{n}-old"), false, true)]);
        let nodes = vec![old("a"), old("b"), old("c"), old("d")];
        assert_eq!(rolling_update(&nodes, 0, 1).delete, vec!["a-old"]);
        assert_eq!(rolling_update(&nodes, 0, 2).delete, vec!["a-old", "b-old"]);
        // A new pod not yet available counts against the budget.
        let mut nodes2 = nodes.clone();
        nodes2[0] = ns("a", vec![dp("a-new", true, false)]);
        assert!(rolling_update(&nodes2, 0, 1).delete.is_empty());
        assert_eq!(rolling_update(&nodes2, 0, 2).delete, vec!["b-old"]);
        // Unavailable old pods are replaced whatever the budget.
        nodes2[2] = ns("c", vec![dp("c-old", false, false)]);
        assert_eq!(rolling_update(&nodes2, 0, 1).delete, vec!["c-old"]);
        // Done: nothing to do.
        let done: Vec<NodeState> = ["a", "b"]
            .iter()
            .map(|n| ns(n, vec![dp(n, true, true)]))
            .collect();
        assert_eq!(rolling_update(&done, 0, 1), Plan::default());
    }

    #[test]
    fn surge_starts_new_pods_before_old_ones_go() {
        let old = |n: &str| ns(n, vec![dp(&format!("{n}-old"), false, true)]);
        let nodes = vec![old("a"), old("b"), old("c")];
        let plan = rolling_update(&nodes, 1, 0);
        assert_eq!((plan.create, plan.delete), (vec!["a".to_string()], vec![]));
        // The new pod is not available yet: the old stays, no other node surges.
        let mut nodes = nodes.clone();
        nodes[0] = ns(
            "a",
            vec![dp("a-old", false, true), dp("a-new", true, false)],
        );
        assert_eq!(rolling_update(&nodes, 1, 0), Plan::default());
        assert!(manage(&nodes, true).delete.is_empty());
        // Once available, the old pod goes.
        nodes[0] = ns("a", vec![dp("a-old", false, true), dp("a-new", true, true)]);
        assert_eq!(rolling_update(&nodes, 1, 0).delete, vec!["a-old"]);
        assert_eq!(manage(&nodes, true).delete, vec!["a-old"]);
    }

    #[test]
    fn max_values_resolve_against_desired_nodes() {
        let ds = |ru: Value| -> DaemonSet {
            serde_json::from_value(json!({"metadata": {"name": "d"}, "spec": {
                "selector": {}, "template": {}, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": ru}}}))
            .unwrap()
        };
        assert_eq!(surge_and_unavailable(&ds(json!({})), 10), (0, 1));
        assert_eq!(
            surge_and_unavailable(&ds(json!({"maxUnavailable": "25%"})), 10),
            (0, 3)
        );
        assert_eq!(
            surge_and_unavailable(&ds(json!({"maxSurge": "10%", "maxUnavailable": 0})), 10),
            (1, 0)
        );
        assert_eq!(
            surge_and_unavailable(&ds(json!({"maxSurge": 0, "maxUnavailable": 0})), 10),
            (0, 1)
        );
    }

    #[test]
    fn revisions_hash_and_history() {
        let t1 = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "v1"}]}});
        let t2 = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "v2"}]}});
        assert_ne!(
            template_hash(&normalized(&t1)),
            template_hash(&normalized(&t2))
        );
        // Zero values do not change the hash (protobuf and JSON clients agree).
        let t1z = skiff_api::patch::strategic_merge(&t1, &json!({"spec": {"hostNetwork": false}}));
        assert_eq!(
            template_hash(&normalized(&t1)),
            template_hash(&normalized(&t1z))
        );
        // The data restores the template as a strategic merge patch, and reads back.
        let data = revision_data(&t1);
        assert_eq!(
            data.pointer("/spec/template/$patch"),
            Some(&json!("replace")),
            "a revision's data is free-form JSON: a strategic merge patch"
        );
        let rev = ControllerRevision {
            data: RawExtension(data.clone()),
            ..Default::default()
        };
        assert_eq!(revision_template(&rev), Some(normalized(&t1)));
        let restored = skiff_api::patch::strategic_merge(&json!({"spec": {"template": t2}}), &data);
        assert_eq!(restored["spec"]["template"], t1);

        let revs: Vec<(String, i64, String)> = (1..=5)
            .map(|i| (format!("r{i}"), i, format!("h{i}")))
            .collect();
        // Current r5; r2 is still used by a pod; keep 2 of the rest: r1 goes (oldest unused).
        assert_eq!(
            revisions_to_prune(&revs, "r5", &["h2".into()], 2),
            vec!["r1"]
        );
        assert_eq!(
            revisions_to_prune(&revs, "r5", &[], 1),
            vec!["r1", "r2", "r3"]
        );
        assert!(revisions_to_prune(&revs, "r5", &[], 10).is_empty());
    }
}
