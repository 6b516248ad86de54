//! Custom resources against their `openAPIV3Schema`, as the Kubernetes API server treats
//! them: unknown fields pruned (unless `x-kubernetes-preserve-unknown-fields`), `default`s
//! filled in, then the object validated — types, formats, enums, bounds, patterns, required
//! fields — with Kubernetes' field paths and messages. Also the structural-schema rules a
//! CustomResourceDefinition's schemas must keep.
//!
//! CEL rules (`x-kubernetes-validations`) are evaluated in `crate::cel`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps as Schema, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::{Map, Value};

use crate::error::Cause;

/// `a` + `.b`: the path of a member (the root's members have no leading dot).
fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn item_schema(s: &Schema) -> Option<&Schema> {
    match s.items.as_ref()? {
        JSONSchemaPropsOrArray::Schema(s) => Some(s),
        JSONSchemaPropsOrArray::Schemas(v) => v.first(),
    }
}

fn additional(s: &Schema) -> Option<&JSONSchemaPropsOrBool> {
    s.additional_properties.as_ref()
}

fn preserves(s: &Schema) -> bool {
    s.x_kubernetes_preserve_unknown_fields == Some(true)
}

// ---- pruning ------------------------------------------------------------------------------

/// Removes the fields the schema does not specify, in place. At the root (and in embedded
/// resources) `apiVersion`, `kind` and `metadata` are kept.
pub fn prune(schema: &Schema, v: &mut Value) {
    prune_at(schema, v, true, "", &mut Vec::new());
}

/// The paths of the fields pruning would remove (`spec.bogus`), as strict field
/// validation reports them.
pub fn unknown_fields(schema: &Schema, v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    prune_at(schema, &mut v.clone(), true, "", &mut out);
    out
}

fn prune_at(s: &Schema, v: &mut Value, resource: bool, path: &str, removed: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            let embedded = resource || s.x_kubernetes_embedded_resource == Some(true);
            let props = s.properties.as_ref();
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let at = child(path, &k);
                if let Some(ps) = props.and_then(|p| p.get(&k)) {
                    if let Some(x) = m.get_mut(&k) {
                        prune_at(ps, x, false, &at, removed);
                    }
                    continue;
                }
                match additional(s) {
                    Some(JSONSchemaPropsOrBool::Schema(a)) => {
                        if let Some(x) = m.get_mut(&k) {
                            prune_at(a, x, false, &at, removed);
                        }
                    }
                    Some(JSONSchemaPropsOrBool::Bool(true)) => {}
                    _ if preserves(s) => {}
                    _ => {
                        m.remove(&k);
                        removed.push(at);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = item_schema(s) {
                for (i, x) in items.iter_mut().enumerate() {
                    prune_at(is, x, false, &format!("{path}[{i}]"), removed);
                }
            }
        }
        _ => {}
    }
}

// ---- defaults -----------------------------------------------------------------------------

/// Fills in the `default` of every absent field whose parent object is present, in place.
pub fn apply_defaults(s: &Schema, v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(props) = &s.properties {
                for (k, ps) in props {
                    if !m.contains_key(k) {
                        if let Some(d) = &ps.default {
                            m.insert(k.clone(), d.0.clone());
                        }
                    }
                    if let Some(x) = m.get_mut(k) {
                        apply_defaults(ps, x);
                    }
                }
            }
            if let Some(JSONSchemaPropsOrBool::Schema(a)) = additional(s) {
                let known = s.properties.as_ref();
                for (k, x) in m.iter_mut() {
                    if known.is_none_or(|p| !p.contains_key(k)) {
                        apply_defaults(a, x);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = item_schema(s) {
                for x in items {
                    apply_defaults(is, x);
                }
            }
        }
        _ => {}
    }
}

// ---- validation ---------------------------------------------------------------------------

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(ty: &str, v: &Value) -> bool {
    let actual = type_name(v);
    ty == actual || (ty == "number" && actual == "integer")
}

/// A value as Kubernetes prints it in a message: strings quoted, numbers bare.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn not_supported(path: &str, v: &Value, allowed: &[Value]) -> Cause {
    let list: Vec<String> = allowed.iter().map(shown).collect();
    Cause {
        reason: "FieldValueNotSupported".into(),
        field: path.to_string(),
        message: format!(
            "Unsupported value: {}: supported values: {}",
            shown(v),
            list.join(", ")
        ),
    }
}

fn regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    static CACHE: OnceLock<Mutex<HashMap<String, regex::Regex>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(r) = cache.lock().expect("regex cache").get(pattern) {
        return Ok(r.clone());
    }
    let r = regex::Regex::new(pattern)?;
    let mut c = cache.lock().expect("regex cache");
    // A bound on what many distinct schemas can make it hold.
    if c.len() > 1024 {
        c.clear();
    }
    c.insert(pattern.to_string(), r.clone());
    Ok(r)
}

/// Whether `s` is in `format`. Formats Kubernetes does not know pass.
fn format_ok(format: &str, s: &str) -> bool {
    use base64::Engine;
    match format {
        "date-time" | "datetime" => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
        "date" => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
        "byte" => base64::engine::general_purpose::STANDARD.decode(s).is_ok(),
        "ipv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
        "cidr" => s.split_once('/').is_some_and(|(ip, bits)| {
            ip.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok()
        }),
        "uuid" => {
            let parts: Vec<&str> = s.split('-').collect();
            parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
                && parts
                    .iter()
                    .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
        }
        "hostname" => crate::validation::is_dns1123_subdomain(s),
        "email" => s
            .split_once('@')
            .is_some_and(|(u, d)| !u.is_empty() && d.contains('.') && !s.contains(' ')),
        "uri" => s
            .split_once(':')
            .is_some_and(|(scheme, _)| !scheme.is_empty()),
        _ => true,
    }
}

/// Checks `v` against `s`; `path` is `v`'s field path (`spec.replicas`, `""` for the root).
pub fn validate(s: &Schema, v: &Value, path: &str, causes: &mut Vec<Cause>) {
    if v.is_null() && (s.nullable == Some(true) || s.type_.is_none()) {
        return;
    }
    let at = if path.is_empty() { "body" } else { path };
    if s.x_kubernetes_int_or_string == Some(true) {
        if !matches!(type_name(v), "integer" | "string") {
            causes.push(Cause::invalid(
                at,
                format!("{:?}", type_name(v)),
                &format!(
                    "{at} in body must be of type integer,string: {:?}",
                    type_name(v)
                ),
            ));
            return;
        }
    } else if let Some(ty) = s.type_.as_deref().filter(|t| !t.is_empty()) {
        if !type_matches(ty, v) {
            causes.push(Cause::invalid(
                at,
                format!("{:?}", type_name(v)),
                &format!("{at} in body must be of type {ty}: {:?}", type_name(v)),
            ));
            return;
        }
    }
    if let Some(allowed) = &s.enum_ {
        let allowed: Vec<Value> = allowed.iter().map(|j| j.0.clone()).collect();
        if !allowed.contains(v) {
            causes.push(not_supported(at, v, &allowed));
        }
    }
    match v {
        Value::String(text) => validate_string(s, text, v, at, causes),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if s.format.as_deref() == Some("int32") && (x < i32::MIN as f64 || x > i32::MAX as f64)
            {
                causes.push(Cause::invalid(
                    at,
                    shown(v),
                    &format!("{at} in body must be of type int32: {}", shown(v)),
                ));
            }
            if let Some(min) = s.minimum {
                let ex = s.exclusive_minimum == Some(true);
                if x < min || (ex && x == min) {
                    let rel = if ex {
                        "greater than"
                    } else {
                        "greater than or equal to"
                    };
                    causes.push(Cause::invalid(
                        at,
                        shown(v),
                        &format!("{at} in body should be {rel} {min}"),
                    ));
                }
            }
            if let Some(max) = s.maximum {
                let ex = s.exclusive_maximum == Some(true);
                if x > max || (ex && x == max) {
                    let rel = if ex {
                        "less than"
                    } else {
                        "less than or equal to"
                    };
                    causes.push(Cause::invalid(
                        at,
                        shown(v),
                        &format!("{at} in body should be {rel} {max}"),
                    ));
                }
            }
            if let Some(m) = s.multiple_of.filter(|m| *m > 0.0) {
                if (x / m).fract() != 0.0 {
                    causes.push(Cause::invalid(
                        at,
                        shown(v),
                        &format!("{at} in body should be a multiple of {m}"),
                    ));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = s.max_items.filter(|m| items.len() as i64 > *m) {
                causes.push(Cause {
                    reason: "FieldValueTooMany".into(),
                    field: at.to_string(),
                    message: format!("Too many: {}: must have at most {max} items", items.len()),
                });
            }
            if let Some(min) = s.min_items.filter(|m| (items.len() as i64) < *m) {
                causes.push(Cause::invalid(
                    at,
                    shown(v),
                    &format!("{at} in body should have at least {min} items"),
                ));
            }
            if s.unique_items == Some(true) || s.x_kubernetes_list_type.as_deref() == Some("set") {
                for (i, x) in items.iter().enumerate() {
                    if items[..i].contains(x) {
                        causes.push(Cause::duplicate(format!("{path}[{i}]"), shown(x)));
                    }
                }
            }
            if let Some(is) = item_schema(s) {
                for (i, x) in items.iter().enumerate() {
                    validate(is, x, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::Object(m) => validate_object(s, m, path, causes),
        _ => {}
    }
    for sub in s.all_of.iter().flatten() {
        validate(sub, v, path, causes);
    }
    let passes = |sub: &Schema| {
        let mut c = Vec::new();
        validate(sub, v, path, &mut c);
        c.is_empty()
    };
    if let Some(any) = s.any_of.as_ref().filter(|a| !a.is_empty()) {
        if !any.iter().any(passes) {
            causes.push(Cause::invalid(
                at,
                shown(v),
                &format!("{at} in body must validate at least one schema (anyOf)"),
            ));
        }
    }
    if let Some(one) = s.one_of.as_ref().filter(|a| !a.is_empty()) {
        if one.iter().filter(|x| passes(x)).count() != 1 {
            causes.push(Cause::invalid(
                at,
                shown(v),
                &format!("{at} in body must validate one and only one schema (oneOf)"),
            ));
        }
    }
    if let Some(not) = &s.not {
        if passes(not) {
            causes.push(Cause::invalid(
                at,
                shown(v),
                &format!("{at} in body should not be valid against the schema (not)"),
            ));
        }
    }
}

fn validate_string(s: &Schema, text: &str, v: &Value, at: &str, causes: &mut Vec<Cause>) {
    let chars = text.chars().count() as i64;
    if let Some(max) = s.max_length.filter(|m| chars > *m) {
        causes.push(Cause {
            reason: "FieldValueTooLong".into(),
            field: at.to_string(),
            message: format!("Too long: may not be more than {max} bytes"),
        });
    }
    if let Some(min) = s.min_length.filter(|m| chars < *m) {
        causes.push(Cause::invalid(
            at,
            shown(v),
            &format!("{at} in body should be at least {min} chars long"),
        ));
    }
    if let Some(p) = &s.pattern {
        if regex(p).is_ok_and(|r| !r.is_match(text)) {
            causes.push(Cause::invalid(
                at,
                shown(v),
                &format!("{at} in body should match '{p}'"),
            ));
        }
    }
    if let Some(f) = s.format.as_deref() {
        if !format_ok(f, text) {
            causes.push(Cause::invalid(
                at,
                shown(v),
                &format!("{at} in body must be of type {f}: {}", shown(v)),
            ));
        }
    }
}

fn validate_object(s: &Schema, m: &Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
    for r in s.required.iter().flatten() {
        if m.get(r).is_none_or(Value::is_null) {
            causes.push(Cause::required(child(path, r)));
        }
    }
    let at = if path.is_empty() { "body" } else { path };
    if let Some(max) = s.max_properties.filter(|x| m.len() as i64 > *x) {
        causes.push(Cause {
            reason: "FieldValueTooMany".into(),
            field: at.to_string(),
            message: format!("Too many: {}: must have at most {max} items", m.len()),
        });
    }
    if let Some(min) = s.min_properties.filter(|x| (m.len() as i64) < *x) {
        causes.push(Cause::invalid(
            at,
            m.len(),
            &format!("{at} in body should have at least {min} properties"),
        ));
    }
    for (k, x) in m {
        // The object's metadata is ObjectMeta's, checked as every object's.
        if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match s.properties.as_ref().and_then(|p| p.get(k)) {
            Some(ps) => validate(ps, x, &child(path, k), causes),
            None => {
                if let Some(JSONSchemaPropsOrBool::Schema(a)) = additional(s) {
                    validate(a, x, &child(path, k), causes);
                }
            }
        }
    }
}

// ---- structural schemas -------------------------------------------------------------------

/// The rules of a structural schema Kubernetes requires of a CustomResourceDefinition
/// (`path` is the schema's own field path in the definition).
pub fn structural_errors(s: &Schema, path: &str) -> Vec<Cause> {
    let mut out = Vec::new();
    if s.type_.as_deref() != Some("object") {
        out.push(Cause {
            reason: "FieldValueRequired".into(),
            field: format!("{path}.type"),
            message: "Required value: must be object at the root".into(),
        });
    }
    structural(s, path, true, &mut out);
    out
}

fn structural(s: &Schema, path: &str, root: bool, out: &mut Vec<Cause>) {
    let typeless = s.type_.as_deref().is_none_or(str::is_empty);
    if typeless && !root && s.x_kubernetes_int_or_string != Some(true) && !preserves(s) {
        out.push(Cause {
            reason: "FieldValueRequired".into(),
            field: format!("{path}.type"),
            message: "Required value: must not be empty for specified object fields".into(),
        });
    }
    if let Some(t) = s.type_.as_deref().filter(|t| !t.is_empty()) {
        if !matches!(
            t,
            "object" | "array" | "string" | "integer" | "number" | "boolean"
        ) {
            out.push(Cause {
                reason: "FieldValueNotSupported".into(),
                field: format!("{path}.type"),
                message: format!("Unsupported value: {t:?}: supported values: \"array\", \"boolean\", \"integer\", \"number\", \"object\", \"string\""),
            });
        }
        if t == "array" && s.items.is_none() {
            out.push(Cause::required(format!("{path}.items")));
        }
    }
    if s.properties.as_ref().is_some_and(|p| !p.is_empty())
        && matches!(additional(s), Some(JSONSchemaPropsOrBool::Schema(_)))
    {
        out.push(Cause::forbidden(
            format!("{path}.additionalProperties"),
            "additionalProperties and properties are mutual exclusive",
        ));
    }
    if let Some(p) = &s.pattern {
        if let Err(e) = regex(p) {
            out.push(Cause::invalid(
                format!("{path}.pattern"),
                format!("{p:?}"),
                &format!("must be a valid regular expression, but isn't: {e}"),
            ));
        }
    }
    if matches!(s.items, Some(JSONSchemaPropsOrArray::Schemas(_))) {
        out.push(Cause::forbidden(
            format!("{path}.items"),
            "items must be a schema object and not an array",
        ));
    }
    if let Some(d) = &s.default {
        let mut pruned = d.0.clone();
        prune_at(s, &mut pruned, false, "", &mut Vec::new());
        if pruned != d.0 {
            out.push(Cause::invalid(
                format!("{path}.default"),
                d.0.to_string(),
                "must not have unknown fields",
            ));
        } else {
            let mut c = Vec::new();
            validate(s, &d.0, &format!("{path}.default"), &mut c);
            out.extend(c);
        }
    }
    for (k, ps) in s.properties.iter().flatten() {
        structural(ps, &format!("{path}.properties[{k}]"), false, out);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = additional(s) {
        structural(a, &format!("{path}.additionalProperties"), false, out);
    }
    if let Some(is) = item_schema(s) {
        structural(is, &format!("{path}.items"), false, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: Value) -> Schema {
        serde_json::from_value(v).unwrap()
    }

    fn widget() -> Schema {
        schema(json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["size"], "properties": {
                "size": {"type": "string", "enum": ["small", "large"]},
                "replicas": {"type": "integer", "minimum": 0, "maximum": 10, "default": 1},
                "email": {"type": "string", "format": "email"},
                "code": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                "port": {"x-kubernetes-int-or-string": true},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            }},
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        }}))
    }

    #[test]
    fn unknown_fields_are_pruned_and_defaults_filled_in() {
        let s = widget();
        let mut o = json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "a"},
            "spec": {"size": "small", "bogus": 1, "free": {"any": {"thing": 1}},
                     "labels": {"a": "b"}},
            "extra": true});
        assert_eq!(unknown_fields(&s, &o), ["extra", "spec.bogus"]);
        prune(&s, &mut o);
        apply_defaults(&s, &mut o);
        assert_eq!(
            o,
            json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "a"},
                "spec": {"size": "small", "replicas": 1, "free": {"any": {"thing": 1}},
                         "labels": {"a": "b"}}})
        );
        let mut c = Vec::new();
        validate(&s, &o, "", &mut c);
        assert!(c.is_empty(), "{c:?}");
    }

    #[test]
    fn violations_carry_kubernetes_paths_and_messages() {
        let s = widget();
        let o = json!({"spec": {"size": "huge", "replicas": 11, "email": "nope",
            "code": "ABCDEFG", "port": true, "tags": ["a", "b", "c"], "labels": {"x": 1}}});
        let mut c = Vec::new();
        validate(&s, &o, "", &mut c);
        let shown: Vec<String> = c.iter().map(|c| c.to_string()).collect();
        for want in [
            r#"spec.size: Unsupported value: "huge": supported values: "small", "large""#,
            "spec.replicas: Invalid value: 11: spec.replicas in body should be less than or equal to 10",
            r#"spec.email: Invalid value: "nope": spec.email in body must be of type email: "nope""#,
            "spec.code: Too long: may not be more than 5 bytes",
            r#"spec.code: Invalid value: "ABCDEFG": spec.code in body should match '^[a-z]+$'"#,
            r#"spec.port: Invalid value: "boolean": spec.port in body must be of type integer,string: "boolean""#,
            "spec.tags: Too many: 3: must have at most 2 items",
            r#"spec.labels.x: Invalid value: "integer": spec.labels.x in body must be of type string: "integer""#,
        ] {
            assert!(shown.iter().any(|s| s == want), "{want}\nnot in {shown:#?}");
        }
        let mut c = Vec::new();
        validate(&s, &json!({"spec": {}}), "", &mut c);
        assert_eq!(c[0].to_string(), "spec.size: Required value");
    }

    #[test]
    fn non_structural_schemas_are_refused() {
        let s = schema(json!({"type": "object", "properties": {
            "spec": {"properties": {"a": {"type": "array"}}},
            "bad": {"type": "string", "default": 3},
        }}));
        let fields: Vec<String> = structural_errors(&s, "schema")
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert!(
            fields.contains(&"schema.properties[spec].type".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"schema.properties[spec].properties[a].items".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"schema.properties[bad].default".to_string()),
            "{fields:?}"
        );
        assert!(structural_errors(&widget(), "schema").is_empty());
    }
}
