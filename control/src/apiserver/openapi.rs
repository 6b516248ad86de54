//! Serving the OpenAPI documents: built once (on first request, and again when the custom
//! kinds change), serialised once, answered from memory.
//!
//! As Kubernetes does: `/openapi/v3` lists every group version's document with a
//! `?hash=` of its content; a request carrying the current hash is answered as immutable,
//! one carrying an old hash is redirected to the current one, and every answer has an ETag
//! that `If-None-Match` turns into a 304. `/openapi/v2` is JSON, or protobuf for clients that
//! ask for it (kubectl only reads protobuf).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha512};
use skiff_api::crd::CustomResources;
use skiff_api::openapi::{self, CustomKind};

/// The media type clients ask the protobuf `/openapi/v2` for.
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
/// The one it is answered as: a `@` is not allowed in a media type Go parses, so Kubernetes
/// answers with this spelling.
pub const V2_PROTOBUF_ANSWERED: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// One serialised document and its hash (upper-case hex SHA-512, as Kubernetes computes it).
struct Doc {
    bytes: Bytes,
    hash: String,
}

impl Doc {
    fn new(bytes: Vec<u8>) -> Doc {
        let hash = Sha512::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        Doc {
            bytes: Bytes::from(bytes),
            hash,
        }
    }
}

struct Built {
    v2_json: Doc,
    v2_proto: Doc,
    v3_index: Doc,
    v3: BTreeMap<String, Doc>,
}

fn build(custom: &[CustomKind]) -> Built {
    let docs = openapi::build(custom);
    let v3: BTreeMap<String, Doc> = docs
        .v3
        .iter()
        .map(|(k, d)| {
            (
                k.clone(),
                Doc::new(serde_json::to_vec(d).unwrap_or_default()),
            )
        })
        .collect();
    let paths: serde_json::Map<String, serde_json::Value> = v3
        .iter()
        .map(|(k, d)| {
            (
                k.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{k}?hash={}", d.hash)}),
            )
        })
        .collect();
    Built {
        v2_proto: Doc::new(skiff_api::openapi_proto::encode_document(&docs.v2)),
        v2_json: Doc::new(serde_json::to_vec(&docs.v2).unwrap_or_default()),
        v3_index: Doc::new(serde_json::to_vec(&json!({ "paths": paths })).unwrap_or_default()),
        v3,
    }
}

/// The documents of this server.
#[derive(Default)]
pub struct OpenApi {
    built: RwLock<Option<Arc<Built>>>,
    /// The kinds contributed from outside the built-in types, by who contributed them.
    custom: Mutex<BTreeMap<String, Vec<CustomKind>>>,
    /// The served custom resources the documents were last brought in line with.
    followed: Mutex<Option<Arc<CustomResources>>>,
}

/// The source under which the CustomResourceDefinitions' kinds are contributed.
const DEFINITIONS: &str = "customresourcedefinitions";

/// Each served version of each custom resource with its `openAPIV3Schema`.
fn custom_kinds(custom: &CustomResources) -> Vec<CustomKind> {
    let mut kinds = Vec::new();
    for (group, versions) in custom.groups() {
        for version in versions {
            for (r, schema) in custom.openapi_v3_schemas(group, version) {
                kinds.push(CustomKind {
                    kind: openapi::Kind::of(r),
                    schema: serde_json::to_value(schema).unwrap_or_else(|_| json!({})),
                });
            }
        }
    }
    kinds
}

impl OpenApi {
    pub fn new() -> Arc<OpenApi> {
        Arc::new(OpenApi::default())
    }

    /// Sets the kinds `source` contributes (e.g. a CustomResourceDefinition by its name, with
    /// one [`CustomKind`] per served version; an empty list withdraws them) and rebuilds the
    /// documents. This is how schemas other than the built-in types reach the documents.
    pub fn set_custom_kinds(&self, source: &str, kinds: Vec<CustomKind>) {
        let mut custom = self.custom.lock().unwrap_or_else(|e| e.into_inner());
        if kinds.is_empty() {
            custom.remove(source);
        } else {
            custom.insert(source.to_string(), kinds);
        }
        let all: Vec<CustomKind> = custom.values().flatten().cloned().collect();
        let built = Arc::new(build(&all));
        *self.built.write().unwrap_or_else(|e| e.into_inner()) = Some(built);
    }

    /// Brings the documents in line with the custom resources served now, when they changed
    /// since the last call: the documents are then built again on the next request.
    pub fn follow_custom(&self, custom: &Arc<CustomResources>) {
        let mut followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        if followed.as_ref().is_some_and(|f| Arc::ptr_eq(f, custom)) {
            return;
        }
        let kinds = custom_kinds(custom);
        {
            let mut c = self.custom.lock().unwrap_or_else(|e| e.into_inner());
            if kinds.is_empty() {
                c.remove(DEFINITIONS);
            } else {
                c.insert(DEFINITIONS.to_string(), kinds);
            }
            // Under the custom lock, as `built` builds: the next request builds afresh.
            *self.built.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
        *followed = Some(custom.clone());
    }

    /// The documents, built on first use (a few hundred milliseconds: off the async threads).
    async fn built(self: &Arc<Self>) -> Arc<Built> {
        if let Some(b) = self.built.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return b;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            // Under the custom lock, so a concurrent `set_custom_kinds` is not overwritten.
            let custom = me.custom.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = me.built.read().unwrap_or_else(|e| e.into_inner()).clone() {
                return b;
            }
            let all: Vec<CustomKind> = custom.values().flatten().cloned().collect();
            let b = Arc::new(build(&all));
            *me.built.write().unwrap_or_else(|e| e.into_inner()) = Some(b.clone());
            b
        })
        .await
        .expect("building the OpenAPI documents")
    }

    /// Answers `path` (`/openapi/v2`, `/openapi/v3`, `/openapi/v3/apis/apps/v1`) if it is a
    /// document of this server.
    pub async fn serve(
        self: &Arc<Self>,
        path: &str,
        hash: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<Response> {
        let built = self.built().await;
        if path == "/openapi/v2" {
            let accept = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let (doc, ct) = if accept.contains("protobuf") {
                (&built.v2_proto, V2_PROTOBUF_ANSWERED)
            } else {
                (&built.v2_json, "application/json")
            };
            return Some(answer(doc, ct, headers, false));
        }
        if path == "/openapi/v3" {
            return Some(answer(&built.v3_index, "application/json", headers, false));
        }
        let key = path.strip_prefix("/openapi/v3/")?;
        let doc = built.v3.get(key)?;
        match hash {
            Some(h) if h == doc.hash => Some(answer(doc, "application/json", headers, true)),
            Some(_) => {
                // An old hash: where the current document is.
                let mut r = StatusCode::MOVED_PERMANENTLY.into_response();
                let to = format!("/openapi/v3/{key}?hash={}", doc.hash);
                r.headers_mut().insert(
                    header::LOCATION,
                    HeaderValue::from_str(&to).expect("a path is a header value"),
                );
                Some(r)
            }
            None => Some(answer(doc, "application/json", headers, false)),
        }
    }
}

fn answer(doc: &Doc, content_type: &'static str, headers: &HeaderMap, immutable: bool) -> Response {
    let etag = format!("\"{}\"", doc.hash);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut r = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Response::new(Body::from(doc.bytes.clone()))
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a header value"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if immutable {
            "public, immutable"
        } else {
            "no-cache, private"
        }),
    );
    if immutable {
        // A year, as Kubernetes answers hashed documents.
        let expires = chrono::Utc::now() + chrono::Duration::days(365);
        if let Ok(v) =
            HeaderValue::from_str(&expires.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        {
            h.insert(header::EXPIRES, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn documents_are_hashed_and_revalidated() {
        let api = OpenApi::new();
        let none = HeaderMap::new();
        let index = api.serve("/openapi/v3", None, &none).await.unwrap();
        let body = axum::body::to_bytes(index.into_body(), usize::MAX)
            .await
            .unwrap();
        let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let url = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .to_string();
        let (path, hash) = url.split_once("?hash=").unwrap();
        let fresh = api.serve(path, Some(hash), &none).await.unwrap();
        assert_eq!(fresh.status(), StatusCode::OK);
        assert_eq!(fresh.headers()[header::CACHE_CONTROL], "public, immutable");
        let etag = fresh.headers()[header::ETAG].clone();
        let stale = api.serve(path, Some("0123"), &none).await.unwrap();
        assert_eq!(stale.status(), StatusCode::MOVED_PERMANENTLY);
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        let cached = api.serve(path, None, &again).await.unwrap();
        assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
        assert!(api
            .serve("/openapi/v3/apis/nothing/v1", None, &none)
            .await
            .is_none());
        let mut pb = HeaderMap::new();
        pb.insert(header::ACCEPT, HeaderValue::from_static(V2_PROTOBUF));
        let v2 = api.serve("/openapi/v2", None, &pb).await.unwrap();
        assert_eq!(v2.headers()[header::CONTENT_TYPE], V2_PROTOBUF_ANSWERED);
    }
}
