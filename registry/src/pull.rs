//! Manifests and blobs pulled from a registry, their digests checked: a manifest for one
//! platform (an image index followed to its entry), blobs streamed to a writer or into memory.

use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::{Client, Reference};
use tokio::io::AsyncWrite;

use crate::client::auth;
use crate::{sha256_digest, RegistryError};

fn registry(what: &Reference) -> impl Fn(OciDistributionError) -> RegistryError + '_ {
    move |e| RegistryError::Registry(format!("{what}: {e}"))
}

/// The manifest `reference` names (a tag resolved to its digest), and that digest.
pub async fn pull_manifest(
    client: &Client,
    reference: &Reference,
) -> Result<(OciManifest, String), RegistryError> {
    client
        .pull_manifest(reference, &auth(reference))
        .await
        .map_err(registry(reference))
}

/// The image manifest of `reference` for the platform `os`/`arch` (OCI's words: `linux`,
/// `amd64`) and its digest: an image index is followed to its entry for that platform.
pub async fn pull_platform_manifest(
    client: &Client,
    reference: &Reference,
    (os, arch): (&str, &str),
) -> Result<(OciImageManifest, String), RegistryError> {
    let (mut manifest, mut digest) = pull_manifest(client, reference).await?;
    if let OciManifest::ImageIndex(index) = &manifest {
        let found = index.manifests.iter().find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os.to_string() == os && p.architecture.to_string() == arch)
        });
        let Some(entry) = found else {
            let has: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            return Err(RegistryError::Platform(format!(
                "{reference} has no image for {os}/{arch} (it has {})",
                has.join(", ")
            )));
        };
        let pinned = reference.clone_with_digest(entry.digest.clone());
        (manifest, digest) = pull_manifest(client, &pinned).await?;
    }
    match manifest {
        OciManifest::Image(m) => Ok((m, digest)),
        OciManifest::ImageIndex(_) => Err(RegistryError::Registry(format!(
            "{reference}: an image index points at another index"
        ))),
    }
}

/// Streams the blob `desc` of `reference` into `out`; the client checks its digest as it
/// goes (a mismatch is [`RegistryError::Digest`], and `out` then holds bytes not to be used).
pub async fn pull_blob_to(
    client: &Client,
    reference: &Reference,
    desc: &OciDescriptor,
    out: impl AsyncWrite + Unpin,
) -> Result<(), RegistryError> {
    client
        .pull_blob(reference, desc, out)
        .await
        .map_err(|e| match e {
            OciDistributionError::DigestError(d) => RegistryError::Digest {
                expected: desc.digest.clone(),
                actual: match d {
                    oci_client::errors::DigestError::VerificationError { actual, .. } => actual,
                    d => d.to_string(),
                },
            },
            e => RegistryError::Registry(format!("blob {}: {e}", desc.digest)),
        })
}

/// The blob `digest` of `reference` in memory, refused unless its content hashes to `digest`
/// (hashed on a blocking thread: blobs can be large).
pub async fn pull_blob_verified(
    client: &Client,
    reference: &Reference,
    digest: &str,
) -> Result<Vec<u8>, RegistryError> {
    let mut bytes = Vec::new();
    client
        .pull_blob(reference, digest, &mut bytes)
        .await
        .map_err(|e| RegistryError::Registry(format!("blob {digest}: {e}")))?;
    let expected = digest.to_string();
    tokio::task::spawn_blocking(move || {
        let actual = sha256_digest(&bytes);
        if actual != expected {
            return Err(RegistryError::Digest { expected, actual });
        }
        Ok(bytes)
    })
    .await
    .map_err(|e| RegistryError::Registry(format!("the blob check ended: {e}")))?
}
