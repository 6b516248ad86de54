//! The Kubernetes-compatible HTTP API: discovery, CRUD, watch, subresources, `Status` errors.
//!
//! Paths are parsed by hand ([`path::ApiPath`]) because Kubernetes' URL space (namespaces being
//! both a resource and a scope) does not fit a route table well.

mod discovery;
mod handlers;
mod nodeproxy;
pub mod path;

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
    /// Bearer tokens accepted.
    pub tokens: Vec<String>,
    /// The address clients should use (for the `kubernetes` endpoints and discovery).
    pub advertise: SocketAddr,
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

async fn auth_then_dispatch(State(state): State<Shared>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_string();
    let public = matches!(
        path.as_str(),
        "/healthz" | "/livez" | "/readyz" | "/version"
    );
    if !public {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| state.tokens.iter().any(|k| k == t.trim()));
        if !ok {
            return error_response(&ApiError::unauthorized());
        }
    }
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let resp = handlers::dispatch(state, req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    resp
}

/// The router of the whole API.
pub fn router(state: Shared) -> Router {
    Router::new().fallback(auth_then_dispatch).with_state(state)
}

/// Serves the API over TLS on `listener` until `shutdown` resolves; open connections
/// (watches included) are closed then.
pub async fn serve(
    state: Shared,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let app = router(state);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        conns.spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                app.clone().oneshot(req.map(Body::new))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
    Ok(())
}
