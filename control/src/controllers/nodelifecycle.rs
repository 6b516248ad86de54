//! Node lifecycle: a node whose agent stops heartbeating for the grace period goes
//! `Ready=Unknown` and gets the `node.kubernetes.io/unreachable:NoExecute` taint; its pods are
//! marked not ready (so services drop them) and, after the eviction timeout, deleted so their
//! controllers replace them elsewhere. The taint goes when the node reports again.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use skiff_api::{meta, table, ApiError, Resource};

use super::runtime::Cache;
use crate::registry::{set_condition, DeleteOptions, Registry, Sub, WriteOptions};

pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

pub fn ready_condition(node: &Value) -> Option<&Value> {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
}

pub fn is_ready(node: &Value) -> bool {
    ready_condition(node).is_some_and(|c| c["status"] == "True")
}

pub struct NodeLifecycle {
    pub reg: Arc<Registry>,
    pub nodes: Arc<Cache>,
    pub pods: Arc<Cache>,
    pub grace: Duration,
    pub eviction_timeout: Duration,
}

impl NodeLifecycle {
    /// One pass over all nodes; run every second.
    pub fn check(&self) -> Result<(), ApiError> {
        let now = chrono::Utc::now().timestamp();
        let nodes_r = Resource::lookup("nodes").expect("nodes");
        let pods_r = Resource::lookup("pods").expect("pods");
        for node in self.nodes.list(None) {
            let name = meta::name(&node).to_string();
            let Some(cond) = ready_condition(&node) else {
                continue;
            };
            let heartbeat = cond["lastHeartbeatTime"]
                .as_str()
                .and_then(table::parse_rfc3339)
                .unwrap_or(0);
            let stale = now - heartbeat > self.grace.as_secs() as i64;
            let tainted = has_unreachable_taint(&node);
            if stale && cond["status"] != "Unknown" {
                let mut next = (*node).clone();
                set_condition(
                    &mut next,
                    "Ready",
                    "Unknown",
                    "NodeStatusUnknown",
                    "Kubelet stopped posting node status.",
                );
                if let Some(c) = next
                    .pointer_mut("/status/conditions")
                    .and_then(Value::as_array_mut)
                    .and_then(|cs| cs.iter_mut().find(|c| c["type"] == "Ready"))
                {
                    c["lastHeartbeatTime"] = json!(heartbeat_str(&node));
                    if let Some(m) = c.as_object_mut() {
                        m.remove("lastProbeTime");
                    }
                }
                self.reg.update(
                    nodes_r,
                    None,
                    &name,
                    next,
                    Sub::Status,
                    &WriteOptions::default(),
                )?;
                tracing::warn!(node = %name, "node stopped heartbeating; marking it NotReady");
                super::events::record(
                    &self.reg,
                    &node,
                    "Normal",
                    "NodeNotReady",
                    &format!("Node {name} status is now: NodeNotReady"),
                    "node-controller",
                );
                self.mark_pods_not_ready(&name);
                continue;
            }
            if stale {
                // Level-triggered: a write that failed last pass (a pod changed meanwhile)
                // and pods that reached the node since are marked now.
                self.mark_pods_not_ready(&name);
            }
            if stale && !tainted {
                let mut taints = node
                    .pointer("/spec/taints")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                taints.push(json!({"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": crate::registry::now()}));
                self.set_taints(&node, taints)?;
                continue;
            }
            if !stale && tainted && is_ready(&node) {
                let taints = node
                    .pointer("/spec/taints")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                self.set_taints(
                    &node,
                    taints
                        .into_iter()
                        .filter(|t| t["key"] != UNREACHABLE_TAINT)
                        .collect(),
                )?;
                continue;
            }
            if stale && now - heartbeat > (self.grace + self.eviction_timeout).as_secs() as i64 {
                for p in self.pods_on(&name) {
                    if tolerates_unreachable_forever(&p) {
                        continue;
                    }
                    tracing::warn!(node = %name, pod = meta::name(&p), "evicting pod from unreachable node");
                    super::events::record(
                        &self.reg,
                        &p,
                        "Warning",
                        "NodeUnreachable",
                        &format!("Evicting pod: node {name} is unreachable"),
                        "node-controller",
                    );
                    match self.reg.delete(
                        pods_r,
                        meta::namespace(&p),
                        meta::name(&p),
                        &DeleteOptions {
                            grace_period_seconds: Some(0),
                            ..Default::default()
                        },
                    ) {
                        Ok(_) => {}
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Marks the pods on an unreachable node not ready (so services drop them), those that
    /// are not already. A write that fails is retried on the next pass.
    fn mark_pods_not_ready(&self, node: &str) {
        let pods_r = Resource::lookup("pods").expect("pods");
        for p in self.pods_on(node) {
            let already = serde_json::from_value::<Pod>((*p).clone())
                .ok()
                .and_then(|p| p.status?.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "False"));
            if already || super::pods::is_terminal(&p) {
                continue;
            }
            let mut np = (*p).clone();
            set_condition(
                &mut np,
                "Ready",
                "False",
                "NodeNotReady",
                "node is not ready",
            );
            match self.reg.update(
                pods_r,
                meta::namespace(&p),
                meta::name(&p),
                np,
                Sub::Status,
                &WriteOptions::default(),
            ) {
                Ok(_) => {}
                Err(e) if e.code == 404 || e.code == 409 => {}
                Err(e) => {
                    tracing::warn!(node, pod = meta::name(&p), error = %e, "marking a pod not ready failed")
                }
            }
        }
    }

    fn set_taints(&self, node: &Value, taints: Vec<Value>) -> Result<(), ApiError> {
        let mut next = node.clone();
        next["spec"]["taints"] = json!(taints);
        let nodes_r = Resource::lookup("nodes").expect("nodes");
        self.reg
            .update(
                nodes_r,
                None,
                meta::name(node),
                next,
                Sub::Main,
                &WriteOptions::default(),
            )
            .map(|_| ())
    }

    fn pods_on(&self, node: &str) -> Vec<Arc<Value>> {
        self.pods
            .list(None)
            .into_iter()
            .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
            .collect()
    }
}

fn heartbeat_str(node: &Value) -> String {
    ready_condition(node)
        .and_then(|c| c["lastHeartbeatTime"].as_str())
        .unwrap_or("")
        .to_string()
}

fn has_unreachable_taint(node: &Value) -> bool {
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .is_some_and(|ts| ts.iter().any(|t| t["key"] == UNREACHABLE_TAINT))
}

fn tolerates_unreachable_forever(pod: &Value) -> bool {
    pod.pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .is_some_and(|ts| {
            ts.iter().any(|t| {
                (t["key"] == UNREACHABLE_TAINT
                    || (t.get("key").is_none() && t["operator"] == "Exists"))
                    && t.get("tolerationSeconds").is_none_or(Value::is_null)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ClusterConfig;
    use crate::store::sled::SledStore;

    fn res(n: &str) -> &'static Resource {
        Resource::lookup(n).expect("resource")
    }

    fn pod_ready(reg: &Registry) -> Value {
        let p = reg.get(res("pods"), Some("default"), "p").expect("pod");
        ready_condition(&p)
            .map(|c| c["status"].clone())
            .unwrap_or(Value::Null)
    }

    #[tokio::test]
    async fn a_failed_not_ready_write_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        let opts = WriteOptions::default();
        reg.create(
            res("namespaces"),
            None,
            json!({"metadata": {"name": "default"}}),
            &opts,
        )
        .unwrap();
        let node = reg
            .create(res("nodes"), None, json!({"metadata": {"name": "n1"},
                "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2020-01-01T00:00:00Z"}]}}), &opts)
            .unwrap();
        let pod = reg
            .create(
                res("pods"),
                Some("default"),
                json!({"metadata": {"name": "p"},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x:1"}]}}),
                &opts,
            )
            .unwrap();
        let mut ready = pod.clone();
        set_condition(&mut ready, "Ready", "True", "", "");
        let ready = reg
            .update(res("pods"), Some("default"), "p", ready, Sub::Status, &opts)
            .unwrap();
        // The pod cache lags behind the store: the first write, made from it, conflicts.
        let nodes = Cache::new(res("nodes"));
        nodes.insert(node);
        let pods = Cache::new(res("pods"));
        pods.insert(pod);
        let lc = NodeLifecycle {
            reg: reg.clone(),
            nodes: nodes.clone(),
            pods: pods.clone(),
            grace: Duration::from_secs(40),
            eviction_timeout: Duration::from_secs(3600),
        };
        lc.check().unwrap();
        let n1 = reg.get(res("nodes"), None, "n1").unwrap();
        assert_eq!(ready_condition(&n1).unwrap()["status"], "Unknown");
        assert_eq!(
            pod_ready(&reg),
            "True",
            "the conflicting write changed nothing"
        );
        // The caches catch up; the next pass marks the pod.
        nodes.insert(n1);
        pods.insert(ready);
        lc.check().unwrap();
        assert_eq!(pod_ready(&reg), "False");
    }
}
