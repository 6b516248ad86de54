//! The server's data dir is readable by its owner only: the store holds every Secret, and
//! beside it lie the CA's key, the admin token and the kubeconfig. Directories are made
//! `0700` and files `0600` (or written so, see [`crate::server::write_private`]); what an
//! older version left more open is closed again at start: the data dir itself, the files in
//! it and the whole store.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Makes `dir` (and any missing parent) with mode `0700`, and sets `0700` on it if it existed.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Takes group and other permissions off everything under `dir` (symbolic links are not
/// followed); returns how many entries it changed. For directories that are the server's
/// alone, such as the store's.
pub fn restrict_tree(dir: &Path) -> io::Result<usize> {
    restrict(dir, true)
}

/// As [`restrict_tree`], but only the files directly in `dir`: the server's own files in a
/// data dir someone may also have put other things in, which are left as they are.
pub fn restrict_files(dir: &Path) -> io::Result<usize> {
    restrict(dir, false)
}

fn restrict(dir: &Path, recursive: bool) -> io::Result<usize> {
    let mut changed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = match entry.path().symlink_metadata() {
                Ok(m) => m,
                // Removed meanwhile (the store replaces its snapshot files).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.file_type().is_symlink() || (!recursive && meta.is_dir()) {
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                match std::fs::set_permissions(
                    entry.path(),
                    std::fs::Permissions::from_mode(mode & !0o077),
                ) {
                    Ok(()) => changed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(changed)
}

/// The paths under `dir` that someone other than the owner may read, write or enter.
pub fn open_to_others(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut open = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
        open.push(dir.to_path_buf());
    }
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.file_type().is_symlink() {
                continue;
            }
            if meta.permissions().mode() & 0o077 != 0 {
                open.push(entry.path());
            }
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_left_open_is_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(dir.join("store/blobs")).unwrap();
        std::fs::write(dir.join("store/db"), b"x").unwrap();
        std::fs::write(dir.join("store/blobs/1"), b"x").unwrap();
        std::fs::write(dir.join("ca.key"), b"x").unwrap();
        for p in ["", "store", "store/blobs"] {
            std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in ["store/db", "store/blobs/1", "ca.key"] {
            std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        assert_eq!(open_to_others(&dir).unwrap().len(), 6);
        private_dir(&dir).unwrap();
        assert_eq!(restrict_tree(&dir).unwrap(), 5);
        assert!(open_to_others(&dir).unwrap().is_empty());
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("store"), 0o700);
        assert_eq!(mode("store/db"), 0o600);
        // Only the files directly in a directory, when asked so.
        let other = tmp.path().join("other");
        std::fs::create_dir_all(other.join("sub")).unwrap();
        std::fs::write(other.join("f"), b"x").unwrap();
        std::fs::write(other.join("sub/g"), b"x").unwrap();
        for p in ["f", "sub/g"] {
            std::fs::set_permissions(other.join(p), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        assert_eq!(restrict_files(&other).unwrap(), 1);
        assert_eq!(
            std::fs::metadata(other.join("sub/g"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o644
        );
        // A new directory is made private from the start.
        let fresh = tmp.path().join("a/b");
        private_dir(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
