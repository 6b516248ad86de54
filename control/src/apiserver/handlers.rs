//! Request handling: one dispatch over the parsed path and the method.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};
use skiff_api::fields::FieldSelector;
use skiff_api::limits::{self, MAX_BODY_BYTES};
use skiff_api::patch::PatchKind;
use skiff_api::selector::Selector;
use skiff_api::{managed, meta, table, ApiError, Cause, Resource};
use tokio_stream::wrappers::ReceiverStream;

use super::pages::{self, ListError, ListRequest};
use super::path::{self, ApiPath};
use super::{discovery, error_response, json_response, Shared};
use crate::registry::{DeleteOptions, Sub, WriteOptions};

type Query = HashMap<String, String>;

pub(super) fn query(req: &Request<Body>) -> Query {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    Some((decode(k)?, decode(v)?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode(s: &str) -> Option<String> {
    let s = s.replace('+', " ");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let h = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The form an answer takes, from the request's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// The objects themselves.
    Object,
    /// A `meta.k8s.io/v1` Table (`as=Table`).
    Table,
    /// Metadata only: `PartialObjectMetadata`, or `PartialObjectMetadataList` for a list.
    Partial,
}

/// Picks the first form of `Accept` this server produces. `list` is whether the answer is a
/// list (which is asked for `as=PartialObjectMetadataList`; a get or a watch event is asked
/// for `as=PartialObjectMetadata`). 406 when every alternative asks for a form it does not.
fn output(headers: &HeaderMap, list: bool) -> Result<Output, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.trim().is_empty() {
        return Ok(Output::Object);
    }
    for alt in accept.split(',') {
        let as_ = alt
            .split(';')
            .skip(1)
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim() == "as")
            .map(|(_, v)| v.trim());
        match as_ {
            None => return Ok(Output::Object),
            Some("Table") => return Ok(Output::Table),
            Some("PartialObjectMetadataList") if list => return Ok(Output::Partial),
            Some("PartialObjectMetadata") if !list => return Ok(Output::Partial),
            Some(_) => {}
        }
    }
    Err(ApiError::not_acceptable(format!(
        "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf, not {accept:?}"
    )))
}

/// An object's metadata as a `PartialObjectMetadata`.
fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
           "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({}))})
}

/// The `fieldSelector` of a request, refused (400) when it names a field Kubernetes does not
/// let clients select this kind on.
fn field_selector(q: &Query, r: &Resource) -> Result<FieldSelector, ApiError> {
    FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))?
        .supported_for(r.kind)
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Runs store work (which may wait for a disk flush) on the blocking pool, so the async
/// threads keep serving other requests meanwhile.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request handler failed: {e}")))?
}

/// As [`blocking`] for a registry write: the blocking thread is given back once the write is
/// applied, and its durability is awaited here, holding no thread, before it is answered.
async fn write<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let (out, durable) = blocking(move || Ok(crate::registry::deferring(f))).await?;
    durable
        .await
        .map_err(|e| ApiError::internal(format!("storage error: {e}")))?;
    out
}

pub async fn dispatch(state: Shared, req: Request<Body>) -> Response {
    match handle(state, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

/// The request's body, refused with 413 past [`MAX_BODY_BYTES`] — at once when its
/// `Content-Length` says so, else as soon as that much has arrived.
async fn body_bytes(req: Request<Body>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(format!(
            "the request body is larger than {MAX_BODY_BYTES} bytes"
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large())
}

/// How a body is written, from its `Content-Type`.
#[derive(Clone, Copy)]
enum Format {
    Json,
    Yaml,
    Protobuf,
}

/// Decodes a body on the blocking pool (a large one takes a while), after checking its
/// nesting depth without parsing it: a deeply nested text costs the YAML scanner time in
/// proportion to the square of its depth, so it must be refused before any parser runs.
async fn decode_body(bytes: Bytes, format: Format, what: &'static str) -> Result<Value, ApiError> {
    blocking(move || match format {
        Format::Yaml => {
            limits::check_yaml_depth(&bytes)?;
            serde_yaml::from_slice::<Value>(&bytes)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        }
        Format::Json => {
            limits::check_json_depth(&bytes)?;
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| ApiError::bad_request(format!("error decoding {what}: {e}")))
        }
        Format::Protobuf => skiff_api::protobuf::decode_object(&bytes),
    })
    .await
}

async fn read_body(req: Request<Body>) -> Result<Value, ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let format = if ct.contains("yaml") {
        Format::Yaml
    } else if ct.contains("json") || ct.is_empty() {
        Format::Json
    } else if ct.contains("protobuf") {
        Format::Protobuf
    } else {
        return Err(ApiError::unsupported_media(format!(
            "unsupported media type {ct:?}"
        )));
    };
    let bytes = body_bytes(req).await?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    decode_body(bytes, format, "JSON").await
}

async fn handle(state: Shared, req: Request<Body>) -> Result<Response, ApiError> {
    let uri_path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    // Discovery and health.
    match uri_path.as_str() {
        "/healthz" | "/livez" | "/readyz" => return Ok((StatusCode::OK, "ok").into_response()),
        "/version" => return ok(discovery::version()),
        "/api" => return ok(discovery::api_versions(&state.advertise.to_string())),
        "/apis" => {
            let mut doc = discovery::api_groups();
            let custom = discovery::custom_api_groups(&state.registry.custom());
            if let Some(gs) = doc["groups"].as_array_mut() {
                gs.extend(custom);
            }
            return ok(doc);
        }
        "/api/v1" => return ok(discovery::resource_list("", "v1").expect("core")),
        _ => {}
    }
    if uri_path == "/openapi/v2" || uri_path.starts_with("/openapi/v3") {
        let q = query(&req);
        let hash = q.get("hash").map(String::as_str);
        state.openapi.follow_custom(&state.registry.custom());
        return match state.openapi.serve(&uri_path, hash, req.headers()).await {
            Some(r) => Ok(r),
            None => Err(ApiError::not_found_path(&uri_path)),
        };
    }
    let segs: Vec<&str> = uri_path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["apis", g] => {
            return discovery::api_group(g)
                .or_else(|| discovery::custom_api_group(&state.registry.custom(), g))
                .map_or_else(|| Err(ApiError::not_found_path(&uri_path)), ok)
        }
        ["apis", g, v] => {
            return discovery::resource_list(g, v)
                .or_else(|| discovery::custom_resource_list(&state.registry.custom(), g, v))
                .map_or_else(|| Err(ApiError::not_found_path(&uri_path)), ok)
        }
        _ => {}
    }
    let Some(p) = path::parse(&uri_path, &state.registry.custom())? else {
        return Err(ApiError::not_found_path(&uri_path));
    };
    if p.sub.as_deref() == Some("proxy") {
        return super::proxy::forward(&state, &p, req).await;
    }
    let q = query(&req);
    let headers = req.headers().clone();
    let field_manager = field_manager(&q, &headers, &method)?;
    let opts = WriteOptions {
        dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
        lenient: matches!(
            q.get("fieldValidation").map(String::as_str),
            Some("Ignore") | Some("Warn")
        ),
        by_node: req
            .extensions()
            .get::<super::auth::UserInfo>()
            .and_then(|u| u.node_name())
            .map(String::from),
        // Writes of roles and bindings are held to what their writer may grant.
        admission: req
            .extensions()
            .get::<super::auth::UserInfo>()
            .filter(|_| p.resource.group == skiff_api::resources::RBAC_GROUP)
            .map(|u| {
                Arc::new(super::rbac::Escalation {
                    user: u.clone(),
                    caches: state.rbac.clone(),
                    authorizer: state.authorizer.clone(),
                }) as Arc<dyn crate::registry::WriteAdmission>
            }),
        field_manager: Some(field_manager),
        force: q.get("force").is_some_and(|v| v == "true"),
    };
    let reg = state.registry.clone();
    let ns = p.namespace.as_deref();
    let owned_ns = p.namespace.clone();
    let r = p.resource;
    if r.create_only {
        if p.name.is_some() || method != Method::POST {
            return Err(ApiError::method_not_allowed("POST"));
        }
        let user = req
            .extensions()
            .get::<super::auth::UserInfo>()
            .cloned()
            .ok_or_else(ApiError::unauthorized)?;
        let body = read_body(req).await?;
        let (st, ns) = (state.clone(), owned_ns.clone());
        // The authorizers may read pods (the node authorizer): off the async threads.
        let answer =
            blocking(move || super::review::answer(&st, &user, r, ns.as_deref(), &body)).await?;
        return Ok(json_response(StatusCode::CREATED, &answer));
    }
    match (p.name.as_deref(), p.sub.as_deref(), method.clone()) {
        (None, None, Method::GET) => {
            if q.get("watch").is_some_and(|v| v == "true" || v == "1") {
                return watch(state, &p, &q, output(&headers, false)?);
            }
            let out = output(&headers, true)?;
            let labels = Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
            let fields = field_selector(&q, r)?;
            let req = ListRequest {
                limit: match q.get("limit").filter(|l| !l.is_empty()) {
                    Some(l) => Some(
                        l.parse()
                            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
                    ),
                    None => None,
                },
                continue_token: q.get("continue").cloned(),
                resource_version: q.get("resourceVersion").cloned(),
                resource_version_match: q.get("resourceVersionMatch").cloned(),
            };
            let pages = state.pages.clone();
            let page = tokio::task::spawn_blocking(move || {
                pages.list(&reg, r, owned_ns.as_deref(), &labels, &fields, &req)
            })
            .await
            .map_err(|e| ApiError::internal(format!("request handler failed: {e}")))?;
            let page = match page {
                Ok(page) => page,
                Err(ListError::Api(e)) => return Err(e),
                Err(ListError::Status(code, body)) => {
                    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::GONE);
                    return Ok(json_response(code, &body));
                }
            };
            let list_meta = page.list_meta();
            match out {
                Output::Table => {
                    let mut t =
                        to_table(&state, r, &page.items, &page.resource_version.to_string());
                    t["metadata"] = list_meta;
                    ok(t)
                }
                Output::Partial => ok(
                    json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                          "metadata": list_meta, "items": page.items.iter().map(partial).collect::<Vec<_>>()}),
                ),
                Output::Object => ok(
                    json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                          "metadata": list_meta, "items": page.items}),
                ),
            }
        }
        (None, None, Method::POST) => {
            let body = read_body(req).await?;
            let created = write(move || reg.create(r, owned_ns.as_deref(), body, &opts)).await?;
            let mut resp = json_response(StatusCode::CREATED, &created);
            // The audit log names what was created (a generated name is known only now).
            resp.extensions_mut()
                .insert(super::audit::CreatedName(meta::name(&created).to_string()));
            Ok(resp)
        }
        (None, None, Method::DELETE) => {
            // deletecollection
            let labels = Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
            let fields = field_selector(&q, r)?;
            let dopts = delete_options(&q, None);
            let (out, rev) = blocking(move || {
                let (items, rev) = reg.list(r, owned_ns.as_deref(), &labels, &fields)?;
                let mut out = Vec::new();
                for o in items {
                    match reg.delete(r, meta::namespace(&o), meta::name(&o), &dopts) {
                        Ok(v) => out.push(v),
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok((out, rev))
            })
            .await?;
            ok(
                json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                      "metadata": {"resourceVersion": rev.to_string()}, "items": out}),
            )
        }
        (Some(name), None, Method::GET) => {
            let out = output(&headers, false)?;
            // A resourceVersion the store has not reached yet: wait a while, then 504.
            if let Some(rv) = q
                .get("resourceVersion")
                .filter(|v| !v.is_empty() && *v != "0")
            {
                let wanted = pages::parse_rv(rv)?;
                let reg = reg.clone();
                let waited =
                    tokio::task::spawn_blocking(move || pages::wait_for_revision(&reg, wanted))
                        .await
                        .map_err(|e| ApiError::internal(format!("request handler failed: {e}")))?;
                match waited {
                    Ok(()) => {}
                    Err(ListError::Api(e)) => return Err(e),
                    Err(ListError::Status(code, body)) => {
                        let code =
                            StatusCode::from_u16(code).unwrap_or(StatusCode::GATEWAY_TIMEOUT);
                        return Ok(json_response(code, &body));
                    }
                }
            }
            let obj = reg.get(r, ns, name)?;
            match out {
                Output::Table => {
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    ok(to_table(&state, r, &[obj], &rv))
                }
                Output::Partial => ok(partial(&obj)),
                Output::Object => ok(obj),
            }
        }
        (Some(name), sub, Method::PUT) => {
            let sub = subresource(r, sub)?;
            let body = read_body(req).await?;
            let name = name.to_string();
            ok(write(move || reg.update(r, owned_ns.as_deref(), &name, body, sub, &opts)).await?)
        }
        (Some(name), sub, Method::PATCH) => {
            let sub = subresource(r, sub)?;
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = PatchKind::from_content_type(ct).ok_or_else(|| {
                ApiError::unsupported_media(format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"))
            })?;
            check_patch_options(&q, kind)?;
            let body = read_body_as(req, kind).await?;
            let name = name.to_string();
            ok(
                write(move || reg.patch(r, owned_ns.as_deref(), &name, kind, &body, sub, &opts))
                    .await?,
            )
        }
        (Some(name), None, Method::DELETE) => {
            let bytes = body_bytes(req).await?;
            let body = match bytes.is_empty() {
                true => None,
                false => Some(decode_body(bytes, Format::Json, "DeleteOptions").await?),
            };
            let dopts = delete_options(&q, body.as_ref());
            let (after, marked) = {
                let name = name.to_string();
                blocking(move || {
                    let ns = owned_ns.as_deref();
                    let after = reg.delete(r, ns, &name, &dopts)?;
                    let marked = meta::is_deleting(&after) && reg.try_get(r, ns, &name)?.is_some();
                    Ok((after, marked))
                })
                .await?
            };
            // Kubernetes answers 200 with the object when it is only marked, and a Status when gone.
            if marked {
                return Ok(json_response(StatusCode::OK, &after));
            }
            ok(
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                      "details": {"name": name, "group": r.group, "kind": r.plural, "uid": meta::uid(&after)}}),
            )
        }
        (Some(name), Some("status"), Method::GET) => ok(reg.get(r, ns, name)?),
        (Some(name), Some("scale"), Method::GET) => ok(reg.get_scale(r, ns, name)?),
        (Some(name), Some("binding"), Method::POST) if r.kind == "Pod" => {
            let body = read_body(req).await?;
            let node = body
                .pointer("/target/name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "Binding",
                        name,
                        vec![skiff_api::Cause::required("target.name")],
                    )
                })?;
            let pod = reg.get(r, ns, name)?;
            if pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty())
            {
                return Err(ApiError::conflict(
                    "pods",
                    name,
                    "pod is already assigned to a node",
                ));
            }
            let node = node.to_string();
            write(move || reg.bind_all(vec![(pod, node)])).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            ))
        }
        (Some(name), Some("eviction"), Method::POST) if r.kind == "Pod" => {
            let name = name.to_string();
            let ns = owned_ns.unwrap_or_else(|| "default".into());
            blocking(move || reg.evict(&ns, &name, &DeleteOptions::default())).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            ))
        }
        (Some(name), Some("token"), Method::POST) if r.kind == "ServiceAccount" => {
            let user = req
                .extensions()
                .get::<super::auth::UserInfo>()
                .cloned()
                .ok_or_else(ApiError::unauthorized)?;
            let body = read_body(req).await?;
            let (st, ns, name) = (
                state.clone(),
                owned_ns.unwrap_or_default(),
                name.to_string(),
            );
            let answer = blocking(move || {
                st.authenticator
                    .tokens
                    .request(&st.registry, &user, &ns, &name, &body)
            })
            .await?;
            Ok(json_response(StatusCode::CREATED, &answer))
        }
        (Some(name), Some(sub @ ("log" | "exec" | "attach" | "portforward")), _)
            if r.kind == "Pod" =>
        {
            super::nodeproxy::forward(&state, ns.unwrap_or("default"), name, sub, req).await
        }
        _ => Err(ApiError::method_not_allowed(&format!(
            "{method} {uri_path}"
        ))),
    }
}

/// The manager a write's fields are recorded under: `fieldManager`, else the client's
/// `User-Agent` up to its first `/`, as Kubernetes derives it; held to 128 characters.
fn field_manager(q: &Query, headers: &HeaderMap, method: &Method) -> Result<String, ApiError> {
    match q.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) if m.chars().count() > managed::MAX_MANAGER_LEN => {
            let options = match *method {
                Method::POST => "CreateOptions",
                Method::PUT => "UpdateOptions",
                _ => "PatchOptions",
            };
            Err(options_invalid(
                options,
                Cause::too_long("fieldManager", managed::MAX_MANAGER_LEN),
            ))
        }
        Some(m) => Ok(m.clone()),
        None => Ok(managed::manager_from_user_agent(
            headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        )),
    }
}

/// An apply names its manager; only an apply may be forced.
fn check_patch_options(q: &Query, kind: PatchKind) -> Result<(), ApiError> {
    let named = q.get("fieldManager").is_some_and(|m| !m.is_empty());
    if kind == PatchKind::Apply && !named {
        let mut c = Cause::required("fieldManager");
        c.message = "Required value: is required for apply patch".into();
        return Err(options_invalid("PatchOptions", c));
    }
    if kind != PatchKind::Apply && q.contains_key("force") {
        return Err(options_invalid(
            "PatchOptions",
            Cause::forbidden("force", "may not be specified for non-apply patch"),
        ));
    }
    Ok(())
}

/// 422 about a request's options (`PatchOptions.meta.k8s.io "" is invalid: ...`).
fn options_invalid(kind: &str, cause: Cause) -> ApiError {
    let mut e = ApiError::invalid(&format!("{kind}.meta.k8s.io"), "", vec![cause]);
    e.kind = Some(kind.to_string());
    e.group = Some("meta.k8s.io".into());
    e
}

async fn read_body_as(req: Request<Body>, kind: PatchKind) -> Result<Value, ApiError> {
    let bytes = body_bytes(req).await?;
    if kind == PatchKind::Apply {
        return decode_body(bytes, Format::Yaml, "YAML").await;
    }
    decode_body(bytes, Format::Json, "patch").await
}

fn subresource(r: &Resource, sub: Option<&str>) -> Result<Sub, ApiError> {
    match sub {
        None => Ok(Sub::Main),
        Some("status") if r.has_status => Ok(Sub::Status),
        Some("scale") if r.has_scale => Ok(Sub::Scale),
        Some(s) => Err(ApiError::not_found_path(&format!("{}/{s}", r.plural))),
    }
}

fn delete_options(q: &Query, body: Option<&Value>) -> DeleteOptions {
    let from_body = |k: &str| body.and_then(|b| b.get(k)).cloned();
    DeleteOptions {
        grace_period_seconds: q
            .get("gracePeriodSeconds")
            .and_then(|v| v.parse().ok())
            .or_else(|| from_body("gracePeriodSeconds").and_then(|v| v.as_i64())),
        propagation: q
            .get("propagationPolicy")
            .cloned()
            .or_else(|| from_body("propagationPolicy").and_then(|v| v.as_str().map(String::from)))
            .or_else(
                || match from_body("orphanDependents").and_then(|v| v.as_bool()) {
                    Some(true) => Some("Orphan".into()),
                    _ => None,
                },
            ),
        precondition_uid: body
            .and_then(|b| b.pointer("/preconditions/uid"))
            .and_then(Value::as_str)
            .map(String::from),
        precondition_rv: body
            .and_then(|b| b.pointer("/preconditions/resourceVersion"))
            .and_then(Value::as_str)
            .map(String::from),
        dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
    }
}

/// A watch: newline-delimited JSON events, starting with the current objects when no
/// resourceVersion (or `sendInitialEvents=true`) is given.
fn watch(state: Shared, p: &ApiPath, q: &Query, out: Output) -> Result<Response, ApiError> {
    let reg = state.registry.clone();
    let r = p.resource;
    let labels = Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let fields = field_selector(q, r)?;
    let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1800);
    let mut initial = Vec::new();
    let from = if rv.is_empty() || rv == "0" || send_initial {
        let (items, rev) = reg.list(r, p.namespace.as_deref(), &labels, &fields)?;
        initial = items;
        rev
    } else {
        rv.parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?
    };
    let kind = r.kind;
    let table_state = state.clone();
    let encode = move |ty: &str, obj: Arc<Value>| -> Bytes {
        let obj = if out == Output::Partial && ty != "ERROR" {
            Arc::new(partial(&obj))
        } else if out == Output::Table && ty != "BOOKMARK" && ty != "ERROR" {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let row = Arc::unwrap_or_clone(obj);
            Arc::new(to_table(&table_state, r, &[row], &rv))
        } else {
            obj
        };
        // Serialized from the shared object: a watch event costs no copy of it.
        #[derive(serde::Serialize)]
        struct Line<'a> {
            #[serde(rename = "type")]
            ty: &'a str,
            object: &'a Value,
        }
        let mut line = serde_json::to_vec(&Line { ty, object: &obj }).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    };
    let mut first: Vec<Bytes> = initial
        .into_iter()
        .map(|o| encode("ADDED", Arc::new(o)))
        .collect();
    if send_initial {
        first.push(encode(
            "BOOKMARK",
            Arc::new(json!({"kind": kind, "apiVersion": r.api_version(),
                   "metadata": {"resourceVersion": from.to_string(),
                                "annotations": {"k8s.io/initial-events-end": "true"}}})),
        ));
    }
    let events = match reg.watch(r, p.namespace.as_deref(), from, labels, fields) {
        Ok(rx) => rx,
        Err(e) if e.code == 410 => {
            // Kubernetes reports an expired watch as an ERROR event on a 200 stream.
            let body = encode("ERROR", Arc::new(e.to_status()));
            return Ok(stream_response(Body::from(body)));
        }
        Err(e) => return Err(e),
    };
    let live = ReceiverStream::new(events).map(move |ev| encode(ev.kind, ev.object));
    let stream = futures::stream::iter(first)
        .chain(live)
        .take_until(tokio::time::sleep(Duration::from_secs(timeout)))
        .map(Ok::<Bytes, std::io::Error>);
    Ok(stream_response(Body::from_stream(stream)))
}

/// A Table of objects of `r`: a custom resource's printer columns, or a built-in kind's.
fn to_table(state: &Shared, r: &'static Resource, objects: &[Value], rv: &str) -> Value {
    match state.registry.definition(r) {
        Some(d) => d.table(r.version, objects, rv, now_unix()),
        None => table::to_table(r.kind, objects, rv, now_unix()),
    }
}

fn stream_response(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    r
}
