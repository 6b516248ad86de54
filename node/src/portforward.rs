//! `pods/{name}/portforward` on the node: TCP connections to a pod's ports, carried over the
//! connection the API server forwards here, in the protocols Kubernetes clients speak:
//!
//! - SPDY/3.1 streams (`portforward.k8s.io`), what kubectl uses: tunnelled in WebSocket
//!   binary messages (subprotocol `SPDY/3.1+portforward.k8s.io`, kubectl's first choice) or
//!   over a plain `Upgrade: SPDY/3.1` (its fallback). Each forwarded connection is a pair of
//!   streams named by the `requestID` header: `error` (the server writes why the connection
//!   failed, then closes it) and `data` (the bytes both ways); the `port` header says where.
//!   Any number of pairs share one connection.
//! - The WebSocket channel protocol (`v4.channel.k8s.io`, or no subprotocol) other clients
//!   use (client-go's WebSocket dialer, kube-rs' `Portforwarder`): one connection per port of
//!   the `ports` query, channel `2i` its data and `2i+1` its errors, each channel's first
//!   message from the server the port in two little-endian bytes.
//!
//! The pod's port is reached as a kubelet does: inside the pod's network namespace on
//! localhost (a pod with OCI containers, whose wasm containers listen there too), else at the
//! pod's address on the node (a wasm-only pod's listeners).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::logs::Body;
use crate::spdy::{self, Frame};

/// The SPDY port-forward protocol's name.
pub const PROTOCOL: &str = "portforward.k8s.io";
/// What kubectl asks for first: SPDY tunnelled in a WebSocket.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The WebSocket channel protocol.
pub const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a pod's ports are.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's address, where its listeners are when it has no network namespace.
    pub ip: Option<Ipv4Addr>,
    /// The pod's network namespace, when it has one.
    pub netns: Option<PathBuf>,
}

impl Target {
    /// A connection to `port` of the pod.
    pub async fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
        match (&self.netns, self.ip) {
            (Some(ns), _) => {
                let ns = ns.clone();
                let (tx, rx) = oneshot::channel();
                // A thread of its own enters the namespace and ends with the connection made,
                // so no pooled thread is left in the pod's namespace.
                std::thread::spawn(move || {
                    let r = (|| -> std::io::Result<std::net::TcpStream> {
                        let f = std::fs::File::open(&ns)?;
                        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                            |e| std::io::Error::other(format!("setns {}: {e}", ns.display())),
                        )?;
                        let s = std::net::TcpStream::connect_timeout(
                            &SocketAddr::from(([127, 0, 0, 1], port)),
                            CONNECT_TIMEOUT,
                        )?;
                        s.set_nonblocking(true)?;
                        Ok(s)
                    })();
                    let _ = tx.send(r);
                });
                let s = rx
                    .await
                    .map_err(|_| std::io::Error::other("connect thread ended"))??;
                TcpStream::from_std(s)
            }
            (None, Some(ip)) => {
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port)))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
            }
            (None, None) => Err(std::io::Error::other("the pod has no address yet")),
        }
    }

    /// What the client is told when `port` cannot be reached, worded as a kubelet does.
    fn failure(&self, port: u16, e: &std::io::Error) -> String {
        let where_ = match (&self.netns, self.ip) {
            (Some(_), _) => format!("localhost:{port} inside the pod's network namespace"),
            (None, Some(ip)) => format!("{ip}:{port}"),
            (None, None) => format!("port {port}"),
        };
        format!(
            "error forwarding port {port} to pod {}/{}, uid {}: failed to connect to {where_}: {e}",
            self.namespace, self.name, self.uid
        )
    }
}

fn reply(code: StatusCode, msg: &str) -> Response<Body> {
    crate::exec::reject(code, msg)
}

/// The ports of a `ports` query (repeated, or comma-separated).
pub fn query_ports(query: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "ports" {
            continue;
        }
        for p in v.split("%2C").flat_map(|p| p.split(',')) {
            match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => return Err(format!("invalid port {p:?}")),
            }
        }
    }
    Ok(ports)
}

/// Answers the upgrade in whichever protocol the client asked for, then forwards.
pub fn serve(target: Target, mut req: Request<hyper::body::Incoming>) -> Response<Body> {
    let upgrade_to = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if upgrade_to.contains("websocket") {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return reply(
                StatusCode::BAD_REQUEST,
                "a WebSocket upgrade needs Sec-WebSocket-Key",
            );
        };
        let offered = crate::exec::offered_protocols(&req);
        let tunnel = offered.iter().any(|p| p == TUNNEL_PROTOCOL);
        let chosen = if tunnel {
            Some(TUNNEL_PROTOCOL)
        } else if offered.iter().any(|p| p == CHANNEL_PROTOCOL) {
            Some(CHANNEL_PROTOCOL)
        } else if offered.iter().any(|p| p == PROTOCOL) {
            Some(PROTOCOL)
        } else if offered.is_empty() {
            None
        } else {
            return reply(
                StatusCode::BAD_REQUEST,
                &format!(
                    "none of the offered port-forward protocols {offered:?} is supported \
                     ({TUNNEL_PROTOCOL}, {CHANNEL_PROTOCOL})"
                ),
            );
        };
        let ports = if tunnel {
            vec![]
        } else {
            match query_ports(req.uri().query().unwrap_or("")) {
                Ok(p) if !p.is_empty() => p,
                Ok(_) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "port-forward over WebSocket channels needs the ports query",
                    )
                }
                Err(e) => return reply(StatusCode::BAD_REQUEST, &e),
            }
        };
        return crate::exec::upgrade_to_websocket(
            &mut req,
            key.as_bytes(),
            chosen,
            move |ws| async move {
                if tunnel {
                    serve_spdy(unwrap_websocket(ws), target).await;
                } else {
                    serve_channels(ws, target, ports).await;
                }
            },
        );
    }
    if upgrade_to.contains("spdy/3.1") {
        let offered: Vec<String> = req
            .headers()
            .get_all("x-stream-protocol-version")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .collect();
        if !offered.is_empty() && !offered.iter().any(|p| p == PROTOCOL) {
            return reply(
                StatusCode::FORBIDDEN,
                &format!(
                    "none of the offered stream protocols {offered:?} is supported ({PROTOCOL})"
                ),
            );
        }
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                serve_spdy(hyper_util::rt::TokioIo::new(upgraded), target).await;
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "SPDY/3.1")
            .header("x-stream-protocol-version", PROTOCOL)
            .body(Full::new(Bytes::new()).boxed())
            .expect("response");
    }
    reply(
        StatusCode::BAD_REQUEST,
        "port-forward needs an upgrade: WebSocket (SPDY/3.1+portforward.k8s.io or \
         v4.channel.k8s.io) or SPDY/3.1",
    )
}

/// The byte stream carried in a WebSocket's binary messages (SPDY tunnelled as kubectl does:
/// each write one message, reads across message boundaries).
fn unwrap_websocket<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (inner, outer) = tokio::io::duplex(256 * 1024);
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(inner);
    tokio::spawn(async move {
        let to_ws = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if ws_tx
                            .send(Message::binary(buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = ws_tx.send(Message::Close(None)).await;
        };
        let from_ws = async {
            while let Some(Ok(msg)) = ws_rx.next().await {
                let written = match msg {
                    Message::Binary(b) => wr.write_all(&b).await.is_ok(),
                    Message::Close(_) => false,
                    _ => true,
                };
                if !written {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        };
        // Either side ending ends the connection.
        tokio::select! {
            _ = to_ws => {}
            _ = from_ws => {}
        }
    });
    outer
}

/// A data stream's way to its forwarding task.
struct DataStream {
    to_pod: Option<mpsc::Sender<Bytes>>,
    /// Dropped (or sent) when the client resets the stream or the connection ends.
    cancel: oneshot::Sender<()>,
}

/// The first half of a stream pair, waiting for the other.
struct Half {
    error: Option<u32>,
    data: Option<(u32, mpsc::Receiver<Bytes>, oneshot::Receiver<()>)>,
    port: u16,
}

/// Serves one SPDY connection of port-forward stream pairs until the client closes it.
pub async fn serve_spdy<S>(io: S, target: Target)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let (out, mut out_rx) = mpsc::channel::<Frame>(64);
    // One writer encodes every frame: header compression is one context in send order.
    let writer = tokio::spawn(async move {
        let mut enc = spdy::Encoder::default();
        let mut w = BufWriter::new(wr);
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(f) = out_rx.recv().await {
            buf.clear();
            if enc.encode(&f, &mut buf).is_err() || w.write_all(&buf).await.is_err() {
                return;
            }
            while let Ok(f) = out_rx.try_recv() {
                buf.clear();
                if enc.encode(&f, &mut buf).is_err() || w.write_all(&buf).await.is_err() {
                    return;
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut dec = spdy::Decoder::default();
    let mut data: HashMap<u32, DataStream> = HashMap::new();
    let mut pending: HashMap<String, Half> = HashMap::new();
    loop {
        let frame = match dec.read(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(pod = %target.name, "port-forward connection: {e}");
                let _ = out
                    .send(Frame::GoAway {
                        last: 0,
                        status: spdy::PROTOCOL_ERROR,
                    })
                    .await;
                break;
            }
        };
        match frame {
            Frame::SynStream { id, headers, .. } => {
                // Forwards that ended are no longer listened for.
                data.retain(|_, d| !d.cancel.is_closed());
                let kind = spdy::header(&headers, "streamtype").unwrap_or("");
                let port = spdy::header(&headers, "port").and_then(|p| p.parse::<u16>().ok());
                let (Some(port), "error" | "data") = (port.filter(|p| *p > 0), kind) else {
                    let _ = out
                        .send(Frame::RstStream {
                            id,
                            status: spdy::PROTOCOL_ERROR,
                        })
                        .await;
                    continue;
                };
                // Clients before request IDs: the error stream, then the data stream 2 later.
                let request = spdy::header(&headers, "requestid")
                    .map(String::from)
                    .unwrap_or_else(|| {
                        let base = if kind == "data" {
                            id.saturating_sub(2)
                        } else {
                            id
                        };
                        format!("stream-{base}")
                    });
                let _ = out
                    .send(Frame::SynReply {
                        id,
                        fin: false,
                        headers: vec![],
                    })
                    .await;
                let half = pending.entry(request.clone()).or_insert(Half {
                    error: None,
                    data: None,
                    port,
                });
                if kind == "error" {
                    half.error = Some(id);
                } else {
                    let (to_pod, from_client) = mpsc::channel(8);
                    let (cancel, cancelled) = oneshot::channel();
                    data.insert(
                        id,
                        DataStream {
                            to_pod: Some(to_pod),
                            cancel,
                        },
                    );
                    half.data = Some((id, from_client, cancelled));
                }
                if half.error.is_some() && half.data.is_some() {
                    let half = pending.remove(&request).expect("pending pair");
                    let (data_id, from_client, cancelled) = half.data.expect("data stream");
                    tokio::spawn(forward(
                        target.clone(),
                        half.port,
                        half.error.expect("error stream"),
                        data_id,
                        out.clone(),
                        from_client,
                        cancelled,
                    ));
                }
            }
            Frame::Data { id, fin, data: d } => {
                if let Some(stream) = data.get_mut(&id) {
                    if !d.is_empty() {
                        if let Some(tx) = &stream.to_pod {
                            if tx.send(d).await.is_err() {
                                stream.to_pod = None;
                            }
                        }
                    }
                    if fin {
                        // The client sends no more: the pod's side of the connection is shut.
                        stream.to_pod = None;
                    }
                }
            }
            Frame::RstStream { id, .. } => {
                if let Some(stream) = data.remove(&id) {
                    let _ = stream.cancel.send(());
                }
            }
            Frame::Ping(n) => {
                let _ = out.send(Frame::Ping(n)).await;
            }
            Frame::GoAway { .. } => break,
            Frame::SynReply { .. } | Frame::Headers { .. } | Frame::Ignored(_) => {}
        }
    }
    // Every forward of this connection ends with it.
    drop(data);
    drop(out);
    let _ = writer.await;
}

/// Copies what the client sends into the pod's connection, and what the pod answers to `out`,
/// a read at a time (at most `spdy::MAX_DATA` bytes) in the message `wrap` makes of it. The
/// pod's side ending ends the relay; the client's only half-closes the connection.
async fn relay<T: Send>(
    conn: TcpStream,
    mut from_client: mpsc::Receiver<Bytes>,
    out: &mpsc::Sender<T>,
    wrap: impl Fn(&[u8]) -> T,
) {
    let (mut r, mut w) = conn.into_split();
    let up = async move {
        while let Some(b) = from_client.recv().await {
            if w.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; spdy::MAX_DATA];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(wrap(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => (&mut down).await,
    }
}

/// One forwarded connection: the pod's port to the data stream and back; a failure to
/// connect is written to the error stream. Both streams are closed at the end, so the
/// client's wait for the error stream ends.
async fn forward(
    target: Target,
    port: u16,
    error_id: u32,
    data_id: u32,
    out: mpsc::Sender<Frame>,
    from_client: mpsc::Receiver<Bytes>,
    mut cancelled: oneshot::Receiver<()>,
) {
    let work = async {
        let conn = match target.connect(port).await {
            Ok(c) => c,
            Err(e) => {
                let msg = target.failure(port, &e);
                tracing::info!(pod = %target.name, "{msg}");
                let _ = out
                    .send(Frame::Data {
                        id: error_id,
                        fin: false,
                        data: Bytes::from(msg),
                    })
                    .await;
                return;
            }
        };
        relay(conn, from_client, &out, |data| Frame::Data {
            id: data_id,
            fin: false,
            data: Bytes::copy_from_slice(data),
        })
        .await;
    };
    tokio::select! {
        _ = work => {}
        _ = &mut cancelled => {}
    }
    for id in [data_id, error_id] {
        let _ = out
            .send(Frame::Data {
                id,
                fin: true,
                data: Bytes::new(),
            })
            .await;
    }
}

/// The WebSocket channel protocol: one connection per requested port, for as long as the
/// WebSocket lasts or until every port's connection has ended.
async fn serve_channels<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    target: Target,
    ports: Vec<u16>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut to_pods = Vec::new();
    let mut tasks = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (data_ch, error_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
        for ch in [data_ch, error_ch] {
            let mut m = vec![ch];
            m.extend(port.to_le_bytes());
            let _ = out.send(m).await;
        }
        let (tx, from_client) = mpsc::channel::<Bytes>(8);
        to_pods.push(Some(tx));
        let (target, out, port) = (target.clone(), out.clone(), *port);
        tasks.push(tokio::spawn(async move {
            let conn = match target.connect(port).await {
                Ok(c) => c,
                Err(e) => {
                    let mut m = vec![error_ch];
                    m.extend(target.failure(port, &e).into_bytes());
                    let _ = out.send(m).await;
                    return;
                }
            };
            relay(conn, from_client, &out, |data| {
                let mut m = Vec::with_capacity(data.len() + 1);
                m.push(data_ch);
                m.extend_from_slice(data);
                m
            })
            .await;
        }));
    }
    drop(out);
    // The forwards end with the WebSocket.
    struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for AbortAll {
        fn drop(&mut self) {
            self.0.iter().for_each(|t| t.abort());
        }
    }
    let _tasks = AbortAll(tasks);
    loop {
        tokio::select! {
            m = out_rx.recv() => match m {
                Some(m) => {
                    if ws_tx.send(Message::binary(m)).await.is_err() {
                        break;
                    }
                }
                // Every port's connection ended and said all it had to.
                None => break,
            },
            msg = ws_rx.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let ch = b[0] as usize;
                    if ch.is_multiple_of(2) {
                        if let Some(slot) = to_pods.get_mut(ch / 2) {
                            if let Some(tx) = slot {
                                if tx.send(b.slice(1..)).await.is_err() {
                                    *slot = None;
                                }
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = ws_tx.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A pod's port: answers `echo:` and what it read, once the client has sent everything.
    async fn echo_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    s.write_all(b"echo:").await.unwrap();
                    s.write_all(&got).await.unwrap();
                });
            }
        });
        port
    }

    /// A pod's port: answers `echo:` and the first piece it reads, then closes.
    async fn answer_once_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(b"echo:").await.unwrap();
            s.write_all(&buf[..n]).await.unwrap();
        });
        port
    }

    /// A port nothing listens on.
    async fn closed_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    }

    fn target() -> Target {
        Target {
            namespace: "default".into(),
            name: "web".into(),
            uid: "u-1".into(),
            ip: Some(Ipv4Addr::LOCALHOST),
            netns: None,
        }
    }

    /// The agent's endpoint, reduced to port-forward, on a local port.
    async fn endpoint() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req| async move {
                        Ok::<_, std::convert::Infallible>(serve(target(), req))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        addr
    }

    /// What kubectl does on one SPDY connection: three forwarded connections at once (one
    /// carrying 200 KB), one to a refused port, and a ping.
    async fn forward_as_kubectl<S: AsyncRead + AsyncWrite + Unpin>(io: S) {
        let (good, refused) = (echo_port().await, closed_port().await);
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut enc = spdy::Encoder::default();
        let mut dec = spdy::Decoder::default();
        let mut wire = Vec::new();
        let big = vec![7u8; 200_000];
        let payloads: Vec<Vec<u8>> = vec![b"one".to_vec(), big.clone(), b"three".to_vec()];
        for (i, port) in [good, good, good, refused].into_iter().enumerate() {
            let id = 1 + 4 * i as u32;
            for (sid, kind) in [(id, "error"), (id + 2, "data")] {
                let headers = vec![
                    ("streamType".to_string(), kind.to_string()),
                    ("port".to_string(), port.to_string()),
                    ("requestID".to_string(), i.to_string()),
                ];
                enc.encode(
                    &Frame::SynStream {
                        id: sid,
                        fin: false,
                        headers,
                    },
                    &mut wire,
                )
                .unwrap();
            }
            // The client writes nothing on the error stream.
            enc.encode(
                &Frame::Data {
                    id,
                    fin: true,
                    data: Bytes::new(),
                },
                &mut wire,
            )
            .unwrap();
            if let Some(p) = payloads.get(i) {
                for chunk in p.chunks(32 * 1024) {
                    let data = Bytes::copy_from_slice(chunk);
                    enc.encode(
                        &Frame::Data {
                            id: id + 2,
                            fin: false,
                            data,
                        },
                        &mut wire,
                    )
                    .unwrap();
                }
            }
            enc.encode(
                &Frame::Data {
                    id: id + 2,
                    fin: true,
                    data: Bytes::new(),
                },
                &mut wire,
            )
            .unwrap();
        }
        enc.encode(&Frame::Ping(1), &mut wire).unwrap();
        wr.write_all(&wire).await.unwrap();
        wr.flush().await.unwrap();

        let mut replies = std::collections::BTreeSet::new();
        let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut finished = std::collections::BTreeSet::new();
        let mut pinged = false;
        while finished.len() < 8 || !pinged {
            let f = tokio::time::timeout(Duration::from_secs(10), dec.read(&mut rd))
                .await
                .expect("frames within 10 s")
                .unwrap()
                .expect("connection open");
            match f {
                Frame::SynReply { id, .. } => {
                    replies.insert(id);
                }
                Frame::Data { id, fin, data: d } => {
                    data.entry(id).or_default().extend(&d);
                    if fin {
                        finished.insert(id);
                    }
                }
                Frame::Ping(1) => pinged = true,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(replies.len(), 8, "every stream is answered: {replies:?}");
        for (i, p) in payloads.iter().enumerate() {
            let id = 1 + 4 * i as u32;
            let mut want = b"echo:".to_vec();
            want.extend(p);
            assert_eq!(data.get(&(id + 2)).map(Vec::len), Some(want.len()));
            assert_eq!(data[&(id + 2)], want);
            assert!(data.get(&id).is_none_or(Vec::is_empty), "no error for {i}");
        }
        let err = String::from_utf8_lossy(&data[&13]).to_string();
        assert!(
            err.starts_with(&format!(
                "error forwarding port {refused} to pod default/web, uid u-1: "
            )),
            "{err}"
        );
        assert!(err.to_lowercase().contains("connection refused"), "{err}");
    }

    #[tokio::test]
    async fn spdy_tunnelled_in_a_websocket_as_kubectl_sends_it() {
        let addr = endpoint().await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{addr}/pods/default/web/portforward"),
            )
            .unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", TUNNEL_PROTOCOL.parse().unwrap());
        let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        assert_eq!(
            resp.headers().get("sec-websocket-protocol").unwrap(),
            TUNNEL_PROTOCOL
        );
        forward_as_kubectl(unwrap_websocket(ws)).await;
    }

    #[tokio::test]
    async fn spdy_over_a_plain_upgrade() {
        let addr = endpoint().await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"POST /pods/default/web/portforward HTTP/1.1\r\nHost: node\r\n\
              Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
              X-Stream-Protocol-Version: portforward.k8s.io\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.unwrap());
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(
            head.contains("x-stream-protocol-version: portforward.k8s.io"),
            "{head}"
        );
        forward_as_kubectl(tcp).await;
    }

    #[tokio::test]
    async fn websocket_channels_for_other_clients() {
        let addr = endpoint().await;
        let (good, refused) = (answer_once_port().await, closed_port().await);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{addr}/pods/default/web/portforward?ports={good}&ports={refused}"),
            )
            .unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", CHANNEL_PROTOCOL.parse().unwrap());
        let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let (mut tx, mut rx) = ws.split();
        let mut firsts = HashMap::new();
        let (mut data, mut errors) = (Vec::<u8>::new(), String::new());
        let mut sent = false;
        while let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("messages within 10 s")
        {
            let Message::Binary(b) = m else { continue };
            let ch = b[0];
            if let std::collections::hash_map::Entry::Vacant(e) = firsts.entry(ch) {
                e.insert(u16::from_le_bytes([b[1], b[2]]));
            } else if ch == 0 {
                data.extend(&b[1..]);
            } else if ch == 3 {
                errors.push_str(&String::from_utf8_lossy(&b[1..]));
            }
            if firsts.len() == 4 && !sent {
                tx.send(Message::binary(b"\x00ping".to_vec()))
                    .await
                    .unwrap();
                sent = true;
            }
        }
        // The WebSocket ends once every port's connection has.
        assert_eq!(data, b"echo:ping");
        assert_eq!(
            firsts,
            HashMap::from([(0, good), (1, good), (2, refused), (3, refused)])
        );
        assert!(
            errors.contains(&format!("error forwarding port {refused}")),
            "{errors}"
        );
    }

    #[test]
    fn ports_from_the_query() {
        assert_eq!(query_ports("ports=80&ports=8080").unwrap(), vec![80, 8080]);
        assert_eq!(query_ports("ports=80%2C81,82").unwrap(), vec![80, 81, 82]);
        assert!(query_ports("ports=0").is_err());
        assert!(query_ports("ports=http").is_err());
        assert!(query_ports("other=1").unwrap().is_empty());
    }
}
