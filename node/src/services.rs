//! The agent's side of the service proxy: the wasm HTTP endpoints this node serves, so the
//! proxy can hand them requests in-process instead of opening a socket to the pod.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use skiff_proxy::{Body, BoxError, BoxFuture, InProcess, LocalHttp};
use skiff_wasm::Handler;

/// Pod address and port → the component serving there.
#[derive(Default)]
pub struct LocalEndpoints {
    map: RwLock<HashMap<SocketAddr, Arc<dyn InProcess>>>,
}

impl LocalEndpoints {
    pub fn insert(&self, addr: SocketAddr, handler: Handler) {
        self.map
            .write()
            .expect("local endpoints")
            .insert(addr, Arc::new(WasmEndpoint(handler)));
    }

    pub fn remove(&self, addr: SocketAddr) {
        self.map.write().expect("local endpoints").remove(&addr);
    }
}

impl LocalHttp for LocalEndpoints {
    fn lookup(&self, addr: SocketAddr) -> Option<Arc<dyn InProcess>> {
        self.map
            .read()
            .expect("local endpoints")
            .get(&addr)
            .cloned()
    }
}

struct WasmEndpoint(Handler);

impl InProcess for WasmEndpoint {
    fn call(&self, req: Request<Body>) -> BoxFuture<Response<Body>> {
        let handler = self.0.clone();
        Box::pin(async move {
            match handler.handle(req).await {
                Ok(resp) => resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
                Err(e) => {
                    tracing::debug!(error = %e, "guest request failed");
                    let mut r = Response::new(
                        Full::new(Bytes::from_static(
                            b"internal error: the wasm guest failed\n",
                        ))
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                    );
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }
            }
        })
    }
}
