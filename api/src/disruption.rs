//! PodDisruptionBudgets (`policy/v1`): how many of a budget's pods may be disrupted now.
//!
//! As Kubernetes' disruption controller: the expected pods are the scale (`spec.replicas`) of
//! the controllers of the budget's pods, plus its pods no controller with a scale owns; the
//! healthy ones are its Ready pods that are neither finished nor being deleted.
//! `minAvailable` (a number, or a percentage of the expected pods rounded up) or
//! `maxUnavailable` (the same, subtracted from the expected pods) gives the healthy count
//! wanted; the disruptions allowed are the healthy pods above it.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::selector::Selector;

/// Whether `pdb` covers `pod` (same namespace checked by the caller). A budget without a
/// selector covers nothing; an empty selector covers every pod (`policy/v1`).
pub fn covers(pdb: &PodDisruptionBudget, pod: &Pod) -> bool {
    let Some(sel) = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let Ok(sel) = Selector::from_label_selector(sel) else {
        return false;
    };
    sel.matches(&pod.metadata.labels.clone().unwrap_or_default())
}

fn resolve(v: &IntOrString, total: i32) -> i32 {
    match v {
        IntOrString::Int(n) => *n,
        IntOrString::String(s) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            ((pct * i64::from(total) + 99) / 100) as i32
        }
    }
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn counted(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// A budget's counts over its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub expected: i32,
    pub healthy: i32,
    pub desired: i32,
    pub allowed: i32,
}

impl Budget {
    /// As the PodDisruptionBudget's status.
    pub fn to_status(self, generation: Option<i64>) -> PodDisruptionBudgetStatus {
        PodDisruptionBudgetStatus {
            current_healthy: Some(self.healthy),
            desired_healthy: Some(self.desired),
            disruptions_allowed: Some(self.allowed),
            expected_pods: Some(self.expected),
            observed_generation: generation,
            ..Default::default()
        }
    }
}

/// The counts of `pdb` over `pods` (those of its namespace); `scale` answers the
/// `spec.replicas` of a controller (kind, name), None when it has none or is unknown.
pub fn budget(
    pdb: &PodDisruptionBudget,
    pods: &[Pod],
    scale: impl Fn(&str, &str) -> Option<i32>,
) -> Budget {
    let mine: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            covers(pdb, p) && !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .collect();
    let mut controllers = std::collections::BTreeMap::new();
    let mut uncontrolled = 0;
    for p in &mine {
        let owner = p
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        match owner.and_then(|o| Some((o, scale(&o.kind, &o.name)?))) {
            Some((o, n)) => {
                controllers.insert((o.kind.clone(), o.name.clone()), n);
            }
            None if counted(p) => uncontrolled += 1,
            None => {}
        }
    }
    let expected = controllers.values().sum::<i32>() + uncontrolled;
    let healthy = mine.iter().filter(|p| counted(p) && ready(p)).count() as i32;
    let spec = pdb.spec.clone().unwrap_or_default();
    let desired = match (&spec.min_available, &spec.max_unavailable) {
        (Some(min), _) => resolve(min, expected),
        (None, Some(max)) => (expected - resolve(max, expected)).max(0),
        // Neither: as minAvailable 1 (the API server's default for policy/v1beta1).
        (None, None) => 1.min(expected),
    };
    Budget {
        expected,
        healthy,
        desired,
        allowed: (healthy - desired).max(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pdb(spec: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(json!({"metadata": {"name": "b"}, "spec": spec})).unwrap()
    }

    fn pod(app: &str, ready: bool, deleting: bool) -> Pod {
        let mut p = json!({"metadata": {"name": "p", "labels": {"app": app}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn allowed_disruptions_follow_min_available_and_max_unavailable() {
        let sel = json!({"matchLabels": {"app": "web"}});
        let four: Vec<Pod> = (0..4).map(|_| pod("web", true, false)).collect();
        let b = budget(
            &pdb(json!({"selector": sel, "maxUnavailable": 1})),
            &four,
            |_, _| None,
        );
        assert_eq!(
            b,
            Budget {
                expected: 4,
                healthy: 4,
                desired: 3,
                allowed: 1
            }
        );
        assert_eq!(b.to_status(None).disruptions_allowed, Some(1));
        // One being evicted, its replacement not ready yet: no further disruption.
        let mut pods = four[..3].to_vec();
        pods.push(pod("web", true, true));
        pods.push(pod("web", false, false));
        let b = budget(
            &pdb(json!({"selector": sel, "maxUnavailable": 1})),
            &pods,
            |_, _| None,
        );
        assert_eq!((b.expected, b.healthy, b.allowed), (4, 3, 0));
        // Pods of a ReplicaSet of 3: the scale is expected, whatever pods exist or leave.
        let owned = |ready: bool, deleting: bool| {
            let mut p = pod("web", ready, deleting);
            p.metadata.owner_references = serde_json::from_value(json!([
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u", "controller": true}]))
            .unwrap();
            p
        };
        let pods = vec![owned(true, true), owned(true, false), owned(true, false)];
        let rs3 = |k: &str, n: &str| (k == "ReplicaSet" && n == "web-1").then_some(3);
        let b = budget(
            &pdb(json!({"selector": sel, "maxUnavailable": 1})),
            &pods,
            rs3,
        );
        assert_eq!((b.expected, b.healthy, b.desired, b.allowed), (3, 2, 2, 0));
        // Percentages round up; other apps' pods do not count.
        let mut pods = four.clone();
        pods.push(pod("db", true, false));
        let b = budget(
            &pdb(json!({"selector": sel, "minAvailable": "50%"})),
            &pods,
            |_, _| None,
        );
        assert_eq!((b.desired, b.allowed), (2, 2));
        let b = budget(
            &pdb(json!({"selector": sel, "minAvailable": "51%"})),
            &pods,
            |_, _| None,
        );
        assert_eq!(b.desired, 3);
        // No selector covers nothing.
        let b = budget(&pdb(json!({"minAvailable": 1})), &pods, |_, _| None);
        assert_eq!(b.expected, 0);
    }
}
