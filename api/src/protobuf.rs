//! Decoding of Kubernetes protobuf (`application/vnd.kubernetes.protobuf`) into the JSON form.
//!
//! kubectl's typed clients send built-in objects as protobuf: the magic `k8s\0`, then a
//! `runtime.Unknown` whose `raw` bytes are the object's message. The field table of every
//! message comes from [`crate::protobuf_schema`] (generated from `k8s-pb`); a handful of
//! messages have their own JSON form (Quantity, Time, IntOrString, RawExtension).

use serde_json::{json, Map, Value};

use crate::error::ApiError;

#[derive(Debug, Clone, Copy)]
pub enum Ty {
    Str,
    I32,
    I64,
    Bool,
    Bytes,
    F64,
    F32,
    Msg(&'static str),
    MapStr,
    MapMsg(&'static str),
    MapBytes,
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub tag: u32,
    pub json: &'static str,
    pub ty: Ty,
    pub repeated: bool,
}

pub const MAGIC: &[u8] = b"k8s\0";

fn bad(why: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("error decoding protobuf body: {why}"))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| bad("truncated varint"))?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ApiError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| bad("truncated field"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// (tag, wire type)
    fn key(&mut self) -> Result<(u32, u8), ApiError> {
        let k = self.varint()?;
        Ok(((k >> 3) as u32, (k & 7) as u8))
    }
    /// A field's raw value: varint as u64, fixed as u64, length-delimited as bytes.
    fn value(&mut self, wire: u8) -> Result<Raw<'a>, ApiError> {
        Ok(match wire {
            0 => Raw::Int(self.varint()?),
            1 => Raw::Int(u64::from_le_bytes(
                self.bytes(8)?.try_into().expect("8 bytes"),
            )),
            5 => Raw::Int(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")) as u64),
            2 => {
                let n = self.varint()? as usize;
                Raw::Bytes(self.bytes(n)?)
            }
            w => return Err(bad(format!("unsupported wire type {w}"))),
        })
    }
}

enum Raw<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

fn schema(name: &str) -> Option<&'static [Field]> {
    crate::protobuf_schema::MESSAGES
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| crate::protobuf_schema::MESSAGES[i].1)
}

fn string(b: &[u8]) -> Result<Value, ApiError> {
    Ok(Value::String(String::from_utf8(b.to_vec()).map_err(bad)?))
}

fn scalar(ty: Ty, raw: Raw<'_>) -> Result<Value, ApiError> {
    Ok(match (ty, raw) {
        (Ty::Str, Raw::Bytes(b)) => string(b)?,
        (Ty::Bytes, Raw::Bytes(b)) => {
            use std::fmt::Write;
            // JSON carries bytes as base64.
            const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::new();
            for c in b.chunks(3) {
                let n = (c[0] as u32) << 16
                    | (*c.get(1).unwrap_or(&0) as u32) << 8
                    | *c.get(2).unwrap_or(&0) as u32;
                for i in 0..4 {
                    if i <= c.len() {
                        let _ = s.write_char(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                    } else {
                        s.push('=');
                    }
                }
            }
            Value::String(s)
        }
        (Ty::I32, Raw::Int(v)) => json!(v as i32),
        (Ty::I64, Raw::Int(v)) => json!(v as i64),
        (Ty::Bool, Raw::Int(v)) => json!(v != 0),
        (Ty::F64, Raw::Int(v)) => json!(f64::from_bits(v)),
        (Ty::F32, Raw::Int(v)) => json!(f32::from_bits(v as u32)),
        _ => return Err(bad("field has the wrong wire type")),
    })
}

fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86400);
    let secs = seconds.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Decodes one message of type `name`.
pub fn message(name: &str, buf: &[u8]) -> Result<Value, ApiError> {
    // Messages whose JSON form is not an object.
    match name {
        "apimachinery.pkg.api.resource.Quantity"
        | "apimachinery.pkg.api.resource.QuantityValue" => {
            let m = message_fields(name, buf)?;
            return Ok(m.get("string").cloned().unwrap_or(json!("0")));
        }
        "apimachinery.pkg.apis.meta.v1.Time" | "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            let m = message_fields(name, buf)?;
            // Go encodes an unset (zero) time too; JSON has null for it.
            return Ok(match m.get("seconds").and_then(Value::as_i64) {
                Some(s) if s != 0 => json!(rfc3339(s)),
                _ => Value::Null,
            });
        }
        "apimachinery.pkg.apis.meta.v1.Duration" => {
            let m = message_fields(name, buf)?;
            let ns = m.get("duration").and_then(Value::as_i64).unwrap_or(0);
            return Ok(json!(format!("{}s", ns as f64 / 1e9)));
        }
        "apimachinery.pkg.util.intstr.IntOrString" => {
            let m = message_fields(name, buf)?;
            return Ok(if m.get("type").and_then(Value::as_i64).unwrap_or(0) == 1 {
                m.get("strVal").cloned().unwrap_or(json!(""))
            } else {
                m.get("intVal").cloned().unwrap_or(json!(0))
            });
        }
        "apimachinery.pkg.runtime.RawExtension" | "apimachinery.pkg.apis.meta.v1.FieldsV1" => {
            let mut r = Reader::new(buf);
            while !r.done() {
                let (tag, wire) = r.key()?;
                if let (1, Raw::Bytes(b)) = (tag, r.value(wire)?) {
                    return serde_json::from_slice(b).map_err(bad);
                }
            }
            return Ok(json!({}));
        }
        _ => {}
    }
    Ok(Value::Object(message_fields(name, buf)?))
}

fn message_fields(name: &str, buf: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let fields = schema(name).ok_or_else(|| bad(format!("unknown message {name}")))?;
    let mut out = Map::new();
    let mut r = Reader::new(buf);
    while !r.done() {
        let (tag, wire) = r.key()?;
        let raw = r.value(wire)?;
        let Some(f) = fields.iter().find(|f| f.tag == tag) else {
            continue;
        };
        let v = match (f.ty, raw) {
            (Ty::Msg(m), Raw::Bytes(b)) => message(m, b)?,
            (Ty::MapStr | Ty::MapMsg(_) | Ty::MapBytes, Raw::Bytes(b)) => {
                let mut er = Reader::new(b);
                let (mut k, mut v) = (String::new(), Value::Null);
                while !er.done() {
                    let (t, w) = er.key()?;
                    match (t, er.value(w)?) {
                        (1, Raw::Bytes(kb)) => k = String::from_utf8(kb.to_vec()).map_err(bad)?,
                        (2, raw) => {
                            v = match (f.ty, raw) {
                                (Ty::MapMsg(m), Raw::Bytes(vb)) => message(m, vb)?,
                                (Ty::MapBytes, raw) => scalar(Ty::Bytes, raw)?,
                                (_, raw) => scalar(Ty::Str, raw)?,
                            }
                        }
                        _ => {}
                    }
                }
                let entry = out.entry(f.json).or_insert_with(|| json!({}));
                entry[k] = if v.is_null() { json!("") } else { v };
                continue;
            }
            (ty, raw) => scalar(ty, raw)?,
        };
        // Go's non-pointer fields are encoded even when empty; JSON omits them.
        if !f.repeated && (v.is_null() || v.as_str() == Some("")) {
            continue;
        }
        if f.repeated {
            out.entry(f.json)
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("array")
                .push(v);
        } else {
            out.insert(f.json.to_string(), v);
        }
    }
    Ok(out)
}

/// The message name of a kind in a group version (`apps/v1`, `Deployment` → `api.apps.v1.Deployment`).
pub fn message_name(api_version: &str, kind: &str) -> String {
    let (group, version) = api_version
        .rsplit_once('/')
        .unwrap_or(("core", api_version));
    format!(
        "api.{}.{version}.{kind}",
        group.split('.').next().unwrap_or(group)
    )
}

/// Decodes a whole request body: magic, `runtime.Unknown`, then the object.
pub fn decode_object(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s protobuf magic"))?;
    let mut r = Reader::new(rest);
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while !r.done() {
        let (tag, wire) = r.key()?;
        match (tag, r.value(wire)?) {
            (1, Raw::Bytes(tm)) => {
                let mut t = Reader::new(tm);
                while !t.done() {
                    let (tt, w) = t.key()?;
                    match (tt, t.value(w)?) {
                        (1, Raw::Bytes(b)) => {
                            api_version = String::from_utf8(b.to_vec()).map_err(bad)?
                        }
                        (2, Raw::Bytes(b)) => kind = String::from_utf8(b.to_vec()).map_err(bad)?,
                        _ => {}
                    }
                }
            }
            (2, Raw::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    let mut obj = message(&message_name(&api_version, &kind), raw)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(tag: u32, wire: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((tag << 3) | wire as u32) as u8];
        if wire == 2 {
            out.push(payload.len() as u8);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_deployment_as_kubectl_sends_it() {
        // metadata{name: "web", labels{app: web}}, spec{replicas: 2, template{spec{containers[{name, image, ports[{containerPort: 8080}]}]}}}
        let label = [field(1, 2, b"app"), field(2, 2, b"web")].concat();
        let meta = [field(1, 2, b"web"), field(11, 2, &label)].concat();
        let port = field(3, 0, &[0x90, 0x3f]); // 8080
        let container = [
            field(1, 2, b"web"),
            field(2, 2, b"x:v1"),
            field(6, 2, &port),
        ]
        .concat();
        let podspec = field(2, 2, &container);
        let template = field(2, 2, &podspec);
        let spec = [field(1, 0, &[2]), field(3, 2, &template)].concat();
        let obj = [field(1, 2, &meta), field(2, 2, &spec)].concat();
        let type_meta = [field(1, 2, b"apps/v1"), field(2, 2, b"Deployment")].concat();
        let mut body = MAGIC.to_vec();
        body.extend([field(1, 2, &type_meta), field(2, 2, &obj)].concat());
        let v = decode_object(&body).unwrap();
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(v["metadata"]["name"], "web");
        assert_eq!(v["metadata"]["labels"]["app"], "web");
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(
            v["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert!(decode_object(b"nope").is_err());
        assert_eq!(rfc3339(1_704_067_200), "2024-01-01T00:00:00Z");
    }
}
