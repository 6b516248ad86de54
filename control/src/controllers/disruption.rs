//! The disruption controller: keeps each PodDisruptionBudget's status (expected and healthy
//! pods, disruptions allowed) current, for `kubectl get pdb`. Evictions do not read it: the
//! registry counts the budget afresh under its eviction lock (see `Registry::evict`).

use k8s_openapi::api::apps::v1::ReplicaSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::Value;
use skiff_api::{disruption, meta, ApiError, Resource};

use super::runtime::Cache;
use crate::registry::{Registry, Sub, WriteOptions};

pub struct Disruption {
    pub reg: Arc<Registry>,
    pub budgets: Arc<Cache<PodDisruptionBudget>>,
    pub pods: Arc<Cache<Pod>>,
    pub replicasets: Arc<Cache<ReplicaSet>>,
}

impl Disruption {
    /// One pass over every budget. Returns how many statuses it wrote.
    pub fn check(&self) -> Result<usize, ApiError> {
        let r = Resource::lookup("poddisruptionbudgets").expect("pdbs");
        let mut written = 0;
        for obj in self.budgets.list_raw(None) {
            let Ok(pdb) = serde_json::from_value::<PodDisruptionBudget>((*obj).clone()) else {
                continue;
            };
            let ns = meta::namespace(&obj);
            let pods: Vec<Pod> = self
                .pods
                .list_raw(ns)
                .iter()
                .filter_map(|p| serde_json::from_value((**p).clone()).ok())
                .collect();
            let scale = |kind: &str, name: &str| {
                if kind != "ReplicaSet" {
                    return None;
                }
                let rs = self
                    .replicasets
                    .get_raw(&format!("{}/{name}", ns.unwrap_or("default")))?;
                rs.pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .map(|n| n as i32)
            };
            let status = disruption::budget(&pdb, &pods, scale).to_status(pdb.metadata.generation);
            let want =
                serde_json::to_value(&status).map_err(|e| ApiError::internal(e.to_string()))?;
            if obj.get("status") == Some(&want) {
                continue;
            }
            let mut next: Value = (*obj).clone();
            next["status"] = want;
            match self.reg.update(
                r,
                ns,
                meta::name(&obj),
                next,
                Sub::Status,
                &WriteOptions::default(),
            ) {
                Ok(_) => written += 1,
                Err(e) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }
}
