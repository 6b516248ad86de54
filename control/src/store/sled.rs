//! The embedded store on sled: one tree holds the objects and the revision counter, so a
//! transaction's objects and its revision land in one atomic batch.
//!
//! Writes are **group-committed**: a transaction is checked and applied to the tree under the
//! write lock (which holds no IO wait), then waits for a flush that covers it. One writer at a
//! time flushes, for every transaction applied so far, so concurrent writers share one fsync.
//! Only after that flush are the transactions acknowledged, made visible to readers and sent
//! to watchers: nothing anyone saw can be lost to a crash, and a revision is never reused.
//!
//! Readers (`get`, `list`) are served from an in-memory copy of the durable objects, updated
//! after each flush together with its revision: a list is a consistent snapshot, taken under a
//! read lock held only while the matching entries are collected.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_api::limits::MAX_OBJECT_BYTES;

use super::encryption::{self, Encryption};
use super::hub::{Event, EventType, Hub, WatchStream};
use super::{stamp, Committed, Op, Store, StoreError};

const REVISION_KEY: &[u8] = b"\0revision";
/// Events kept for watches to resume from: at most this many...
pub const DEFAULT_WINDOW: usize = 10_000;
/// ...holding at most this many bytes of objects (as JSON; in memory a few times more).
pub const DEFAULT_WINDOW_BYTES: usize = 8 << 20;

pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    /// Revision of the last transaction applied to the tree (durable or not).
    applied: AtomicU64,
    /// Serialises checking and applying transactions. Never held across a flush.
    write: Mutex<()>,
    /// Applied transactions waiting for the flush that makes them durable, in revision order.
    pending: Mutex<VecDeque<(u64, Vec<Event>)>>,
    flush: Mutex<FlushState>,
    flushed: Condvar,
    /// What readers see: the durable objects and their revision.
    view: RwLock<View>,
    hub: Hub,
    /// The store's directory, and when its files' permissions were last checked: sled makes
    /// new files (blobs of large values, snapshots) with the process' default mode, inside
    /// the directory only the owner may enter; they are closed too, at most a second later.
    dir: std::path::PathBuf,
    restricted: Mutex<Instant>,
    /// Seals Secrets before they are written, opens them when read.
    encryption: Encryption,
    #[cfg(test)]
    flush_hook: Mutex<Option<Arc<FlushHook>>>,
}

/// Called just before each flush with the revision the flush makes durable (tests only).
#[cfg(test)]
pub(crate) type FlushHook = dyn Fn(&SledStore, u64) + Send + Sync;

struct FlushState {
    /// Every transaction up to this revision is durable, visible and published.
    durable: u64,
    /// A writer is flushing; the others wait for it.
    flushing: bool,
}

struct View {
    objects: BTreeMap<String, Arc<Value>>,
    revision: u64,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Refuses an object larger than the store keeps, as etcd refuses a request past its limit.
fn check_size(key: &str, size: usize) -> Result<(), StoreError> {
    if size > MAX_OBJECT_BYTES {
        return Err(StoreError::TooLarge {
            key: key.to_string(),
            size,
            max: MAX_OBJECT_BYTES,
        });
    }
    Ok(())
}

/// The file of the key that encrypts Secrets, when the store is opened without one named.
pub const KEY_FILE: &str = "encryption.key";

/// How often at most the store's files are checked for permissions sled gave new ones.
const RESTRICT_EVERY: Duration = Duration::from_secs(1);

impl SledStore {
    /// Opens the store in `dir`, with the key that encrypts Secrets in `dir` too.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_window(dir, DEFAULT_WINDOW)
    }

    pub fn open_with_window(dir: &Path, window: usize) -> Result<Self, StoreError> {
        Self::open_with(dir, window, &dir.join(KEY_FILE))
    }

    /// Opens the store in `dir`, encrypting Secrets with the key in `key_file` (made there if
    /// there is none).
    pub fn open_with_key(dir: &Path, key_file: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, DEFAULT_WINDOW, key_file)
    }

    fn open_with(dir: &Path, window: usize, key_file: &Path) -> Result<Self, StoreError> {
        crate::private_files::private_dir(dir).map_err(backend)?;
        let encryption = Encryption::load_or_create(key_file)?;
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
        let mut objects = BTreeMap::new();
        for kv in tree.scan_prefix(b"/") {
            let (k, v) = kv.map_err(backend)?;
            let key = String::from_utf8(k.to_vec()).map_err(backend)?;
            let plain = encryption.open(&v)?;
            objects.insert(
                key,
                Arc::new(serde_json::from_slice(&plain).map_err(backend)?),
            );
        }
        crate::private_files::restrict_tree(dir).map_err(backend)?;
        Ok(SledStore {
            db,
            tree,
            applied: AtomicU64::new(revision),
            write: Mutex::new(()),
            pending: Mutex::new(VecDeque::new()),
            flush: Mutex::new(FlushState {
                durable: revision,
                flushing: false,
            }),
            flushed: Condvar::new(),
            view: RwLock::new(View { objects, revision }),
            hub: Hub::new(revision, window, DEFAULT_WINDOW_BYTES),
            dir: dir.to_path_buf(),
            restricted: Mutex::new(Instant::now()),
            encryption,
            #[cfg(test)]
            flush_hook: Mutex::new(None),
        })
    }

    /// The object at `key` as the last applied transaction left it (writers' view).
    fn read_applied(&self, key: &str) -> Result<Option<Value>, StoreError> {
        match self.tree.get(key.as_bytes()).map_err(backend)? {
            Some(b) => Ok(Some(
                serde_json::from_slice(&self.encryption.open(&b)?).map_err(backend)?,
            )),
            None => Ok(None),
        }
    }

    /// The current object at `key`, which must exist and, when `expect` is given, be at that revision.
    fn read_expecting(&self, key: &str, expect: Option<u64>) -> Result<Value, StoreError> {
        let prev = self
            .read_applied(key)?
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

    #[cfg(test)]
    pub(crate) fn set_flush_hook(&self, hook: impl Fn(&SledStore, u64) + Send + Sync + 'static) {
        *self.flush_hook.lock().expect("hook lock") = Some(Arc::new(hook));
    }

    /// The revision of the last applied transaction, durable or not (tests only).
    #[cfg(test)]
    pub(crate) fn applied_revision(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Checks `ops` against the applied state and applies them to the tree under one new
    /// revision; queues their events for the flush. Nothing is changed on an error.
    fn apply(&self, ops: Vec<Op>) -> Result<Committed, StoreError> {
        let _g = self.write.lock().expect("write lock");
        let rev = self.applied.load(Ordering::SeqCst) + 1;
        let mut batch = sled::Batch::default();
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Create { key, mut value } => {
                    if self.tree.contains_key(key.as_bytes()).map_err(backend)? {
                        return Err(StoreError::AlreadyExists(key));
                    }
                    stamp(&mut value, rev);
                    let bytes = serde_json::to_vec(&value).map_err(backend)?;
                    let size = bytes.len();
                    check_size(&key, size)?;
                    batch.insert(key.as_bytes(), self.sealed(&key, bytes)?);
                    events.push(Event {
                        revision: rev,
                        kind: EventType::Added,
                        key,
                        object: Arc::new(value),
                        prev: None,
                        size,
                    });
                }
                Op::Update {
                    key,
                    mut value,
                    expect,
                } => {
                    self.read_expecting(&key, expect)?;
                    stamp(&mut value, rev);
                    let bytes = serde_json::to_vec(&value).map_err(backend)?;
                    let size = bytes.len();
                    check_size(&key, size)?;
                    batch.insert(key.as_bytes(), self.sealed(&key, bytes)?);
                    // `prev` is filled in at the flush from the view: the same allocation.
                    events.push(Event {
                        revision: rev,
                        kind: EventType::Modified,
                        key,
                        object: Arc::new(value),
                        prev: None,
                        size,
                    });
                }
                Op::Delete { key, expect } => {
                    let mut last = self.read_expecting(&key, expect)?;
                    stamp(&mut last, rev);
                    batch.remove(key.as_bytes());
                    events.push(Event {
                        revision: rev,
                        kind: EventType::Deleted,
                        key,
                        object: Arc::new(last),
                        prev: None,
                        size: 0,
                    });
                }
            }
        }
        batch.insert(REVISION_KEY, &rev.to_be_bytes());
        self.tree.apply_batch(batch).map_err(backend)?;
        let objects = events.iter().map(|e| (*e.object).clone()).collect();
        // Queued before `applied` moves, so a flush up to `applied` finds every event it covers.
        self.pending
            .lock()
            .expect("pending lock")
            .push_back((rev, events));
        self.applied.store(rev, Ordering::SeqCst);
        Ok(Committed {
            revision: rev,
            objects,
        })
    }

    /// Returns once `rev` is durable: flushes (for every writer waiting) unless another
    /// writer's flush is under way, in which case it waits for that one and checks again.
    fn wait_durable(&self, rev: u64) -> Result<(), StoreError> {
        let mut st = self.flush.lock().expect("flush lock");
        loop {
            if st.durable >= rev {
                return Ok(());
            }
            if st.flushing {
                st = self.flushed.wait(st).expect("flush lock");
                continue;
            }
            st.flushing = true;
            drop(st);
            let target = self.applied.load(Ordering::SeqCst);
            let result = self.flush_through(target);
            st = self.flush.lock().expect("flush lock");
            st.flushing = false;
            if result.is_ok() {
                st.durable = st.durable.max(target);
            }
            self.flushed.notify_all();
            result?;
        }
    }

    /// Flushes the tree, then shows the transactions up to `target` to readers and watchers.
    fn flush_through(&self, target: u64) -> Result<(), StoreError> {
        #[cfg(test)]
        {
            let hook = self.flush_hook.lock().expect("hook lock").clone();
            if let Some(hook) = hook {
                hook(self, target);
            }
        }
        self.db.flush().map_err(backend)?;
        self.restrict_files();
        let mut done: Vec<Event> = Vec::new();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            while pending.front().is_some_and(|(rev, _)| *rev <= target) {
                done.extend(pending.pop_front().map(|(_, evs)| evs).unwrap_or_default());
            }
        }
        {
            let mut view = self.view.write().expect("view lock");
            // In revision order, so the view holds each update's previous object when the
            // update is applied: the event shares it instead of a decoded copy.
            for ev in &mut done {
                match ev.kind {
                    EventType::Deleted => {
                        view.objects.remove(&ev.key);
                    }
                    EventType::Added => {
                        view.objects.insert(ev.key.clone(), ev.object.clone());
                    }
                    EventType::Modified => {
                        ev.prev = view.objects.insert(ev.key.clone(), ev.object.clone());
                    }
                }
            }
            view.revision = view.revision.max(target);
        }
        self.hub.publish(done);
        Ok(())
    }
}

impl SledStore {
    /// What is written for `key`: a Secret's JSON encrypted, anything else as it is.
    fn sealed(&self, key: &str, json: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match encryption::applies(key) {
            true => self.encryption.seal(&json),
            false => Ok(json),
        }
    }

    /// Closes what sled made since the last check to others (at most once a second).
    fn restrict_files(&self) {
        {
            let mut last = self.restricted.lock().expect("restricted lock");
            if last.elapsed() < RESTRICT_EVERY {
                return;
            }
            *last = Instant::now();
        }
        if let Err(e) = crate::private_files::restrict_tree(&self.dir) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "cannot restrict the store's files");
        }
    }
}

fn current_rv(v: &Value) -> u64 {
    skiff_api::meta::resource_version(v).unwrap_or(0)
}

impl Store for SledStore {
    fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let found = self
            .view
            .read()
            .expect("view lock")
            .objects
            .get(key)
            .cloned();
        Ok(found.map(|v| (*v).clone()))
    }

    fn get_latest(&self, key: &str) -> Result<Option<Value>, StoreError> {
        self.read_applied(key)
    }

    fn list_shared(&self, prefix: &str) -> Result<(Vec<Arc<Value>>, u64), StoreError> {
        // A snapshot: the entries and the revision they are consistent with, taken together.
        let (found, rev) = {
            let view = self.view.read().expect("view lock");
            let found: Vec<Arc<Value>> = view
                .objects
                .range::<str, _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.clone())
                .collect();
            (found, view.revision)
        };
        Ok((found, rev))
    }

    fn txn(&self, ops: Vec<Op>) -> Result<Committed, StoreError> {
        let committed = self.apply(ops)?;
        // Durable, visible and sent to watchers before it is acknowledged.
        blocking(|| self.wait_durable(committed.revision))?;
        Ok(committed)
    }

    fn revision(&self) -> u64 {
        self.view.read().expect("view lock").revision
    }

    fn watch(&self, prefix: &str, from: u64) -> Result<WatchStream, StoreError> {
        self.hub.watch(prefix, from, self.revision())
    }

    fn watchers(&self) -> usize {
        self.hub.watcher_count()
    }
}

/// Runs `f`, which waits for the disk. Controllers write from their async reconciles: on a
/// worker thread of a multi-threaded runtime, the thread's other tasks (API connections, watches,
/// other controllers) move to another thread while it waits, instead of stalling behind a flush.
/// Elsewhere (the blocking pool, a current-thread runtime, no runtime) `f` just runs.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str) -> Value {
        json!({"metadata": {"name": name}})
    }

    /// Every file the store holds, as bytes.
    fn raw_files(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    all.extend(std::fs::read(&p).unwrap_or_default());
                }
            }
        }
        all
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// A Secret's value never reaches the disk in the clear; one written in the clear (before
    /// encryption) is still read, and is encrypted when next written.
    #[test]
    fn secrets_are_encrypted_at_rest() {
        let dir = tempfile::tempdir().unwrap();
        let key = "/registry/secrets/default/s";
        let secret = |v: &str| json!({"metadata": {"name": "s"}, "data": {"password": v}});
        {
            let s = SledStore::open(dir.path()).unwrap();
            // As an older version wrote it: plain JSON.
            s.tree
                .insert(
                    key,
                    serde_json::to_vec(&secret("cGxhaW4tb2xkLXZhbHVl")).unwrap(),
                )
                .unwrap();
            s.tree
                .insert(
                    "/registry/configmaps/default/c",
                    &b"{\"data\":{\"k\":\"visible\"}}"[..],
                )
                .unwrap();
            s.db.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get(key).unwrap().unwrap()["data"]["password"],
            "cGxhaW4tb2xkLXZhbHVl"
        );
        s.txn(vec![Op::Update {
            key: key.into(),
            value: secret("dG9wLXNlY3JldC12YWx1ZQ"),
            expect: None,
        }])
        .unwrap();
        s.txn(vec![Op::Create {
            key: "/registry/secrets/default/t".into(),
            value: json!({"metadata": {"name": "t"}, "stringData": {"token": "a-very-secret-token"}}),
        }])
        .unwrap();
        drop(s);
        let raw = raw_files(dir.path());
        assert!(contains(&raw, PREFIX_FOR_TESTS));
        assert!(!contains(&raw, b"dG9wLXNlY3JldC12YWx1ZQ"));
        assert!(!contains(&raw, b"a-very-secret-token"));
        // Reopened, both read back; other kinds are stored as they are.
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get(key).unwrap().unwrap()["data"]["password"],
            "dG9wLXNlY3JldC12YWx1ZQ"
        );
        assert_eq!(
            s.get("/registry/secrets/default/t").unwrap().unwrap()["stringData"]["token"],
            "a-very-secret-token"
        );
        assert!(contains(&raw, b"visible"));
        // Without its key the store cannot be read.
        drop(s);
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        assert!(SledStore::open(dir.path()).is_err());
    }

    const PREFIX_FOR_TESTS: &[u8] = encryption::PREFIX;

    /// An object larger than the store keeps is refused, as etcd refuses it, and changes nothing.
    #[test]
    fn objects_past_the_size_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let big = |n: usize| json!({"metadata": {"name": "big"}, "data": {"a": "x".repeat(n)}});
        let key = "/registry/configmaps/default/big";
        let before = s.revision();
        let e = s
            .txn(vec![Op::Create {
                key: key.into(),
                value: big(MAX_OBJECT_BYTES),
            }])
            .unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
        assert_eq!(s.revision(), before);
        assert!(s.get(key).unwrap().is_none());
        s.txn(vec![Op::Create {
            key: key.into(),
            value: big(MAX_OBJECT_BYTES - 1000),
        }])
        .unwrap();
    }

    /// The store's directory and files are the owner's only, also those sled makes later.
    #[test]
    fn the_store_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = SledStore::open(&path).unwrap();
        // A large value goes to a blob file of its own.
        s.txn(vec![Op::Create {
            key: "/registry/configmaps/default/big".into(),
            value: json!({"data": {"a": "x".repeat(1 << 20)}}),
        }])
        .unwrap();
        *s.restricted.lock().unwrap() = Instant::now() - RESTRICT_EVERY;
        s.txn(create("/registry/configmaps/default/c")).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let open = crate::private_files::open_to_others(&path).unwrap();
        assert!(open.is_empty(), "{open:?}");
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
        assert_eq!(ev.key, "/registry/pods/default/p0");
        assert!(ev.prev.is_none(), "a deletion's object is its last state");
        // An update carries the object before it: the one the view held, not a copy.
        let before = s.list_shared("/registry/pods/default/p1").unwrap().0;
        let mut next = obj("p");
        next["spec"] = serde_json::json!({"changed": true});
        s.txn(vec![Op::Update {
            key: "/registry/pods/default/p1".into(),
            value: next,
            expect: None,
        }])
        .unwrap();
        let ev = w.recv().await.unwrap();
        assert_eq!(ev.kind, EventType::Modified);
        assert!(Arc::ptr_eq(ev.prev.as_ref().unwrap(), &before[0]));
        assert_eq!(ev.object["spec"]["changed"], true);
    }

    fn create(key: &str) -> Vec<Op> {
        vec![Op::Create {
            key: key.into(),
            value: obj("x"),
        }]
    }

    /// Waits (up to a deadline) until `cond` holds; says whether it did.
    fn wait_until(what: &str, cond: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            if std::time::Instant::now() >= deadline {
                eprintln!("timed out waiting for {what}");
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }

    #[test]
    fn events_and_reads_follow_the_flush() {
        use std::sync::{Arc, Mutex as StdMutex};
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let w = Arc::new(StdMutex::new(
            s.watch("/registry/pods/", s.revision()).unwrap(),
        ));
        // What was visible while the write was not yet durable.
        let seen: Arc<StdMutex<Vec<(bool, bool, bool)>>> = Arc::default();
        {
            let (w, seen) = (w.clone(), seen.clone());
            s.set_flush_hook(move |s, _| {
                let event = w.lock().unwrap().try_recv().is_ok();
                let read = s.get("/registry/pods/default/a").unwrap().is_some();
                let latest = s.get_latest("/registry/pods/default/a").unwrap().is_some();
                seen.lock().unwrap().push((event, read, latest));
            });
        }
        let c = s.txn(create("/registry/pods/default/a")).unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(false, false, true)],
            "before the flush: (watch event, readable, readable by a retrying writer)"
        );
        // Once acknowledged, both are there.
        assert_eq!(w.lock().unwrap().try_recv().unwrap().revision, c.revision);
        assert!(s.get("/registry/pods/default/a").unwrap().is_some());
        assert_eq!(s.revision(), c.revision);
    }

    #[test]
    fn concurrent_writers_share_a_flush() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        const WRITERS: u64 = 16;
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(dir.path()).unwrap());
        let start = s.revision();
        let flushes = Arc::new(AtomicUsize::new(0));
        let flushed_through = Arc::new(AtomicU64::new(0));
        {
            let (flushes, flushed_through) = (flushes.clone(), flushed_through.clone());
            s.set_flush_hook(move |s, target| {
                if flushes.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Hold the first flush until every writer has applied its transaction.
                    wait_until("all writers applied", || {
                        s.applied_revision() >= start + WRITERS
                    });
                }
                flushed_through.fetch_max(target, Ordering::SeqCst);
            });
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (s, flushed_through) = (s.clone(), flushed_through.clone());
                std::thread::spawn(move || {
                    let c = s
                        .txn(create(&format!("/registry/pods/default/p{i}")))
                        .unwrap();
                    // Acknowledged only after a flush that covers it.
                    assert!(flushed_through.load(Ordering::SeqCst) >= c.revision);
                    c.revision
                })
            })
            .collect();
        let mut revs: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        revs.sort();
        assert_eq!(revs, (start + 1..=start + WRITERS).collect::<Vec<_>>());
        let n = flushes.load(Ordering::SeqCst);
        assert!(n <= 2, "{WRITERS} concurrent writes took {n} flushes");
    }
}
