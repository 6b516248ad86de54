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

/// A failed pull of the blob `digest`: the client's digest check failing is
/// [`RegistryError::Digest`].
fn blob_error(digest: &str) -> impl Fn(OciDistributionError) -> RegistryError + '_ {
    move |e| match e {
        OciDistributionError::DigestError(d) => RegistryError::Digest {
            expected: digest.to_string(),
            actual: match d {
                oci_client::errors::DigestError::VerificationError { actual, .. } => actual,
                d => d.to_string(),
            },
        },
        e => RegistryError::Registry(format!("blob {digest}: {e}")),
    }
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
        .map_err(blob_error(&desc.digest))
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
        .map_err(blob_error(digest))?;
    // The client checks what it can; the content is hashed here whatever it checked.
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use oci_client::manifest::{ImageIndexEntry, OciImageIndex, Platform};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{client_for, is_container_image, parse_reference, resolve, Resolved};

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";

    /// A registry on loopback serving `GET /v2/…` paths from a map: (content type, body).
    /// Manifests carry their digest header, as registries send it.
    async fn fake_registry(paths: HashMap<String, (String, Vec<u8>)>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(paths);
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let paths = paths.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&req).to_string();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let resp = match paths.get(&path) {
                        Some((content_type, body)) => {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nDocker-Content-Digest: {}\r\nConnection: close\r\n\r\n",
                                body.len(),
                                sha256_digest(body)
                            )
                            .into_bytes();
                            r.extend_from_slice(body);
                            r
                        }
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec(),
                    };
                    let _ = conn.write_all(&resp).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        addr.to_string()
    }

    fn desc(media_type: &str, body: &[u8]) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.into(),
            digest: sha256_digest(body),
            size: body.len() as i64,
            ..Default::default()
        }
    }

    fn manifest_json(config: OciDescriptor, layers: Vec<OciDescriptor>) -> Vec<u8> {
        serde_json::to_vec(&OciImageManifest {
            schema_version: 2,
            media_type: Some(MANIFEST.into()),
            config,
            layers,
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_wasm_artifact_and_a_container_image_resolve_to_their_digests_and_kinds() {
        let wasm = manifest_json(
            desc("application/vnd.wasm.config.v0+json", b"{}"),
            vec![desc("application/wasm", b"\0asm")],
        );
        let image = manifest_json(
            desc("application/vnd.oci.image.config.v1+json", b"{}"),
            vec![desc("application/vnd.oci.image.layer.v1.tar+gzip", b"tar")],
        );
        let (wasm_digest, image_digest) = (sha256_digest(&wasm), sha256_digest(&image));
        let addr = fake_registry(HashMap::from([
            ("/v2/wasm/manifests/v1".into(), (MANIFEST.into(), wasm)),
            ("/v2/app/manifests/v1".into(), (MANIFEST.into(), image)),
        ]))
        .await;
        match resolve(&format!("{addr}/wasm:v1"), &[]).await.unwrap() {
            Resolved::Wasm {
                manifest_digest,
                layer_digest,
                ..
            } => {
                assert_eq!(manifest_digest, wasm_digest);
                assert_eq!(layer_digest, sha256_digest(b"\0asm"));
            }
            other => panic!("not wasm: {other:?}"),
        }
        match resolve(&format!("{addr}/app:v1"), &[]).await.unwrap() {
            Resolved::Image {
                manifest_digest, ..
            } => assert_eq!(manifest_digest, image_digest),
            other => panic!("not an image: {other:?}"),
        }
        assert!(!is_container_image(&format!("{addr}/wasm:v1"), &[])
            .await
            .unwrap());
        assert!(is_container_image(&format!("{addr}/app:v1"), &[])
            .await
            .unwrap());
        assert!(matches!(
            resolve(&format!("{addr}/missing:v1"), &[]).await,
            Err(RegistryError::Registry(_))
        ));
    }

    #[tokio::test]
    async fn an_index_is_followed_to_the_platform_asked_for_or_says_what_it_has() {
        let arm = manifest_json(
            desc("application/vnd.oci.image.config.v1+json", b"{\"arm\":1}"),
            vec![],
        );
        let index = serde_json::to_vec(&OciImageIndex {
            schema_version: 2,
            media_type: Some(INDEX.into()),
            manifests: vec![ImageIndexEntry {
                media_type: MANIFEST.into(),
                digest: sha256_digest(&arm),
                size: arm.len() as i64,
                platform: Some(Platform {
                    architecture: "arm64".into(),
                    os: "linux".into(),
                    os_version: None,
                    os_features: None,
                    variant: None,
                    features: None,
                }),
                annotations: None,
                artifact_type: None,
            }],
            artifact_type: None,
            annotations: None,
        })
        .unwrap();
        let arm_digest = sha256_digest(&arm);
        let addr = fake_registry(HashMap::from([
            ("/v2/multi/manifests/v1".into(), (INDEX.into(), index)),
            (
                format!("/v2/multi/manifests/{arm_digest}"),
                (MANIFEST.into(), arm),
            ),
        ]))
        .await;
        let r = parse_reference(&format!("{addr}/multi:v1")).unwrap();
        let client = client_for(&r, &[]);
        let (m, digest) = pull_platform_manifest(&client, &r, ("linux", "arm64"))
            .await
            .unwrap();
        assert_eq!(digest, arm_digest);
        assert_eq!(m.config.digest, sha256_digest(b"{\"arm\":1}"));
        match pull_platform_manifest(&client, &r, ("linux", "amd64")).await {
            Err(RegistryError::Platform(why)) => assert!(why.contains("linux/arm64"), "{why}"),
            other => panic!("not a platform error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn blobs_whose_content_is_not_their_digest_are_refused() {
        let good = b"the wasm layer".to_vec();
        let claimed = sha256_digest(b"what the manifest says");
        let addr = fake_registry(HashMap::from([
            (
                format!("/v2/app/blobs/{}", sha256_digest(&good)),
                ("application/octet-stream".into(), good.clone()),
            ),
            (
                format!("/v2/app/blobs/{claimed}"),
                ("application/octet-stream".into(), b"tampered".to_vec()),
            ),
        ]))
        .await;
        let r = parse_reference(&format!("{addr}/app:v1")).unwrap();
        let client = client_for(&r, &[]);
        let got = pull_blob_verified(&client, &r, &sha256_digest(&good))
            .await
            .unwrap();
        assert_eq!(got, good);
        match pull_blob_verified(&client, &r, &claimed).await {
            Err(RegistryError::Digest { expected, actual }) => {
                assert_eq!(expected, claimed);
                assert_eq!(actual, sha256_digest(b"tampered"));
            }
            other => panic!("not refused: {other:?}"),
        }
        // Streamed with its descriptor, the client checks it as it goes.
        let mut out = Vec::new();
        let tampered = OciDescriptor {
            media_type: "application/octet-stream".into(),
            digest: claimed.clone(),
            size: 8,
            ..Default::default()
        };
        match pull_blob_to(&client, &r, &tampered, &mut out).await {
            Err(RegistryError::Digest { expected, .. }) => assert_eq!(expected, claimed),
            other => panic!("not refused: {other:?}"),
        }
        let mut out = Vec::new();
        pull_blob_to(
            &client,
            &r,
            &desc("application/octet-stream", &good),
            &mut out,
        )
        .await
        .unwrap();
        assert_eq!(out, good);
    }
}
