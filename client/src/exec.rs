//! `exec` through the API server: Kubernetes' remote-command protocol over a WebSocket
//! (`v5.channel.k8s.io`), as `kubectl exec` speaks it. Each binary message starts with its
//! channel: 0 stdin, 1 stdout, 2 stderr, 3 the final status, 255 closes a stream.

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use skiff_api::k8s::apimachinery::pkg::apis::meta::v1::Status;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

use crate::{encode_query, Client, ClientError};

/// What to run, and where.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub container: Option<String>,
    pub command: Vec<String>,
    pub stdin: bool,
    pub tty: bool,
}

/// The exit code a final status carries (0 for Success).
pub fn exit_code(status: &Value) -> Result<i32, String> {
    let status: Status = serde_json::from_value(status.clone()).unwrap_or_default();
    if status.status.as_deref() == Some("Success") {
        return Ok(0);
    }
    if status.reason.as_deref() == Some("NonZeroExitCode") {
        if let Some(code) = status
            .details
            .and_then(|d| d.causes)
            .into_iter()
            .flatten()
            .find(|c| c.reason.as_deref() == Some("ExitCode"))
            .and_then(|c| c.message?.parse().ok())
        {
            return Ok(code);
        }
    }
    Err(status.message.unwrap_or_else(|| "exec failed".into()))
}

impl Client {
    /// Runs `opts.command` in a container of pod `ns/pod`, copying `input` to it (when
    /// `opts.stdin`) and its output to `stdout` / `stderr`. Returns its exit code.
    pub async fn exec(
        &self,
        ns: &str,
        pod: &str,
        opts: &ExecOptions,
        mut input: impl AsyncRead + Unpin + Send + 'static,
        mut stdout: impl AsyncWrite + Unpin,
        mut stderr: impl AsyncWrite + Unpin,
    ) -> Result<i32, ClientError> {
        let mut q = vec!["stdout=true".to_string(), format!("stderr={}", !opts.tty)];
        if opts.stdin {
            q.push("stdin=true".into());
        }
        if opts.tty {
            q.push("tty=true".into());
        }
        if let Some(c) = &opts.container {
            q.push(format!("container={}", encode_query(c)));
        }
        for c in &opts.command {
            q.push(format!("command={}", encode_query(c)));
        }
        let path = format!("/api/v1/namespaces/{ns}/pods/{pod}/exec?{}", q.join("&"));
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, uuid_bytes());
        let rb = self
            .req(reqwest::Method::GET, &path)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", key)
            .header("sec-websocket-protocol", "v5.channel.k8s.io");
        let resp = self.send(rb).await?;
        let transport = |reason: String| ClientError::Transport {
            url: self.server(),
            reason,
        };
        let upgraded = resp.upgrade().await.map_err(|e| transport(e.to_string()))?;
        let ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(upgraded, Role::Client, None).await;
        let (mut tx, mut rx) = ws.split();
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        if opts.stdin {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match input.read(&mut buf[1..]).await {
                        Ok(0) | Err(_) => {
                            let _ = in_tx.send(vec![255, 0]).await;
                            break;
                        }
                        Ok(n) => {
                            buf[0] = 0;
                            if in_tx.send(buf[..n + 1].to_vec()).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        } else {
            drop(in_tx);
        }
        let mut input_open = opts.stdin;
        loop {
            tokio::select! {
                frame = in_rx.recv(), if input_open => match frame {
                    Some(f) => {
                        tx.send(Message::binary(f)).await.map_err(|e| transport(e.to_string()))?;
                    }
                    None => input_open = false,
                },
                msg = rx.next() => match msg {
                    Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                        1 => {
                            stdout.write_all(&b[1..]).await.map_err(|e| transport(e.to_string()))?;
                            let _ = stdout.flush().await;
                        }
                        2 => {
                            stderr.write_all(&b[1..]).await.map_err(|e| transport(e.to_string()))?;
                            let _ = stderr.flush().await;
                        }
                        3 => {
                            let status: Value = serde_json::from_slice(&b[1..]).unwrap_or(Value::Null);
                            let _ = tx.close().await;
                            return exit_code(&status).map_err(ClientError::Usage);
                        }
                        _ => {}
                    },
                    Some(Ok(Message::Close(_))) | None => {
                        return Err(transport("the exec stream ended without a status".into()));
                    }
                    Some(Err(e)) => return Err(transport(e.to_string())),
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}

/// 16 random bytes for the WebSocket key.
fn uuid_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    b.copy_from_slice(&(nanos ^ (std::process::id() as u128) << 64).to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exit_codes_from_statuses() {
        assert_eq!(exit_code(&json!({"status": "Success"})), Ok(0));
        assert_eq!(
            exit_code(&json!({"status": "Failure", "reason": "NonZeroExitCode",
                               "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}})),
            Ok(3)
        );
        assert!(exit_code(&json!({"status": "Failure", "message": "no such container"})).is_err());
    }
}
