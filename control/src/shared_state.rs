//! What every API server of one cluster must share, kept in the datastore: the cluster CA and
//! the node serving CA (certificates and keys), the service-account signing key, the admin
//! token, the node join secret and the key that encrypts Secrets.
//!
//! The first server on an empty datastore makes them in its data dir as a single server does,
//! then stores them under [`BOOTSTRAP_KEY`] (outside `/registry/`), sealed with AES-256-GCM
//! under a key derived from the cluster token (PBKDF2-HMAC-SHA256, a random salt stored
//! beside). Every later server (and the first one, restarted) opens them with its token and
//! writes them into its own data dir, where the rest of the server reads them as usual: any
//! server's certificate verifies with the same CA, and one kubeconfig works on all of them.
//! Two first servers racing store theirs with a create-if-absent: the loser loads the winner's.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::store::encryption::Encryption;
use crate::store::etcd::EtcdStore;
use crate::store::StoreError;

/// Where the sealed shared files are kept in the datastore.
pub const BOOTSTRAP_KEY: &str = "/skiff/bootstrap";

/// The data dir's files every server shares (each server's own serving certificate is made
/// from the shared CA, with its own addresses).
pub const SHARED_FILES: &[&str] = &[
    "ca.crt",
    "ca.key",
    "node-serving-ca.crt",
    "node-serving-ca.key",
    "sa.key",
    "token",
    "node-token",
    "encryption.key",
];

/// PBKDF2 rounds for the token: about 0.1 s on a small machine. Use a long random token.
const ROUNDS: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum SharedStateError {
    #[error(
        "the datastore holds a cluster made with another --token: start this server with that cluster's token"
    )]
    WrongToken,
    #[error("the datastore's bootstrap data is unreadable: {0}")]
    Corrupt(String),
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The stored form: salt and sealed JSON (file name to content), base64.
#[derive(Serialize, Deserialize)]
struct Sealed {
    salt: String,
    sealed: String,
}

fn derive(token: &str, salt: &[u8]) -> Encryption {
    let mut key = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(token.as_bytes(), salt, ROUNDS, &mut key);
    Encryption::from_key(&key)
}

fn seal(files: &BTreeMap<String, String>, token: &str) -> Result<Vec<u8>, SharedStateError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt: [u8; 16] = rand::random();
    let plain = serde_json::to_vec(files).map_err(|e| SharedStateError::Corrupt(e.to_string()))?;
    let sealed = derive(token, &salt).seal(&plain)?;
    serde_json::to_vec(&Sealed {
        salt: b64.encode(salt),
        sealed: b64.encode(sealed),
    })
    .map_err(|e| SharedStateError::Corrupt(e.to_string()))
}

fn open(stored: &[u8], token: &str) -> Result<BTreeMap<String, String>, SharedStateError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let corrupt = |e: &dyn std::fmt::Display| SharedStateError::Corrupt(e.to_string());
    let s: Sealed = serde_json::from_slice(stored).map_err(|e| corrupt(&e))?;
    let salt = b64.decode(s.salt).map_err(|e| corrupt(&e))?;
    let sealed = b64.decode(s.sealed).map_err(|e| corrupt(&e))?;
    if !sealed.starts_with(crate::store::encryption::PREFIX) {
        return Err(corrupt(&"not sealed"));
    }
    let plain = derive(token, &salt)
        .open(&sealed)
        .map_err(|_| SharedStateError::WrongToken)?;
    serde_json::from_slice(&plain).map_err(|e| corrupt(&e))
}

/// Makes the shared files in `dir` if they are missing, as a single server does.
fn make_local(dir: &Path) -> Result<(), SharedStateError> {
    let io = |e: &dyn std::fmt::Display| SharedStateError::Io {
        path: dir.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    };
    let ca = crate::tls::ClusterCa::load_or_create(dir).map_err(|e| io(&e))?;
    crate::tls::ClusterCa::load_or_create_named(dir, "node-serving-ca", "skiff-node-serving-ca")
        .map_err(|e| io(&e))?;
    crate::apiserver::tokens::TokenKey::load_or_create(dir).map_err(|e| io(&e))?;
    crate::server::load_or_make_token(dir).map_err(|e| io(&e))?;
    crate::server::load_or_make_node_token(dir, &ca.hash()).map_err(|e| io(&e))?;
    Encryption::load_or_create(&dir.join("encryption.key"))?;
    Ok(())
}

fn read_files(dir: &Path) -> Result<BTreeMap<String, String>, SharedStateError> {
    SHARED_FILES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map(|text| (name.to_string(), text))
                .map_err(|source| SharedStateError::Io {
                    path: path.display().to_string(),
                    source,
                })
        })
        .collect()
}

fn write_files(dir: &Path, files: &BTreeMap<String, String>) -> Result<(), SharedStateError> {
    for name in SHARED_FILES {
        let Some(text) = files.get(*name) else {
            return Err(SharedStateError::Corrupt(format!("{name} is missing")));
        };
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        crate::server::write_private(&path, text.as_bytes()).map_err(|source| {
            SharedStateError::Io {
                path: path.display().to_string(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Makes `dir` hold the cluster's shared files: the datastore's if it has them (opened with
/// `token`), else this server's own, which it then stores for the others.
pub fn sync(dir: &Path, store: &EtcdStore, token: &str) -> Result<(), SharedStateError> {
    if token.is_empty() {
        return Err(SharedStateError::WrongToken);
    }
    loop {
        if let Some(stored) = store.raw_get(BOOTSTRAP_KEY)? {
            let files = open(&stored, token)?;
            return write_files(dir, &files);
        }
        make_local(dir)?;
        let sealed = seal(&read_files(dir)?, token)?;
        if store.raw_create(BOOTSTRAP_KEY, sealed)? {
            tracing::info!("cluster bootstrap data stored in the datastore");
            return Ok(());
        }
        // Another server stored its own first: load that one.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_files_open_only_with_their_token() {
        let files: BTreeMap<String, String> = [("ca.key".to_string(), "secret-key".to_string())]
            .into_iter()
            .collect();
        let sealed = seal(&files, "right").unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("secret-key"));
        assert_eq!(open(&sealed, "right").unwrap(), files);
        assert!(matches!(
            open(&sealed, "wrong"),
            Err(SharedStateError::WrongToken)
        ));
    }

    /// Two servers on one datastore end with the same shared files; a wrong token is refused.
    #[test]
    fn the_second_server_loads_the_first_ones_files() {
        let Some(etcd) = crate::store::etcd::testing::shared_etcd() else {
            return;
        };
        let mut config = etcd.config();
        config.prefix = crate::store::etcd::testing::unique_prefix();
        let store = EtcdStore::connect(&config).unwrap();
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        sync(a.path(), &store, "cluster-secret").unwrap();
        sync(b.path(), &store, "cluster-secret").unwrap();
        assert_eq!(read_files(a.path()).unwrap(), read_files(b.path()).unwrap());
        // Restarted, the first keeps its files.
        let before = read_files(a.path()).unwrap();
        sync(a.path(), &store, "cluster-secret").unwrap();
        assert_eq!(read_files(a.path()).unwrap(), before);
        let e = sync(c.path(), &store, "another").unwrap_err();
        assert!(matches!(e, SharedStateError::WrongToken), "{e}");
        assert!(!c.path().join("ca.key").exists());
    }
}
