//! The StatefulSet controller, after Kubernetes' `pkg/controller/statefulset`: pods
//! `NAME-0..N-1` with stable names, hostnames (`hostname` = pod name, `subdomain` =
//! `serviceName`) and one PersistentVolumeClaim per claim template and ordinal
//! (`TEMPLATE-NAME-ORDINAL`). `OrderedReady` creates in order, each pod Running and Ready
//! before the next, and removes in reverse, one at a time; `Parallel` does both at once.
//! `RollingUpdate` replaces pods from the highest ordinal down to `partition`, one at a time;
//! `OnDelete` waits for the user. A revision is a hash of the pod template (label
//! `controller-revision-hash`, `status.currentRevision`/`updateRevision`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};
use skiff_api::ApiError;

use super::api;
use super::pods;
use super::replicaset::now_unix;
use super::runtime::{split_key, Action, Cache, Reconciler};
use crate::registry::Registry;

pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
pub const REVISION_LABEL: &str = "controller-revision-hash";

#[derive(Debug, Default, Clone, Copy)]
struct Expect {
    pods: u64,
    claims: u64,
}

pub struct StatefulSetController {
    pub reg: Arc<Registry>,
    pub sets: Arc<Cache<StatefulSet>>,
    pub pods: Arc<Cache<Pod>>,
    pub claims: Arc<Cache<PersistentVolumeClaim>>,
    /// Revision of this controller's last pod and claim write per key: the next reconcile
    /// waits until the caches have seen them.
    expect: Mutex<HashMap<String, Expect>>,
    /// The pod templates of each set's current and update revisions as seen by this process:
    /// a pod below the partition is made again at the current revision.
    templates: Mutex<HashMap<String, HashMap<String, PodTemplateSpec>>>,
}

/// `NAME-ORDINAL` → ORDINAL, when the pod is one of `set`'s.
pub fn ordinal_of(set: &str, pod: &str) -> Option<usize> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

/// The revision name of a template: `NAME-HASH`, a hash of the pod template.
pub fn revision_of(set: &StatefulSet) -> String {
    let t = serde_json::to_vec(&set.spec.template).unwrap_or_default();
    let h = Sha256::digest(&t);
    let hex: String = h.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", set.metadata.name.as_deref().unwrap_or(""))
}

/// The claim name of template `tmpl` for `set`'s pod `ordinal`.
pub fn claim_name(tmpl: &str, set: &str, ordinal: usize) -> String {
    format!("{tmpl}-{set}-{ordinal}")
}

fn owner_ref(set: &StatefulSet) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "StatefulSet".into(),
        name: set.metadata.name.clone().unwrap_or_default(),
        uid: set.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The pod of `ordinal` at the set's current template (revision `rev`).
pub fn new_pod(set: &StatefulSet, ordinal: usize, rev: &str) -> Pod {
    let name = set.metadata.name.clone().unwrap_or_default();
    let pod_name = format!("{name}-{ordinal}");
    let tmpl = &set.spec.template;
    let tmeta = tmpl.metadata.clone().unwrap_or_default();
    let mut labels = tmeta.labels.clone().unwrap_or_default();
    labels.insert(POD_NAME_LABEL.into(), pod_name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
    labels.insert(REVISION_LABEL.into(), rev.into());
    let mut spec = tmpl.spec.clone().unwrap_or_default();
    spec.hostname = Some(pod_name.clone());
    if !set.spec.service_name.as_deref().unwrap_or("").is_empty() {
        spec.subdomain = set.spec.service_name.clone();
    }
    // Each claim template becomes a volume of the pod's own claim.
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for t in set.spec.volume_claim_templates.iter().flatten() {
        let tname = t.metadata.name.clone().unwrap_or_default();
        volumes.retain(|v| v.name != tname);
        volumes.push(Volume {
            name: tname.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&tname, &name, ordinal),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    if volumes.is_empty() {
        spec.volumes = None;
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name),
            namespace: set.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: tmeta.annotations.clone(),
            owner_references: Some(vec![owner_ref(set)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The pod of `ordinal` at an older revision, made from `sibling`, a live pod of that revision
/// (the template of a revision is not kept otherwise): its spec and labels, with this
/// ordinal's name, hostname and claims.
pub fn pod_like(set: &StatefulSet, sibling: &Pod, ordinal: usize) -> Pod {
    let rev = revision_label(sibling).to_string();
    let mut pod = new_pod(set, ordinal, &rev);
    let mut spec = sibling.spec.clone().unwrap_or_default();
    let fresh = pod.spec.take().unwrap_or_default();
    spec.node_name = None;
    spec.hostname = fresh.hostname;
    spec.subdomain = fresh.subdomain;
    let name = set.metadata.name.as_deref().unwrap_or("");
    for v in spec.volumes.iter_mut().flatten() {
        let is_template = set
            .spec
            .volume_claim_templates
            .iter()
            .flatten()
            .any(|t| t.metadata.name.as_deref() == Some(v.name.as_str()));
        if let (true, Some(c)) = (is_template, v.persistent_volume_claim.as_mut()) {
            c.claim_name = claim_name(&v.name, name, ordinal);
        }
    }
    pod.spec = Some(spec);
    let mut labels = sibling.metadata.labels.clone().unwrap_or_default();
    labels.extend(pod.metadata.labels.take().unwrap_or_default());
    pod.metadata.labels = Some(labels);
    pod.metadata.annotations = sibling.metadata.annotations.clone();
    pod
}

/// The claims of `ordinal`: from the claim templates, labelled with the set's selector.
pub fn new_claims(set: &StatefulSet, ordinal: usize) -> Vec<PersistentVolumeClaim> {
    let name = set.metadata.name.clone().unwrap_or_default();
    let when_deleted = set
        .spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_deleted.as_deref())
        .unwrap_or("Retain");
    set.spec
        .volume_claim_templates
        .iter()
        .flatten()
        .map(|t| {
            let tname = t.metadata.name.clone().unwrap_or_default();
            let mut labels = t.metadata.labels.clone().unwrap_or_default();
            for (k, v) in set.spec.selector.match_labels.iter().flatten() {
                labels.insert(k.clone(), v.clone());
            }
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(claim_name(&tname, &name, ordinal)),
                    namespace: set.metadata.namespace.clone(),
                    labels: Some(labels),
                    annotations: t.metadata.annotations.clone(),
                    // `whenDeleted: Delete`: the set owns its claims, so the garbage
                    // collector removes them with it.
                    owner_references: (when_deleted == "Delete").then(|| vec![owner_ref(set)]),
                    ..Default::default()
                },
                spec: t.spec.clone(),
                status: None,
            }
        })
        .collect()
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn is_failed(p: &Pod) -> bool {
    phase(p) == "Failed" || phase(p) == "Succeeded"
}

fn is_terminating(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_some()
}

fn is_running_and_ready(p: &Pod) -> bool {
    phase(p) == "Running"
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_healthy(p: &Pod) -> bool {
    is_running_and_ready(p) && !is_terminating(p)
}

fn revision_label(p: &Pod) -> &str {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REVISION_LABEL))
        .map(String::as_str)
        .unwrap_or("")
}

/// What one pass decided: the pods to create (ordinals), to delete (names), and whether the
/// pass stopped early to wait for a pod.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub create: Vec<usize>,
    pub delete: Vec<String>,
    /// Ordinals whose claims go with their pods (`whenScaled: Delete`).
    pub release_claims: Vec<usize>,
}

/// Decides one pass over `set`'s pods (by ordinal), as `StatefulSetControl` does.
pub fn plan(set: &StatefulSet, pods: &BTreeMap<usize, Pod>, update_rev: &str) -> Plan {
    let replicas = set.spec.replicas.unwrap_or(1).max(0) as usize;
    let monotonic = set.spec.pod_management_policy.as_deref() != Some("Parallel");
    let mut out = Plan::default();
    let when_scaled_delete = set
        .spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_scaled.as_deref())
        == Some("Delete");

    // Replicas: create what is missing, replace what failed, in order.
    for ord in 0..replicas {
        match pods.get(&ord) {
            None => {
                out.create.push(ord);
                if monotonic {
                    return out;
                }
            }
            Some(p) if is_failed(p) && !is_terminating(p) => {
                out.delete.push(p.metadata.name.clone().unwrap_or_default());
                if monotonic {
                    return out;
                }
            }
            Some(p) if monotonic && (is_terminating(p) || !is_running_and_ready(p)) => {
                return out;
            }
            Some(_) => {}
        }
    }
    // Condemned: ordinals beyond the replicas, highest first.
    let condemned: Vec<&Pod> = pods.range(replicas..).rev().map(|(_, p)| p).collect();
    if monotonic && !condemned.is_empty() {
        let unhealthy = (0..replicas).any(|o| !pods.get(&o).is_some_and(is_healthy));
        if unhealthy {
            return out;
        }
    }
    for p in &condemned {
        if is_terminating(p) {
            if monotonic {
                return out;
            }
            continue;
        }
        out.delete.push(p.metadata.name.clone().unwrap_or_default());
        if when_scaled_delete {
            if let Some(o) = ordinal_of(
                set.metadata.name.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or(""),
            ) {
                out.release_claims.push(o);
            }
        }
        if monotonic {
            return out;
        }
    }
    if !condemned.is_empty() {
        return out;
    }
    // Rolling update: highest ordinal down to the partition, one at a time.
    let strategy = set.spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref().unwrap_or("RollingUpdate") != "RollingUpdate" {
        return out;
    }
    let partition = strategy
        .rolling_update
        .and_then(|r| r.partition)
        .unwrap_or(0)
        .max(0) as usize;
    for ord in (partition..replicas).rev() {
        let Some(p) = pods.get(&ord) else {
            return out;
        };
        if revision_label(p) != update_rev && !is_terminating(p) {
            out.delete.push(p.metadata.name.clone().unwrap_or_default());
            return out;
        }
        if !is_healthy(p) {
            return out;
        }
    }
    out
}

impl StatefulSetController {
    pub fn new(
        reg: Arc<Registry>,
        sets: Arc<Cache<StatefulSet>>,
        pods: Arc<Cache<Pod>>,
        claims: Arc<Cache<PersistentVolumeClaim>>,
    ) -> Self {
        StatefulSetController {
            reg,
            sets,
            pods,
            claims,
            expect: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
        }
    }

    /// Records a pod write (`claim` false) or a claim write for the next reconcile to wait on.
    fn note(&self, key: &str, rev: u64, claim: bool) {
        let mut e = self.expect.lock().expect("expect");
        let cur = e.entry(key.to_string()).or_default();
        let slot = if claim {
            &mut cur.claims
        } else {
            &mut cur.pods
        };
        *slot = (*slot).max(rev);
    }
}

/// Whether the controller `uid` owns the object with metadata `m`.
fn owned_by(m: &ObjectMeta, uid: &str) -> bool {
    m.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

fn name_of(m: &ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or("")
}

impl Reconciler for StatefulSetController {
    fn name(&self) -> &'static str {
        "statefulset"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let want = self.expect.lock().expect("expect").get(key).copied();
        if let Some(want) = want {
            if want.pods > 0 {
                self.pods.wait_for(want.pods).await;
            }
            if want.claims > 0 {
                self.claims.wait_for(want.claims).await;
            }
        }
        let Some(set) = self.sets.get(key) else {
            self.expect.lock().expect("expect").remove(key);
            self.templates.lock().expect("templates").remove(key);
            return Ok(Action::AwaitChange);
        };
        if set.metadata.deletion_timestamp.is_some() {
            return Ok(Action::AwaitChange);
        }
        let (ns, name) = split_key(key);
        let uid = set.metadata.uid.clone().unwrap_or_default();

        let mut owned: BTreeMap<usize, Pod> = BTreeMap::new();
        for p in self.pods.list(ns) {
            if !owned_by(&p.metadata, &uid) {
                continue;
            }
            let Some(ord) = ordinal_of(name, name_of(&p.metadata)) else {
                continue;
            };
            owned.insert(ord, (*p).clone());
        }
        let update_rev = revision_of(&set);
        let plan = plan(&set, &owned, &update_rev);
        let current = set
            .status
            .as_ref()
            .and_then(|s| s.current_revision.clone())
            .filter(|r| !r.is_empty() && *r != update_rev);
        let current_template = {
            let mut t = self.templates.lock().expect("templates");
            let known = t.entry(key.to_string()).or_default();
            known.insert(update_rev.clone(), set.spec.template.clone());
            known.retain(|r, _| *r == update_rev || current.as_ref() == Some(r));
            current.as_ref().and_then(|c| known.get(c).cloned())
        };

        let mut result = Ok(());
        for ord in &plan.create {
            // Claims first: a pod never starts without its storage.
            for c in new_claims(&set, *ord) {
                let cname = c.metadata.name.clone().unwrap_or_default();
                if self
                    .claims
                    .get(&format!("{}/{cname}", ns.unwrap_or("")))
                    .is_some()
                {
                    continue;
                }
                match api::create(&self.reg, ns, &c) {
                    Ok(o) => self.note(key, api::revision(&o.metadata), true),
                    Err(e) if e.code == 409 => {}
                    Err(e) => {
                        super::events::record(
                            &self.reg,
                            &*set,
                            "Warning",
                            "FailedCreate",
                            &format!("create Claim {cname} for Pod {name}-{ord} in StatefulSet {name} failed error: {}", e.message),
                            "statefulset-controller",
                        );
                        result = Err(e);
                    }
                }
            }
            if result.is_err() {
                break;
            }
            // Below the partition a pod is made again at the current revision, as Kubernetes
            // does: from its template when this process saw it, else from a live pod of that
            // revision, else (a restart forgot it and none lives) at the update revision.
            let partition = set
                .spec
                .update_strategy
                .as_ref()
                .filter(|s| s.type_.as_deref().unwrap_or("RollingUpdate") == "RollingUpdate")
                .and_then(|s| s.rolling_update.as_ref())
                .and_then(|r| r.partition)
                .unwrap_or(0)
                .max(0) as usize;
            let below = current.as_ref().filter(|_| *ord < partition);
            let sibling = below.and_then(|cur| {
                owned
                    .values()
                    .find(|p| revision_label(p) == cur && !is_failed(p))
            });
            let pod = match (below, &current_template, sibling) {
                (Some(cur), Some(t), _) => {
                    let mut old = (*set).clone();
                    old.spec.template = t.clone();
                    new_pod(&old, *ord, cur)
                }
                (Some(_), None, Some(sib)) => pod_like(&set, sib, *ord),
                _ => new_pod(&set, *ord, &update_rev),
            };
            match api::create(&self.reg, ns, &pod) {
                Ok(o) => {
                    self.note(key, api::revision(&o.metadata), false);
                    super::events::record(
                        &self.reg,
                        &*set,
                        "Normal",
                        "SuccessfulCreate",
                        &format!("create Pod {name}-{ord} in StatefulSet {name} successful"),
                        "statefulset-controller",
                    );
                }
                // Still there under its old self (being deleted): the next pass sees it.
                Err(e) if e.code == 409 => {}
                Err(e) => {
                    super::events::record(
                        &self.reg,
                        &*set,
                        "Warning",
                        "FailedCreate",
                        &format!(
                            "create Pod {name}-{ord} in StatefulSet {name} failed error: {}",
                            e.message
                        ),
                        "statefulset-controller",
                    );
                    result = Err(e);
                    break;
                }
            }
        }
        for pname in &plan.delete {
            match api::delete::<Pod>(&self.reg, ns, pname, &Default::default()) {
                Ok(rev) => {
                    self.note(key, rev, false);
                    super::events::record(
                        &self.reg,
                        &*set,
                        "Normal",
                        "SuccessfulDelete",
                        &format!("delete Pod {pname} in StatefulSet {name} successful"),
                        "statefulset-controller",
                    );
                }
                Err(e) if e.code == 404 => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        for ord in &plan.release_claims {
            for c in new_claims(&set, *ord) {
                let cname = c.metadata.name.unwrap_or_default();
                match api::delete::<PersistentVolumeClaim>(
                    &self.reg,
                    ns,
                    &cname,
                    &Default::default(),
                ) {
                    Ok(rev) => self.note(key, rev, true),
                    Err(e) if e.code == 404 => {}
                    Err(e) => result = Err(e),
                }
            }
        }
        result?;

        // Status from the pods there now.
        let min_ready = set.spec.min_ready_seconds.unwrap_or(0) as i64;
        let now = now_unix();
        let cur = set.status.clone().unwrap_or_default();
        let mut current_rev = cur
            .current_revision
            .clone()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| update_rev.clone());
        let live: Vec<Arc<Pod>> = self
            .pods
            .list(ns)
            .into_iter()
            .filter(|p| owned_by(&p.metadata, &uid))
            .filter(|p| ordinal_of(name, name_of(&p.metadata)).is_some())
            .filter(|p| !pods::is_terminal(p) && p.metadata.deletion_timestamp.is_none())
            .collect();
        let rev_of = |p: &Pod| revision_label(p).to_string();
        let replicas = set.spec.replicas.unwrap_or(1).max(0);
        let updated = live.iter().filter(|p| rev_of(p) == update_rev).count() as i32;
        if updated == replicas && live.len() as i32 == replicas {
            // Every pod runs the update revision: it is the current one now.
            current_rev = update_rev.clone();
        }
        let status = StatefulSetStatus {
            observed_generation: set.metadata.generation,
            replicas: live.len() as i32,
            ready_replicas: Some(live.iter().filter(|p| pods::is_ready(p)).count() as i32),
            available_replicas: Some(
                live.iter()
                    .filter(|p| pods::is_available(p, min_ready, now))
                    .count() as i32,
            ),
            current_replicas: Some(live.iter().filter(|p| rev_of(p) == current_rev).count() as i32),
            updated_replicas: Some(updated),
            current_revision: Some(current_rev),
            update_revision: Some(update_rev),
            collision_count: cur.collision_count,
            conditions: cur.conditions.clone(),
        };
        let norm = |s: &StatefulSetStatus| {
            let mut v = api::encode(s).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.retain(|_, x| !(x.is_null() || x.as_i64() == Some(0)));
            }
            v
        };
        if norm(&status) != norm(&cur) {
            api::update_status(&self.reg, &*set, &status)?;
        }
        if min_ready > 0 {
            return Ok(Action::RequeueAfter(Duration::from_secs(1)));
        }
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(replicas: i32, policy: &str, partition: i32) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
            "spec": {
                "replicas": replicas,
                "serviceName": "web",
                "podManagementPolicy": policy,
                "selector": {"matchLabels": {"app": "web"}},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]
            }
        }))
        .unwrap()
    }

    fn pod(ord: usize, rev: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("web-{ord}"), "labels": {REVISION_LABEL: rev}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn pods_have_stable_identity_and_claims() {
        let s = set(3, "OrderedReady", 0);
        let p = new_pod(&s, 2, "web-abc");
        assert_eq!(p.metadata.name.as_deref(), Some("web-2"));
        let l = p.metadata.labels.clone().unwrap();
        assert_eq!(l[POD_NAME_LABEL], "web-2");
        assert_eq!(l[POD_INDEX_LABEL], "2");
        assert_eq!(l[REVISION_LABEL], "web-abc");
        let spec = p.spec.unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("web-2"));
        assert_eq!(spec.subdomain.as_deref(), Some("web"));
        let v = &spec.volumes.unwrap()[0];
        assert_eq!(
            v.persistent_volume_claim.as_ref().unwrap().claim_name,
            "data-web-2"
        );
        let c = &new_claims(&s, 2)[0];
        assert_eq!(c.metadata.name.as_deref(), Some("data-web-2"));
        assert_eq!(c.metadata.labels.as_ref().unwrap()["app"], "web");
        assert!(c.metadata.owner_references.is_none(), "retained by default");
        assert_eq!(ordinal_of("web", "web-12"), Some(12));
        assert_eq!(ordinal_of("web", "webx-1"), None);
    }

    #[test]
    fn ordered_ready_waits_for_each_pod() {
        let s = set(3, "OrderedReady", 0);
        let rev = revision_of(&s);
        let mut pods = BTreeMap::new();
        assert_eq!(plan(&s, &pods, &rev).create, vec![0]);
        pods.insert(0, pod(0, &rev, false));
        assert_eq!(
            plan(&s, &pods, &rev),
            Plan::default(),
            "web-0 not ready yet"
        );
        pods.insert(0, pod(0, &rev, true));
        assert_eq!(plan(&s, &pods, &rev).create, vec![1]);
        // Parallel: all at once.
        let p = set(3, "Parallel", 0);
        assert_eq!(plan(&p, &BTreeMap::new(), &rev).create, vec![0, 1, 2]);
    }

    #[test]
    fn scale_down_in_reverse_one_at_a_time() {
        let s = set(1, "OrderedReady", 0);
        let rev = revision_of(&s);
        let pods: BTreeMap<usize, Pod> = (0..3).map(|o| (o, pod(o, &rev, true))).collect();
        assert_eq!(plan(&s, &pods, &rev).delete, vec!["web-2"]);
        let p = set(1, "Parallel", 0);
        assert_eq!(plan(&p, &pods, &rev).delete, vec!["web-2", "web-1"]);
    }

    #[test]
    fn rolling_update_from_the_top_down_to_the_partition() {
        let s = set(3, "OrderedReady", 1);
        let mut pods: BTreeMap<usize, Pod> = (0..3).map(|o| (o, pod(o, "old", true))).collect();
        let rev = revision_of(&s);
        assert_eq!(plan(&s, &pods, &rev).delete, vec!["web-2"]);
        pods.insert(2, pod(2, &rev, false));
        assert_eq!(plan(&s, &pods, &rev), Plan::default(), "waits for web-2");
        pods.insert(2, pod(2, &rev, true));
        assert_eq!(plan(&s, &pods, &rev).delete, vec!["web-1"]);
        pods.insert(1, pod(1, &rev, true));
        assert_eq!(
            plan(&s, &pods, &rev),
            Plan::default(),
            "web-0 below partition"
        );
    }

    #[test]
    fn below_the_partition_pods_come_back_at_the_current_revision() {
        let s = set(3, "OrderedReady", 2);
        let mut sib = new_pod(&s, 1, "web-old");
        sib.spec.as_mut().unwrap().containers[0].image = Some("old".into());
        sib.spec.as_mut().unwrap().node_name = Some("n1".into());
        let p = pod_like(&s, &sib, 0);
        assert_eq!(p.metadata.name.as_deref(), Some("web-0"));
        let l = p.metadata.labels.unwrap();
        assert_eq!(l[REVISION_LABEL], "web-old");
        assert_eq!(l[POD_NAME_LABEL], "web-0");
        let spec = p.spec.unwrap();
        assert_eq!(spec.containers[0].image.as_deref(), Some("old"));
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.hostname.as_deref(), Some("web-0"));
        assert_eq!(
            spec.volumes.unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "data-web-0"
        );
    }

    #[test]
    fn failed_pods_are_replaced() {
        let s = set(2, "OrderedReady", 0);
        let rev = revision_of(&s);
        let mut pods: BTreeMap<usize, Pod> = (0..2).map(|o| (o, pod(o, &rev, true))).collect();
        let mut failed = pod(1, &rev, false);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        pods.insert(1, failed);
        assert_eq!(plan(&s, &pods, &rev).delete, vec!["web-1"]);
    }
}
