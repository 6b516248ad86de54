//! The Deployment controller: one ReplicaSet per pod template, revisions through
//! `deployment.kubernetes.io/revision`, RollingUpdate (maxSurge/maxUnavailable) and Recreate,
//! rollback by re-applying an old template, history pruned to `revisionHistoryLimit`.

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use serde_json::{json, Value};
use skiff_api::k8s::apimachinery::pkg::util::intstr::IntOrString;
use skiff_api::{meta, ApiError, Resource, POD_TEMPLATE_HASH, REVISION_ANNOTATION};

use super::replicaset::now_unix;
use super::runtime::{split_key, Action, Cache, Expectations, Reconciler};
use crate::registry::{now, Registry, Sub, WriteOptions};

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
    fn old_pods_running(&self, ns: Option<&str>, old: &[Value]) -> bool {
        if old.iter().any(|r| status_i(r, "replicas") > 0) {
            return true;
        }
        let uids: std::collections::HashSet<&str> = old.iter().map(meta::uid).collect();
        self.pods.list_raw(ns).iter().any(|p| {
            meta::controller_uid(p).is_some_and(|u| uids.contains(u.as_str()))
                && !super::pods::raw::is_terminal(p)
        })
    }
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

fn revision(rs: &Value) -> i64 {
    rs.pointer(&format!(
        "/metadata/annotations/{}",
        REVISION_ANNOTATION.replace('/', "~1")
    ))
    .and_then(Value::as_str)
    .and_then(|s| s.parse().ok())
    .unwrap_or(0)
}

fn spec_replicas(o: &Value) -> i64 {
    o.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn status_i(o: &Value, f: &str) -> i64 {
    o.pointer(&format!("/status/{f}"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// Resolves int-or-percent against `total`, rounding percentages up or down.
fn resolve(v: Option<&Value>, total: i64, round_up: bool, default: &str) -> i64 {
    let v: IntOrString = v
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or(IntOrString::String(default.into()));
    match v {
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
pub fn surge_and_unavailable(d: &Value) -> (i64, i64) {
    let replicas = spec_replicas(d);
    let ru = d.pointer("/spec/strategy/rollingUpdate");
    let surge = resolve(ru.and_then(|r| r.get("maxSurge")), replicas, true, "25%");
    let mut unavailable = resolve(
        ru.and_then(|r| r.get("maxUnavailable")),
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

fn int_annotation(rs: &Value, key: &str) -> Option<i64> {
    meta::annotations(rs).get(key).and_then(|v| v.parse().ok())
}

/// The Deployment's `spec.replicas` when this ReplicaSet was last scaled.
fn desired_replicas(rs: &Value) -> Option<i64> {
    int_annotation(rs, DESIRED_REPLICAS)
}

/// Whether the Deployment replaces its pods all at once (`strategy.type: Recreate`).
fn is_recreate(d: &Value) -> bool {
    // Stored Deployments passed validation, so they decode.
    serde_json::from_value::<Deployment>(d.clone())
        .is_ok_and(|d| d.spec.strategy.and_then(|s| s.type_).as_deref() == Some("Recreate"))
}

/// maxSurge as Kubernetes uses it (none for Recreate).
fn max_surge(d: &Value) -> i64 {
    if is_recreate(d) {
        0
    } else {
        surge_and_unavailable(d).0
    }
}

/// Oldest first: creation time, then revision (creation times have one-second steps).
fn by_age(a: &Value, b: &Value) -> std::cmp::Ordering {
    let created = |r: &Value| {
        r.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    created(a)
        .cmp(&created(b))
        .then(revision(a).cmp(&revision(b)))
        .then(meta::name(a).cmp(meta::name(b)))
}

/// How many of `to_add` replicas (negative: to remove) go to `rs` when a Deployment of
/// `d_replicas` (status `d_status_replicas`, max surge `surge`) is scaled proportionally;
/// `added` have been handed out already (Kubernetes' `GetProportion`).
fn proportion(
    rs: &Value,
    d_replicas: i64,
    surge: i64,
    d_status_replicas: i64,
    to_add: i64,
    added: i64,
) -> i64 {
    let size = spec_replicas(rs);
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
        rs: &Value,
        replicas: i64,
        d: &Value,
        last: &mut u64,
    ) -> Result<Value, ApiError> {
        if spec_replicas(rs) == replicas {
            return Ok(rs.clone());
        }
        self.scale_annotated(rs, replicas, d, last)
    }

    /// Sets a ReplicaSet's size and the Deployment's replica annotations when either differs
    /// (Kubernetes' `scaleReplicaSet`). Returns the stored ReplicaSet.
    fn scale_annotated(
        &self,
        rs: &Value,
        replicas: i64,
        d: &Value,
        last: &mut u64,
    ) -> Result<Value, ApiError> {
        let desired = spec_replicas(d);
        let max = desired + max_surge(d);
        if spec_replicas(rs) == replicas
            && desired_replicas(rs) == Some(desired)
            && int_annotation(rs, MAX_REPLICAS) == Some(max)
        {
            return Ok(rs.clone());
        }
        let rsr = Resource::lookup("replicasets").expect("rs");
        let mut next = rs.clone();
        next["spec"]["replicas"] = json!(replicas);
        if !next["metadata"]["annotations"].is_object() {
            next["metadata"]["annotations"] = json!({});
        }
        next["metadata"]["annotations"][DESIRED_REPLICAS] = json!(desired.to_string());
        next["metadata"]["annotations"][MAX_REPLICAS] = json!(max.to_string());
        let out = self.reg.update(
            rsr,
            meta::namespace(rs),
            meta::name(rs),
            next,
            Sub::Main,
            &WriteOptions::default(),
        )?;
        *last = (*last).max(meta::resource_version(&out).unwrap_or(0));
        if spec_replicas(rs) != replicas {
            let verb = if replicas > spec_replicas(rs) {
                "up"
            } else {
                "down"
            };
            super::events::record_raw(
                &self.reg,
                d,
                "Normal",
                "ScalingReplicaSet",
                &format!(
                    "Scaled {verb} replica set {} from {} to {replicas}",
                    meta::name(rs),
                    spec_replicas(rs)
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
        d: &Value,
        rss: &mut [Value],
        new_at: Option<usize>,
        last: &mut u64,
    ) -> Result<(), ApiError> {
        let replicas = spec_replicas(d);
        let active: Vec<usize> = (0..rss.len())
            .filter(|i| spec_replicas(&rss[*i]) > 0)
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
            let saturated = spec_replicas(nrs) == replicas
                && desired_replicas(nrs) == Some(replicas)
                && status_i(nrs, "availableReplicas") >= replicas;
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
        let total: i64 = active.iter().map(|i| spec_replicas(&rss[*i])).sum();
        let allowed = if replicas > 0 { replicas + surge } else { 0 };
        let to_add = allowed - total;
        // Larger first; of equal ones the newer gets more, the older loses first.
        let mut order = active;
        order.sort_by(|a, b| {
            let age = by_age(&rss[*a], &rss[*b]);
            spec_replicas(&rss[*b])
                .cmp(&spec_replicas(&rss[*a]))
                .then(if to_add > 0 { age.reverse() } else { age })
        });
        let status_replicas = status_i(d, "replicas");
        let mut added = 0;
        let mut sizes: Vec<i64> = order
            .iter()
            .map(|i| {
                let rs = &rss[*i];
                let p = proportion(rs, replicas, surge, status_replicas, to_add, added);
                added += p;
                spec_replicas(rs) + p
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
        d: &Value,
        nrs: &mut Value,
        old: &mut [Value],
        last: &mut u64,
    ) -> Result<(), ApiError> {
        let mut scaled_down = false;
        for rs in old.iter_mut().filter(|r| spec_replicas(r) > 0) {
            *rs = self.scale(rs, 0, d, last)?;
            scaled_down = true;
        }
        if scaled_down || self.old_pods_running(meta::namespace(d), old) {
            return Ok(());
        }
        *nrs = self.scale(nrs, spec_replicas(d), d, last)?;
        Ok(())
    }

    /// One step of a rolling update (Kubernetes' `rolloutRolling`): the new ReplicaSet to
    /// its size within maxSurge (down, if the Deployment shrank); if it did not change, old
    /// ReplicaSets down within maxUnavailable, their unavailable pods first.
    fn rollout_rolling(
        &self,
        d: &Value,
        nrs: &mut Value,
        old: &mut [Value],
        last: &mut u64,
    ) -> Result<(), ApiError> {
        let replicas = spec_replicas(d);
        let (surge, unavailable) = surge_and_unavailable(d);
        let new_size = spec_replicas(nrs);
        let all = |old: &[Value], nrs: &Value| {
            old.iter().map(spec_replicas).sum::<i64>() + spec_replicas(nrs)
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
        if old.iter().all(|r| spec_replicas(r) == 0) {
            return Ok(());
        }
        let min_available = replicas - if replicas == 0 { 0 } else { unavailable };
        let new_unavailable = spec_replicas(nrs) - status_i(nrs, "availableReplicas");
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
            let unhealthy = spec_replicas(rs) - status_i(rs, "availableReplicas");
            if spec_replicas(rs) == 0 || unhealthy <= 0 {
                continue;
            }
            let n = unhealthy.min(max_down - cleaned);
            *rs = self.scale(rs, spec_replicas(rs) - n, d, last)?;
            cleaned += n;
        }
        // Then available ones, keeping minAvailable.
        let available: i64 = old
            .iter()
            .map(|r| status_i(r, "availableReplicas"))
            .sum::<i64>()
            + status_i(nrs, "availableReplicas");
        if available <= min_available {
            return Ok(());
        }
        let mut down = available - min_available;
        for rs in old.iter_mut() {
            if down <= 0 {
                break;
            }
            let n = spec_replicas(rs).min(down);
            if n > 0 {
                *rs = self.scale(rs, spec_replicas(rs) - n, d, last)?;
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
        let Some(d) = self.deployments.get_raw(key) else {
            self.expect.forget(key);
            return Ok(Action::AwaitChange);
        };
        if meta::is_deleting(&d) {
            return Ok(Action::AwaitChange);
        }
        let (ns, name) = split_key(key);
        let rsr = Resource::lookup("replicasets").expect("rs");
        let uid = meta::uid(&d).to_string();
        let mut owned: Vec<Value> = self
            .replicasets
            .list_raw(ns)
            .into_iter()
            .filter(|rs| {
                meta::controller_uid(rs).as_deref() == Some(uid.as_str()) && !meta::is_deleting(rs)
            })
            .map(|rs| (*rs).clone())
            .collect();
        owned.sort_by_key(revision);
        let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let hash = template_hash(&normalized(&template));
        let max_rev = owned.iter().map(revision).max().unwrap_or(0);
        let replicas = spec_replicas(&d);
        let paused = d.pointer("/spec/paused") == Some(&json!(true));
        let recreate = is_recreate(&d);
        let mut last = 0u64;
        let opts = WriteOptions::default();

        let want = normalized(&template);
        let new_idx = owned.iter().position(|rs| {
            normalized(rs.pointer("/spec/template").unwrap_or(&Value::Null)) == want
        });
        let mut new_rs = new_idx.map(|i| owned.remove(i));
        let old: Vec<Value> = owned;

        // A change of spec.replicas while ReplicaSets carry another desired count is scaled
        // proportionally over the active ReplicaSets before any rollout step (Kubernetes'
        // `isScalingEvent`); a paused Deployment is only ever scaled that way.
        let scaling_event = new_rs
            .iter()
            .chain(old.iter())
            .filter(|r| spec_replicas(r) > 0)
            .any(|r| desired_replicas(r).is_some_and(|n| n != replicas));

        if new_rs.is_none() && !paused && !scaling_event {
            let total: i64 = old.iter().map(spec_replicas).sum();
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
            let mut labels = template
                .pointer("/metadata/labels")
                .cloned()
                .unwrap_or(json!({}));
            labels[POD_TEMPLATE_HASH] = json!(hash);
            let mut rs_template = template.clone();
            rs_template["metadata"]["labels"] = labels.clone();
            let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
            if !selector.get("matchLabels").is_some_and(Value::is_object) {
                selector["matchLabels"] = json!({});
            }
            selector["matchLabels"][POD_TEMPLATE_HASH] = json!(hash);
            let surge = max_surge(&d);
            let rs = json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": format!("{name}-{hash}"), "namespace": ns, "labels": labels,
                    "annotations": {
                        REVISION_ANNOTATION: (max_rev + 1).to_string(),
                        "deployment.kubernetes.io/desired-replicas": replicas.to_string(),
                        "deployment.kubernetes.io/max-replicas": (replicas + surge).to_string(),
                    },
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid,
                                         "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": {"replicas": initial, "minReadySeconds": d.pointer("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
                         "selector": selector, "template": rs_template},
            });
            let created = match self.reg.create(rsr, ns, rs, &opts) {
                Ok(c) => c,
                Err(e) if e.code == 409 => {
                    // A ReplicaSet of that name exists but is not ours or has another template:
                    // retry after the cache catches up.
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            last = last.max(meta::resource_version(&created).unwrap_or(0));
            super::events::record_raw(
                &self.reg,
                &d,
                "Normal",
                "ScalingReplicaSet",
                &format!(
                    "Scaled up replica set {} from 0 to {initial}",
                    meta::name(&created)
                ),
                "deployment-controller",
            );
            new_rs = Some(created);
        } else if let Some(rs) = &new_rs {
            // Rolling back to an older template makes it the newest revision again.
            if revision(rs) < max_rev && !paused {
                let mut next = rs.clone();
                next["metadata"]["annotations"][REVISION_ANNOTATION] =
                    json!((max_rev + 1).to_string());
                let out = self
                    .reg
                    .update(rsr, ns, meta::name(rs), next, Sub::Main, &opts)?;
                last = last.max(meta::resource_version(&out).unwrap_or(0));
                new_rs = Some(out);
            }
        }

        let mut old = old;
        if paused || scaling_event {
            let mut all: Vec<Value> = new_rs.iter().cloned().chain(old.iter().cloned()).collect();
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
            let limit = d
                .pointer("/spec/revisionHistoryLimit")
                .and_then(Value::as_i64)
                .unwrap_or(10)
                .max(0) as usize;
            let mut empty: Vec<&Value> = old
                .iter()
                .filter(|r| spec_replicas(r) == 0 && status_i(r, "replicas") == 0)
                .collect();
            empty.sort_by_key(|r| revision(r));
            if empty.len() > limit {
                for rs in empty.iter().take(empty.len() - limit) {
                    match self
                        .reg
                        .delete(rsr, ns, meta::name(rs), &Default::default())
                    {
                        Ok(o) => last = last.max(meta::resource_version(&o).unwrap_or(0)),
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
        d: &Value,
        new_rs: Option<&Value>,
        old: &[Value],
    ) -> Result<Action, ApiError> {
        let all: Vec<&Value> = new_rs.into_iter().chain(old.iter()).collect();
        let replicas = spec_replicas(d);
        let sum = |f: &str| all.iter().map(|r| status_i(r, f)).sum::<i64>();
        let total = sum("replicas");
        let ready = sum("readyReplicas");
        let available = sum("availableReplicas");
        let updated = new_rs.map(|r| status_i(r, "replicas")).unwrap_or(0);
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
            && new_rs.is_some_and(|r| spec_replicas(r) == replicas);
        let mut status = d
            .get("status")
            .cloned()
            .filter(Value::is_object)
            .unwrap_or(json!({}));
        let before = status.clone();
        status["observedGeneration"] = d
            .pointer("/metadata/generation")
            .cloned()
            .unwrap_or(json!(1));
        status["replicas"] = json!(total);
        status["updatedReplicas"] = json!(updated);
        status["readyReplicas"] = json!(ready);
        status["availableReplicas"] = json!(available);
        status["unavailableReplicas"] = json!((replicas - available).max(0));
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
        let rs_name = new_rs.map(meta::name).unwrap_or("");
        let progress_changed = [
            "replicas",
            "updatedReplicas",
            "availableReplicas",
            "readyReplicas",
        ]
        .iter()
        .any(|k| before.get(*k) != status.get(*k))
            || before.get("observedGeneration") != status.get("observedGeneration");
        let deadline = d
            .pointer("/spec/progressDeadlineSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(600);
        let prev_progress = find_cond(&before, "Progressing");
        let last_update = prev_progress
            .and_then(|c| c["lastUpdateTime"].as_str())
            .and_then(skiff_api::table::parse_rfc3339)
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
        set_deploy_condition(&mut status, "Available", a_status, a_reason, &a_msg, true);
        set_deploy_condition(
            &mut status,
            "Progressing",
            p_status,
            p_reason,
            &p_msg,
            progress_changed || prev_progress.is_none_or(|c| c["reason"] != p_reason),
        );
        let mut requeue = Action::AwaitChange;
        if !complete && p_reason != "ProgressDeadlineExceeded" {
            // Look again when the deadline would pass.
            requeue =
                Action::RequeueAfter(std::time::Duration::from_secs(deadline.max(1) as u64 + 1));
        }
        // Revision annotation follows the newest ReplicaSet.
        let mut next = d.clone();
        let mut changed = before != status;
        if let Some(r) = new_rs {
            let rev = revision(r).to_string();
            let cur = meta::annotations(d).get(REVISION_ANNOTATION).cloned();
            if cur.as_deref() != Some(rev.as_str()) {
                if !next["metadata"]["annotations"].is_object() {
                    next["metadata"]["annotations"] = json!({});
                }
                next["metadata"]["annotations"][REVISION_ANNOTATION] = json!(rev);
                let dr = Resource::lookup("deployments").expect("deploy");
                let out = self.reg.update(
                    dr,
                    meta::namespace(d),
                    meta::name(d),
                    next.clone(),
                    Sub::Main,
                    &WriteOptions::default(),
                )?;
                next = out;
                changed = true;
            }
        }
        if changed {
            next["status"] = status;
            let dr = Resource::lookup("deployments").expect("deploy");
            self.reg.update(
                dr,
                meta::namespace(d),
                meta::name(d),
                next,
                Sub::Status,
                &WriteOptions::default(),
            )?;
        }
        Ok(requeue)
    }
}

fn find_cond<'a>(status: &'a Value, ty: &str) -> Option<&'a Value> {
    status
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
}

fn set_deploy_condition(
    status: &mut Value,
    ty: &str,
    st: &str,
    reason: &str,
    msg: &str,
    touch: bool,
) {
    let ts = now();
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let list = status["conditions"].as_array_mut().expect("array");
    match list.iter_mut().find(|c| c["type"] == ty) {
        Some(c) => {
            if c["status"] != st {
                c["lastTransitionTime"] = json!(ts);
            }
            if touch || c["status"] != st || c["reason"] != reason {
                c["lastUpdateTime"] = json!(ts);
            }
            c["status"] = json!(st);
            c["reason"] = json!(reason);
            c["message"] = json!(msg);
        }
        None => list.push(
            json!({"type": ty, "status": st, "reason": reason, "message": msg,
                                 "lastUpdateTime": ts, "lastTransitionTime": ts}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_rounds_up_and_unavailable_down() {
        let d = json!({"spec": {"replicas": 4, "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}});
        assert_eq!(surge_and_unavailable(&d), (1, 1));
        let d = json!({"spec": {"replicas": 3}});
        assert_eq!(surge_and_unavailable(&d), (1, 0));
        let d = json!({"spec": {"replicas": 1, "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}});
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
