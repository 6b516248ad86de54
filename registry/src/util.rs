//! Small pieces both runtimes' caches share: files replaced atomically and durably, and
//! per-key locks that make concurrent fetches of one digest a single flight.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Prefix of every temporary file or directory the caches make beside their entries. Entries
/// never start with a dot, so listings and garbage collection pass them by.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Replaces `path` with `bytes`: written to a temporary file of its own in the same directory
/// (a unique name, so concurrent writers never share one), flushed to disk, then renamed over
/// `path`, and the rename made durable. Readers see the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Makes the entries of `dir` (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// One async lock per key, made on first use and dropped when nobody holds or waits for it:
/// whoever holds a key's lock is the only one fetching (or compiling) that key; the others
/// wait, then find the result in place.
#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a key of [`KeyedLocks`] until dropped.
pub struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits until no one else holds `key`, then holds it.
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let mutex = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            // Entries whose holders and waiters are all gone (a waiter cancelled last).
            map.retain(|_, m| Arc::strong_count(m) > 1);
            map.entry(key.to_string()).or_default().clone()
        };
        let held = mutex.lock_owned().await;
        KeyGuard {
            locks: self,
            key: key.to_string(),
            held: Some(held),
        }
    }

    /// How many keys have an entry (held or waited for).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.held.take());
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_atomic_writes_of_one_file_all_succeed_and_leave_one_whole_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(path, &vec![i; 64 << 10]).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 64 << 10);
        assert!(got.iter().all(|b| *b == got[0]), "a spliced file");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("index.json")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_per_key_and_entries_vanish_when_unused() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside) = (locks.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("sha256:aa").await;
                let n = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                assert_eq!(n, 0, "two holders of one key");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(locks.is_empty());
        // A waiter given up on leaves nothing behind either.
        let g = locks.lock("k").await;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(10), locks.lock("k"));
        assert!(waiting.await.is_err());
        drop(g);
        let _other = locks.lock("other").await;
        assert_eq!(locks.len(), 1);
    }
}
