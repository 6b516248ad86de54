//! The root CA publisher: every namespace has a ConfigMap `kube-root-ca.crt` whose `ca.crt` is
//! the cluster CA (what a pod trusts the API server by), made when the namespace appears and
//! made again when deleted or changed, as Kubernetes' controller does. Keys are namespace names.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use skiff_api::ApiError;

use super::api;
use super::runtime::{Action, Cache, Reconciler};
use crate::registry::Registry;

/// The ConfigMap every namespace has.
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";
/// Its key holding the CA certificate (PEM).
pub const CA_KEY: &str = "ca.crt";
const DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.";

pub struct RootCaPublisher {
    pub reg: Arc<Registry>,
    pub namespaces: Arc<Cache<Namespace>>,
    pub configmaps: Arc<Cache<ConfigMap>>,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
}

/// The ConfigMap a namespace is given.
pub fn root_ca_configmap(ns: &str, ca_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CA_CONFIGMAP.into()),
            namespace: Some(ns.into()),
            annotations: Some(BTreeMap::from([(
                "kubernetes.io/description".to_string(),
                DESCRIPTION.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CA_KEY.to_string(), ca_pem.to_string())])),
        ..Default::default()
    }
}

impl Reconciler for RootCaPublisher {
    fn name(&self) -> &'static str {
        "root-ca-cert-publisher"
    }

    async fn reconcile(&self, ns: &str) -> Result<Action, ApiError> {
        let active = self
            .namespaces
            .get(ns)
            .is_some_and(|n| n.metadata.deletion_timestamp.is_none());
        if !active {
            return Ok(Action::AwaitChange);
        }
        let wanted = root_ca_configmap(ns, &self.ca_pem);
        let written = match self.configmaps.get(&format!("{ns}/{ROOT_CA_CONFIGMAP}")) {
            Some(cm) if cm.data == wanted.data && cm.binary_data.is_none() => {
                return Ok(Action::AwaitChange)
            }
            // Changed by someone: the data is put back, the rest of the object kept.
            Some(cm) => {
                let mut cm = (*cm).clone();
                cm.data = wanted.data;
                cm.binary_data = None;
                api::update(&self.reg, &cm)
            }
            None => api::create(&self.reg, Some(ns), &wanted),
        };
        match written {
            Ok(cm) => self.configmaps.wait_for(api::revision(&cm.metadata)).await,
            // Written meanwhile (a conflict brings the change back here), or the namespace
            // went (or is going) away.
            Err(e) if matches!(e.code, 409 | 404 | 403) => {}
            Err(e) => return Err(e),
        }
        Ok(Action::AwaitChange)
    }
}
