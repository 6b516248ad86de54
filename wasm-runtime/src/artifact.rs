//! Wasm artifacts in OCI registries: resolve a reference, tell wasm from OCI images by media
//! type, pull the wasm layer (digest verified, kept content-addressed), and push.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_client::manifest::OciManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

use crate::{is_temp, lock, prune, sha256_digest, touch, CacheFile, GcBounds};
use skiff_oci::KeyedLocks;

// What a wasm artifact is, and how registries are reached, is shared with the OCI side.
pub use skiff_oci::image::{client_for, is_insecure, WASM_CONFIG_TYPES, WASM_LAYER_TYPES};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0}")]
    Registry(String),
    #[error("the image {0} is not a wasm artifact (config {1})")]
    NotWasm(String, String),
    #[error("blob {expected} failed verification (got {actual})")]
    Digest { expected: String, actual: String },
    #[error("image cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
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

pub fn parse_reference(image: &str) -> Result<Reference, PullError> {
    image
        .parse::<Reference>()
        .map_err(|e| PullError::Reference(image.to_string(), e.to_string()))
}

fn registry_err(e: impl std::fmt::Display) -> PullError {
    PullError::Registry(e.to_string())
}

/// Resolves `image` to its manifest and says whether it is wasm.
pub async fn resolve(image: &str, insecure: &[String]) -> Result<Resolved, PullError> {
    let reference = parse_reference(image)?;
    let client = client_for(&reference, insecure);
    let (manifest, digest) = client
        .pull_manifest(&reference, &RegistryAuth::Anonymous)
        .await
        .map_err(registry_err)?;
    let wasm = skiff_oci::image::is_wasm(&manifest);
    let OciManifest::Image(m) = manifest else {
        // An index: wasm artifacts are single manifests; indexes are multi-platform OCI images.
        return Ok(Resolved::Image {
            manifest_digest: digest,
            config_media_type: "application/vnd.oci.image.index.v1+json".into(),
        });
    };
    match m
        .layers
        .iter()
        .find(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
    {
        Some(l) if wasm => Ok(Resolved::Wasm {
            manifest_digest: digest,
            layer_digest: l.digest.clone(),
            layer_media_type: l.media_type.clone(),
        }),
        _ => Ok(Resolved::Image {
            manifest_digest: digest,
            config_media_type: m.config.media_type.clone(),
        }),
    }
}

/// The content-addressed blob cache: `DIR/sha256/<hex>`.
pub struct BlobCache {
    dir: PathBuf,
    /// Digests being pulled now: one pull per digest, the others wait for it.
    flights: KeyedLocks,
}

impl BlobCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BlobCache {
            dir: dir.into(),
            flights: KeyedLocks::default(),
        }
    }

    pub fn path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        self.dir.join(alg).join(hex)
    }

    /// The blob, if cached and intact. Marks it used now.
    pub fn get(&self, digest: &str) -> Option<Vec<u8>> {
        let path = self.path(digest);
        let bytes = std::fs::read(&path)
            .ok()
            .filter(|b| sha256_digest(b) == digest)?;
        touch(&path);
        Some(bytes)
    }

    /// Whether a blob is cached (not checked).
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_file()
    }

    #[cfg(test)]
    pub(crate) fn put_for_test(&self, digest: &str, bytes: &[u8]) -> Result<PathBuf, PullError> {
        Self::put(self.path(digest), bytes)
    }

    /// Writes a blob under its own temporary name, then renames it into place.
    fn put(path: PathBuf, bytes: &[u8]) -> Result<PathBuf, PullError> {
        let io = |e| PullError::Cache {
            path: path.clone(),
            source: e,
        };
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(io)?;
        skiff_oci::write_atomic(&path, bytes).map_err(io)?;
        Ok(path)
    }

    /// Removes blobs not in `keep` (digests) as `bounds` allow, and writes a crash cut
    /// short. Returns how many files were removed. Blocking (a directory walk).
    pub fn collect(&self, keep: &HashSet<String>, bounds: GcBounds) -> usize {
        let mut files = Vec::new();
        for alg in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let alg_name = alg.file_name().to_string_lossy().to_string();
            for e in std::fs::read_dir(alg.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().to_string();
                let used = !is_temp(&name) && keep.contains(&format!("{alg_name}:{name}"));
                files.extend(CacheFile::of(e.path(), used));
            }
        }
        prune(files, bounds)
    }
}

/// Pulls the wasm layer `digest` of `image` into the cache (unless there) and returns it.
/// A blob whose content does not hash to its digest is refused and not kept. Concurrent pulls
/// of one digest fetch it once.
pub async fn pull_wasm(
    image: &str,
    layer_digest: &str,
    cache: &BlobCache,
    insecure: &[String],
) -> Result<Vec<u8>, PullError> {
    if let Some(b) = cache.get(layer_digest) {
        return Ok(b);
    }
    let _flight = cache.flights.lock(layer_digest).await;
    if let Some(b) = cache.get(layer_digest) {
        return Ok(b);
    }
    let reference = parse_reference(image)?;
    let client = client_for(&reference, insecure);
    let mut bytes = Vec::new();
    client
        .pull_blob(&reference, layer_digest, &mut bytes)
        .await
        .map_err(registry_err)?;
    let path = cache.path(layer_digest);
    let expected = layer_digest.to_string();
    tokio::task::spawn_blocking(move || {
        let actual = sha256_digest(&bytes);
        if actual != expected {
            return Err(PullError::Digest { expected, actual });
        }
        BlobCache::put(path, &bytes)?;
        Ok(bytes)
    })
    .await
    .map_err(|e| PullError::Registry(format!("the blob writer ended: {e}")))?
}

/// Pushes a wasm module or component to `image` in the CNCF wasm layout; returns the manifest URL.
pub async fn push(bytes: Vec<u8>, image: &str, insecure: &[String]) -> Result<String, PullError> {
    let reference = parse_reference(image)?;
    let client = oci_wasm::WasmClient::new(client_for(&reference, insecure));
    let is_component = crate::classify_bytes(&bytes)
        .ok_or_else(|| PullError::NotWasm(image.to_string(), "the file is not wasm".into()))?;
    let (config, layer) = if is_component {
        oci_wasm::WasmConfig::from_raw_component(bytes, None).map_err(registry_err)?
    } else {
        oci_wasm::WasmConfig::from_raw_module(bytes, None).map_err(registry_err)?
    };
    let resp = client
        .push(&reference, &RegistryAuth::Anonymous, layer, config, None)
        .await
        .map_err(registry_err)?;
    Ok(resp.manifest_url)
}

/// Which wasm layer a tag pointed to when it was last pulled: with `IfNotPresent` (or
/// `Never`) a node that has the image runs it without asking the registry — offline too.
/// Kept in one JSON file, replaced whole (and durably) under the index's lock at each change.
pub struct ImageIndex {
    path: PathBuf,
    map: Mutex<BTreeMap<String, (String, String)>>,
}

impl ImageIndex {
    pub fn open(path: impl Into<PathBuf>) -> ImageIndex {
        let path = path.into();
        let map = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable image index; starting empty");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        ImageIndex {
            path,
            map: Mutex::new(map),
        }
    }

    /// (manifest digest, layer digest) of `image`, if pulled before.
    pub fn get(&self, image: &str) -> Option<(String, String)> {
        lock(&self.map).get(image).cloned()
    }

    pub fn put(&self, image: &str, manifest: &str, layer: &str) {
        let mut m = lock(&self.map);
        let entry = (manifest.to_string(), layer.to_string());
        if m.get(image) == Some(&entry) {
            return;
        }
        m.insert(image.to_string(), entry);
        self.save(&m);
    }

    /// Keeps the entries `(image, manifest, layer)` for which `keep` says so; returns how many
    /// were dropped.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str, &str) -> bool) -> usize {
        let mut m = lock(&self.map);
        let before = m.len();
        m.retain(|image, (manifest, layer)| keep(image, manifest, layer));
        let dropped = before - m.len();
        if dropped > 0 {
            self.save(&m);
        }
        dropped
    }

    /// Writes the index; called with its lock held, so writes never interleave.
    fn save(&self, m: &BTreeMap<String, (String, String)>) {
        let body = serde_json::to_vec(m).expect("image index");
        if let Err(error) = skiff_oci::write_atomic(&self.path, &body) {
            tracing::warn!(path = %self.path.display(), %error, "cannot write the image index");
        }
    }
}
