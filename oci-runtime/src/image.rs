//! The image store: images pulled from OCI registries, their layers unpacked once into a
//! content-addressed layer store that every container of the node shares.
//!
//! Layout under the store's directory:
//! - `blobs/sha256/HEX`: image configs (layer blobs are deleted once unpacked);
//! - `layers/HEX`: an unpacked layer, named by its diff ID. It appears only complete: layers are
//!   unpacked into `layers/.tmp-…` (a name of their own per unpack) and renamed once their
//!   diff ID checks out and their files are on disk; one pull at a time fetches a layer;
//! - `images/HEX.json`: what a reference resolved to (HEX = sha256 of the reference).

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skiff_registry::{
    client_for, is_wasm, parse_reference, pull_blob_to, pull_platform_manifest, Client, KeyedLocks,
    OciDescriptor, OciManifest, Reference, RegistryError, TEMP_PREFIX,
};

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
    /// Layers being fetched now, by diff ID: one fetch per layer, other pulls wait for it.
    flights: KeyedLocks,
}

fn hex_of(digest: &str) -> &str {
    digest.split_once(':').map_or(digest, |(_, h)| h)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OciError + '_ {
    move |e| OciError::Store(format!("{}: {e}", path.display()))
}

impl ImageStore {
    pub fn new(dir: impl Into<PathBuf>, insecure: Vec<String>) -> Result<ImageStore, OciError> {
        let dir = dir.into();
        for sub in ["blobs/sha256", "layers", "images"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        // Downloads and unpacks cut short by a crash are never used; drop them.
        for sub in ["layers", "blobs/sha256", "images"] {
            for e in std::fs::read_dir(dir.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let _ = std::fs::remove_dir_all(e.path());
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(ImageStore {
            dir,
            insecure,
            flights: KeyedLocks::default(),
        })
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
        let r = parse_reference(reference)?;
        let client = client_for(&r, &self.insecure);
        let (os, arch) = host_platform();
        let (m, digest) = pull_platform_manifest(&client, &r, (os, arch)).await?;
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
        pull_blob_to(&client, &r, &m.config, &mut config_bytes).await?;
        skiff_registry::write_atomic(&config_path, &config_bytes).map_err(io(&config_path))?;
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
            let mut cached = self.layer_dir(diff_id).is_dir();
            if !cached {
                // Another pull of this layer (another image, or another pod of this one) may
                // be under way: wait for it rather than fetch it twice.
                let _flight = self.flights.lock(diff_id).await;
                cached = self.layer_dir(diff_id).is_dir();
                if !cached {
                    self.fetch_layer(&client, &r, desc, diff_id).await?;
                }
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
        skiff_registry::write_atomic(&record, &serde_json::to_vec(&image).expect("image record"))
            .map_err(io(&record))?;
        Ok(image)
    }

    /// Downloads one layer (its digest checked by the client), unpacks it beside the store,
    /// checks the diff ID and only then moves it into place. The download and the unpack each
    /// have a name of their own: concurrent pulls never share a file.
    async fn fetch_layer(
        &self,
        client: &Client,
        r: &Reference,
        desc: &OciDescriptor,
        diff_id: &str,
    ) -> Result<(), OciError> {
        let compression = Compression::of_media_type(&desc.media_type)?;
        let started = Instant::now();
        let blobs = self.dir.join("blobs/sha256");
        let partial = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&blobs)
            .map_err(io(&blobs))?;
        let file = tokio::fs::File::from_std(partial.reopen().map_err(io(partial.path()))?);
        pull_blob_to(client, r, desc, file)
            .await
            .map_err(|e| match e {
                RegistryError::Digest { expected, actual } => {
                    OciError::Digest(format!("layer {expected}: it hashes to {actual}"))
                }
                e => OciError::Registry(format!("layer {}: {e}", desc.digest)),
            })?;
        let installed = self
            .install_layer(partial.path(), compression, diff_id)
            .await;
        // The blob is not kept once unpacked (dropping the temporary file removes it).
        drop(partial);
        installed.map_err(|e| match e {
            OciError::Digest(why) => OciError::Digest(format!("layer {}: {why}", desc.digest)),
            e => e,
        })?;
        tracing::debug!(layer = %desc.digest, elapsed = ?started.elapsed(), "layer unpacked");
        Ok(())
    }

    /// Unpacks the layer blob at `blob` into a directory of its own beside the store, checks
    /// that it is `diff_id` and only then renames it into `layers/`. If another pull put the
    /// layer there meanwhile, that one stays and this one is dropped.
    async fn install_layer(
        &self,
        blob: &Path,
        compression: Compression,
        diff_id: &str,
    ) -> Result<(), OciError> {
        let layers = self.dir.join("layers");
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempdir_in(&layers)
            .map_err(io(&layers))?;
        // The layer's root is the container's `/` where the tar does not say otherwise.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io(tmp.path()))?;
        let dest = self.layer_dir(diff_id);
        let (b, t, d, want) = (
            blob.to_path_buf(),
            tmp.path().to_path_buf(),
            dest.clone(),
            diff_id.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            let got = layer::unpack(&b, compression, &t)?;
            if got != want {
                return Err(OciError::Digest(format!(
                    "it unpacks to {got}, but the image config says {want}"
                )));
            }
            // The layer's files are on disk before its name says it is complete.
            nix::unistd::syncfs(std::fs::File::open(&t).map_err(io(&t))?.as_raw_fd())
                .map_err(|e| OciError::Store(format!("{}: {e}", t.display())))?;
            match std::fs::rename(&t, &d) {
                Ok(()) => skiff_registry::util::sync_dir(d.parent().unwrap_or(Path::new("/")))
                    .map_err(io(&d)),
                // Already there: another pull finished first (both checked the same diff ID).
                Err(_) if d.is_dir() => Ok(()),
                Err(e) => Err(io(&d)(e)),
            }
        })
        .await
        .map_err(|e| OciError::Store(e.to_string()))?
        // Dropping `tmp` removes what is left of it (everything unless renamed).
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
    /// removes every layer and config that no remaining image uses and that is not in
    /// `layers_in_use` (diff IDs containers mount: [`crate::Containers::layers_in_use`]; a
    /// container keeps its layers after its image's tag moved). Returns the number of layers
    /// removed.
    pub fn gc(
        &self,
        keep: &HashSet<String>,
        min_age: std::time::Duration,
        layers_in_use: &HashSet<String>,
    ) -> usize {
        let mut used: HashSet<String> = layers_in_use
            .iter()
            .map(|l| hex_of(l).to_string())
            .collect();
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

    /// Records `reference` as pulled with `layers` (their directories made).
    fn record(store: &ImageStore, reference: &str, layers: &[&str]) {
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
    }

    #[test]
    fn gc_keeps_the_layers_of_kept_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path(), vec![]).unwrap();
        let mk = |reference: &str, layers: &[&str]| record(&store, reference, layers);
        mk("a:1", &["base", "a1"]);
        mk("b:1", &["base", "b1"]);
        assert!(store.get("a:1").is_some());
        // Both were just used: nothing goes.
        assert_eq!(
            store.gc(
                &HashSet::new(),
                std::time::Duration::from_secs(600),
                &HashSet::new()
            ),
            0
        );
        let removed = store.gc(
            &HashSet::from(["a:1".to_string()]),
            std::time::Duration::ZERO,
            &HashSet::new(),
        );
        assert_eq!(removed, 1);
        assert!(store.layer_dir("sha256:base").is_dir());
        assert!(store.layer_dir("sha256:a1").is_dir());
        assert!(!store.layer_dir("sha256:b1").exists());
        assert!(store.get("b:1").is_none());
    }

    #[test]
    fn gc_keeps_the_layers_a_container_uses_after_its_tag_moved() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"), vec![]).unwrap();
        let containers = crate::Containers::new(dir.path().join("containers")).unwrap();
        record(&store, "app:v1", &["base", "old"]);
        let running = store.get("app:v1").unwrap();
        containers.lease("pod1-app", &running).unwrap();
        // The tag moved and was pulled again: its record now names other layers.
        record(&store, "app:v1", &["base", "new"]);
        let keep = HashSet::from(["app:v1".to_string()]);
        let gc =
            |c: &crate::Containers| store.gc(&keep, std::time::Duration::ZERO, &c.layers_in_use());
        assert_eq!(gc(&containers), 0);
        // What the container mounts on its next restart is all there; after an agent restart
        // too (the lease is on disk).
        let reopened = crate::Containers::new(dir.path().join("containers")).unwrap();
        assert_eq!(gc(&reopened), 0);
        assert!(running.layers.iter().all(|l| store.layer_dir(l).is_dir()));
        assert_eq!(reopened.ids(), vec!["pod1-app".to_string()]);
        // Once the container is removed, its old layer goes.
        containers.remove("pod1-app").unwrap();
        assert_eq!(gc(&containers), 1);
        assert!(!store.layer_dir("sha256:old").exists());
        assert!(store.layer_dir("sha256:new").is_dir());
        assert!(containers.ids().is_empty());
    }

    /// A gzip layer blob of `files` (name, size) and its diff ID.
    fn layer_blob(dir: &Path, files: &[(&str, usize)]) -> (PathBuf, String) {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, size) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(*size as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, name, &vec![b'x'; *size][..])
                .unwrap();
        }
        let raw = tar.into_inner().unwrap();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&raw)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let path = dir.join("layer.tar.gz");
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        (path, diff_id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_installs_of_one_layer_all_succeed_with_the_whole_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(ImageStore::new(dir.path().join("store"), vec![]).unwrap());
        let files: Vec<(String, usize)> = (0..200).map(|i| (format!("f{i}"), 16 << 10)).collect();
        let named: Vec<(&str, usize)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let (blob, diff_id) = layer_blob(dir.path(), &named);
        for round in 0..3 {
            let _ = std::fs::remove_dir_all(store.layer_dir(&diff_id));
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let (store, blob, diff_id) = (store.clone(), blob.clone(), diff_id.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .install_layer(&blob, Compression::Gzip, &diff_id)
                        .await
                }));
            }
            for t in tasks {
                t.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
            let n = std::fs::read_dir(store.layer_dir(&diff_id))
                .unwrap()
                .count();
            assert_eq!(
                n, 200,
                "round {round}: the layer in the store is incomplete"
            );
        }
        let left: Vec<_> = std::fs::read_dir(dir.path().join("store/layers"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "temporary unpacks left behind: {left:?}");
    }
}
