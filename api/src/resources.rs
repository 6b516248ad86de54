//! The resources skiff serves, as the Kubernetes discovery documents describe them.

/// One served resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

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

const fn core(
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    has_status: bool,
) -> Resource {
    Resource {
        group: "",
        version: "v1",
        plural,
        singular,
        kind,
        namespaced,
        short_names,
        has_status,
        has_scale: false,
        create_only: false,
    }
}

const fn grouped(
    group: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    short_names: &'static [&'static str],
    has_scale: bool,
) -> Resource {
    Resource {
        group,
        version: "v1",
        plural,
        singular,
        kind,
        namespaced: true,
        short_names,
        has_status: true,
        has_scale,
        create_only: false,
    }
}

/// Every resource skiff serves.
pub static RESOURCES: &[Resource] = &[
    core("namespaces", "namespace", "Namespace", false, &["ns"], true),
    core("nodes", "node", "Node", false, &["no"], true),
    core("pods", "pod", "Pod", true, &["po"], true),
    core("services", "service", "Service", true, &["svc"], true),
    core("endpoints", "endpoints", "Endpoints", true, &["ep"], false),
    core("events", "event", "Event", true, &["ev"], false),
    core("configmaps", "configmap", "ConfigMap", true, &["cm"], false),
    core("secrets", "secret", "Secret", true, &[], false),
    core(
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        false,
    ),
    grouped(
        "apps",
        "deployments",
        "deployment",
        "Deployment",
        &["deploy"],
        true,
    ),
    grouped(
        "apps",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        &["rs"],
        true,
    ),
    grouped(
        "apps",
        "daemonsets",
        "daemonset",
        "DaemonSet",
        &["ds"],
        false,
    ),
    // A workload's template versions (DaemonSet and StatefulSet history): no status.
    Resource {
        group: "apps",
        version: "v1",
        plural: "controllerrevisions",
        singular: "controllerrevision",
        kind: "ControllerRevision",
        namespaced: true,
        short_names: &[],
        has_status: false,
        has_scale: false,
        create_only: false,
    },
    grouped(
        "apps",
        "statefulsets",
        "statefulset",
        "StatefulSet",
        &["sts"],
        true,
    ),
    core(
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
        true,
    ),
    core(
        "persistentvolumes",
        "persistentvolume",
        "PersistentVolume",
        false,
        &["pv"],
        true,
    ),
    grouped("batch", "jobs", "job", "Job", &[], false),
    grouped("batch", "cronjobs", "cronjob", "CronJob", &["cj"], false),
    grouped(
        "policy",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        "PodDisruptionBudget",
        &["pdb"],
        false,
    ),
    // Node heartbeats (`kube-node-lease/NODE`) and leader election: spec only, no status.
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        has_status: false,
        has_scale: false,
        create_only: false,
    },
    // The endpoints of Services in slices of at most 100 (the EndpointSlice controller's).
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        has_status: false,
        has_scale: false,
        create_only: false,
    },
    // The core Events seen in events.k8s.io's shape: one storage (see `events.rs`).
    Resource {
        group: crate::events::GROUP,
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &[],
        has_status: false,
        has_scale: false,
        create_only: false,
    },
    // Storage classes: cluster-wide, no status.
    Resource {
        group: "storage.k8s.io",
        version: "v1",
        plural: "storageclasses",
        singular: "storageclass",
        kind: "StorageClass",
        namespaced: false,
        short_names: &["sc"],
        has_status: false,
        has_scale: false,
        create_only: false,
    },
    rbac("roles", "role", "Role", true),
    rbac("rolebindings", "rolebinding", "RoleBinding", true),
    rbac("clusterroles", "clusterrole", "ClusterRole", false),
    rbac(
        "clusterrolebindings",
        "clusterrolebinding",
        "ClusterRoleBinding",
        false,
    ),
    // Custom resources are served from these (see `crd.rs`).
    Resource {
        group: crate::crd::GROUP,
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        has_status: true,
        has_scale: false,
        create_only: false,
    },
    review(
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        "SelfSubjectAccessReview",
        false,
    ),
    review(
        "authorization.k8s.io",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview",
        "SelfSubjectRulesReview",
        false,
    ),
    review(
        "authorization.k8s.io",
        "subjectaccessreviews",
        "subjectaccessreview",
        "SubjectAccessReview",
        false,
    ),
    review(
        "authorization.k8s.io",
        "localsubjectaccessreviews",
        "localsubjectaccessreview",
        "LocalSubjectAccessReview",
        true,
    ),
    review(
        "authentication.k8s.io",
        "selfsubjectreviews",
        "selfsubjectreview",
        "SelfSubjectReview",
        false,
    ),
    review(
        "authentication.k8s.io",
        "tokenreviews",
        "tokenreview",
        "TokenReview",
        false,
    ),
];

/// An access or identity review: created, answered, never stored.
const fn review(
    group: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Resource {
    Resource {
        group,
        version: "v1",
        plural,
        singular,
        kind,
        namespaced,
        short_names: &[],
        has_status: false,
        has_scale: false,
        create_only: true,
    }
}

/// The API group of RBAC's roles and bindings.
pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// An RBAC kind: no status, no scale.
const fn rbac(
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Resource {
    Resource {
        group: RBAC_GROUP,
        version: "v1",
        plural,
        singular,
        kind,
        namespaced,
        short_names: &[],
        has_status: false,
        has_scale: false,
        create_only: false,
    }
}

/// The API groups other than core, with their one version each.
pub fn groups() -> Vec<&'static str> {
    let mut g: Vec<&'static str> = RESOURCES
        .iter()
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    g.dedup();
    g
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
                "authentication.k8s.io"
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
