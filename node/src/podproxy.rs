//! `pods/{name}/proxy` on the node: an HTTP request for a pod's port, forwarded from the API
//! server (`/pods/{ns}/{name}/proxy/{port}/{path}` here) to the pod, reached as port-forward
//! reaches it, and the answer streamed back. Upgrades (WebSockets) pass through.

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::logs::Body;
use crate::portforward::Target;

/// Headers that belong to one hop of a connection, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn failure(code: StatusCode, msg: &str) -> Response<Body> {
    crate::exec::reject(code, msg)
}

/// The port and the path below it of `/pods/{ns}/{name}/proxy/{port}/{path}`.
pub fn split_path(path: &str) -> Option<(u16, String)> {
    let rest = path.trim_start_matches('/');
    let mut segs = rest.splitn(5, '/');
    let (Some("pods"), Some(_), Some(_), Some("proxy")) =
        (segs.next(), segs.next(), segs.next(), segs.next())
    else {
        return None;
    };
    let tail = segs.next().unwrap_or("");
    let (port, below) = tail.split_once('/').unwrap_or((tail, ""));
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    Some((port, format!("/{below}")))
}

pub async fn serve(target: Target, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let Some((port, path)) = split_path(req.uri().path()) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "proxy needs /pods/{namespace}/{name}/proxy/{port}/{path}",
        );
    };
    let conn = match target.connect(port).await {
        Ok(c) => c,
        Err(e) => {
            return failure(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "error trying to reach pod {}/{} on port {port}: {e}",
                    target.namespace, target.name
                ),
            )
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(conn)).await {
        Ok(x) => x,
        Err(e) => return failure(StatusCode::BAD_GATEWAY, &format!("pod connection: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut req = req;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    parts.uri = match pq.parse() {
        Ok(u) => u,
        Err(e) => return failure(StatusCode::BAD_REQUEST, &format!("bad path {pq}: {e}")),
    };
    for h in HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    let host = target
        .ip
        .map(|ip| format!("{ip}:{port}"))
        .unwrap_or_else(|| format!("localhost:{port}"));
    if let Ok(v) = host.parse() {
        parts.headers.insert(http::header::HOST, v);
    }
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return failure(StatusCode::BAD_GATEWAY, &format!("pod answered: {e}")),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let pod_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(p)) = (client_upgrade.await, pod_upgrade.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(p)).await;
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    for h in HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    // The pod's body streamed through; a broken one just ends.
    let frames = futures::stream::unfold(body, |mut b| async move {
        match b.frame().await {
            Some(Ok(f)) => Some((Ok::<_, std::convert::Infallible>(f), b)),
            _ => None,
        }
    });
    Response::from_parts(parts, http_body_util::StreamBody::new(frames).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_port_and_path() {
        assert_eq!(
            split_path("/pods/default/web/proxy/8080/a/b/"),
            Some((8080, "/a/b/".into()))
        );
        assert_eq!(
            split_path("/pods/default/web/proxy/80"),
            Some((80, "/".into()))
        );
        assert_eq!(
            split_path("/pods/default/web/proxy/80/"),
            Some((80, "/".into()))
        );
        assert_eq!(split_path("/pods/default/web/proxy/http"), None);
        assert_eq!(split_path("/pods/default/web/log"), None);
    }
}
