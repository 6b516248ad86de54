//! The ReplicaSet controller: keeps `spec.replicas` active pods, adopting matching orphans and
//! releasing pods that no longer match, deleting unready pods first when scaling down.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use skiff_api::k8s::apimachinery::pkg::apis::meta::v1::LabelSelector;
use skiff_api::patch::PatchKind;
use skiff_api::selector::Selector;
use skiff_api::{meta, ApiError, Resource};

use super::pods;
use super::runtime::{split_key, Action, Cache, Expectations, Reconciler};
use crate::registry::{Registry, Sub, WriteOptions};

/// Most pods created or deleted in one reconcile (Kubernetes' burst is 500).
const BURST: usize = 500;

pub struct ReplicaSetController {
    pub reg: Arc<Registry>,
    pub replicasets: Arc<Cache>,
    pub pods: Arc<Cache>,
    /// Revision of this controller's last pod write per key: the next reconcile waits for it.
    expect: Expectations,
}

impl ReplicaSetController {
    pub fn new(reg: Arc<Registry>, replicasets: Arc<Cache>, pods: Arc<Cache>) -> Self {
        ReplicaSetController {
            reg,
            replicasets,
            pods,
            expect: Expectations::default(),
        }
    }
}

pub(crate) fn selector_of(obj: &Value) -> Result<Selector, ApiError> {
    let ls: LabelSelector =
        serde_json::from_value(obj.pointer("/spec/selector").cloned().unwrap_or(json!({})))
            .map_err(|e| ApiError::internal(format!("bad selector: {e}")))?;
    Selector::from_label_selector(&ls).map_err(ApiError::internal)
}

pub(crate) fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Reconciler for ReplicaSetController {
    fn name(&self) -> &'static str {
        "replicaset"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        self.expect.settle(key, &self.pods).await;
        let Some(rs) = self.replicasets.get(key) else {
            self.expect.forget(key);
            return Ok(Action::AwaitChange);
        };
        if meta::is_deleting(&rs) {
            return Ok(Action::AwaitChange);
        }
        let (ns, name) = split_key(key);
        let pods_r = Resource::lookup("pods").expect("pods");
        let sel = selector_of(&rs)?;
        let uid = meta::uid(&rs).to_string();
        let opts = WriteOptions::default();
        let mut owned = Vec::new();
        let mut last_rev = 0;
        for p in self.pods.list(ns) {
            let controller = meta::controller_uid(&p);
            let matches = sel.matches(&meta::labels(&p));
            match (
                controller.as_deref() == Some(uid.as_str()),
                controller.is_some(),
                matches,
            ) {
                (true, _, true) => owned.push(p),
                (true, _, false) => {
                    // Release: the pod no longer matches.
                    let refs = meta::owner_refs_without(&p, &uid);
                    let out = self.reg.patch(pods_r, ns, meta::name(&p), PatchKind::Merge,
                        &json!({"metadata": {"ownerReferences": refs, "resourceVersion": p.pointer("/metadata/resourceVersion")}}), Sub::Main, &opts);
                    if let Ok(o) = out {
                        last_rev = last_rev.max(meta::resource_version(&o).unwrap_or(0));
                    }
                }
                (false, false, true) if pods::is_active(&p) => {
                    // Adopt a matching orphan.
                    let mut refs = p
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    refs.push(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}));
                    let out = self.reg.patch(pods_r, ns, meta::name(&p), PatchKind::Merge,
                        &json!({"metadata": {"ownerReferences": refs, "resourceVersion": p.pointer("/metadata/resourceVersion")}}), Sub::Main, &opts);
                    if let Ok(o) = out {
                        last_rev = last_rev.max(meta::resource_version(&o).unwrap_or(0));
                        owned.push(Arc::new(o));
                    }
                }
                _ => {}
            }
        }
        let mut active: Vec<&Value> = owned
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| pods::is_active(p))
            .collect();
        let replicas = rs
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1) as usize;
        let mut result = Ok(());
        if active.len() < replicas {
            let template = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
            for _ in 0..(replicas - active.len()).min(BURST) {
                let pod = pods::from_template(&rs, "ReplicaSet", &template);
                match self.reg.create(pods_r, ns, pod, &opts) {
                    Ok(p) => last_rev = last_rev.max(meta::resource_version(&p).unwrap_or(0)),
                    Err(e) => {
                        super::events::record(
                            &self.reg,
                            &rs,
                            "Warning",
                            "FailedCreate",
                            &format!("Error creating: {}", e.message),
                            "replicaset-controller",
                        );
                        result = Err(e);
                        break;
                    }
                }
            }
        } else if active.len() > replicas {
            active.sort_by(|a, b| pods::deletion_order(a, b));
            for p in active.iter().take((active.len() - replicas).min(BURST)) {
                match self
                    .reg
                    .delete(pods_r, ns, meta::name(p), &Default::default())
                {
                    Ok(o) => last_rev = last_rev.max(meta::resource_version(&o).unwrap_or(0)),
                    Err(e) if e.code == 404 => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        self.expect.wrote(key, last_rev);
        result?;
        // Status from what is there now.
        let min_ready = rs
            .pointer("/spec/minReadySeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let now = now_unix();
        let live: Vec<&Value> = owned
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| pods::is_active(p))
            .collect();
        let template_labels = meta::string_map(rs.pointer("/spec/template/metadata/labels"));
        let fully = live
            .iter()
            .filter(|p| {
                let l = meta::labels(p);
                template_labels.iter().all(|(k, v)| l.get(k) == Some(v))
            })
            .count();
        let ready = live.iter().filter(|p| pods::is_ready(p)).count();
        let available = live
            .iter()
            .filter(|p| pods::is_available(p, min_ready, now))
            .count();
        let status = json!({
            "replicas": live.len(),
            "fullyLabeledReplicas": fully,
            "readyReplicas": ready,
            "availableReplicas": available,
            "observedGeneration": rs.pointer("/metadata/generation"),
        });
        let cur = rs.get("status").cloned().unwrap_or(json!({}));
        let same = [
            "replicas",
            "fullyLabeledReplicas",
            "readyReplicas",
            "availableReplicas",
            "observedGeneration",
        ]
        .iter()
        .all(|k| {
            cur.get(*k).cloned().unwrap_or(json!(0)) == status.get(*k).cloned().unwrap_or(json!(0))
        });
        if !same {
            let rsr = Resource::lookup("replicasets").expect("rs");
            let mut next = (*rs).clone();
            next["status"] = status;
            self.reg.update(rsr, ns, name, next, Sub::Status, &opts)?;
        }
        // Pods ready but not yet available are looked at again when they become so.
        if min_ready > 0 && ready > available {
            return Ok(Action::RequeueAfter(Duration::from_secs(1)));
        }
        Ok(Action::AwaitChange)
    }
}
