//! skiff's registry access, shared by the control plane and both runtimes: image references
//! and the registry clients that reach them ([`client`]), what a reference resolves to and
//! whether it is a wasm artifact or a container image ([`media`]), manifests and blobs pulled
//! with their digests checked ([`pull`]), wasm pushed in the CNCF layout (`push`, behind the
//! feature of that name, which only the CLI enables), and the small file helpers the node's
//! image caches share ([`util`]). Nothing here unpacks layers, compiles wasm or runs
//! containers.

pub mod client;
pub mod media;
pub mod pull;
#[cfg(feature = "push")]
pub mod push;
pub mod util;

pub use client::{auth, client_for, is_insecure, parse_reference};
pub use media::{
    is_component, is_container_image, is_wasm, resolve, Resolved, WASM_CONFIG_TYPES,
    WASM_LAYER_TYPES,
};
pub use pull::{pull_blob_to, pull_blob_verified, pull_manifest, pull_platform_manifest};
#[cfg(feature = "push")]
pub use push::push_wasm;
pub use util::{write_atomic, KeyedLocks, TEMP_PREFIX};

// The client types the runtimes pass back in: one `oci-client` for the whole workspace.
pub use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
pub use oci_client::{Client, Reference};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0}")]
    Registry(String),
    #[error("{0}")]
    Platform(String),
    #[error("blob {expected} failed verification (got {actual})")]
    Digest { expected: String, actual: String },
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}
