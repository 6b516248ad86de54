//! Serving a wasi:http component: a hyper HTTP/1.1 server on the pod's address, a fresh
//! instance per request from the pooling allocator. A request that traps or passes its CPU
//! deadline is answered 500; the server keeps serving.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use crate::host::{GuestConfig, Host, Outputs};
use crate::{Inner, Program, Runtime, WasmError, EPOCH_TICK};

/// A running HTTP service. Dropping it stops accepting and closes its connections at once;
/// [`HttpServer::shutdown`] lets requests in progress finish first.
pub struct HttpServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    closing: tokio::sync::watch::Sender<bool>,
    stats: Arc<Stats>,
    handler: Handler,
}

#[derive(Default)]
struct Stats {
    served: AtomicU64,
    failed: AtomicU64,
}

/// How long [`HttpServer::shutdown`] waits for requests in progress.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

impl HttpServer {
    /// Stops accepting (the listening socket is closed at once, so its address can be given
    /// to someone else), lets requests in progress finish, closes idle keep-alive
    /// connections, and returns when all are done or after a few seconds.
    pub async fn shutdown(mut self) {
        let _ = self.closing.send(true);
        if tokio::time::timeout(DRAIN, &mut self.task).await.is_err() {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    /// The handler this server calls: the same component and guest configuration, for
    /// callers that serve requests without the socket (the service proxy).
    pub fn handler(&self) -> Handler {
        self.handler.clone()
    }

    /// Requests answered, and those answered 500 because the guest failed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.stats.served.load(Ordering::Relaxed),
            self.stats.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request against a pre-instantiated component: the reusable part of the HTTP path
/// (the service proxy's in-process fast path calls it too).
#[derive(Clone)]
pub struct Handler {
    pre: ProxyPre<Host>,
    /// The program stays loaded (shared with later loads of its binary) while served.
    _program: Arc<Inner>,
    config: Arc<GuestConfig>,
    outputs: Outputs,
}

fn plain(code: StatusCode, msg: &str) -> Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from(msg.to_string()))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = code;
    r
}

impl Handler {
    /// Serves one request with a fresh instance. Any request body type will do: hyper's own
    /// from the pod's listener, or the service proxy's in-process one.
    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<HyperOutgoingBody>, WasmError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let mut host = Host::new(&self.config, &self.outputs, false)?;
        let req = req.map(|b| b.map_err(|e| ErrorCode::InternalError(Some(e.to_string()))));
        let incoming = host
            .http()
            .new_incoming_request(Scheme::Http, req)
            .map_err(|e| WasmError::Guest(format!("{e:#}")))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let out = host
            .http()
            .new_response_outparam(tx)
            .map_err(|e| WasmError::Guest(format!("{e:#}")))?;
        let mut store = Store::new(self.pre.engine(), host);
        store.limiter(|h| &mut h.limits);
        let budget = self
            .config
            .request_timeout
            .map(|t| (t.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64)
            .unwrap_or(u64::MAX / 2);
        // A guest running for a tick yields to the other requests of its thread; past its
        // budget it traps (answered 500).
        let mut ticks = 0u64;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            ticks += 1;
            if ticks >= budget {
                Ok(wasmtime::UpdateDeadline::Interrupt)
            } else {
                Ok(wasmtime::UpdateDeadline::Yield(1))
            }
        });
        let pre = self.pre.clone();
        let task = tokio::spawn(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, out)
                .await
        });
        match rx.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(WasmError::Guest(format!(
                "the guest answered with an error: {code:?}"
            ))),
            Err(_) => match task.await {
                Ok(Ok(())) => Err(WasmError::Guest("the guest never set a response".into())),
                Ok(Err(e)) => Err(WasmError::Guest(format!("{e:#}"))),
                Err(e) => Err(WasmError::Guest(e.to_string())),
            },
        }
    }
}

impl Runtime {
    /// The request handler of an HTTP program.
    pub fn handler(&self, program: &Program, config: GuestConfig) -> Result<Handler, WasmError> {
        match &*program.inner {
            Inner::Http(pre) => Ok(Handler {
                pre: pre.clone(),
                _program: program.inner.clone(),
                outputs: Outputs::of(&config)?,
                config: Arc::new(config),
            }),
            _ => Err(WasmError::Guest("not an HTTP component".into())),
        }
    }

    /// Serves `program` on `listener` until the returned server is dropped.
    pub fn serve_http(
        &self,
        program: &Program,
        config: GuestConfig,
        listener: TcpListener,
    ) -> Result<HttpServer, WasmError> {
        let handler = self.handler(program, config)?;
        let served = handler.clone();
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let (closing, mut closed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let tcp = tokio::select! {
                    _ = closed.changed() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                // The connection, and the instances it runs, live on one of the per-core
                // worker threads: no request hops between threads.
                let Ok(tcp) = tcp.into_std() else {
                    continue;
                };
                let handler = handler.clone();
                let st = st.clone();
                let mut closing = closed.clone();
                conns.spawn_on(
                    async move {
                        let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            let handler = handler.clone();
                            let st = st.clone();
                            async move {
                                st.served.fetch_add(1, Ordering::Relaxed);
                                Ok::<_, Infallible>(match handler.handle(req).await {
                                    Ok(r) => r,
                                    Err(e) => {
                                        st.failed.fetch_add(1, Ordering::Relaxed);
                                        tracing::debug!(error = %e, "guest request failed");
                                        plain(
                                            StatusCode::INTERNAL_SERVER_ERROR,
                                            "internal error: the wasm guest failed\n",
                                        )
                                    }
                                })
                            }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                        tokio::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            _ = closing.changed() => {
                                conn.as_mut().graceful_shutdown();
                                let _ = conn.await;
                            }
                        }
                    },
                    &crate::workers::next(),
                );
                while conns.try_join_next().is_some() {}
            }
            drop(listener);
            while conns.join_next().await.is_some() {}
        });
        Ok(HttpServer {
            addr,
            task,
            closing,
            stats,
            handler: served,
        })
    }
}
