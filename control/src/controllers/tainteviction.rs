//! Taint-based eviction, as Kubernetes' `pkg/controller/tainteviction`: a pod on a node with a
//! `NoExecute` taint it does not tolerate is deleted at once; one that tolerates every such
//! taint, some for `tolerationSeconds`, is deleted when the first of those runs out (counted
//! from the taint's `timeAdded`); one that tolerates them all without seconds stays.
//!
//! Deletion is graceful (the pod's own grace period), so a ReplicaSet replaces the pod at once;
//! the pod garbage collector force-deletes it later if its node never confirms.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use skiff_api::ApiError;

use super::api;
use super::runtime::Cache;
use crate::registry::{DeleteOptions, Registry};

/// Now, as the timestamps of k8s-openapi types are.
pub fn now() -> Timestamp {
    Timestamp::from_microsecond(chrono::Utc::now().timestamp_micros()).unwrap_or(Timestamp::MAX)
}

/// Whether `toleration` tolerates `taint` (`ToleratesTaint` in Kubernetes).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or("");
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or("");
    let op = toleration.operator.as_deref().unwrap_or("Equal");
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match op {
        "Exists" => true,
        "Equal" | "" => {
            !key.is_empty()
                && toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

/// What becomes of a pod on a node with NoExecute taints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// Some taint is not tolerated: delete now.
    Now,
    /// Every taint is tolerated, some only for a while: delete at this time.
    At(Timestamp),
    /// Every taint is tolerated for good (or there is none).
    Never,
}

/// The decision for a pod with `tolerations` on a node with `taints` (only `NoExecute` ones
/// count). A taint without `timeAdded` counts from `now`; negative seconds mean zero.
pub fn decide(tolerations: &[Toleration], taints: &[Taint], now: Timestamp) -> Eviction {
    let mut due: Option<Timestamp> = None;
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        // As Kubernetes' GetMatchingTolerations: the first toleration of the taint counts.
        let Some(used) = tolerations.iter().find(|t| tolerates(t, taint)) else {
            return Eviction::Now;
        };
        if let Some(s) = used.toleration_seconds.map(|s| s.max(0)) {
            let from = taint.time_added.as_ref().map_or(now, |t| t.0);
            let at = from
                .checked_add(SignedDuration::from_secs(s))
                .unwrap_or(Timestamp::MAX);
            due = Some(due.map_or(at, |d| d.min(at)));
        }
    }
    match due {
        Some(at) if at <= now => Eviction::Now,
        Some(at) => Eviction::At(at),
        None => Eviction::Never,
    }
}

pub struct TaintEviction {
    pub reg: Arc<Registry>,
    pub nodes: Arc<Cache<Node>>,
    pub pods: Arc<Cache<Pod>>,
}

impl TaintEviction {
    /// One pass: deletes the pods whose time is up. Returns how many it deleted.
    pub fn check(&self) -> Result<usize, ApiError> {
        self.check_at(now())
    }

    pub fn check_at(&self, now: Timestamp) -> Result<usize, ApiError> {
        let tainted: HashMap<String, Vec<Taint>> = self
            .nodes
            .list(None)
            .into_iter()
            .filter_map(|n| {
                let taints: Vec<Taint> = n
                    .spec
                    .as_ref()?
                    .taints
                    .iter()
                    .flatten()
                    .filter(|t| t.effect == "NoExecute")
                    .cloned()
                    .collect();
                (!taints.is_empty()).then(|| (n.metadata.name.clone().unwrap_or_default(), taints))
            })
            .collect();
        if tainted.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for p in self.pods.list(None) {
            if p.metadata.deletion_timestamp.is_some() || super::pods::is_terminal(&p) {
                continue;
            }
            let spec = p.spec.as_ref();
            let Some(node) = spec.and_then(|s| s.node_name.as_deref()) else {
                continue;
            };
            let Some(taints) = tainted.get(node) else {
                continue;
            };
            let tolerations = spec
                .and_then(|s| s.tolerations.as_deref())
                .unwrap_or_default();
            if decide(tolerations, taints, now) != Eviction::Now {
                continue;
            }
            let ns = p.metadata.namespace.as_deref();
            let name = p.metadata.name.as_deref().unwrap_or("");
            tracing::warn!(
                node,
                pod = name,
                "evicting pod from a NoExecute-tainted node"
            );
            super::events::record(
                &self.reg,
                &*p,
                "Normal",
                "TaintManagerEviction",
                &format!(
                    "Marking for deletion Pod {}/{name}",
                    ns.unwrap_or("default")
                ),
                "taint-eviction-controller",
            );
            match api::delete::<Pod>(
                &self.reg,
                ns,
                name,
                &DeleteOptions {
                    precondition_uid: p.metadata.uid.clone(),
                    ..Default::default()
                },
            ) {
                Ok(_) => deleted += 1,
                Err(e) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn taint(key: &str, added: &str) -> Taint {
        serde_json::from_value(json!({"key": key, "effect": "NoExecute", "timeAdded": added}))
            .unwrap()
    }

    fn tol(v: Value) -> Toleration {
        serde_json::from_value(v).unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

    #[test]
    fn untolerated_taints_evict_at_once() {
        let t = [taint(UNREACHABLE, "2026-01-01T00:00:00Z")];
        let now = at("2026-01-01T00:00:01Z");
        assert_eq!(decide(&[], &t, now), Eviction::Now);
        // A NoSchedule toleration does not cover NoExecute; another key does not either.
        let wrong = [
            tol(json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoSchedule"})),
            tol(json!({"key": "other", "operator": "Exists"})),
        ];
        assert_eq!(decide(&wrong, &t, now), Eviction::Now);
        // NoSchedule taints are not this controller's business.
        let ns: Taint =
            serde_json::from_value(json!({"key": "k", "effect": "NoSchedule"})).unwrap();
        assert_eq!(decide(&[], &[ns], now), Eviction::Never);
    }

    #[test]
    fn toleration_seconds_count_from_the_taints_time_added() {
        let t = [taint(UNREACHABLE, "2026-01-01T00:00:00Z")];
        let ten = [tol(
            json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10}),
        )];
        assert_eq!(
            decide(&ten, &t, at("2026-01-01T00:00:05Z")),
            Eviction::At(at("2026-01-01T00:00:10Z"))
        );
        assert_eq!(decide(&ten, &t, at("2026-01-01T00:00:10Z")), Eviction::Now);
        // Without seconds: kept for good; an empty key with Exists tolerates everything.
        let forever = [tol(
            json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}),
        )];
        assert_eq!(
            decide(&forever, &t, at("2030-01-01T00:00:00Z")),
            Eviction::Never
        );
        let all = [tol(json!({"operator": "Exists"}))];
        assert_eq!(
            decide(&all, &t, at("2030-01-01T00:00:00Z")),
            Eviction::Never
        );
        // Negative seconds are zero.
        let neg = [tol(
            json!({"key": UNREACHABLE, "operator": "Exists", "tolerationSeconds": -5}),
        )];
        assert_eq!(decide(&neg, &t, at("2026-01-01T00:00:00Z")), Eviction::Now);
    }

    #[test]
    fn the_first_toleration_to_run_out_decides() {
        let t = [
            taint(UNREACHABLE, "2026-01-01T00:00:00Z"),
            taint("example.com/maintenance", "2026-01-01T00:00:20Z"),
        ];
        let tols = [
            tol(
                json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 3600}),
            ),
            tol(
                json!({"key": "example.com/maintenance", "operator": "Exists", "tolerationSeconds": 5}),
            ),
        ];
        assert_eq!(
            decide(&tols, &t, at("2026-01-01T00:00:21Z")),
            Eviction::At(at("2026-01-01T00:00:25Z"))
        );
        // Equal needs the value to match.
        let valued: Taint = serde_json::from_value(
            json!({"key": "dedicated", "value": "edge", "effect": "NoExecute"}),
        )
        .unwrap();
        let eq = tol(json!({"key": "dedicated", "operator": "Equal", "value": "edge"}));
        let ne = tol(json!({"key": "dedicated", "value": "core"}));
        assert!(tolerates(&eq, &valued));
        assert!(!tolerates(&ne, &valued));
    }
}
