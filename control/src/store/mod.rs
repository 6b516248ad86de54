//! The store: objects under `/registry/{resource}/{namespace}/{name}`, one monotonic revision
//! counter that stamps every write, and watches that resume from a revision they have seen.
//!
//! [`Store`] is the seam for back ends: [`sqlite::SqliteStore`] is the embedded default (a sled
//! store left by an older version is moved into it on open, [`sled`]). The event window and
//! fan-out ([`hub::Hub`]) are shared by back ends that do not have a watch of their own.

#[cfg(test)]
pub(crate) mod conformance;
pub mod encryption;
pub mod etcd;
pub mod hub;
pub mod sled;
pub mod sqlite;

use std::sync::Arc;

use serde_json::Value;

pub use hub::{Event, EventType, WatchStream};

/// Store errors. The API layer maps them to `Status` objects.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} not found")]
    NotFound(String),
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {key} has revision {current}, not {expected}")]
    Conflict {
        key: String,
        expected: u64,
        current: u64,
    },
    #[error("revision {requested} is too old (oldest kept: {oldest})")]
    Expired { requested: u64, oldest: u64 },
    /// The object is larger than the store keeps ([`skiff_api::limits::MAX_OBJECT_BYTES`]).
    #[error("key {key} would hold {size} bytes, more than {max}")]
    TooLarge {
        key: String,
        size: usize,
        max: usize,
    },
    #[error("storage: {0}")]
    Backend(String),
}

/// One write in an atomic transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Create `key`; fails if it exists.
    Create { key: String, value: Value },
    /// Replace `key`; `expect` is the revision it must have (None: any, but it must exist).
    Update {
        key: String,
        value: Value,
        expect: Option<u64>,
    },
    /// Remove `key`; `expect` as for updates.
    Delete { key: String, expect: Option<u64> },
}

/// What a committed transaction wrote: the revision and each op's resulting object
/// (for deletes, the last state of the object, stamped with the delete revision).
#[derive(Debug, Clone)]
pub struct Committed {
    pub revision: u64,
    pub objects: Vec<Value>,
}

/// A key-value store of JSON objects with revisions and watches.
///
/// Invariants every back end keeps:
/// - **every acknowledged write is durable** (flushed before `txn` returns);
/// - **revisions are strictly increasing** and each object's `metadata.resourceVersion`
///   is the revision of its last write;
/// - **watch events arrive in revision order**, with no gap, from the requested revision on.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<Value>, StoreError>;
    /// The object as the last applied transaction left it, which may not be durable (and so
    /// not visible to `get`) yet: what a writer retrying after a conflict must start from,
    /// or it would read the same stale version again until the flush catches up.
    fn get_latest(&self, key: &str) -> Result<Option<Value>, StoreError> {
        self.get(key)
    }
    /// Every object under `prefix`, with the revision the listing is consistent with.
    fn list(&self, prefix: &str) -> Result<(Vec<Value>, u64), StoreError> {
        let (items, rev) = self.list_shared(prefix)?;
        Ok((items.into_iter().map(Arc::unwrap_or_clone).collect(), rev))
    }
    /// As `list`, but the objects are shared with the store: for long-lived caches, which
    /// then cost no memory of their own.
    fn list_shared(&self, prefix: &str) -> Result<(Vec<Arc<Value>>, u64), StoreError>;
    /// Applies all ops atomically under one new revision, or none of them.
    fn txn(&self, ops: Vec<Op>) -> Result<Committed, StoreError>;
    /// Applies `ops` as `txn` does, but returns before they are durable, with a future that
    /// resolves once they are (and are visible and sent to watchers), or fails if they could
    /// not be made so: the write must not be acknowledged before. A back end that can waits
    /// there without holding a thread; this default waits in `txn`.
    fn txn_deferred(&self, ops: Vec<Op>) -> Result<(Committed, Durable), StoreError> {
        let committed = self.txn(ops)?;
        Ok((committed, Box::pin(std::future::ready(Ok(())))))
    }
    fn revision(&self) -> u64;
    /// Events under `prefix` after revision `from`.
    fn watch(&self, prefix: &str, from: u64) -> Result<WatchStream, StoreError>;
    /// How many watches are subscribed (closed ones are not counted).
    fn watchers(&self) -> usize;
    /// Ops one transaction may hold (etcd refuses more than its `--max-txn-ops`).
    fn max_txn_ops(&self) -> usize {
        usize::MAX
    }
}

pub type DynStore = Arc<dyn Store>;

/// Resolves once a transaction applied by [`Store::txn_deferred`] is durable.
pub type Durable = futures::future::BoxFuture<'static, Result<(), StoreError>>;

/// Sets `metadata.resourceVersion` on an object.
pub(crate) fn stamp(value: &mut Value, revision: u64) {
    skiff_api::meta::metadata_mut(value).insert(
        "resourceVersion".into(),
        Value::String(revision.to_string()),
    );
}

/// Runs `f`, which waits (for the disk or the network). On a worker thread of a multi-threaded
/// runtime, the thread's other tasks move to another thread while it waits; elsewhere (the
/// blocking pool, a current-thread runtime, no runtime) `f` just runs.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
