//! The controller runtime: watch-fed caches (readers never write the store), and a work
//! queue that runs one reconcile at a time per controller, dedupes keys, requeues on request
//! and backs off per key on errors, resetting the backoff when the key reconciles cleanly.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use skiff_api::selector::Selector;
use skiff_api::{meta, ApiError, Resource};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::registry::Registry;
use crate::store::EventType;

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until something changes.
    AwaitChange,
    /// Look again after this long (e.g. to count a pod available after minReadySeconds).
    RequeueAfter(Duration),
}

/// A level-triggered reconciler: given a key (`namespace/name`), make the world match the spec.
pub trait Reconciler: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn reconcile(&self, key: &str) -> impl Future<Output = Result<Action, ApiError>> + Send;
}

/// What a typed cache holds: a k8s-openapi resource type.
pub trait Object:
    k8s_openapi::Resource
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + DeserializeOwned
    + Serialize
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<K> Object for K where
    K: k8s_openapi::Resource
        + k8s_openapi::Metadata<Ty = ObjectMeta>
        + DeserializeOwned
        + Serialize
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A change seen by a cache: the object after it (for a deletion, its last state), and for an
/// update the object before it.
#[derive(Debug)]
pub struct Change<K> {
    pub kind: EventType,
    pub object: Arc<K>,
    pub prev: Option<Arc<K>>,
}

type Handler<K> = Box<dyn Fn(&Change<K>) + Send + Sync>;

/// One cached object: decoded once when its event arrives, and the stored JSON it came from
/// (shared with the store, so keeping it costs no copy) for kind-agnostic readers.
struct Entry<K> {
    obj: Arc<K>,
    raw: Arc<Value>,
}

impl<K> Clone for Entry<K> {
    fn clone(&self) -> Self {
        Entry {
            obj: self.obj.clone(),
            raw: self.raw.clone(),
        }
    }
}

/// An in-memory copy of one resource, kept current by a watch; each event is decoded into
/// its k8s-openapi type once, however many handlers and readers see it.
pub struct Cache<K> {
    pub resource: &'static Resource,
    objects: RwLock<BTreeMap<String, Entry<K>>>,
    seen: watch::Sender<u64>,
    /// Bumped after every change to `objects`: readers that derive an index from the cache
    /// rebuild it when this moved.
    generation: AtomicU64,
    handlers: RwLock<Vec<Handler<K>>>,
}

/// The queue key (`namespace/name`, or `name`) of a stored object.
pub fn key_of(obj: &Value) -> String {
    match meta::namespace(obj) {
        Some(ns) => format!("{ns}/{}", meta::name(obj)),
        None => meta::name(obj).to_string(),
    }
}

/// The queue key (`namespace/name`, or `name`) of a typed object.
pub fn key<K: k8s_openapi::Metadata<Ty = ObjectMeta>>(obj: &K) -> String {
    let m = obj.metadata();
    let name = m.name.as_deref().unwrap_or("");
    match m.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// Splits a queue key into namespace and name.
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, key),
    }
}

/// Decodes a stored object into its type. A stored object always passed validation against
/// its type, so a failure is logged and the object left out rather than guessed at. Its
/// managed fields are dropped, as Kubernetes' controllers drop them from their informers'
/// objects: no controller reads them, they are often the largest part of an object, and a
/// write that sends none keeps the stored ones.
fn decode<K: Object>(v: &Value) -> Option<K> {
    match K::deserialize(v) {
        Ok(mut k) => {
            k.metadata_mut().managed_fields = None;
            Some(k)
        }
        Err(e) => {
            tracing::warn!(kind = K::KIND, key = %key_of(v), error = %e, "cache cannot decode object");
            None
        }
    }
}

/// An object of a listing: its key, its stored JSON, and its decoded form if the cache holds
/// it unchanged.
type Listed<K> = (String, Arc<Value>, Option<Arc<K>>);

/// Below this many objects per core, a listing is decoded on one thread.
const DECODE_SHARE_MIN: usize = 1000;

/// The cache entries of listed objects, decoding those not decoded yet; an object that does
/// not decode is left out.
fn decode_all<K: Object>(listed: Vec<Listed<K>>) -> impl Iterator<Item = (String, Entry<K>)> {
    listed.into_iter().filter_map(|(key, raw, kept)| {
        let obj = match kept {
            Some(obj) => obj,
            None => Arc::new(decode::<K>(&raw)?),
        };
        Some((key, Entry { obj, raw }))
    })
}

impl<K: Object> Cache<K> {
    pub fn new() -> Arc<Self> {
        let resource = Resource::lookup(K::URL_PATH_SEGMENT).expect("a served resource");
        Arc::new(Cache {
            resource,
            objects: RwLock::new(BTreeMap::new()),
            seen: watch::channel(0).0,
            generation: AtomicU64::new(0),
            handlers: RwLock::new(Vec::new()),
        })
    }

    /// Calls `f` for every change (and for every object at each full listing).
    pub fn on_change(&self, f: impl Fn(&Change<K>) + Send + Sync + 'static) {
        self.handlers.write().expect("handlers").push(Box::new(f));
    }

    pub fn get(&self, key: &str) -> Option<Arc<K>> {
        self.objects
            .read()
            .expect("cache")
            .get(key)
            .map(|e| e.obj.clone())
    }

    fn entries(&self, ns: Option<&str>) -> Vec<Entry<K>> {
        let objs = self.objects.read().expect("cache");
        match ns {
            Some(ns) => {
                let from = format!("{ns}/");
                objs.range(from.clone()..)
                    .take_while(|(k, _)| k.starts_with(&from))
                    .map(|(_, v)| v.clone())
                    .collect()
            }
            None => objs.values().cloned().collect(),
        }
    }

    /// Objects in `ns` (all when None).
    pub fn list(&self, ns: Option<&str>) -> Vec<Arc<K>> {
        self.entries(ns).into_iter().map(|e| e.obj).collect()
    }

    /// The stored JSON of `key`, for code that reads any kind alike.
    pub fn get_raw(&self, key: &str) -> Option<Arc<Value>> {
        self.objects
            .read()
            .expect("cache")
            .get(key)
            .map(|e| e.raw.clone())
    }

    /// The stored JSON of the objects in `ns` (all when None).
    pub fn list_raw(&self, ns: Option<&str>) -> Vec<Arc<Value>> {
        self.entries(ns).into_iter().map(|e| e.raw).collect()
    }

    pub fn select(&self, ns: Option<&str>, sel: &Selector) -> Vec<Arc<K>> {
        let empty = BTreeMap::new();
        self.list(ns)
            .into_iter()
            .filter(|o| sel.matches(o.metadata().labels.as_ref().unwrap_or(&empty)))
            .collect()
    }

    /// Waits (at most 2 s) until this cache has seen revision `rev`: after a controller writes,
    /// its next reconcile must see its own write.
    pub async fn wait_for(&self, rev: u64) {
        let mut rx = self.seen.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| *s >= rev)).await;
    }

    /// Puts an object in the cache as a watch event would (unit tests drive caches by hand).
    #[cfg(test)]
    pub(crate) fn insert(&self, obj: Value) {
        let typed: K = serde_json::from_value(obj.clone()).expect("a valid object");
        self.objects.write().expect("cache").insert(
            key_of(&obj),
            Entry {
                obj: Arc::new(typed),
                raw: Arc::new(obj),
            },
        );
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Moves on after every change to the cached objects. Read it before reading the objects:
    /// an index built from them is current while this has not moved since.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> u64 {
        *self.seen.borrow()
    }

    fn notify(&self, c: &Change<K>) {
        for h in self.handlers.read().expect("handlers").iter() {
            h(c);
        }
    }

    /// The entries of a listing. An object unchanged since the last listing keeps its decoded
    /// form; the others are decoded, a share per core for a large listing. Blocking.
    fn listed(&self, items: Vec<Arc<Value>>) -> BTreeMap<String, Entry<K>> {
        let keyed: Vec<Listed<K>> = {
            let old = self.objects.read().expect("cache");
            items
                .into_iter()
                .map(|raw| {
                    let key = key_of(&raw);
                    let kept = match old.get(&key) {
                        Some(e) if Arc::ptr_eq(&e.raw, &raw) => Some(e.obj.clone()),
                        _ => None,
                    };
                    (key, raw, kept)
                })
                .collect()
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores.min(keyed.len() / DECODE_SHARE_MIN).max(1);
        if threads == 1 {
            return decode_all(keyed).collect();
        }
        let mut shares = Vec::with_capacity(threads);
        let mut rest = keyed;
        let size = rest.len().div_ceil(threads);
        while rest.len() > size {
            let tail = rest.split_off(size);
            shares.push(std::mem::replace(&mut rest, tail));
        }
        std::thread::scope(|s| {
            // This thread decodes the last share while the others decode theirs.
            let others: Vec<_> = shares
                .into_iter()
                .map(|share| s.spawn(move || decode_all(share).collect::<Vec<_>>()))
                .collect();
            let last: Vec<_> = decode_all(rest).collect();
            let mut entries: Vec<_> = others
                .into_iter()
                .flat_map(|h| h.join().expect("decoding thread"))
                .collect();
            entries.extend(last);
            entries.into_iter().collect()
        })
    }

    /// Keeps the cache current until `stop`: list, then watch; re-list when the watch ends.
    pub async fn run(self: Arc<Self>, reg: Arc<Registry>, mut stop: watch::Receiver<bool>) {
        let prefix = self.resource.key_prefix();
        loop {
            let (items, rev) = match reg.store().list_shared(&prefix) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(resource = self.resource.plural, error = %e, "cache list failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Decoding a listing of thousands of objects takes a while: it runs on the
            // blocking pool, spread over the cores, not on the runtime's threads.
            let this = self.clone();
            let fresh = match tokio::task::spawn_blocking(move || this.listed(items)).await {
                Ok(fresh) => fresh,
                Err(e) => {
                    tracing::warn!(resource = self.resource.plural, error = %e, "cache listing failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let added: Vec<Arc<K>> = fresh.values().map(|e| e.obj.clone()).collect();
            let gone: Vec<Arc<K>> = {
                let mut objs = self.objects.write().expect("cache");
                let gone = objs
                    .iter()
                    .filter(|(k, _)| !fresh.contains_key(*k))
                    .map(|(_, v)| v.obj.clone())
                    .collect();
                *objs = fresh;
                gone
            };
            self.generation.fetch_add(1, Ordering::Release);
            self.seen.send_replace(rev);
            for o in gone {
                self.notify(&Change {
                    kind: EventType::Deleted,
                    object: o,
                    prev: None,
                });
            }
            for object in added {
                self.notify(&Change {
                    kind: EventType::Added,
                    object,
                    prev: None,
                });
            }
            let mut rx = match reg.store().watch(&prefix, rev) {
                Ok(rx) => rx,
                Err(_) => continue,
            };
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    ev = rx.recv() => {
                        let Some(ev) = ev else { break };
                        let raw = ev.object.clone();
                        let key = key_of(&raw);
                        let decoded = decode::<K>(&raw).map(Arc::new);
                        // The object before an update is the one this cache held.
                        let old = {
                            let mut objs = self.objects.write().expect("cache");
                            match (&decoded, ev.kind) {
                                (Some(obj), kind) if kind != EventType::Deleted => objs.insert(
                                    key,
                                    Entry { obj: obj.clone(), raw },
                                ),
                                _ => objs.remove(&key),
                            }
                        };
                        self.generation.fetch_add(1, Ordering::Release);
                        self.seen.send_replace(ev.revision);
                        let prev = match ev.prev.as_deref() {
                            None => None,
                            Some(p) => match &old {
                                Some(e) => Some(e.obj.clone()),
                                None => decode::<K>(p).map(Arc::new),
                            },
                        };
                        let object = match (decoded, old) {
                            (Some(o), _) => o,
                            // An undecodable deletion still tells handlers what went.
                            (None, Some(e)) if ev.kind == EventType::Deleted => e.obj,
                            _ => continue,
                        };
                        self.notify(&Change { kind: ev.kind, object, prev });
                    }
                }
            }
        }
    }
}

/// Sends keys to a controller's queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::UnboundedSender<(String, Option<Instant>)>,
}

impl Queue {
    pub fn add(&self, key: impl Into<String>) {
        let _ = self.tx.send((key.into(), None));
    }
    pub fn add_after(&self, key: impl Into<String>, d: Duration) {
        let _ = self.tx.send((key.into(), Some(Instant::now() + d)));
    }
}

/// Per-key error backoff: 5 ms doubling to 30 s; forgotten on success.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(5u64.saturating_mul(1 << failures.min(13))).min(Duration::from_secs(30))
}

/// Keys waiting for a time: at most one timer per key, the earliest asked for kept (as
/// client-go's delaying queue does), so event-triggered requeues of one key cannot pile up.
#[derive(Default)]
struct Delayed {
    heap: BinaryHeap<std::cmp::Reverse<(Instant, String)>>,
    /// The one live deadline of each waiting key; heap entries that disagree are stale.
    at: HashMap<String, Instant>,
}

impl Delayed {
    fn add(&mut self, key: String, at: Instant) {
        match self.at.get(&key) {
            Some(cur) if *cur <= at => {}
            _ => {
                self.at.insert(key.clone(), at);
                self.heap.push(std::cmp::Reverse((at, key)));
            }
        }
    }

    /// Removes and returns the keys due at `now`.
    fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        while let Some(std::cmp::Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let std::cmp::Reverse((at, k)) = self.heap.pop().expect("peeked");
            if self.at.get(&k) == Some(&at) {
                self.at.remove(&k);
                due.push(k);
            }
        }
        due
    }

    /// When the next key is due.
    fn next(&mut self) -> Option<Instant> {
        // Drop stale entries so the loop does not wake for them.
        while let Some(std::cmp::Reverse((at, k))) = self.heap.peek() {
            if self.at.get(k) == Some(at) {
                return Some(*at);
            }
            self.heap.pop();
        }
        None
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.at.len()
    }
}

pub fn queue() -> (Queue, mpsc::UnboundedReceiver<(String, Option<Instant>)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Queue { tx }, rx)
}

/// Runs `c` over the keys arriving on `rx` until `stop`.
pub async fn run<C: Reconciler>(
    c: Arc<C>,
    mut rx: mpsc::UnboundedReceiver<(String, Option<Instant>)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ready: BTreeSet<String> = BTreeSet::new();
    let mut delayed = Delayed::default();
    let failures: Mutex<HashMap<String, u32>> = Mutex::new(HashMap::new());
    loop {
        // Move due delayed keys to ready.
        ready.extend(delayed.take_due(Instant::now()));
        if let Some(key) = ready.pop_first() {
            let span = tracing::debug_span!("reconcile", controller = c.name(), key = %key);
            let result = c.reconcile(&key).instrument(span).await;
            match result {
                Ok(action) => {
                    failures.lock().expect("failures").remove(&key);
                    if let Action::RequeueAfter(d) = action {
                        delayed.add(key, Instant::now() + d);
                    }
                }
                Err(e) => {
                    let n = {
                        let mut f = failures.lock().expect("failures");
                        let n = f.entry(key.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    if e.code != 409 {
                        tracing::warn!(controller = c.name(), key = %key, error = %e, attempt = n, "reconcile failed");
                    }
                    delayed.add(key, Instant::now() + backoff(n));
                }
            }
            // Take whatever arrived meanwhile without blocking.
            while let Ok((k, at)) = rx.try_recv() {
                match at {
                    Some(at) => delayed.add(k, at),
                    None => {
                        ready.insert(k);
                    }
                }
            }
            continue;
        }
        let sleep = delayed
            .next()
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(sleep) => {}
            msg = rx.recv() => match msg {
                Some((k, None)) => { ready.insert(k); }
                Some((k, Some(at))) => delayed.add(k, at),
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_timer_per_key_the_earliest_kept() {
        let mut d = Delayed::default();
        let t0 = Instant::now();
        // A reconcile per event, each asking to look again in 601 s: one timer.
        for i in 0..1000 {
            d.add(
                "ns/app".into(),
                t0 + Duration::from_secs(601) + Duration::from_millis(i),
            );
        }
        assert_eq!(d.len(), 1);
        assert_eq!(d.heap.len(), 1, "later deadlines add no entries");
        assert_eq!(d.next(), Some(t0 + Duration::from_secs(601)));
        // An earlier deadline replaces it; the later one no longer fires.
        d.add("ns/app".into(), t0 + Duration::from_secs(1));
        d.add("ns/other".into(), t0 + Duration::from_secs(5));
        assert_eq!(d.len(), 2);
        assert_eq!(d.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(d.take_due(t0 + Duration::from_secs(2)), vec!["ns/app"]);
        assert_eq!(d.take_due(t0 + Duration::from_secs(700)), vec!["ns/other"]);
        assert_eq!(d.next(), None);
        assert_eq!(d.len(), 0);
        // Once fired, the key may wait again.
        d.add("ns/app".into(), t0 + Duration::from_secs(3));
        assert_eq!(d.take_due(t0 + Duration::from_secs(3)), vec!["ns/app"]);
    }

    #[tokio::test]
    async fn a_cache_holds_typed_objects_and_hands_handlers_the_one_before() {
        use crate::registry::{ClusterConfig, WriteOptions};
        use crate::store::sqlite::SqliteStore;
        use k8s_openapi::api::core::v1::ConfigMap;
        use serde_json::json;

        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(
            Arc::new(SqliteStore::open(dir.path()).unwrap()),
            ClusterConfig::default(),
        );
        let opts = WriteOptions::default();
        let res = |p: &str| Resource::lookup(p).unwrap();
        reg.create(
            res("namespaces"),
            None,
            json!({"metadata": {"name": "default"}}),
            &opts,
        )
        .unwrap();
        let cms = Cache::<ConfigMap>::new();
        type Seen = (EventType, Option<String>, Option<String>);
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s = seen.clone();
        cms.on_change(move |c| {
            let v = |cm: &ConfigMap| cm.data.as_ref().and_then(|d| d.get("k").cloned());
            s.lock()
                .unwrap()
                .push((c.kind, v(&c.object), c.prev.as_deref().and_then(v)));
        });
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(cms.clone().run(reg.clone(), rx));
        let cm =
            |v: &str| json!({"metadata": {"name": "c", "labels": {"app": "x"}}, "data": {"k": v}});
        let first = reg
            .create(res("configmaps"), Some("default"), cm("1"), &opts)
            .unwrap();
        cms.wait_for(meta::resource_version(&first).unwrap()).await;
        let out = reg
            .update(
                res("configmaps"),
                Some("default"),
                "c",
                cm("2"),
                crate::registry::Sub::Main,
                &opts,
            )
            .unwrap();
        cms.wait_for(meta::resource_version(&out).unwrap()).await;
        let got = cms.get("default/c").expect("cached");
        assert_eq!(got.data.as_ref().unwrap()["k"], "2");
        assert_eq!(got.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(cms.list(Some("default")).len(), 1);
        assert!(cms.list(Some("other")).is_empty());
        assert_eq!(
            cms.select(
                None,
                &Selector::from_map(&[("app".to_string(), "x".to_string())].into())
            )
            .len(),
            1
        );
        assert_eq!(cms.get_raw("default/c").unwrap()["data"]["k"], "2");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.last(),
            Some(&(EventType::Modified, Some("2".into()), Some("1".into()))),
            "an update's handler sees the object before it, typed: {seen:?}"
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(10));
        assert!(backoff(5) > backoff(4));
        assert_eq!(backoff(40), Duration::from_secs(30));
    }
}

/// The revision of each key's last write, which the key's next reconcile waits for the
/// written resource's cache to have seen: a controller never acts on a cache older than its
/// own writes.
#[derive(Default)]
pub struct Expectations(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl Expectations {
    /// The revision the next reconcile of `key` waits for, if any.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.0.lock().expect("expectations").get(key).copied()
    }

    /// Records that reconciling `key` wrote up to revision `rev` (0: nothing written).
    pub fn wrote(&self, key: &str, rev: u64) {
        if rev > 0 {
            self.0
                .lock()
                .expect("expectations")
                .insert(key.to_string(), rev);
        }
    }

    /// Forgets `key` (its object is gone).
    pub fn forget(&self, key: &str) {
        self.0.lock().expect("expectations").remove(key);
    }

    /// Waits until `cache` has seen the last write recorded for `key`.
    pub async fn settle<K: Object>(&self, key: &str, cache: &Cache<K>) {
        if let Some(rev) = self.get(key) {
            cache.wait_for(rev).await;
        }
    }
}
