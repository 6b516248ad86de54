//! The embedded store on SQLite: one file, `state.db`, in the store's directory, with a table of
//! objects and the revision counter beside them, so a transaction's objects and its revision land
//! in one SQLite transaction. Pages freed by updates and deletes are reused, and given back to
//! the file system (`auto_vacuum = INCREMENTAL`) once many are free; the write-ahead log is
//! truncated after each checkpoint: the file stays near the size of the live data.
//!
//! Writes are **group-committed** by one flusher thread: a transaction is checked and applied
//! to an in-memory overlay under the write lock (which holds no IO wait) and queued; the flusher
//! writes everything queued so far in one SQLite transaction with one fsync. Only after that
//! commit are the transactions acknowledged, made visible to readers and sent to watchers:
//! nothing anyone saw can be lost to a crash. A writer waits for its acknowledgement on a
//! channel — blocking (`txn`) or as a future (`txn_deferred`), which holds no thread meanwhile.
//! If a commit fails, every queued transaction fails with it and the overlay is dropped, so the
//! store goes on from what is durable.
//!
//! Readers (`get`, `list`) are served from an in-memory copy of the durable objects, updated
//! after each commit together with its revision: a list is a consistent snapshot, taken under a
//! read lock held only while the matching entries are collected.
//!
//! A store directory an older version left on sled is migrated on open (see [`super::sled`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use skiff_api::limits::MAX_OBJECT_BYTES;
use tokio::sync::oneshot;

use super::encryption::{self, Encryption};
use super::hub::{Event, EventType, Hub, WatchStream};
use super::{stamp, Committed, Durable, Op, Store, StoreError};

/// Events kept for watches to resume from: at most this many...
pub const DEFAULT_WINDOW: usize = 10_000;
/// ...holding at most this many bytes of objects (as JSON; in memory a few times more)...
pub const DEFAULT_WINDOW_BYTES: usize = 8 << 20;
/// ...none older than this (Kubernetes' watch cache keeps its last 75 s of events); a watch
/// resumed from before that is answered 410 and re-lists.
pub const DEFAULT_WINDOW_AGE: Duration = Duration::from_secs(75);
/// How often an idle flusher lets the window drop its old events.
const PRUNE_EVERY: Duration = Duration::from_secs(15);

/// The database file in the store's directory.
pub const DB_FILE: &str = "state.db";

/// The file of the key that encrypts Secrets, when the store is opened without one named.
pub const KEY_FILE: &str = "encryption.key";

/// How often at most the store's files are checked for permissions SQLite gave new ones.
const RESTRICT_EVERY: Duration = Duration::from_secs(1);

/// Free pages are given back to the file system once they hold this many bytes...
const VACUUM_FREE_BYTES: i64 = 8 << 20;
/// ...and are at least this fraction (1/N) of the file.
const VACUUM_FREE_FRACTION: i64 = 4;
/// The write-ahead log is cut back to this size after a checkpoint.
const WAL_LIMIT_BYTES: i64 = 8 << 20;

pub struct SqliteStore {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

/// What the writers, the flusher and the readers share.
pub(crate) struct Shared {
    /// Serialises checking and applying transactions. Never held across a commit.
    write: Mutex<Applied>,
    /// Applied transactions waiting for the commit that makes them durable, in revision order.
    queue: Mutex<Queue>,
    /// Wakes the flusher.
    queued: Condvar,
    /// What readers see: the durable objects and their revision.
    view: RwLock<View>,
    hub: Hub,
    /// The store's directory, and when its files' permissions were last checked: SQLite makes
    /// its log files with the process' default mode, inside the directory only the owner may
    /// enter; they are closed too, at most a second later.
    dir: PathBuf,
    restricted: Mutex<Instant>,
    /// Seals Secrets before they are written, opens them when read.
    encryption: Encryption,
    #[cfg(test)]
    flush_hook: Mutex<Option<Arc<FlushHook>>>,
}

/// Called by the flusher just before each commit with the revision it makes durable (tests only).
#[cfg(test)]
pub(crate) type FlushHook = dyn Fn(&Shared, u64) + Send + Sync;

/// The writers' state: the last applied revision and what the transactions not yet durable
/// changed, by key (None: deleted), with the revision that changed it.
struct Applied {
    revision: u64,
    overlay: HashMap<String, (u64, Option<Arc<Value>>)>,
}

struct Queue {
    txns: VecDeque<Pending>,
    closed: bool,
}

/// An applied transaction waiting for its commit.
struct Pending {
    revision: u64,
    /// What to write: the stored bytes of each key (None: delete it).
    writes: Vec<(String, Option<Vec<u8>>)>,
    events: Vec<Event>,
    done: oneshot::Sender<Result<(), StoreError>>,
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

/// Opens (or makes) the database at `path` with the store's settings.
fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // `auto_vacuum` takes effect only on a new file, before its first table. One connection,
    // the flusher's, uses the file: with an exclusive lock, a second server on the same
    // directory fails at its first write, and the log's index lives in memory.
    conn.execute_batch(&format!(
        "PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA locking_mode = EXCLUSIVE;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA journal_size_limit = {WAL_LIMIT_BYTES};
         CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);"
    ))?;
    Ok(conn)
}

/// The stored revision, and every object's stored bytes.
pub(crate) type Contents = (u64, Vec<(String, Vec<u8>)>);

fn read_all(conn: &Connection) -> rusqlite::Result<Contents> {
    let revision: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE name = 'revision'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let mut stmt = conn.prepare("SELECT key, value FROM objects")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((revision.map_or(1, |r| r as u64), rows))
}

/// Writes `writes` (in order; the last write of a key wins) and the revision in one
/// transaction, durable when this returns.
fn commit<'a>(
    conn: &mut Connection,
    writes: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    revision: u64,
) -> rusqlite::Result<()> {
    let last: BTreeMap<&str, Option<&[u8]>> = writes.collect();
    let tx = conn.transaction()?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO objects (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )?;
        let mut del = tx.prepare_cached("DELETE FROM objects WHERE key = ?1")?;
        for (key, value) in last {
            match value {
                Some(bytes) => put.execute(params![key, bytes])?,
                None => del.execute([key])?,
            };
        }
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('revision', ?1)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [revision as i64],
        )?;
    }
    tx.commit()
}

/// Gives free pages back to the file system when many are free.
fn reclaim(conn: &Connection) -> rusqlite::Result<()> {
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    if free * page >= VACUUM_FREE_BYTES && free * VACUUM_FREE_FRACTION >= pages {
        conn.execute_batch("PRAGMA incremental_vacuum;")?;
    }
    Ok(())
}

/// Opens the database in `dir`, first moving a sled store found there into it. The objects
/// are copied as they are stored (Secrets stay sealed) with the revision, into a new file
/// renamed into place once complete; only then are sled's files removed.
fn open_or_migrate(dir: &Path) -> Result<Connection, StoreError> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        if let Some((revision, objects)) = super::sled::read(dir)? {
            let partial = dir.join(format!("{DB_FILE}.migrating"));
            for stale in [partial.clone(), wal_of(&partial)] {
                if let Err(e) = std::fs::remove_file(&stale) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(backend(e));
                    }
                }
            }
            let mut conn = open_db(&partial).map_err(backend)?;
            let n = objects.len();
            commit(
                &mut conn,
                objects
                    .iter()
                    .map(|(k, v)| (k.as_str(), Some(v.as_slice()))),
                revision,
            )
            .map_err(backend)?;
            // Closing checkpoints the log into the file and removes it.
            conn.close().map_err(|(_, e)| backend(e))?;
            std::fs::rename(&partial, &path).map_err(backend)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(backend)?;
            tracing::info!(objects = n, revision, dir = %dir.display(), "moved the sled store to SQLite");
        }
    }
    // Whatever is left of sled (also from a migration cut short after the rename).
    super::sled::remove(dir).map_err(backend)?;
    open_db(&path).map_err(backend)
}

fn wal_of(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

impl SqliteStore {
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
        let conn = open_or_migrate(dir)?;
        let (revision, rows) = read_all(&conn).map_err(backend)?;
        let mut objects = BTreeMap::new();
        for (key, stored) in rows {
            let plain = encryption.open(&stored)?;
            objects.insert(
                key,
                Arc::new(serde_json::from_slice(&plain).map_err(backend)?),
            );
        }
        crate::private_files::restrict_tree(dir).map_err(backend)?;
        let shared = Arc::new(Shared {
            write: Mutex::new(Applied {
                revision,
                overlay: HashMap::new(),
            }),
            queue: Mutex::new(Queue {
                txns: VecDeque::new(),
                closed: false,
            }),
            queued: Condvar::new(),
            view: RwLock::new(View { objects, revision }),
            hub: Hub::new(revision, window, DEFAULT_WINDOW_BYTES, DEFAULT_WINDOW_AGE),
            dir: dir.to_path_buf(),
            restricted: Mutex::new(Instant::now()),
            encryption,
            #[cfg(test)]
            flush_hook: Mutex::new(None),
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-flusher".into())
                .spawn(move || shared.flush_loop(conn))
                .map_err(backend)?
        };
        Ok(SqliteStore {
            shared,
            flusher: Some(flusher),
        })
    }

    #[cfg(test)]
    pub(crate) fn set_flush_hook(&self, hook: impl Fn(&Shared, u64) + Send + Sync + 'static) {
        *self.shared.flush_hook.lock().expect("hook lock") = Some(Arc::new(hook));
    }

    /// The revision of the last applied transaction, durable or not (tests only).
    #[cfg(test)]
    pub(crate) fn applied_revision(&self) -> u64 {
        self.shared.applied_revision()
    }
}

impl Drop for SqliteStore {
    /// Commits what is queued and closes the file, so the directory can be opened again.
    fn drop(&mut self) {
        self.shared.queue.lock().expect("queue lock").closed = true;
        self.shared.queued.notify_all();
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
    }
}

impl Shared {
    #[cfg(test)]
    pub(crate) fn applied_revision(&self) -> u64 {
        self.write.lock().expect("write lock").revision
    }

    /// The object at `key` as the last applied transaction left it (writers' view).
    pub(crate) fn get_latest(&self, key: &str) -> Option<Arc<Value>> {
        let applied = self.write.lock().expect("write lock");
        self.latest(&applied, key)
    }

    fn latest(&self, applied: &Applied, key: &str) -> Option<Arc<Value>> {
        match applied.overlay.get(key) {
            Some((_, v)) => v.clone(),
            None => self
                .view
                .read()
                .expect("view lock")
                .objects
                .get(key)
                .cloned(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.view
            .read()
            .expect("view lock")
            .objects
            .get(key)
            .cloned()
    }

    /// What is written for `key`: a Secret's JSON encrypted, anything else as it is.
    fn sealed(&self, key: &str, json: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match encryption::applies(key) {
            true => self.encryption.seal(&json),
            false => Ok(json),
        }
    }

    /// Checks `ops` against the applied state and applies them to the overlay under one new
    /// revision; queues them for the flusher. Nothing is changed on an error.
    fn apply(
        &self,
        ops: Vec<Op>,
    ) -> Result<(Committed, oneshot::Receiver<Result<(), StoreError>>), StoreError> {
        let mut applied = self.write.lock().expect("write lock");
        let rev = applied.revision + 1;
        let mut writes = Vec::with_capacity(ops.len());
        let mut events = Vec::with_capacity(ops.len());
        // What this transaction's earlier ops changed, seen by its later ones.
        let mut mine: HashMap<String, Option<Arc<Value>>> = HashMap::new();
        let current = |mine: &HashMap<String, Option<Arc<Value>>>, key: &str| match mine.get(key) {
            Some(v) => v.clone(),
            None => self.latest(&applied, key),
        };
        for op in ops {
            match op {
                Op::Create { key, mut value } => {
                    if current(&mine, &key).is_some() {
                        return Err(StoreError::AlreadyExists(key));
                    }
                    stamp(&mut value, rev);
                    let bytes = serde_json::to_vec(&value).map_err(backend)?;
                    let size = bytes.len();
                    check_size(&key, size)?;
                    let object = Arc::new(value);
                    writes.push((key.clone(), Some(self.sealed(&key, bytes)?)));
                    mine.insert(key.clone(), Some(object.clone()));
                    events.push(Event {
                        revision: rev,
                        kind: EventType::Added,
                        key,
                        object,
                        prev: None,
                        size,
                    });
                }
                Op::Update {
                    key,
                    mut value,
                    expect,
                } => {
                    check_expected(&key, current(&mine, &key), expect)?;
                    stamp(&mut value, rev);
                    let bytes = serde_json::to_vec(&value).map_err(backend)?;
                    let size = bytes.len();
                    check_size(&key, size)?;
                    let object = Arc::new(value);
                    writes.push((key.clone(), Some(self.sealed(&key, bytes)?)));
                    mine.insert(key.clone(), Some(object.clone()));
                    // `prev` is filled in at the commit from the view: the same allocation.
                    events.push(Event {
                        revision: rev,
                        kind: EventType::Modified,
                        key,
                        object,
                        prev: None,
                        size,
                    });
                }
                Op::Delete { key, expect } => {
                    let prev = check_expected(&key, current(&mine, &key), expect)?;
                    let mut last = (*prev).clone();
                    stamp(&mut last, rev);
                    writes.push((key.clone(), None));
                    mine.insert(key.clone(), None);
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
        let objects = events.iter().map(|e| (*e.object).clone()).collect();
        for (key, value) in mine {
            applied.overlay.insert(key, (rev, value));
        }
        applied.revision = rev;
        let (done, wait) = oneshot::channel();
        // Queued under the write lock, so the queue is in revision order.
        self.queue
            .lock()
            .expect("queue lock")
            .txns
            .push_back(Pending {
                revision: rev,
                writes,
                events,
                done,
            });
        self.queued.notify_one();
        Ok((
            Committed {
                revision: rev,
                objects,
            },
            wait,
        ))
    }

    /// The flusher: commits what is queued, in batches, until the store is dropped.
    fn flush_loop(&self, mut conn: Connection) {
        loop {
            let batch: Vec<Pending> = {
                let mut q = self.queue.lock().expect("queue lock");
                while q.txns.is_empty() {
                    if q.closed {
                        return;
                    }
                    let (next, waited) = self
                        .queued
                        .wait_timeout(q, PRUNE_EVERY)
                        .expect("queue lock");
                    q = next;
                    if waited.timed_out() {
                        // Nothing was written for a while: old events still go.
                        self.hub.prune(Instant::now());
                    }
                }
                q.txns.drain(..).collect()
            };
            let target = batch.last().map_or(0, |p| p.revision);
            #[cfg(test)]
            {
                let hook = self.flush_hook.lock().expect("hook lock").clone();
                if let Some(hook) = hook {
                    hook(self, target);
                }
            }
            let writes = batch
                .iter()
                .flat_map(|p| p.writes.iter())
                .map(|(k, v)| (k.as_str(), v.as_deref()));
            match commit(&mut conn, writes, target) {
                Ok(()) => {
                    self.show(batch, target);
                    self.restrict_files();
                    if let Err(e) = reclaim(&conn) {
                        tracing::warn!(error = %e, "cannot give the store's free pages back");
                    }
                }
                Err(e) => self.fail(batch, &e.to_string()),
            }
        }
    }

    /// Shows the committed transactions up to `target` to readers and watchers, then
    /// acknowledges them.
    fn show(&self, batch: Vec<Pending>, target: u64) {
        let mut done = Vec::with_capacity(batch.len());
        let mut events: Vec<Event> = Vec::new();
        for p in batch {
            events.extend(p.events);
            done.push(p.done);
        }
        {
            let mut view = self.view.write().expect("view lock");
            // In revision order, so the view holds each update's previous object when the
            // update is applied: the event shares it instead of a decoded copy.
            for ev in &mut events {
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
        // The view has them now: the overlay keeps only later changes.
        self.write
            .lock()
            .expect("write lock")
            .overlay
            .retain(|_, (rev, _)| *rev > target);
        self.hub.publish(events);
        for d in done {
            let _ = d.send(Ok(()));
        }
    }

    /// A commit failed: it and every transaction applied after it fail, and the writers go on
    /// from what is durable.
    fn fail(&self, batch: Vec<Pending>, error: &str) {
        tracing::error!(%error, "the store cannot commit; the writes waiting for it fail");
        let mut applied = self.write.lock().expect("write lock");
        let later: Vec<Pending> = self
            .queue
            .lock()
            .expect("queue lock")
            .txns
            .drain(..)
            .collect();
        applied.overlay.clear();
        applied.revision = self.view.read().expect("view lock").revision;
        for p in batch.into_iter().chain(later) {
            let _ = p
                .done
                .send(Err(StoreError::Backend(format!("cannot commit: {error}"))));
        }
    }

    /// Closes what SQLite made since the last check to others (at most once a second).
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

/// `current` must exist and, when `expect` is given, be at that revision.
fn check_expected(
    key: &str,
    current: Option<Arc<Value>>,
    expect: Option<u64>,
) -> Result<Arc<Value>, StoreError> {
    let prev = current.ok_or_else(|| StoreError::NotFound(key.to_string()))?;
    let rv = current_rv(&prev);
    match expect {
        Some(expected) if expected != rv => Err(StoreError::Conflict {
            key: key.to_string(),
            expected,
            current: rv,
        }),
        _ => Ok(prev),
    }
}

fn current_rv(v: &Value) -> u64 {
    skiff_api::meta::resource_version(v).unwrap_or(0)
}

/// What the flusher answered for a transaction.
fn acknowledged(
    answer: Result<Result<(), StoreError>, oneshot::error::RecvError>,
) -> Result<(), StoreError> {
    answer.map_err(|_| StoreError::Backend("the store was closed".into()))?
}

impl Store for SqliteStore {
    fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.shared.get(key).map(|v| (*v).clone()))
    }

    fn get_latest(&self, key: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.shared.get_latest(key).map(|v| (*v).clone()))
    }

    fn list_shared(&self, prefix: &str) -> Result<(Vec<Arc<Value>>, u64), StoreError> {
        // A snapshot: the entries and the revision they are consistent with, taken together.
        let view = self.shared.view.read().expect("view lock");
        let found: Vec<Arc<Value>> = view
            .objects
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((found, view.revision))
    }

    fn txn(&self, ops: Vec<Op>) -> Result<Committed, StoreError> {
        let (committed, wait) = self.shared.apply(ops)?;
        // Durable, visible and sent to watchers before it is acknowledged.
        acknowledged(blocking(|| futures::executor::block_on(wait)))?;
        Ok(committed)
    }

    fn txn_deferred(&self, ops: Vec<Op>) -> Result<(Committed, Durable), StoreError> {
        let (committed, wait) = self.shared.apply(ops)?;
        Ok((committed, Box::pin(async move { acknowledged(wait.await) })))
    }

    fn revision(&self) -> u64 {
        self.shared.view.read().expect("view lock").revision
    }

    fn watch(&self, prefix: &str, from: u64) -> Result<WatchStream, StoreError> {
        self.shared.hub.watch(prefix, from, self.revision())
    }

    fn watchers(&self) -> usize {
        self.shared.hub.watcher_count()
    }
}

/// Runs `f`, which waits for the disk. Controllers write from their async reconciles: on a
/// worker thread of a multi-threaded runtime, the thread's other tasks (API connections, watches,
/// other controllers) move to another thread while it waits, instead of stalling behind a commit.
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
    use std::sync::atomic::{AtomicU64, Ordering};

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
        drop(SqliteStore::open(dir.path()).unwrap());
        {
            // As an older version wrote it: plain JSON.
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            let put = "INSERT INTO objects (key, value) VALUES (?1, ?2)";
            conn.execute(
                put,
                params![
                    key,
                    serde_json::to_vec(&secret("cGxhaW4tb2xkLXZhbHVl")).unwrap()
                ],
            )
            .unwrap();
            conn.execute(
                put,
                params![
                    "/registry/configmaps/default/c",
                    &b"{\"data\":{\"k\":\"visible\"}}"[..]
                ],
            )
            .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
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
        let s = SqliteStore::open(dir.path()).unwrap();
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
        assert!(SqliteStore::open(dir.path()).is_err());
    }

    const PREFIX_FOR_TESTS: &[u8] = encryption::PREFIX;

    /// An object larger than the store keeps is refused, as etcd refuses it, and changes nothing.
    #[test]
    fn objects_past_the_size_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
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

    /// The store's directory and files are the owner's only, also those SQLite makes later.
    #[test]
    fn the_store_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = SqliteStore::open(&path).unwrap();
        // A large value, written to the log and then the file.
        s.txn(vec![Op::Create {
            key: "/registry/configmaps/default/big".into(),
            value: json!({"data": {"a": "x".repeat(1 << 20)}}),
        }])
        .unwrap();
        *s.shared.restricted.lock().unwrap() = Instant::now() - RESTRICT_EVERY;
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
            let s = SqliteStore::open(dir.path()).unwrap();
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
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.revision(), rev);
        let (items, _) = s.list("/registry/pods/").unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(current_rv(&items[0]), rev);
    }

    #[tokio::test]
    async fn watch_resumes_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open_with_window(dir.path(), 3).unwrap();
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
        let s = SqliteStore::open(dir.path()).unwrap();
        let w = Arc::new(StdMutex::new(
            s.watch("/registry/pods/", s.revision()).unwrap(),
        ));
        // What was visible while the write was not yet durable.
        let seen: Arc<StdMutex<Vec<(bool, bool, bool)>>> = Arc::default();
        {
            let (w, seen) = (w.clone(), seen.clone());
            s.set_flush_hook(move |s, _| {
                let event = w.lock().unwrap().try_recv().is_ok();
                let read = s.get("/registry/pods/default/a").is_some();
                let latest = s.get_latest("/registry/pods/default/a").is_some();
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
        let s = Arc::new(SqliteStore::open(dir.path()).unwrap());
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

    /// A sled store left by an older version is moved in on open: every object (Secrets still
    /// sealed, and readable), the revision, then sled's files are gone.
    #[test]
    fn a_sled_store_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let secret = json!({"metadata": {"name": "s", "resourceVersion": "7"}, "data": {"password": "c2VjcmV0LXNlY3JldA"}});
        let pod = json!({"metadata": {"name": "a", "resourceVersion": "9"}});
        {
            let enc = Encryption::load_or_create(&dir.path().join(KEY_FILE)).unwrap();
            let db = ::sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree(crate::store::sled::TREE).unwrap();
            let sealed = enc.seal(&serde_json::to_vec(&secret).unwrap()).unwrap();
            tree.insert("/registry/secrets/default/s", sealed).unwrap();
            tree.insert(
                "/registry/pods/default/a",
                serde_json::to_vec(&pod).unwrap(),
            )
            .unwrap();
            // A large value, which sled keeps in a blob file.
            tree.insert(
                "/registry/configmaps/default/big",
                serde_json::to_vec(&json!({"metadata": {"name": "big", "resourceVersion": "8"}, "data": {"a": "x".repeat(200_000)}})).unwrap(),
            )
            .unwrap();
            tree.insert(crate::store::sled::REVISION_KEY, &12u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        assert!(dir.path().join("conf").exists());
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.revision(), 12);
        assert_eq!(
            s.get("/registry/secrets/default/s").unwrap().unwrap(),
            secret
        );
        assert_eq!(s.get("/registry/pods/default/a").unwrap().unwrap(), pod);
        assert_eq!(s.list("/registry/").unwrap().0.len(), 3);
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != KEY_FILE && !n.starts_with(DB_FILE))
            .collect();
        assert!(left.is_empty(), "sled's files are left: {left:?}");
        let c = s.txn(create("/registry/pods/default/b")).unwrap();
        assert_eq!(c.revision, 13);
        drop(s);
        // The Secret is still sealed on disk; the store opens again as it was.
        let raw = raw_files(dir.path());
        assert!(!contains(&raw, b"c2VjcmV0LXNlY3JldA"));
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.revision(), 13);
        assert_eq!(s.list("/registry/").unwrap().0.len(), 4);
    }

    /// Async writers wait for their commit without holding a thread: many in flight on a
    /// single-threaded runtime all complete, sharing commits.
    #[tokio::test(flavor = "current_thread")]
    async fn async_writers_share_commits_on_one_thread() {
        const WRITERS: u64 = 64;
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start = s.revision();
        let flushes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        {
            let flushes = flushes.clone();
            s.set_flush_hook(move |_, _| {
                flushes.fetch_add(1, Ordering::SeqCst);
            });
        }
        let writes = (0..WRITERS).map(|i| {
            let s = s.clone();
            async move {
                let (c, durable) = s
                    .txn_deferred(create(&format!("/registry/pods/default/p{i}")))
                    .unwrap();
                durable.await.unwrap();
                c.revision
            }
        });
        let mut revs = futures::future::join_all(writes).await;
        revs.sort();
        assert_eq!(revs, (start + 1..=start + WRITERS).collect::<Vec<_>>());
        assert_eq!(s.revision(), start + WRITERS);
        assert_eq!(s.list("/registry/pods/").unwrap().0.len() as u64, WRITERS);
        let n = flushes.load(Ordering::SeqCst);
        assert!(
            n < WRITERS as usize / 2,
            "{WRITERS} writes took {n} commits"
        );
    }

    /// Updates of many small objects and rewrites of large ones reuse the file's pages, and
    /// deleting the large ones gives their space back.
    #[test]
    fn space_is_reused_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let db = dir.path().join(DB_FILE);
        let size = || {
            std::fs::metadata(&db).unwrap().len()
                + std::fs::metadata(wal_of(&db)).map_or(0, |m| m.len())
        };
        let big = |n: usize| json!({"metadata": {"name": "big"}, "data": {"a": format!("{:x}", n % 16).repeat(1 << 20)}});
        for i in 0..8 {
            s.txn(vec![Op::Create {
                key: format!("/registry/configmaps/default/big{i}"),
                value: big(i),
            }])
            .unwrap();
        }
        let full = size();
        for round in 0..5 {
            for i in 0..8 {
                s.txn(vec![Op::Update {
                    key: format!("/registry/configmaps/default/big{i}"),
                    value: big(round * 10 + i),
                    expect: None,
                }])
                .unwrap();
            }
        }
        assert!(
            size() < full + (24 << 20),
            "{} bytes after rewrites, {full} before",
            size()
        );
        for i in 0..8 {
            s.txn(vec![Op::Delete {
                key: format!("/registry/configmaps/default/big{i}"),
                expect: None,
            }])
            .unwrap();
        }
        s.txn(create("/registry/pods/default/after")).unwrap();
        drop(s);
        let after = std::fs::metadata(&db).unwrap().len();
        assert!(
            after < 12 << 20,
            "{after} bytes left after deleting everything large"
        );
    }
}
