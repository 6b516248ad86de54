//! Node lifecycle, as Kubernetes' `pkg/controller/nodelifecycle`: a node is healthy while its
//! agent renews its Lease (`kube-node-lease/NODE`) or posts a fresh Ready condition. The
//! controller notes, on its own clock, when it last saw either change (agents' clocks may be
//! off); after the grace period without one the node goes `Ready=Unknown`, its pods are marked
//! not ready (so services drop them) and it gets the `node.kubernetes.io/unreachable:NoExecute`
//! taint. A node that reports `Ready=False` gets `node.kubernetes.io/not-ready:NoExecute`.
//! The taints go when the node is healthy again. Pods leave tainted nodes through the taint
//! eviction controller ([`super::tainteviction`]), after their tolerations' seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, PodCondition, Taint};
use serde_json::json;
use skiff_api::conditions::{self, Condition};
use skiff_api::ApiError;

use super::api;
use super::runtime::Cache;
use crate::registry::{Registry, Sub};

pub use skiff_api::defaults::{NOT_READY_TAINT, UNREACHABLE_TAINT};

/// Where node Leases live.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    conditions::get(node.status.as_ref()?.conditions.as_deref(), "Ready")
}

pub fn is_ready(node: &Node) -> bool {
    ready_condition(node).is_some_and(|c| c.status == "True")
}

/// What the controller wants of a node, from its Ready status and whether it went silent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Set `Ready=Unknown` (the node stopped reporting).
    pub mark_unknown: bool,
    /// The NoExecute taint the node should carry (`None`: neither of ours).
    pub taint: Option<&'static str>,
}

/// The decision for one node: `ready` is its Ready condition's status as stored, `stale` whether
/// the grace period passed since its Lease or Ready heartbeat last changed.
pub fn verdict(ready: &str, stale: bool) -> Verdict {
    if stale {
        return Verdict {
            mark_unknown: ready != "Unknown",
            taint: Some(UNREACHABLE_TAINT),
        };
    }
    let taint = match ready {
        // "": no Ready condition posted yet (a node just registering): nothing to say.
        "True" | "" => None,
        "False" => Some(NOT_READY_TAINT),
        _ => Some(UNREACHABLE_TAINT),
    };
    Verdict {
        mark_unknown: false,
        taint,
    }
}

/// `taints` with ours set to `want`: the other of our two removed, `want` added (keeping its
/// `timeAdded` when already there, since eviction counts from it). None when nothing changes.
pub fn retaint(taints: &[Taint], want: Option<&str>, now: &str) -> Option<Vec<Taint>> {
    let ours = |t: &Taint| {
        t.effect == "NoExecute" && (t.key == UNREACHABLE_TAINT || t.key == NOT_READY_TAINT)
    };
    let has_want = want.is_some_and(|w| taints.iter().any(|t| ours(t) && t.key == w));
    let stray = taints
        .iter()
        .any(|t| ours(t) && Some(t.key.as_str()) != want);
    if !stray && (want.is_none() || has_want) {
        return None;
    }
    let mut next: Vec<Taint> = taints
        .iter()
        .filter(|t| !ours(t) || Some(t.key.as_str()) == want)
        .cloned()
        .collect();
    if let Some(w) = want.filter(|_| !has_want) {
        next.push(Taint {
            key: w.to_string(),
            effect: "NoExecute".into(),
            time_added: serde_json::from_value(json!(now)).ok(),
            value: None,
        });
    }
    Some(next)
}

/// When the controller last saw a node's Lease renewed or its Ready heartbeat change.
struct Probe {
    renew: Option<String>,
    heartbeat: Option<String>,
    seen: Instant,
}

pub struct NodeLifecycle {
    pub reg: Arc<Registry>,
    pub nodes: Arc<Cache<Node>>,
    pub pods: Arc<Cache<Pod>>,
    pub leases: Arc<Cache<Lease>>,
    pub grace: Duration,
    probes: Mutex<HashMap<String, Probe>>,
}

impl NodeLifecycle {
    pub fn new(
        reg: Arc<Registry>,
        nodes: Arc<Cache<Node>>,
        pods: Arc<Cache<Pod>>,
        leases: Arc<Cache<Lease>>,
        grace: Duration,
    ) -> NodeLifecycle {
        NodeLifecycle {
            reg,
            nodes,
            pods,
            leases,
            grace,
            probes: Mutex::default(),
        }
    }

    /// One pass over all nodes; run every second.
    pub fn check(&self) -> Result<(), ApiError> {
        self.check_at(Instant::now())
    }

    /// Whether `node`'s Lease and Ready heartbeat have stood still for the grace period as of
    /// `now`; records what it saw. None for a node no agent ever reported for.
    fn stale(&self, name: &str, node: &Node, now: Instant) -> Option<bool> {
        let lease = self.leases.get(&format!("{NODE_LEASE_NAMESPACE}/{name}"));
        let renew = lease
            .and_then(|l| l.spec.as_ref()?.renew_time.clone())
            .map(|t| t.0.to_string());
        let heartbeat = ready_condition(node)
            .and_then(|c| c.last_heartbeat_time.as_ref())
            .map(|t| t.0.to_string());
        if renew.is_none() && ready_condition(node).is_none() {
            return None;
        }
        let mut probes = self.probes.lock().expect("probes");
        let p = probes.entry(name.to_string()).or_insert(Probe {
            renew: renew.clone(),
            heartbeat: heartbeat.clone(),
            seen: now,
        });
        if p.renew != renew || p.heartbeat != heartbeat {
            *p = Probe {
                renew,
                heartbeat,
                seen: now,
            };
        }
        Some(now.saturating_duration_since(p.seen) > self.grace)
    }

    /// One pass as of `now`.
    pub fn check_at(&self, now: Instant) -> Result<(), ApiError> {
        let all = self.nodes.list(None);
        self.probes
            .lock()
            .expect("probes")
            .retain(|n, _| all.iter().any(|o| o.metadata.name.as_deref() == Some(n)));
        for node in all {
            let name = node.metadata.name.clone().unwrap_or_default();
            let Some(stale) = self.stale(&name, &node, now) else {
                continue;
            };
            let ready = ready_condition(&node).map_or("", |c| c.status.as_str());
            let v = verdict(ready, stale);
            // The version the next write expects.
            let mut rv = node.metadata.resource_version.clone();
            if v.mark_unknown {
                let mut conds = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default();
                let heartbeat = ready_condition(&node).and_then(|c| c.last_heartbeat_time.clone());
                let t = api::now();
                conditions::set(
                    &mut conds,
                    NodeCondition::new(
                        "Ready",
                        "Unknown",
                        "NodeStatusUnknown",
                        "Kubelet stopped posting node status.",
                        &t,
                    ),
                    &t,
                );
                if let Some(c) = conds.iter_mut().find(|c| c.type_ == "Ready") {
                    // The heartbeat stays what the agent last posted.
                    c.last_heartbeat_time = heartbeat;
                }
                // Only the conditions are written: the rest of the status is the agent's.
                let updated = match api::patch::<Node>(
                    &self.reg,
                    None,
                    &name,
                    &json!({"metadata": {"resourceVersion": rv}, "status": {"conditions": conds}}),
                    Sub::Status,
                ) {
                    Ok(u) => u,
                    // Changed meanwhile (the agent is back, say) or gone: next pass.
                    Err(e) if e.code == 409 || e.code == 404 => continue,
                    Err(e) => return Err(e),
                };
                tracing::warn!(node = %name, "node stopped heartbeating; marking it NotReady");
                super::events::record(
                    &self.reg,
                    &*node,
                    "Normal",
                    "NodeNotReady",
                    &format!("Node {name} status is now: NodeNotReady"),
                    "node-controller",
                );
                // The taint follows at once, on the node as just written.
                rv = updated.metadata.resource_version;
            }
            if stale {
                // Level-triggered: a write that failed last pass (a pod changed meanwhile)
                // and pods that reached the node since are marked now.
                self.mark_pods_not_ready(&name);
            }
            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            if let Some(next) = retaint(&taints, v.taint, &crate::registry::now()) {
                match v.taint {
                    Some(t) => tracing::warn!(node = %name, taint = t, "tainting node"),
                    None => {
                        tracing::info!(node = %name, "node is healthy again; removing its taints")
                    }
                }
                self.set_taints(&name, rv, next)?;
            }
        }
        Ok(())
    }

    /// Marks the pods on an unreachable node not ready (so services drop them), those that
    /// are not already. A write that fails is retried on the next pass.
    fn mark_pods_not_ready(&self, node: &str) {
        for p in self.pods_on(node) {
            let mut status = p.status.clone().unwrap_or_default();
            let mut conds = status.conditions.take().unwrap_or_default();
            let already = conds
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False");
            if already || super::pods::is_terminal(&p) {
                continue;
            }
            let t = api::now();
            conditions::set(
                &mut conds,
                PodCondition::new("Ready", "False", "NodeNotReady", "node is not ready", &t),
                &t,
            );
            status.conditions = Some(conds);
            match api::update_status(&self.reg, &*p, &status) {
                Ok(_) => {}
                Err(e) if e.code == 404 || e.code == 409 => {}
                Err(e) => {
                    let pod = p.metadata.name.as_deref().unwrap_or("");
                    tracing::warn!(node, pod, error = %e, "marking a pod not ready failed")
                }
            }
        }
    }

    /// Sets the node's taints, if it is still at `rv`.
    fn set_taints(
        &self,
        name: &str,
        rv: Option<String>,
        taints: Vec<Taint>,
    ) -> Result<(), ApiError> {
        match api::patch::<Node>(
            &self.reg,
            None,
            name,
            &json!({"metadata": {"resourceVersion": rv}, "spec": {"taints": taints}}),
            Sub::Main,
        ) {
            Ok(_) => Ok(()),
            // The node changed meanwhile (an agent's status, a cordon): next pass.
            Err(e) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn pods_on(&self, node: &str) -> Vec<Arc<Pod>> {
        self.pods
            .list(None)
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClusterConfig, WriteOptions};
    use serde_json::Value;
    use skiff_api::Resource;

    /// The node's agent posts its Ready condition.
    fn agent_posts_ready(reg: &Registry, status: &str, reason: &str) {
        let mut n: Node =
            serde_json::from_value(reg.get(res("nodes"), None, "n1").unwrap()).unwrap();
        let t = api::now();
        let st = n.status.get_or_insert_with(Default::default);
        conditions::set(
            st.conditions.get_or_insert_with(Vec::new),
            NodeCondition::new("Ready", status, reason, "", &t),
            &t,
        );
        let st = st.clone();
        api::update_status(reg, &n, &st).unwrap();
    }

    /// The Ready condition of a stored node.
    fn node_ready(n: &Value) -> NodeCondition {
        let n: Node = serde_json::from_value(n.clone()).unwrap();
        let conds = n.status.and_then(|s| s.conditions);
        conditions::get(conds.as_deref(), "Ready").cloned().unwrap()
    }
    use crate::store::sqlite::SqliteStore;

    fn res(n: &str) -> &'static Resource {
        Resource::lookup(n).expect("resource")
    }

    /// The status of pod `p`'s Ready condition, "" without one.
    fn pod_ready(reg: &Registry) -> String {
        let p: Pod = api::get(reg, Some("default"), "p").unwrap().expect("pod");
        let conds = p.status.and_then(|s| s.conditions);
        conditions::get(conds.as_deref(), "Ready").map_or(String::new(), |c| c.status.clone())
    }

    fn taint(key: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoExecute".into(),
            time_added: serde_json::from_value(json!("2020-01-01T00:00:00Z")).ok(),
            value: None,
        }
    }

    #[test]
    fn verdicts_follow_readiness_and_silence() {
        assert_eq!(
            verdict("True", false),
            Verdict {
                mark_unknown: false,
                taint: None
            }
        );
        assert_eq!(verdict("False", false).taint, Some(NOT_READY_TAINT));
        assert_eq!(
            verdict("True", true),
            Verdict {
                mark_unknown: true,
                taint: Some(UNREACHABLE_TAINT)
            }
        );
        // Already Unknown: not written again; the taint stays.
        assert_eq!(
            verdict("Unknown", true),
            Verdict {
                mark_unknown: false,
                taint: Some(UNREACHABLE_TAINT)
            }
        );
        // The Lease is renewed again but the agent has not posted Ready yet: still tainted.
        assert_eq!(verdict("Unknown", false).taint, Some(UNREACHABLE_TAINT));
        // No Ready condition yet: left alone until it goes silent.
        assert_eq!(verdict("", false).taint, None);
        assert!(verdict("", true).mark_unknown);
    }

    #[test]
    fn retainting_keeps_time_added_and_other_taints() {
        let other = Taint {
            key: "dedicated".into(),
            effect: "NoSchedule".into(),
            time_added: None,
            value: Some("edge".into()),
        };
        let now = "2026-01-01T00:00:00Z";
        // Already as wanted: no write.
        assert_eq!(
            retaint(
                &[other.clone(), taint(UNREACHABLE_TAINT)],
                Some(UNREACHABLE_TAINT),
                now
            ),
            None
        );
        assert_eq!(retaint(std::slice::from_ref(&other), None, now), None);
        // not-ready becomes unreachable: the old one goes, the new one is stamped now.
        let next = retaint(
            &[other.clone(), taint(NOT_READY_TAINT)],
            Some(UNREACHABLE_TAINT),
            now,
        )
        .unwrap();
        assert_eq!(next.len(), 2);
        assert_eq!(next[0], other);
        assert_eq!(next[1].key, UNREACHABLE_TAINT);
        assert_eq!(
            serde_json::to_value(&next[1].time_added).unwrap(),
            json!(now)
        );
        // Healthy: ours removed, the user's kept.
        assert_eq!(
            retaint(&[taint(UNREACHABLE_TAINT), other.clone()], None, now).unwrap(),
            vec![other]
        );
    }

    struct World {
        reg: Arc<Registry>,
        lc: NodeLifecycle,
        _dir: tempfile::TempDir,
    }

    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        for ns in ["default", NODE_LEASE_NAMESPACE] {
            reg.create(
                res("namespaces"),
                None,
                json!({"metadata": {"name": ns}}),
                &WriteOptions::default(),
            )
            .unwrap();
        }
        let lc = NodeLifecycle::new(
            reg.clone(),
            Cache::<Node>::new(),
            Cache::<Pod>::new(),
            Cache::<Lease>::new(),
            Duration::from_secs(15),
        );
        World { reg, lc, _dir: dir }
    }

    fn fill<K: crate::controllers::runtime::Object>(reg: &Registry, c: &Cache<K>) {
        let (all, _) = reg
            .list(
                c.resource,
                None,
                &skiff_api::selector::Selector::everything(),
                &skiff_api::fields::FieldSelector::default(),
            )
            .unwrap();
        for o in all {
            c.insert(o);
        }
    }

    impl World {
        /// Mirrors the store into the caches, as the watches would.
        fn sync(&self) {
            fill(&self.reg, &self.lc.nodes);
            fill(&self.reg, &self.lc.pods);
            fill(&self.reg, &self.lc.leases);
        }

        fn node(&self) -> Node {
            serde_json::from_value(self.reg.get(res("nodes"), None, "n1").unwrap()).unwrap()
        }

        fn taint_keys(&self) -> Vec<String> {
            self.node()
                .spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .into_iter()
                .map(|t| t.key)
                .collect()
        }

        fn renew(&self, at: &str) {
            let l = json!({"metadata": {"name": "n1", "namespace": NODE_LEASE_NAMESPACE},
                           "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 15, "renewTime": at}});
            let opts = WriteOptions::default();
            match self
                .reg
                .try_get(res("leases"), Some(NODE_LEASE_NAMESPACE), "n1")
                .unwrap()
            {
                Some(_) => {
                    self.reg
                        .update(
                            res("leases"),
                            Some(NODE_LEASE_NAMESPACE),
                            "n1",
                            l,
                            Sub::Main,
                            &opts,
                        )
                        .unwrap();
                }
                None => {
                    self.reg
                        .create(res("leases"), Some(NODE_LEASE_NAMESPACE), l, &opts)
                        .unwrap();
                }
            }
        }
    }

    #[tokio::test]
    async fn a_silent_lease_taints_the_node_and_a_renewed_one_untaints_it() {
        let w = world();
        let opts = WriteOptions::default();
        w.reg
            .create(res("nodes"), None, json!({"metadata": {"name": "n1"},
                "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2020-01-01T00:00:00Z"}]}}), &opts)
            .unwrap();
        w.renew("2026-01-01T00:00:00.000001Z");
        w.sync();
        let t0 = Instant::now();
        w.lc.check_at(t0).unwrap();
        // Renewed within the grace period: healthy, although the Ready heartbeat is old.
        w.renew("2026-01-01T00:00:10.000001Z");
        w.sync();
        w.lc.check_at(t0 + Duration::from_secs(10)).unwrap();
        w.sync();
        w.lc.check_at(t0 + Duration::from_secs(24)).unwrap();
        assert!(w.taint_keys().is_empty());
        assert_eq!(
            node_ready(&serde_json::to_value(w.node()).unwrap()).status,
            "True"
        );
        // Silent for longer than the grace period: Unknown and tainted unreachable at once.
        w.lc.check_at(t0 + Duration::from_secs(26)).unwrap();
        w.sync();
        let n = serde_json::to_value(w.node()).unwrap();
        assert_eq!(node_ready(&n).status, "Unknown");
        assert_eq!(
            serde_json::to_value(node_ready(&n).last_heartbeat_time).unwrap(),
            "2020-01-01T00:00:00Z",
            "the agent's last heartbeat is kept"
        );
        assert_eq!(w.taint_keys(), vec![UNREACHABLE_TAINT.to_string()]);
        w.lc.check_at(t0 + Duration::from_secs(27)).unwrap();
        w.sync();
        assert_eq!(w.taint_keys(), vec![UNREACHABLE_TAINT.to_string()]);
        // The Lease is renewed again, then the agent posts Ready: the taint goes.
        w.renew("2026-01-01T00:01:00.000001Z");
        w.sync();
        w.lc.check_at(t0 + Duration::from_secs(28)).unwrap();
        w.sync();
        assert_eq!(w.taint_keys(), vec![UNREACHABLE_TAINT.to_string()]);
        agent_posts_ready(&w.reg, "True", "KubeletReady");
        w.sync();
        w.lc.check_at(t0 + Duration::from_secs(29)).unwrap();
        assert!(w.taint_keys().is_empty());
        // An agent that reports Ready=False gets the not-ready taint.
        w.sync();
        agent_posts_ready(&w.reg, "False", "KubeletNotReady");
        w.sync();
        w.lc.check_at(t0 + Duration::from_secs(30)).unwrap();
        assert_eq!(w.taint_keys(), vec![NOT_READY_TAINT.to_string()]);
    }

    #[tokio::test]
    async fn nodes_no_agent_reported_for_are_left_alone() {
        let w = world();
        w.reg
            .create(
                res("nodes"),
                None,
                json!({"metadata": {"name": "n1"}}),
                &WriteOptions::default(),
            )
            .unwrap();
        w.sync();
        let t0 = Instant::now();
        w.lc.check_at(t0).unwrap();
        w.lc.check_at(t0 + Duration::from_secs(3600)).unwrap();
        assert!(w.taint_keys().is_empty());
    }

    #[tokio::test]
    async fn a_failed_not_ready_write_is_retried() {
        let w = world();
        let reg = &w.reg;
        let opts = WriteOptions::default();
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
        let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
        let t = api::now();
        let mut conds = Vec::new();
        conditions::set(
            &mut conds,
            PodCondition::new("Ready", "True", "", "", &t),
            &t,
        );
        let status = k8s_openapi::api::core::v1::PodStatus {
            conditions: Some(conds),
            ..Default::default()
        };
        let ready =
            serde_json::to_value(api::update_status(reg, &typed, &status).unwrap()).unwrap();
        // The pod cache lags behind the store: the first write, made from it, conflicts.
        w.lc.nodes.insert(node);
        w.lc.pods.insert(pod);
        let t0 = Instant::now();
        w.lc.check_at(t0).unwrap();
        w.lc.check_at(t0 + Duration::from_secs(16)).unwrap();
        let n1 = reg.get(res("nodes"), None, "n1").unwrap();
        assert_eq!(node_ready(&n1).status, "Unknown");
        assert_eq!(
            pod_ready(reg),
            "True",
            "the conflicting write changed nothing"
        );
        // The caches catch up; the next pass marks the pod.
        w.lc.nodes.insert(n1);
        w.lc.pods.insert(ready);
        w.lc.check_at(t0 + Duration::from_secs(17)).unwrap();
        assert_eq!(pod_ready(reg), "False");
    }
}
