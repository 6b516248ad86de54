//! Discovery documents: `/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`, `/version`.
//! The OpenAPI documents are [`super::openapi`]'s.

use serde_json::{json, Value};
use skiff_api::crd::CustomResources;
use skiff_api::resources::{group_version, groups, RESOURCES};
use skiff_api::Resource;

/// The verbs of the proxy subresources: one per HTTP method forwarded.
const PROXY_VERBS: &[&str] = &["create", "delete", "get", "patch", "update"];

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "gitVersion": concat!("v1.37.0+skiff-", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if std::env::consts::ARCH == "x86_64" { "amd64" } else { std::env::consts::ARCH }),
    })
}

pub fn api_versions(addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}],
    })
}

pub fn api_groups() -> Value {
    let gs: Vec<Value> = groups().into_iter().filter_map(group_entry).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs})
}

/// A built-in group's entry: its one version, preferred.
fn group_entry(group: &str) -> Option<Value> {
    let v = group_version(group)?;
    let gv = json!({"groupVersion": format!("{group}/{v}"), "version": v});
    Some(json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv}))
}

pub fn api_group(group: &str) -> Option<Value> {
    let mut doc = group_entry(group)?;
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The resources served in a group version; None when it is not served.
fn served(group: &str, version: &str) -> Option<Vec<&'static Resource>> {
    let rs: Vec<_> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    (!rs.is_empty()).then_some(rs)
}

pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let rs = served(group, version)?;
    let mut out = Vec::new();
    for r in rs {
        let verbs: &[&str] = if r.create_only { &["create"] } else { VERBS };
        let mut entry = json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": verbs,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        // Kubernetes' `all` category.
        if matches!(
            r.kind,
            "Pod"
                | "ReplicationController"
                | "Service"
                | "DaemonSet"
                | "Deployment"
                | "ReplicaSet"
                | "StatefulSet"
                | "HorizontalPodAutoscaler"
                | "Job"
                | "CronJob"
        ) {
            entry["categories"] = json!(["all"]);
        }
        out.push(entry);
        out.extend(status_and_scale(r));
        if r.kind == "Service" {
            out.push(
                json!({"name": "services/proxy", "singularName": "", "namespaced": true,
                            "kind": "ServiceProxyOptions", "verbs": PROXY_VERBS}),
            );
        }
        if r.kind == "ServiceAccount" {
            out.push(json!({"name": "serviceaccounts/token", "singularName": "", "namespaced": true,
                            "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}));
        }
        if r.kind == "Pod" {
            for (sub, kind, verbs) in [
                ("log", "Pod", &["get"][..]),
                ("exec", "PodExecOptions", &["create", "get"][..]),
                (
                    "portforward",
                    "PodPortForwardOptions",
                    &["create", "get"][..],
                ),
                ("proxy", "PodProxyOptions", PROXY_VERBS),
                ("binding", "Binding", &["create"][..]),
                ("eviction", "Eviction", &["create"][..]),
            ] {
                let mut e = json!({"name": format!("pods/{sub}"), "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs});
                if sub == "eviction" {
                    // kubectl drain evicts (rather than deletes) only where this is said.
                    e["group"] = json!("policy");
                    e["version"] = json!("v1");
                }
                out.push(e);
            }
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

// ---- custom resources ---------------------------------------------------------------------

/// The `APIGroup` entries of the groups custom resources are served in.
pub fn custom_api_groups(custom: &CustomResources) -> Vec<Value> {
    custom
        .groups()
        .into_iter()
        .map(|(g, vs)| custom_group_entry(g, &vs))
        .collect()
}

fn custom_group_entry(group: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(json!({}))})
}

/// `/apis/{group}` of a custom group.
pub fn custom_api_group(custom: &CustomResources, group: &str) -> Option<Value> {
    let groups = custom.groups();
    let vs = groups.get(group)?;
    let mut doc = custom_group_entry(group, vs);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// `/apis/{group}/{version}` of a custom group version.
pub fn custom_resource_list(custom: &CustomResources, group: &str, version: &str) -> Option<Value> {
    let mut out = Vec::new();
    for d in custom.definitions() {
        let Some(r) = d
            .resources()
            .iter()
            .find(|r| r.group == group && r.version == version)
        else {
            continue;
        };
        let mut entry = json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if let Some(c) = d
            .crd
            .spec
            .names
            .categories
            .as_ref()
            .filter(|c| !c.is_empty())
        {
            entry["categories"] = json!(c);
        }
        out.push(entry);
        out.extend(status_and_scale(r));
    }
    (!out.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1",
               "groupVersion": format!("{group}/{version}"), "resources": out})
    })
}

/// The `status` and `scale` subresource entries of `r`, the ones it has.
fn status_and_scale(r: &Resource) -> impl Iterator<Item = Value> + '_ {
    let status = r.has_status.then(|| {
        json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
               "kind": r.kind, "verbs": ["get", "patch", "update"]})
    });
    let scale = r.has_scale.then(|| {
        json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced,
               "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]})
    });
    status.into_iter().chain(scale)
}
