//! The three patch kinds the Kubernetes API accepts.
//!
//! - JSON merge patch (RFC 7386): maps merge, `null` deletes, lists replace.
//! - JSON patch (RFC 6902): a list of operations.
//! - Strategic merge patch: like merge patch, but lists of objects with a merge key
//!   (`containers` by `name`, `ports` by `containerPort`, …) merge element by element,
//!   and the `$patch`, `$retainKeys`, `$setElementOrder/…` and `$deleteFromPrimitiveList/…`
//!   directives are honoured, as kubectl sends them.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::limits::{self, MAX_JSON_PATCH_COPY_BYTES, MAX_JSON_PATCH_OPS, MAX_OBJECT_BYTES};

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
///
/// Held to Kubernetes' limits: a JSON patch has at most [`MAX_JSON_PATCH_OPS`] operations
/// (413), its `copy` operations add at most [`MAX_JSON_PATCH_COPY_BYTES`] (422, checked before
/// each copy, so a patch that doubles the object with every copy fails before it costs
/// memory), and the result of every kind is at most [`MAX_OBJECT_BYTES`], what the store
/// keeps (413).
pub fn apply(kind: PatchKind, target: &Value, patch: &Value) -> Result<Value, ApiError> {
    let out = match kind {
        PatchKind::Json => json_patch(target, patch)?,
        PatchKind::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            let mut doc = target.clone();
            json_patch::merge(&mut doc, patch);
            doc
        }
        // Server-side apply is served as a strategic merge of the applied configuration:
        // fields the configuration names are set, list elements merge by key.
        PatchKind::Strategic | PatchKind::Apply => {
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            }
            strategic_merge(target, patch)
        }
    };
    if json_size_over(&out, MAX_OBJECT_BYTES) {
        return Err(limits::object_too_large());
    }
    Ok(out)
}

fn json_patch(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    let Some(list) = patch.as_array() else {
        return Err(ApiError::bad_request(
            "invalid JSON patch: a JSON patch must be a list of operations",
        ));
    };
    // Counted before the operations are decoded, as Kubernetes does.
    if list.len() > MAX_JSON_PATCH_OPS {
        return Err(ApiError::too_large(format!(
            "The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPS}, got {}",
            list.len()
        )));
    }
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    let invalid =
        |e: String| ApiError::invalid("Patch", "", vec![crate::Cause::invalid("patch", "", &e)]);
    let mut doc = target.clone();
    let mut copied = 0usize;
    for (i, op) in ops.0.iter().enumerate() {
        if let json_patch::PatchOperation::Copy(c) = op {
            if let Some(v) = doc.pointer(c.from.as_str()) {
                let left = MAX_JSON_PATCH_COPY_BYTES - copied;
                copied += json_size(v, left + 1);
                if copied > MAX_JSON_PATCH_COPY_BYTES {
                    return Err(ApiError::unprocessable(format!(
                        "Unable to complete the copy, the accumulated size increase of copy is more than {MAX_JSON_PATCH_COPY_BYTES} bytes, exceeding the limit"
                    )));
                }
            }
        }
        // One at a time, so the copies are measured on the document they copy from; the
        // document is a copy of the target, so a failure leaves nothing half applied.
        json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| {
            invalid(format!(
                "operation '/{i}' failed at path '{}': {}",
                e.path, e.kind
            ))
        })?;
    }
    Ok(doc)
}

/// The length of `v` as compact JSON, counted up to `cap` (a larger value reports `cap`).
pub fn json_size(v: &Value, cap: usize) -> usize {
    struct Count {
        n: usize,
        cap: usize,
    }
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.n += buf.len();
            if self.n >= self.cap {
                return Err(std::io::Error::other("over the cap"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = Count { n: 0, cap };
    let _ = serde_json::to_writer(&mut w, v);
    w.n.min(cap)
}

/// Whether `v` is longer than `max` bytes as compact JSON.
pub fn json_size_over(v: &Value, max: usize) -> bool {
    json_size(v, max + 1) > max
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
                let del: HashSet<String> = del.iter().map(Value::to_string).collect();
                list.retain(|v| !del.contains(&v.to_string()));
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
        let keep: HashSet<&str> = keep.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(k.as_str()));
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
/// `sample` is an element of the list (or any object with the element's field names): it
/// tells container ports from service ports. The OpenAPI documents take their
/// `x-kubernetes-patch-merge-key` from here, so kubectl's patches and this merge agree.
pub fn merge_key(field: &str, sample: &Value) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "webhooks" => "name",
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
pub fn is_set_list(field: &str) -> bool {
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
    // Lookups go through an index by the serialized value (or key), so a long list in the
    // patch costs time in proportion to its length, not to its length times the target's.
    if is_set_list(field) {
        let mut out = target.to_vec();
        let mut seen: HashSet<String> = out.iter().map(Value::to_string).collect();
        for p in patch {
            if seen.insert(p.to_string()) {
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
    // Deleted elements leave an empty slot until the end, so the index stays valid.
    let mut out: Vec<Option<Value>> = target.iter().cloned().map(Some).collect();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, t) in target.iter().enumerate() {
        if let Some(kv) = t.get(key) {
            index.entry(kv.to_string()).or_insert(i);
        }
    }
    for p in patch {
        let Some(kv) = p.get(key) else {
            out.push(Some(p.clone()));
            continue;
        };
        let kv = kv.to_string();
        let pos = index.get(&kv).copied();
        let delete = p.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out[i] = None;
                index.remove(&kv);
            }
            (None, true) => {}
            (Some(i), false) => {
                let merged = strategic_merge(out[i].as_ref().unwrap_or(&Value::Null), p);
                out[i] = Some(merged);
            }
            (None, false) => {
                index.insert(kv, out.len());
                out.push(Some(strategic_merge(&Value::Object(Map::new()), p)));
            }
        }
    }
    Value::Array(out.into_iter().flatten().collect())
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

    #[test]
    fn json_patch_operation_count_is_capped() {
        let op = json!({"op": "add", "path": "/x", "value": 1});
        let ok = Value::Array(vec![op.clone(); MAX_JSON_PATCH_OPS]);
        assert!(apply(PatchKind::Json, &json!({}), &ok).is_ok());
        let over = Value::Array(vec![op; 80_000]);
        let e = apply(PatchKind::Json, &json!({}), &over).unwrap_err();
        assert_eq!(e.code, 413);
        assert_eq!(
            e.message,
            "The allowed maximum operations in a JSON patch is 10000, got 80000"
        );
    }

    /// Each `copy` doubles the document: 21 of them would make 2 KB into gigabytes.
    #[test]
    fn json_patch_copies_are_capped_before_they_are_made() {
        let mut ops = vec![json!({"op": "add", "path": "/a", "value": ["x".repeat(2000)]})];
        for i in 0..21 {
            ops.push(json!({"op": "add", "path": format!("/b{i}"), "value": []}));
        }
        for _ in 0..21 {
            ops.push(json!({"op": "copy", "from": "", "path": "/a/-"}));
        }
        let started = std::time::Instant::now();
        let e = apply(PatchKind::Json, &json!({}), &Value::Array(ops)).unwrap_err();
        assert_eq!(e.code, 422, "{e:?}");
        assert!(
            e.message.contains("accumulated size increase of copy"),
            "{}",
            e.message
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Copies within the budget apply.
        let small = json!([{"op": "copy", "from": "/a", "path": "/b"}]);
        let out = apply(PatchKind::Json, &json!({"a": [1, 2]}), &small).unwrap();
        assert_eq!(out["b"], json!([1, 2]));
    }

    #[test]
    fn patched_objects_are_held_to_the_stored_size() {
        let big = "x".repeat(MAX_OBJECT_BYTES);
        for (kind, patch) in [
            (PatchKind::Merge, json!({"data": {"a": big}})),
            (PatchKind::Strategic, json!({"data": {"a": big}})),
            (
                PatchKind::Json,
                json!([{"op": "add", "path": "/data", "value": big}]),
            ),
        ] {
            let e = apply(kind, &json!({"data": {}}), &patch).unwrap_err();
            assert_eq!(e.code, 413, "{kind:?}");
            assert_eq!(e.message, "etcdserver: request is too large");
        }
        assert_eq!(json_size(&json!({"a": [1, "b"]}), 100), 13);
        assert_eq!(json_size(&json!({"a": [1, "b"]}), 5), 5);
    }

    /// A long list merged into a long list costs time in proportion to their lengths.
    #[test]
    fn strategic_merge_of_long_lists_is_linear() {
        let n = 50_000;
        let names = |p: &str| -> Vec<Value> { (0..n).map(|i| json!(format!("{p}{i}"))).collect() };
        let containers = |p: &str| -> Vec<Value> {
            (0..n).map(|i| json!({"name": format!("{p}{i}")})).collect()
        };
        let target = json!({"metadata": {"finalizers": names("a")},
            "spec": {"containers": containers("a")}});
        let patch = json!({"metadata": {"finalizers": names("b")},
            "spec": {"containers": containers("b"), "$deleteFromPrimitiveList/x": names("c"),
                     "$retainKeys": names("d")}});
        let started = std::time::Instant::now();
        let out = strategic_merge(&target, &patch);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(
            out["metadata"]["finalizers"].as_array().unwrap().len(),
            2 * n
        );
        assert_eq!(
            out["spec"].as_object().unwrap().len(),
            0,
            "retainKeys kept only its keys"
        );
        // Deleting by key and adding back keeps the order Kubernetes gives.
        let t = json!({"containers": [{"name": "a"}, {"name": "b", "image": "x"}, {"name": "c"}]});
        let p = json!({"containers": [{"name": "b", "$patch": "delete"}, {"name": "c", "image": "y"}, {"name": "b"}]});
        assert_eq!(
            strategic_merge(&t, &p)["containers"],
            json!([{"name": "a"}, {"name": "c", "image": "y"}, {"name": "b"}])
        );
    }
}
