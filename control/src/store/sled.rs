//! The store's earlier back end, sled, read once to move its objects into SQLite
//! ([`super::sqlite`]): sled's log-structured files grew without bound under many small
//! updates and never gave the space of deleted objects back.
//!
//! Layout read: one tree, `registry`, holding each object's stored bytes (Secrets sealed) under
//! its key and the revision counter under [`REVISION_KEY`]; sled's files in the store's
//! directory are `conf`, `db`, `blobs/` and `snap.*`.

use std::path::Path;

use super::StoreError;

/// Where sled kept the revision counter, beside the objects.
pub const REVISION_KEY: &[u8] = b"\0revision";
/// The tree the objects were in.
pub const TREE: &str = "registry";

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("reading the sled store: {e}"))
}

/// Whether `dir` holds a sled store.
fn present(dir: &Path) -> bool {
    dir.join("conf").exists() || dir.join("db").exists()
}

/// The revision and every object's stored bytes of the sled store in `dir`, if there is one.
pub(crate) fn read(dir: &Path) -> Result<Option<super::sqlite::Contents>, StoreError> {
    if !present(dir) {
        return Ok(None);
    }
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(8 * 1024 * 1024)
        .open()
        .map_err(backend)?;
    let tree = db.open_tree(TREE).map_err(backend)?;
    let revision = match tree.get(REVISION_KEY).map_err(backend)? {
        Some(b) => u64::from_be_bytes(b.as_ref().try_into().map_err(backend)?),
        None => 1,
    };
    let mut objects = Vec::new();
    for kv in tree.scan_prefix(b"/") {
        let (k, v) = kv.map_err(backend)?;
        objects.push((String::from_utf8(k.to_vec()).map_err(backend)?, v.to_vec()));
    }
    Ok(Some((revision, objects)))
}

/// Removes sled's files from `dir` (nothing else there).
pub(crate) fn remove(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        match &*name {
            "blobs" => std::fs::remove_dir_all(&path)?,
            "conf" | "db" => std::fs::remove_file(&path)?,
            n if n.starts_with("snap.") => std::fs::remove_file(&path)?,
            _ => {}
        }
    }
    Ok(())
}
