//! Secrets encrypted at rest, as the Kubernetes API server's `aesgcm` provider does: a
//! Secret's stored bytes are `k8s:enc:aesgcm:v1:key1:`, a random 12-byte nonce, then the
//! AES-256-GCM ciphertext of its JSON. The key is 32 random bytes, base64, in a file of its
//! own beside the store (mode `0600`), made the first time the store is opened.
//!
//! Reads take either form, so a Secret written before encryption is still read, and is
//! encrypted when it is next written.

use std::borrow::Cow;
use std::path::Path;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;

use super::StoreError;

/// What an encrypted value starts with: provider, version and key name.
pub const PREFIX: &[u8] = b"k8s:enc:aesgcm:v1:key1:";
const NONCE_LEN: usize = 12;

/// The keys whose values are encrypted: Secrets'.
pub fn applies(key: &str) -> bool {
    key.starts_with("/registry/secrets/")
}

pub struct Encryption {
    cipher: Aes256Gcm,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("encryption key {}: {e}", path.display()))
}

impl Encryption {
    /// Reads the key at `path`, or makes one there (owner-only) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = match std::fs::read_to_string(path) {
            Ok(text) => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| err(path, e))?;
                let bytes = b64.decode(text.trim()).map_err(|e| err(path, e))?;
                if bytes.len() != 32 {
                    return Err(err(path, "not a 32-byte AES-256 key"));
                }
                *Key::<Aes256Gcm>::from_slice(&bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Aes256Gcm::generate_key(OsRng);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| err(path, e))?;
                f.write_all(format!("{}\n", b64.encode(key)).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| err(path, e))?;
                key
            }
            Err(e) => return Err(err(path, e)),
        };
        Ok(Encryption {
            cipher: Aes256Gcm::new(&key),
        })
    }

    /// The cipher of a 32-byte key given (one derived from a secret).
    pub fn from_key(key: &[u8; 32]) -> Self {
        Encryption {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
        }
    }

    /// The stored form of `plain`.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(&nonce, plain)
            .map_err(|e| StoreError::Backend(format!("encrypting: {e}")))?;
        let mut out = Vec::with_capacity(PREFIX.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(PREFIX);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plain form of a stored value, encrypted or not.
    pub fn open<'a>(&self, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, StoreError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(Cow::Borrowed(stored));
        };
        if rest.len() < NONCE_LEN {
            return Err(StoreError::Backend(
                "an encrypted value is truncated".into(),
            ));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map(Cow::Owned)
            .map_err(|_| {
                StoreError::Backend(
                    "an encrypted value does not decrypt with the store's key".into(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sealed_values_open_with_the_same_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let enc = Encryption::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = enc.seal(b"{\"data\":\"c2VjcmV0\"}").unwrap();
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.windows(6).any(|w| w == b"c2VjcmV0"[..6].as_ref()));
        // Two seals of one value differ (fresh nonces); both open.
        assert_ne!(sealed, enc.seal(b"{\"data\":\"c2VjcmV0\"}").unwrap());
        let again = Encryption::load_or_create(&path).unwrap();
        assert_eq!(&*again.open(&sealed).unwrap(), b"{\"data\":\"c2VjcmV0\"}");
        // Plain values (written before encryption) read as they are.
        assert_eq!(&*again.open(b"{}").unwrap(), b"{}");
        let other = Encryption::load_or_create(&dir.path().join("other")).unwrap();
        assert!(other.open(&sealed).is_err());
        assert!(other.open(PREFIX).is_err());
        assert!(applies("/registry/secrets/default/x"));
        assert!(!applies("/registry/configmaps/default/x"));
    }
}
