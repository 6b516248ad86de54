//! The Deployment controller: one ReplicaSet per pod template, revisions through
//! `deployment.kubernetes.io/revision`, RollingUpdate (maxSurge/maxUnavailable) and Recreate,
//! rollback by re-applying an old template, history pruned to `revisionHistoryLimit`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use skiff_api::k8s::apimachinery::pkg::util::intstr::IntOrString;
use skiff_api::{meta, ApiError, Resource, POD_TEMPLATE_HASH, REVISION_ANNOTATION};

use super::replicaset::now_unix;
use super::runtime::{split_key, Action, Cache, Reconciler};
use crate::registry::{now, Registry, Sub, WriteOptions};

pub struct DeploymentController {
    pub reg: Arc<Registry>,
    pub deployments: Arc<Cache>,
    pub replicasets: Arc<Cache>,
    expect: Mutex<HashMap<String, u64>>,
}

impl DeploymentController {
    pub fn new(reg: Arc<Registry>, deployments: Arc<Cache>, replicasets: Arc<Cache>) -> Self {
        DeploymentController {
            reg,
            deployments,
            replicasets,
            expect: Mutex::new(HashMap::new()),
        }
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
fn normalized(template: &Value) -> Value {
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

impl DeploymentController {
    fn scale(&self, rs: &Value, replicas: i64, d: &Value, last: &mut u64) -> Result<(), ApiError> {
        if spec_replicas(rs) == replicas {
            return Ok(());
        }
        let rsr = Resource::lookup("replicasets").expect("rs");
        let mut next = rs.clone();
        next["spec"]["replicas"] = json!(replicas);
        let ann = next["metadata"]["annotations"]
            .as_object_mut()
            .map(|_| ())
            .is_some();
        if !ann {
            next["metadata"]["annotations"] = json!({});
        }
        next["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] =
            json!(spec_replicas(d).to_string());
        let out = self.reg.update(
            rsr,
            meta::namespace(rs),
            meta::name(rs),
            next,
            Sub::Main,
            &WriteOptions::default(),
        )?;
        *last = (*last).max(meta::resource_version(&out).unwrap_or(0));
        let verb = if replicas > spec_replicas(rs) {
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
                meta::name(rs),
                spec_replicas(rs)
            ),
            "deployment-controller",
        );
        Ok(())
    }
}

impl Reconciler for DeploymentController {
    fn name(&self) -> &'static str {
        "deployment"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let want = self.expect.lock().expect("expect").get(key).copied();
        if let Some(rev) = want {
            self.replicasets.wait_for(rev).await;
        }
        let Some(d) = self.deployments.get(key) else {
            self.expect.lock().expect("expect").remove(key);
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
            .list(ns)
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
        let recreate = d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");
        let mut last = 0u64;
        let opts = WriteOptions::default();

        let want = normalized(&template);
        let new_idx = owned.iter().position(|rs| {
            normalized(rs.pointer("/spec/template").unwrap_or(&Value::Null)) == want
        });
        let mut new_rs = new_idx.map(|i| owned.remove(i));
        let old: Vec<Value> = owned;

        if new_rs.is_none() && !paused {
            let total: i64 = old.iter().map(spec_replicas).sum();
            let old_pods: i64 = old.iter().map(|r| status_i(r, "replicas")).sum();
            let initial = if recreate {
                if old_pods == 0 && total == 0 {
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
            let (surge, _) = surge_and_unavailable(&d);
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
            super::events::record(
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

        if !paused {
            if let Some(nrs) = &new_rs {
                if recreate {
                    let mut old_running = 0;
                    for rs in &old {
                        self.scale(rs, 0, &d, &mut last)?;
                        old_running += status_i(rs, "replicas");
                    }
                    if old_running == 0 {
                        self.scale(nrs, replicas, &d, &mut last)?;
                    }
                } else if old.iter().all(|r| spec_replicas(r) == 0) {
                    self.scale(nrs, replicas, &d, &mut last)?;
                } else {
                    let (surge, unavailable) = surge_and_unavailable(&d);
                    let all: i64 = old.iter().map(spec_replicas).sum::<i64>() + spec_replicas(nrs);
                    // Scale up the new ReplicaSet within maxSurge.
                    let max_total = replicas + surge;
                    let mut new_count = spec_replicas(nrs);
                    if all < max_total && new_count < replicas {
                        new_count = (new_count + (max_total - all)).min(replicas);
                        self.scale(nrs, new_count, &d, &mut last)?;
                    }
                    // Scale down old ReplicaSets within maxUnavailable.
                    let all = old.iter().map(spec_replicas).sum::<i64>() + new_count;
                    let min_available = replicas - unavailable;
                    let new_unavailable = (new_count - status_i(nrs, "availableReplicas")).max(0);
                    let mut budget = all - min_available - new_unavailable;
                    let mut olds = old.clone();
                    // First the old pods that are not available anyway.
                    for rs in olds.iter_mut() {
                        if budget <= 0 {
                            break;
                        }
                        let unhealthy = (spec_replicas(rs) - status_i(rs, "availableReplicas"))
                            .max(0)
                            .min(budget);
                        if unhealthy > 0 {
                            let to = spec_replicas(rs) - unhealthy;
                            self.scale(rs, to, &d, &mut last)?;
                            rs["spec"]["replicas"] = json!(to);
                            budget -= unhealthy;
                        }
                    }
                    // Then available ones, keeping minAvailable.
                    let available: i64 = olds
                        .iter()
                        .map(|r| status_i(r, "availableReplicas").min(spec_replicas(r)))
                        .sum::<i64>()
                        + status_i(nrs, "availableReplicas");
                    let mut down = (available - min_available).min(budget.max(0));
                    for rs in olds.iter() {
                        if down <= 0 {
                            break;
                        }
                        let n = spec_replicas(rs).min(down);
                        if n > 0 {
                            self.scale(rs, spec_replicas(rs) - n, &d, &mut last)?;
                            down -= n;
                        }
                    }
                }
            }
            // History: delete old, empty ReplicaSets beyond revisionHistoryLimit.
            let limit = d
                .pointer("/spec/revisionHistoryLimit")
                .and_then(Value::as_i64)
                .unwrap_or(10)
                .max(0) as usize;
            let empty: Vec<&Value> = old
                .iter()
                .filter(|r| spec_replicas(r) == 0 && status_i(r, "replicas") == 0)
                .collect();
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
        if last > 0 {
            self.expect
                .lock()
                .expect("expect")
                .insert(key.to_string(), last);
        }
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
        let recreate = d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");
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
