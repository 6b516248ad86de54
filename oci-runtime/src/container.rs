//! Containers on disk: each has `containers/ID/` holding its overlay root filesystem (the
//! image's shared layers below, its own `upper` above) and its bundle's `config.json`, and
//! `containers/ID.layers`, the layers it mounts: its lease on them, which image garbage
//! collection honours (see [`Containers::layers_in_use`]) until the container is removed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::bundle::{self, ContainerSpec};
use crate::image::{Image, ImageStore};
use crate::OciError;

pub struct Containers {
    dir: PathBuf,
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> OciError {
    OciError::Store(format!("{}: {e}", path.display()))
}

impl Containers {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Containers, OciError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| store_err(&dir, e))?;
        Ok(Containers { dir })
    }

    /// The bundle directory of `id` (its `config.json` and `rootfs`).
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Mounts a fresh root filesystem for `id` over the image's layers and writes its bundle.
    /// Whatever an earlier container of that ID left is removed first: a restarted container
    /// starts from the image again, as Kubernetes' do.
    pub fn prepare(
        &self,
        id: &str,
        store: &ImageStore,
        image: &Image,
        spec: &ContainerSpec,
    ) -> Result<PathBuf, OciError> {
        // The lease first: from now on until `remove`, image GC keeps these layers, even if the
        // image's tag moves and its record names other layers.
        self.lease(id, image)?;
        self.remove_files(id)?;
        let dir = self.bundle(id);
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d).map_err(|e| store_err(d, e))?;
        }
        let mut lower: Vec<String> = image
            .layers
            .iter()
            .rev()
            .map(|l| store.layer_dir(l).display().to_string())
            .collect();
        if lower.is_empty() {
            let empty = dir.join("empty");
            std::fs::create_dir_all(&empty).map_err(|e| store_err(&empty, e))?;
            lower.push(empty.display().to_string());
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| OciError::Store(format!("overlay mount for {id}: {e}")))?;
        let result =
            bundle::spec(&image.config, spec, &rootfs).and_then(|s| bundle::write(&s, &dir));
        if result.is_err() {
            let _ = self.remove(id);
        }
        result.map(|_| dir)
    }

    fn lease_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.layers"))
    }

    /// Records (durably) that container `id` uses the layers of `image`.
    pub(crate) fn lease(&self, id: &str, image: &Image) -> Result<(), OciError> {
        let path = self.lease_path(id);
        let body = serde_json::to_vec(&image.layers).expect("layer list");
        skiff_registry::write_atomic(&path, &body).map_err(|e| store_err(&path, e))
    }

    /// Diff IDs of every layer a container here uses (until it is removed), read from disk:
    /// what an earlier agent run started counts too.
    pub fn layers_in_use(&self) -> HashSet<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return HashSet::new();
        };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "layers"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
            .flatten()
            .collect()
    }

    /// Unmounts and deletes what `id` has on disk, its lease on its layers last.
    pub fn remove(&self, id: &str) -> Result<(), OciError> {
        self.remove_files(id)?;
        let lease = self.lease_path(id);
        match std::fs::remove_file(&lease) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(store_err(&lease, e)),
            _ => Ok(()),
        }
    }

    /// Unmounts and deletes the container's directory (not its lease).
    fn remove_files(&self, id: &str) -> Result<(), OciError> {
        let dir = self.bundle(id);
        if !dir.exists() {
            return Ok(());
        }
        let rootfs = dir.join("rootfs");
        // Not mounted (EINVAL) is fine.
        let _ = umount2(&rootfs, MntFlags::MNT_DETACH);
        std::fs::remove_dir_all(&dir).map_err(|e| store_err(&dir, e))
    }

    /// IDs of every container with a directory or a lease here.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        if name.starts_with('.') {
                            None
                        } else if e.path().is_dir() {
                            Some(name)
                        } else {
                            name.strip_suffix(".layers").map(String::from)
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Bytes the containers' writable layers use.
    pub fn disk_usage(&self) -> u64 {
        self.ids()
            .iter()
            .map(|id| crate::disk_usage(&self.bundle(id).join("upper")))
            .sum()
    }
}
