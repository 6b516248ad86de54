//! The three patch kinds the Kubernetes API accepts.
//!
//! - JSON merge patch (RFC 7386): maps merge, `null` deletes, lists replace.
//! - JSON patch (RFC 6902): a list of operations.
//! - Strategic merge patch: like merge patch, but lists of objects with a merge key
//!   (`containers` by `name`, `ports` by `containerPort`, …) merge element by element,
//!   and the `$patch`, `$retainKeys`, `$setElementOrder/…` and `$deleteFromPrimitiveList/…`
//!   directives are honoured, as kubectl sends them.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The patch kind, from the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Applies `patch` of `kind` to `target`, returning the patched object.
pub fn apply(kind: PatchKind, target: &Value, patch: &Value) -> Result<Value, ApiError> {
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut doc = target.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::invalid(
                    "Patch",
                    "",
                    vec![crate::Cause::invalid("patch", "", &e.to_string())],
                )
            })?;
            Ok(doc)
        }
        PatchKind::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut doc = target.clone();
            json_patch::merge(&mut doc, patch);
            Ok(doc)
        }
        // Server-side apply is served as a strategic merge of the applied configuration:
        // fields the configuration names are set, list elements merge by key.
        PatchKind::Strategic | PatchKind::Apply => {
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            }
            Ok(strategic_merge(target, patch))
        }
    }
}

/// Strategic merge of `patch` into `target`.
pub fn strategic_merge(target: &Value, patch: &Value) -> Value {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => Value::Object(merge_map(t, p)),
        (_, Value::Object(p)) => Value::Object(merge_map(&Map::new(), p)),
        _ => patch.clone(),
    }
}

fn merge_map(target: &Map<String, Value>, patch: &Map<String, Value>) -> Map<String, Value> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut out = patch.clone();
            out.remove("$patch");
            return strip_directives(out);
        }
        Some("delete") => return Map::new(),
        _ => {}
    }
    let mut out = target.clone();
    for (key, pv) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (out.get_mut(field), pv) {
                list.retain(|v| !del.contains(v));
            }
            continue;
        }
        if pv.is_null() {
            out.remove(key);
            continue;
        }
        let merged = match (out.get(key), pv) {
            (Some(Value::Object(tv)), Value::Object(pm)) => Value::Object(merge_map(tv, pm)),
            (None, Value::Object(pm)) => Value::Object(merge_map(&Map::new(), pm)),
            (Some(Value::Array(tl)), Value::Array(pl)) => merge_list(key, tl, pl),
            (None, Value::Array(pl)) => merge_list(key, &[], pl),
            _ => pv.clone(),
        };
        out.insert(key.clone(), merged);
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    out
}

fn strip_directives(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    for v in m.values_mut() {
        if let Value::Object(inner) = v {
            *inner = strip_directives(std::mem::take(inner));
        }
    }
    m
}

/// The merge key of a list field, as the Kubernetes types declare it (`patchMergeKey`).
fn merge_key(field: &str, sample: &Value) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "taints" => "key",
        "topologySpreadConstraints" => "topologyKey",
        // Container ports merge by containerPort, Service ports by port.
        "ports" if sample.get("containerPort").is_some() => "containerPort",
        "ports" if sample.get("port").is_some() => "port",
        _ => return None,
    })
}

/// Lists of scalars that merge as sets (`patchStrategy: merge` on a primitive list).
fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

fn merge_list(field: &str, target: &[Value], patch: &[Value]) -> Value {
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Value::Array(
            patch
                .iter()
                .filter(|p| p.get("$patch").is_none())
                .cloned()
                .collect(),
        );
    }
    if is_set_list(field) {
        let mut out = target.to_vec();
        for p in patch {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        return Value::Array(out);
    }
    let Some(sample) = patch.first().or(target.first()) else {
        return Value::Array(Vec::new());
    };
    let Some(key) = merge_key(field, sample) else {
        return Value::Array(patch.to_vec());
    };
    let mut out: Vec<Value> = target.to_vec();
    for p in patch {
        let Some(kv) = p.get(key) else {
            out.push(p.clone());
            continue;
        };
        let pos = out.iter().position(|t| t.get(key) == Some(kv));
        let delete = p.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => out[i] = strategic_merge(&out[i], p),
            (None, false) => out.push(strategic_merge(&Value::Object(Map::new()), p)),
        }
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({"spec": {"replicas": 1, "template": {"spec": {"containers": [
            {"name": "app", "image": "a:v1", "ports": [{"containerPort": 8080}],
             "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "side", "image": "s:v1"}
        ]}}}})
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        // What `kubectl set image deployment/x app=a:v2` sends.
        let p = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "a:v2"}]}}}});
        let out = apply(PatchKind::Strategic, &deployment(), &p).unwrap();
        let cs = out
            .pointer("/spec/template/spec/containers")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0]["image"], "a:v2");
        assert_eq!(cs[0]["ports"][0]["containerPort"], 8080);
        assert_eq!(cs[1]["image"], "s:v1");
        // A merge patch replaces the list instead.
        let out = apply(PatchKind::Merge, &deployment(), &p).unwrap();
        assert_eq!(
            out.pointer("/spec/template/spec/containers")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn strategic_directives() {
        let p = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "env": [{"name": "A", "$patch": "delete"}, {"name": "C", "value": "3"}]},
            {"name": "side", "$patch": "delete"}
        ], "$setElementOrder/containers": [{"name": "app"}]}}}});
        let out = strategic_merge(&deployment(), &p);
        let cs = out
            .pointer("/spec/template/spec/containers")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 1);
        let env: Vec<&str> = cs[0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(env, vec!["B", "C"]);
        assert!(out
            .pointer("/spec/template/spec/$setElementOrder~1containers")
            .is_none());

        let replace = json!({"spec": {"template": {"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "o"}]}}}});
        let out = strategic_merge(&deployment(), &replace);
        assert_eq!(
            out.pointer("/spec/template/spec/containers/0/name")
                .unwrap(),
            "only"
        );
        assert_eq!(
            out.pointer("/spec/template/spec/containers")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );

        let null = json!({"spec": {"replicas": null}});
        assert!(strategic_merge(&deployment(), &null)
            .pointer("/spec/replicas")
            .is_none());
    }

    #[test]
    fn service_ports_merge_by_port_and_finalizers_as_set() {
        let svc = json!({"metadata": {"finalizers": ["a"]}, "spec": {"ports": [{"port": 80, "targetPort": 8080}]}});
        let p = json!({"metadata": {"finalizers": ["b", "a"]}, "spec": {"ports": [{"port": 80, "nodePort": 30001}, {"port": 443}]}});
        let out = strategic_merge(&svc, &p);
        assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(out["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(out["spec"]["ports"][0]["nodePort"], 30001);
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
    }

    #[test]
    fn json_patch_ops_and_errors() {
        let p = json!([{"op": "replace", "path": "/spec/replicas", "value": 3}]);
        assert_eq!(
            apply(PatchKind::Json, &deployment(), &p).unwrap()["spec"]["replicas"],
            3
        );
        let bad = json!([{"op": "remove", "path": "/spec/nothere"}]);
        assert_eq!(
            apply(PatchKind::Json, &deployment(), &bad)
                .unwrap_err()
                .code,
            422
        );
        assert_eq!(
            apply(PatchKind::Json, &deployment(), &json!({"x": 1}))
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            PatchKind::from_content_type("application/strategic-merge-patch+json; charset=utf-8"),
            Some(PatchKind::Strategic)
        );
    }
}
