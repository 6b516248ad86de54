//! The per-instance host state: WASI context, wasi:http context, resource table and limits.
//! One `Host` per store: per request for HTTP components, per run for commands.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::WasmError;

/// A host directory the guest sees (a volume).
#[derive(Debug, Clone)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// What a guest gets: nothing from the host but what is declared here.
#[derive(Debug, Clone, Default)]
pub struct GuestConfig {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Cap on the guest's linear memory, in bytes.
    pub memory_limit: Option<usize>,
    /// CPU-time bound of one HTTP request; the request is answered 500 when it passes.
    pub request_timeout: Option<Duration>,
    pub preopens: Vec<Preopen>,
    /// Where the guest's stdout and stderr go (the container's log files).
    pub stdout: Option<Arc<std::fs::File>>,
    pub stderr: Option<Arc<std::fs::File>>,
}

pub(crate) struct Host {
    pub wasi: WasiCtx,
    pub p1: Option<WasiP1Ctx>,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub limits: StoreLimits,
    stderr: Option<Arc<std::fs::File>>,
}

fn dup(f: &Option<Arc<std::fs::File>>) -> Result<Option<std::fs::File>, WasmError> {
    Ok(match f {
        Some(f) => Some(f.try_clone()?),
        None => None,
    })
}

impl Host {
    pub fn new(config: &GuestConfig, core: bool) -> Result<Host, WasmError> {
        let mut b = WasiCtxBuilder::new();
        b.args(&config.args).envs(&config.env);
        if let Some(f) = dup(&config.stdout)? {
            b.stdout(OutputFile::new(f));
        }
        if let Some(f) = dup(&config.stderr)? {
            b.stderr(OutputFile::new(f));
        }
        for p in &config.preopens {
            let perms = if p.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            b.preopened_dir(&p.host, &p.guest, perms)
                .map_err(|e| WasmError::Guest(format!("volume {}: {e:#}", p.host.display())))?;
        }
        let mut limits = StoreLimitsBuilder::new();
        if let Some(m) = config.memory_limit {
            limits = limits.memory_size(m);
        }
        let (wasi, p1) = if core {
            (WasiCtx::builder().build(), Some(b.build_p1()))
        } else {
            (b.build(), None)
        };
        Ok(Host {
            wasi,
            p1,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits: limits.trap_on_grow_failure(true).build(),
            stderr: config.stderr.clone(),
        })
    }

    pub fn write_stderr(&mut self, msg: &str) {
        if let Some(f) = &self.stderr {
            let _ = (&**f).write_all(msg.as_bytes());
        }
    }

    pub fn p1(&mut self) -> &mut WasiP1Ctx {
        self.p1
            .as_mut()
            .expect("core modules get a preview1 context")
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}
