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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ClusterConfig;
    use crate::store::sled::SledStore;
    use crate::store::Store;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// An API server over a fresh store in `dir`, and an HTTPS client of it (token `t`).
    struct Api {
        store: Arc<SledStore>,
        addr: SocketAddr,
        http: reqwest::Client,
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(dir: &std::path::Path) -> Api {
        let store = Arc::new(SledStore::open(&dir.join("store")).unwrap());
        let registry = Registry::new(store.clone(), ClusterConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        crate::server::bootstrap(&registry, addr).unwrap();
        let tls = crate::tls::load_or_create(dir, &[addr.ip().to_string()]).unwrap();
        let state = Arc::new(ApiState {
            registry,
            tokens: vec!["t".into()],
            advertise: addr,
        });
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
        }
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
