//! Serving one frontend: accept, then either HTTP/1 balanced per request (with the
//! in-process fast path for wasm endpoints on this node) or TCP balanced per connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::balance::{Affinity, Backend, Route, EJECT_TIMED_OUT_FOR};
use crate::table::Mode;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An HTTP endpoint served inside this process (a wasm component): the proxy hands it the
/// request instead of opening a socket to the pod.
pub trait InProcess: Send + Sync {
    fn call(&self, req: Request<Body>) -> BoxFuture<Response<Body>>;
}

/// Which endpoint addresses this node serves in-process.
pub trait LocalHttp: Send + Sync + 'static {
    fn lookup(&self, addr: SocketAddr) -> Option<Arc<dyn InProcess>>;
}

/// How long a connection to an endpoint may take before the endpoint is ejected and the next
/// one tried: past one lost SYN (retransmitted after 1 s) on a slow link, short enough that a
/// request to a pod on a node that went dark moves on quickly.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long an undeclared port waits for the client's first bytes before treating the
/// connection as plain TCP (protocols where the server speaks first).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(300);
/// Endpoints tried for one request or connection.
const MAX_TRIES: usize = 3;

/// One listening address and its current endpoints.
pub struct FrontendState {
    pub service: String,
    pub mode: Mode,
    route: RwLock<Arc<Route>>,
    affinity: Option<Affinity>,
}

impl FrontendState {
    pub fn new(service: String, mode: Mode, route: Route, affinity: Option<Duration>) -> Self {
        FrontendState {
            service,
            mode,
            route: RwLock::new(Arc::new(route)),
            affinity: affinity.map(Affinity::new),
        }
    }

    pub fn route(&self) -> Arc<Route> {
        self.route.read().expect("route").clone()
    }

    pub fn set_route(&self, route: Route) {
        *self.route.write().expect("route") = Arc::new(route);
    }

    fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let route = self.route();
        match &self.affinity {
            Some(a) => a.pick(&route, client, tried),
            None => route.pick(tried),
        }
    }
}

/// The data path's threads: one single-threaded runtime per core, each accepting on its own
/// socket of every frontend (`SO_REUSEPORT`: the kernel spreads connections). A connection,
/// its requests and its upstream connections stay on one thread, as in nginx's workers, so
/// no request crosses threads on its way through.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    pub fn start(n: usize) -> Workers {
        let mut handles = Vec::new();
        let mut stop = Vec::new();
        for i in 0..n.max(1) {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a proxy thread");
                    continue;
                }
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            handles.push(rt.handle().clone());
            let spawned = std::thread::Builder::new()
                .name(format!("skiff-proxy-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = rx.await;
                    })
                });
            match spawned {
                Ok(_) => stop.push(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a proxy thread");
                    handles.pop();
                }
            }
        }
        Workers { handles, stop }
    }

    /// Listens on `addr` on every thread; returns the accept loops.
    pub fn listen(
        &self,
        addr: SocketAddr,
        fe: &Arc<FrontendState>,
        local: &Arc<dyn LocalHttp>,
    ) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut loops = Vec::new();
        for h in &self.handles {
            let listener = {
                // Registered with the thread's own reactor.
                let _in = h.enter();
                bind(addr, self.handles.len() > 1)
            };
            match listener {
                Ok(l) => loops.push(h.spawn(accept(l, fe.clone(), local.clone()))),
                Err(e) => {
                    for l in loops {
                        l.abort();
                    }
                    return Err(e);
                }
            }
        }
        if loops.is_empty() {
            // No data-path thread could start: serve from the caller's runtime.
            loops.push(tokio::spawn(accept(
                bind(addr, false)?,
                fe.clone(),
                local.clone(),
            )));
        }
        Ok(loops)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
    }
}

/// Binds a frontend's listening socket (with a backlog for bursts of clients).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Accepts on `listener` until the task is aborted. Connections already accepted keep going.
async fn accept(listener: TcpListener, fe: Arc<FrontendState>, local: Arc<dyn LocalHttp>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(service = %fe.service, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(tcp, peer, fe.clone(), local.clone()));
    }
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
    b"TRACE ",
    b"CONNECT ",
];

/// Whether the first bytes of a connection start an HTTP/1 request.
pub fn looks_like_http(first: &[u8]) -> bool {
    !first.is_empty()
        && METHODS.iter().any(|m| {
            let n = first.len().min(m.len());
            first[..n] == m[..n]
        })
}

async fn sniff(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 8];
    match tokio::time::timeout(SNIFF_TIMEOUT, tcp.peek(&mut buf)).await {
        Ok(Ok(n)) => looks_like_http(&buf[..n]),
        _ => false,
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    fe: Arc<FrontendState>,
    local: Arc<dyn LocalHttp>,
) {
    let _ = tcp.set_nodelay(true);
    let http = match fe.mode {
        Mode::Http => true,
        Mode::Tcp => false,
        Mode::Auto => sniff(&tcp).await,
    };
    if http {
        let upstreams = Arc::new(Upstreams::default());
        let svc = hyper::service::service_fn(move |req| {
            let fe = fe.clone();
            let local = local.clone();
            let upstreams = upstreams.clone();
            async move { Ok::<_, Infallible>(forward(&fe, &*local, peer.ip(), req, &upstreams).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(tcp), svc)
            .with_upgrades()
            .await;
    } else {
        splice(tcp, peer, &fe).await;
    }
}

/// Plain TCP: one endpoint per connection, bytes copied both ways.
async fn splice(mut tcp: TcpStream, peer: SocketAddr, fe: &FrontendState) {
    let mut tried = Vec::new();
    while tried.len() < MAX_TRIES {
        let Some(b) = fe.pick(peer.ip(), &tried) else {
            return;
        };
        let _flight = b.begin();
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(b.addr)).await {
            Ok(Ok(mut up)) => {
                let _ = up.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
                return;
            }
            Ok(Err(_)) => {
                tracing::debug!(service = %fe.service, endpoint = %b.addr, "endpoint refused; trying another");
                b.eject();
                tried.push(b.addr);
            }
            Err(_) => {
                tracing::debug!(service = %fe.service, endpoint = %b.addr, "endpoint timed out; trying another");
                b.eject_for(EJECT_TIMED_OUT_FOR);
                tried.push(b.addr);
            }
        }
    }
}

fn text(code: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn boxed(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), those named by `Connection` included.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// The parts of a request that can be sent again (bodiless requests with an idempotent
/// method), for when a pooled connection closes under the request.
struct Replay {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(req: &Request<Body>) -> Replay {
        Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn request(&self) -> Request<Body> {
        let mut r = Request::new(empty());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// The upstream connections one client connection used last, by endpoint. An HTTP/1 client
/// sends its next request only after reading the whole previous answer, so the connection
/// that carried it is free again: reusing it skips the shared pool. Handed back to the
/// endpoints' pools when the client goes.
#[derive(Default)]
pub struct Upstreams(Mutex<Vec<(Arc<Backend>, Sender)>>);

impl Upstreams {
    fn take(&self, addr: SocketAddr) -> Option<Sender> {
        let mut v = self.0.lock().expect("upstreams");
        let i = v.iter().position(|(b, _)| b.addr == addr)?;
        Some(v.swap_remove(i).1)
    }

    fn put(&self, b: Arc<Backend>, s: Sender) {
        self.0.lock().expect("upstreams").push((b, s));
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        for (b, s) in self.0.get_mut().expect("upstreams").drain(..) {
            if !s.is_closed() {
                b.put_idle(s);
            }
        }
    }
}

/// Why a connection to an endpoint failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Failed(BoxError),
}

async fn connect(
    b: &Backend,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, ConnectError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(b.addr))
        .await
        .map_err(|_| ConnectError::TimedOut(CONNECT_TIMEOUT))?
        .map_err(|e| ConnectError::Failed(e.into()))?;
    connected(tcp).await.map_err(ConnectError::Failed)
}

async fn connected(
    tcp: TcpStream,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, BoxError> {
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// One HTTP request: pick an endpoint, serve it in-process or send it over a pooled
/// connection; a refused connection moves the request to another endpoint.
pub async fn forward(
    fe: &FrontendState,
    local: &dyn LocalHttp,
    client: IpAddr,
    mut req: Request<Incoming>,
    upstreams: &Upstreams,
) -> Response<Body> {
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let xff = match req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {client}"),
        None => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        req.headers_mut().insert("x-forwarded-for", v);
    }
    let replayable = !upgrade
        && req.body().is_end_stream()
        && matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        );
    // Kept once the request goes over a socket (requests served in-process never need it).
    let mut replay: Option<Replay> = None;
    let mut pending = Some(req.map(boxed));
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_error = String::new();
    for _ in 0..MAX_TRIES + 1 {
        let Some(b) = fe.pick(client, &tried) else {
            break;
        };
        let Some(req) = pending
            .take()
            .or_else(|| replay.as_ref().map(Replay::request))
        else {
            break;
        };
        let flight = b.begin();
        if !upgrade {
            if let Some(h) = local.lookup(b.addr) {
                let resp = h.call(req).await;
                drop(flight);
                return resp;
            }
        }
        let reused = match upstreams.take(b.addr).or_else(|| b.take_idle()) {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reused {
            Some(s) => s,
            None => match connect(&b).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(service = %fe.service, endpoint = %b.addr, error = %e, "endpoint unreachable; trying another");
                    last_error = format!("{}: {e}", b.addr);
                    match e {
                        ConnectError::TimedOut(_) => b.eject_for(EJECT_TIMED_OUT_FOR),
                        ConnectError::Failed(_) => b.eject(),
                    }
                    tried.push(b.addr);
                    pending = Some(req);
                    continue;
                }
            },
        };
        if replayable && replay.is_none() {
            replay = Some(Replay::of(&req));
        }
        match sender.try_send_request(req).await {
            Ok(mut resp) => {
                drop(flight);
                if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let up = hyper::upgrade::on(&mut resp);
                    if let Some(down) = client_upgrade {
                        tokio::spawn(async move {
                            if let (Ok(a), Ok(b)) = (down.await, up.await) {
                                let _ = tokio::io::copy_bidirectional(
                                    &mut TokioIo::new(a),
                                    &mut TokioIo::new(b),
                                )
                                .await;
                            }
                        });
                    }
                    return resp.map(boxed);
                }
                upstreams.put(b.clone(), sender);
                let mut resp = resp.map(boxed);
                strip_hop_by_hop(resp.headers_mut(), false);
                return resp;
            }
            Err(mut e) => {
                last_error = format!("{}: {}", b.addr, e.error());
                match e.take_message() {
                    // Never sent (the pooled connection had closed): send it again.
                    Some(r) => pending = Some(r),
                    None if replay.is_some() => tried.push(b.addr),
                    None => break,
                }
            }
        }
    }
    if fe.route().backends.is_empty() {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no endpoints available for service {}\n", fe.service),
        )
    } else {
        text(
            StatusCode::BAD_GATEWAY,
            format!(
                "no endpoint of service {} answered: {last_error}\n",
                fe.service
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct NoLocal;

    impl LocalHttp for NoLocal {
        fn lookup(&self, _: SocketAddr) -> Option<Arc<dyn InProcess>> {
            None
        }
    }

    /// A loopback address that never completes a connection, as an endpoint on a node that
    /// went dark: a listener with a backlog of one that never accepts, its one slot taken.
    async fn blackhole() -> (TcpListener, SocketAddr, TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let filler = TcpStream::connect(addr).await.unwrap();
        (listener, addr, filler)
    }

    /// An endpoint answering every HTTP/1 request with `ok`.
    async fn answering() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        match c.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if c.write_all(ok).await.is_err() || head.contains("connection: close")
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// A frontend in `mode` over `endpoints`, accepting on a loopback port.
    async fn frontend(mode: Mode, endpoints: &[SocketAddr]) -> (Arc<FrontendState>, SocketAddr) {
        let route = Route::new(
            endpoints
                .iter()
                .map(|a| Arc::new(Backend::new(*a)))
                .collect(),
        );
        let fe = Arc::new(FrontendState::new("web".into(), mode, route, None));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let local: Arc<dyn LocalHttp> = Arc::new(NoLocal);
        tokio::spawn(accept(l, fe.clone(), local));
        (fe, addr)
    }

    async fn get(proxy: SocketAddr) -> String {
        let mut c = TcpStream::connect(proxy).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn an_endpoint_that_times_out_is_ejected_and_the_request_retried() {
        for mode in [Mode::Http, Mode::Tcp] {
            let (_hole, dark, _filler) = blackhole().await;
            let good = answering().await;
            let (fe, proxy) = frontend(mode, &[dark, good]).await;
            // The first pick is the dark endpoint (first in turn, all idle).
            let t = std::time::Instant::now();
            let answer = get(proxy).await;
            let took = t.elapsed();
            assert!(answer.starts_with("HTTP/1.1 200"), "{mode:?}: {answer:?}");
            assert!(answer.ends_with("ok"), "{mode:?}: {answer:?}");
            assert!(
                took >= CONNECT_TIMEOUT && took < CONNECT_TIMEOUT + Duration::from_secs(1),
                "{mode:?}: the retry came after the connect timeout, not later: {took:?}"
            );
            let route = fe.route();
            assert!(route.get(dark).unwrap().is_ejected(), "{mode:?}");
            assert!(!route.get(good).unwrap().is_ejected(), "{mode:?}");
            // Ejected: the next requests go straight to the endpoint that answers.
            for _ in 0..3 {
                let t = std::time::Instant::now();
                assert!(get(proxy).await.starts_with("HTTP/1.1 200"));
                assert!(
                    t.elapsed() < Duration::from_millis(500),
                    "{mode:?}: {:?}",
                    t.elapsed()
                );
            }
        }
    }

    #[tokio::test]
    async fn a_refused_endpoint_is_ejected_briefly_and_a_dark_one_longer() {
        let b = Backend::new("127.0.0.1:9".parse().unwrap());
        b.eject_for(crate::balance::EJECT_TIMED_OUT_FOR);
        b.eject();
        assert!(
            b.is_ejected(),
            "a shorter ejection does not cut a longer one"
        );
        // Every endpoint dark: the request is still tried on each, then answered 502.
        let (_hole, dark, _filler) = blackhole().await;
        let (_fe, proxy) = frontend(Mode::Http, &[dark]).await;
        let answer = get(proxy).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer:?}");
        assert!(answer.contains("timed out"), "{answer:?}");
    }

    #[test]
    fn http_request_lines_are_recognised() {
        assert!(looks_like_http(b"GET / HTTP/1.1"));
        assert!(looks_like_http(b"POST /x"));
        assert!(
            looks_like_http(b"DEL"),
            "a short first segment that may be DELETE"
        );
        assert!(
            !looks_like_http(b"PRI * HTTP/2.0"),
            "h2 prior knowledge goes as TCP"
        );
        assert!(!looks_like_http(b"\x16\x03\x01"), "TLS goes as TCP");
        assert!(!looks_like_http(b"GETX"));
        assert!(!looks_like_http(b""));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("web"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::HOST));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }
}
