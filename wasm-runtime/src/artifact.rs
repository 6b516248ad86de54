//! Wasm artifacts in OCI registries: the wasm layer pulled (digest verified by
//! `skiff-registry`) into a content-addressed cache, and the tag → layer index for running
//! offline. Pushing is `skiff_registry::push_wasm`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use skiff_registry::{client_for, parse_reference, KeyedLocks, RegistryError};

use crate::{is_temp, lock, prune, sha256_digest, touch, CacheFile, GcBounds};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0}")]
    Registry(String),
    #[error("blob {expected} failed verification (got {actual})")]
    Digest { expected: String, actual: String },
    #[error("image cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<RegistryError> for PullError {
    fn from(e: RegistryError) -> PullError {
        match e {
            RegistryError::Reference(image, why) => PullError::Reference(image, why),
            RegistryError::Digest { expected, actual } => PullError::Digest { expected, actual },
            e => PullError::Registry(e.to_string()),
        }
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
        skiff_registry::write_atomic(&path, bytes).map_err(io)?;
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
    let bytes = skiff_registry::pull_blob_verified(&client, &reference, layer_digest).await?;
    let path = cache.path(layer_digest);
    tokio::task::spawn_blocking(move || {
        BlobCache::put(path, &bytes)?;
        Ok(bytes)
    })
    .await
    .map_err(|e| PullError::Registry(format!("the blob writer ended: {e}")))?
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
        if let Err(error) = skiff_registry::write_atomic(&self.path, &body) {
            tracing::warn!(path = %self.path.display(), %error, "cannot write the image index");
        }
    }
}
