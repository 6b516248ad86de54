//! Discovery documents: `/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`, `/version`.

use serde_json::{json, Value};
use skiff_api::crd::CustomResources;
use skiff_api::resources::{groups, RESOURCES};
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
    let gs: Vec<Value> = groups()
        .into_iter()
        .map(|g| {
            json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}],
                   "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs})
}

pub fn api_group(group: &str) -> Option<Value> {
    groups().contains(&group).then(|| {
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group,
               "versions": [{"groupVersion": format!("{group}/v1"), "version": "v1"}],
               "preferredVersion": {"groupVersion": format!("{group}/v1"), "version": "v1"}})
    })
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
        if r.kind == "Deployment"
            || r.kind == "Pod"
            || r.kind == "Service"
            || r.kind == "DaemonSet"
            || r.kind == "StatefulSet"
            || r.kind == "Job"
            || r.kind == "CronJob"
        {
            entry["categories"] = json!(["all"]);
        }
        if r.kind == "ReplicaSet" {
            entry["categories"] = json!(["all"]);
        }
        out.push(entry);
        if r.has_status {
            out.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
        if r.has_scale {
            out.push(json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced,
                            "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
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

/// `/openapi/v3`: the group versions that have a document.
pub fn openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    paths.insert(
        "api/v1".into(),
        json!({"serverRelativeURL": "/openapi/v3/api/v1"}),
    );
    for g in groups() {
        paths.insert(
            format!("apis/{g}/v1"),
            json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/v1")}),
        );
    }
    json!({"paths": paths})
}

/// A minimal OpenAPI v3 document for one group version: the operations of every resource,
/// with the query parameters skiff honours. kubectl reads it to learn that the server
/// validates fields itself (`fieldValidation`).
pub fn openapi_v3(group: &str, version: &str) -> Option<Value> {
    let rs = served(group, version)?;
    let param = |n: &str| json!({"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let write_params = json!([
        param("dryRun"),
        param("fieldManager"),
        param("fieldValidation")
    ]);
    let mut paths = serde_json::Map::new();
    for r in rs {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let scope = if r.namespaced {
            "/namespaces/{namespace}"
        } else {
            ""
        };
        let op = |action: &str, params: &Value| {
            json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk,
                   "parameters": params, "responses": {"200": {"description": "OK"}}})
        };
        if r.create_only {
            paths.insert(
                format!("{prefix}{scope}/{}", r.plural),
                json!({"post": op("post", &write_params)}),
            );
            continue;
        }
        paths.insert(
            format!("{prefix}{scope}/{}", r.plural),
            json!({"get": op("list", &json!([param("labelSelector"), param("fieldSelector"), param("watch"), param("resourceVersion")])),
                   "post": op("post", &write_params)}),
        );
        paths.insert(
            format!("{prefix}{scope}/{}/{{name}}", r.plural),
            json!({"get": op("get", &json!([])), "put": op("put", &write_params),
                   "patch": op("patch", &write_params), "delete": op("delete", &json!([param("gracePeriodSeconds"), param("propagationPolicy")]))}),
        );
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.0"}, "paths": paths, "components": {"schemas": {}}}),
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
        if r.has_status {
            out.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
        if r.has_scale {
            out.push(json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced,
                            "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
    }
    (!out.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1",
               "groupVersion": format!("{group}/{version}"), "resources": out})
    })
}

/// The `/openapi/v3` index entries of custom group versions.
pub fn custom_openapi_v3_paths(custom: &CustomResources) -> Vec<(String, Value)> {
    custom
        .groups()
        .into_iter()
        .flat_map(|(g, vs)| {
            vs.into_iter().map(move |v| {
                (
                    format!("apis/{g}/{v}"),
                    json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/{v}")}),
                )
            })
        })
        .collect()
}

/// A minimal OpenAPI v3 document of a custom group version: the operations kubectl looks
/// at, and each kind's `openAPIV3Schema` (from [`CustomResources::openapi_v3_schemas`]).
pub fn custom_openapi_v3(custom: &CustomResources, group: &str, version: &str) -> Option<Value> {
    let kinds = custom.openapi_v3_schemas(group, version);
    if kinds.is_empty() {
        return None;
    }
    let param = |n: &str| json!({"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let write_params = json!([
        param("dryRun"),
        param("fieldManager"),
        param("fieldValidation")
    ]);
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for (r, schema) in kinds {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let scope = if r.namespaced {
            "/namespaces/{namespace}"
        } else {
            ""
        };
        let op = |action: &str, params: &Value| {
            json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk,
                   "parameters": params, "responses": {"200": {"description": "OK"}}})
        };
        let base = format!("/apis/{group}/{version}{scope}/{}", r.plural);
        paths.insert(
            base.clone(),
            json!({"get": op("list", &json!([param("labelSelector"), param("fieldSelector"), param("watch")])),
                   "post": op("post", &write_params)}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op("get", &json!([])), "put": op("put", &write_params),
                   "patch": op("patch", &write_params), "delete": op("delete", &json!([]))}),
        );
        let mut s = serde_json::to_value(schema).unwrap_or(json!({}));
        s["x-kubernetes-group-version-kind"] = json!([gvk]);
        let reversed: Vec<&str> = r.group.split('.').rev().collect();
        schemas.insert(
            format!("{}.{}.{}", reversed.join("."), r.version, r.kind),
            s,
        );
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"},
                "paths": paths, "components": {"schemas": schemas}}),
    )
}
