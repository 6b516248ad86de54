//! The ReplicaSet controller: keeps `spec.replicas` active pods, adopting matching orphans and
//! releasing pods that no longer match, deleting unready pods first when scaling down.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use skiff_api::k8s::apimachinery::pkg::apis::meta::v1::LabelSelector;
use skiff_api::selector::Selector;
use skiff_api::ApiError;

use super::api;
use super::pods;
use super::runtime::{split_key, Action, Cache, Expectations, Reconciler};
use crate::registry::{Registry, Sub};

/// Most pods created or deleted in one reconcile (Kubernetes' burst is 500).
const BURST: usize = 500;

pub struct ReplicaSetController {
    pub reg: Arc<Registry>,
    pub replicasets: Arc<Cache<ReplicaSet>>,
    pub pods: Arc<Cache<Pod>>,
    /// Revision of this controller's last pod write per key: the next reconcile waits for it.
    expect: Expectations,
}

impl ReplicaSetController {
    pub fn new(
        reg: Arc<Registry>,
        replicasets: Arc<Cache<ReplicaSet>>,
        pods: Arc<Cache<Pod>>,
    ) -> Self {
        ReplicaSetController {
            reg,
            replicasets,
            pods,
            expect: Expectations::default(),
        }
    }
}

/// A label selector as a matcher.
pub(crate) fn selector(ls: &LabelSelector) -> Result<Selector, ApiError> {
    Selector::from_label_selector(ls).map_err(ApiError::internal)
}

pub(crate) fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn labels_match(
    want: Option<&std::collections::BTreeMap<String, String>>,
    have: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    want.into_iter()
        .flatten()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
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
        if rs.metadata.deletion_timestamp.is_some() {
            return Ok(Action::AwaitChange);
        }
        let (ns, _) = split_key(key);
        let spec = rs.spec.clone();
        let sel = selector(&spec.selector)?;
        let uid = rs.metadata.uid.clone().unwrap_or_default();
        let mut owned: Vec<Arc<Pod>> = Vec::new();
        let mut last_rev = 0;
        for p in self.pods.list(ns) {
            let refs = p.metadata.owner_references.as_deref().unwrap_or_default();
            let controller = refs.iter().find(|o| o.controller == Some(true));
            let empty = Default::default();
            let matches = sel.matches(p.metadata.labels.as_ref().unwrap_or(&empty));
            let pod_name = p.metadata.name.as_deref().unwrap_or("");
            match (
                controller.is_some_and(|o| o.uid == uid),
                controller.is_some(),
                matches,
            ) {
                (true, _, true) => owned.push(p),
                (true, _, false) => {
                    // Release: the pod no longer matches.
                    let left: Vec<_> = refs.iter().filter(|o| o.uid != uid).collect();
                    let out = api::patch::<Pod>(
                        &self.reg,
                        ns,
                        pod_name,
                        &json!({"metadata": {"ownerReferences": left, "resourceVersion": p.metadata.resource_version}}),
                        Sub::Main,
                    );
                    if let Ok(o) = out {
                        last_rev = last_rev.max(api::revision(&o.metadata));
                    }
                }
                (false, false, true) if pods::is_active(&p) => {
                    // Adopt a matching orphan.
                    let mut refs = refs.to_vec();
                    refs.push(pods::controller_ref(&*rs));
                    let out = api::patch::<Pod>(
                        &self.reg,
                        ns,
                        pod_name,
                        &json!({"metadata": {"ownerReferences": refs, "resourceVersion": p.metadata.resource_version}}),
                        Sub::Main,
                    );
                    if let Ok(o) = out {
                        last_rev = last_rev.max(api::revision(&o.metadata));
                        owned.push(Arc::new(o));
                    }
                }
                _ => {}
            }
        }
        let mut active: Vec<&Pod> = owned
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| pods::is_active(p))
            .collect();
        let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
        let mut result = Ok(());
        if active.len() < replicas {
            let template = spec.template.clone().unwrap_or_default();
            for _ in 0..(replicas - active.len()).min(BURST) {
                let pod = pods::from_template(&*rs, &template);
                match api::create(&self.reg, ns, &pod) {
                    Ok(p) => last_rev = last_rev.max(api::revision(&p.metadata)),
                    Err(e) => {
                        super::events::record(
                            &self.reg,
                            &*rs,
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
                let pod_name = p.metadata.name.as_deref().unwrap_or("");
                match api::delete::<Pod>(&self.reg, ns, pod_name, &Default::default()) {
                    Ok(rev) => last_rev = last_rev.max(rev),
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
        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        let now = now_unix();
        let live: Vec<&Pod> = owned
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| pods::is_active(p))
            .collect();
        let template_labels = spec
            .template
            .as_ref()
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.as_ref());
        let fully = live
            .iter()
            .filter(|p| labels_match(template_labels, p.metadata.labels.as_ref()))
            .count();
        let ready = live.iter().filter(|p| pods::is_ready(p)).count();
        let available = live
            .iter()
            .filter(|p| pods::is_available(p, min_ready, now))
            .count();
        let status = ReplicaSetStatus {
            replicas: live.len() as i32,
            fully_labeled_replicas: Some(fully as i32),
            ready_replicas: Some(ready as i32),
            available_replicas: Some(available as i32),
            observed_generation: rs.metadata.generation,
            ..Default::default()
        };
        let cur = rs.status.clone().unwrap_or_default();
        let counts = |s: &ReplicaSetStatus| {
            (
                s.replicas,
                s.fully_labeled_replicas.unwrap_or(0),
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
                s.observed_generation.unwrap_or(0),
            )
        };
        if counts(&cur) != counts(&status) {
            api::update_status(&self.reg, &*rs, &status)?;
        }
        // Pods ready but not yet available are looked at again when they become so.
        if min_ready > 0 && ready > available {
            return Ok(Action::RequeueAfter(Duration::from_secs(1)));
        }
        Ok(Action::AwaitChange)
    }
}
