//! What a reference is: a wasm artifact (run by the wasm runtime) or a container image (run
//! by runc), told apart by the media types of its manifest.

use oci_client::manifest::OciManifest;

use crate::client::{auth, client_for, parse_reference};
use crate::RegistryError;

/// Config media types of wasm artifacts (CNCF, and the older wasm-to-oci one).
pub const WASM_CONFIG_TYPES: &[&str] = &[
    "application/vnd.wasm.config.v0+json",
    "application/vnd.wasm.config.v1+json",
];
/// Layer media types of wasm: CNCF, Spin, Krustlet / wasm-to-oci.
pub const WASM_LAYER_TYPES: &[&str] = &[
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.module.wasm.content.layer.v1+wasm",
];

/// Whether a manifest is a wasm artifact: a wasm config type, or a single wasm layer.
/// Everything else (image indexes included) is a container image for runc.
pub fn is_wasm(manifest: &OciManifest) -> bool {
    let OciManifest::Image(m) = manifest else {
        return false;
    };
    let wasm_layer = m
        .layers
        .iter()
        .any(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()));
    wasm_layer && (WASM_CONFIG_TYPES.contains(&m.config.media_type.as_str()) || m.layers.len() == 1)
}

/// Whether `bytes` are a wasm component (`Some(true)`) or a core module (`Some(false)`), by
/// the binary's header (`\0asm` with version 1 is a core module; layer 1 with version 0x0d a
/// component); `None` for anything else.
pub fn is_component(bytes: &[u8]) -> Option<bool> {
    match bytes.get(0..8)? {
        [0, b'a', b's', b'm', 1, 0, 0, 0] => Some(false),
        [0, b'a', b's', b'm', _, 0, 1, 0] => Some(true),
        _ => None,
    }
}

/// What a reference resolves to.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A wasm artifact: the digest of its wasm layer and the manifest digest.
    Wasm {
        manifest_digest: String,
        layer_digest: String,
        layer_media_type: String,
    },
    /// Anything else: an OCI image for runc.
    Image {
        manifest_digest: String,
        config_media_type: String,
    },
}

impl Resolved {
    /// The [`Resolved`] of a manifest fetched with digest `digest`.
    pub fn of(manifest: &OciManifest, digest: String) -> Resolved {
        let OciManifest::Image(m) = manifest else {
            // An index: wasm artifacts are single manifests; indexes are multi-platform images.
            return Resolved::Image {
                manifest_digest: digest,
                config_media_type: "application/vnd.oci.image.index.v1+json".into(),
            };
        };
        match m
            .layers
            .iter()
            .find(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
        {
            Some(l) if is_wasm(manifest) => Resolved::Wasm {
                manifest_digest: digest,
                layer_digest: l.digest.clone(),
                layer_media_type: l.media_type.clone(),
            },
            _ => Resolved::Image {
                manifest_digest: digest,
                config_media_type: m.config.media_type.clone(),
            },
        }
    }

    pub fn is_wasm(&self) -> bool {
        matches!(self, Resolved::Wasm { .. })
    }
}

/// Resolves `image` to its manifest (a tag to a digest) and says whether it is wasm.
pub async fn resolve(image: &str, insecure: &[String]) -> Result<Resolved, RegistryError> {
    let reference = parse_reference(image)?;
    let client = client_for(&reference, insecure);
    let (manifest, digest) = client
        .pull_manifest(&reference, &auth(&reference))
        .await
        .map_err(|e| RegistryError::Registry(format!("{image}: {e}")))?;
    Ok(Resolved::of(&manifest, digest))
}

/// Asks the registry whether `reference` is an OCI container image (true) or a wasm
/// artifact (false).
pub async fn is_container_image(
    reference: &str,
    insecure: &[String],
) -> Result<bool, RegistryError> {
    Ok(!resolve(reference, insecure).await?.is_wasm())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::manifest::{OciDescriptor, OciImageIndex, OciImageManifest};

    fn manifest(config: &str, layers: &[&str]) -> OciManifest {
        let desc = |media_type: &str, n: usize| OciDescriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{n:064x}"),
            size: 1,
            ..Default::default()
        };
        OciManifest::Image(OciImageManifest {
            config: desc(config, 0),
            layers: layers
                .iter()
                .enumerate()
                .map(|(i, l)| desc(l, i + 1))
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn components_are_told_from_core_modules_by_their_header() {
        assert_eq!(is_component(b"\0asm\x01\0\0\0"), Some(false));
        assert_eq!(is_component(b"\0asm\x0d\0\x01\0rest"), Some(true));
        assert_eq!(is_component(b"\0asm"), None);
        assert_eq!(is_component(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn wasm_artifacts_are_told_from_container_images_by_media_type() {
        let cncf = manifest("application/vnd.wasm.config.v0+json", &["application/wasm"]);
        assert!(is_wasm(&cncf));
        // Spin and wasm-to-oci: a single wasm layer under a generic config.
        let single = manifest(
            "application/vnd.oci.image.config.v1+json",
            &["application/vnd.wasm.content.layer.v1+wasm"],
        );
        assert!(is_wasm(&single));
        let image = manifest(
            "application/vnd.oci.image.config.v1+json",
            &[
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ],
        );
        assert!(!is_wasm(&image));
        // A wasm file among other layers of a generic config is a container image.
        let mixed = manifest(
            "application/vnd.oci.image.config.v1+json",
            &[
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/wasm",
            ],
        );
        assert!(!is_wasm(&mixed));
        assert!(!is_wasm(&OciManifest::ImageIndex(OciImageIndex {
            schema_version: 2,
            media_type: None,
            manifests: vec![],
            artifact_type: None,
            annotations: None,
        })));
    }

    #[test]
    fn resolved_names_the_wasm_layer_or_the_image_config() {
        let cncf = manifest("application/vnd.wasm.config.v0+json", &["application/wasm"]);
        match Resolved::of(&cncf, "sha256:m".into()) {
            Resolved::Wasm {
                manifest_digest,
                layer_digest,
                layer_media_type,
            } => {
                assert_eq!(manifest_digest, "sha256:m");
                assert_eq!(layer_digest, format!("sha256:{:064x}", 1));
                assert_eq!(layer_media_type, "application/wasm");
            }
            other => panic!("not wasm: {other:?}"),
        }
        let image = manifest(
            "application/vnd.oci.image.config.v1+json",
            &["application/vnd.oci.image.layer.v1.tar+gzip"],
        );
        match Resolved::of(&image, "sha256:m".into()) {
            Resolved::Image {
                config_media_type, ..
            } => assert_eq!(
                config_media_type,
                "application/vnd.oci.image.config.v1+json"
            ),
            other => panic!("not an image: {other:?}"),
        }
    }
}
