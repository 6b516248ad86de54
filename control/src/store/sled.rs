//! The embedded store on sled: one tree holds the objects and the revision counter, so a
//! transaction's objects and its revision land in one atomic batch; `flush` makes it durable
//! before the write is acknowledged.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::Value;

use super::hub::{Event, EventType, Hub, WatchStream};
use super::{stamp, Committed, Op, Store, StoreError};

const REVISION_KEY: &[u8] = b"\0revision";
/// Events kept for watches to resume from.
pub const DEFAULT_WINDOW: usize = 10_000;

pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    revision: AtomicU64,
    write: Mutex<()>,
    hub: Hub,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_window(dir, DEFAULT_WINDOW)
    }

    pub fn open_with_window(dir: &Path, window: usize) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .map_err(backend)?;
        let tree = db.open_tree("registry").map_err(backend)?;
        let revision = match tree.get(REVISION_KEY).map_err(backend)? {
            Some(b) => u64::from_be_bytes(b.as_ref().try_into().map_err(backend)?),
            None => 1,
        };
        Ok(SledStore {
            db,
            tree,
            revision: AtomicU64::new(revision),
            write: Mutex::new(()),
            hub: Hub::new(revision, window),
        })
    }

    fn read(&self, key: &str) -> Result<Option<Value>, StoreError> {
        match self.tree.get(key.as_bytes()).map_err(backend)? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(backend)?)),
            None => Ok(None),
        }
    }

    /// The current object at `key`, which must exist and, when `expect` is given, be at that revision.
    fn read_expecting(&self, key: &str, expect: Option<u64>) -> Result<Value, StoreError> {
        let prev = self
            .read(key)?
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        let current = current_rv(&prev);
        match expect {
            Some(expected) if expected != current => Err(StoreError::Conflict {
                key: key.to_string(),
                expected,
                current,
            }),
            _ => Ok(prev),
        }
    }
}

fn current_rv(v: &Value) -> u64 {
    skiff_api::meta::resource_version(v).unwrap_or(0)
}

impl Store for SledStore {
    fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        self.read(key)
    }

    fn list(&self, prefix: &str) -> Result<(Vec<Value>, u64), StoreError> {
        // Hold the write lock so the listing and its revision agree.
        let _g = self.write.lock().expect("write lock");
        let rev = self.revision.load(Ordering::SeqCst);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(prefix.as_bytes()) {
            let (_, v) = kv.map_err(backend)?;
            out.push(serde_json::from_slice(&v).map_err(backend)?);
        }
        Ok((out, rev))
    }

    fn txn(&self, ops: Vec<Op>) -> Result<Committed, StoreError> {
        let committed = {
            let _g = self.write.lock().expect("write lock");
            let rev = self.revision.load(Ordering::SeqCst) + 1;
            let mut batch = sled::Batch::default();
            let mut events = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    Op::Create { key, mut value } => {
                        if self.tree.contains_key(key.as_bytes()).map_err(backend)? {
                            return Err(StoreError::AlreadyExists(key));
                        }
                        stamp(&mut value, rev);
                        batch.insert(key.as_bytes(), serde_json::to_vec(&value).map_err(backend)?);
                        events.push(Event {
                            revision: rev,
                            kind: EventType::Added,
                            key,
                            object: value,
                            prev: None,
                        });
                    }
                    Op::Update {
                        key,
                        mut value,
                        expect,
                    } => {
                        let prev = self.read_expecting(&key, expect)?;
                        stamp(&mut value, rev);
                        batch.insert(key.as_bytes(), serde_json::to_vec(&value).map_err(backend)?);
                        events.push(Event {
                            revision: rev,
                            kind: EventType::Modified,
                            key,
                            object: value,
                            prev: Some(prev),
                        });
                    }
                    Op::Delete { key, expect } => {
                        let prev = self.read_expecting(&key, expect)?;
                        let mut last = prev.clone();
                        stamp(&mut last, rev);
                        batch.remove(key.as_bytes());
                        events.push(Event {
                            revision: rev,
                            kind: EventType::Deleted,
                            key,
                            object: last,
                            prev: Some(prev),
                        });
                    }
                }
            }
            batch.insert(REVISION_KEY, &rev.to_be_bytes());
            self.tree.apply_batch(batch).map_err(backend)?;
            self.revision.store(rev, Ordering::SeqCst);
            let objects = events.iter().map(|e| e.object.clone()).collect();
            self.hub.publish(events);
            Committed {
                revision: rev,
                objects,
            }
        };
        // Durable before acknowledged. Concurrent writers share flushes.
        self.db.flush().map_err(backend)?;
        Ok(committed)
    }

    fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    fn watch(&self, prefix: &str, from: u64) -> Result<WatchStream, StoreError> {
        let _g = self.write.lock().expect("write lock");
        self.hub
            .watch(prefix, from, self.revision.load(Ordering::SeqCst))
    }

    fn watchers(&self) -> usize {
        self.hub.watcher_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str) -> Value {
        json!({"metadata": {"name": name}})
    }

    #[test]
    fn revisions_conflicts_and_durability() {
        let dir = tempfile::tempdir().unwrap();
        let rev;
        {
            let s = SledStore::open(dir.path()).unwrap();
            let c = s
                .txn(vec![Op::Create {
                    key: "/registry/pods/default/a".into(),
                    value: obj("a"),
                }])
                .unwrap();
            let rv = current_rv(&c.objects[0]);
            assert_eq!(rv, c.revision);
            assert!(matches!(
                s.txn(vec![Op::Create {
                    key: "/registry/pods/default/a".into(),
                    value: obj("a")
                }]),
                Err(StoreError::AlreadyExists(_))
            ));
            let c2 = s
                .txn(vec![Op::Update {
                    key: "/registry/pods/default/a".into(),
                    value: obj("a"),
                    expect: Some(rv),
                }])
                .unwrap();
            assert!(c2.revision > rv);
            // A stale revision is refused and changes nothing.
            let stale = s.txn(vec![
                Op::Create {
                    key: "/registry/pods/default/b".into(),
                    value: obj("b"),
                },
                Op::Update {
                    key: "/registry/pods/default/a".into(),
                    value: obj("a"),
                    expect: Some(rv),
                },
            ]);
            assert!(matches!(stale, Err(StoreError::Conflict { .. })));
            assert!(s.get("/registry/pods/default/b").unwrap().is_none());
            rev = s.revision();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.revision(), rev);
        let (items, _) = s.list("/registry/pods/").unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(current_rv(&items[0]), rev);
    }

    #[tokio::test]
    async fn watch_resumes_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open_with_window(dir.path(), 3).unwrap();
        let start = s.revision();
        let mut revs = Vec::new();
        for i in 0..5 {
            revs.push(
                s.txn(vec![Op::Create {
                    key: format!("/registry/pods/default/p{i}"),
                    value: obj("p"),
                }])
                .unwrap()
                .revision,
            );
        }
        // The window keeps the last three: resuming after revs[1] works, from the start does not.
        let mut w = s.watch("/registry/pods/", revs[1]).unwrap();
        for want in &revs[2..] {
            assert_eq!(w.recv().await.unwrap().revision, *want);
        }
        assert!(matches!(
            s.watch("/registry/pods/", start),
            Err(StoreError::Expired { .. })
        ));
        // Live events follow, filtered by prefix.
        s.txn(vec![Op::Create {
            key: "/registry/services/default/x".into(),
            value: obj("x"),
        }])
        .unwrap();
        let d = s
            .txn(vec![Op::Delete {
                key: "/registry/pods/default/p0".into(),
                expect: None,
            }])
            .unwrap();
        let ev = w.recv().await.unwrap();
        assert_eq!((ev.kind, ev.revision), (EventType::Deleted, d.revision));
        assert!(ev.prev.is_some());
    }
}
