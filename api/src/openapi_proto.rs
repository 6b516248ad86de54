//! The Swagger 2.0 document in protobuf (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`),
//! the only form kubectl reads `/openapi/v2` in: the `openapi.v2.Document` message of gnostic's
//! `OpenAPIv2.proto`, encoded from the JSON document [`crate::openapi`] builds.
//!
//! Values gnostic keeps as `Any` (vendor extensions, defaults, enums, examples) carry their
//! YAML text; JSON is YAML, so that is the value's JSON.

use serde_json::{Map, Value};

/// Protobuf bytes of a message under construction.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn bytes(&mut self, tag: u32, b: &[u8]) {
        self.varint(u64::from(tag << 3 | 2));
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn string(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(tag, s.as_bytes());
        }
    }
    fn msg(&mut self, tag: u32, m: Msg) {
        self.bytes(tag, &m.0);
    }
    fn boolean(&mut self, tag: u32, b: bool) {
        if b {
            self.varint(u64::from(tag << 3));
            self.varint(1);
        }
    }
    fn int(&mut self, tag: u32, v: i64) {
        self.varint(u64::from(tag << 3));
        self.varint(v as u64);
    }
    fn double(&mut self, tag: u32, v: f64) {
        self.varint(u64::from(tag << 3 | 1));
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn strings(&mut self, tag: u32, v: Option<&Value>) {
        for s in v.and_then(Value::as_array).into_iter().flatten() {
            if let Some(s) = s.as_str() {
                self.bytes(tag, s.as_bytes());
            }
        }
    }
}

fn text<'a>(m: &'a Map<String, Value>, k: &str) -> &'a str {
    m.get(k).and_then(Value::as_str).unwrap_or("")
}

/// `Any { yaml = 2 }`.
fn any(v: &Value) -> Msg {
    let mut m = Msg::default();
    m.string(2, &serde_json::to_string(v).unwrap_or_default());
    m
}

/// `repeated NamedAny vendor_extension` of every `x-` key.
fn extensions(out: &mut Msg, tag: u32, m: &Map<String, Value>) {
    for (k, v) in m.iter().filter(|(k, _)| k.starts_with("x-")) {
        let mut named = Msg::default();
        named.string(1, k);
        named.msg(2, any(v));
        out.msg(tag, named);
    }
}

/// Encodes the JSON Swagger document as an `openapi.v2.Document`.
pub fn encode_document(doc: &Value) -> Vec<u8> {
    let empty = Map::new();
    let d = doc.as_object().unwrap_or(&empty);
    let mut out = Msg::default();
    out.string(1, text(d, "swagger"));
    if let Some(info) = d.get("info").and_then(Value::as_object) {
        let mut m = Msg::default();
        m.string(1, text(info, "title"));
        m.string(2, text(info, "version"));
        out.msg(2, m);
    }
    if let Some(paths) = d.get("paths").and_then(Value::as_object) {
        let mut m = Msg::default();
        for (path, item) in paths {
            let mut named = Msg::default();
            named.string(1, path);
            named.msg(2, path_item(item.as_object().unwrap_or(&empty)));
            m.msg(2, named);
        }
        out.msg(8, m);
    }
    if let Some(defs) = d.get("definitions").and_then(Value::as_object) {
        let mut m = Msg::default();
        for (name, schema) in defs {
            m.msg(1, named_schema(name, schema));
        }
        out.msg(9, m);
    }
    extensions(&mut out, 16, d);
    out.0
}

fn named_schema(name: &str, schema: &Value) -> Msg {
    let mut named = Msg::default();
    named.string(1, name);
    named.msg(2, self::schema(schema));
    named
}

fn path_item(item: &Map<String, Value>) -> Msg {
    let mut m = Msg::default();
    for (tag, verb) in [
        (2, "get"),
        (3, "put"),
        (4, "post"),
        (5, "delete"),
        (6, "options"),
        (7, "head"),
        (8, "patch"),
    ] {
        if let Some(op) = item.get(verb).and_then(Value::as_object) {
            m.msg(tag, operation(op));
        }
    }
    for p in item
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        m.msg(9, parameter(p));
    }
    extensions(&mut m, 10, item);
    m
}

fn operation(op: &Map<String, Value>) -> Msg {
    let mut m = Msg::default();
    m.strings(1, op.get("tags"));
    m.string(3, text(op, "description"));
    m.string(5, text(op, "operationId"));
    m.strings(6, op.get("produces"));
    m.strings(7, op.get("consumes"));
    for p in op
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        m.msg(8, parameter(p));
    }
    if let Some(responses) = op.get("responses").and_then(Value::as_object) {
        let mut rs = Msg::default();
        for (code, r) in responses {
            let r = r.as_object().cloned().unwrap_or_default();
            let mut response = Msg::default();
            response.string(1, text(&r, "description"));
            if let Some(s) = r.get("schema") {
                let mut item = Msg::default();
                item.msg(1, schema(s));
                response.msg(2, item);
            }
            let mut value = Msg::default();
            value.msg(1, response);
            let mut named = Msg::default();
            named.string(1, code);
            named.msg(2, value);
            rs.msg(1, named);
        }
        m.msg(9, rs);
    }
    m.strings(10, op.get("schemes"));
    extensions(&mut m, 13, op);
    m
}

/// `ParametersItem { parameter = 1 }`: a body parameter, or a query or path one.
fn parameter(p: &Value) -> Msg {
    let empty = Map::new();
    let p = p.as_object().unwrap_or(&empty);
    let mut param = Msg::default();
    if text(p, "in") == "body" {
        let mut b = Msg::default();
        b.string(1, text(p, "description"));
        b.string(2, text(p, "name"));
        b.string(3, "body");
        b.boolean(4, p.get("required").and_then(Value::as_bool) == Some(true));
        if let Some(s) = p.get("schema") {
            b.msg(5, schema(s));
        }
        param.msg(1, b);
    } else {
        // Query and path sub-schemas share their first fields but not their numbering.
        let query = text(p, "in") != "path";
        let mut s = Msg::default();
        s.boolean(1, p.get("required").and_then(Value::as_bool) == Some(true));
        s.string(2, text(p, "in"));
        s.string(3, text(p, "description"));
        s.string(4, text(p, "name"));
        let (ty, unique) = if query { (6, 20) } else { (5, 19) };
        s.string(ty, text(p, "type"));
        s.boolean(
            unique,
            p.get("uniqueItems").and_then(Value::as_bool) == Some(true),
        );
        let mut non_body = Msg::default();
        non_body.msg(if query { 3 } else { 4 }, s);
        param.msg(2, non_body);
    }
    let mut item = Msg::default();
    item.msg(1, param);
    item
}

fn schema(s: &Value) -> Msg {
    let empty = Map::new();
    let s = s.as_object().unwrap_or(&empty);
    let mut m = Msg::default();
    m.string(1, text(s, "$ref"));
    m.string(2, text(s, "format"));
    m.string(3, text(s, "title"));
    m.string(4, text(s, "description"));
    if let Some(d) = s.get("default") {
        m.msg(5, any(d));
    }
    for (tag, k) in [(6, "multipleOf"), (7, "maximum"), (9, "minimum")] {
        if let Some(v) = s.get(k).and_then(Value::as_f64) {
            m.double(tag, v);
        }
    }
    m.boolean(
        8,
        s.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true),
    );
    m.boolean(
        10,
        s.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true),
    );
    for (tag, k) in [
        (11, "maxLength"),
        (12, "minLength"),
        (14, "maxItems"),
        (15, "minItems"),
        (17, "maxProperties"),
        (18, "minProperties"),
    ] {
        if let Some(v) = s.get(k).and_then(Value::as_i64) {
            m.int(tag, v);
        }
    }
    m.string(13, text(s, "pattern"));
    m.boolean(
        16,
        s.get("uniqueItems").and_then(Value::as_bool) == Some(true),
    );
    m.strings(19, s.get("required"));
    for e in s
        .get("enum")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        m.msg(20, any(e));
    }
    match s.get("additionalProperties") {
        Some(Value::Bool(b)) => {
            let mut a = Msg::default();
            a.varint(2 << 3);
            a.varint(u64::from(*b));
            m.msg(21, a);
        }
        Some(v @ Value::Object(_)) => {
            let mut a = Msg::default();
            a.msg(1, schema(v));
            m.msg(21, a);
        }
        _ => {}
    }
    match s.get("type") {
        Some(Value::String(t)) => {
            let mut ty = Msg::default();
            ty.string(1, t);
            m.msg(22, ty);
        }
        Some(v @ Value::Array(_)) => {
            let mut ty = Msg::default();
            ty.strings(1, Some(v));
            m.msg(22, ty);
        }
        _ => {}
    }
    match s.get("items") {
        Some(v @ Value::Object(_)) => {
            let mut items = Msg::default();
            items.msg(1, schema(v));
            m.msg(23, items);
        }
        Some(Value::Array(all)) => {
            let mut items = Msg::default();
            for v in all {
                items.msg(1, schema(v));
            }
            m.msg(23, items);
        }
        _ => {}
    }
    for v in s
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        m.msg(24, schema(v));
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        let mut p = Msg::default();
        for (name, v) in props {
            p.msg(1, named_schema(name, v));
        }
        m.msg(25, p);
    }
    m.boolean(27, s.get("readOnly").and_then(Value::as_bool) == Some(true));
    if let Some(e) = s.get("example") {
        m.msg(30, any(e));
    }
    extensions(&mut m, 31, s);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_fields_with_gnostic_numbers() {
        let doc = json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1"},
                         "definitions": {"A": {"type": "object", "x-kubernetes-group-version-kind": [{"kind": "A"}]}}});
        let b = encode_document(&doc);
        // swagger = 1, "2.0"
        assert_eq!(&b[..5], &[0x0a, 3, b'2', b'.', b'0']);
        // info = 2 follows, definitions = 9 holds the schema with its extension's YAML.
        assert_eq!(b[5], 0x12);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("x-kubernetes-group-version-kind"));
        assert!(text.contains(r#"[{"kind":"A"}]"#));
        assert!(b.contains(&(9 << 3 | 2)));
    }
}
