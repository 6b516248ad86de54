//! The cluster CA and the certificates it signs. kubectl sends bearer tokens only over TLS, so
//! the API is served over HTTPS like k3s's: a CA made once per data dir (`ca.crt`, `ca.key`), a
//! server certificate for the API's addresses issued at each start, node certificates signed
//! from the nodes' requests (client `system:node:NAME` and the agent's serving one), and the API
//! server's own client certificate for the agents' endpoints.
//!
//! The API server asks for a client certificate without requiring one: a caller that presents
//! one signed by the CA is the user its subject names (CN user, O groups); others still use
//! bearer tokens.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

/// The common name of the API server's client certificate towards node agents.
pub const KUBELET_CLIENT_CN: &str = "skiff-apiserver-kubelet-client";
/// How long node certificates are valid (365 days); agents renew them when less than a third
/// is left. [`crate::server::ServerConfig::node_cert_validity`] sets it (tests: seconds).
pub const NODE_CERT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);
/// How far before now a certificate's validity starts (clocks a little behind still accept
/// it), at most: a tenth of a short validity.
const BACKDATE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    ServiceAccountKey(#[from] crate::apiserver::tokens::TokenKeyError),
}

/// Who a certificate is issued to, and for what.
#[derive(Debug, Clone)]
pub struct Subject {
    pub common_name: String,
    pub organizations: Vec<String>,
    /// DNS names and IP addresses (serving certificates).
    pub sans: Vec<String>,
    pub usage: Usage,
    pub validity: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

/// A signed certificate, PEM, and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Signed {
    pub cert_pem: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

/// The cluster CA: its certificate and signing key.
pub struct ClusterCa {
    /// The CA certificate, PEM (goes into kubeconfigs; `GET /cacerts` serves it).
    pub pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

pub struct TlsMaterial {
    pub ca: Arc<ClusterCa>,
    /// Signs the serving certificates of node agents' endpoints, and nothing else: what a
    /// joining node may have signed for its addresses can never pass as the API server's
    /// certificate to clients that trust the cluster CA (k3s keeps the same split).
    pub node_serving_ca: Arc<ClusterCa>,
    /// The CA certificate, PEM (goes into kubeconfigs).
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
    /// The API server's client configuration towards node agents: it trusts only the node
    /// serving CA and presents the `skiff-apiserver-kubelet-client` certificate.
    pub kubelet_client: Arc<rustls::ClientConfig>,
    /// Signs and checks ServiceAccount tokens (`sa.key`).
    pub service_account_key: Arc<crate::apiserver::tokens::TokenKey>,
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// sha256 of `bytes`, lowercase hex (the CA hash of a join token).
pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn san(name: &str) -> Option<SanType> {
    match name.parse::<IpAddr>() {
        Ok(ip) => Some(SanType::IpAddress(ip)),
        Err(_) => name.to_string().try_into().ok().map(SanType::DnsName),
    }
}

impl ClusterCa {
    /// Loads the cluster CA kept in `dir` (`ca.crt`, `ca.key`), or makes one there.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa, TlsError> {
        Self::load_or_create_named(dir, "ca", "skiff-ca")
    }

    /// Loads the CA `dir/FILE.crt` + `dir/FILE.key`, or makes one there named `common_name`.
    pub fn load_or_create_named(
        dir: &Path,
        file: &str,
        common_name: &str,
    ) -> Result<ClusterCa, TlsError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| TlsError::Io { path, source }
        };
        let (crt, key) = (
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        );
        let (pem, ca_key) = match (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
            (Ok(c), Ok(k)) => (c, KeyPair::from_pem(&k)?),
            _ => {
                let k = KeyPair::generate()?;
                let c = ca_params(common_name).self_signed(&k)?;
                crate::server::write_private(&key, k.serialize_pem().as_bytes())
                    .map_err(io(&key))?;
                crate::server::write_private(&crt, c.pem().as_bytes()).map_err(io(&crt))?;
                (c.pem(), k)
            }
        };
        let der = pem_certs(&pem)
            .into_iter()
            .next()
            .ok_or_else(|| rustls::Error::General("ca.crt holds no certificate".into()))?;
        Ok(ClusterCa {
            pem,
            der,
            issuer: Issuer::new(ca_params(common_name), ca_key),
        })
    }

    /// The hash a join token carries: sha256 of the CA certificate's PEM.
    pub fn hash(&self) -> String {
        sha256_hex(self.pem.as_bytes())
    }

    /// The CA as the only trust root.
    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("the CA certificate");
        Arc::new(roots)
    }

    fn params(subject: &Subject) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.common_name.as_str());
        for o in &subject.organizations {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        p.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        let validity = time::Duration::try_from(subject.validity).unwrap_or(time::Duration::MAX);
        let backdate = time::Duration::try_from(BACKDATE.min(subject.validity / 10))
            .unwrap_or(time::Duration::ZERO);
        p.not_before = now - backdate;
        p.not_after = now.saturating_add(validity);
        let mut names = subject.sans.clone();
        names.sort();
        names.dedup();
        p.subject_alt_names = names.iter().filter_map(|n| san(n)).collect();
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![match subject.usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        p
    }

    fn not_after(p: &CertificateParams) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(p.not_after.unix_timestamp(), 0).unwrap_or_default()
    }

    /// Signs the public key of a PKCS#10 request (PEM) for `subject`. Only the key is taken from
    /// the request: names, usages and validity are the CA's choice.
    pub fn sign_request(&self, csr_pem: &str, subject: &Subject) -> Result<Signed, TlsError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = Self::params(subject);
        let cert = csr.signed_by(&self.issuer)?;
        Ok(Signed {
            cert_pem: cert.pem(),
            not_after: Self::not_after(&csr.params),
        })
    }

    /// Issues a certificate and a fresh key for `subject` (the server's own certificates).
    pub fn issue(
        &self,
        subject: &Subject,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        let key = KeyPair::generate()?;
        let cert = Self::params(subject).signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok((cert.der().clone(), key_der))
    }
}

/// The certificates in a PEM text (none when it holds none).
pub fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// The user a certificate names: CN, and the O attributes as groups.
pub fn subject_of(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let orgs = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    Some((cn, orgs))
}

/// Loads (or creates) the CA under `dir` and issues a server certificate for `sans`.
pub fn load_or_create(dir: &Path, sans: &[String]) -> Result<TlsMaterial, TlsError> {
    let ca = Arc::new(ClusterCa::load_or_create(dir)?);
    let node_serving_ca = Arc::new(ClusterCa::load_or_create_named(
        dir,
        "node-serving-ca",
        "skiff-node-serving-ca",
    )?);
    let mut names: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    names.extend(sans.iter().cloned());
    let (cert, key) = ca.issue(&Subject {
        common_name: "skiff-apiserver".into(),
        organizations: Vec::new(),
        sans: names,
        usage: Usage::Server,
        validity: std::time::Duration::from_secs(100 * 365 * 86_400),
    })?;
    // Client certificates are asked for, not required: kubectl with a token sends none.
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
            .allow_unauthenticated()
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (client_cert, client_key) = ca.issue(&Subject {
        common_name: KUBELET_CLIENT_CN.into(),
        // Agents check the name only; no group, so the certificate is no admin credential
        // towards this API server either.
        organizations: Vec::new(),
        sans: Vec::new(),
        usage: Usage::Client,
        validity: std::time::Duration::from_secs(100 * 365 * 86_400),
    })?;
    let kubelet_client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(node_serving_ca.roots())
        .with_client_auth_cert(vec![client_cert], client_key)?;
    let service_account_key = Arc::new(crate::apiserver::tokens::TokenKey::load_or_create(dir)?);
    Ok(TlsMaterial {
        service_account_key,
        ca_pem: ca.pem.clone(),
        ca,
        node_serving_ca,
        server: Arc::new(config),
        kubelet_client: Arc::new(kubelet_client),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_request_names_the_subject_the_ca_chose() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        // The request asks for another name: the CA's subject wins.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::default();
        asked
            .distinguished_name
            .push(DnType::CommonName, "system:admin");
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let signed = ca
            .sign_request(
                &csr,
                &Subject {
                    common_name: "system:node:n1".into(),
                    organizations: vec!["system:nodes".into()],
                    sans: Vec::new(),
                    usage: Usage::Client,
                    validity: NODE_CERT_VALIDITY,
                },
            )
            .unwrap();
        let der = pem_certs(&signed.cert_pem).remove(0);
        assert_eq!(
            subject_of(&der),
            Some(("system:node:n1".into(), vec!["system:nodes".into()]))
        );
        assert!(signed.not_after > chrono::Utc::now() + chrono::Duration::days(300));
        // The same CA is found again in the same dir.
        let again = ClusterCa::load_or_create(dir.path()).unwrap();
        assert_eq!(again.hash(), ca.hash());
        assert_eq!(ca.hash().len(), 64);
    }
}
