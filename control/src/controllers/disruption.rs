//! The disruption controller: keeps each PodDisruptionBudget's status (expected and healthy
//! pods, disruptions allowed) current, for `kubectl get pdb`. Evictions do not read it: the
//! registry counts the budget afresh under its eviction lock (see `Registry::evict`).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use skiff_api::{disruption, ApiError};

use super::api;
use super::runtime::Cache;
use crate::registry::Registry;

pub struct Disruption {
    pub reg: Arc<Registry>,
    pub budgets: Arc<Cache<PodDisruptionBudget>>,
    pub pods: Arc<Cache<Pod>>,
    pub replicasets: Arc<Cache<ReplicaSet>>,
}

impl Disruption {
    /// One pass over every budget. Returns how many statuses it wrote.
    pub fn check(&self) -> Result<usize, ApiError> {
        let mut written = 0;
        for pdb in self.budgets.list(None) {
            let ns = pdb.metadata.namespace.as_deref();
            let pods: Vec<Pod> = self.pods.list(ns).iter().map(|p| (**p).clone()).collect();
            let scale = |kind: &str, name: &str| {
                if kind != "ReplicaSet" {
                    return None;
                }
                let rs = self
                    .replicasets
                    .get(&format!("{}/{name}", ns.unwrap_or("default")))?;
                rs.spec.replicas
            };
            let status = disruption::budget(&pdb, &pods, scale).to_status(pdb.metadata.generation);
            if pdb.status.as_ref() == Some(&status) {
                continue;
            }
            match api::update_status(&self.reg, &*pdb, &status) {
                Ok(_) => written += 1,
                Err(e) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }
}
