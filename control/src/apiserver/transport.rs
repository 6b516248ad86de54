//! The API's connections: TLS handshake, header, body and idle timeouts, caps on open
//! connections (per client address and in total, below the open-file limit), and an accept
//! loop that backs off and logs at a bounded rate when `accept` fails.
//!
//! The defaults follow Kubernetes' API server where it has one (`ReadHeaderTimeout` 32 s,
//! `IdleTimeout` 90 s, the 60 s request timeout) and Go's `net/http` accept loop (5 ms doubling
//! to 1 s after a failed accept).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use http_body::{Frame, SizeHint};

/// How long a client has to complete the TLS handshake after its connection is accepted.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's headers, from their first byte on: Kubernetes'
/// `ReadHeaderTimeout` (against headers trickled a byte at a time).
pub const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(32);
/// How long a client has to send a request's body, from its headers on: Kubernetes' default
/// request timeout (against bodies trickled a byte at a time).
pub const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a kept-alive connection may wait for its next request: Kubernetes' `IdleTimeout`,
/// which matches the keep-alive of Go's HTTP clients. A connection with a request in flight
/// (a watch) is never idle.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(90);
/// Open connections at most, when the open-file limit allows more (`--max-connections`).
pub const MAX_CONNECTIONS: usize = 10_000;
/// Open connections at most from one client address (`--max-connections-per-client`).
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 1_000;
/// File descriptors kept for everything but client connections (store, node agents, logs)
/// when the connection cap is derived from the open-file limit.
pub const FD_RESERVE: u64 = 1_024;
/// The first wait after a failed `accept`, doubled on each further failure...
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// ...up to this.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per kind of connection trouble in this interval, with a count.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How the API server treats connections.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub tls_handshake_timeout: Duration,
    pub request_header_timeout: Duration,
    pub request_body_timeout: Duration,
    pub idle_timeout: Duration,
    /// Open connections at most; `None` derives it from the open-file limit
    /// ([`connection_cap`]).
    pub max_connections: Option<usize>,
    pub max_connections_per_client: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            request_header_timeout: REQUEST_HEADER_TIMEOUT,
            request_body_timeout: REQUEST_BODY_TIMEOUT,
            idle_timeout: IDLE_CONNECTION_TIMEOUT,
            max_connections: None,
            max_connections_per_client: MAX_CONNECTIONS_PER_CLIENT,
        }
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit now in effect.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1_024;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return hard,
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit"),
        }
    }
    soft
}

/// The connection cap for an open-file limit of `fd_limit`: [`MAX_CONNECTIONS`], or less when
/// the limit minus [`FD_RESERVE`] is lower (but at least half the limit).
pub fn connection_cap(fd_limit: u64) -> usize {
    let room = fd_limit.saturating_sub(FD_RESERVE).max(fd_limit / 2);
    usize::try_from(room)
        .unwrap_or(usize::MAX)
        .min(MAX_CONNECTIONS)
}

/// The wait after failed accepts: [`ACCEPT_BACKOFF_MIN`] doubling to [`ACCEPT_BACKOFF_MAX`],
/// back to the start after a success.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    last: Option<Duration>,
}

impl AcceptBackoff {
    /// An accept failed: how long to wait before the next.
    pub fn failed(&mut self) -> Duration {
        let next = match self.last {
            None => ACCEPT_BACKOFF_MIN,
            Some(d) => (d * 2).min(ACCEPT_BACKOFF_MAX),
        };
        self.last = Some(next);
        next
    }

    pub fn succeeded(&mut self) {
        self.last = None;
    }
}

/// Lets one log line through per interval: [`RateLimitedLog::hit`] answers how many events
/// the line stands for (this one and those held back since the last line).
#[derive(Debug)]
pub struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    held: u64,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            last: None,
            held: 0,
        }
    }

    /// One more event at `now`: `Some(count)` when a line is due.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.held += 1;
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerClient,
}

/// Counts open connections, in total and per client address.
#[derive(Debug)]
pub struct ConnectionLimits {
    total: usize,
    per_client: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(total: usize, per_client: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            total,
            per_client,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.total {
            return Err(Refused::Total);
        }
        let mine = open.1.entry(ip).or_insert(0);
        if *mine >= self.per_client {
            return Err(Refused::PerClient);
        }
        *mine += 1;
        open.0 += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// The address a request's connection comes from, in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Requests in flight on one connection and when the last one ended: a connection is idle
/// when none is in flight.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<tokio::time::Instant>,
    /// Told when a request ends.
    done: tokio::sync::Notify,
}

impl Activity {
    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the connection will have been idle for `idle`, if nothing is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<tokio::time::Instant> {
        (self.in_flight.load(Ordering::SeqCst) == 0)
            .then(|| *self.last_done.lock().unwrap_or_else(|e| e.into_inner()) + idle)
    }
}

/// A request in flight, until its response has been written (its body dropped).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_done.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.done.notify_one();
    }
}

/// A response body that keeps its request counted in flight until it is dropped.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails once its deadline passes, and says so in `timed_out`.
struct Deadline {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body was not received in time",
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// 408 with a `Status`, and the connection closed: the client sent its body too slowly.
fn body_timeout_response() -> Response {
    let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "the request body was not received in time",
        "reason": "Timeout", "code": 408});
    let mut r = crate::apiserver::json_response(StatusCode::REQUEST_TIMEOUT, &status);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Accept-loop trouble, each kind logged at most once per [`LOG_INTERVAL`].
struct Trouble {
    accept: RateLimitedLog,
    refused_total: RateLimitedLog,
    refused_client: RateLimitedLog,
}

/// Serves `app` over TLS on `listener` with the limits of `config` until `shutdown` resolves;
/// open connections (watches included) are closed then.
pub async fn serve(
    app: Router,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: TransportConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let fd_limit = raise_fd_limit();
    let total = config
        .max_connections
        .unwrap_or_else(|| connection_cap(fd_limit));
    if total as u64 > fd_limit {
        tracing::warn!(
            max_connections = total,
            fd_limit,
            "the connection cap is above the open-file limit"
        );
    }
    let limits = ConnectionLimits::new(total, config.max_connections_per_client);
    tracing::debug!(
        max_connections = total,
        per_client = config.max_connections_per_client,
        fd_limit,
        "connection limits"
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.request_header_timeout);
    let config = Arc::new(config);
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    let mut trouble = Trouble {
        accept: RateLimitedLog::new(LOG_INTERVAL),
        refused_total: RateLimitedLog::new(LOG_INTERVAL),
        refused_client: RateLimitedLog::new(LOG_INTERVAL),
    };
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff.succeeded();
                    x
                }
                Err(e) => {
                    // Out of file descriptors (or another failure that a retry at once would
                    // meet again): wait, and say so once per interval.
                    if let Some(n) = trouble.accept.hit(Instant::now()) {
                        tracing::warn!(error = %e, failures = n, "accept failed; backing off");
                    }
                    let wait = backoff.failed();
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    while conns.try_join_next().is_some() {}
                    continue;
                }
            },
        };
        let slot = match limits.admit(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                let (log, what) = match why {
                    Refused::Total => (&mut trouble.refused_total, "open connections"),
                    Refused::PerClient => (&mut trouble.refused_client, "connections per client"),
                };
                if let Some(n) = log.hit(Instant::now()) {
                    tracing::warn!(client = %peer.ip(), refused = n, open = limits.open(),
                        "connections refused: too many {what}");
                }
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, http, config) =
            (acceptor.clone(), app.clone(), http.clone(), config.clone());
        conns.spawn(async move {
            let _slot = slot;
            serve_connection(tcp, peer, acceptor, app, http, &config).await;
        });
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
    Ok(())
}

/// One connection: the handshake, then requests until the client closes it, a timeout cuts
/// it or it stays idle too long.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    http: hyper::server::conn::http1::Builder,
    config: &TransportConfig,
) {
    use tower::ServiceExt;
    let stream =
        match tokio::time::timeout(config.tls_handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
    // The verifier checked the chain to the cluster CA; the subject names the user.
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::tls::subject_of(c))
        .map(
            |(common_name, organizations)| crate::apiserver::auth::PeerCertificate {
                common_name,
                organizations,
            },
        );
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_done: Mutex::new(tokio::time::Instant::now()),
        done: tokio::sync::Notify::new(),
    });
    let body_timeout = config.request_body_timeout;
    let tracker = activity.clone();
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let in_flight = tracker.start();
        let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut req = req.map(|b| {
            let body = Body::new(b);
            if body.is_end_stream() {
                body
            } else {
                Body::new(Deadline {
                    inner: body,
                    sleep: Box::pin(tokio::time::sleep(body_timeout)),
                    timed_out: timed_out.clone(),
                })
            }
        });
        req.extensions_mut().insert(PeerAddr(peer));
        if let Some(p) = &cert {
            req.extensions_mut().insert(p.clone());
        }
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await?;
            let resp = if timed_out.load(Ordering::SeqCst) {
                body_timeout_response()
            } else {
                resp
            };
            Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                Body::new(Tracked {
                    inner,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let (back, mut closed) = tokio::sync::oneshot::channel();
    let stream = Linger {
        inner: Some(stream),
        shut: false,
        back: Some(back),
    };
    let mut conn = Box::pin(
        http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .with_upgrades(),
    );
    loop {
        // Busy: wait for a request to end (a permit is stored if one ended meanwhile). Idle:
        // wait for the idle timeout, then close unless a request came since.
        match activity.idle_deadline(config.idle_timeout) {
            None => tokio::select! {
                _ = &mut conn => break,
                _ = activity.done.notified() => {}
            },
            Some(at) => tokio::select! {
                _ = &mut conn => break,
                _ = tokio::time::sleep_until(at) => {
                    if activity
                        .idle_deadline(config.idle_timeout)
                        .is_some_and(|at| at <= tokio::time::Instant::now())
                    {
                        return;
                    }
                }
            },
        }
    }
    // Dropping the connection drops the stream in it, unless an upgrade (exec, a watch over
    // a websocket) took it on.
    drop(conn);
    if let Ok(stream) = closed.try_recv() {
        linger(stream).await;
    }
}

/// How long a connection hyper closed after its last response is read from before it is
/// closed: Go's `net/http` waits 500 ms (`rstAvoidanceDelay`) for the same reason.
const LINGER: Duration = Duration::from_secs(1);

/// The client may still be sending a request the server answered without reading it all (a
/// 413 for a body past the limit). Closing a socket with unread data sends a reset, and a
/// reset can reach the client before it has read the answer, which is then lost (curl reports
/// the `100 Continue` it had). The writing side is already shut (TLS `close_notify`, TCP
/// `FIN`), so the client sees the answer's end; what it still sends is read and dropped until
/// it closes too, or for [`LINGER`] at most.
async fn linger(stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>) {
    use tokio::io::AsyncReadExt;
    let (mut tcp, _) = stream.into_inner();
    let mut buf = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The connection's stream as hyper uses it. Once hyper has shut down the writing side (its
/// last response sent), dropping it hands the stream back to [`serve_connection`] to
/// [`linger`]; a stream dropped unshut (a timeout cut the connection) just closes.
struct Linger<S> {
    inner: Option<S>,
    shut: bool,
    back: Option<tokio::sync::oneshot::Sender<S>>,
}

impl<S: Unpin> Linger<S> {
    fn inner(&mut self) -> Pin<&mut S> {
        Pin::new(
            self.inner
                .as_mut()
                .expect("the stream is only taken on drop"),
        )
    }
}

impl<S> Drop for Linger<S> {
    fn drop(&mut self) {
        if let (true, Some(s), Some(back)) = (self.shut, self.inner.take(), self.back.take()) {
            let _ = back.send(s);
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Linger<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.inner().poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Linger<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.inner().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = self.inner().poll_shutdown(cx);
        if r.is_ready() {
            self.shut = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_from_5ms_to_1s_and_resets_on_success() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u128> = (0..10).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn the_log_lets_one_line_through_per_interval_with_the_count() {
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.hit(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(log.hit(t0 + Duration::from_millis(i)), None);
        }
        // The next line counts the 999 held back and itself.
        assert_eq!(log.hit(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(log.hit(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.hit(t0 + Duration::from_secs(25)), Some(2));
    }

    #[test]
    fn the_connection_cap_stays_below_the_open_file_limit() {
        assert_eq!(connection_cap(1_048_576), MAX_CONNECTIONS);
        assert_eq!(connection_cap(20_000), MAX_CONNECTIONS);
        assert_eq!(connection_cap(4_096), 4_096 - FD_RESERVE as usize);
        assert_eq!(connection_cap(1_024), 512);
        assert_eq!(connection_cap(0), 0);
    }

    #[test]
    fn connections_are_capped_per_client_and_in_total() {
        let limits = ConnectionLimits::new(5, 3);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let mut held: Vec<_> = (0..3).map(|_| limits.admit(a).unwrap()).collect();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::PerClient);
        held.push(limits.admit(b).unwrap());
        held.push(limits.admit(b).unwrap());
        assert_eq!(limits.admit(c).unwrap_err(), Refused::Total);
        assert_eq!(limits.open(), 5);
        // A closed connection frees its place, for its client and in total.
        held.remove(0);
        assert_eq!(limits.open(), 4);
        held.push(limits.admit(a).unwrap());
        drop(held);
        assert_eq!(limits.open(), 0);
        assert!(limits.open.lock().unwrap().1.is_empty());
    }
}
