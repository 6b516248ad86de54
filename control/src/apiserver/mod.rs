//! The Kubernetes-compatible HTTP API: discovery, CRUD, watch, subresources, `Status` errors.
//!
//! Paths are parsed by hand ([`path::ApiPath`]) because Kubernetes' URL space (namespaces being
//! both a resource and a scope) does not fit a route table well.

pub mod audit;
pub mod auth;
mod discovery;
pub mod fairness;
mod handlers;
pub mod join;
pub mod nodegraph;
mod nodeproxy;
pub mod openapi;
mod pages;
pub mod path;
pub mod podclasses;
pub mod policy;
mod proxy;
pub mod rbac;
mod review;
pub mod tokens;
pub mod transport;

use std::net::SocketAddr;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use skiff_api::ApiError;

use crate::registry::Registry;

/// Routes requests for logs and exec to the node that runs the pod.
pub trait NodeRouter: Send + Sync + 'static {
    /// The base URL of the node agent's API for `node_name`, if known.
    fn node_url(&self, node: &serde_json::Value) -> Option<String>;
}

/// Shared state of the API server.
pub struct ApiState {
    pub registry: Arc<Registry>,
    /// Who a request comes from.
    pub authenticator: auth::Authenticator,
    /// What they may do.
    pub authorizer: Arc<dyn auth::Authorizer>,
    /// Roles and bindings, which the RBAC authorizer reads; [`rbac::RbacCaches::start`] keeps
    /// them current.
    pub rbac: Arc<rbac::RbacCaches>,
    /// Pods and what they refer to, which the node authorizer reads; [`nodegraph::PodGraph::run`]
    /// keeps it current (without it the authorizer reads the store).
    pub graph: Arc<nodegraph::PodGraph>,
    /// The cluster CA: served at `/cacerts`, signs node client certificates.
    pub ca: Arc<crate::tls::ClusterCa>,
    /// Signs node agents' serving certificates.
    pub node_serving_ca: Arc<crate::tls::ClusterCa>,
    /// How the API server reaches node agents' endpoints (logs, exec): TLS with its own client
    /// certificate, trusting the cluster CA only.
    pub kubelet_client: Arc<rustls::ClientConfig>,
    /// The address clients should use (for the `kubernetes` endpoints and discovery).
    pub advertise: SocketAddr,
    /// How long the node certificates it signs are valid.
    pub node_cert_validity: std::time::Duration,
    /// Timeouts and connection caps.
    pub transport: transport::TransportConfig,
    /// Each client's share of requests and watches.
    pub fairness: Arc<fairness::Fairness>,
    /// Where each request is recorded, if anywhere (`--audit-log`): authenticated ones, and
    /// those whose credentials fail.
    pub audit: Option<Arc<audit::AuditLog>>,
    /// The OpenAPI documents, built once; schemas beyond the built-in kinds join them
    /// through [`openapi::OpenApi::set_custom_kinds`].
    pub openapi: Arc<openapi::OpenApi>,
    /// List snapshots that `limit`/`continue` pages are cut from.
    pub pages: Arc<pages::Snapshots>,
}

impl ApiState {
    /// The state of an API server over `registry` with the cluster CA and certificates of
    /// `tls`, accepting `admin_tokens` and the join token secret `node_token_secret`.
    pub fn new(
        registry: Arc<Registry>,
        tls: &crate::tls::TlsMaterial,
        admin_tokens: Vec<String>,
        node_token_secret: Option<String>,
        advertise: SocketAddr,
    ) -> ApiState {
        let rbac = rbac::RbacCaches::new();
        let graph = nodegraph::PodGraph::new(registry.clone());
        ApiState {
            authorizer: Arc::new(auth::default_authorizer(graph.clone(), rbac.clone())),
            rbac,
            graph,
            registry,
            authenticator: auth::Authenticator {
                admin_tokens,
                node_token_secret,
                tokens: Arc::new(tokens::TokenIssuer::new(tls.service_account_key.clone())),
            },
            ca: tls.ca.clone(),
            node_serving_ca: tls.node_serving_ca.clone(),
            kubelet_client: tls.kubelet_client.clone(),
            advertise,
            node_cert_validity: crate::tls::NODE_CERT_VALIDITY,
            transport: transport::TransportConfig::default(),
            fairness: fairness::Fairness::new(fairness::FairnessConfig::default()),
            audit: None,
            openapi: openapi::OpenApi::new(),
            pages: pages::Snapshots::new(),
        }
    }
}

pub type Shared = Arc<ApiState>;

pub(crate) fn error_response(e: &ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.to_status())
}

pub(crate) fn json_response(code: StatusCode, v: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = (code, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(code: StatusCode, body: String) -> Response {
    let mut r = (code, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What the request asks to do, for the authorizer; for a create, the name is read from the
/// body (which is then put back), as NodeRestriction checks the object a node creates.
async fn attributes(
    state: &Shared,
    req: Request<Body>,
    user: &auth::UserInfo,
) -> Result<(auth::Attributes, Request<Body>), ApiError> {
    let uri_path = req.uri().path().trim_end_matches('/').to_string();
    let Some(p) = path::parse(&uri_path, &state.registry.custom())? else {
        let verb = match *req.method() {
            http::Method::GET | http::Method::HEAD => "get",
            http::Method::POST => "create",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "unknown",
        };
        let attrs = auth::Attributes::NonResource {
            verb: verb.into(),
            path: uri_path,
        };
        return Ok((attrs, req));
    };
    let watch = handlers::query(&req)
        .get("watch")
        .is_some_and(|v| v == "true" || v == "1");
    // A proxied request's query is the backend's, never a watch of the API's.
    let watch = watch && p.sub.as_deref() != Some("proxy");
    let verb = match (
        auth::verb(req.method(), p.name.is_some(), watch),
        p.sub.as_deref(),
    ) {
        // Streams opened with a WebSocket upgrade are GETs; as Kubernetes, they need `create`
        // like the POST they stand for.
        ("get", Some("exec" | "attach" | "portforward")) => "create",
        (v, _) => v,
    };
    let mut name = p.name.clone();
    let mut req = req;
    // Only a node's creates need the body's name (its own Node, its own Lease).
    if verb == "create" && name.is_none() && user.node_name().is_some() {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, skiff_api::validation::MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::too_large("the request body is too large"))?;
        name = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["metadata"]["name"].as_str().map(String::from));
        req = Request::from_parts(parts, Body::from(bytes));
    }
    let attrs = auth::Attributes::Resource(auth::ResourceAttributes {
        verb: verb.into(),
        group: p.resource.group.into(),
        resource: p.resource.plural.into(),
        subresource: p.sub.clone(),
        namespace: p.namespace.clone(),
        name,
    });
    Ok((attrs, req))
}

/// Who a request asks to act as: `Impersonate-User`, `Impersonate-Group`, `Impersonate-Uid`
/// and `Impersonate-Extra-KEY` (the key percent-decoded and lower-cased, as Kubernetes reads
/// it), in [`auth::UserInfo`]'s form.
fn impersonation_request(headers: &http::HeaderMap) -> Result<Option<auth::UserInfo>, ApiError> {
    const EXTRA: &str = "impersonate-extra-";
    let text = |v: &HeaderValue| v.to_str().ok().map(String::from);
    let user = headers.get("impersonate-user").and_then(text);
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(text)
        .collect();
    let uid = headers.get("impersonate-uid").and_then(text);
    let mut extra: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (k, v) in headers {
        let Some(key) = k.as_str().strip_prefix(EXTRA) else {
            continue;
        };
        let key = percent_encoding::percent_decode_str(key)
            .decode_utf8_lossy()
            .to_lowercase();
        extra.entry(key).or_default().extend(text(v));
    }
    match user.filter(|u| !u.is_empty()) {
        Some(name) => Ok(Some(auth::UserInfo {
            name,
            groups,
            uid,
            extra,
        })),
        None if !groups.is_empty() || uid.is_some() || !extra.is_empty() => {
            Err(ApiError::bad_request(
                "requested impersonation of groups, a uid or extra fields without impersonating a user",
            ))
        }
        None => Ok(None),
    }
}

/// The user `user` acts as, when it may `impersonate` that user (or ServiceAccount), each
/// group, the uid (`uids`) and each extra value (`userextras/KEY` in
/// `authentication.k8s.io`), as Kubernetes' impersonation filter decides; the 403 names
/// what it may not.
fn impersonate(
    authorizer: &dyn auth::Authorizer,
    user: &auth::UserInfo,
    wanted: auth::UserInfo,
) -> Result<auth::UserInfo, ApiError> {
    let check =
        |group: &str, resource: &str, sub: Option<&str>, namespace: Option<&str>, target: &str| {
            let attrs = auth::Attributes::Resource(auth::ResourceAttributes {
                verb: "impersonate".into(),
                group: group.into(),
                resource: resource.into(),
                subresource: sub.map(String::from),
                namespace: namespace.map(String::from),
                name: Some(target.into()),
            });
            match authorizer.authorize(user, &attrs) {
                auth::Decision::Allow => Ok(()),
                auth::Decision::Deny(reason) => Err(auth::forbidden(user, &attrs, &reason)),
                auth::Decision::NoOpinion => Err(auth::forbidden(user, &attrs, "")),
            }
        };
    let auth::UserInfo {
        name,
        groups,
        uid,
        extra,
    } = wanted;
    let service_account = name
        .strip_prefix(rbac::SERVICE_ACCOUNT_PREFIX)
        .and_then(|r| r.split_once(':'));
    match service_account {
        Some((ns, sa)) => check("", "serviceaccounts", None, Some(ns), sa)?,
        None => check("", "users", None, None, &name)?,
    }
    for g in &groups {
        check("", "groups", None, None, g)?;
    }
    const AUTHN: &str = "authentication.k8s.io";
    if let Some(u) = &uid {
        check(AUTHN, "uids", None, None, u)?;
    }
    for (key, values) in &extra {
        for v in values {
            check(AUTHN, "userextras", Some(key), None, v)?;
        }
    }
    let mut all = groups.clone();
    if groups.is_empty() {
        all.extend(rbac::service_account_groups(&name));
    }
    if name != "system:anonymous" && !all.iter().any(|g| g == auth::AUTHENTICATED) {
        all.push(auth::AUTHENTICATED.into());
    }
    Ok(auth::UserInfo {
        name,
        groups: all,
        uid,
        extra,
    })
}

/// Authenticates, authorizes and answers `req`; `audit` gets who asked for what as soon as
/// that is known (no one, for a request whose credentials fail).
async fn authenticated(
    state: &Shared,
    req: Request<Body>,
    audit: &mut Option<(auth::UserInfo, auth::Attributes)>,
) -> Result<Response, ApiError> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let peer = req.extensions().get::<auth::PeerCertificate>().cloned();
    // Reads of the in-memory store only (a join token's Secret): no disk wait.
    let user =
        match state
            .authenticator
            .authenticate(&state.registry, bearer.as_deref(), peer.as_ref())
        {
            Ok(u) => u,
            Err(e) => {
                // Failed attempts count against the address they come from.
                let client = fairness::Client::address(peer_ip(&req));
                if let Err(refused) = state.fairness.admit(&client, false) {
                    return Ok(refused.response());
                }
                // Recorded with no user, as Kubernetes' `WithFailedAuthenticationAudit`: at
                // the rate the address's bucket admits them, so a flood of bad credentials
                // is seen without its 429s washing the log's bounded files out.
                if state.audit.is_some() {
                    let nobody = auth::UserInfo::default();
                    let path = req.uri().path().to_string();
                    let attrs = match attributes(state, req, &nobody).await {
                        Ok((attrs, _)) => attrs,
                        Err(_) => auth::Attributes::NonResource {
                            verb: String::new(),
                            path,
                        },
                    };
                    *audit = Some((nobody, attrs));
                }
                return Err(e);
            }
        };
    let client = fairness::Client::user(&user);
    let user = match impersonation_request(req.headers())? {
        None => user,
        Some(wanted) => {
            let state = state.clone();
            tokio::task::spawn_blocking(move || impersonate(&*state.authorizer, &user, wanted))
                .await
                .map_err(|e| ApiError::internal(format!("impersonation failed: {e}")))??
        }
    };
    let (attrs, req) = attributes(state, req, &user).await?;
    if state.audit.is_some() {
        *audit = Some((user.clone(), attrs.clone()));
    }
    // Counted against the authenticated user, whomever it acts as; a watch also takes one of
    // its open-watch places until it ends.
    let is_watch = matches!(&attrs, auth::Attributes::Resource(r) if r.verb == "watch");
    let _admitted = match state.fairness.admit(&client, is_watch) {
        Ok(a) => a,
        Err(refused) => return Ok(refused.response()),
    };
    let watch_slot = match is_watch.then(|| state.fairness.watch(&client)).transpose() {
        Ok(slot) => slot.flatten(),
        Err(refused) => return Ok(refused.response()),
    };
    let decision = if user.in_group(auth::MASTERS) {
        auth::Decision::Allow
    } else if !user.in_group(auth::NODES) {
        // RBAC answers from its subject index in microseconds: a hand-off to another thread
        // would cost more than the check.
        state.authorizer.authorize(&user, &attrs)
    } else {
        // The node authorizer may go through the pods bound to a node: off the async threads.
        let (state, user, attrs) = (state.clone(), user.clone(), attrs.clone());
        tokio::task::spawn_blocking(move || state.authorizer.authorize(&user, &attrs))
            .await
            .map_err(|e| ApiError::internal(format!("authorization failed: {e}")))?
    };
    match decision {
        auth::Decision::Allow => {}
        auth::Decision::Deny(reason) => return Err(auth::forbidden(&user, &attrs, &reason)),
        auth::Decision::NoOpinion => return Err(auth::forbidden(&user, &attrs, "")),
    }
    if req.uri().path() == auth::NODE_CREDENTIAL_PATH {
        if req.method() != http::Method::POST {
            return Err(ApiError::method_not_allowed("GET"));
        }
        let body = axum::body::to_bytes(req.into_body(), 64 * 1024)
            .await
            .map_err(|_| ApiError::too_large("the request body is too large"))?;
        let state = state.clone();
        let answer = tokio::task::spawn_blocking(move || {
            join::node_credential(
                &state.registry,
                (&state.ca, &state.node_serving_ca),
                state.node_cert_validity,
                &user,
                &body,
            )
        })
        .await
        .map_err(|e| ApiError::internal(format!("node credential: {e}")))??;
        return Ok(json_response(
            StatusCode::OK,
            &serde_json::to_value(answer).unwrap_or_default(),
        ));
    }
    // The service account issuer's public keys (authorized as discovery is).
    match req.uri().path() {
        tokens::JWKS_PATH => {
            let mut r = json_response(StatusCode::OK, &state.authenticator.tokens.key.jwks());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jwk-set+json"),
            );
            return Ok(r);
        }
        tokens::OPENID_CONFIGURATION_PATH => {
            let doc = state
                .authenticator
                .tokens
                .openid_configuration(&state.advertise.to_string());
            return Ok(json_response(StatusCode::OK, &doc));
        }
        _ => {}
    }
    // Who writes, for the admission rules that depend on it (NodeRestriction).
    let mut req = req;
    req.extensions_mut().insert(user);
    let resp = handlers::dispatch(state.clone(), req).await;
    Ok(fairness::hold_until_done(resp, watch_slot))
}

/// The address a request comes from (unspecified when served without [`transport::serve`]).
fn peer_ip(req: &Request<Body>) -> std::net::IpAddr {
    req.extensions()
        .get::<transport::PeerAddr>()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.0.ip())
}

/// The share an unauthenticated path's request is counted against: the user of its client
/// certificate, else its address.
fn open_path_client(req: &Request<Body>) -> fairness::Client {
    match req.extensions().get::<auth::PeerCertificate>() {
        Some(p) => fairness::Client::user(&auth::UserInfo {
            name: p.common_name.clone(),
            groups: p.organizations.clone(),
            ..Default::default()
        }),
        None => fairness::Client::address(peer_ip(req)),
    }
}

async fn auth_then_dispatch(State(state): State<Shared>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let started = std::time::Instant::now();
    // Open paths count against their caller here, the others once it is authenticated;
    // health probes are exempt, as Kubernetes' `probes` flow schema makes them.
    let open = matches!(path.as_str(), "/version" | "/cacerts");
    let admitted = match open {
        true => state
            .fairness
            .admit(&open_path_client(&req), false)
            .map(Some),
        false => Ok(None),
    };
    let resp = match (admitted, path.as_str()) {
        (Err(refused), _) => refused.response(),
        (Ok(_seat), "/healthz" | "/livez" | "/readyz" | "/version") => {
            handlers::dispatch(state.clone(), req).await
        }
        // The CA, to anyone: a joining agent checks it against its token's hash.
        (Ok(_seat), "/cacerts") => text_response(StatusCode::OK, state.ca.pem.clone()),
        (Ok(_), _) => {
            let mut asked = None;
            let source = req
                .extensions()
                .get::<transport::PeerAddr>()
                .map(|p| p.0.ip());
            let resp = match authenticated(&state, req, &mut asked).await {
                Ok(r) => r,
                Err(e) => error_response(&e),
            };
            if let (Some(log), Some((user, attrs))) = (&state.audit, &asked) {
                let mut entry = audit::Entry::new(user, attrs, resp.status().as_u16());
                entry.source_ip = source;
                if let Some(created) = resp.extensions().get::<audit::CreatedName>() {
                    entry.name = entry.name.or(Some(created.0.as_str()));
                }
                log.record(&entry);
            }
            resp
        }
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    resp
}

/// The router of the whole API.
pub fn router(state: Shared) -> Router {
    Router::new().fallback(auth_then_dispatch).with_state(state)
}

/// Serves the API over TLS on `listener` until `shutdown` resolves, with the timeouts and
/// connection caps of `state.transport`; open connections (watches included) are closed then.
pub async fn serve(
    state: Shared,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = state.transport.clone();
    transport::serve(router(state), listener, tls, config, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ClusterConfig;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// An API server over a fresh store in `dir`, and an HTTPS client of it (token `t`).
    struct Api {
        store: Arc<SqliteStore>,
        addr: SocketAddr,
        http: reqwest::Client,
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
        /// The RBAC caches' watches, ended when the test ends.
        _rbac: (tokio::sync::watch::Sender<bool>, tokio::task::JoinSet<()>),
    }

    async fn start(dir: &std::path::Path) -> Api {
        start_with(dir, |_| {}).await
    }

    /// As [`start`], with the state changed by `adjust` first.
    async fn start_with(dir: &std::path::Path, adjust: impl FnOnce(&mut ApiState)) -> Api {
        let store = Arc::new(SqliteStore::open(&dir.join("store")).unwrap());
        let registry = Registry::new(store.clone(), ClusterConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        crate::server::bootstrap(&registry, addr).unwrap();
        let tls = crate::tls::load_or_create(dir, &[addr.ip().to_string()]).unwrap();
        let mut state = ApiState::new(registry.clone(), &tls, vec!["t".into()], None, addr);
        adjust(&mut state);
        let (rbac_stop, rbac_stopped) = tokio::sync::watch::channel(false);
        let mut rbac_tasks = tokio::task::JoinSet::new();
        state
            .rbac
            .start(&registry, &rbac_stopped, &mut rbac_tasks)
            .await;
        let state = Arc::new(state);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(state, listener, tls.server, async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(tls.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        Api {
            store,
            addr,
            http,
            stop,
            server,
            _rbac: (rbac_stop, rbac_tasks),
        }
    }

    /// The admin acts as another user with `Impersonate-User` (and its groups with
    /// `Impersonate-Group`); the reviews answer for the user acted as.
    #[tokio::test]
    async fn impersonated_requests_are_authorized_as_the_user_acted_as() {
        let dir = tempfile::tempdir().unwrap();
        let api = start(dir.path()).await;
        let base = format!("https://{}", api.addr);
        let get = |path: &str, user: Option<&str>, group: Option<&str>| {
            let mut req = api.http.get(format!("{base}{path}")).bearer_auth("t");
            if let Some(u) = user {
                req = req.header("Impersonate-User", u);
            }
            if let Some(g) = group {
                req = req.header("Impersonate-Group", g);
            }
            req.send()
        };
        let pods = "/api/v1/namespaces/default/pods";
        assert_eq!(get(pods, None, None).await.unwrap().status(), 200);
        let resp = get(pods, Some("alice"), None).await.unwrap();
        assert_eq!(resp.status(), 403);
        let status: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            status["message"],
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        let masters = get(pods, Some("alice"), Some(auth::MASTERS)).await.unwrap();
        assert_eq!(masters.status(), 200);
        // A group without a user is refused.
        assert_eq!(get(pods, None, Some("g")).await.unwrap().status(), 400);
        let review = api
            .http
            .post(format!(
                "{base}/apis/authentication.k8s.io/v1/selfsubjectreviews"
            ))
            .bearer_auth("t")
            .header("Impersonate-User", "system:serviceaccount:team:builder")
            .json(&serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}))
            .send()
            .await
            .unwrap();
        assert_eq!(review.status(), 201);
        let review: serde_json::Value = review.json().await.unwrap();
        assert_eq!(
            review["status"]["userInfo"],
            serde_json::json!({"username": "system:serviceaccount:team:builder",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:team", "system:authenticated"]})
        );
        let access = api
            .http
            .post(format!(
                "{base}/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
            ))
            .bearer_auth("t")
            .header("Impersonate-User", "alice")
            .json(&serde_json::json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"verb": "list", "resource": "pods", "namespace": "default"}}}))
            .send()
            .await
            .unwrap();
        let access: serde_json::Value = access.json().await.unwrap();
        assert_eq!(access["status"]["allowed"], false);
        let _ = api.stop.send(());
        api.server.await.unwrap().unwrap();
    }

    /// Requests whose credentials fail are in the audit log as Kubernetes records them: no
    /// user, what was asked, the client's address, 401. Beyond the address's request bucket
    /// they are refused with 429 and not recorded, so a flood cannot outgrow the bucket's rate.
    #[tokio::test]
    async fn failed_authentication_is_audited_at_the_rate_its_address_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("audit.log");
        let config = audit::AuditConfig::new(&log_path);
        let api = start_with(dir.path(), |state| {
            state.audit = Some(Arc::new(audit::AuditLog::open(config).unwrap()));
            state.fairness = fairness::Fairness::new(fairness::FairnessConfig {
                client_qps: 0.01,
                client_burst: 5,
                ..Default::default()
            });
        })
        .await;
        let url = format!("https://{}/api/v1/namespaces/default/pods", api.addr);
        let ok = api.http.get(&url).bearer_auth("t").send().await.unwrap();
        assert_eq!(ok.status(), 200);
        let wrong = api.http.get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let none = api.http.get(&url).send().await.unwrap();
        assert_eq!(none.status(), 401);
        let secret = format!(
            "https://{}/api/v1/namespaces/kube-system/secrets/x",
            api.addr
        );
        let del = api.http.delete(&secret).bearer_auth("nope").send().await;
        assert_eq!(del.unwrap().status(), 401);
        let version = format!("https://{}/apis", api.addr);
        let other = api.http.get(&version).bearer_auth("nope").send().await;
        assert_eq!(other.unwrap().status(), 401);
        // Once the address's burst of 5 is spent, more bad tokens are 429 and left out.
        let mut codes = Vec::new();
        for _ in 0..20 {
            let r = api.http.get(&url).bearer_auth("nope").send().await.unwrap();
            codes.push(r.status().as_u16());
        }
        assert_eq!(codes[0], 401, "{codes:?}");
        assert!(codes[1..].iter().all(|c| *c == 429), "{codes:?}");
        let text = std::fs::read_to_string(&log_path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(lines[0]["user"], "system:admin", "{}", lines[0]);
        assert_eq!(lines[0]["code"], 200);
        for l in &lines[1..] {
            assert_eq!(l["user"], "", "{l}");
            assert_eq!(l["groups"], serde_json::json!([]), "{l}");
            assert_eq!(l["code"], 401, "{l}");
            assert_eq!(l["source_ip"], "127.0.0.1", "{l}");
        }
        assert_eq!(
            (
                &lines[1]["verb"],
                &lines[1]["resource"],
                &lines[1]["namespace"]
            ),
            (&"list".into(), &"pods".into(), &"default".into())
        );
        assert_eq!(lines[2]["verb"], "list");
        assert_eq!(
            (&lines[3]["verb"], &lines[3]["resource"], &lines[3]["name"]),
            (&"delete".into(), &"secrets".into(), &"x".into())
        );
        assert_eq!(lines[3]["namespace"], "kube-system");
        assert_eq!(
            (&lines[4]["verb"], &lines[4]["resource"]),
            (&"get".into(), &"/apis".into())
        );
        let _ = api.stop.send(());
        api.server.await.unwrap().unwrap();
    }

    /// An authorizer allowing only the `impersonate` requests listed, as (resource,
    /// subresource, name).
    struct Allow(Vec<(&'static str, Option<&'static str>, &'static str)>);

    impl auth::Authorizer for Allow {
        fn authorize(&self, _: &auth::UserInfo, attrs: &auth::Attributes) -> auth::Decision {
            let auth::Attributes::Resource(r) = attrs else {
                return auth::Decision::NoOpinion;
            };
            let group_ok = match r.resource.as_str() {
                "uids" | "userextras" => r.group == "authentication.k8s.io",
                _ => r.group.is_empty(),
            };
            let listed = self.0.iter().any(|(res, sub, name)| {
                r.resource == *res
                    && r.subresource.as_deref() == *sub
                    && r.name.as_deref() == Some(*name)
            });
            if r.verb == "impersonate" && group_ok && listed {
                auth::Decision::Allow
            } else {
                auth::Decision::NoOpinion
            }
        }
    }

    /// `Impersonate-Uid` and `Impersonate-Extra-KEY` need `impersonate` on `uids` and on
    /// `userextras/KEY` (each value), as Kubernetes; without a user they are refused.
    #[test]
    fn uids_and_extras_are_impersonated_only_when_allowed() {
        let mut h = http::HeaderMap::new();
        h.insert("impersonate-user", HeaderValue::from_static("alice"));
        h.insert("impersonate-uid", HeaderValue::from_static("1234"));
        h.append("impersonate-extra-scopes", HeaderValue::from_static("view"));
        h.append("impersonate-extra-scopes", HeaderValue::from_static("edit"));
        h.insert(
            "impersonate-extra-example.com%2fteam",
            HeaderValue::from_static("blue"),
        );
        let wanted = impersonation_request(&h).unwrap().unwrap();
        assert_eq!(wanted.uid.as_deref(), Some("1234"));
        assert_eq!(wanted.extra["scopes"], vec!["view", "edit"]);
        assert_eq!(wanted.extra["example.com/team"], vec!["blue"]);
        let me = auth::UserInfo {
            name: "bob".into(),
            ..Default::default()
        };
        let all = vec![
            ("users", None, "alice"),
            ("uids", None, "1234"),
            ("userextras", Some("scopes"), "view"),
            ("userextras", Some("scopes"), "edit"),
            ("userextras", Some("example.com/team"), "blue"),
        ];
        let acted = impersonate(&Allow(all.clone()), &me, wanted.clone()).unwrap();
        assert_eq!(acted.name, "alice");
        assert_eq!(acted.uid.as_deref(), Some("1234"));
        assert_eq!(acted.extra, wanted.extra);
        assert!(acted.groups.iter().any(|g| g == auth::AUTHENTICATED));
        // Each of them missing is a 403 naming it.
        for missing in 0..all.len() {
            let mut some = all.clone();
            let (res, sub, _) = some.remove(missing);
            let e = impersonate(&Allow(some), &me, wanted.clone()).unwrap_err();
            assert_eq!(e.code, 403);
            let what = match sub {
                Some(s) => format!("{res}/{s}"),
                None => res.to_string(),
            };
            assert!(e.message.contains(&what), "{what}: {}", e.message);
        }
        // A uid or an extra without a user.
        let mut h = http::HeaderMap::new();
        h.insert("impersonate-uid", HeaderValue::from_static("1234"));
        assert_eq!(impersonation_request(&h).unwrap_err().code, 400);
        let mut h = http::HeaderMap::new();
        h.insert("impersonate-extra-scopes", HeaderValue::from_static("x"));
        assert_eq!(impersonation_request(&h).unwrap_err().code, 400);
    }

    /// A client that closes a watch releases it on the server, even when no event would have
    /// matched its selector.
    #[tokio::test]
    async fn a_closed_selector_watch_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let api = start(dir.path()).await;
        let before = api.store.watchers();
        let url = format!(
            "https://{}/api/v1/namespaces/default/configmaps?watch=true&labelSelector=nomatch%3Dx",
            api.addr
        );
        for _ in 0..20 {
            let resp = api.http.get(&url).bearer_auth("t").send().await.unwrap();
            assert!(resp.status().is_success());
            drop(resp);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while api.store.watchers() != before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the closed watches to go: {} open, {before} before",
                api.store.watchers()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = api.stop.send(());
        api.server.await.unwrap().unwrap();
    }

    /// A write waiting for its disk flush must not stall other requests: the store's work
    /// runs off the async threads. The runtime here has a single thread, so a handler that
    /// blocked it would hold every other request until the flush ends.
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_waiting_on_disk_does_not_block_reads() {
        let dir = tempfile::tempdir().unwrap();
        let Api {
            store,
            addr,
            http,
            stop,
            server,
            _rbac,
        } = start(dir.path()).await;
        // The next flush waits until the test has its answer (or 5 s passed).
        let released = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        {
            let (released, timed_out) = (released.clone(), timed_out.clone());
            store.set_flush_hook(move |_, _| {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !released.load(Ordering::SeqCst) {
                    if std::time::Instant::now() >= deadline {
                        timed_out.store(true, Ordering::SeqCst);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        let base = format!("https://{addr}/api/v1/namespaces/default/configmaps");
        let write = {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                http.post(&base)
                    .bearer_auth("t")
                    .json(&serde_json::json!({"metadata": {"name": "slow"}}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        };
        // The write is in its flush once the hook runs: wait for it to have been applied.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.applied_revision() == store.revision() && !timed_out.load(Ordering::SeqCst) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the write never reached the store"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let list = http
            .get(&base)
            .bearer_auth("t")
            .send()
            .await
            .unwrap()
            .status();
        released.store(true, Ordering::SeqCst);
        assert!(list.is_success());
        assert!(
            !timed_out.load(Ordering::SeqCst),
            "the list was answered only after the write's flush ended"
        );
        assert!(write.await.unwrap().is_success());
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
