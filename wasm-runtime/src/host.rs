//! The per-instance host state: WASI context, wasi:http context, resource table and limits.
//! One `Host` per store: per request for HTTP components, per run for commands.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use crate::outgoing::{Pending, TlsRoots};
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
    /// Resolves host names of the guest's outgoing HTTP requests before the system resolver
    /// (cluster service names).
    pub resolver: Option<Resolver>,
    /// What the guest's outgoing HTTPS trusts beyond the public roots (the cluster CA); the
    /// server's certificate is then checked for the name the guest asked for.
    pub tls: Option<TlsRoots>,
}

/// Maps a host name to an address, or None to leave it to the system resolver.
#[derive(Clone)]
pub struct Resolver(pub Arc<ResolveFn>);

pub type ResolveFn = dyn Fn(&str) -> Option<IpAddr> + Send + Sync;

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// The wasi:http hooks of one instance: outgoing requests to names the resolver knows go to
/// the address it gives (the `Host` header keeps the name).
#[derive(Default)]
pub(crate) struct Hooks {
    resolver: Option<Resolver>,
    tls: Option<TlsRoots>,
}

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Pending,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, Pending), HttpError>> + Send>
    {
        drop(fut);
        let https = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
        // The name the certificate must be for, taken before the address replaces it.
        let tls = self.tls.as_ref().filter(|_| https).and_then(|t| {
            let host = request
                .uri()
                .host()?
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).ok()?;
            Some((name, t.0.clone()))
        });
        if let Some(r) = &self.resolver {
            let uri = request.uri().clone();
            if let Some(auth) = uri.authority() {
                if let Some(ip) = (r.0)(auth.host()) {
                    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
                    let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
                    let mut parts = uri.into_parts();
                    if let Ok(a) =
                        http::uri::Authority::try_from(SocketAddr::new(ip, port).to_string())
                    {
                        parts.authority = Some(a);
                        if let Ok(u) = http::Uri::from_parts(parts) {
                            *request.uri_mut() = u;
                        }
                    }
                }
            }
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            if let Some((name, config)) = tls {
                return crate::outgoing::send_tls(request, options, name, config).await;
            }
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((res.map(BodyExt::boxed_unsync), Box::new(io) as Pending))
        })
    }
}

pub(crate) struct Host {
    pub wasi: WasiCtx,
    pub p1: Option<WasiP1Ctx>,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub limits: StoreLimits,
    hooks: Hooks,
    stderr: Option<Arc<std::fs::File>>,
}

fn dup(f: &Option<Arc<std::fs::File>>) -> Result<Option<std::fs::File>, WasmError> {
    Ok(match f {
        Some(f) => Some(f.try_clone()?),
        None => None,
    })
}

/// A guest's stdout and stderr, opened once and shared by every instance (no descriptor is
/// duplicated per request).
#[derive(Clone, Default)]
pub(crate) struct Outputs {
    stdout: Option<OutputFile>,
    stderr: Option<OutputFile>,
}

impl Outputs {
    pub fn of(config: &GuestConfig) -> Result<Outputs, WasmError> {
        Ok(Outputs {
            stdout: dup(&config.stdout)?.map(OutputFile::new),
            stderr: dup(&config.stderr)?.map(OutputFile::new),
        })
    }
}

impl Host {
    pub fn new(config: &GuestConfig, outputs: &Outputs, core: bool) -> Result<Host, WasmError> {
        let mut b = WasiCtxBuilder::new();
        b.args(&config.args).envs(&config.env);
        if let Some(f) = &outputs.stdout {
            b.stdout(f.clone());
        }
        if let Some(f) = &outputs.stderr {
            b.stderr(f.clone());
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
            hooks: Hooks {
                resolver: config.resolver.clone(),
                tls: config.tls.clone(),
            },
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
            hooks: &mut self.hooks,
        }
    }
}
