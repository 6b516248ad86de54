//! The image store: images pulled from OCI registries, their layers unpacked once into a
//! content-addressed layer store that every container of the node shares.
//!
//! Layout under the store's directory:
//! - `blobs/sha256/HEX`: image configs (layer blobs are deleted once unpacked);
//! - `layers/HEX`: an unpacked layer, named by its diff ID. It appears only complete: layers are
//!   unpacked into `layers/.tmp-…` and renamed once their diff ID checks out;
//! - `images/HEX.json`: what a reference resolved to (HEX = sha256 of the reference).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layer::{self, Compression};
use crate::OciError;

/// The platform this node runs, in OCI's words (`linux`, `amd64`).
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

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

/// Asks the registry whether `reference` is an OCI container image (true) or a wasm
/// artifact (false).
pub async fn is_container_image(reference: &str, insecure: &[String]) -> Result<bool, OciError> {
    let r: Reference = reference
        .parse()
        .map_err(|e| OciError::Reference(reference.to_string(), format!("{e}")))?;
    let client = client_for(&r, insecure);
    let (manifest, _) = client
        .pull_manifest(&r, &RegistryAuth::Anonymous)
        .await
        .map_err(|e| OciError::Registry(format!("{reference}: {e}")))?;
    Ok(!is_wasm(&manifest))
}

/// A registry client: plain HTTP for loopback and insecure registries.
pub fn client_for(reference: &Reference, insecure: &[String]) -> Client {
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_insecure(&registry, insecure) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        ..Default::default()
    })
}

/// An image pulled and unpacked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub reference: String,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    pub config_digest: String,
    pub config: ImageConfiguration,
    /// Diff IDs of the layers, base first.
    pub layers: Vec<String>,
}

impl Image {
    /// `repo@sha256:…`: what a container status reports as its imageID.
    pub fn id(&self) -> String {
        let repo = self
            .reference
            .split_once('@')
            .map_or(self.reference.as_str(), |(r, _)| r);
        let repo = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        format!("{repo}@{}", self.manifest_digest)
    }
}

/// What a pull reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    Resolved {
        digest: String,
        layers: usize,
    },
    Layer {
        index: usize,
        digest: String,
        size: i64,
        cached: bool,
    },
}

/// Images and their unpacked layers.
pub struct ImageStore {
    dir: PathBuf,
    insecure: Vec<String>,
}

fn hex_of(digest: &str) -> &str {
    digest.split_once(':').map_or(digest, |(_, h)| h)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OciError + '_ {
    move |e| OciError::Store(format!("{}: {e}", path.display()))
}

/// Registries reached over plain HTTP: loopback ones, and those listed as insecure.
pub fn is_insecure(registry: &str, insecure: &[String]) -> bool {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry);
    host == "localhost"
        || host.starts_with("127.")
        || host == "[::1]"
        || insecure.iter().any(|r| r == registry || r == host)
}

impl ImageStore {
    pub fn new(dir: impl Into<PathBuf>, insecure: Vec<String>) -> Result<ImageStore, OciError> {
        let dir = dir.into();
        for sub in ["blobs/sha256", "layers", "images"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        // Unpacks cut short by a crash are never used; drop them.
        if let Ok(rd) = std::fs::read_dir(dir.join("layers")) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(ImageStore { dir, insecure })
    }

    pub fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.dir.join("layers").join(hex_of(diff_id))
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(reference.as_bytes()));
        self.dir.join("images").join(format!("{h}.json"))
    }

    /// The image `reference` resolved to when last pulled, if all its layers are here. Marks
    /// it used now (garbage collection spares recently used images).
    pub fn get(&self, reference: &str) -> Option<Image> {
        let path = self.record_path(reference);
        let bytes = std::fs::read(&path).ok()?;
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        let image: Image = serde_json::from_slice(&bytes).ok()?;
        image
            .layers
            .iter()
            .all(|l| self.layer_dir(l).is_dir())
            .then_some(image)
    }

    /// Pulls `reference` for this node's platform, unpacking layers not already in the store.
    pub async fn pull(
        &self,
        reference: &str,
        mut progress: impl FnMut(Progress),
    ) -> Result<Image, OciError> {
        let r: Reference = reference
            .parse()
            .map_err(|e| OciError::Reference(reference.to_string(), format!("{e}")))?;
        let client = client_for(&r, &self.insecure);
        let auth = RegistryAuth::Anonymous;
        let registry = |e: oci_client::errors::OciDistributionError| {
            OciError::Registry(format!("{reference}: {e}"))
        };
        let (os, arch) = host_platform();
        let (mut manifest, mut digest) = client.pull_manifest(&r, &auth).await.map_err(registry)?;
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
                return Err(OciError::Platform(format!(
                    "{reference} has no image for {os}/{arch} (it has {})",
                    has.join(", ")
                )));
            };
            let pinned = r.clone_with_digest(entry.digest.clone());
            (manifest, digest) = client
                .pull_manifest(&pinned, &auth)
                .await
                .map_err(registry)?;
        }
        let OciManifest::Image(m) = manifest else {
            return Err(OciError::Registry(format!(
                "{reference}: an image index points at another index"
            )));
        };
        if is_wasm(&OciManifest::Image(m.clone())) {
            return Err(OciError::Unsupported(format!(
                "{reference} is a wasm artifact, not a container image"
            )));
        }
        progress(Progress::Resolved {
            digest: digest.clone(),
            layers: m.layers.len(),
        });
        let config_path = self.dir.join("blobs/sha256").join(hex_of(&m.config.digest));
        let mut config_bytes = Vec::new();
        client
            .pull_blob(&r, &m.config, &mut config_bytes)
            .await
            .map_err(registry)?;
        std::fs::write(&config_path, &config_bytes).map_err(io(&config_path))?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| OciError::Registry(format!("{reference}: bad image config: {e}")))?;
        if config.os().to_string() != os || config.architecture().to_string() != arch {
            return Err(OciError::Platform(format!(
                "{reference} is built for {}/{}; this node is {os}/{arch}",
                config.os(),
                config.architecture()
            )));
        }
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != m.layers.len() {
            return Err(OciError::Registry(format!(
                "{reference}: {} layers but {} diff IDs in the config",
                m.layers.len(),
                diff_ids.len()
            )));
        }
        for (i, (desc, diff_id)) in m.layers.iter().zip(&diff_ids).enumerate() {
            let cached = self.layer_dir(diff_id).is_dir();
            if !cached {
                self.fetch_layer(&client, &r, desc, diff_id).await?;
            }
            progress(Progress::Layer {
                index: i,
                digest: desc.digest.clone(),
                size: desc.size,
                cached,
            });
        }
        let image = Image {
            reference: reference.to_string(),
            manifest_digest: digest,
            config_digest: m.config.digest.clone(),
            config,
            layers: diff_ids,
        };
        let record = self.record_path(reference);
        let tmp = record.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&image).expect("image record"))
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &record).map_err(io(&record))?;
        Ok(image)
    }

    /// Downloads one layer (its digest checked by the client), unpacks it beside the store,
    /// checks the diff ID and only then moves it into place.
    async fn fetch_layer(
        &self,
        client: &Client,
        r: &Reference,
        desc: &OciDescriptor,
        diff_id: &str,
    ) -> Result<(), OciError> {
        let compression = Compression::of_media_type(&desc.media_type)?;
        let started = Instant::now();
        let blob = self.dir.join("blobs/sha256").join(hex_of(&desc.digest));
        let partial = blob.with_extension("partial");
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(io(&partial))?;
        let pulled = client.pull_blob(r, desc, file).await;
        if let Err(e) = pulled {
            let _ = std::fs::remove_file(&partial);
            return Err(match e {
                oci_client::errors::OciDistributionError::DigestError(d) => {
                    OciError::Digest(format!("layer {}: {d}", desc.digest))
                }
                e => OciError::Registry(format!("layer {}: {e}", desc.digest)),
            });
        }
        std::fs::rename(&partial, &blob).map_err(io(&blob))?;
        let tmp = self.dir.join("layers").join(format!(
            ".tmp-{}-{}",
            hex_of(diff_id),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let (b, t) = (blob.clone(), tmp.clone());
        let unpacked = tokio::task::spawn_blocking(move || layer::unpack(&b, compression, &t))
            .await
            .map_err(|e| OciError::Store(e.to_string()))
            .and_then(|r| r);
        let _ = std::fs::remove_file(&blob);
        let got = match unpacked {
            Ok(got) => got,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if got != diff_id {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(OciError::Digest(format!(
                "layer {} unpacks to {got}, but the image config says {diff_id}",
                desc.digest
            )));
        }
        let dest = self.layer_dir(diff_id);
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dest.is_dir() {
                return Err(io(&dest)(e));
            }
        }
        tracing::debug!(layer = %desc.digest, elapsed = ?started.elapsed(), "layer unpacked");
        Ok(())
    }

    /// Every image record in the store.
    pub fn images(&self) -> Vec<Image> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("images")) else {
            return vec![];
        };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// Forgets the images neither in `keep` (references) nor used within `min_age`, then
    /// removes every layer and config no remaining image uses. Returns the number of layers
    /// removed.
    pub fn gc(&self, keep: &HashSet<String>, min_age: std::time::Duration) -> usize {
        let mut used = HashSet::new();
        for image in self.images() {
            let recent = std::fs::metadata(self.record_path(&image.reference))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < min_age);
            if keep.contains(&image.reference) || recent {
                used.extend(image.layers.iter().map(|l| hex_of(l).to_string()));
                used.insert(hex_of(&image.config_digest).to_string());
            } else {
                let _ = std::fs::remove_file(self.record_path(&image.reference));
            }
        }
        let mut removed = 0;
        for (sub, is_layer) in [("layers", true), ("blobs/sha256", false)] {
            let Ok(rd) = std::fs::read_dir(self.dir.join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') || used.contains(&name) {
                    continue;
                }
                if is_layer {
                    removed += usize::from(std::fs::remove_dir_all(e.path()).is_ok());
                } else {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        removed
    }

    /// Bytes used by unpacked layers (as `du` counts them: allocated blocks, hard links once).
    pub fn layers_disk_usage(&self) -> u64 {
        crate::disk_usage(&self.dir.join("layers"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_name_the_repository_and_digest() {
        let mut image = Image {
            reference: "127.0.0.1:5000/bootcamp:v1".into(),
            manifest_digest: "sha256:ab".into(),
            config_digest: "sha256:c".into(),
            config: ImageConfiguration::default(),
            layers: vec![],
        };
        assert_eq!(image.id(), "127.0.0.1:5000/bootcamp@sha256:ab");
        image.reference = "busybox".into();
        assert_eq!(image.id(), "busybox@sha256:ab");
    }

    #[test]
    fn gc_keeps_the_layers_of_kept_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path(), vec![]).unwrap();
        let mk = |reference: &str, layers: &[&str]| {
            let image = Image {
                reference: reference.into(),
                manifest_digest: "sha256:m".into(),
                config_digest: "sha256:c".into(),
                config: ImageConfiguration::default(),
                layers: layers.iter().map(|l| format!("sha256:{l}")).collect(),
            };
            for l in layers {
                std::fs::create_dir_all(store.layer_dir(&format!("sha256:{l}"))).unwrap();
            }
            std::fs::write(
                store.record_path(reference),
                serde_json::to_vec(&image).unwrap(),
            )
            .unwrap();
        };
        mk("a:1", &["base", "a1"]);
        mk("b:1", &["base", "b1"]);
        assert!(store.get("a:1").is_some());
        // Both were just used: nothing goes.
        assert_eq!(
            store.gc(&HashSet::new(), std::time::Duration::from_secs(600)),
            0
        );
        let removed = store.gc(
            &HashSet::from(["a:1".to_string()]),
            std::time::Duration::ZERO,
        );
        assert_eq!(removed, 1);
        assert!(store.layer_dir("sha256:base").is_dir());
        assert!(store.layer_dir("sha256:a1").is_dir());
        assert!(!store.layer_dir("sha256:b1").exists());
        assert!(store.get("b:1").is_none());
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        assert!(is_insecure("127.0.0.1:5000", &[]));
        assert!(is_insecure("localhost:5000", &[]));
        assert!(!is_insecure("registry.example:5000", &[]));
        assert!(is_insecure(
            "registry.example:5000",
            &["registry.example".into()]
        ));
    }
}
