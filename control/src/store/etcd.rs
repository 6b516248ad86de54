//! The store on etcd (v3 API), for several API servers sharing one cluster.
//!
//! Keys are the store's keys (`/registry/{resource}/...`) under an optional extra prefix. A
//! store transaction is **one etcd transaction**: every op compares the key's `mod_revision`
//! (a create: `create_revision == 0`), and the writes apply only if every compare holds.
//! **`metadata.resourceVersion` is etcd's revision** (the key's `mod_revision`), stamped when an
//! object is read; the stored JSON carries none. Every server therefore hands out the same
//! versions, and a watch on any server sees every write, whoever made it: watches are etcd's own
//! (one etcd watch per store watch, from the requested revision on), so they resume from any
//! revision etcd still keeps and end with [`StoreError::Expired`] (410) once it is compacted.
//! A task compacts the history older than [`EtcdConfig::compaction_interval`], as the
//! Kubernetes API server does.
//!
//! The [`Store`] trait stays synchronous: etcd's client is async, so the store owns a small
//! runtime of its own that runs every request, and a sync method hands its request over and
//! waits for the answer (under `block_in_place` on a multi-threaded runtime's worker). That
//! is sound because the runtime is the store's own (a caller's runtime never waits on
//! itself), and it keeps the registry, the caches and sled's store unchanged. Every request
//! has a deadline ([`EtcdConfig::request_timeout`]): without a quorum, writes fail with
//! [`StoreError::Backend`] (a 500 `Status`), and a failed transaction changed nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType as EtcdEvent,
    GetOptions, GetResponse, Identity, KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use serde_json::Value;
use skiff_api::limits::MAX_OBJECT_BYTES;
use tokio::sync::mpsc;

use super::encryption::{self, Encryption};
use super::hub::{Event, EventType, WatchStream};
use super::{stamp, Committed, Op, Store, StoreError};

/// Operations etcd takes in one transaction by default (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;
/// Objects fetched per range request when listing.
const LIST_PAGE: i64 = 500;
/// Events a watch may have waiting before it is ended (its client re-lists).
const WATCH_BUFFER: usize = 4096;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs (`http://127.0.0.1:2379`, or `https://...` with the TLS files below).
    pub endpoints: Vec<String>,
    /// CA that signed etcd's serving certificates (PEM).
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) when etcd asks for one.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// Put before every key: lets several clusters (or tests) share one etcd.
    pub prefix: String,
    /// How long a request may take before it fails (a lost quorum fails writes after this).
    pub request_timeout: Duration,
    /// How often history older than one interval is compacted (Kubernetes: 5 minutes).
    pub compaction_interval: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            ca_file: None,
            cert_file: None,
            key_file: None,
            prefix: String::new(),
            request_timeout: Duration::from_secs(5),
            compaction_interval: Duration::from_secs(300),
        }
    }
}

pub struct EtcdStore {
    /// The store's own runtime; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    timeout: Duration,
    /// Seals Secrets before they are written, opens them when read (None: stored as they are).
    encryption: Option<Arc<Encryption>>,
    /// Watches whose stream is open.
    watchers: Arc<AtomicUsize>,
    /// The newest revision any answer carried.
    latest: Arc<AtomicU64>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

fn read_pem(path: &std::path::Path) -> Result<String, StoreError> {
    std::fs::read_to_string(path).map_err(|e| backend(format!("{}: {e}", path.display())))
}

fn tls_options(config: &EtcdConfig) -> Result<Option<TlsOptions>, StoreError> {
    if config.ca_file.is_none() && config.cert_file.is_none() {
        return Ok(None);
    }
    let mut tls = TlsOptions::new();
    if let Some(ca) = &config.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read_pem(ca)?));
    }
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(backend(
                "--datastore-certfile and --datastore-keyfile go together",
            ))
        }
    }
    Ok(Some(tls))
}

impl EtcdStore {
    /// Connects to etcd and checks it answers. Secrets are stored as they are until
    /// [`EtcdStore::with_encryption`] gives a key.
    pub fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        if config.endpoints.is_empty() {
            return Err(backend("no endpoints"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(backend)?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(10), config.request_timeout)
            .with_require_leader(true);
        if let Some(tls) = tls_options(config)? {
            options = options.with_tls(tls);
        }
        let endpoints = config.endpoints.clone();
        let client = wait(&rt, config.request_timeout, async move {
            Client::connect(endpoints, Some(options))
                .await
                .map_err(backend)
        })?;
        let store = EtcdStore {
            rt: Some(rt),
            client,
            prefix: config.prefix.clone(),
            timeout: config.request_timeout,
            encryption: None,
            watchers: Arc::new(AtomicUsize::new(0)),
            latest: Arc::new(AtomicU64::new(0)),
        };
        // Fails now, with a clear message, if no member answers.
        store.current_revision()?;
        store.start_compaction(config.compaction_interval);
        Ok(store)
    }

    /// Encrypts Secrets with `encryption` from now on.
    pub fn with_encryption(mut self, encryption: Encryption) -> Self {
        self.encryption = Some(Arc::new(encryption));
        self
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the store's runtime lives until drop")
    }

    /// Runs `f` with a client on the store's runtime and waits (at most the request timeout)
    /// for its answer.
    fn run<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        wait(self.rt(), self.timeout, f(self.client.clone()))
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn seen(&self, revision: i64) {
        self.latest
            .fetch_max(revision.max(0) as u64, Ordering::SeqCst);
    }

    /// The revision etcd is at now (a linearizable read).
    fn current_revision(&self) -> Result<u64, StoreError> {
        let key = self.full_key("/registry/");
        let rev = self.run(move |mut c| async move {
            let r = get_retrying(
                &mut c,
                key.into_bytes(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(backend)?;
            Ok(r.header().map_or(0, |h| h.revision()))
        })?;
        self.seen(rev);
        Ok(rev as u64)
    }

    /// Reads a key outside the registry (the cluster's shared bootstrap data) as stored.
    pub fn raw_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.full_key(key);
        self.run(move |mut c| async move {
            let mut r = get_retrying(&mut c, key.into_bytes(), None)
                .await
                .map_err(backend)?;
            Ok(r.take_kvs()
                .into_iter()
                .next()
                .map(|kv| kv.value().to_vec()))
        })
    }

    /// Creates a key outside the registry unless it exists; says whether it was created.
    pub fn raw_create(&self, key: &str, value: Vec<u8>) -> Result<bool, StoreError> {
        let key = self.full_key(key);
        self.run(move |mut c| async move {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, None)]);
            Ok(c.txn(txn).await.map_err(backend)?.succeeded())
        })
    }

    /// Compacts, every `interval`, the history older than the revision seen one interval
    /// before. Several servers may do it: compacting an already compacted revision is refused
    /// by etcd and ignored.
    fn start_compaction(&self, interval: Duration) {
        let client = self.client.clone();
        let key = self.full_key("/registry/");
        self.rt().spawn(async move {
            let mut previous: Option<i64> = None;
            loop {
                tokio::time::sleep(interval).await;
                let mut c = client.clone();
                let now = match c
                    .get(key.clone(), Some(GetOptions::new().with_count_only()))
                    .await
                {
                    Ok(r) => r.header().map_or(0, |h| h.revision()),
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd compaction: cannot read the revision");
                        continue;
                    }
                };
                if let Some(rev) = previous.filter(|r| *r > 0) {
                    match c.compact(rev, None).await {
                        Ok(_) => tracing::info!(revision = rev, "etcd history compacted"),
                        Err(e) => tracing::debug!(revision = rev, error = %e, "etcd compaction"),
                    }
                }
                previous = Some(now);
            }
        });
    }

    /// The object stored in `kv`, stamped with `revision`.
    fn decode(enc: Option<&Encryption>, kv: &KeyValue, revision: i64) -> Result<Value, StoreError> {
        decode_bytes(enc, kv.value(), revision)
    }
}

fn decode_bytes(
    enc: Option<&Encryption>,
    bytes: &[u8],
    revision: i64,
) -> Result<Value, StoreError> {
    let plain = match enc {
        Some(e) => e.open(bytes)?,
        None => std::borrow::Cow::Borrowed(bytes),
    };
    let mut v: Value = serde_json::from_slice(&plain).map_err(backend)?;
    stamp(&mut v, revision.max(0) as u64);
    Ok(v)
}

/// Runs `fut` on `rt` and waits for it, at most `timeout`.
fn wait<T, F>(rt: &tokio::runtime::Runtime, timeout: Duration, fut: F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(backend(format!(
                "no answer within {} s (is a quorum of members up?)",
                timeout.as_secs_f32()
            ))),
        };
        let _ = tx.send(r);
    });
    super::blocking(|| rx.recv()).map_err(|_| backend("the client stopped"))?
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which is not allowed on an async thread.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The JSON stored for an object: without `resourceVersion` (it is the key's revision).
fn stored_bytes(enc: Option<&Encryption>, key: &str, value: &Value) -> Result<Vec<u8>, StoreError> {
    let mut v = value.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    let json = serde_json::to_vec(&v).map_err(backend)?;
    if json.len() > MAX_OBJECT_BYTES {
        return Err(StoreError::TooLarge {
            key: key.to_string(),
            size: json.len(),
            max: MAX_OBJECT_BYTES,
        });
    }
    match (enc, encryption::applies(key)) {
        (Some(e), true) => e.seal(&json),
        _ => Ok(json),
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let full = self.full_key(key);
        let enc = self.encryption.clone();
        let latest = self.latest.clone();
        self.run(move |mut c| async move {
            let mut r = get_retrying(&mut c, full.into_bytes(), None)
                .await
                .map_err(backend)?;
            if let Some(h) = r.header() {
                latest.fetch_max(h.revision().max(0) as u64, Ordering::SeqCst);
            }
            match r.take_kvs().into_iter().next() {
                Some(kv) => Ok(Some(Self::decode(enc.as_deref(), &kv, kv.mod_revision())?)),
                None => Ok(None),
            }
        })
    }

    fn list_shared(&self, prefix: &str) -> Result<(Vec<Arc<Value>>, u64), StoreError> {
        let full = self.full_key(prefix);
        let enc = self.encryption.clone();
        let (items, rev) = self.run(move |c| list_pages(c, full, enc))?;
        self.seen(rev);
        Ok((items, rev as u64))
    }

    fn txn(&self, ops: Vec<Op>) -> Result<Committed, StoreError> {
        if ops.is_empty() {
            return Ok(Committed {
                revision: self.revision(),
                objects: Vec::new(),
            });
        }
        if ops.len() > MAX_TXN_OPS {
            return Err(backend(format!(
                "{} operations in one transaction, more than {MAX_TXN_OPS}",
                ops.len()
            )));
        }
        let enc = self.encryption.as_deref();
        let mut when = Vec::with_capacity(ops.len());
        let mut then = Vec::with_capacity(ops.len());
        let mut otherwise = Vec::with_capacity(ops.len());
        for op in &ops {
            match op {
                Op::Create { key, value } => {
                    let full = self.full_key(key);
                    when.push(Compare::create_revision(full.clone(), CompareOp::Equal, 0));
                    then.push(TxnOp::put(
                        full.clone(),
                        stored_bytes(enc, key, value)?,
                        None,
                    ));
                    otherwise.push(TxnOp::get(full, Some(GetOptions::new().with_keys_only())));
                }
                Op::Update { key, value, expect } => {
                    let full = self.full_key(key);
                    when.push(expect_compare(&full, *expect));
                    then.push(TxnOp::put(
                        full.clone(),
                        stored_bytes(enc, key, value)?,
                        None,
                    ));
                    otherwise.push(TxnOp::get(full, Some(GetOptions::new().with_keys_only())));
                }
                Op::Delete { key, expect } => {
                    let full = self.full_key(key);
                    when.push(expect_compare(&full, *expect));
                    then.push(TxnOp::delete(
                        full.clone(),
                        Some(DeleteOptions::new().with_prev_key()),
                    ));
                    otherwise.push(TxnOp::get(full, Some(GetOptions::new().with_keys_only())));
                }
            }
        }
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
        let resp = self.run(move |mut c| async move { c.txn(txn).await.map_err(backend) })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.seen(revision);
        let answers = resp.op_responses();
        if !resp.succeeded() {
            return Err(why_failed(&ops, &answers));
        }
        let mut objects = Vec::with_capacity(ops.len());
        for (op, answer) in ops.into_iter().zip(answers) {
            match op {
                Op::Create { mut value, .. } | Op::Update { mut value, .. } => {
                    stamp(&mut value, revision as u64);
                    objects.push(value);
                }
                Op::Delete { key, .. } => {
                    let prev = match answer {
                        TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
                        _ => None,
                    };
                    let prev = prev.ok_or_else(|| StoreError::NotFound(key.clone()))?;
                    objects.push(Self::decode(enc, &prev, revision)?);
                }
            }
        }
        Ok(Committed {
            revision: revision as u64,
            objects,
        })
    }

    fn revision(&self) -> u64 {
        self.current_revision()
            .unwrap_or_else(|_| self.latest.load(Ordering::SeqCst))
    }

    fn watch(&self, prefix: &str, from: u64) -> Result<WatchStream, StoreError> {
        let full = self.full_key(prefix);
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let pump = Pump {
            client: self.client.clone(),
            key: full,
            prefix_len: self.prefix.len(),
            encryption: self.encryption.clone(),
            tx,
            next: from as i64 + 1,
            latest: self.latest.clone(),
        };
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let watchers = self.watchers.clone();
        watchers.fetch_add(1, Ordering::SeqCst);
        let timeout = self.timeout;
        self.rt().spawn(async move {
            pump.run(started_tx, timeout).await;
            watchers.fetch_sub(1, Ordering::SeqCst);
        });
        let started = wait(self.rt(), self.timeout, async move {
            started_rx
                .await
                .map_err(|_| backend("the watch ended before it started"))
        })?;
        started.map(|()| rx)
    }

    fn watchers(&self) -> usize {
        self.watchers.load(Ordering::SeqCst)
    }

    fn max_txn_ops(&self) -> usize {
        MAX_TXN_OPS
    }
}

/// Compare for an update or delete: the key exists and, with `expect`, is at that revision.
fn expect_compare(full: &str, expect: Option<u64>) -> Compare {
    match expect {
        Some(rev) => Compare::mod_revision(full.to_string(), CompareOp::Equal, rev as i64),
        None => Compare::create_revision(full.to_string(), CompareOp::Greater, 0),
    }
}

/// Why a transaction's compares failed, from the keys as the failed transaction saw them.
fn why_failed(ops: &[Op], answers: &[TxnOpResponse]) -> StoreError {
    for (op, answer) in ops.iter().zip(answers) {
        let current = match answer {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision() as u64),
            _ => None,
        };
        match (op, current) {
            (Op::Create { key, .. }, Some(_)) => return StoreError::AlreadyExists(key.clone()),
            (Op::Update { key, .. } | Op::Delete { key, .. }, None) => {
                return StoreError::NotFound(key.clone())
            }
            (
                Op::Update {
                    key,
                    expect: Some(expected),
                    ..
                }
                | Op::Delete {
                    key,
                    expect: Some(expected),
                },
                Some(current),
            ) if current != *expected => {
                return StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    current,
                }
            }
            _ => {}
        }
    }
    backend("a transaction's compare failed but no key differs")
}

/// A read, sent again while the member the client picked cannot be reached (killed, or
/// restarting): the client's next pick may be a live member, as Go's etcd client moves reads
/// to another endpoint. 50 ms doubling to 400 ms between tries; the request's deadline
/// ([`wait`]) ends it. Reads are safe to repeat; writes are never sent twice.
async fn get_retrying(
    c: &mut Client,
    key: Vec<u8>,
    opts: Option<GetOptions>,
) -> Result<GetResponse, etcd_client::Error> {
    let mut delay = Duration::from_millis(50);
    loop {
        match c.get(key.clone(), opts.clone()).await {
            Err(e) if unreachable(&e) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(400));
            }
            r => return r,
        }
    }
}

/// Whether an error says the member could not be reached, rather than answering.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // gRPC's UNAVAILABLE (14): no connection could be made, or it broke.
        etcd_client::Error::GRpcStatus(s) => s.code() as i32 == 14,
        _ => false,
    }
}

/// Every object under `full` at one revision, a page at a time.
async fn list_pages(
    mut c: Client,
    full: String,
    enc: Option<Arc<Encryption>>,
) -> Result<(Vec<Arc<Value>>, i64), StoreError> {
    let end = prefix_end(full.as_bytes());
    let mut from = full.into_bytes();
    let mut items = Vec::new();
    let mut at: i64 = 0;
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if at > 0 {
            opts = opts.with_revision(at);
        }
        let mut r = get_retrying(&mut c, from.clone(), Some(opts))
            .await
            .map_err(backend)?;
        if at == 0 {
            at = r.header().map_or(0, |h| h.revision());
        }
        let more = r.more();
        let kvs = r.take_kvs();
        for kv in &kvs {
            items.push(Arc::new(EtcdStore::decode(
                enc.as_deref(),
                kv,
                kv.mod_revision(),
            )?));
        }
        match kvs.last() {
            Some(last) if more => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((items, at)),
        }
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `WithPrefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Moves one etcd watch's events into a store watch stream, in revision order; re-creates the
/// etcd watch from the next revision if its connection breaks (another member answers).
struct Pump {
    client: Client,
    key: String,
    prefix_len: usize,
    encryption: Option<Arc<Encryption>>,
    tx: mpsc::Sender<Arc<Event>>,
    /// The first revision not sent yet.
    next: i64,
    latest: Arc<AtomicU64>,
}

/// How long a watch keeps trying to reach etcd again before it ends (its client re-lists).
const WATCH_RECONNECT: Duration = Duration::from_secs(30);

impl Pump {
    /// Opens the etcd watch at `self.next`; Expired when that revision is compacted.
    async fn open(&mut self) -> Result<etcd_client::WatchStream, StoreError> {
        // etcd tells a watch that it starts before the compacted revision only after it
        // was made; a read at that revision says so at once.
        let compacted = match self
            .client
            .clone()
            .get(
                self.key.clone(),
                Some(GetOptions::new().with_count_only().with_revision(self.next)),
            )
            .await
        {
            Ok(_) => false,
            Err(e) if e.to_string().contains("compacted") => true,
            // A future revision, for one: the watch waits for it.
            Err(_) => false,
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(self.next);
        let mut c = self.client.clone();
        let mut stream = c
            .watch(self.key.clone(), Some(opts))
            .await
            .map_err(backend)?;
        let requested = (self.next - 1).max(0) as u64;
        loop {
            match stream.message().await.map_err(backend)? {
                Some(r) if r.compact_revision() > 0 => {
                    return Err(StoreError::Expired {
                        requested,
                        oldest: r.compact_revision() as u64,
                    })
                }
                Some(r) if r.canceled() => {
                    return Err(backend(format!("watch refused: {}", r.cancel_reason())))
                }
                // Made; when the start is compacted, the next answer says up to where.
                Some(r) if compacted && r.created() => continue,
                Some(r) => {
                    self.forward(&r)?;
                    return Ok(stream);
                }
                None => return Err(backend("the watch stream closed")),
            }
        }
    }

    async fn run(
        mut self,
        started: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
        timeout: Duration,
    ) {
        let mut stream = match tokio::time::timeout(timeout, self.open()).await {
            Ok(Ok(s)) => {
                let _ = started.send(Ok(()));
                s
            }
            Ok(Err(e)) => {
                let _ = started.send(Err(e));
                return;
            }
            Err(_) => {
                let _ = started.send(Err(backend("no answer to a watch")));
                return;
            }
        };
        loop {
            let message = tokio::select! {
                _ = self.tx.closed() => return,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(r)) if r.canceled() || r.compact_revision() > 0 => return,
                Ok(Some(r)) => {
                    if self.forward(&r).is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) => match self.reopen().await {
                    Some(s) => stream = s,
                    None => return,
                },
            }
        }
    }

    /// Opens the watch again after its connection broke; None when etcd stays away or the
    /// revision to resume from is gone.
    async fn reopen(&mut self) -> Option<etcd_client::WatchStream> {
        let deadline = tokio::time::Instant::now() + WATCH_RECONNECT;
        let mut pause = Duration::from_millis(100);
        while tokio::time::Instant::now() < deadline && !self.tx.is_closed() {
            match tokio::time::timeout(Duration::from_secs(5), self.open()).await {
                Ok(Ok(s)) => return Some(s),
                Ok(Err(StoreError::Expired { .. })) => return None,
                _ => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        None
    }

    /// Sends a response's events on; an error ends the watch (a full or closed stream).
    fn forward(&mut self, r: &etcd_client::WatchResponse) -> Result<(), StoreError> {
        if let Some(h) = r.header() {
            self.latest
                .fetch_max(h.revision().max(0) as u64, Ordering::SeqCst);
        }
        let enc = self.encryption.as_deref();
        for ev in r.events() {
            let Some(kv) = ev.kv() else { continue };
            let revision = kv.mod_revision();
            if revision < self.next {
                continue;
            }
            let key = strip_prefix_len(kv.key(), self.prefix_len)?;
            let prev = ev
                .prev_kv()
                .map(|p| decode_bytes(enc, p.value(), p.mod_revision()))
                .transpose()?;
            let event = match ev.event_type() {
                EtcdEvent::Put => Event {
                    revision: revision as u64,
                    kind: if kv.create_revision() == revision {
                        EventType::Added
                    } else {
                        EventType::Modified
                    },
                    key,
                    object: Arc::new(decode_bytes(enc, kv.value(), revision)?),
                    prev: if kv.create_revision() == revision {
                        None
                    } else {
                        prev.map(Arc::new)
                    },
                    size: kv.value().len(),
                },
                EtcdEvent::Delete => {
                    let mut last = prev.unwrap_or_else(
                        || serde_json::json!({"metadata": {"name": key.rsplit('/').next()}}),
                    );
                    stamp(&mut last, revision as u64);
                    Event {
                        revision: revision as u64,
                        kind: EventType::Deleted,
                        key,
                        object: Arc::new(last),
                        prev: None,
                        size: 0,
                    }
                }
            };
            self.tx
                .try_send(Arc::new(event))
                .map_err(|_| backend("watcher too far behind"))?;
        }
        // Events of one revision arrive together; resuming starts at the next one.
        if let Some(last) = r.events().last().and_then(|e| e.kv()) {
            self.next = last.mod_revision() + 1;
        }
        Ok(())
    }
}

fn strip_prefix_len(key: &[u8], len: usize) -> Result<String, StoreError> {
    let key = std::str::from_utf8(key).map_err(backend)?;
    key.get(len..)
        .map(str::to_string)
        .ok_or_else(|| backend(format!("key {key} outside the prefix")))
}

/// Real etcd processes on loopback ports of their own, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use super::EtcdConfig;

    struct Member {
        name: String,
        client: u16,
        peer: u16,
        child: Option<Child>,
    }

    /// An etcd cluster of one or more members; stopped when dropped (or when the thread that
    /// started it ends).
    pub(crate) struct Etcd {
        dir: tempfile::TempDir,
        members: Mutex<Vec<Member>>,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Whether an `etcd` binary is installed; says so once when it is not.
    pub(crate) fn installed() -> bool {
        static FOUND: OnceLock<bool> = OnceLock::new();
        *FOUND.get_or_init(|| {
            let found = Command::new("etcd")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                eprintln!(
                    "SKIPPED: no `etcd` binary on PATH (apt-get install etcd-server); \
                     the etcd store tests did not run"
                );
            }
            found
        })
    }

    impl Etcd {
        /// Starts `n` members and waits until they serve; None when etcd is not installed.
        pub(crate) fn start(n: usize) -> Option<Etcd> {
            if !installed() {
                return None;
            }
            let members: Vec<Member> = (0..n)
                .map(|i| Member {
                    name: format!("e{i}"),
                    client: free_port(),
                    peer: free_port(),
                    child: None,
                })
                .collect();
            let etcd = Etcd {
                dir: tempfile::tempdir().unwrap(),
                members: Mutex::new(members),
            };
            for i in 0..n {
                etcd.spawn(i);
            }
            etcd.wait_healthy((0..n).collect());
            Some(etcd)
        }

        fn data_dir(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn spawn(&self, i: usize) {
            let mut members = self.members.lock().unwrap();
            let cluster = members
                .iter()
                .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
                .collect::<Vec<_>>()
                .join(",");
            let token = format!("skiff-test-{}", members[0].peer);
            let m = &mut members[i];
            let client = format!("http://127.0.0.1:{}", m.client);
            let peer = format!("http://127.0.0.1:{}", m.peer);
            let log =
                std::fs::File::create(self.dir.path().join(format!("{}.log", m.name))).unwrap();
            // Through a shell that kills etcd when its stdin closes: when the member is
            // killed, and when the test process ends, however it ends.
            let mut cmd = Command::new("sh");
            cmd.args([
                "-c",
                "etcd \"$@\" & p=$!; read _; kill -9 $p; wait $p",
                "sh",
            ])
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.data_dir(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log);
            m.child = Some(cmd.spawn().expect("etcd starts"));
        }

        /// Waits until the given members answer `/health` with true (a quorum is up).
        pub(crate) fn wait_healthy(&self, which: Vec<usize>) {
            let ports: Vec<u16> = {
                let members = self.members.lock().unwrap();
                which.iter().map(|i| members[*i].client).collect()
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            for port in ports {
                while !healthy(port) {
                    assert!(
                        Instant::now() < deadline,
                        "etcd on port {port} is not healthy"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }

        /// Waits until member `i` says it is unhealthy (it has no leader: no quorum).
        pub(crate) fn wait_unhealthy(&self, i: usize) {
            let port = self.members.lock().unwrap()[i].client;
            let deadline = Instant::now() + Duration::from_secs(30);
            while healthy(port) {
                assert!(
                    Instant::now() < deadline,
                    "etcd on port {port} stays healthy"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        pub(crate) fn endpoints(&self) -> Vec<String> {
            self.members
                .lock()
                .unwrap()
                .iter()
                .map(|m| format!("http://127.0.0.1:{}", m.client))
                .collect()
        }

        pub(crate) fn config(&self) -> EtcdConfig {
            EtcdConfig::new(self.endpoints())
        }

        /// kill -9 of member `i`.
        pub(crate) fn kill(&self, i: usize) {
            if let Some(c) = self.members.lock().unwrap()[i].child.take() {
                stop(c);
            }
        }

        /// Starts member `i` again on its data dir.
        pub(crate) fn restart(&self, i: usize) {
            self.spawn(i);
        }
    }

    /// Closes the shell's stdin (it kills etcd with -9) and waits for both to end.
    fn stop(mut c: Child) {
        drop(c.stdin.take());
        let _ = c.wait();
    }

    fn healthy(port: u16) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            for m in self.members.get_mut().unwrap().iter_mut() {
                if let Some(c) = m.child.take() {
                    stop(c);
                }
            }
        }
    }

    /// One etcd member for the whole test process (it ends with the process); None when etcd
    /// is not installed.
    pub(crate) fn shared_etcd() -> Option<&'static Etcd> {
        static SHARED: OnceLock<Option<Etcd>> = OnceLock::new();
        SHARED.get_or_init(|| Etcd::start(1)).as_ref()
    }

    /// A key prefix no other test uses.
    pub(crate) fn unique_prefix() -> String {
        format!("/test-{}", uuid::Uuid::new_v4().simple())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_prefix_range() {
        assert_eq!(prefix_end(b"/registry/pods/"), b"/registry/pods0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    fn obj(name: &str) -> serde_json::Value {
        serde_json::json!({"metadata": {"name": name}})
    }

    /// A watch from a compacted revision is refused with Expired (410); one from after it works.
    #[test]
    fn watches_from_compacted_revisions_expire() {
        let Some(etcd) = testing::Etcd::start(1) else {
            return;
        };
        let s = EtcdStore::connect(&etcd.config()).unwrap();
        let mut revs = Vec::new();
        for i in 0..3 {
            let c = s
                .txn(vec![Op::Create {
                    key: format!("/registry/pods/default/p{i}"),
                    value: obj("p"),
                }])
                .unwrap();
            revs.push(c.revision);
        }
        let at = revs[2] as i64;
        s.run(move |mut c| async move { c.compact(at, None).await.map_err(backend) })
            .unwrap();
        match s.watch("/registry/pods/", revs[0]) {
            Err(StoreError::Expired { oldest, .. }) => assert_eq!(oldest, revs[2]),
            other => panic!("expected Expired, got {:?}", other.map(|_| ())),
        }
        assert!(s.watch("/registry/pods/", revs[2]).is_ok());
    }

    /// Secrets are sealed in etcd and read back in the clear; other kinds are stored as JSON.
    #[test]
    fn secrets_are_encrypted_in_etcd() {
        let Some(etcd) = testing::shared_etcd() else {
            return;
        };
        let mut config = etcd.config();
        config.prefix = testing::unique_prefix();
        let dir = tempfile::tempdir().unwrap();
        let enc = Encryption::load_or_create(&dir.path().join("k")).unwrap();
        let s = EtcdStore::connect(&config).unwrap().with_encryption(enc);
        let key = "/registry/secrets/default/s";
        s.txn(vec![Op::Create {
            key: key.into(),
            value: serde_json::json!({"metadata": {"name": "s"}, "data": {"p": "c2VjcmV0LXZhbHVl"}}),
        }])
        .unwrap();
        let raw = s.raw_get(key).unwrap().unwrap();
        assert!(raw.starts_with(encryption::PREFIX));
        assert!(!String::from_utf8_lossy(&raw).contains("c2VjcmV0LXZhbHVl"));
        assert_eq!(
            s.get(key).unwrap().unwrap()["data"]["p"],
            "c2VjcmV0LXZhbHVl"
        );
        let (items, _) = s.list("/registry/secrets/").unwrap();
        assert_eq!(items[0]["data"]["p"], "c2VjcmV0LXZhbHVl");
    }

    /// With one of three members down writes succeed; without a quorum they fail with a
    /// Backend error (a 5xx) within the request timeout and store nothing; with the quorum
    /// back they succeed again, and a watch opened before sees every write made through it.
    #[test]
    fn writes_need_a_quorum() {
        let Some(etcd) = testing::Etcd::start(3) else {
            return;
        };
        let mut config = etcd.config();
        config.request_timeout = Duration::from_secs(3);
        let s = EtcdStore::connect(&config).unwrap();
        let write = |name: &str| {
            s.txn(vec![Op::Create {
                key: format!("/registry/configmaps/default/{name}"),
                value: obj(name),
            }])
        };
        // A write retried until it succeeds (within 20 s): a member that was the leader takes
        // an election to replace. One that committed before its answer was lost is there.
        let write_soon = |name: &str| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                match write(name) {
                    Ok(_) | Err(StoreError::AlreadyExists(_)) => return,
                    Err(e) => {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "writes still fail: {e}"
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        };
        write("before").unwrap();
        etcd.kill(2);
        write_soon("one-down");
        etcd.kill(1);
        // Once the last member knows it has no leader, nothing is proposed (a write a leader
        // took just before would be in doubt, and might still commit when the quorum is back).
        etcd.wait_unhealthy(0);
        let started = std::time::Instant::now();
        let e = s
            .txn(
                ["nq-1", "nq-2"]
                    .iter()
                    .map(|n| Op::Create {
                        key: format!("/registry/configmaps/default/{n}"),
                        value: obj(n),
                    })
                    .collect(),
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Backend(_)), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        etcd.restart(1);
        etcd.restart(2);
        etcd.wait_healthy(vec![0, 1, 2]);
        write_soon("after");
        // Reads too may need the client to find a member that answers again.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let items = loop {
            match s.list("/registry/configmaps/") {
                Ok((items, _)) => break items,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "lists still fail: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let mut names: Vec<String> = items
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        // A refused write may still be in doubt (a leader may have taken it just before it
        // lost its quorum, and commit it when the quorum is back), but never partial.
        let in_doubt = names.iter().filter(|n| n.starts_with("nq-")).count();
        assert!(in_doubt == 0 || in_doubt == 2, "{names:?}");
        names.retain(|n| !n.starts_with("nq-"));
        assert_eq!(names, vec!["after", "before", "one-down"]);
    }
}
