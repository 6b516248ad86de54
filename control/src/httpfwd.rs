//! Forwards one HTTP request to another server and streams the answer back, including
//! protocol upgrades (exec and attach streams).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::{StatusCode, Uri};
use hyper_util::rt::TokioIo;
use skiff_api::ApiError;

/// Forwards `req` to `url`. The caller's credentials are not passed on. An `https` URL is
/// reached with `tls` (which holds the trusted roots and the client certificate the API server
/// presents: its own credential, which node agents check).
pub async fn forward(
    url: &str,
    req: Request<Body>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Response, ApiError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ApiError::internal(format!("bad node url {url}: {e}")))?;
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| {
            ApiError::unavailable(format!("node agent at {authority} is unreachable: {e}"))
        })?;
    if uri.scheme_str() != Some("https") {
        return send(stream, &uri, &authority, req).await;
    }
    let tls = tls.ok_or_else(|| ApiError::internal("no TLS configuration for node agents"))?;
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| ApiError::internal(format!("bad node address {host}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, stream)
        .await
        .map_err(|e| {
            ApiError::unavailable(format!("node agent at {authority}: TLS handshake: {e}"))
        })?;
    send(stream, &uri, &authority, req).await
}

async fn send<S>(
    stream: S,
    uri: &Uri,
    authority: &str,
    mut req: Request<Body>,
) -> Result<Response, ApiError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ApiError::unavailable(format!("node agent at {authority}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    parts.uri = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .expect("path");
    parts.headers.remove(http::header::AUTHORIZATION);
    parts
        .headers
        .insert(http::header::HOST, authority.parse().expect("host header"));
    let mut resp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| ApiError::unavailable(format!("node agent at {authority}: {e}")))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(client), Ok(backend)) = (client_upgrade.await, backend_upgrade.await) {
                let mut c = TokioIo::new(client);
                let mut b = TokioIo::new(backend);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
            }
        });
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}
