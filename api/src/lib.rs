//! skiff-api: the Kubernetes-compatible vocabulary every other skiff crate speaks.
//!
//! This crate does no IO. It owns:
//! - [`resources`]: the table of served resources (group, version, plural, kind, scope);
//! - [`selector`] and [`fields`]: label and field selectors;
//! - [`validation`] and [`defaults`]: what a well-formed object is, and what is filled in;
//! - [`crd`] and [`schema`]: CustomResourceDefinitions, the custom resources they serve, and
//!   custom objects pruned, defaulted and validated against their `openAPIV3Schema`;
//! - [`limits`]: what a request may carry, checked before anything is parsed;
//! - [`patch`]: JSON merge patch, JSON patch and strategic merge patch;
//! - [`openapi`]: the OpenAPI v2 and v3 documents, from k8s-openapi's schemas;
//! - [`error`]: [`ApiError`], rendered as a Kubernetes `Status`;
//! - [`conditions`]: setting status conditions of any kind by Kubernetes' rule;
//! - [`meta`]: small accessors over untyped objects (`serde_json::Value`).
//!
//! Wire types come from `k8s-openapi`, re-exported as [`k8s`].

pub mod cel;
pub mod conditions;
pub mod crd;
pub mod defaults;
pub mod disruption;
pub mod error;
pub mod events;
pub mod fields;
pub mod limits;
pub mod managed;
pub mod meta;
pub mod openapi;
pub mod openapi_proto;
pub mod patch;
pub mod protobuf;
#[rustfmt::skip]
pub mod protobuf_schema;
pub mod quantity;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod table;
pub mod validation;

pub use error::{ApiError, Cause};
pub use k8s_openapi as k8s;
pub use resources::{Resource, RESOURCES};

/// Label put on every ReplicaSet and Pod a Deployment owns, as Kubernetes does.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Annotation carrying a Deployment's (and its ReplicaSets') revision number.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
/// Node label saying the node runs WebAssembly workloads.
pub const WASM_NODE_LABEL: &str = "skiff.dev/wasm";
/// Label on nodes: "true" where OCI containers run (runc and the CNI plugins are there).
pub const OCI_NODE_LABEL: &str = "skiff.dev/oci";
/// Node condition saying whether OCI containers run there, and if not, why.
pub const OCI_CONDITION: &str = "OCIRuntimeReady";
/// The name of the ServiceAccount every namespace has, and pods use unless they name another.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The ServiceAccount a pod runs as: `serviceAccountName` (or the deprecated
/// `serviceAccount`), `default` when it names none.
pub fn pod_service_account(pod: &k8s_openapi::api::core::v1::Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
}
