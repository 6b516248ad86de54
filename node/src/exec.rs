//! `pods/{name}/exec` on the node: a command run in an OCI container with `runc exec`, its
//! streams carried over a WebSocket in Kubernetes' remote-command protocol, so `kubectl exec`
//! and `skiff exec` both work through the API server.
//!
//! Each binary message starts with a channel byte: 0 stdin, 1 stdout, 2 stderr, 3 the final
//! status (a `Status` object), 4 terminal resize; in `v5.channel.k8s.io`, 255 closes a stream
//! (`[255, 0]`: stdin is done).

use std::collections::HashMap;
use std::process::Stdio;

use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use skiff_oci::Runc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

pub const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;

/// What `exec` is asked to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub container: Option<String>,
    pub stdin: bool,
    pub tty: bool,
}

impl ExecRequest {
    /// From the query string: `command` repeated, `container`, `stdin`, `tty`.
    pub fn parse(query: &str) -> ExecRequest {
        let mut r = ExecRequest {
            command: vec![],
            container: None,
            stdin: false,
            tty: false,
        };
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            let v = percent_decode(v);
            match k {
                "command" => r.command.push(v),
                "container" => r.container = Some(v),
                "stdin" => r.stdin = v == "true" || v == "1",
                "tty" => r.tty = v == "true" || v == "1",
                _ => {}
            }
        }
        r
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

/// The final message on the error channel: how the command ended.
pub fn status_message(code: Option<i32>, error: Option<&str>) -> Vec<u8> {
    let status = match (code, error) {
        (_, Some(e)) => {
            json!({"metadata": {}, "status": "Failure", "message": e, "reason": "InternalError"})
        }
        (Some(0), None) => json!({"metadata": {}, "status": "Success"}),
        (c, None) => {
            let c = c.unwrap_or(137);
            json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                   "message": format!("command terminated with non-zero exit code: exit status {c}"),
                   "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]}})
        }
    };
    let mut msg = vec![ERROR];
    msg.extend(status.to_string().into_bytes());
    msg
}

use crate::logs::Body;

fn error(code: StatusCode, msg: &str) -> Response<Body> {
    use http_body_util::BodyExt;
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": msg, "code": code.as_u16()});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(status.to_string())).boxed())
        .expect("response")
}

/// Answers the upgrade and runs `runc exec` in container `id` once the WebSocket is up.
pub fn serve(
    runc: Runc,
    id: String,
    exec: ExecRequest,
    mut req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let h = req.headers();
    let Some(key) = h.get("sec-websocket-key").map(|k| k.as_bytes().to_vec()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "exec needs a WebSocket upgrade (protocol v4.channel.k8s.io or v5.channel.k8s.io)",
        );
    };
    let offered = offered_protocols(&req);
    let Some(protocol) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("none of the offered exec protocols {offered:?} is supported (v4 or v5.channel.k8s.io)"),
        );
    };
    if exec.command.is_empty() {
        return error(StatusCode::BAD_REQUEST, "exec needs a command");
    }
    let v5 = *protocol == "v5.channel.k8s.io";
    upgrade_to_websocket(&mut req, &key, Some(protocol), move |ws| {
        run(ws, runc, id, exec, v5)
    })
}

/// The subprotocols a WebSocket upgrade offers (`Sec-WebSocket-Protocol`, repeated or
/// comma-separated).
pub(crate) fn offered_protocols<B>(req: &Request<B>) -> Vec<String> {
    req.headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect()
}

/// The WebSocket a request's connection becomes once it is answered `101`.
pub(crate) type Upgraded =
    tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Answers a WebSocket upgrade (`key` is its `Sec-WebSocket-Key`, `protocol` the subprotocol
/// chosen, if any) with `101 Switching Protocols`, and runs `serve` on the WebSocket once the
/// client has it.
pub(crate) fn upgrade_to_websocket<F, Fut>(
    req: &mut Request<hyper::body::Incoming>,
    key: &[u8],
    protocol: Option<&str>,
    serve: F,
) -> Response<Body>
where
    F: FnOnce(Upgraded) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use http_body_util::BodyExt;
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        serve(ws).await;
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key));
    if let Some(p) = protocol {
        resp = resp.header("sec-websocket-protocol", p);
    }
    resp.body(Full::new(bytes::Bytes::new()).boxed())
        .expect("response")
}

async fn run<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    runc: Runc,
    id: String,
    exec: ExecRequest,
    v5: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, mut rx) = ws.split();
    let (mut child, outputs, mut stdin) = match spawn(&runc, &id, &exec) {
        Ok(s) => (s.child, s.outputs, s.input),
        Err(e) => {
            let _ = tx
                .send(Message::binary(status_message(
                    None,
                    Some(&format!("runc exec: {e}")),
                )))
                .await;
            let _ = tx.send(Message::Close(Some(normal_close()))).await;
            return;
        }
    };
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    for (channel, mut pipe) in outputs {
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match pipe.read(&mut buf[1..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf[0] = channel;
                        if out_tx.send(buf[..n + 1].to_vec()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(out_tx);
    let mut outputs_open = true;
    let code = loop {
        tokio::select! {
            out = out_rx.recv(), if outputs_open => match out {
                Some(frame) => {
                    if tx.send(Message::binary(frame)).await.is_err() {
                        let _ = child.start_kill();
                    }
                }
                None => outputs_open = false,
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                    STDIN => {
                        if let Some(s) = stdin.as_mut() {
                            if s.write_all(&b[1..]).await.is_err() || s.flush().await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    CLOSE if v5 && b.get(1) == Some(&STDIN) => stdin = None,
                    RESIZE => {}
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client went away: the command goes too.
                    stdin = None;
                    if outputs_open {
                        let _ = child.start_kill();
                    }
                }
                Some(Ok(_)) => {}
            },
            status = child.wait(), if !outputs_open => {
                break status.ok().and_then(|s| {
                    use std::os::unix::process::ExitStatusExt;
                    s.code().or_else(|| s.signal().map(|sig| 128 + sig))
                });
            }
        }
    };
    let _ = tx.send(Message::binary(status_message(code, None))).await;
    let _ = tx.send(Message::Close(Some(normal_close()))).await;
}

fn normal_close() -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// Starts `runc exec`: with pipes, or on a terminal (a pty the agent holds the master of,
/// whose slave is runc's stdio; runc then gives the process a terminal of its own).
struct Spawned {
    child: tokio::process::Child,
    /// The command's output streams, by channel.
    outputs: Vec<(u8, Reader)>,
    input: Option<Writer>,
}

fn spawn(runc: &Runc, id: &str, exec: &ExecRequest) -> std::io::Result<Spawned> {
    let mut cmd = runc.exec(id, &exec.command, exec.tty);
    cmd.kill_on_drop(true);
    if exec.tty {
        let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
        let slave = std::fs::File::from(pty.slave);
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        let child = cmd.spawn()?;
        let master = std::fs::File::from(pty.master);
        let input: Option<Writer> = if exec.stdin {
            Some(Box::new(tokio::fs::File::from_std(master.try_clone()?)))
        } else {
            None
        };
        let output: Reader = Box::new(tokio::fs::File::from_std(master));
        return Ok(Spawned {
            child,
            outputs: vec![(STDOUT, output)],
            input,
        });
    }
    cmd.stdin(if exec.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut outputs: Vec<(u8, Reader)> = Vec::new();
    if let Some(p) = child.stdout.take() {
        outputs.push((STDOUT, Box::new(p)));
    }
    if let Some(p) = child.stderr.take() {
        outputs.push((STDERR, Box::new(p)));
    }
    let input = child.stdin.take().map(|p| Box::new(p) as Writer);
    Ok(Spawned {
        child,
        outputs,
        input,
    })
}

/// Finds the runc ID of container `container` (by default the pod's first OCI container) of
/// pod `ns/pod`.
pub fn find_container(
    index: &HashMap<String, crate::logs::PodEntry>,
    ns: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<String, (StatusCode, String)> {
    let entry = index.get(&format!("{ns}/{pod}")).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} does not run on this node"),
        )
    })?;
    // Without a name: the first container that can run a command.
    let name = match container {
        Some(c) => c.to_string(),
        None => entry
            .oci
            .first()
            .or(entry.containers.first())
            .cloned()
            .unwrap_or_default(),
    };
    if !entry.containers.contains(&name) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("container {name} is not valid for pod {pod}"),
        ));
    }
    if !entry.oci.contains(&name) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "container {name} is a wasm container: exec runs commands in OCI containers only"
            ),
        ));
    }
    Ok(crate::oci::container_id(&entry.uid, &name))
}

pub fn reject(code: StatusCode, msg: &str) -> Response<Body> {
    error(code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exec_query() {
        let r = ExecRequest::parse("command=sh&command=-c&command=echo%20hi%3Bexit+3&container=app&stdin=true&stdout=true&tty=false");
        assert_eq!(r.command, vec!["sh", "-c", "echo hi;exit 3"]);
        assert_eq!(r.container.as_deref(), Some("app"));
        assert!(r.stdin);
        assert!(!r.tty);
    }

    #[test]
    fn status_carries_the_exit_code() {
        let ok = status_message(Some(0), None);
        assert_eq!(ok[0], ERROR);
        type Status = k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
        let v: Status = serde_json::from_slice(&ok[1..]).unwrap();
        assert_eq!(v.status.as_deref(), Some("Success"));
        let bad: Status = serde_json::from_slice(&status_message(Some(3), None)[1..]).unwrap();
        assert_eq!(bad.reason.as_deref(), Some("NonZeroExitCode"));
        let causes = bad.details.and_then(|d| d.causes).unwrap();
        assert_eq!(causes[0].message.as_deref(), Some("3"));
    }
}
