//! skiff-wasm: WebAssembly workloads for skiff, behind skiff's own API (wasmtime stays inside).
//!
//! - [`Runtime`]: one wasmtime engine (pooling allocator, epoch interruption), an on-disk
//!   compile cache keyed by content digest and engine (each digest compiled once per process,
//!   on a blocking thread: [`Runtime::load`]), and classification of a binary by its
//!   exports: a component exporting `wasi:http/incoming-handler` is an HTTP service
//!   ([`Runtime::serve_http`], a fresh instance per request); a component exporting
//!   `wasi:cli/run`, or a core module with `_start`, is a command ([`Runtime::run_command`]).
//! - [`artifact`]: pulling and pushing wasm from OCI registries (CNCF wasm layout; Spin's and
//!   Krustlet's layer types accepted), blobs verified and kept content-addressed.
//! - [`collect_garbage`]: what the node calls now and then so that the compile cache, the blob
//!   cache, the image index and the programs held in memory never outgrow what its pods use.

pub mod artifact;
mod host;
mod http;
mod outgoing;
mod workers;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig, Store,
};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use host::{GuestConfig, Preopen, Resolver};
pub use http::{Handler, HttpServer};
pub use outgoing::TlsRoots;

/// How often the epoch ticks: the granularity of CPU deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("not a WebAssembly module or component")]
    NotWasm,
    #[error("the wasm binary exports neither wasi:http/incoming-handler, wasi:cli/run nor _start: nothing to run")]
    NothingToRun,
    #[error("compiling the wasm binary: {0}")]
    Compile(String),
    #[error("linking the wasm binary: {0}")]
    Link(String),
    #[error("running the guest: {0}")]
    Guest(String),
    #[error("compile cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What a wasm binary is, by its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Serves `wasi:http/incoming-handler` on its container ports.
    Http,
    /// Runs to completion like a process (`wasi:cli/run` component or core `_start`).
    Command,
}

/// A compiled, linked program ready to instantiate. The runtime keeps it in memory (and
/// hands it to whoever loads the same binary) only while some `Program` (or a
/// [`Handler`] made from it) is held.
#[derive(Clone)]
pub struct Program {
    pub kind: Kind,
    /// Content digest (`sha256:…`) of the binary.
    pub digest: String,
    /// Whether it came from the compile cache (or was already loaded).
    pub cached: bool,
    inner: Arc<Inner>,
}

enum Inner {
    Http(ProxyPre<host::Host>),
    Command(CommandPre<host::Host>),
    Core(wasmtime::InstancePre<host::Host>),
}

impl Inner {
    fn kind(&self) -> Kind {
        match self {
            Inner::Http(_) => Kind::Http,
            Inner::Command(_) | Inner::Core(_) => Kind::Command,
        }
    }
}

/// One digest's place in the runtime's memory: the program while anyone holds it. Whoever
/// loads the digest holds the slot's lock while compiling, so others wait for that compile
/// instead of starting their own.
type Slot = Arc<Mutex<Weak<Inner>>>;

/// The engine and its caches. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    cache_dir: PathBuf,
    component_linker: Arc<Linker<host::Host>>,
    core_linker: Arc<wasmtime::Linker<host::Host>>,
    /// Programs linked in this process and still held somewhere, by digest.
    loaded: Arc<Mutex<HashMap<String, Slot>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How much the node's caches may keep of what no pod uses. Entries a pod uses are always kept.
#[derive(Debug, Clone, Copy)]
pub struct GcBounds {
    /// Unused entries used (or written) within this long are kept (a rollback finds them)...
    pub min_age: Duration,
    /// ...unless the cache is larger than this: then unused entries go, oldest first.
    pub max_bytes: u64,
}

impl Default for GcBounds {
    fn default() -> Self {
        GcBounds {
            min_age: Duration::from_secs(600),
            max_bytes: 2 << 30,
        }
    }
}

/// One file of a content-addressed cache directory, for garbage collection.
pub(crate) struct CacheFile {
    pub path: PathBuf,
    /// In use: never removed.
    pub used: bool,
    pub modified: SystemTime,
    pub size: u64,
}

impl CacheFile {
    pub fn of(path: PathBuf, used: bool) -> Option<CacheFile> {
        let meta = std::fs::symlink_metadata(&path).ok()?;
        Some(CacheFile {
            path,
            used,
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            size: meta.len(),
        })
    }
}

/// Removes the unused files older than `bounds.min_age`, then unused ones oldest first while
/// the rest is over `bounds.max_bytes`. Returns how many were removed.
pub(crate) fn prune(mut files: Vec<CacheFile>, bounds: GcBounds) -> usize {
    let now = SystemTime::now();
    let old = |f: &CacheFile| {
        now.duration_since(f.modified)
            .is_ok_and(|age| age >= bounds.min_age)
    };
    files.sort_by_key(|f| f.modified);
    let mut total: u64 = files.iter().map(|f| f.size).sum();
    let mut removed = 0;
    for f in files.iter().filter(|f| !f.used) {
        if (old(f) || total > bounds.max_bytes) && std::fs::remove_file(&f.path).is_ok() {
            total -= f.size;
            removed += 1;
        }
    }
    removed
}

/// What one garbage collection of the wasm caches removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Wasm blobs (pulled layers).
    pub blobs: usize,
    /// Compiled programs (and unusable compile cache files).
    pub compiled: usize,
    /// Image index entries whose blob is gone (a later pod of that image pulls it again).
    pub images: usize,
}

/// Garbage collection of the node's wasm caches, for the agent to call now and then with the
/// images its pods use: the blob of each such image and every program held in memory are
/// kept; of the rest, the blob cache and the compile cache keep what `bounds` allow; image
/// index entries whose blob went are forgotten. Programs no one holds any more are dropped
/// from memory as they are let go. Blocking (directory walks): call it on a blocking thread.
pub fn collect_garbage(
    runtime: &Runtime,
    blobs: &artifact::BlobCache,
    index: &artifact::ImageIndex,
    images_in_use: &HashSet<String>,
    bounds: GcBounds,
) -> GcReport {
    let mut keep = runtime.loaded_digests();
    keep.extend(
        images_in_use
            .iter()
            .filter_map(|image| index.get(image))
            .map(|(_, layer)| layer),
    );
    let blobs_removed = blobs.collect(&keep, bounds);
    let images = index.retain(|_, _, layer| blobs.contains(layer));
    GcReport {
        blobs: blobs_removed,
        compiled: runtime.collect_compiled(&keep, bounds),
        images,
    }
}

/// Marks a cache entry used now (its age for garbage collection starts again).
pub(crate) fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Whether `name` is a temporary file a cache writer left (a crash mid-write).
pub(crate) fn is_temp(name: &str) -> bool {
    name.starts_with(skiff_registry::TEMP_PREFIX)
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How many freed linear-memory slots may stay warm (affine to the program that used them,
/// their resident pages kept for its next instance) before new instances reuse them instead of
/// taking cold slots.
const WARM_MEMORY_SLOTS: u32 = 16;
/// Freed slots (memories, and stacks once zeroed) wait in a queue until this many regions are
/// to be given back to the kernel, in one call; only then are they free (and warm) again.
const DECOMMIT_BATCH: usize = 32;
/// Bytes at the top of a freed async stack zeroed in place and kept resident; the rest of the
/// stack is given back to the kernel.
const STACK_KEEP_RESIDENT: usize = 64 << 10;

impl Runtime {
    /// An engine with the pooling allocator sized for `max_instances` concurrent instances,
    /// caching compiled code under `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>, max_instances: u32) -> Result<Runtime, WasmError> {
        let cache_dir = cache_dir.into();
        std::fs::create_dir_all(&cache_dir).map_err(|e| WasmError::Cache {
            path: cache_dir.clone(),
            source: e,
        })?;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances * 4)
            .total_memories(max_instances * 2)
            .total_tables(max_instances * 4)
            .max_memory_size(1 << 30)
            // A freed slot keeps up to this much of its memory resident and is reset by
            // zeroing, not by returning pages to the kernel: the next instance (a fresh one
            // per HTTP request) then takes no page faults on it.
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10)
            // Only the pages an instance dirtied are reset (one ioctl, Linux 6.7+), and what
            // must go back to the kernel goes in batches.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .decommit_batch_size(DECOMMIT_BATCH)
            // A memory slot is affine to the program that last used it, and while fewer than
            // this many freed slots are warm a new program takes a cold slot rather than one
            // of them: with wasmtime's default (100), every new program a node ran added its
            // slots to the warm set, each keeping up to `linear_memory_keep_resident` of its
            // pages resident. Past this bound, the least recently used warm slot is reused.
            // (Tables and stacks have no affinity: their warm slots are always reused first.)
            .max_unused_warm_slots(WARM_MEMORY_SLOTS)
            .async_stack_keep_resident(STACK_KEEP_RESIDENT);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(1 << 30)
            .memory_guard_size(64 << 10)
            // A freed async stack is zeroed: its top by memset (kept resident), the rest given
            // back to the kernel. Without it, a pooled stack kept every page a guest ever
            // touched for good (and what a guest left on it stayed there for the next one).
            .async_stack_zeroing(true);
        let engine = Engine::new(&config).map_err(|e| WasmError::Compile(format!("{e:#}")))?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("skiff-wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(WasmError::Io)?;
        let mut component_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component_linker)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        let mut core_linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut core_linker, |h: &mut host::Host| h.p1())
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        Ok(Runtime {
            engine,
            cache_dir,
            component_linker: Arc::new(component_linker),
            core_linker: Arc::new(core_linker),
            loaded: Arc::default(),
        })
    }

    fn engine_key(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    fn cache_path(&self, digest: &str) -> PathBuf {
        self.cache_dir.join(format!(
            "{}-{}.cwasm",
            digest.trim_start_matches("sha256:"),
            self.engine_key()
        ))
    }

    /// Compiles (or loads from the compile cache) and classifies a wasm binary. The work
    /// (hashing, compiling: seconds for a large component) runs on a blocking thread, never on
    /// the caller's async one. A binary already held in memory is shared; concurrent loads of
    /// one binary compile it once, the others wait for that compile.
    pub async fn load(&self, bytes: impl Into<Vec<u8>>) -> Result<Program, WasmError> {
        let bytes = bytes.into();
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.load_blocking(&bytes))
            .await
            .map_err(|e| WasmError::Compile(format!("the compile task ended: {e}")))?
    }

    fn load_blocking(&self, bytes: &[u8]) -> Result<Program, WasmError> {
        let is_component = skiff_registry::is_component(bytes).ok_or(WasmError::NotWasm)?;
        let digest = sha256_digest(bytes);
        let slot = {
            let mut loaded = lock(&self.loaded);
            Self::prune_loaded(&mut loaded);
            loaded.entry(digest.clone()).or_default().clone()
        };
        let mut held = lock(&slot);
        if let Some(inner) = held.upgrade() {
            return Ok(Program {
                kind: inner.kind(),
                digest,
                cached: true,
                inner,
            });
        }
        let p = self.compile_or_load(bytes, is_component, digest)?;
        *held = Arc::downgrade(&p.inner);
        Ok(p)
    }

    /// Drops the slots of programs no one holds (and no one is loading).
    fn prune_loaded(loaded: &mut HashMap<String, Slot>) {
        loaded.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot.try_lock().map_or(true, |held| held.strong_count() > 0)
        });
    }

    /// Digests of the programs held in memory now (by pods, handlers, or loads under way).
    pub fn loaded_digests(&self) -> HashSet<String> {
        let mut loaded = lock(&self.loaded);
        Self::prune_loaded(&mut loaded);
        loaded.keys().cloned().collect()
    }

    /// Removes from the compile cache what this engine cannot load (another wasmtime version
    /// or configuration), writes a crash cut short, and compiled programs neither held in
    /// memory nor in `keep` (digests) as `bounds` allow. Returns how many files were removed.
    /// Blocking (a directory walk).
    pub fn collect_compiled(&self, keep: &HashSet<String>, bounds: GcBounds) -> usize {
        let live = self.loaded_digests();
        let suffix = format!("-{}.cwasm", self.engine_key());
        let Ok(rd) = std::fs::read_dir(&self.cache_dir) else {
            return 0;
        };
        let mut files = Vec::new();
        let mut removed = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let digest = name
                .strip_suffix(&suffix)
                .map(|hex| format!("sha256:{hex}"));
            match digest {
                Some(d) => files.extend(CacheFile::of(
                    e.path(),
                    live.contains(&d) || keep.contains(&d),
                )),
                // Unfinished writes age out like unused entries; the rest is of no use here.
                None if is_temp(&name) => files.extend(CacheFile::of(e.path(), false)),
                None => removed += usize::from(std::fs::remove_file(e.path()).is_ok()),
            }
        }
        removed + prune(files, bounds)
    }

    fn compile_or_load(
        &self,
        bytes: &[u8],
        is_component: bool,
        digest: String,
    ) -> Result<Program, WasmError> {
        let path = self.cache_path(&digest);
        if is_component {
            let (component, cached) = match self.cached_component(&path) {
                Some(c) => (c, true),
                None => {
                    let c = Component::new(&self.engine, bytes)
                        .map_err(|e| WasmError::Compile(format!("{e:#}")))?;
                    self.store_cache(&path, c.serialize());
                    (c, false)
                }
            };
            self.link_component(component, digest, cached)
        } else {
            let (module, cached) = match self.cached_module(&path) {
                Some(m) => (m, true),
                None => {
                    let m = Module::new(&self.engine, bytes)
                        .map_err(|e| WasmError::Compile(format!("{e:#}")))?;
                    self.store_cache(&path, m.serialize());
                    (m, false)
                }
            };
            if module.get_export("_start").is_none() {
                return Err(WasmError::NothingToRun);
            }
            let pre = self
                .core_linker
                .instantiate_pre(&module)
                .map_err(|e| WasmError::Link(format!("{e:#}")))?;
            Ok(Program {
                kind: Kind::Command,
                digest,
                cached,
                inner: Arc::new(Inner::Core(pre)),
            })
        }
    }

    fn link_component(
        &self,
        component: Component,
        digest: String,
        cached: bool,
    ) -> Result<Program, WasmError> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let has = |prefix: &str| exports.iter().any(|e| e.starts_with(prefix));
        let pre = self
            .component_linker
            .instantiate_pre(&component)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        if has("wasi:http/incoming-handler@0.2") {
            let p = ProxyPre::new(pre).map_err(|e| WasmError::Link(format!("{e:#}")))?;
            Ok(Program {
                kind: Kind::Http,
                digest,
                cached,
                inner: Arc::new(Inner::Http(p)),
            })
        } else if has("wasi:cli/run@0.2") {
            let p = CommandPre::new(pre).map_err(|e| WasmError::Link(format!("{e:#}")))?;
            Ok(Program {
                kind: Kind::Command,
                digest,
                cached,
                inner: Arc::new(Inner::Command(p)),
            })
        } else {
            Err(WasmError::NothingToRun)
        }
    }

    fn cached_component(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `Component::serialize` of an engine with the same
        // compatibility hash (it is in the file name), into a cache directory only skiff writes.
        #[allow(unsafe_code)]
        let c = unsafe { Component::deserialize_file(&self.engine, path) };
        touch(path);
        c.map_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compile cache entry")).ok()
    }

    fn cached_module(&self, path: &Path) -> Option<Module> {
        if !path.exists() {
            return None;
        }
        // SAFETY: as for components above.
        #[allow(unsafe_code)]
        let m = unsafe { Module::deserialize_file(&self.engine, path) };
        touch(path);
        m.map_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compile cache entry")).ok()
    }

    /// Keeps compiled code for the next load. A file of its own until complete and on disk,
    /// then renamed into place: a reader never sees a part of one. The cache only saves time,
    /// so a failure to write it is logged, and the program runs from memory all the same.
    fn store_cache(&self, path: &Path, compiled: wasmtime::Result<Vec<u8>>) {
        let written = compiled
            .map_err(|e| format!("{e:#}"))
            .and_then(|b| skiff_registry::write_atomic(path, &b).map_err(|e| e.to_string()));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot write the compile cache");
        }
    }

    /// Runs a command program to completion; returns its exit code. A trap is exit code 1
    /// with the trap written to stderr, as wasmtime's CLI does.
    pub async fn run_command(
        &self,
        program: &Program,
        config: &GuestConfig,
    ) -> Result<i32, WasmError> {
        let mut store = self.command_store(config)?;
        let result = match &*program.inner {
            Inner::Command(pre) => {
                let cmd = pre.instantiate_async(&mut store).await;
                match cmd {
                    Ok(cmd) => cmd.wasi_cli_run().call_run(&mut store).await.map(|r| {
                        if r.is_ok() {
                            0
                        } else {
                            1
                        }
                    }),
                    Err(e) => Err(e),
                }
            }
            Inner::Core(pre) => match pre.instantiate_async(&mut store).await {
                Ok(instance) => match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                    Ok(start) => start.call_async(&mut store, ()).await.map(|_| 0),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Inner::Http(_) => {
                return Err(WasmError::Guest(
                    "an HTTP component is served, not run".into(),
                ))
            }
        };
        match result {
            Ok(code) => Ok(code),
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    return Ok(exit.0);
                }
                store.data_mut().write_stderr(&format!("error: {e:#}\n"));
                Ok(1)
            }
        }
    }

    /// The store of one run of a command: the guest's own host state, its memory limit, and no
    /// CPU deadline (it runs as long as it likes, yielding to other tasks at every tick).
    fn command_store(&self, config: &GuestConfig) -> Result<Store<host::Host>, WasmError> {
        let mut store = Store::new(
            &self.engine,
            host::Host::new(config, &host::Outputs::of(config)?, true)?,
        );
        store.limiter(|h| &mut h.limits);
        store.epoch_deadline_async_yield_and_update(1);
        Ok(store)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

#[cfg(test)]
mod tests;
