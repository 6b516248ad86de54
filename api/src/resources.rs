//! The resources skiff serves, as the Kubernetes discovery documents describe them.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;

/// A built-in kind's wire type (its k8s-openapi type), as the functions that need it: decoding
/// a body into it, and its OpenAPI schema. Custom resources have none.
#[derive(Clone, Copy)]
pub struct WireType {
    /// Decodes an object into the type; with `strict`, a field the type lacks is an error.
    pub decode: fn(&Value, bool) -> Result<(), ApiError>,
    /// The type's schema, registered in the generator's definitions.
    pub schema: fn(&mut SchemaGenerator) -> Schema,
}

impl std::fmt::Debug for WireType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireType")
    }
}

/// One served resource.
#[derive(Debug, Clone, Copy)]
pub struct Resource {
    /// API group; `""` is the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower case: the path segment (`pods`).
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Has a `/status` subresource (spec and status written separately).
    pub has_status: bool,
    /// Has a `/scale` subresource.
    pub has_scale: bool,
    /// Only created, answered and never stored (access and identity reviews).
    pub create_only: bool,
    /// The k8s-openapi type of a built-in kind; None for a custom resource.
    pub wire: Option<WireType>,
}

/// Resources are the same when they serve the same thing (the wire type follows from it).
impl PartialEq for Resource {
    fn eq(&self, o: &Self) -> bool {
        let fields = |r: &Self| {
            (
                r.group,
                r.version,
                r.plural,
                r.singular,
                r.kind,
                r.namespaced,
                r.short_names,
                (r.has_status, r.has_scale, r.create_only),
            )
        };
        fields(self) == fields(o)
    }
}

impl Eq for Resource {}

impl Resource {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps`, as Kubernetes names resources in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The store key prefix for this resource, `/registry/{plural}/`.
    pub fn key_prefix(&self) -> String {
        // events.k8s.io's Events are the core ones, as in Kubernetes' `/registry/events/`.
        if crate::events::is_events_v1(self) {
            return "/registry/events/".into();
        }
        format!("/registry/{}/", self.qualified())
    }

    /// The store key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/{name}", self.key_prefix()),
            _ => format!("{}{name}", self.key_prefix()),
        }
    }

    /// Whether this is one of the built-in resources of [`RESOURCES`] (not a custom one).
    pub fn is_builtin(&self) -> bool {
        RESOURCES
            .as_ptr_range()
            .contains(&(self as *const Resource))
            || RESOURCES.iter().any(|r| r == self)
    }

    /// Resolves a name a user typed: plural, singular, kind or short name,
    /// optionally qualified with the group (`deployments.apps`).
    pub fn lookup(name: &str) -> Option<&'static Resource> {
        let lower = name.to_ascii_lowercase();
        let (base, group) = match lower.split_once('.') {
            Some((b, g)) => (b.to_string(), Some(g.to_string())),
            None => (lower, None),
        };
        RESOURCES.iter().find(|r| {
            (r.plural == base
                || r.singular == base
                || r.kind.eq_ignore_ascii_case(&base)
                || r.short_names.contains(&base.as_str()))
                && group
                    .as_deref()
                    .is_none_or(|g| g == r.group || (g == "core" && r.group.is_empty()))
        })
    }

    /// The resource served under `group/version` with this plural.
    pub fn by_path(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// The resource of an object's `apiVersion` and `kind`.
    pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.kind == kind)
    }
}

/// Whether a k8s-openapi scope is namespaced.
pub trait Scope {
    const NAMESPACED: bool;
}

impl Scope for k8s_openapi::NamespaceResourceScope {
    const NAMESPACED: bool = true;
}

impl Scope for k8s_openapi::ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// What a k8s-openapi type must be to be served.
pub trait Wire: k8s_openapi::Resource + DeserializeOwned + Serialize + JsonSchema {}

impl<T: k8s_openapi::Resource + DeserializeOwned + Serialize + JsonSchema> Wire for T {}

fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// The row of a built-in kind: group, version, plural, kind and scope come from its
/// k8s-openapi type `T`; the singular is the kind in lower case, as Kubernetes has it.
/// No short names and no subresources until the builder methods below add them.
const fn kind<T: Wire>(singular: &'static str) -> Resource
where
    T::Scope: Scope,
{
    Resource {
        group: T::GROUP,
        version: T::VERSION,
        plural: T::URL_PATH_SEGMENT,
        singular,
        kind: T::KIND,
        namespaced: <T::Scope as Scope>::NAMESPACED,
        short_names: &[],
        has_status: false,
        has_scale: false,
        create_only: false,
        wire: Some(WireType {
            decode: crate::validation::check::<T>,
            schema: schema_of::<T>,
        }),
    }
}

impl Resource {
    /// The names `kubectl get` also accepts (`po`, `deploy`).
    const fn short(mut self, names: &'static [&'static str]) -> Self {
        self.short_names = names;
        self
    }

    /// With a `/status` subresource.
    const fn status(mut self) -> Self {
        self.has_status = true;
        self
    }

    /// With `/status` and `/scale` subresources.
    const fn scale(mut self) -> Self {
        self.has_status = true;
        self.has_scale = true;
        self
    }

    /// Created and answered, never stored (access and identity reviews).
    const fn create_only(mut self) -> Self {
        self.create_only = true;
        self
    }
}

use k8s_openapi::api::{
    admissionregistration::v1 as admission, apps::v1 as apps, authentication::v1 as authn,
    authorization::v1 as authz, autoscaling::v2 as autoscaling, batch::v1 as batch,
    certificates::v1 as certificates, coordination::v1 as coordination, core::v1 as core,
    discovery::v1 as discovery, events::v1 as events, networking::v1 as networking,
    node::v1 as node, policy::v1 as policy, rbac::v1 as rbac, scheduling::v1 as scheduling,
    storage::v1 as storage,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;

/// Every resource skiff serves, one row each; a group's rows are together. Adding a built-in
/// kind is a row here, plus its checks in `validation.rs`, its defaults in `defaults.rs` and
/// its columns in `table.rs` where it has any.
pub static RESOURCES: &[Resource] = &[
    kind::<core::Namespace>("namespace").short(&["ns"]).status(),
    kind::<core::Node>("node").short(&["no"]).status(),
    kind::<core::Pod>("pod").short(&["po"]).status(),
    kind::<core::Service>("service").short(&["svc"]).status(),
    kind::<core::Endpoints>("endpoints").short(&["ep"]),
    kind::<core::Event>("event").short(&["ev"]),
    kind::<core::ConfigMap>("configmap").short(&["cm"]),
    kind::<core::Secret>("secret"),
    kind::<core::ServiceAccount>("serviceaccount").short(&["sa"]),
    kind::<core::PersistentVolumeClaim>("persistentvolumeclaim")
        .short(&["pvc"])
        .status(),
    kind::<core::PersistentVolume>("persistentvolume")
        .short(&["pv"])
        .status(),
    // Stored only: quotas are not enforced nor their usage counted, limits not applied.
    kind::<core::ResourceQuota>("resourcequota")
        .short(&["quota"])
        .status(),
    kind::<core::LimitRange>("limitrange").short(&["limits"]),
    kind::<core::PodTemplate>("podtemplate"),
    // Stored only: no controller makes a ReplicationController's pods.
    kind::<core::ReplicationController>("replicationcontroller")
        .short(&["rc"])
        .status(),
    kind::<apps::Deployment>("deployment")
        .short(&["deploy"])
        .scale(),
    kind::<apps::ReplicaSet>("replicaset")
        .short(&["rs"])
        .scale(),
    kind::<apps::DaemonSet>("daemonset").short(&["ds"]).status(),
    // A workload's template versions (DaemonSet and StatefulSet history): no status.
    kind::<apps::ControllerRevision>("controllerrevision"),
    kind::<apps::StatefulSet>("statefulset")
        .short(&["sts"])
        .scale(),
    kind::<batch::Job>("job").status(),
    kind::<batch::CronJob>("cronjob").short(&["cj"]).status(),
    kind::<policy::PodDisruptionBudget>("poddisruptionbudget")
        .short(&["pdb"])
        .status(),
    // Node heartbeats (`kube-node-lease/NODE`) and leader election: spec only, no status.
    kind::<coordination::Lease>("lease"),
    // The endpoints of Services in slices of at most 100 (the EndpointSlice controller's).
    kind::<discovery::EndpointSlice>("endpointslice"),
    // The core Events seen in events.k8s.io's shape: one storage (see `events.rs`).
    kind::<events::Event>("event"),
    kind::<storage::StorageClass>("storageclass").short(&["sc"]),
    // Stored only: no CSI driver is called.
    kind::<storage::CSIDriver>("csidriver"),
    kind::<storage::CSINode>("csinode"),
    kind::<storage::VolumeAttachment>("volumeattachment").status(),
    kind::<storage::CSIStorageCapacity>("csistoragecapacity"),
    kind::<rbac::Role>("role"),
    kind::<rbac::RoleBinding>("rolebinding"),
    kind::<rbac::ClusterRole>("clusterrole"),
    kind::<rbac::ClusterRoleBinding>("clusterrolebinding"),
    // Custom resources are served from these (see `crd.rs`).
    kind::<apiextensions::CustomResourceDefinition>("customresourcedefinition")
        .short(&["crd", "crds"])
        .status(),
    kind::<authz::SelfSubjectAccessReview>("selfsubjectaccessreview").create_only(),
    kind::<authz::SelfSubjectRulesReview>("selfsubjectrulesreview").create_only(),
    kind::<authz::SubjectAccessReview>("subjectaccessreview").create_only(),
    kind::<authz::LocalSubjectAccessReview>("localsubjectaccessreview").create_only(),
    kind::<authn::SelfSubjectReview>("selfsubjectreview").create_only(),
    kind::<authn::TokenReview>("tokenreview").create_only(),
    // Stored only: no ingress controller reads them, no policy is enforced.
    kind::<networking::Ingress>("ingress")
        .short(&["ing"])
        .status(),
    kind::<networking::IngressClass>("ingressclass"),
    kind::<networking::NetworkPolicy>("networkpolicy").short(&["netpol"]),
    // Stored only: nothing scales on metrics. Served at autoscaling/v2 only.
    kind::<autoscaling::HorizontalPodAutoscaler>("horizontalpodautoscaler")
        .short(&["hpa"])
        .status(),
    // Stored only: webhooks are not called, policies not evaluated.
    kind::<admission::ValidatingWebhookConfiguration>("validatingwebhookconfiguration"),
    kind::<admission::MutatingWebhookConfiguration>("mutatingwebhookconfiguration"),
    kind::<admission::ValidatingAdmissionPolicy>("validatingadmissionpolicy").status(),
    kind::<admission::ValidatingAdmissionPolicyBinding>("validatingadmissionpolicybinding"),
    // A pod's `priorityClassName` is resolved to its `priority` when it is created.
    kind::<scheduling::PriorityClass>("priorityclass").short(&["pc"]),
    // A pod's `runtimeClassName` must name one; `runc` and `wasmtime` say where it can run.
    kind::<node::RuntimeClass>("runtimeclass"),
    // Stored only: nothing signs or approves them.
    kind::<certificates::CertificateSigningRequest>("certificatesigningrequest")
        .short(&["csr"])
        .status(),
];

/// The API group of RBAC's roles and bindings.
pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// The API groups other than core, each once, in the order of [`RESOURCES`].
pub fn groups() -> Vec<&'static str> {
    let mut g: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !g.contains(&r.group) {
            g.push(r.group);
        }
    }
    g
}

/// The one version a built-in group is served at (`v1`; `v2` for `autoscaling`).
pub fn group_version(group: &str) -> Option<&'static str> {
    RESOURCES
        .iter()
        .find(|r| r.group == group)
        .map(|r| r.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_accepts_every_spelling() {
        for n in [
            "deploy",
            "deployments",
            "deployment",
            "Deployment",
            "deployments.apps",
        ] {
            assert_eq!(Resource::lookup(n).unwrap().kind, "Deployment", "{n}");
        }
        assert_eq!(Resource::lookup("po").unwrap().plural, "pods");
        assert_eq!(Resource::lookup("svc").unwrap().plural, "services");
        assert!(Resource::lookup("deployments.batch").is_none());
        assert!(Resource::lookup("widgets").is_none());
    }

    #[test]
    fn keys_follow_the_registry_layout() {
        let pods = Resource::lookup("pods").unwrap();
        assert_eq!(pods.key(Some("default"), "a"), "/registry/pods/default/a");
        let deploy = Resource::lookup("deploy").unwrap();
        assert_eq!(
            deploy.key(Some("ns"), "web"),
            "/registry/deployments.apps/ns/web"
        );
        let nodes = Resource::lookup("nodes").unwrap();
        assert_eq!(nodes.key(None, "n1"), "/registry/nodes/n1");
        assert_eq!(
            Resource::by_kind("apps/v1", "ReplicaSet").unwrap().plural,
            "replicasets"
        );
        assert_eq!(
            groups(),
            vec![
                "apps",
                "batch",
                "policy",
                "coordination.k8s.io",
                "discovery.k8s.io",
                "events.k8s.io",
                "storage.k8s.io",
                "rbac.authorization.k8s.io",
                "apiextensions.k8s.io",
                "authorization.k8s.io",
                "authentication.k8s.io",
                "networking.k8s.io",
                "autoscaling",
                "admissionregistration.k8s.io",
                "scheduling.k8s.io",
                "node.k8s.io",
                "certificates.k8s.io"
            ]
        );
        let leases = Resource::by_path("coordination.k8s.io", "v1", "leases").unwrap();
        assert_eq!(
            leases.key(Some("kube-node-lease"), "n1"),
            "/registry/leases.coordination.k8s.io/kube-node-lease/n1"
        );
        assert_eq!(Resource::lookup("leases").unwrap().kind, "Lease");
        let crb = Resource::lookup("clusterrolebindings.rbac.authorization.k8s.io").unwrap();
        assert!(!crb.namespaced);
        assert_eq!(
            crb.key(None, "admin"),
            "/registry/clusterrolebindings.rbac.authorization.k8s.io/admin"
        );
        assert!(Resource::lookup("role").unwrap().namespaced);
    }
}
