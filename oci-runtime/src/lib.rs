//! skiff's OCI side: images pulled from registries into a shared layer store
//! ([`image::ImageStore`]), overlay root filesystems and runtime bundles written with `oci-spec`
//! ([`container::Containers`], [`bundle`]), and the `runc` binary driven to run them
//! ([`runc::Runc`]). Registry access (references, clients, manifests, verified blobs) is
//! `skiff-registry`'s.

pub mod bundle;
pub mod container;
pub mod image;
pub mod layer;
pub mod runc;

pub use bundle::{BindMount, ContainerSpec};
pub use container::Containers;
pub use image::{Image, ImageStore, Progress};
pub use runc::{Exit, Runc};

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{0}")]
    Registry(String),
    #[error("{0}")]
    Platform(String),
    #[error("digest mismatch: {0}")]
    Digest(String),
    #[error("bad layer: {0}")]
    BadLayer(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("image store: {0}")]
    Store(String),
    #[error("container config: {0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

impl From<skiff_registry::RegistryError> for OciError {
    fn from(e: skiff_registry::RegistryError) -> OciError {
        use skiff_registry::RegistryError as R;
        match e {
            R::Reference(reference, why) => OciError::Reference(reference, why),
            R::Registry(why) => OciError::Registry(why),
            R::Platform(why) => OciError::Platform(why),
            R::Digest { expected, actual } => {
                OciError::Digest(format!("{expected}: it hashes to {actual}"))
            }
        }
    }
}

/// Every capability, for privileged containers.
pub fn all_capabilities() -> Vec<String> {
    [
        "AUDIT_CONTROL",
        "AUDIT_READ",
        "AUDIT_WRITE",
        "BLOCK_SUSPEND",
        "BPF",
        "CHECKPOINT_RESTORE",
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "IPC_LOCK",
        "IPC_OWNER",
        "KILL",
        "LEASE",
        "LINUX_IMMUTABLE",
        "MAC_ADMIN",
        "MAC_OVERRIDE",
        "MKNOD",
        "NET_ADMIN",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_RAW",
        "PERFMON",
        "SETGID",
        "SETFCAP",
        "SETPCAP",
        "SETUID",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_CHROOT",
        "SYS_MODULE",
        "SYS_NICE",
        "SYS_PACCT",
        "SYS_PTRACE",
        "SYS_RAWIO",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "SYSLOG",
        "WAKE_ALARM",
    ]
    .iter()
    .map(|c| format!("CAP_{c}"))
    .collect()
}

/// Disk use of a directory tree as `du` counts it: allocated blocks, each inode once.
pub fn disk_usage(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}
