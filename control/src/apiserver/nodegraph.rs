//! What the node authorizer knows of pods, as Kubernetes' node authorizer keeps its graph:
//! for each pod bound to a node, the node and what the pod refers to (its ServiceAccount,
//! ConfigMaps, Secrets, claims), kept current from a watch on pods. A node's request is then
//! decided by a lookup, not by reading every pod of its namespace: a node starting pods asks
//! for a token per pod, so a reading per request made pod starts cost O(pods) each.
//!
//! The graph follows the store by a watch, so it can trail it by the time an event takes to
//! arrive: what it finds is allowed at once; what it does not find is looked up in the
//! registry ([`NodeGraph`] for [`Registry`]) before it is refused, so a node is never refused
//! a pod the graph has not seen yet.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use serde::Deserialize;
use serde_json::Value;
use skiff_api::Resource;
use tokio::sync::watch;

use super::auth::{NodeGraph, Ref};
use crate::registry::Registry;
use crate::store::EventType;

/// What a pod bound to a node refers to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodRefs {
    pub node: String,
    pub service_account: String,
    pub config_maps: HashSet<String>,
    pub secrets: HashSet<String>,
    pub claims: HashSet<String>,
}

impl PodRefs {
    /// What `pod` refers to; None while it is not bound to a node.
    pub fn of(pod: &Pod) -> Option<PodRefs> {
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
        let (config_maps, secrets) = super::auth::pod_references(pod);
        let claims = spec
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone())
            .collect();
        Some(PodRefs {
            node,
            service_account: skiff_api::pod_service_account(pod).to_string(),
            config_maps,
            secrets,
            claims,
        })
    }

    /// Whether the pod refers to `r`.
    pub fn has(&self, r: Ref<'_>) -> bool {
        match r {
            Ref::ServiceAccount(n) => self.service_account == n,
            Ref::ConfigMap(n) => self.config_maps.contains(n),
            Ref::Secret(n) => self.secrets.contains(n),
            Ref::Claim(n) => self.claims.contains(n),
        }
    }
}

impl PodRefs {
    /// Everything the pod refers to, as graph keys.
    fn keys(&self) -> impl Iterator<Item = (Kind, &str)> {
        std::iter::once((Kind::ServiceAccount, self.service_account.as_str()))
            .chain(
                self.config_maps
                    .iter()
                    .map(|n| (Kind::ConfigMap, n.as_str())),
            )
            .chain(self.secrets.iter().map(|n| (Kind::Secret, n.as_str())))
            .chain(self.claims.iter().map(|n| (Kind::Claim, n.as_str())))
    }
}

/// What kind of object a graph key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    ServiceAccount,
    ConfigMap,
    Secret,
    Claim,
}

fn key_of(r: Ref<'_>) -> (Kind, String) {
    match r {
        Ref::ServiceAccount(n) => (Kind::ServiceAccount, n.to_string()),
        Ref::ConfigMap(n) => (Kind::ConfigMap, n.to_string()),
        Ref::Secret(n) => (Kind::Secret, n.to_string()),
        Ref::Claim(n) => (Kind::Claim, n.to_string()),
    }
}

#[derive(Default)]
struct Index {
    /// `ns/name` → what the bound pod refers to.
    pods: HashMap<String, PodRefs>,
    /// (node, namespace) → what its pods there refer to, each with how many pods do.
    refs: HashMap<(String, String), HashMap<(Kind, String), usize>>,
}

impl Index {
    fn remove(&mut self, ns: &str, name: &str) {
        let Some(old) = self.pods.remove(&format!("{ns}/{name}")) else {
            return;
        };
        let at = (old.node.clone(), ns.to_string());
        if let Some(counts) = self.refs.get_mut(&at) {
            for (kind, n) in old.keys() {
                let key = (kind, n.to_string());
                if let Some(c) = counts.get_mut(&key) {
                    *c -= 1;
                    if *c == 0 {
                        counts.remove(&key);
                    }
                }
            }
            if counts.is_empty() {
                self.refs.remove(&at);
            }
        }
    }

    fn put(&mut self, ns: &str, name: &str, refs: Option<PodRefs>) {
        self.remove(ns, name);
        if let Some(refs) = refs {
            let counts = self
                .refs
                .entry((refs.node.clone(), ns.to_string()))
                .or_default();
            for (kind, n) in refs.keys() {
                *counts.entry((kind, n.to_string())).or_default() += 1;
            }
            self.pods.insert(format!("{ns}/{name}"), refs);
        }
    }

    fn refers(&self, node: &str, ns: &str, r: Ref<'_>) -> bool {
        self.refs
            .get(&(node.to_string(), ns.to_string()))
            .is_some_and(|counts| counts.contains_key(&key_of(r)))
    }
}

/// The node authorizer's graph of pods ([module docs](self)).
pub struct PodGraph {
    registry: Arc<Registry>,
    index: RwLock<Index>,
}

/// Only the parts of a stored pod the graph reads.
#[derive(Deserialize)]
struct Stored {
    metadata: StoredMeta,
    spec: Option<PodSpec>,
}

#[derive(Deserialize)]
struct StoredMeta {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
}

/// (namespace, name, what it refers to) of a stored pod, decoding only its metadata and
/// spec; None when they do not decode.
pub(super) fn decode(raw: &Value) -> Option<(String, String, Option<PodRefs>)> {
    let stored = Stored::deserialize(raw).ok()?;
    let pod = Pod {
        spec: stored.spec,
        ..Default::default()
    };
    Some((
        stored.metadata.namespace,
        stored.metadata.name,
        PodRefs::of(&pod),
    ))
}

impl PodGraph {
    pub fn new(registry: Arc<Registry>) -> Arc<PodGraph> {
        Arc::new(PodGraph {
            registry,
            index: RwLock::new(Index::default()),
        })
    }

    /// Keeps the graph current until `stop`: list, then watch; list again when the watch ends.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let prefix = Resource::lookup("pods").expect("pods").key_prefix();
        loop {
            let (items, rev) = match self.registry.store().list_shared(&prefix) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "node authorizer: cannot list pods");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Decoding a listing of thousands of pods takes a while: not on the runtime's threads.
            let fresh = tokio::task::spawn_blocking(move || {
                let mut fresh = Index::default();
                for raw in &items {
                    if let Some((ns, name, refs)) = decode(raw) {
                        fresh.put(&ns, &name, refs);
                    }
                }
                fresh
            })
            .await;
            let Ok(fresh) = fresh else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            *self.index.write().expect("node graph") = fresh;
            let Ok(mut rx) = self.registry.store().watch(&prefix, rev) else {
                continue;
            };
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    ev = rx.recv() => {
                        let Some(ev) = ev else { break };
                        // A status write leaves the spec as it was: nothing to do.
                        let same_spec = ev.kind == EventType::Modified
                            && ev.prev.as_deref().is_some_and(|p| p.get("spec") == ev.object.get("spec"));
                        if same_spec {
                            continue;
                        }
                        let Some((ns, name, refs)) = decode(&ev.object) else { continue };
                        let mut index = self.index.write().expect("node graph");
                        if ev.kind == EventType::Deleted {
                            index.remove(&ns, &name);
                        } else {
                            index.put(&ns, &name, refs);
                        }
                    }
                }
            }
        }
    }
}

impl NodeGraph for PodGraph {
    fn pod_on(&self, node: &str, ns: &str, name: &str) -> bool {
        let known = self
            .index
            .read()
            .expect("node graph")
            .pods
            .get(&format!("{ns}/{name}"))
            .is_some_and(|p| p.node == node);
        // The graph may trail the store: only the store answers "no".
        known || self.registry.pod_on(node, ns, name)
    }

    fn refers(&self, node: &str, ns: &str, r: Ref<'_>) -> bool {
        let known = self.index.read().expect("node graph").refers(node, ns, r);
        known || self.registry.refers(node, ns, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(name: &str, node: &str, spec: Value) -> Value {
        let mut spec = spec;
        spec["nodeName"] = json!(node);
        spec["containers"] = json!([{"name": "c", "image": "i"}]);
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec})
    }

    /// The graph fed by its watch of a real store: a pod bound to a node is soon known
    /// without the store (the registry is not asked), and a deleted one is forgotten.
    #[tokio::test]
    async fn the_graph_follows_the_store() {
        use crate::registry::{ClusterConfig, DeleteOptions, WriteOptions};
        use crate::store::sqlite::SqliteStore;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        let graph = PodGraph::new(reg.clone());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(graph.clone().run(stopped));
        let (pods, sas) = (
            Resource::lookup("pods").unwrap(),
            Resource::lookup("serviceaccounts").unwrap(),
        );
        let opts = WriteOptions::default();
        reg.create(
            sas,
            Some("default"),
            json!({"metadata": {"name": "bot"}}),
            &opts,
        )
        .unwrap();
        let mut pod = stored(
            "p",
            "n1",
            json!({"serviceAccountName": "bot",
            "volumes": [{"name": "s", "secret": {"secretName": "creds"}}]}),
        );
        pod["metadata"].as_object_mut().unwrap().remove("namespace");
        reg.create(pods, Some("default"), pod, &opts).unwrap();
        let known = |r: Ref<'_>| graph.index.read().unwrap().refers("n1", "default", r);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !(known(Ref::ServiceAccount("bot")) && known(Ref::Secret("creds"))) {
            assert!(
                std::time::Instant::now() < deadline,
                "the graph never saw pod p"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(graph.refers("n1", "default", Ref::Secret("creds")));
        assert!(!graph.refers("n2", "default", Ref::Secret("creds")));
        assert!(graph.pod_on("n1", "default", "p"));
        // The store's own answers, which the graph falls back on, agree.
        assert!(reg.refers("n1", "default", Ref::Secret("creds")));
        assert!(!reg.refers("n1", "default", Ref::ConfigMap("creds")));
        assert!(reg.pod_on("n1", "default", "p"));
        let now = DeleteOptions {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        reg.delete(pods, Some("default"), "p", &now).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while known(Ref::ServiceAccount("bot")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the graph kept a deleted pod"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!graph.refers("n1", "default", Ref::ServiceAccount("bot")));
        let _ = stop.send(true);
        task.await.unwrap();
    }

    /// Pods come, move and go; the graph answers for each node what its pods refer to now,
    /// and forgets a reference once the last pod making it has gone.
    #[test]
    fn the_graph_follows_pods_and_their_references() {
        let mut index = Index::default();
        let put = |index: &mut Index, raw: Value| {
            let (ns, name, refs) = decode(&raw).unwrap();
            index.put(&ns, &name, refs);
        };
        put(
            &mut index,
            stored(
                "a",
                "n1",
                json!({"serviceAccountName": "bot",
            "volumes": [{"name": "v", "configMap": {"name": "cm"}},
                        {"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}),
            ),
        );
        put(
            &mut index,
            stored("b", "n1", json!({"serviceAccountName": "bot"})),
        );
        put(
            &mut index,
            stored("c", "", json!({"serviceAccountName": "idle"})),
        );
        let has = |index: &Index, node: &str, r: Ref<'_>| index.refers(node, "default", r);
        assert!(has(&index, "n1", Ref::ServiceAccount("bot")));
        assert!(has(&index, "n1", Ref::ConfigMap("cm")));
        assert!(has(&index, "n1", Ref::Claim("data")));
        assert!(!has(&index, "n1", Ref::Secret("cm")));
        assert!(!has(&index, "n2", Ref::ServiceAccount("bot")));
        assert!(
            !has(&index, "n1", Ref::ServiceAccount("idle")),
            "an unbound pod"
        );
        assert!(!index.refers("n1", "other", Ref::ServiceAccount("bot")));
        // One of two pods running as `bot` goes: the other still does.
        index.remove("default", "a");
        assert!(has(&index, "n1", Ref::ServiceAccount("bot")));
        assert!(!has(&index, "n1", Ref::ConfigMap("cm")));
        // The last one moves to another node.
        put(
            &mut index,
            stored("b", "n2", json!({"serviceAccountName": "bot"})),
        );
        assert!(!has(&index, "n1", Ref::ServiceAccount("bot")));
        assert!(has(&index, "n2", Ref::ServiceAccount("bot")));
        index.remove("default", "b");
        assert!(index.refs.is_empty() && index.pods.is_empty());
    }
}
