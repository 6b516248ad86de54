//! The Deployment controller: one ReplicaSet per pod template, revisions through
//! `deployment.kubernetes.io/revision`, RollingUpdate (maxSurge/maxUnavailable) and Recreate,
//! rollback by re-applying an old template, history pruned to `revisionHistoryLimit`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};
use skiff_api::conditions::{self, Condition};
use skiff_api::k8s::apimachinery::pkg::util::intstr::IntOrString;
use skiff_api::{ApiError, POD_TEMPLATE_HASH, REVISION_ANNOTATION};

use super::api;
use super::pods;
use super::replicaset::now_unix;
use super::runtime::{split_key, Action, Cache, Expectations, Reconciler};
use crate::registry::{Registry, Sub};

pub struct DeploymentController {
    pub reg: Arc<Registry>,
    pub deployments: Arc<Cache<Deployment>>,
    pub replicasets: Arc<Cache<ReplicaSet>>,
    /// Pods, to know whether an old ReplicaSet's pods still run (Recreate waits for them).
    pub pods: Arc<Cache<Pod>>,
    expect: Expectations,
}

impl DeploymentController {
    pub fn new(
        reg: Arc<Registry>,
        deployments: Arc<Cache<Deployment>>,
        replicasets: Arc<Cache<ReplicaSet>>,
        pods: Arc<Cache<Pod>>,
    ) -> Self {
        DeploymentController {
            reg,
            deployments,
            replicasets,
            pods,
            expect: Expectations::default(),
        }
    }

    /// Whether any pod of the `old` ReplicaSets is still running or terminating (Kubernetes'
    /// `oldPodsRunning`): a ReplicaSet's `status.replicas` leaves terminating pods out, but
    /// their containers still run until their node has stopped them.
    fn old_pods_running(&self, ns: Option<&str>, old: &[ReplicaSet]) -> bool {
        if old.iter().any(|r| status_replicas(r) > 0) {
            return true;
        }
        let uids: std::collections::HashSet<&str> = old
            .iter()
            .filter_map(|r| r.metadata.uid.as_deref())
            .collect();
        self.pods.list(ns).iter().any(|p| {
            controller_uid(&p.metadata).is_some_and(|u| uids.contains(u)) && !pods::is_terminal(p)
        })
    }
}

/// The uid of the controller owning an object.
fn controller_uid(m: &ObjectMeta) -> Option<&str> {
    m.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// FNV-1a of the template, spelled with Kubernetes' safe alphabet (no vowels, no look-alikes).
pub fn template_hash(template: &Value) -> String {
    let bytes = serde_json::to_vec(template).unwrap_or_default();
    let mut h: u32 = 0x811c9dc5;
    for b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = h as u64;
    let mut out = String::new();
    while n > 0 || out.is_empty() {
        out.push(ALPHABET[(n % ALPHABET.len() as u64) as usize] as char);
        n /= ALPHABET.len() as u64;
    }
    out
}

/// A template with the hash label removed and zero values dropped, for comparing templates
/// however they were sent: kubectl's protobuf carries `false`/`0` where its JSON omits them.
pub(crate) fn normalized(template: &Value) -> Value {
    fn drop_zero(v: &mut Value) -> bool {
        match v {
            Value::Object(m) => {
                m.retain(|_, x| !drop_zero(x));
                m.is_empty()
            }
            Value::Array(a) => {
                a.iter_mut().for_each(|x| {
                    drop_zero(x);
                });
                a.is_empty()
            }
            Value::Bool(b) => !*b,
            Value::Number(n) => n.as_f64() == Some(0.0),
            Value::String(s) => s.is_empty(),
            Value::Null => true,
        }
    }
    let mut t = template.clone();
    if let Some(l) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(POD_TEMPLATE_HASH);
    }
    drop_zero(&mut t);
    t
}

fn annotation<'a>(m: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    m.annotations.as_ref()?.get(key).map(String::as_str)
}

fn revision(rs: &ReplicaSet) -> i64 {
    annotation(&rs.metadata, REVISION_ANNOTATION)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn name_of(m: &ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or("")
}

fn rs_replicas(rs: &ReplicaSet) -> i64 {
    i64::from(rs.spec.replicas.unwrap_or(0))
}

fn d_replicas(d: &Deployment) -> i64 {
    i64::from(d.spec.replicas.unwrap_or(0))
}

fn status_replicas(rs: &ReplicaSet) -> i64 {
    rs.status.as_ref().map_or(0, |s| i64::from(s.replicas))
}

fn available_replicas(rs: &ReplicaSet) -> i64 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .map_or(0, i64::from)
}

fn ready_replicas(rs: &ReplicaSet) -> i64 {
    rs.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .map_or(0, i64::from)
}

/// Resolves int-or-percent against `total`, rounding percentages up or down.
fn resolve(v: Option<&IntOrString>, total: i64, round_up: bool, default: &str) -> i64 {
    match v.cloned().unwrap_or(IntOrString::String(default.into())) {
        IntOrString::Int(i) => i as i64,
        IntOrString::String(s) => {
            let p: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            if round_up {
                (p * total + 99) / 100
            } else {
                p * total / 100
            }
        }
    }
}

/// (maxSurge, maxUnavailable) of a RollingUpdate deployment; never both zero.
pub fn surge_and_unavailable(d: &Deployment) -> (i64, i64) {
    let replicas = d_replicas(d);
    let ru = d
        .spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let surge = resolve(ru.and_then(|r| r.max_surge.as_ref()), replicas, true, "25%");
    let mut unavailable = resolve(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
        false,
        "25%",
    );
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable.min(replicas))
}

const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

fn int_annotation(rs: &ReplicaSet, key: &str) -> Option<i64> {
    annotation(&rs.metadata, key).and_then(|v| v.parse().ok())
}

/// The Deployment's `spec.replicas` when this ReplicaSet was last scaled.
fn desired_replicas(rs: &ReplicaSet) -> Option<i64> {
    int_annotation(rs, DESIRED_REPLICAS)
}

/// Whether the Deployment replaces its pods all at once (`strategy.type: Recreate`).
fn is_recreate(d: &Deployment) -> bool {
    d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate")
}

/// maxSurge as Kubernetes uses it (none for Recreate).
fn max_surge(d: &Deployment) -> i64 {
    if is_recreate(d) {
        0
    } else {
        surge_and_unavailable(d).0
    }
}

/// Oldest first: creation time, then revision (creation times have one-second steps).
fn by_age(a: &ReplicaSet, b: &ReplicaSet) -> std::cmp::Ordering {
    let created = |r: &ReplicaSet| r.metadata.creation_timestamp.as_ref().map(|t| t.0);
    created(a)
        .cmp(&created(b))
        .then(revision(a).cmp(&revision(b)))
        .then(name_of(&a.metadata).cmp(name_of(&b.metadata)))
}

/// How many of `to_add` replicas (negative: to remove) go to `rs` when a Deployment of
/// `d_replicas` (status `d_status_replicas`, max surge `surge`) is scaled proportionally;
/// `added` have been handed out already (Kubernetes' `GetProportion`).
fn proportion(
    rs: &ReplicaSet,
    d_replicas: i64,
    surge: i64,
    d_status_replicas: i64,
    to_add: i64,
    added: i64,
) -> i64 {
    let size = rs_replicas(rs);
    if size == 0 || to_add == 0 || to_add == added {
        return 0;
    }
    let fraction = if d_replicas == 0 {
        -size
    } else {
        // Its share of the Deployment's size before the scale, applied to the size after.
        let before = int_annotation(rs, MAX_REPLICAS)
            .filter(|n| *n > 0)
            .unwrap_or(d_status_replicas);
        if before <= 0 {
            0
        } else {
            let scaled = (size * (d_replicas + surge)) as f64 / before as f64;
            scaled.round() as i64 - size
        }
    };
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

impl DeploymentController {
    /// Sets a ReplicaSet's size with the Deployment's replica annotations, when the size
    /// changes (Kubernetes' `scaleReplicaSetAndRecordEvent`). Returns the stored ReplicaSet.
    fn scale(
        &self,
        rs: &ReplicaSet,
        replicas: i64,
        d: &Deployment,
        last: &mut u64,
    ) -> Result<ReplicaSet, ApiError> {
        if rs_replicas(rs) == replicas {
            return Ok(rs.clone());
        }
        self.scale_annotated(rs, replicas, d, last)
    }

    /// Sets a ReplicaSet's size and the Deployment's replica annotations when either differs
    /// (Kubernetes' `scaleReplicaSet`). Returns the stored ReplicaSet.
    fn scale_annotated(
        &self,
        rs: &ReplicaSet,
        replicas: i64,
        d: &Deployment,
        last: &mut u64,
    ) -> Result<ReplicaSet, ApiError> {
        let desired = d_replicas(d);
        let max = desired + max_surge(d);
        if rs_replicas(rs) == replicas
            && desired_replicas(rs) == Some(desired)
            && int_annotation(rs, MAX_REPLICAS) == Some(max)
        {
            return Ok(rs.clone());
        }
        // Only the size and the two annotations, at the version read.
        let out: ReplicaSet = api::patch::<ReplicaSet>(
            &self.reg,
            rs.metadata.namespace.as_deref(),
            name_of(&rs.metadata),
            &json!({
                "metadata": {
                    "resourceVersion": rs.metadata.resource_version,
                    "annotations": {DESIRED_REPLICAS: desired.to_string(), MAX_REPLICAS: max.to_string()},
                },
                "spec": {"replicas": replicas},
            }),
            Sub::Main,
        )?;
        *last = (*last).max(api::revision(&out.metadata));
        if rs_replicas(rs) != replicas {
            let verb = if replicas > rs_replicas(rs) {
                "up"
            } else {
                "down"
            };
            super::events::record(
                &self.reg,
                d,
                "Normal",
                "ScalingReplicaSet",
                &format!(
                    "Scaled {verb} replica set {} from {} to {replicas}",
                    name_of(&rs.metadata),
                    rs_replicas(rs)
                ),
                "deployment-controller",
            );
        }
        Ok(out)
    }

    /// A scaling event or a paused Deployment (Kubernetes' `scale` in sync.go): one active
    /// ReplicaSet (or, with none, the newest) takes the whole count; a saturated new one has
    /// the old ones scaled to zero; otherwise a rolling Deployment's size change is spread
    /// over the active ReplicaSets in proportion to their sizes. `rss` are updated in place;
    /// `new_at` is the new ReplicaSet's index.
    fn scale_proportionally(
        &self,
        d: &Deployment,
        rss: &mut [ReplicaSet],
        new_at: Option<usize>,
        last: &mut u64,
    ) -> Result<(), ApiError> {
        let replicas = d_replicas(d);
        let active: Vec<usize> = (0..rss.len())
            .filter(|i| rs_replicas(&rss[*i]) > 0)
            .collect();
        let only = match active.len() {
            0 => new_at.or_else(|| (0..rss.len()).max_by(|a, b| by_age(&rss[*a], &rss[*b]))),
            1 => Some(active[0]),
            _ => None,
        };
        if let Some(i) = only {
            // Annotated even when its size is already right, so the event is over.
            rss[i] = self.scale_annotated(&rss[i], replicas, d, last)?;
            return Ok(());
        }
        if let Some(n) = new_at {
            let nrs = &rss[n];
            let saturated = rs_replicas(nrs) == replicas
                && desired_replicas(nrs) == Some(replicas)
                && available_replicas(nrs) >= replicas;
            if saturated {
                for i in active.into_iter().filter(|i| *i != n) {
                    rss[i] = self.scale(&rss[i], 0, d, last)?;
                }
                return Ok(());
            }
        }
        if is_recreate(d) {
            return Ok(());
        }
        let surge = max_surge(d);
        let total: i64 = active.iter().map(|i| rs_replicas(&rss[*i])).sum();
        let allowed = if replicas > 0 { replicas + surge } else { 0 };
        let to_add = allowed - total;
        // Larger first; of equal ones the newer gets more, the older loses first.
        let mut order = active;
        order.sort_by(|a, b| {
            let age = by_age(&rss[*a], &rss[*b]);
            rs_replicas(&rss[*b])
                .cmp(&rs_replicas(&rss[*a]))
                .then(if to_add > 0 { age.reverse() } else { age })
        });
        let status_replicas = d
            .status
            .as_ref()
            .and_then(|s| s.replicas)
            .map_or(0, i64::from);
        let mut added = 0;
        let mut sizes: Vec<i64> = order
            .iter()
            .map(|i| {
                let rs = &rss[*i];
                let p = proportion(rs, replicas, surge, status_replicas, to_add, added);
                added += p;
                rs_replicas(rs) + p
            })
            .collect();
        // What rounding left over goes to (or comes from) the largest.
        if to_add != 0 {
            sizes[0] = (sizes[0] + to_add - added).max(0);
        }
        for (k, i) in order.into_iter().enumerate() {
            rss[i] = self.scale_annotated(&rss[i], sizes[k], d, last)?;
        }
        Ok(())
    }

    /// One step of a Recreate rollout: every old ReplicaSet to zero, and the new one up only
    /// when no old pod runs or terminates any more.
    fn rollout_recreate(
        &self,
        d: &Deployment,
        nrs: &mut ReplicaSet,
        old: &mut [ReplicaSet],
        last: &mut u64,
    ) -> Result<(), ApiError> {
        let mut scaled_down = false;
        for rs in old.iter_mut().filter(|r| rs_replicas(r) > 0) {
            *rs = self.scale(rs, 0, d, last)?;
            scaled_down = true;
        }
        if scaled_down || self.old_pods_running(d.metadata.namespace.as_deref(), old) {
            return Ok(());
        }
        *nrs = self.scale(nrs, d_replicas(d), d, last)?;
        Ok(())
    }

    /// One step of a rolling update (Kubernetes' `rolloutRolling`): the new ReplicaSet to
    /// its size within maxSurge (down, if the Deployment shrank); if it did not change, old
    /// ReplicaSets down within maxUnavailable, their unavailable pods first.
    fn rollout_rolling(
        &self,
        d: &Deployment,
        nrs: &mut ReplicaSet,
        old: &mut [ReplicaSet],
        last: &mut u64,
    ) -> Result<(), ApiError> {
        let replicas = d_replicas(d);
        let (surge, unavailable) = surge_and_unavailable(d);
        let new_size = rs_replicas(nrs);
        let all = |old: &[ReplicaSet], nrs: &ReplicaSet| {
            old.iter().map(rs_replicas).sum::<i64>() + rs_replicas(nrs)
        };
        if new_size > replicas {
            *nrs = self.scale(nrs, replicas, d, last)?;
            return Ok(());
        }
        if new_size < replicas {
            let room = replicas + surge - all(old, nrs);
            if room > 0 {
                let to = new_size + room.min(replicas - new_size);
                *nrs = self.scale(nrs, to, d, last)?;
                return Ok(());
            }
        }
        if old.iter().all(|r| rs_replicas(r) == 0) {
            return Ok(());
        }
        let min_available = replicas - if replicas == 0 { 0 } else { unavailable };
        let new_unavailable = rs_replicas(nrs) - available_replicas(nrs);
        let max_down = all(old, nrs) - min_available - new_unavailable;
        if max_down <= 0 {
            return Ok(());
        }
        old.sort_by(by_age);
        // Unavailable old pods first: they would otherwise block the rollout.
        let mut cleaned = 0;
        for rs in old.iter_mut() {
            if cleaned >= max_down {
                break;
            }
            let unhealthy = rs_replicas(rs) - available_replicas(rs);
            if rs_replicas(rs) == 0 || unhealthy <= 0 {
                continue;
            }
            let n = unhealthy.min(max_down - cleaned);
            *rs = self.scale(rs, rs_replicas(rs) - n, d, last)?;
            cleaned += n;
        }
        // Then available ones, keeping minAvailable.
        let available: i64 =
            old.iter().map(available_replicas).sum::<i64>() + available_replicas(nrs);
        if available <= min_available {
            return Ok(());
        }
        let mut down = available - min_available;
        for rs in old.iter_mut() {
            if down <= 0 {
                break;
            }
            let n = rs_replicas(rs).min(down);
            if n > 0 {
                *rs = self.scale(rs, rs_replicas(rs) - n, d, last)?;
                down -= n;
            }
        }
        Ok(())
    }
}

impl Reconciler for DeploymentController {
    fn name(&self) -> &'static str {
        "deployment"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        self.expect.settle(key, &self.replicasets).await;
        let Some(d) = self.deployments.get(key) else {
            self.expect.forget(key);
            return Ok(Action::AwaitChange);
        };
        if d.metadata.deletion_timestamp.is_some() {
            return Ok(Action::AwaitChange);
        }
        let (ns, name) = split_key(key);
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let mut owned: Vec<ReplicaSet> = self
            .replicasets
            .list(ns)
            .into_iter()
            .filter(|rs| {
                controller_uid(&rs.metadata) == Some(uid.as_str())
                    && rs.metadata.deletion_timestamp.is_none()
            })
            .map(|rs| (*rs).clone())
            .collect();
        owned.sort_by_key(revision);
        let template = d.spec.template.clone();
        // Templates are compared and hashed as JSON with zero values dropped, however
        // they were sent (see `normalized`).
        let want = normalized(&api::encode(&template)?);
        let hash = template_hash(&want);
        let max_rev = owned.iter().map(revision).max().unwrap_or(0);
        let replicas = d_replicas(&d);
        let paused = d.spec.paused == Some(true);
        let recreate = is_recreate(&d);
        let mut last = 0u64;

        let mut new_idx = None;
        for (i, rs) in owned.iter().enumerate() {
            let t = rs.spec.template.as_ref().map(api::encode).transpose()?;
            if normalized(t.as_ref().unwrap_or(&Value::Null)) == want {
                new_idx = Some(i);
                break;
            }
        }
        let mut new_rs = new_idx.map(|i| owned.remove(i));
        let old: Vec<ReplicaSet> = owned;

        // A change of spec.replicas while ReplicaSets carry another desired count is scaled
        // proportionally over the active ReplicaSets before any rollout step (Kubernetes'
        // `isScalingEvent`); a paused Deployment is only ever scaled that way.
        let scaling_event = new_rs
            .iter()
            .chain(old.iter())
            .filter(|r| rs_replicas(r) > 0)
            .any(|r| desired_replicas(r).is_some_and(|n| n != replicas));

        if new_rs.is_none() && !paused && !scaling_event {
            let total: i64 = old.iter().map(rs_replicas).sum();
            let initial = if recreate {
                if total == 0 && !self.old_pods_running(ns, &old) {
                    replicas
                } else {
                    0
                }
            } else {
                let (surge, _) = surge_and_unavailable(&d);
                (replicas + surge - total).clamp(0, replicas)
            };
            let mut labels: BTreeMap<String, String> = template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            labels.insert(POD_TEMPLATE_HASH.into(), hash.clone());
            let mut rs_template = template.clone();
            rs_template
                .metadata
                .get_or_insert_with(Default::default)
                .labels = Some(labels.clone());
            let mut selector = d.spec.selector.clone();
            selector
                .match_labels
                .get_or_insert_with(Default::default)
                .insert(POD_TEMPLATE_HASH.into(), hash.clone());
            let surge = max_surge(&d);
            let rs = ReplicaSet {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{hash}")),
                    namespace: ns.map(String::from),
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([
                        (REVISION_ANNOTATION.to_string(), (max_rev + 1).to_string()),
                        (DESIRED_REPLICAS.to_string(), replicas.to_string()),
                        (MAX_REPLICAS.to_string(), (replicas + surge).to_string()),
                    ])),
                    owner_references: Some(vec![pods::controller_ref(&*d)]),
                    ..Default::default()
                },
                spec: ReplicaSetSpec {
                    replicas: Some(initial as i32),
                    min_ready_seconds: Some(d.spec.min_ready_seconds.unwrap_or(0)),
                    selector,
                    template: Some(rs_template),
                },
                status: None,
            };
            // A ReplicaSet of that name that is not ours or has another template (409):
            // retried after the cache catches up.
            let created = api::create(&self.reg, ns, &rs)?;
            last = last.max(api::revision(&created.metadata));
            super::events::record(
                &self.reg,
                &*d,
                "Normal",
                "ScalingReplicaSet",
                &format!(
                    "Scaled up replica set {} from 0 to {initial}",
                    name_of(&created.metadata)
                ),
                "deployment-controller",
            );
            new_rs = Some(created);
        } else if let Some(rs) = &new_rs {
            // Rolling back to an older template makes it the newest revision again.
            if revision(rs) < max_rev && !paused {
                let out = api::patch::<ReplicaSet>(
                    &self.reg,
                    ns,
                    name_of(&rs.metadata),
                    &json!({"metadata": {
                        "resourceVersion": rs.metadata.resource_version,
                        "annotations": {REVISION_ANNOTATION: (max_rev + 1).to_string()},
                    }}),
                    Sub::Main,
                )?;
                last = last.max(api::revision(&out.metadata));
                new_rs = Some(out);
            }
        }

        let mut old = old;
        if paused || scaling_event {
            let mut all: Vec<ReplicaSet> =
                new_rs.iter().cloned().chain(old.iter().cloned()).collect();
            let new_at = new_rs.is_some().then_some(0);
            self.scale_proportionally(&d, &mut all, new_at, &mut last)?;
            if new_rs.is_some() {
                new_rs = Some(all.remove(0));
            }
            old = all;
        } else if let Some(nrs) = new_rs.as_mut() {
            if recreate {
                self.rollout_recreate(&d, nrs, &mut old, &mut last)?;
            } else {
                self.rollout_rolling(&d, nrs, &mut old, &mut last)?;
            }
        }
        if !paused {
            // History: delete old, empty ReplicaSets beyond revisionHistoryLimit.
            let limit = d.spec.revision_history_limit.unwrap_or(10).max(0) as usize;
            let mut empty: Vec<&ReplicaSet> = old
                .iter()
                .filter(|r| rs_replicas(r) == 0 && status_replicas(r) == 0)
                .collect();
            empty.sort_by_key(|r| revision(r));
            if empty.len() > limit {
                for rs in empty.iter().take(empty.len() - limit) {
                    match api::delete::<ReplicaSet>(
                        &self.reg,
                        ns,
                        name_of(&rs.metadata),
                        &Default::default(),
                    ) {
                        Ok(rev) => last = last.max(rev),
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.expect.wrote(key, last);
        self.update_status(&d, new_rs.as_ref(), &old)
    }
}

impl DeploymentController {
    fn update_status(
        &self,
        d: &Deployment,
        new_rs: Option<&ReplicaSet>,
        old: &[ReplicaSet],
    ) -> Result<Action, ApiError> {
        let all: Vec<&ReplicaSet> = new_rs.into_iter().chain(old.iter()).collect();
        let replicas = d_replicas(d);
        let total: i64 = all.iter().map(|r| status_replicas(r)).sum();
        let ready: i64 = all.iter().map(|r| ready_replicas(r)).sum();
        let available: i64 = all.iter().map(|r| available_replicas(r)).sum();
        let updated = new_rs.map(status_replicas).unwrap_or(0);
        let (_, max_unavailable) = surge_and_unavailable(d);
        let recreate = is_recreate(d);
        let min_available = if recreate {
            replicas
        } else {
            replicas - max_unavailable
        };
        let complete = updated == replicas
            && total == replicas
            && available == replicas
            && new_rs.is_some_and(|r| rs_replicas(r) == replicas);
        let before = d.status.clone().unwrap_or_default();
        let mut status = before.clone();
        status.observed_generation = Some(d.metadata.generation.unwrap_or(1));
        status.replicas = Some(total as i32);
        status.updated_replicas = Some(updated as i32);
        status.ready_replicas = Some(ready as i32);
        status.available_replicas = Some(available as i32);
        status.unavailable_replicas = Some((replicas - available).max(0) as i32);
        let (a_status, a_reason, a_msg) = if available >= min_available {
            (
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".to_string(),
            )
        } else {
            (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".to_string(),
            )
        };
        let rs_name = new_rs.map_or("", |r| name_of(&r.metadata));
        let counts = |s: &DeploymentStatus| {
            (
                s.replicas,
                s.updated_replicas,
                s.available_replicas,
                s.ready_replicas,
                s.observed_generation,
            )
        };
        let progress_changed = counts(&before) != counts(&status);
        let deadline = i64::from(d.spec.progress_deadline_seconds.unwrap_or(600));
        let prev_progress = conditions::get(before.conditions.as_deref(), "Progressing");
        let last_update = prev_progress
            .and_then(|c| c.last_update_time.as_ref())
            .map(|t| t.0.as_second())
            .unwrap_or(now_unix());
        let (p_status, p_reason, p_msg) = if complete {
            (
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
            )
        } else if !progress_changed && now_unix() - last_update > deadline {
            (
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            )
        } else {
            (
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{rs_name}\" is progressing."),
            )
        };
        let touch_progress =
            progress_changed || prev_progress.is_none_or(|c| c.reason.as_deref() != Some(p_reason));
        let mut conds = status.conditions.take().unwrap_or_default();
        set_deploy_condition(&mut conds, "Available", a_status, a_reason, &a_msg, true);
        set_deploy_condition(
            &mut conds,
            "Progressing",
            p_status,
            p_reason,
            &p_msg,
            touch_progress,
        );
        status.conditions = Some(conds);
        let mut requeue = Action::AwaitChange;
        if !complete && p_reason != "ProgressDeadlineExceeded" {
            // Look again when the deadline would pass.
            requeue =
                Action::RequeueAfter(std::time::Duration::from_secs(deadline.max(1) as u64 + 1));
        }
        // Revision annotation follows the newest ReplicaSet.
        let mut changed = before != status;
        let mut current: Option<Deployment> = None;
        if let Some(r) = new_rs {
            let rev = revision(r).to_string();
            if annotation(&d.metadata, REVISION_ANNOTATION) != Some(rev.as_str()) {
                current = Some(api::patch::<Deployment>(
                    &self.reg,
                    d.metadata.namespace.as_deref(),
                    name_of(&d.metadata),
                    &json!({"metadata": {
                        "resourceVersion": d.metadata.resource_version,
                        "annotations": {REVISION_ANNOTATION: rev},
                    }}),
                    Sub::Main,
                )?);
                changed = true;
            }
        }
        if changed {
            api::update_status(&self.reg, current.as_ref().unwrap_or(d), &status)?;
        }
        Ok(requeue)
    }
}

/// Sets a Deployment condition: the transition time moves with the status (as
/// `skiff_api::conditions` does), the update time only when `touch`, the status or the reason
/// changes (Kubernetes' progress deadline counts from it).
fn set_deploy_condition(
    conds: &mut Vec<DeploymentCondition>,
    ty: &str,
    st: &str,
    reason: &str,
    msg: &str,
    touch: bool,
) {
    let prev = conditions::get(Some(conds.as_slice()), ty).cloned();
    let now = api::now();
    conditions::set(
        conds,
        DeploymentCondition::new(ty, st, reason, msg, &now),
        &now,
    );
    if let Some(prev) = prev {
        let same = prev.status() == st && prev.reason() == reason;
        if !touch && same {
            if let Some(c) = conds.iter_mut().find(|c| c.type_() == ty) {
                c.last_update_time = prev.last_update_time;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(v: Value) -> Deployment {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn surge_rounds_up_and_unavailable_down() {
        let d = deployment(
            json!({"spec": {"replicas": 4, "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}}),
        );
        assert_eq!(surge_and_unavailable(&d), (1, 1));
        let d = deployment(json!({"spec": {"replicas": 3}}));
        assert_eq!(surge_and_unavailable(&d), (1, 0));
        let d = deployment(
            json!({"spec": {"replicas": 1, "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}}),
        );
        assert_eq!(surge_and_unavailable(&d), (0, 1));
    }

    #[test]
    fn hash_is_stable_and_template_sensitive() {
        let a = json!({"spec": {"containers": [{"name": "a", "image": "x:v1"}]}});
        let b = json!({"spec": {"containers": [{"name": "a", "image": "x:v2"}]}});
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
    }
}
