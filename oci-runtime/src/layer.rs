//! Unpacking one image layer into a directory that overlayfs can stack.
//!
//! A layer is a tar stream (plain, gzip or zstd). Its whiteouts are turned into overlayfs's own
//! form as they are met, so the unpacked directories are used as lower layers as they are:
//! `.wh.NAME` becomes a 0/0 character device `NAME`, and `.wh..wh..opq` marks its directory
//! opaque (`trusted.overlay.opaque=y`). The uncompressed stream is hashed on the way through and
//! must equal the layer's diff ID from the image config.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::OciError;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn of_media_type(media_type: &str) -> Result<Compression, OciError> {
        let m = media_type;
        if m.ends_with("tar+gzip") || m.ends_with("tar.gzip") || m.ends_with(".tar.gz") {
            Ok(Compression::Gzip)
        } else if m.ends_with("tar+zstd") {
            Ok(Compression::Zstd)
        } else if m.ends_with(".tar") || m.ends_with("rootfs.diff.tar") {
            Ok(Compression::None)
        } else {
            Err(OciError::Unsupported(format!("layer media type {m}")))
        }
    }
}

/// Reads through, hashing what it reads.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A path inside the layer, with `.` and leading `/` dropped; `..` is refused.
fn clean(path: &Path) -> Result<PathBuf, OciError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            _ => {
                return Err(OciError::BadLayer(format!(
                    "entry {} leaves the layer",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> OciError {
    OciError::BadLayer(format!("{what} {}: {e}", path.display()))
}

/// Unpacks `blob` into `dest` (which must not exist yet) and returns the digest of the
/// uncompressed stream (`sha256:…`).
pub fn unpack(blob: &Path, compression: Compression, dest: &Path) -> Result<String, OciError> {
    let file = std::fs::File::open(blob).map_err(|e| io_err("open", blob, e))?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(file).map_err(|e| io_err("zstd", blob, e))?)
        }
    };
    let mut hashing = Hashing {
        inner: reader,
        hash: Sha256::new(),
    };
    std::fs::create_dir_all(dest).map_err(|e| io_err("create", dest, e))?;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        let entries = archive.entries().map_err(|e| io_err("read", blob, e))?;
        for entry in entries {
            let mut entry = match entry {
                Ok(entry) => entry,
                // A stream cut right after its last entry's data (no padding, no end blocks):
                // some image builders write those. The diff ID below still vouches for it.
                Err(e)
                    if e.kind() == io::ErrorKind::UnexpectedEof
                        || e.to_string() == "unexpected EOF during skip" =>
                {
                    break
                }
                Err(e) => return Err(io_err("read", blob, e)),
            };
            let path = clean(&entry.path().map_err(|e| io_err("read", blob, e))?)?;
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let parent = dest.join(path.parent().unwrap_or(Path::new("")));
            if name == ".wh..wh..opq" {
                std::fs::create_dir_all(&parent).map_err(|e| io_err("create", &parent, e))?;
                xattr::set(&parent, "trusted.overlay.opaque", b"y")
                    .map_err(|e| io_err("mark opaque", &parent, e))?;
            } else if let Some(hidden) = name.strip_prefix(".wh.") {
                std::fs::create_dir_all(&parent).map_err(|e| io_err("create", &parent, e))?;
                let target = parent.join(hidden);
                let _ = std::fs::remove_file(&target);
                let _ = std::fs::remove_dir_all(&target);
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .map_err(|e| io_err("whiteout", &target, e))?;
            } else {
                entry.unpack_in(dest).map_err(|e| {
                    let why = std::error::Error::source(&e)
                        .and_then(std::error::Error::source)
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| e.to_string());
                    io_err("unpack", &path, why)
                })?;
            }
        }
    }
    // The tar reader may stop before the end-of-archive padding; the digest covers it all.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| io_err("read", blob, e))?;
    Ok(format!("sha256:{}", hex::encode(hashing.hash.finalize())))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A tar stream of (path, contents) regular files; a `None` content is a directory.
    pub fn tar_of(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match body {
                Some(body) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(body.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, body.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    pub fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    #[test]
    fn unpacks_gzip_and_zstd_and_reports_the_diff_id() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[
            ("etc/", None),
            ("etc/motd", Some("hello\n")),
            ("./bin/x", Some("x")),
        ]);
        for (c, blob) in [
            (Compression::Gzip, gzip(&tar)),
            (Compression::Zstd, zstd::encode_all(&tar[..], 1).unwrap()),
            (Compression::None, tar.clone()),
        ] {
            let src = dir.path().join(format!("{c:?}.blob"));
            std::fs::write(&src, blob).unwrap();
            let dest = dir.path().join(format!("{c:?}"));
            let diff_id = unpack(&src, c, &dest).unwrap();
            assert_eq!(diff_id, sha(&tar));
            assert_eq!(
                std::fs::read_to_string(dest.join("etc/motd")).unwrap(),
                "hello\n"
            );
            assert_eq!(std::fs::read(dest.join("bin/x")).unwrap(), b"x");
        }
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: whiteouts need root (mknod, trusted xattrs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[
            ("etc/.wh.passwd", Some("")),
            ("var/cache/", None),
            ("var/cache/.wh..wh..opq", Some("")),
            ("var/cache/new", Some("n")),
        ]);
        let src = dir.path().join("l.tar");
        std::fs::write(&src, &tar).unwrap();
        let dest = dir.path().join("l");
        unpack(&src, Compression::None, &dest).unwrap();
        use std::os::unix::fs::FileTypeExt;
        let wh = std::fs::symlink_metadata(dest.join("etc/passwd")).unwrap();
        assert!(wh.file_type().is_char_device(), "whiteout is a 0/0 device");
        assert!(!dest.join("etc/.wh.passwd").exists());
        assert_eq!(
            xattr::get(dest.join("var/cache"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert!(!dest.join("var/cache/.wh..wh..opq").exists());
        assert!(dest.join("var/cache/new").exists());
    }

    #[test]
    fn a_stream_without_end_blocks_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let full = tar_of(&[("a", Some("x")), ("b", Some("hello"))]);
        // Cut after the last entry's data: no padding and no end-of-archive blocks.
        let cut = &full[..512 + 512 + 512 + 5];
        let src = dir.path().join("cut.tar");
        std::fs::write(&src, cut).unwrap();
        let diff_id = unpack(&src, Compression::None, &dir.path().join("l")).unwrap();
        assert_eq!(diff_id, sha(cut));
        assert_eq!(std::fs::read(dir.path().join("l/b")).unwrap(), b"hello");
    }

    #[test]
    fn entries_leaving_the_layer_are_refused() {
        assert!(clean(Path::new("a/../../etc/passwd")).is_err());
        assert_eq!(clean(Path::new("/./a/b")).unwrap(), PathBuf::from("a/b"));
    }

    #[test]
    fn media_types() {
        use Compression::*;
        for (m, c) in [
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
        ] {
            assert_eq!(Compression::of_media_type(m).unwrap(), c);
        }
        assert!(Compression::of_media_type("application/wasm").is_err());
    }
}
