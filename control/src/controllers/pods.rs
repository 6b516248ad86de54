//! Pod facts the controllers share: readiness, availability, the order pods are deleted in,
//! and making a pod from a template.

use std::cmp::Ordering;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use skiff_api::conditions;

use super::runtime::Object;

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

pub fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), Some("Succeeded") | Some("Failed"))
}

/// Counted as one of a workload's replicas: not finished and not being deleted.
pub fn is_active(pod: &Pod) -> bool {
    !is_terminal(pod) && pod.metadata.deletion_timestamp.is_none()
}

fn pod_conditions(pod: &Pod) -> Option<&[PodCondition]> {
    pod.status.as_ref()?.conditions.as_deref()
}

pub fn is_ready(pod: &Pod) -> bool {
    conditions::is_true(pod_conditions(pod), "Ready")
}

/// Ready for at least `min_ready_seconds` as of `now` (unix seconds).
pub fn is_available(pod: &Pod, min_ready_seconds: i64, now: i64) -> bool {
    if !is_ready(pod) {
        return false;
    }
    if min_ready_seconds == 0 {
        return true;
    }
    conditions::get(pod_conditions(pod), "Ready")
        .and_then(|c| c.last_transition_time.as_ref())
        .is_some_and(|t| t.0.as_second() + min_ready_seconds <= now)
}

fn phase_rank(pod: &Pod) -> u8 {
    match phase(pod) {
        Some("Pending") => 0,
        Some("Running") => 2,
        _ => 1,
    }
}

/// The order pods are removed in when scaling down, as Kubernetes' `ActivePods` sorts them:
/// unscheduled before scheduled, pending before running, not ready before ready,
/// more restarts first, newer before older.
pub fn deletion_order(a: &Pod, b: &Pod) -> Ordering {
    let scheduled = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| !n.is_empty())
    };
    let restarts = |p: &Pod| -> i64 {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| i64::from(c.restart_count)).sum())
            .unwrap_or(0)
    };
    let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    scheduled(a)
        .cmp(&scheduled(b))
        .then(phase_rank(a).cmp(&phase_rank(b)))
        .then(is_ready(a).cmp(&is_ready(b)))
        .then(restarts(b).cmp(&restarts(a)))
        .then(created(b).cmp(&created(a)))
}

/// The controller reference to `owner`, as its pods and other dependents carry it.
pub fn controller_ref<K: Object>(owner: &K) -> OwnerReference {
    let m = owner.metadata();
    OwnerReference {
        api_version: K::API_VERSION.to_string(),
        kind: K::KIND.to_string(),
        name: m.name.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// A new pod for `owner` from its pod template.
pub fn from_template<K: Object>(owner: &K, template: &PodTemplateSpec) -> Pod {
    let m = owner.metadata();
    let tm = template.metadata.as_ref();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", m.name.as_deref().unwrap_or(""))),
            namespace: m.namespace.clone(),
            labels: Some(tm.and_then(|t| t.labels.clone()).unwrap_or_default()),
            annotations: tm.and_then(|t| t.annotations.clone()),
            owner_references: Some(vec![controller_ref(owner)]),
            ..Default::default()
        },
        spec: Some(template.spec.clone().unwrap_or_default()),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("a pod")
    }

    #[test]
    fn unready_and_unscheduled_pods_go_first() {
        let ready = pod(
            json!({"spec": {"nodeName": "n", "containers": []}, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let unready = pod(
            json!({"spec": {"nodeName": "n", "containers": []}, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}}),
        );
        let pending = pod(json!({"spec": {"containers": []}, "status": {"phase": "Pending"}}));
        let mut v = vec![ready.clone(), unready.clone(), pending.clone()];
        v.sort_by(deletion_order);
        assert_eq!(v, vec![pending, unready, ready]);
    }

    #[test]
    fn availability_waits_for_min_ready_seconds() {
        let p = pod(
            json!({"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}}),
        );
        let t = skiff_api::table::parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
        assert!(is_available(&p, 0, t));
        assert!(!is_available(&p, 10, t + 5));
        assert!(is_available(&p, 10, t + 10));
    }
}
