//! Forwards one HTTP request to another server and streams the answer back, including
//! protocol upgrades (exec and attach streams).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::{StatusCode, Uri};
use hyper_util::rt::TokioIo;
use skiff_api::ApiError;

/// Forwards `req` to `url`. The caller's credentials are not passed on
/// ([`strip_credentials`]). An `https` URL is
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

/// Removes what names or proves the caller from forwarded headers: its bearer token (the
/// admin's, for kubectl), proxy credentials, cookies and impersonation requests. The node
/// sees only the API server's own client certificate.
pub fn strip_credentials(headers: &mut http::HeaderMap) {
    headers.remove(http::header::AUTHORIZATION);
    headers.remove(http::header::PROXY_AUTHORIZATION);
    headers.remove(http::header::COOKIE);
    let impersonation: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for k in impersonation {
        headers.remove(k);
    }
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
    strip_credentials(&mut parts.headers);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What a node receives of a request forwarded with the admin's token: none of the
    /// caller's credentials.
    #[tokio::test]
    async fn forwarded_requests_carry_no_caller_credentials() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let node = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        });
        let req = Request::builder()
            .uri("/api/v1/namespaces/default/pods/p/log")
            .header("Authorization", "Bearer admin-secret")
            .header("Proxy-Authorization", "Basic c2VjcmV0")
            .header("Cookie", "session=secret")
            .header("Impersonate-User", "system:admin")
            .header("Impersonate-Group", "system:masters")
            .header("Accept", "text/plain")
            .body(Body::empty())
            .unwrap();
        let resp = forward(&format!("http://{addr}/pods/default/p/log"), req, None)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let head = node.await.unwrap();
        assert!(
            head.starts_with("get /pods/default/p/log http/1.1"),
            "{head}"
        );
        assert!(head.contains("accept: text/plain"), "{head}");
        for leaked in ["authorization", "cookie", "impersonate", "secret", "admin"] {
            assert!(!head.contains(leaked), "{leaked} reached the node: {head}");
        }
    }
}
