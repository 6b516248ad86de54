//! Joining a node, k3s style: `GET /cacerts` (no credential: the agent checks the CA against
//! its join token's hash before it sends any secret), then `POST /v1-skiff/node-credential`
//! with the join token, where the node gets its client certificate (`system:node:NAME`, group
//! `system:nodes`, signed by the cluster CA) and the serving certificate of its endpoint
//! (signed by the node serving CA, which the API server trusts for agents and nobody trusts for
//! the API), both from requests it made (its keys never leave it).
//!
//! A node password (random, kept by the agent) guards a node name: the first join records its
//! salted hash in the Secret `kube-system/NAME.node-password.skiff`, and a later join for the
//! same name with another password is refused, so another host cannot take over a node.

use serde::{Deserialize, Serialize};
use serde_json::json;
use skiff_api::{ApiError, Resource};

use super::auth::{UserInfo, BOOTSTRAPPERS, MASTERS, NODES, TOKEN_NAMESPACE};
use crate::registry::{Registry, Sub, WriteOptions};
use crate::tls::{ClusterCa, Subject, Usage};

/// The type of the Secrets holding node password hashes.
pub const NODE_PASSWORD_TYPE: &str = "skiff.io/node-password";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRequest {
    pub node_name: String,
    pub node_password: String,
    /// PKCS#10 request (PEM) for the client certificate.
    pub client_csr: String,
    /// PKCS#10 request (PEM) for the endpoint's serving certificate.
    pub serving_csr: String,
    /// The node's addresses (and names) the serving certificate is for.
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialResponse {
    pub client_certificate: String,
    pub serving_certificate: String,
    pub ca_certificate: String,
    /// RFC 3339; the agent asks again when a third of the validity is left.
    pub not_after: String,
}

/// The name of the Secret with `node`'s password hash.
pub fn password_secret_name(node: &str) -> String {
    format!("{node}.node-password.skiff")
}

/// `salt$sha256(salt + password)`, hex.
pub fn hash_password(password: &str, salt: &str) -> String {
    format!(
        "{salt}${}",
        crate::tls::sha256_hex(format!("{salt}{password}").as_bytes())
    )
}

/// Whether `password` is the one `stored` (from [`hash_password`]) was made from.
pub fn password_matches(stored: &str, password: &str) -> bool {
    let Some((salt, _)) = stored.split_once('$') else {
        return false;
    };
    super::auth::same_secret(stored, &hash_password(password, salt))
}

fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn forbidden(message: String) -> ApiError {
    let mut e = ApiError::unauthorized();
    e.code = 403;
    e.reason = "Forbidden";
    e.message = message;
    e
}

/// Checks (or records) the node password for `req.node_name`. `system:masters` may replace a
/// recorded password (an administrator re-joining a host); a bootstrap identity must match it.
fn check_password(
    registry: &Registry,
    user: &UserInfo,
    req: &CredentialRequest,
) -> Result<(), ApiError> {
    use base64::Engine;
    let secrets = Resource::lookup("secrets").expect("secrets");
    let name = password_secret_name(&req.node_name);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let want = json!({"apiVersion": "v1", "kind": "Secret", "type": NODE_PASSWORD_TYPE,
        "metadata": {"name": name, "namespace": TOKEN_NAMESPACE},
        "data": {"hash": b64(&hash_password(&req.node_password, &salt))}});
    let opts = WriteOptions::default();
    match registry.try_get(secrets, Some(TOKEN_NAMESPACE), &name)? {
        None => {
            match registry.create(secrets, Some(TOKEN_NAMESPACE), want, &opts) {
                Ok(_) => Ok(()),
                // A join for the same name at the same time: the other one's password holds.
                Err(e) if e.code == 409 => check_password(registry, user, req),
                Err(e) => Err(e),
            }
        }
        Some(cur) => {
            let stored = cur["data"]["hash"]
                .as_str()
                .and_then(|h| base64::engine::general_purpose::STANDARD.decode(h).ok())
                .and_then(|h| String::from_utf8(h).ok())
                .unwrap_or_default();
            if password_matches(&stored, &req.node_password) {
                return Ok(());
            }
            if !user.in_group(MASTERS) {
                return Err(forbidden(format!(
                    "node \"{n}\" already joined with another node password: another host holds this name (delete the Secret {TOKEN_NAMESPACE}/{name} to let a new host take it)",
                    n = req.node_name
                )));
            }
            let mut next = want;
            next["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
            registry.update(
                secrets,
                Some(TOKEN_NAMESPACE),
                &name,
                next,
                Sub::Main,
                &opts,
            )?;
            Ok(())
        }
    }
}

/// Answers `POST /v1-skiff/node-credential` for `user` (a bootstrapper, an administrator, or
/// the node itself renewing its certificates): the client certificate signed by the cluster
/// CA `ca`, the serving certificate by `serving_ca` (which signs nothing else), both valid for
/// `validity`.
pub fn node_credential(
    registry: &Registry,
    (ca, serving_ca): (&ClusterCa, &ClusterCa),
    validity: std::time::Duration,
    user: &UserInfo,
    body: &[u8],
) -> Result<CredentialResponse, ApiError> {
    let req: CredentialRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("bad node credential request: {e}")))?;
    if !valid_node_name(&req.node_name) {
        return Err(ApiError::bad_request(format!(
            "node name {:?} is not a valid DNS subdomain",
            req.node_name
        )));
    }
    if req.node_password.len() < 16 {
        return Err(ApiError::bad_request(
            "the node password must be at least 16 characters",
        ));
    }
    let allowed = user.in_group(MASTERS)
        || user.in_group(BOOTSTRAPPERS)
        || (user.in_group(NODES) && user.node_name() == Some(req.node_name.as_str()));
    if !allowed {
        return Err(forbidden(format!(
            "User \"{}\" cannot request the credential of node \"{}\"",
            user.name, req.node_name
        )));
    }
    if !user.in_group(NODES) || user.in_group(MASTERS) {
        check_password(registry, user, &req)?;
    }
    let bad_csr = |e: crate::tls::TlsError| ApiError::bad_request(format!("bad CSR: {e}"));
    let common_name = format!("system:node:{}", req.node_name);
    let client = ca
        .sign_request(
            &req.client_csr,
            &Subject {
                common_name: common_name.clone(),
                organizations: vec![NODES.into()],
                sans: Vec::new(),
                usage: Usage::Client,
                validity,
            },
        )
        .map_err(bad_csr)?;
    let mut sans = req.addresses.clone();
    sans.push(req.node_name.clone());
    let serving = serving_ca
        .sign_request(
            &req.serving_csr,
            &Subject {
                common_name,
                organizations: vec![NODES.into()],
                sans,
                usage: Usage::Server,
                validity,
            },
        )
        .map_err(bad_csr)?;
    tracing::info!(node = %req.node_name, user = %user.name, "node credential issued");
    Ok(CredentialResponse {
        client_certificate: client.cert_pem,
        serving_certificate: serving.cert_pem,
        ca_certificate: ca.pem.clone(),
        not_after: client.not_after.to_rfc3339(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::NODE_CERT_VALIDITY;
    use rcgen::CertificateParams;

    #[test]
    fn node_passwords_are_checked_against_their_salted_hash() {
        let h = hash_password("correct horse battery", "salt1");
        assert!(h.starts_with("salt1$"));
        assert!(password_matches(&h, "correct horse battery"));
        assert!(!password_matches(&h, "correct horse battery!"));
        assert!(!password_matches("no-salt", "x"));
        // Another salt, another hash.
        assert_ne!(h, hash_password("correct horse battery", "salt2"));
    }

    #[test]
    fn a_second_join_with_another_password_is_refused() {
        use crate::registry::ClusterConfig;
        use crate::store::sqlite::SqliteStore;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("store")).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        let serving = ClusterCa::load_or_create_named(dir.path(), "sv", "sv").unwrap();
        let csr = || {
            let key = rcgen::KeyPair::generate().unwrap();
            CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap()
        };
        let body = |password: &str| {
            serde_json::to_vec(&json!({"nodeName": "n1", "nodePassword": password,
                "clientCsr": csr(), "servingCsr": csr(), "addresses": ["10.0.0.5"]}))
            .unwrap()
        };
        let boot = UserInfo {
            name: "system:bootstrap:abcdef".into(),
            groups: vec![BOOTSTRAPPERS.into()],
            ..Default::default()
        };
        let first = "first-host-password-0123456789";
        let answer = node_credential(
            &reg,
            (&ca, &serving),
            NODE_CERT_VALIDITY,
            &boot,
            &body(first),
        )
        .unwrap();
        let der = crate::tls::pem_certs(&answer.client_certificate).remove(0);
        assert_eq!(
            crate::tls::subject_of(&der),
            Some(("system:node:n1".into(), vec![NODES.into()]))
        );
        // The same host again: fine. Another host for the same name: 403.
        node_credential(
            &reg,
            (&ca, &serving),
            NODE_CERT_VALIDITY,
            &boot,
            &body(first),
        )
        .unwrap();
        let e = node_credential(
            &reg,
            (&ca, &serving),
            NODE_CERT_VALIDITY,
            &boot,
            &body("another-host-password-0123"),
        )
        .unwrap_err();
        assert_eq!(e.code, 403);
        assert!(e.message.contains("another node password"), "{}", e.message);
        // Another node's certificate cannot ask for n1's; an administrator can re-home it.
        let n2 = UserInfo {
            name: "system:node:n2".into(),
            groups: vec![NODES.into()],
            ..Default::default()
        };
        assert_eq!(
            node_credential(&reg, (&ca, &serving), NODE_CERT_VALIDITY, &n2, &body(first))
                .unwrap_err()
                .code,
            403
        );
        let admin = UserInfo {
            name: "system:admin".into(),
            groups: vec![MASTERS.into()],
            ..Default::default()
        };
        let second = "another-host-password-0123";
        node_credential(
            &reg,
            (&ca, &serving),
            NODE_CERT_VALIDITY,
            &admin,
            &body(second),
        )
        .unwrap();
        node_credential(
            &reg,
            (&ca, &serving),
            NODE_CERT_VALIDITY,
            &boot,
            &body(second),
        )
        .unwrap();
        assert_eq!(
            node_credential(
                &reg,
                (&ca, &serving),
                NODE_CERT_VALIDITY,
                &boot,
                &body(first)
            )
            .unwrap_err()
            .code,
            403
        );
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        assert!(valid_node_name("edge-1"));
        assert!(valid_node_name("n1.example"));
        for bad in ["", "Edge", "-a", "a..b", "a/b"] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}
