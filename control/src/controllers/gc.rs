//! Garbage collection by ownerReferences (background, foreground and orphan propagation)
//! and namespace deletion.
//!
//! Keys: `dep:{plural}:{ns}/{name}` (does this dependent still have an owner?),
//! `owner:{plural}:{ns}/{name}` (an owner being deleted with the foreground or orphan finalizer),
//! `ns:{name}` (a namespace being deleted).
//!
//! The collector serves every kind alike and reads only `metadata`, so it works on the stored
//! JSON (no k8s-openapi type spans all kinds).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use skiff_api::fields::FieldSelector;
use skiff_api::patch::PatchKind;
use skiff_api::selector::Selector;
use skiff_api::{meta, ApiError, Resource, RESOURCES};

use super::runtime::{split_key, Action, AnyCache, Reconciler};
use crate::registry::{DeleteOptions, Registry, Sub, WriteOptions};

pub struct GarbageCollector {
    pub reg: Arc<Registry>,
    /// Caches of the kinds that are owned by others (pods, replica sets). The collector reads
    /// only metadata, alike for every kind, so it reads their stored JSON.
    pub dependents: Vec<Arc<dyn AnyCache>>,
}

fn owner_resource(api_version: &str, kind: &str) -> Option<&'static Resource> {
    Resource::by_kind(api_version, kind)
}

impl GarbageCollector {
    fn dependents_of(&self, uid: &str) -> Vec<(&'static Resource, Arc<Value>)> {
        self.dependents
            .iter()
            .flat_map(|c| {
                c.list_raw(None)
                    .into_iter()
                    .filter(|o| meta::owners(o).iter().any(|ow| ow.0 == uid))
                    .map(move |o| (c.resource(), o))
            })
            .collect()
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
            let Some(or) = owner_resource(
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
        let deps = self.dependents_of(&uid);
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
        for r in RESOURCES.iter().filter(|r| r.namespaced && !r.create_only) {
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

impl Reconciler for GarbageCollector {
    fn name(&self) -> &'static str {
        "garbage-collector"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let mut parts = key.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("dep"), Some(plural), Some(k)) => {
                self.check_dependent(Resource::lookup(plural).expect("known resource"), k)
            }
            (Some("owner"), Some(plural), Some(k)) => {
                self.finish_owner(Resource::lookup(plural).expect("known resource"), k)
            }
            (Some("ns"), Some(name), None) => self.finish_namespace(name),
            _ => Ok(Action::AwaitChange),
        }
    }
}

/// The queue key asking whether `obj` (of resource `r`) still has its owners.
pub fn dep_key(r: &Resource, key: &str) -> String {
    format!("dep:{}:{key}", r.plural)
}

/// The queue key for an owner being deleted with a finalizer the collector serves.
pub fn owner_key(r: &Resource, key: &str) -> String {
    format!("owner:{}:{key}", r.plural)
}
