//! Joining a cluster with a join token, k3s style, and the node's credentials.
//!
//! A join token is `K10<sha256 of the CA PEM>::<credential>`. The agent fetches the CA from
//! `GET /cacerts` without trusting the server yet, and checks its hash against the token
//! BEFORE it sends any secret. Then it asks `POST /v1-skiff/node-credential` (with the token,
//! its name and its node password) to sign two requests it made: a client certificate
//! (`system:node:NAME`, group `system:nodes`) it uses for the API from then on, and the serving
//! certificate of its endpoint (logs, exec). Its keys never leave the node.
//!
//! Everything is kept under `DATA/pki/` (and the node password in `DATA/node-password`, mode
//! 0600) and reused on restart; certificates are asked for again when missing, for another
//! CA or address, or when less than a third of their validity is left.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use sha2::Digest;
use skiff_client::{Client, ClientError};

/// The API server's client certificate's common name: the only caller the endpoint serves.
pub const API_SERVER_CLIENT_CN: &str = "skiff-apiserver-kubelet-client";
const CREDENTIAL_PATH: &str = "/v1-skiff/node-credential";
/// How often a running agent looks at its certificates by default (with jitter).
pub const RENEW_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the join token is malformed: {0}")]
    BadToken(String),
    #[error("the join token carries no CA hash (K10<hash>::...): pass --ca-cert, or use the server's node-token")]
    NoCaHash,
    #[error("the server's CA certificate (sha256 {got}) does not match the join token's CA hash {want}: refusing to send the token")]
    CaMismatch { got: String, want: String },
    #[error("fetching the cluster CA from {server}: {error}")]
    FetchCa { server: String, error: ClientError },
    #[error("joining as node {node}: {error}")]
    Refused { node: String, error: ClientError },
    #[error("node credential: {0}")]
    Credential(String),
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the client certificate of node {node} expired at {not_after} and the join token was refused ({error}): run the agent again with a valid join token (`skiff token create` on the server)")]
    Expired {
        node: String,
        not_after: chrono::DateTime<chrono::Utc>,
        error: ClientError,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// A join token, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// sha256 of the CA PEM, lowercase hex (None: a token without `K10<hash>::`).
    pub ca_hash: Option<String>,
    /// What is presented as the bearer token.
    pub credential: String,
}

impl JoinToken {
    pub fn parse(token: &str) -> Result<JoinToken, JoinError> {
        let token = token.trim();
        match token.split_once("::") {
            Some((prefix, cred)) => {
                let hash = prefix.strip_prefix("K10").ok_or_else(|| {
                    JoinError::BadToken("a token with :: must start with K10<CA hash>".into())
                })?;
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(JoinError::BadToken(
                        "the CA hash after K10 is not a sha256 hex digest".into(),
                    ));
                }
                if cred.is_empty() {
                    return Err(JoinError::BadToken("no credential after ::".into()));
                }
                Ok(JoinToken {
                    ca_hash: Some(hash.to_ascii_lowercase()),
                    credential: token.to_string(),
                })
            }
            None if token.is_empty() => Err(JoinError::BadToken("the token is empty".into())),
            None => Ok(JoinToken {
                ca_hash: None,
                credential: token.to_string(),
            }),
        }
    }

    /// Whether the credential is a join credential (`node:<secret>` or `<id>.<secret>`) rather
    /// than, say, an admin token: then the agent gets and uses a node certificate of its own.
    pub fn is_join_credential(&self) -> bool {
        let cred = self
            .credential
            .split_once("::")
            .map_or(self.credential.as_str(), |(_, c)| c);
        cred.starts_with("node:")
            || cred.split_once('.').is_some_and(|(id, secret)| {
                id.len() == 6
                    && secret.len() == 16
                    && cred
                        .bytes()
                        .all(|b| b == b'.' || b.is_ascii_lowercase() || b.is_ascii_digit())
            })
    }

    /// Checks `ca_pem` against the token's hash.
    pub fn check_ca(&self, ca_pem: &str) -> Result<(), JoinError> {
        let want = self.ca_hash.as_deref().ok_or(JoinError::NoCaHash)?;
        let got = sha256_hex(ca_pem.as_bytes());
        if got != want {
            return Err(JoinError::CaMismatch {
                got,
                want: want.to_string(),
            });
        }
        Ok(())
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the node authenticates and serves with.
#[derive(Clone)]
pub struct NodeCredential {
    pub ca_pem: String,
    /// The client certificate and its key, PEM (for [`Client::with_identity`]).
    pub client_identity_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
}

impl NodeCredential {
    /// A client of `server` that authenticates as this node.
    pub fn client(&self, server: &str) -> Result<Client, ClientError> {
        Client::with_identity(server, &self.client_identity_pem, "default", &self.ca_pem)
    }

    /// The endpoint's TLS configuration: the serving certificate (from `serving`, which a
    /// renewal swaps: new connections get the current one), and client certificates asked
    /// for (not required, so a caller without one gets a clear 401) and checked against the
    /// cluster CA.
    pub fn endpoint_tls(
        &self,
        serving: Arc<ServingCert>,
    ) -> Result<Arc<rustls::ServerConfig>, JoinError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let bad = |e: String| JoinError::Credential(e);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| bad(format!("CA: {e}")))?)
                .map_err(|e| bad(format!("CA: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(format!("client verifier: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(serving);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The serving certificate and key, as rustls signs with them.
    fn certified_serving_key(&self) -> Result<rustls::sign::CertifiedKey, JoinError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: String| JoinError::Credential(e);
        let certs = CertificateDer::pem_slice_iter(self.serving_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("serving certificate: {e}")))?;
        if certs.is_empty() {
            return Err(bad("serving certificate: none in the PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(self.serving_key_pem.as_bytes())
            .map_err(|e| bad(format!("serving key: {e}")))?;
        rustls::sign::CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
            .map_err(|e| bad(format!("serving certificate: {e}")))
    }
}

/// The endpoint's current serving certificate: what each new TLS connection is served with,
/// replaced in place when the node renews its certificates.
#[derive(Debug)]
pub struct ServingCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl ServingCert {
    pub fn new(cred: &NodeCredential) -> Result<Arc<ServingCert>, JoinError> {
        Ok(Arc::new(ServingCert(std::sync::RwLock::new(Arc::new(
            cred.certified_serving_key()?,
        )))))
    }

    /// Serves `cred`'s serving certificate from now on.
    pub fn set(&self, cred: &NodeCredential) -> Result<(), JoinError> {
        let key = Arc::new(cred.certified_serving_key()?);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Renews a running node's certificates: every `every` (with jitter) it looks at them, and when
/// either is due ([`renewal_due`]) asks the server for new ones with its current client
/// certificate, stores them, and swaps them in: `client` (and every clone of it: heartbeat,
/// proxy, routes, pod workers) authenticates with the new client certificate, `serving` serves
/// the new serving certificate. Nothing restarts; pods are not touched.
pub struct Renewal {
    pub client: Client,
    pub serving: Arc<ServingCert>,
    pub data_dir: PathBuf,
    pub node: String,
    pub ip: Ipv4Addr,
    pub every: std::time::Duration,
}

impl Renewal {
    /// Checks once: renews when due. Returns whether new certificates were swapped in.
    pub async fn check(&self) -> Result<bool, JoinError> {
        let pki = Pki::new(&self.data_dir);
        let Some(current) = pki.load() else {
            return Err(JoinError::Credential(
                "no node credential under the data dir".into(),
            ));
        };
        let now = chrono::Utc::now();
        if !renewal_due(&current.client_identity_pem, now)
            && !renewal_due(&current.serving_cert_pem, now)
        {
            return Ok(false);
        }
        if let Some(not_after) = cert_info(&current.client_identity_pem)
            .map(|i| i.not_after)
            .filter(|t| *t <= now)
        {
            // Nothing the server would accept is left: only a join token brings it back.
            return Err(JoinError::Credential(format!(
                "the client certificate of node {} expired at {not_after}: restart the agent with a valid join token (`skiff token create` on the server)",
                self.node
            )));
        }
        let cred = pki
            .request(&self.client, &self.data_dir, &self.node, self.ip)
            .await?;
        // A client with a bearer token (an administrator's) keeps authenticating with it.
        if self.client.token().is_none() {
            self.client.set_identity(&cred.client_identity_pem)?;
        }
        self.serving.set(&cred)?;
        tracing::info!(
            node = %self.node,
            serial = serial(&cred.client_identity_pem).unwrap_or_default(),
            "node certificates renewed"
        );
        Ok(true)
    }

    /// Checks every `every` (±10 %) until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        use rand::Rng;
        loop {
            let jitter = rand::thread_rng().gen_range(0.9..1.1);
            let wait = self.every.mul_f64(jitter);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(error) = self.check().await {
                tracing::warn!(node = %self.node, %error, "renewing the node certificates failed; trying again at the next check");
            }
        }
    }
}

/// The common name of a (verified) peer certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(String::from)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JoinError + '_ {
    move |error| JoinError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), JoinError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The node password in `dir/node-password`, made (random) on first use.
pub fn node_password(dir: &Path) -> Result<String, JoinError> {
    let path = dir.join("node-password");
    if let Ok(p) = std::fs::read_to_string(&path) {
        if p.trim().len() >= 16 {
            return Ok(p.trim().to_string());
        }
    }
    let p = random_hex(32);
    write_private(&path, p.as_bytes())?;
    Ok(p)
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a node keeps its certificates.
pub struct Pki {
    dir: PathBuf,
}

/// What a stored certificate says about itself.
struct CertInfo {
    common_name: String,
    not_before: chrono::DateTime<chrono::Utc>,
    not_after: chrono::DateTime<chrono::Utc>,
    ips: Vec<std::net::IpAddr>,
}

fn cert_info(pem: &str) -> Option<CertInfo> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let not_before = chrono::DateTime::from_timestamp(cert.validity().not_before.timestamp(), 0)?;
    let not_after = chrono::DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)?;
    let ips = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertInfo {
        common_name,
        not_before,
        not_after,
        ips,
    })
}

impl CertInfo {
    /// Less than a third of the validity is left at `now`: time to renew.
    fn due(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.not_after - now < (self.not_after - self.not_before) / 3
    }
}

/// Whether the certificate `pem` is due for renewal at `now`: less than a third of its validity
/// left (365-day certificates: about 122 days), or unreadable.
pub fn renewal_due(pem: &str, now: chrono::DateTime<chrono::Utc>) -> bool {
    cert_info(pem).is_none_or(|i| i.due(now))
}

/// The serial number of the certificate `pem` (hex), if it reads.
pub fn serial(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.raw_serial_as_string())
}

impl Pki {
    pub fn new(data_dir: &Path) -> Pki {
        Pki {
            dir: data_dir.join("pki"),
        }
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }

    /// The credential on disk, if complete.
    pub fn load(&self) -> Option<NodeCredential> {
        let cert = self.read("client.crt")?;
        let key = self.read("client.key")?;
        Some(NodeCredential {
            ca_pem: self.read("ca.crt")?,
            client_identity_pem: format!("{}\n{}", cert.trim_end(), key),
            serving_cert_pem: self.read("serving.crt")?,
            serving_key_pem: self.read("serving.key")?,
        })
    }

    /// Whether the stored credential is for `node` at `ip`, signed by `ca_pem` (when given),
    /// and not due for renewal ([`renewal_due`]).
    pub fn is_current(&self, node: &str, ip: Ipv4Addr, ca_pem: Option<&str>) -> bool {
        let Some(c) = self.load() else {
            return false;
        };
        if ca_pem.is_some_and(|ca| ca.trim() != c.ca_pem.trim()) {
            return false;
        }
        let want_cn = format!("system:node:{node}");
        let now = chrono::Utc::now();
        let ok = |pem: &str, need_ip: bool| {
            cert_info(pem).is_some_and(|i| {
                i.common_name == want_cn
                    && !i.due(now)
                    && (!need_ip || i.ips.contains(&std::net::IpAddr::V4(ip)))
            })
        };
        ok(&c.client_identity_pem, false) && ok(&c.serving_cert_pem, true)
    }

    /// Whether the stored client certificate (signed by `ca_pem`) still authenticates `node`:
    /// then a renewal goes with it rather than with the join token (which may have expired).
    pub fn can_renew_itself(&self, node: &str, ca_pem: &str) -> bool {
        let want_cn = format!("system:node:{node}");
        self.load()
            .filter(|c| c.ca_pem.trim() == ca_pem.trim())
            .and_then(|c| cert_info(&c.client_identity_pem))
            .is_some_and(|i| {
                i.common_name == want_cn
                    && i.not_after > chrono::Utc::now() + chrono::Duration::seconds(10)
            })
    }

    /// When the stored client certificate stops being valid.
    fn client_not_after(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        cert_info(&self.load()?.client_identity_pem).map(|i| i.not_after)
    }

    /// Asks the server (through `client`: a join token, an admin, or the node itself) to sign
    /// new certificates for `node`, and stores them.
    pub async fn request(
        &self,
        client: &Client,
        data_dir: &Path,
        node: &str,
        ip: Ipv4Addr,
    ) -> Result<NodeCredential, JoinError> {
        let password = node_password(data_dir)?;
        let csr = |cn: &str| -> Result<(String, String), JoinError> {
            let key = rcgen::KeyPair::generate()
                .map_err(|e| JoinError::Credential(format!("key: {e}")))?;
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let req = params
                .serialize_request(&key)
                .and_then(|r| r.pem())
                .map_err(|e| JoinError::Credential(format!("certificate request: {e}")))?;
            Ok((req, key.serialize_pem()))
        };
        let cn = format!("system:node:{node}");
        let (client_csr, client_key) = csr(&cn)?;
        let (serving_csr, serving_key) = csr(&cn)?;
        let body = json!({"nodeName": node, "nodePassword": password, "clientCsr": client_csr,
                          "servingCsr": serving_csr, "addresses": [ip.to_string()]});
        let answer: Value = client
            .post_path(CREDENTIAL_PATH, &body)
            .await
            .map_err(|error| JoinError::Refused {
                node: node.to_string(),
                error,
            })?;
        let field = |k: &str| {
            answer[k]
                .as_str()
                .map(String::from)
                .ok_or_else(|| JoinError::Credential(format!("the server's answer has no {k}")))
        };
        let (ca, client_cert, serving_cert) = (
            field("caCertificate")?,
            field("clientCertificate")?,
            field("servingCertificate")?,
        );
        for (name, content) in [
            ("client.key", &client_key),
            ("serving.key", &serving_key),
            ("client.crt", &client_cert),
            ("serving.crt", &serving_cert),
            ("ca.crt", &ca),
        ] {
            write_private(&self.dir.join(name), content.as_bytes())?;
        }
        tracing::info!(%node, "node credential stored");
        self.load()
            .ok_or_else(|| JoinError::Credential("the stored credential is incomplete".into()))
    }

    /// The credential to run with: the stored one while current, else a new one from the
    /// server. A stored one that is due for renewal is still used when the server cannot be
    /// reached (the agent runs its cached pods without the control plane).
    pub async fn ensure(
        &self,
        client: &Client,
        data_dir: &Path,
        node: &str,
        ip: Ipv4Addr,
        ca_pem: Option<&str>,
    ) -> Result<NodeCredential, JoinError> {
        if self.is_current(node, ip, ca_pem) {
            if let Some(c) = self.load() {
                return Ok(c);
            }
        }
        match self.request(client, data_dir, node, ip).await {
            Ok(c) => Ok(c),
            Err(JoinError::Refused {
                error: error @ ClientError::Transport { .. },
                node: n,
            }) => match self.load() {
                Some(c) if ca_pem.is_none_or(|ca| ca.trim() == c.ca_pem.trim()) => {
                    tracing::warn!(%error, "cannot renew the node credential now; using the stored one");
                    Ok(c)
                }
                _ => Err(JoinError::Refused { node: n, error }),
            },
            Err(e) => Err(e),
        }
    }
}

/// Joins `server` as `node` with `token`: finds the CA (`ca_pem` given, else `GET /cacerts`),
/// checks it against the token's hash before anything secret is sent, and gets (or reuses) the
/// node's credential. Returns the credential and the client the agent runs with: the node's
/// own certificate for a join token; the token itself (with the given CA) for an admin token.
pub async fn join(
    server: &str,
    token: &str,
    ca_pem: Option<String>,
    data_dir: &Path,
    node: &str,
    ip: Ipv4Addr,
) -> Result<Client, JoinError> {
    let token = JoinToken::parse(token)?;
    let pki = Pki::new(data_dir);
    let ca = match ca_pem {
        Some(ca) => {
            if token.ca_hash.is_some() {
                token.check_ca(&ca)?;
            }
            ca
        }
        None => {
            if token.ca_hash.is_none() {
                return Err(JoinError::NoCaHash);
            }
            match skiff_client::fetch_ca_unverified(server).await {
                Ok(ca) => ca,
                // The server is away: a CA stored by an earlier join does, if it matches.
                Err(error) => match pki.load() {
                    Some(c) if token.check_ca(&c.ca_pem).is_ok() => c.ca_pem,
                    _ => {
                        return Err(JoinError::FetchCa {
                            server: server.to_string(),
                            error,
                        })
                    }
                },
            }
        }
    };
    token.check_ca(&ca).or_else(|e| match e {
        JoinError::NoCaHash => Ok(()),
        e => Err(e),
    })?;
    let bearer = Client::new(
        server,
        Some(token.credential.clone()),
        "default",
        Some(&ca),
        false,
    )?;
    if !token.is_join_credential() {
        return Ok(bearer);
    }
    // A node renews with its own certificate while it is valid; the token is for joining.
    let (via, expired) = match pki.load() {
        Some(c) if pki.can_renew_itself(node, &ca) => (c.client(server)?, None),
        // A certificate that has run out (the agent was down a long time): the token must do.
        _ => (bearer, pki.client_not_after()),
    };
    let cred = match pki.ensure(&via, data_dir, node, ip, Some(&ca)).await {
        Err(JoinError::Refused { node, error }) if expired.is_some() && error.code().is_some() => {
            return Err(JoinError::Expired {
                node,
                not_after: expired.unwrap_or_default(),
                error,
            })
        }
        other => other?,
    };
    Ok(cred.client(server)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_split_and_checked_against_the_ca() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let hash = sha256_hex(ca.as_bytes());
        let t = JoinToken::parse(&format!("K10{hash}::node:secret")).unwrap();
        assert_eq!(t.ca_hash.as_deref(), Some(hash.as_str()));
        assert!(t.is_join_credential());
        t.check_ca(ca).unwrap();
        assert!(matches!(
            t.check_ca("another CA"),
            Err(JoinError::CaMismatch { .. })
        ));
        let t = JoinToken::parse(&format!("K10{hash}::abcdef.0123456789abcdef")).unwrap();
        assert!(t.is_join_credential());
        // An admin token: no hash, not a join credential.
        let t = JoinToken::parse("skiff-0123abcd").unwrap();
        assert_eq!(t.ca_hash, None);
        assert!(!t.is_join_credential());
        assert!(matches!(t.check_ca(ca), Err(JoinError::NoCaHash)));
        for bad in ["", "K10abc::node:x", "X10::node:x", &format!("K10{hash}::")] {
            assert!(
                matches!(JoinToken::parse(bad), Err(JoinError::BadToken(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_node_password_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = node_password(dir.path()).unwrap();
        assert_eq!(p.len(), 64);
        assert_eq!(node_password(dir.path()).unwrap(), p);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node-password"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(node_password(other.path()).unwrap(), p);
    }

    #[test]
    fn nothing_stored_is_not_current() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        assert!(pki.load().is_none());
        assert!(!pki.is_current("n1", Ipv4Addr::LOCALHOST, None));
    }
    /// A self-signed certificate valid from `from` to `to` (seconds from now).
    fn cert(from: i64, to: i64) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:n1");
        let at = |s: i64| time::OffsetDateTime::now_utc() + time::Duration::seconds(s);
        params.not_before = at(from);
        params.not_after = at(to);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn renewal_is_due_when_a_third_of_the_validity_is_left() {
        let now = chrono::Utc::now();
        // A year's certificate issued today, or 200 days ago: not due.
        assert!(!renewal_due(&cert(0, 365 * 86_400), now));
        assert!(!renewal_due(&cert(-200 * 86_400, 165 * 86_400), now));
        // 250 days into 365 (115 left, under a third): due; and expired: due.
        assert!(renewal_due(&cert(-250 * 86_400, 115 * 86_400), now));
        assert!(renewal_due(&cert(-400 * 86_400, -35 * 86_400), now));
        // Short test certificates: a minute's, 30 s in, is not due; 45 s in, it is.
        assert!(!renewal_due(&cert(-30, 30), now));
        assert!(renewal_due(&cert(-45, 15), now));
        // What does not read is due.
        assert!(renewal_due("not a certificate", now));
        let c = cert(0, 60);
        assert_eq!(serial(&c), serial(&c));
        assert!(serial(&c).is_some_and(|s| !s.is_empty()));
        assert_ne!(serial(&c), serial(&cert(0, 60)));
    }
}
