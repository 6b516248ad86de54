//! The cluster CA and the API server's certificate. kubectl sends bearer tokens only over
//! TLS, so the API is served over HTTPS like k3s's: a CA made once per data dir (`ca.crt`,
//! `ca.key`), and a server certificate for the API's addresses issued at each start.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub struct TlsMaterial {
    /// The CA certificate, PEM (goes into kubeconfigs).
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "skiff-ca");
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

/// Loads (or creates) the CA under `dir` and issues a server certificate for `sans`.
pub fn load_or_create(dir: &Path, sans: &[String]) -> Result<TlsMaterial, TlsError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Io { path, source }
    };
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (ca_pem, ca_key) = match (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
        (Ok(c), Ok(k)) => (c, KeyPair::from_pem(&k)?),
        _ => {
            let k = KeyPair::generate()?;
            let c = ca_params().self_signed(&k)?;
            crate::server::write_private(&key, k.serialize_pem().as_bytes()).map_err(io(&key))?;
            crate::server::write_private(&crt, c.pem().as_bytes()).map_err(io(&crt))?;
            (c.pem(), k)
        }
    };
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "skiff-apiserver");
    params.distinguished_name = dn;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let mut names: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    names.extend(sans.iter().cloned());
    names.sort();
    names.dedup();
    params.subject_alt_names = names
        .iter()
        .filter_map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Some(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().ok().map(SanType::DnsName),
        })
        .collect();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let cert = params.signed_by(&server_key, &issuer)?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der())
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        ca_pem,
        server: Arc::new(config),
    })
}
