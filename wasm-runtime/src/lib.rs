//! skiff-wasm: WebAssembly workloads for skiff, behind skiff's own API (wasmtime stays inside).
//!
//! - [`Runtime`]: one wasmtime engine (pooling allocator, epoch interruption), an on-disk
//!   compile cache keyed by content digest and engine, and classification of a binary by its
//!   exports: a component exporting `wasi:http/incoming-handler` is an HTTP service
//!   ([`Runtime::serve_http`], a fresh instance per request); a component exporting
//!   `wasi:cli/run`, or a core module with `_start`, is a command ([`Runtime::run_command`]).
//! - [`artifact`]: pulling and pushing wasm from OCI registries (CNCF wasm layout; Spin's and
//!   Krustlet's layer types accepted), blobs verified and kept content-addressed.

pub mod artifact;
mod host;
mod http;
mod workers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig, Store,
};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use host::{GuestConfig, Preopen, Resolver};
pub use http::{Handler, HttpServer};

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

/// A compiled, linked program ready to instantiate.
#[derive(Clone)]
pub struct Program {
    pub kind: Kind,
    /// Content digest (`sha256:…`) of the binary.
    pub digest: String,
    /// Whether it came from the compile cache.
    pub cached: bool,
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Http(ProxyPre<host::Host>),
    Command(CommandPre<host::Host>),
    Core(wasmtime::InstancePre<host::Host>),
}

/// The engine and its caches. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    cache_dir: PathBuf,
    component_linker: Arc<Linker<host::Host>>,
    core_linker: Arc<wasmtime::Linker<host::Host>>,
    /// Programs already linked in this process, by digest.
    loaded: Arc<std::sync::Mutex<std::collections::HashMap<String, Program>>>,
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `\0asm` with version 1 is a core module; layer 1 with version 0x0d a component.
fn classify_bytes(bytes: &[u8]) -> Option<bool> {
    match bytes.get(0..8)? {
        [0, b'a', b's', b'm', 1, 0, 0, 0] => Some(false),
        [0, b'a', b's', b'm', _, 0, 1, 0] => Some(true),
        _ => None,
    }
}

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
            .decommit_batch_size(32);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(1 << 30)
            .memory_guard_size(64 << 10);
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

    /// Compiles (or loads from the cache) and classifies a wasm binary.
    pub fn load(&self, bytes: &[u8]) -> Result<Program, WasmError> {
        let is_component = classify_bytes(bytes).ok_or(WasmError::NotWasm)?;
        let digest = sha256_digest(bytes);
        if let Some(p) = self.loaded.lock().expect("loaded").get(&digest) {
            return Ok(Program {
                cached: true,
                ..p.clone()
            });
        }
        let p = self.compile_or_load(bytes, is_component, digest)?;
        self.loaded
            .lock()
            .expect("loaded")
            .insert(p.digest.clone(), p.clone());
        Ok(p)
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
                    self.store_cache(
                        &path,
                        c.serialize()
                            .map_err(|e| WasmError::Compile(format!("{e:#}")))?,
                    )?;
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
                    self.store_cache(
                        &path,
                        m.serialize()
                            .map_err(|e| WasmError::Compile(format!("{e:#}")))?,
                    )?;
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
                inner: Inner::Core(pre),
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
                inner: Inner::Http(p),
            })
        } else if has("wasi:cli/run@0.2") {
            let p = CommandPre::new(pre).map_err(|e| WasmError::Link(format!("{e:#}")))?;
            Ok(Program {
                kind: Kind::Command,
                digest,
                cached,
                inner: Inner::Command(p),
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
        c.map_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compile cache entry")).ok()
    }

    fn cached_module(&self, path: &Path) -> Option<Module> {
        if !path.exists() {
            return None;
        }
        // SAFETY: as for components above.
        #[allow(unsafe_code)]
        let m = unsafe { Module::deserialize_file(&self.engine, path) };
        m.map_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compile cache entry")).ok()
    }

    fn store_cache(&self, path: &Path, bytes: Vec<u8>) -> Result<(), WasmError> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| WasmError::Cache {
                path: path.to_path_buf(),
                source: e,
            })
    }

    /// Runs a command program to completion; returns its exit code. A trap is exit code 1
    /// with the trap written to stderr, as wasmtime's CLI does.
    pub async fn run_command(
        &self,
        program: &Program,
        config: &GuestConfig,
    ) -> Result<i32, WasmError> {
        let mut store = Store::new(
            &self.engine,
            host::Host::new(config, &host::Outputs::of(config)?, true)?,
        );
        store.limiter(|h| &mut h.limits);
        // Commands run as long as they like, yielding to other tasks at every tick.
        store.epoch_deadline_async_yield_and_update(1);
        let result = match &program.inner {
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

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

#[cfg(test)]
mod tests;
