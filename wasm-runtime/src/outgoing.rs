//! Outgoing HTTPS of guests that trust more than the public roots: with the cluster CA among
//! them, a pod reaches the API server at `https://kubernetes.default.svc` with its
//! ServiceAccount token. As wasmtime-wasi-http's `default_send_request`, but with the TLS
//! client configuration given, and the certificate checked against the name the guest asked
//! for, whatever address the node resolved that name to.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

/// What a guest's outgoing request leaves running once its response head arrived: the
/// connection, which goes on carrying the body.
pub(crate) type Pending = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// Wasmtime's default when a guest sets no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The TLS client configuration of guests' outgoing HTTPS: the public roots and more.
#[derive(Clone)]
pub struct TlsRoots(pub(crate) Arc<rustls::ClientConfig>);

impl std::fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsRoots")
    }
}

impl TlsRoots {
    /// The public roots and every certificate of `pem` (the cluster CA).
    pub fn with_pem(pem: &[u8]) -> Result<TlsRoots, String> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        let mut added = 0;
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| format!("CA certificate: {e}"))?;
            roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("no certificate in the CA file".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsRoots(Arc::new(config)))
    }
}

/// Sends `request` over TLS with `tls`, checking the server's certificate for `name`.
/// The request's authority is where to connect (an address the node may have resolved).
pub(crate) async fn send_tls(
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(http::Response<WasiBody>, Pending), HttpError> {
    let authority = request
        .uri()
        .authority()
        .ok_or(HttpError::HttpRequestUriInvalid)?;
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(443)
    );
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(DEFAULT_TIMEOUT);
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(DEFAULT_TIMEOUT);
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(HttpError::Connect)?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(HttpError::Tls)?;
        hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(HttpError::from)
    };
    let (mut sender, conn) = tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| HttpError::ConnectionTimeout)??;
    // The connection carries the request and the response body, however long the guest reads.
    let conn = tokio::spawn(conn);
    // Only the path goes on the wire; the Host header names the server.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;
    *request.uri_mut() = path;
    let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)?
        .map_err(HttpError::from)?;
    let response = response.map(|body| body.map_err(HttpError::from).boxed_unsync());
    let io: Pending = Box::new(async move {
        match conn.await {
            Ok(done) => done.map_err(HttpError::from),
            Err(_) => Err(HttpError::ConnectionTerminated),
        }
    });
    Ok((response, io))
}
