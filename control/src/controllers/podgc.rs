//! The pod garbage collector, as Kubernetes' `pkg/controller/podgc`: every pass it
//! force-deletes (grace period zero) the pods no kubelet will ever finish —
//!
//! - pods bound to a Node that no longer exists, once the node has been missing for the
//!   quarantine (a node being re-registered is not mistaken for a deleted one) and the
//!   store, not only the cache, says it is gone;
//! - terminating pods on a node that is not ready and is tainted out of service;
//! - terminating pods on a node that is not ready and is tainted unreachable, once their
//!   grace period is over: the node's agent, gone, will never confirm them (pods of
//!   StatefulSets excepted, whose at-most-one guarantee needs that confirmation);
//! - terminating pods never bound to a node;
//! - finished (Succeeded/Failed) pods beyond the threshold, oldest first.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use skiff_api::ApiError;

use super::api;
use super::nodelifecycle::is_ready;
use super::pods::is_terminal;
use super::runtime::Cache;
use crate::registry::{DeleteOptions, Registry};

/// The taint that says a node is out of service and its pods may be removed.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

pub struct PodGc {
    pub reg: Arc<Registry>,
    pub pods: Arc<Cache<Pod>>,
    pub nodes: Arc<Cache<Node>>,
    /// Finished pods kept at most; 0 keeps them all (`--terminated-pod-gc-threshold`).
    pub terminated_threshold: usize,
    /// How long a node must be missing before its pods are collected.
    pub quarantine: Duration,
    /// Node names seen missing, and since when.
    missing_since: Mutex<HashMap<String, Instant>>,
}

fn node_name(p: &Pod) -> &str {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
}

/// When the pod's graceful deletion's grace period ends.
fn grace_over(p: &Pod) -> Option<Timestamp> {
    let grace = p.metadata.deletion_grace_period_seconds.unwrap_or(0);
    p.metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| t.0.checked_add(SignedDuration::from_secs(grace)).ok())
}

fn of_statefulset(p: &Pod) -> bool {
    p.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "StatefulSet" && o.controller == Some(true))
}

fn has_no_execute(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key == key && t.effect == "NoExecute"))
}

fn unreachable(node: &Node) -> bool {
    has_no_execute(node, super::nodelifecycle::UNREACHABLE_TAINT)
}

fn out_of_service(node: &Node) -> bool {
    has_no_execute(node, OUT_OF_SERVICE_TAINT)
}

impl PodGc {
    pub fn new(
        reg: Arc<Registry>,
        pods: Arc<Cache<Pod>>,
        nodes: Arc<Cache<Node>>,
        terminated_threshold: usize,
        quarantine: Duration,
    ) -> PodGc {
        PodGc {
            reg,
            pods,
            nodes,
            terminated_threshold,
            quarantine,
            missing_since: Mutex::new(HashMap::new()),
        }
    }

    /// One pass. Returns how many pods it deleted.
    pub fn check(&self) -> Result<usize, ApiError> {
        let pods = self.pods.list(None);
        let nodes: HashMap<String, Arc<Node>> = self
            .nodes
            .list(None)
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
            .collect();
        let mut doomed: Vec<(&Arc<Pod>, &'static str)> = Vec::new();
        // Finished pods beyond the threshold, oldest first.
        if self.terminated_threshold > 0 {
            let mut finished: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_terminal(p)).collect();
            if finished.len() > self.terminated_threshold {
                finished.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
                let excess = finished.len() - self.terminated_threshold;
                doomed.extend(finished.into_iter().take(excess).map(|p| (p, "terminated")));
            }
        }
        // Pods whose node is gone, after the quarantine.
        let now = Instant::now();
        let missing: HashSet<&str> = pods
            .iter()
            .map(|p| node_name(p))
            .filter(|n| !n.is_empty() && !nodes.contains_key(*n))
            .collect();
        let gone: HashSet<String> = {
            let mut since = self.missing_since.lock().expect("missing nodes");
            since.retain(|n, _| missing.contains(n.as_str()));
            let mut gone = HashSet::new();
            for n in &missing {
                let first = *since.entry(n.to_string()).or_insert(now);
                if now.duration_since(first) >= self.quarantine {
                    gone.insert(n.to_string());
                }
            }
            gone
        };
        let mut confirmed = HashSet::new();
        for n in gone {
            // The cache may lag: ask the store before deleting anything.
            if api::get::<Node>(&self.reg, None, &n)?.is_none() {
                confirmed.insert(n);
            }
        }
        for p in &pods {
            let node = node_name(p);
            if confirmed.contains(node) {
                doomed.push((p, "orphaned"));
            } else if p.metadata.deletion_timestamp.is_some() {
                if node.is_empty() {
                    doomed.push((p, "unscheduled and terminating"));
                } else if nodes
                    .get(node)
                    .is_some_and(|n| !is_ready(n) && out_of_service(n))
                {
                    doomed.push((p, "terminating on an out-of-service node"));
                } else if nodes
                    .get(node)
                    .is_some_and(|n| !is_ready(n) && unreachable(n))
                    && !of_statefulset(p)
                    && grace_over(p).is_some_and(|t| t <= super::tainteviction::now())
                {
                    doomed.push((
                        p,
                        "terminating on an unreachable node past its grace period",
                    ));
                }
            }
        }
        let mut seen = HashSet::new();
        let mut deleted = 0;
        for (p, why) in doomed {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if !seen.insert(uid.clone()) {
                continue;
            }
            let name = p.metadata.name.as_deref().unwrap_or("");
            tracing::info!(
                pod = name,
                node = node_name(p),
                reason = why,
                "collecting pod"
            );
            match api::delete::<Pod>(
                &self.reg,
                p.metadata.namespace.as_deref(),
                name,
                &DeleteOptions {
                    grace_period_seconds: Some(0),
                    precondition_uid: Some(uid),
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
    use crate::registry::{ClusterConfig, WriteOptions};
    use crate::store::sqlite::SqliteStore;
    use serde_json::{json, Value};
    use skiff_api::{meta, Resource};

    fn res(n: &str) -> &'static Resource {
        Resource::lookup(n).expect("resource")
    }

    struct World {
        reg: Arc<Registry>,
        pods: Arc<Cache<Pod>>,
        nodes: Arc<Cache<Node>>,
        _dir: tempfile::TempDir,
    }

    /// `v` with the merge patch `patch` applied: a fixture as the cache would see it.
    fn merged(v: &Value, patch: Value) -> Value {
        skiff_api::patch::apply(skiff_api::patch::PatchKind::Merge, v, &patch).unwrap()
    }

    impl World {
        fn new() -> World {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
            let reg = Registry::new(store, ClusterConfig::default());
            reg.create(
                res("namespaces"),
                None,
                json!({"metadata": {"name": "default"}}),
                &WriteOptions::default(),
            )
            .unwrap();
            World {
                reg,
                pods: Cache::<Pod>::new(),
                nodes: Cache::<Node>::new(),
                _dir: dir,
            }
        }

        fn node(&self, name: &str, ready: bool, taints: Value) {
            let n = self
                .reg
                .create(res("nodes"), None, json!({"metadata": {"name": name}, "spec": {"taints": taints},
                    "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}),
                    &WriteOptions::default())
                .unwrap();
            self.nodes.insert(n);
        }

        /// A pod on `node` ("" for none), in `phase`, optionally being deleted gracefully
        /// (an unbound one is held by a finalizer, else it would go at once).
        fn pod(&self, name: &str, node: &str, phase: &str, deleting: bool) -> Value {
            let spec = json!({"containers": [{"name": "c", "image": "x:1"}], "terminationGracePeriodSeconds": 30,
                "nodeName": if node.is_empty() { Value::Null } else { json!(node) }});
            let p = self
                .reg
                .create(
                    res("pods"),
                    Some("default"),
                    json!({"metadata": {"name": name}, "spec": spec}),
                    &WriteOptions::default(),
                )
                .unwrap();
            let p = merged(&p, json!({"status": {"phase": phase}}));
            let mut p = self
                .reg
                .update(
                    res("pods"),
                    Some("default"),
                    name,
                    p,
                    crate::registry::Sub::Status,
                    &WriteOptions::default(),
                )
                .unwrap();
            if deleting && node.is_empty() {
                p = merged(
                    &p,
                    json!({"metadata": {"finalizers": ["example.com/hold"]}}),
                );
                p = self
                    .reg
                    .update(
                        res("pods"),
                        Some("default"),
                        name,
                        p,
                        crate::registry::Sub::Main,
                        &WriteOptions::default(),
                    )
                    .unwrap();
            }
            if deleting {
                p = self
                    .reg
                    .delete(
                        res("pods"),
                        Some("default"),
                        name,
                        &DeleteOptions::default(),
                    )
                    .unwrap();
                assert!(meta::is_deleting(&p));
            }
            self.pods.insert(p.clone());
            p
        }

        fn left(&self) -> Vec<String> {
            let (items, _) = self.reg.store().list(&res("pods").key_prefix()).unwrap();
            let mut names: Vec<String> = items.iter().map(|p| meta::name(p).to_string()).collect();
            names.sort();
            names
        }

        fn gc(&self, threshold: usize, quarantine: Duration) -> PodGc {
            PodGc::new(
                self.reg.clone(),
                self.pods.clone(),
                self.nodes.clone(),
                threshold,
                quarantine,
            )
        }
    }

    #[tokio::test]
    async fn pods_of_a_deleted_node_go_after_the_quarantine() {
        let w = World::new();
        w.node("alive", true, json!([]));
        w.pod("on-alive", "alive", "Running", false);
        w.pod("on-gone", "gone", "Running", false);
        w.pod("terminating-on-gone", "gone", "Running", true);
        let gc = w.gc(0, Duration::from_millis(200));
        assert_eq!(
            gc.check().unwrap(),
            0,
            "the missing node is quarantined first"
        );
        assert_eq!(w.left().len(), 3);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(gc.check().unwrap(), 2);
        assert_eq!(w.left(), vec!["on-alive"]);
    }

    #[tokio::test]
    async fn a_node_only_the_cache_has_not_seen_keeps_its_pods() {
        let w = World::new();
        // In the store but not (yet) in the cache.
        w.reg
            .create(
                res("nodes"),
                None,
                json!({"metadata": {"name": "late"}}),
                &WriteOptions::default(),
            )
            .unwrap();
        w.pod("on-late", "late", "Running", false);
        let gc = w.gc(0, Duration::ZERO);
        assert_eq!(gc.check().unwrap(), 0);
        assert_eq!(w.left(), vec!["on-late"]);
    }

    #[tokio::test]
    async fn terminating_pods_no_kubelet_will_finish() {
        let w = World::new();
        w.node("ready", true, json!([]));
        w.node("down", false, json!([]));
        w.node(
            "out",
            false,
            json!([{"key": OUT_OF_SERVICE_TAINT, "value": "nodeshutdown", "effect": "NoExecute"}]),
        );
        w.pod("unscheduled", "", "Pending", true);
        w.pod("on-ready", "ready", "Running", true);
        w.pod("on-down", "down", "Running", true);
        w.pod("on-out", "out", "Running", true);
        w.pod("running-on-out", "out", "Running", false);
        let gc = w.gc(0, Duration::from_secs(3600));
        assert_eq!(gc.check().unwrap(), 2);
        // The unbound one is force-deleted: its finalizer alone holds it now.
        let u = w
            .reg
            .get(res("pods"), Some("default"), "unscheduled")
            .unwrap();
        let u: Pod = serde_json::from_value(u).unwrap();
        assert_eq!(u.metadata.deletion_grace_period_seconds, Some(0));
        assert_eq!(
            w.left(),
            vec!["on-down", "on-ready", "running-on-out", "unscheduled"]
        );
    }

    #[tokio::test]
    async fn terminating_pods_on_an_unreachable_node_go_after_their_grace_period() {
        let w = World::new();
        let unreachable =
            json!([{"key": super::super::nodelifecycle::UNREACHABLE_TAINT, "effect": "NoExecute"}]);
        w.node("dark", false, unreachable);
        // Graceful deletions a minute old: one with 30 s of grace, one with an hour.
        let long_ago = json!({"metadata": {"deletionTimestamp": "2020-01-01T00:00:00Z"}});
        let short = w.pod("short", "dark", "Running", true);
        w.pods.insert(merged(&short, long_ago.clone()));
        let long = w.pod("long", "dark", "Running", true);
        let now = json!({"metadata": {"deletionTimestamp": crate::registry::now()}});
        w.pods.insert(merged(&long, now));
        let sts = w.pod("sts-0", "dark", "Running", true);
        let owned = json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1",
            "kind": "StatefulSet", "name": "sts", "uid": "u1", "controller": true}]}});
        w.pods.insert(merged(&merged(&sts, long_ago), owned));
        w.pod("running", "dark", "Running", false);
        assert_eq!(w.gc(0, Duration::from_secs(3600)).check().unwrap(), 1);
        assert_eq!(w.left(), vec!["long", "running", "sts-0"]);
    }

    #[tokio::test]
    async fn finished_pods_above_the_threshold_go_oldest_first() {
        let w = World::new();
        w.node("n", true, json!([]));
        for i in 0..4 {
            let phase = if i % 2 == 0 { "Succeeded" } else { "Failed" };
            let p = w.pod(&format!("done-{i}"), "n", phase, false);
            // Created a minute apart, as the cache sees them.
            let created = format!("2024-01-01T00:0{i}:00Z");
            w.pods.insert(merged(
                &p,
                json!({"metadata": {"creationTimestamp": created}}),
            ));
        }
        w.pod("running", "n", "Running", false);
        assert_eq!(
            w.gc(0, Duration::ZERO).check().unwrap(),
            0,
            "0 keeps them all"
        );
        assert_eq!(w.gc(2, Duration::ZERO).check().unwrap(), 2);
        assert_eq!(w.left(), vec!["done-2", "done-3", "running"]);
    }
}
