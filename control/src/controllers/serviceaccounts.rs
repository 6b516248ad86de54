//! The ServiceAccount controller: every namespace has a ServiceAccount named `default`, made
//! when the namespace appears and made again when deleted, as Kubernetes' controller does.
//! Keys are namespace names.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use skiff_api::ApiError;

use super::api;
use super::runtime::{Action, Cache, Reconciler};
use crate::registry::Registry;

pub use skiff_api::DEFAULT_SERVICE_ACCOUNT;

pub struct ServiceAccountController {
    pub reg: Arc<Registry>,
    pub namespaces: Arc<Cache<Namespace>>,
    pub accounts: Arc<Cache<ServiceAccount>>,
}

/// The ServiceAccount a namespace is given.
pub fn default_account(ns: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(DEFAULT_SERVICE_ACCOUNT.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

impl Reconciler for ServiceAccountController {
    fn name(&self) -> &'static str {
        "serviceaccount"
    }

    async fn reconcile(&self, ns: &str) -> Result<Action, ApiError> {
        let active = self
            .namespaces
            .get(ns)
            .is_some_and(|n| n.metadata.deletion_timestamp.is_none());
        if !active
            || self
                .accounts
                .get(&format!("{ns}/{DEFAULT_SERVICE_ACCOUNT}"))
                .is_some()
        {
            return Ok(Action::AwaitChange);
        }
        match api::create(&self.reg, Some(ns), &default_account(ns)) {
            Ok(made) => self.accounts.wait_for(api::revision(&made.metadata)).await,
            // Made meanwhile, or the namespace went (or is going) away: nothing to do.
            Err(e) if matches!(e.code, 409 | 404 | 403) => {}
            Err(e) => return Err(e),
        }
        Ok(Action::AwaitChange)
    }
}
