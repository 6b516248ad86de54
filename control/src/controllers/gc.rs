//! Garbage collection by ownerReferences (background, foreground and orphan propagation)
//! of every stored kind, custom resources included; namespace deletion; and the removal of
//! a deleted CustomResourceDefinition's objects.
//!
//! The collector keeps a [`Graph`] of who owns whom over every stored object, fed by one
//! watch of the whole store, so a kind needs no cache of its own to be collected.
//!
//! Keys: `dep:{resource}:{ns}/{name}` (does this dependent still have an owner?),
//! `owner:{resource}:{ns}/{name}` (an owner being deleted with the foreground or orphan
//! finalizer), `ns:{name}` (a namespace being deleted), `crd:{name}` (a definition being
//! deleted). `{resource}` is the qualified plural (`pods`, `deployments.apps`,
//! `widgets.example.com`).
//!
//! The collector serves every kind alike and reads only `metadata`, so it works on the stored
//! JSON (no k8s-openapi type spans all kinds).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use skiff_api::fields::FieldSelector;
use skiff_api::patch::PatchKind;
use skiff_api::selector::Selector;
use skiff_api::{meta, ApiError, Resource};
use tokio::sync::watch;

use super::runtime::{key_of, split_key, Action, Queue, Reconciler};
use crate::registry::{DeleteOptions, Registry, Sub, WriteOptions};
use crate::store::EventType;

/// Who owns whom: each stored object that names owners, by its id (`{resource}:{key}`),
/// and the ids naming each owner uid.
#[derive(Default)]
pub struct Graph {
    inner: Mutex<GraphInner>,
}

#[derive(Default)]
struct GraphInner {
    /// id → (uid, owner uids) of every object the graph has seen.
    nodes: HashMap<String, (String, Vec<String>)>,
    /// owner uid → ids of the objects naming it.
    dependents: HashMap<String, BTreeSet<String>>,
}

impl Graph {
    /// Records an object; true when its owners changed (a new object with owners too).
    fn set(&self, id: &str, uid: &str, owners: Vec<String>) -> bool {
        let mut g = self.inner.lock().expect("gc graph");
        let before = g.nodes.get(id).map(|(_, o)| o.clone());
        if before.as_ref() == Some(&owners) {
            return false;
        }
        for o in before.iter().flatten() {
            if let Some(set) = g.dependents.get_mut(o) {
                set.remove(id);
                if set.is_empty() {
                    g.dependents.remove(o);
                }
            }
        }
        for o in &owners {
            g.dependents
                .entry(o.clone())
                .or_default()
                .insert(id.to_string());
        }
        let changed = !owners.is_empty() || before.is_some_and(|b| !b.is_empty());
        g.nodes.insert(id.to_string(), (uid.to_string(), owners));
        changed
    }

    /// Forgets an object; returns its uid.
    fn remove(&self, id: &str) -> Option<String> {
        let mut g = self.inner.lock().expect("gc graph");
        let (uid, owners) = g.nodes.remove(id)?;
        for o in &owners {
            if let Some(set) = g.dependents.get_mut(o) {
                set.remove(id);
                if set.is_empty() {
                    g.dependents.remove(o);
                }
            }
        }
        Some(uid)
    }

    /// The ids of the objects naming `uid` as an owner.
    pub fn dependents(&self, uid: &str) -> Vec<String> {
        let g = self.inner.lock().expect("gc graph");
        g.dependents
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn ids(&self) -> HashSet<String> {
        self.inner
            .lock()
            .expect("gc graph")
            .nodes
            .keys()
            .cloned()
            .collect()
    }
}

/// The graph id of a stored object, and its resource.
fn id_of(reg: &Registry, obj: &Value) -> Option<(&'static Resource, String)> {
    let r = reg.resource_of_object(obj)?;
    Some((r, format!("{}:{}", r.qualified(), key_of(obj))))
}

/// What one object's change asks of the collector.
fn observe(reg: &Registry, graph: &Graph, q: &Queue, obj: &Value) {
    let Some((r, id)) = id_of(reg, obj) else {
        return;
    };
    let owners: Vec<String> = meta::owners(obj).into_iter().map(|o| o.0).collect();
    let owned = !owners.is_empty();
    if graph.set(&id, meta::uid(obj), owners) && owned {
        q.add(format!("dep:{id}"));
    }
    if meta::is_deleting(obj) {
        let finalizers = meta::finalizers(obj);
        if finalizers
            .iter()
            .any(|f| f == "foregroundDeletion" || f == "orphan")
        {
            q.add(format!("owner:{id}"));
        }
        if r.is_builtin() && r.group == skiff_api::crd::GROUP {
            q.add(format!("crd:{}", meta::name(obj)));
        }
    }
}

/// An object gone: its dependents are checked.
fn forget(graph: &Graph, q: &Queue, id: &str) {
    if let Some(uid) = graph.remove(id) {
        for d in graph.dependents(&uid) {
            q.add(format!("dep:{d}"));
        }
    }
}

/// Keeps `graph` current from a watch of every stored object until `stop`, queueing for the
/// collector what each change concerns: a new or re-owned dependent, an owner being deleted
/// in the foreground or orphaning, the dependents of an object gone.
pub async fn follow(
    reg: Arc<Registry>,
    graph: Arc<Graph>,
    q: Queue,
    mut stop: watch::Receiver<bool>,
) {
    const ALL: &str = "/registry/";
    loop {
        let (items, rev) = match reg.store().list_shared(ALL) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "garbage collector cannot list objects");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut listed = HashSet::new();
        for obj in &items {
            if let Some((_, id)) = id_of(&reg, obj) {
                listed.insert(id);
            }
            observe(&reg, &graph, &q, obj);
        }
        for id in graph.ids().difference(&listed) {
            forget(&graph, &q, id);
        }
        drop(items);
        let mut rx = match reg.store().watch(ALL, rev) {
            Ok(rx) => rx,
            Err(_) => continue,
        };
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if ev.kind == EventType::Deleted {
                        if let Some((_, id)) = id_of(&reg, &ev.object) {
                            forget(&graph, &q, &id);
                        }
                    } else {
                        observe(&reg, &graph, &q, &ev.object);
                    }
                }
            }
        }
    }
}

pub struct GarbageCollector {
    pub reg: Arc<Registry>,
    pub graph: Arc<Graph>,
}

impl GarbageCollector {
    /// The stored objects naming `uid` as an owner.
    fn dependents_of(&self, uid: &str) -> Result<Vec<(&'static Resource, Value)>, ApiError> {
        let mut out = Vec::new();
        for id in self.graph.dependents(uid) {
            let Some((r, key)) = self.resolve(&id) else {
                continue;
            };
            let (ns, name) = split_key(key);
            if let Some(o) = self.reg.try_get(r, ns, name)? {
                if meta::owners(&o).iter().any(|ow| ow.0 == uid) {
                    out.push((r, o));
                }
            }
        }
        Ok(out)
    }

    /// `{resource}:{key}` → the resource and the key.
    fn resolve<'a>(&self, id: &'a str) -> Option<(&'static Resource, &'a str)> {
        let (q, key) = id.split_once(':')?;
        Some((self.reg.resource_by_qualified(q)?, key))
    }

    fn check_dependent(&self, r: &'static Resource, key: &str) -> Result<Action, ApiError> {
        let (ns, name) = split_key(key);
        let Some(obj) = self.reg.try_get(r, ns, name)? else {
            return Ok(Action::AwaitChange);
        };
        let refs = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if refs.is_empty() {
            return Ok(Action::AwaitChange);
        }
        let mut alive = Vec::new();
        let mut foreground_owner = false;
        for o in &refs {
            let Some(or) = self.reg.resource_by_kind(
                o["apiVersion"].as_str().unwrap_or(""),
                o["kind"].as_str().unwrap_or(""),
            ) else {
                alive.push(o.clone());
                continue;
            };
            let owner_ns = if or.namespaced { ns } else { None };
            match self
                .reg
                .try_get(or, owner_ns, o["name"].as_str().unwrap_or(""))?
            {
                Some(owner) if meta::uid(&owner) == o["uid"].as_str().unwrap_or("") => {
                    if meta::is_deleting(&owner)
                        && meta::finalizers(&owner)
                            .iter()
                            .any(|f| f == "foregroundDeletion")
                    {
                        foreground_owner = true;
                    }
                    alive.push(o.clone());
                }
                _ => {}
            }
        }
        if alive.is_empty() || (foreground_owner && alive.len() == 1) {
            let propagation = if foreground_owner {
                "Foreground"
            } else {
                "Background"
            };
            match self.reg.delete(
                r,
                ns,
                name,
                &DeleteOptions {
                    propagation: Some(propagation.into()),
                    ..Default::default()
                },
            ) {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        } else if alive.len() < refs.len() {
            self.reg.patch(r, ns, name, PatchKind::Merge,
                &json!({"metadata": {"ownerReferences": alive, "resourceVersion": obj.pointer("/metadata/resourceVersion")}}),
                Sub::Main, &WriteOptions::default())?;
        }
        Ok(Action::AwaitChange)
    }

    fn finish_owner(&self, r: &'static Resource, key: &str) -> Result<Action, ApiError> {
        let (ns, name) = split_key(key);
        let Some(obj) = self.reg.try_get(r, ns, name)? else {
            return Ok(Action::AwaitChange);
        };
        if !meta::is_deleting(&obj) {
            return Ok(Action::AwaitChange);
        }
        let finalizers = meta::finalizers(&obj);
        let uid = meta::uid(&obj).to_string();
        let deps = self.dependents_of(&uid)?;
        if finalizers.iter().any(|f| f == "orphan") {
            for (dr, d) in &deps {
                let refs = meta::owner_refs_without(d, &uid);
                match self.reg.patch(
                    dr,
                    meta::namespace(d),
                    meta::name(d),
                    PatchKind::Merge,
                    &json!({"metadata": {"ownerReferences": refs}}),
                    Sub::Main,
                    &WriteOptions::default(),
                ) {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            self.reg.remove_finalizer(r, ns, name, "orphan")?;
            return Ok(Action::AwaitChange);
        }
        if finalizers.iter().any(|f| f == "foregroundDeletion") {
            if deps.is_empty() {
                self.reg
                    .remove_finalizer(r, ns, name, "foregroundDeletion")?;
                return Ok(Action::AwaitChange);
            }
            for (dr, d) in &deps {
                if meta::is_deleting(d) {
                    continue;
                }
                match self.reg.delete(
                    dr,
                    meta::namespace(d),
                    meta::name(d),
                    &DeleteOptions {
                        propagation: Some("Foreground".into()),
                        ..Default::default()
                    },
                ) {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(Action::RequeueAfter(Duration::from_millis(250)));
        }
        Ok(Action::AwaitChange)
    }

    fn finish_namespace(&self, name: &str) -> Result<Action, ApiError> {
        let nsr = Resource::lookup("namespaces").expect("ns");
        let Some(ns) = self.reg.try_get(nsr, None, name)? else {
            return Ok(Action::AwaitChange);
        };
        if !meta::is_deleting(&ns) {
            return Ok(Action::AwaitChange);
        }
        let mut left = 0;
        for r in self
            .reg
            .stored_resources()
            .into_iter()
            .filter(|r| r.namespaced)
        {
            let (items, _) = self.reg.list(
                r,
                Some(name),
                &Selector::everything(),
                &FieldSelector::default(),
            )?;
            for o in items {
                left += 1;
                if meta::is_deleting(&o) {
                    continue;
                }
                match self
                    .reg
                    .delete(r, Some(name), meta::name(&o), &DeleteOptions::default())
                {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if left == 0 {
            self.reg.remove_finalizer(nsr, None, name, "kubernetes")?;
            return Ok(Action::AwaitChange);
        }
        Ok(Action::RequeueAfter(Duration::from_millis(500)))
    }
}

impl GarbageCollector {
    /// A definition being deleted: its objects are deleted, then its finalizer removed.
    fn finish_definition(&self, name: &str) -> Result<Action, ApiError> {
        let crds = Resource::lookup("customresourcedefinitions").expect("crds");
        let Some(crd) = self.reg.try_get(crds, None, name)? else {
            return Ok(Action::AwaitChange);
        };
        if !meta::is_deleting(&crd)
            || !meta::finalizers(&crd)
                .iter()
                .any(|f| f == skiff_api::crd::CLEANUP_FINALIZER)
        {
            return Ok(Action::AwaitChange);
        }
        let custom = self.reg.custom();
        let served = custom
            .definitions()
            .iter()
            .find(|d| d.name() == name)
            .and_then(|d| d.resources().first().copied());
        let mut left = 0;
        if let Some(r) = served {
            let (items, _) =
                self.reg
                    .list(r, None, &Selector::everything(), &FieldSelector::default())?;
            for o in items {
                left += 1;
                if meta::is_deleting(&o) {
                    continue;
                }
                match self.reg.delete(
                    r,
                    meta::namespace(&o),
                    meta::name(&o),
                    &DeleteOptions::default(),
                ) {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if left == 0 {
            self.reg
                .remove_finalizer(crds, None, name, skiff_api::crd::CLEANUP_FINALIZER)?;
            return Ok(Action::AwaitChange);
        }
        Ok(Action::RequeueAfter(Duration::from_millis(250)))
    }
}

impl Reconciler for GarbageCollector {
    fn name(&self) -> &'static str {
        "garbage-collector"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let Some((what, rest)) = key.split_once(':') else {
            return Ok(Action::AwaitChange);
        };
        match what {
            "dep" | "owner" => {
                // A resource no longer served (a definition gone) has nothing left to do.
                let Some((r, k)) = self.resolve(rest) else {
                    return Ok(Action::AwaitChange);
                };
                if what == "dep" {
                    self.check_dependent(r, k)
                } else {
                    self.finish_owner(r, k)
                }
            }
            "ns" => self.finish_namespace(rest),
            "crd" => self.finish_definition(rest),
            _ => Ok(Action::AwaitChange),
        }
    }
}
