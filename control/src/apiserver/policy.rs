//! The default roles and bindings, as the kube-apiserver's bootstrap policy makes them
//! (`plugin/pkg/auth/authorizer/rbac/bootstrappolicy`), for the resources skiff serves:
//! `cluster-admin` (bound to `system:masters`), the aggregated `admin`, `edit` and `view`
//! with the `system:aggregate-to-*` roles that feed them, `system:basic-user`,
//! `system:discovery` and `system:public-info-viewer` (bound to every authenticated user).
//! Reconciled at every server start as Kubernetes' bootstrap policy is
//! (`pkg/registry/rbac/reconciliation`): a missing role or binding is created; an existing
//! role gets back the rules, aggregation selectors, labels and annotations it lacks, and an
//! existing binding the subjects it lacks (a binding to another role is made again); what
//! was added is kept. A role or binding annotated
//! `rbac.authorization.kubernetes.io/autoupdate: "false"` is left as it is.

use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use skiff_api::resources::RBAC_GROUP;
use skiff_api::{ApiError, Resource};

use crate::registry::{Registry, Sub, WriteOptions};

const AUTOUPDATE: &str = "rbac.authorization.kubernetes.io/autoupdate";
const AGGREGATE_TO: &str = "rbac.authorization.k8s.io/aggregate-to-";

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn urls(paths: &[&str], verbs: &[&str]) -> Value {
    json!({"nonResourceURLs": paths, "verbs": verbs})
}

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];
const READ_WRITE: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn metadata(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut l = serde_json::Map::new();
    l.insert("kubernetes.io/bootstrapping".into(), json!("rbac-defaults"));
    for (k, v) in labels {
        l.insert(k.to_string(), json!(v));
    }
    json!({"name": name, "labels": l, "annotations": {AUTOUPDATE: "true"}})
}

fn cluster_role(name: &str, labels: &[(&str, &str)], rules: Vec<Value>) -> Value {
    json!({"apiVersion": format!("{RBAC_GROUP}/v1"), "kind": "ClusterRole",
           "metadata": metadata(name, labels), "rules": rules})
}

fn aggregated(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut r = cluster_role(name, labels, vec![]);
    r["aggregationRule"] = json!({"clusterRoleSelectors": [
        {"matchLabels": {format!("{AGGREGATE_TO}{name}"): "true"}}]});
    r
}

fn binding(name: &str, role: &str, groups: &[&str]) -> Value {
    let subjects: Vec<Value> = groups
        .iter()
        .map(|g| json!({"apiGroup": RBAC_GROUP, "kind": "Group", "name": g}))
        .collect();
    json!({"apiVersion": format!("{RBAC_GROUP}/v1"), "kind": "ClusterRoleBinding",
           "metadata": metadata(name, &[]),
           "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
           "subjects": subjects})
}

/// The default ClusterRoles.
pub fn cluster_roles() -> Vec<Value> {
    let to = |r: &str| format!("{AGGREGATE_TO}{r}");
    let (to_admin, to_edit, to_view) = (to("admin"), to("edit"), to("view"));
    vec![
        cluster_role(
            "cluster-admin",
            &[],
            vec![rule(&["*"], &["*"], &["*"]), urls(&["*"], &["*"])],
        ),
        aggregated("admin", &[]),
        aggregated("edit", &[(&to_admin, "true")]),
        aggregated("view", &[(&to_edit, "true")]),
        cluster_role(
            "system:aggregate-to-admin",
            &[(&to_admin, "true")],
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["localsubjectaccessreviews"],
                    &["create"],
                ),
                rule(&[RBAC_GROUP], &["rolebindings", "roles"], READ_WRITE),
            ],
        ),
        cluster_role(
            "system:aggregate-to-edit",
            &[(&to_edit, "true")],
            vec![
                rule(
                    &[""],
                    &[
                        "pods/attach",
                        "pods/exec",
                        "pods/portforward",
                        "pods/proxy",
                        "secrets",
                        "services/proxy",
                    ],
                    READ,
                ),
                rule(&[""], &["serviceaccounts"], &["impersonate"]),
                rule(
                    &[""],
                    &[
                        "pods",
                        "pods/attach",
                        "pods/exec",
                        "pods/portforward",
                        "pods/proxy",
                    ],
                    WRITE,
                ),
                rule(&[""], &["pods/eviction"], &["create"]),
                rule(
                    &[""],
                    &[
                        "configmaps",
                        "events",
                        "persistentvolumeclaims",
                        "replicationcontrollers",
                        "replicationcontrollers/scale",
                        "secrets",
                        "serviceaccounts",
                        "services",
                        "services/proxy",
                    ],
                    WRITE,
                ),
                rule(&[""], &["serviceaccounts/token"], &["create"]),
                rule(
                    &["apps"],
                    &[
                        "daemonsets",
                        "deployments",
                        "deployments/rollback",
                        "deployments/scale",
                        "replicasets",
                        "replicasets/scale",
                        "statefulsets",
                        "statefulsets/scale",
                    ],
                    WRITE,
                ),
                rule(&["autoscaling"], &["horizontalpodautoscalers"], WRITE),
                rule(&["batch"], &["cronjobs", "jobs"], WRITE),
                rule(&["policy"], &["poddisruptionbudgets"], WRITE),
                rule(
                    &["networking.k8s.io"],
                    &["ingresses", "networkpolicies"],
                    WRITE,
                ),
                rule(&["coordination.k8s.io"], &["leases"], READ_WRITE),
            ],
        ),
        cluster_role(
            "system:aggregate-to-view",
            &[(&to_view, "true")],
            vec![
                rule(
                    &[""],
                    &[
                        "configmaps",
                        "endpoints",
                        "persistentvolumeclaims",
                        "persistentvolumeclaims/status",
                        "pods",
                        "replicationcontrollers",
                        "replicationcontrollers/scale",
                        "serviceaccounts",
                        "services",
                        "services/status",
                    ],
                    READ,
                ),
                rule(
                    &[""],
                    &[
                        "bindings",
                        "events",
                        "limitranges",
                        "namespaces/status",
                        "pods/log",
                        "pods/status",
                        "replicationcontrollers/status",
                        "resourcequotas",
                        "resourcequotas/status",
                    ],
                    READ,
                ),
                rule(&[""], &["namespaces"], READ),
                rule(&["discovery.k8s.io"], &["endpointslices"], READ),
                rule(
                    &["apps"],
                    &[
                        "controllerrevisions",
                        "daemonsets",
                        "daemonsets/status",
                        "deployments",
                        "deployments/scale",
                        "deployments/status",
                        "replicasets",
                        "replicasets/scale",
                        "replicasets/status",
                        "statefulsets",
                        "statefulsets/scale",
                        "statefulsets/status",
                    ],
                    READ,
                ),
                rule(
                    &["autoscaling"],
                    &[
                        "horizontalpodautoscalers",
                        "horizontalpodautoscalers/status",
                    ],
                    READ,
                ),
                rule(
                    &["batch"],
                    &["cronjobs", "cronjobs/status", "jobs", "jobs/status"],
                    READ,
                ),
                rule(
                    &["policy"],
                    &["poddisruptionbudgets", "poddisruptionbudgets/status"],
                    READ,
                ),
                rule(
                    &["networking.k8s.io"],
                    &["ingresses", "ingresses/status", "networkpolicies"],
                    READ,
                ),
            ],
        ),
        cluster_role(
            "system:basic-user",
            &[],
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                ),
                rule(
                    &["authentication.k8s.io"],
                    &["selfsubjectreviews"],
                    &["create"],
                ),
            ],
        ),
        cluster_role(
            "system:discovery",
            &[],
            vec![urls(
                &[
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/healthz",
                    "/livez",
                    "/openapi",
                    "/openapi/*",
                    "/readyz",
                    "/version",
                    "/version/",
                ],
                &["get"],
            )],
        ),
        cluster_role(
            "system:public-info-viewer",
            &[],
            vec![urls(
                &["/healthz", "/livez", "/readyz", "/version", "/version/"],
                &["get"],
            )],
        ),
    ]
}

/// The default ClusterRoleBindings.
pub fn cluster_role_bindings() -> Vec<Value> {
    vec![
        binding("cluster-admin", "cluster-admin", &[super::auth::MASTERS]),
        binding(
            "system:basic-user",
            "system:basic-user",
            &[super::auth::AUTHENTICATED],
        ),
        binding(
            "system:discovery",
            "system:discovery",
            &[super::auth::AUTHENTICATED],
        ),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            &[super::auth::AUTHENTICATED, "system:unauthenticated"],
        ),
    ]
}

/// `expected` with `existing` over it: the keys `existing` lacks are added, its values win.
fn merged(
    expected: &Option<BTreeMap<String, String>>,
    existing: &Option<BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    let mut out = expected.clone().unwrap_or_default();
    out.extend(existing.clone().unwrap_or_default());
    (!out.is_empty()).then_some(out)
}

fn protected(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    m.annotations
        .as_ref()
        .and_then(|a| a.get(AUTOUPDATE))
        .is_some_and(|v| v == "false")
}

/// The default role `expected` reconciled into `existing`, as Kubernetes'
/// `computeReconciledRole` without removing anything: None when nothing changes or the
/// role is protected by `autoupdate: "false"`.
pub fn reconcile_role(existing: &ClusterRole, expected: &ClusterRole) -> Option<ClusterRole> {
    if protected(&existing.metadata) {
        return None;
    }
    let mut out = existing.clone();
    out.metadata.labels = merged(&expected.metadata.labels, &existing.metadata.labels);
    out.metadata.annotations = merged(
        &expected.metadata.annotations,
        &existing.metadata.annotations,
    );
    let have = existing.rules.as_deref().unwrap_or_default();
    let (_, missing) = super::rbac::covers(have, expected.rules.as_deref().unwrap_or_default());
    if !missing.is_empty() {
        out.rules = Some(have.iter().cloned().chain(missing).collect());
    }
    match (&expected.aggregation_rule, &existing.aggregation_rule) {
        (None, Some(_)) => out.aggregation_rule = None,
        (Some(want), have) => {
            let have_selectors = have
                .as_ref()
                .and_then(|a| a.cluster_role_selectors.clone())
                .unwrap_or_default();
            let missing: Vec<_> = want
                .cluster_role_selectors
                .iter()
                .flatten()
                .filter(|s| !have_selectors.contains(s))
                .cloned()
                .collect();
            if !missing.is_empty() {
                let mut rule = have.clone().unwrap_or_default();
                rule.cluster_role_selectors =
                    Some(have_selectors.into_iter().chain(missing).collect());
                out.aggregation_rule = Some(rule);
            }
        }
        (None, None) => {}
    }
    (out != *existing).then_some(out)
}

/// What reconciling a default binding asks for.
#[derive(Debug, PartialEq)]
pub enum BindingChange {
    None,
    Update(ClusterRoleBinding),
    /// The role it binds changed: `roleRef` is immutable, so it is made again.
    Recreate(ClusterRoleBinding),
}

/// The default binding `expected` reconciled into `existing`, as Kubernetes'
/// `computeReconciledRoleBinding` without removing subjects.
pub fn reconcile_binding(
    existing: &ClusterRoleBinding,
    expected: &ClusterRoleBinding,
) -> BindingChange {
    if protected(&existing.metadata) {
        return BindingChange::None;
    }
    let mut out = existing.clone();
    out.metadata.labels = merged(&expected.metadata.labels, &existing.metadata.labels);
    out.metadata.annotations = merged(
        &expected.metadata.annotations,
        &existing.metadata.annotations,
    );
    let have = existing.subjects.clone().unwrap_or_default();
    let missing: Vec<_> = expected
        .subjects
        .iter()
        .flatten()
        .filter(|s| !have.contains(s))
        .cloned()
        .collect();
    if !missing.is_empty() {
        out.subjects = Some(have.into_iter().chain(missing).collect());
    }
    if out.role_ref != expected.role_ref {
        out.role_ref = expected.role_ref.clone();
        out.metadata.resource_version = None;
        out.metadata.uid = None;
        return BindingChange::Recreate(out);
    }
    if out == *existing {
        BindingChange::None
    } else {
        BindingChange::Update(out)
    }
}

fn typed<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::internal(format!("bootstrap policy: {e}")))
}

fn encode<T: serde::Serialize>(t: &T) -> Result<Value, ApiError> {
    serde_json::to_value(t).map_err(|e| ApiError::internal(format!("bootstrap policy: {e}")))
}

/// Creates the default roles and bindings that are missing and reconciles those that
/// exist (see the module's documentation). Another server doing the same at once makes a
/// write conflict or exist already: the pass is then made again from what it wrote.
pub fn bootstrap(reg: &Registry) -> Result<(), ApiError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match bootstrap_once(reg) {
            Err(e) if (e.code == 409) && attempt < 5 => continue,
            other => return other,
        }
    }
}

fn bootstrap_once(reg: &Registry) -> Result<(), ApiError> {
    let roles = Resource::lookup("clusterroles.rbac.authorization.k8s.io").expect("clusterroles");
    let bindings = Resource::lookup("clusterrolebindings.rbac.authorization.k8s.io")
        .expect("clusterrolebindings");
    let opts = WriteOptions::default();
    for obj in cluster_roles() {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let Some(existing) = reg.try_get(roles, None, &name)? else {
            reg.create(roles, None, obj, &opts)?;
            continue;
        };
        let existing: ClusterRole = typed(existing)?;
        if let Some(next) = reconcile_role(&existing, &typed(obj)?) {
            tracing::info!(role = %name, "default cluster role reconciled");
            reg.update(roles, None, &name, encode(&next)?, Sub::Main, &opts)?;
        }
    }
    for obj in cluster_role_bindings() {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let Some(existing) = reg.try_get(bindings, None, &name)? else {
            reg.create(bindings, None, obj, &opts)?;
            continue;
        };
        let existing: ClusterRoleBinding = typed(existing)?;
        match reconcile_binding(&existing, &typed(obj)?) {
            BindingChange::None => {}
            BindingChange::Update(next) => {
                tracing::info!(binding = %name, "default cluster role binding reconciled");
                reg.update(bindings, None, &name, encode(&next)?, Sub::Main, &opts)?;
            }
            BindingChange::Recreate(next) => {
                tracing::info!(binding = %name, "default cluster role binding made again");
                reg.delete(bindings, None, &name, &Default::default())?;
                reg.create(bindings, None, encode(&next)?, &opts)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ClusterConfig;
    use crate::store::sqlite::SqliteStore;
    use std::sync::Arc;

    fn role(reg: &Registry, name: &str) -> ClusterRole {
        let r = Resource::lookup("clusterroles").unwrap();
        typed(reg.get(r, None, name).unwrap()).unwrap()
    }

    fn put(reg: &Registry, resource: &str, name: &str, obj: &impl serde::Serialize) {
        let r = Resource::lookup(resource).unwrap();
        reg.update(
            r,
            None,
            name,
            encode(obj).unwrap(),
            Sub::Main,
            &Default::default(),
        )
        .unwrap();
    }

    /// A default role that lost a rule or a label gets it back at the next start, and keeps
    /// what was added; with `autoupdate: "false"` it is left alone. A binding gets its
    /// subjects back the same way.
    #[test]
    fn default_roles_and_bindings_are_reconciled_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        bootstrap(&reg).unwrap();
        let original = role(&reg, "system:basic-user");

        // A rule taken away and one added; a label taken away.
        let mut changed = original.clone();
        let mut rules = changed.rules.clone().unwrap();
        rules.remove(0);
        let extra =
            typed(json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}))
                .unwrap();
        rules.push(extra);
        changed.rules = Some(rules);
        changed.metadata.labels.as_mut().unwrap().clear();
        put(&reg, "clusterroles", "system:basic-user", &changed);
        bootstrap(&reg).unwrap();
        let now = role(&reg, "system:basic-user");
        let (covers, _) = super::super::rbac::covers(
            now.rules.as_deref().unwrap(),
            original.rules.as_deref().unwrap(),
        );
        assert!(covers, "the missing rule is back: {:?}", now.rules);
        assert!(
            now.rules
                .as_ref()
                .unwrap()
                .iter()
                .any(|r| r.resources.as_deref() == Some(&["configmaps".to_string()][..])),
            "the added rule is kept"
        );
        assert_eq!(
            now.metadata.labels.as_ref().unwrap()["kubernetes.io/bootstrapping"],
            "rbac-defaults"
        );
        // Nothing to do when nothing changed.
        assert_eq!(reconcile_role(&now, &now), None);

        // Protected: left as changed.
        let mut protected = now.clone();
        protected.rules = Some(vec![]);
        protected
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(AUTOUPDATE.into(), "false".into());
        put(&reg, "clusterroles", "system:basic-user", &protected);
        bootstrap(&reg).unwrap();
        assert_eq!(
            role(&reg, "system:basic-user").rules.unwrap_or_default(),
            vec![]
        );

        // A binding's subjects.
        let r = Resource::lookup("clusterrolebindings").unwrap();
        let mut b: ClusterRoleBinding =
            typed(reg.get(r, None, "system:discovery").unwrap()).unwrap();
        let want = b.subjects.clone();
        b.subjects = Some(vec![]);
        put(&reg, "clusterrolebindings", "system:discovery", &b);
        bootstrap(&reg).unwrap();
        let b: ClusterRoleBinding = typed(reg.get(r, None, "system:discovery").unwrap()).unwrap();
        assert_eq!(b.subjects, want);
    }
}
