//! Running a pod's containers: each created (with backoff while it cannot be), then run —
//! commands and OCI containers under the restart policy, HTTP components under their probes —
//! and stopped.

use super::*;

/// Waits `delay`, or less when the pod is stopped meanwhile: true when it was.
pub(super) async fn stopped_within(
    stop: &mut watch::Receiver<Option<Duration>>,
    delay: Duration,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.wait_for(Option::is_some) => return true,
    }
    stop.borrow().is_some()
}

/// The ports a wasi:http container is served on (8080 when it declares none).
pub(super) fn http_ports(c: &Container) -> Vec<u16> {
    let mut ports: Vec<u16> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    if ports.is_empty() {
        ports.push(8080);
    }
    ports
}

/// A container made and ready to run.
pub(super) enum Made {
    Http(Box<HttpContainer>, Vec<HttpServer>),
    Command(Box<WasmCommand>),
    Oci(Box<OciContainer>),
}

/// Why a container could not be made: the waiting reason (`CreateContainerConfigError`,
/// `CreateContainerError`, `RunContainerError`) and the message.
pub(super) type NotMade = (&'static str, String);

/// One container of the pod: made (volumes, program, log, listeners) — with backoff while it
/// cannot be, under any restart policy, as the kubelet retries — then run until `stop`.
pub(super) async fn container_task(
    shared: Arc<Shared>,
    placed: Arc<Placed>,
    i: usize,
    c: Container,
    pulled: Pulled,
    restart: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    let made = loop {
        match make(&shared, &placed, i, &c, &pulled).await {
            Ok(made) => break made,
            Err((reason, msg)) => {
                if !not_made(&shared, i, &mut backoff, reason, &msg, &mut stop).await {
                    return;
                }
            }
        }
    };
    match made {
        Made::Http(http, servers) => http.supervise(servers, stop).await,
        Made::Command(command) => restart_loop(shared, i, restart, stop, *command).await,
        Made::Oci(container) => restart_loop(shared, i, restart, stop, *container).await,
    }
}

/// Reports a container that could not be made and waits out its backoff: false when the pod
/// was stopped meanwhile.
pub(super) async fn not_made(
    shared: &Shared,
    i: usize,
    backoff: &mut Backoff,
    reason: &'static str,
    msg: &str,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let delay = backoff.next(Duration::ZERO);
    shared
        .event("Warning", "Failed", &format!("Error: {msg}"))
        .await;
    shared.container(i, |c| {
        c.ready = false;
        c.state = waiting(reason, msg);
    });
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.wait_for(|s| *s) => return false,
    }
    !*stop.borrow()
}

/// Makes container `i` from its pulled image: its environment and volumes, then an OCI
/// container or a wasm program (an HTTP component is serving when it is made).
pub(super) async fn make(
    shared: &Arc<Shared>,
    placed: &Placed,
    i: usize,
    c: &Container,
    pulled: &Pulled,
) -> Result<Made, NotMade> {
    let env = container_env(&shared.pod, c, Some(placed.ip), &shared.ctx.node_name);
    let env = super::token::with_api_env(shared, env).await;
    let mounts = volumes(shared, c, &placed.pod_dir)
        .await
        .map_err(|msg| ("CreateContainerConfigError", msg))?;
    let made = match pulled {
        Pulled::Oci(image) => make_oci(shared, placed, i, c, image, env, mounts),
        Pulled::Wasm(bytes) => make_wasm(shared, placed, i, c, bytes, env, mounts).await?,
    };
    shared.post_event(
        "Normal",
        "Created",
        &format!("Created container {}", c.name),
    );
    match made {
        Made::Http(http, _) => {
            let servers = http
                .serve()
                .await
                .map_err(|msg| ("RunContainerError", msg))?;
            Ok(Made::Http(http, servers))
        }
        other => Ok(other),
    }
}

/// An OCI container: its runtime spec, with the pod's volumes and files bound in.
fn make_oci(
    shared: &Arc<Shared>,
    placed: &Placed,
    i: usize,
    c: &Container,
    image: &skiff_oci::Image,
    env: Vec<(String, String)>,
    mounts: Vec<Preopen>,
) -> Made {
    let (ctx, pod) = (&shared.ctx, &shared.pod);
    let cname = c.name.clone();
    let sandbox = placed
        .sandbox
        .as_ref()
        .expect("a pod with OCI containers has a sandbox");
    let oci = ctx
        .oci
        .clone()
        .expect("OCI images are only pulled with an OCI runtime");
    let mut binds: Vec<skiff_oci::BindMount> = mounts
        .into_iter()
        .map(|m| skiff_oci::BindMount {
            source: m.host,
            destination: m.guest,
            read_only: m.read_only,
        })
        .collect();
    binds.extend(placed.pod_files.iter().cloned());
    let id = oci::container_id(uid_of(pod), &cname);
    if let Some(e) = ctx.logs.lock().expect("logs").get_mut(&log_key(pod)) {
        if !e.oci.contains(&cname) {
            e.oci.push(cname.clone());
        }
    }
    let spec = oci::container_spec(pod, c, env, sandbox, binds, format!("/skiff/{id}"));
    Made::Oci(Box::new(OciContainer {
        shared: shared.clone(),
        index: i,
        name: cname,
        id,
        image: Box::new(image.clone()),
        spec,
        oci,
        logs: placed.logs.clone(),
        ip: placed.ip,
        container: c.clone(),
    }))
}

/// A wasm program, compiled: an HTTP component (not serving yet) or a command.
async fn make_wasm(
    shared: &Arc<Shared>,
    placed: &Placed,
    i: usize,
    c: &Container,
    bytes: &[u8],
    env: Vec<(String, String)>,
    mounts: Vec<Preopen>,
) -> Result<Made, NotMade> {
    let ctx = &shared.ctx;
    let cname = c.name.clone();
    let image = c.image.as_deref().unwrap_or("");
    let program = ctx
        .runtime
        .load(bytes)
        .await
        .map_err(|e| ("CreateContainerError", format!("cannot run {image}: {e}")))?;
    let mut args: Vec<String> = vec![cname.clone()];
    args.extend(c.command.iter().flatten().cloned());
    args.extend(c.args.iter().flatten().cloned());
    let config = GuestConfig {
        args,
        env,
        memory_limit: memory_limit(c),
        request_timeout: Some(ctx.request_timeout),
        preopens: mounts,
        stdout: None,
        stderr: None,
        resolver: resolver(
            ctx,
            ns_of(&shared.pod),
            placed.sandbox.as_ref().map(|_| placed.ip),
        ),
        tls: ctx.guest_tls.clone(),
    };
    Ok(match program.kind {
        Kind::Http => {
            let config = logged(&placed.logs, &cname, false, config)
                .map_err(|msg| ("CreateContainerError", msg))?;
            Made::Http(
                Box::new(HttpContainer {
                    shared: shared.clone(),
                    index: i,
                    name: cname,
                    program,
                    config,
                    ports: http_ports(c),
                    ip: placed.ip,
                    netns: placed.sandbox.as_ref().map(|s| s.path.clone()),
                    container: c.clone(),
                }),
                Vec::new(),
            )
        }
        Kind::Command => Made::Command(Box::new(WasmCommand {
            shared: shared.clone(),
            index: i,
            name: cname,
            program,
            config,
            logs: placed.logs.clone(),
            runtime: ctx.runtime.clone(),
        })),
    })
}

/// `config` with the guest's stdout and stderr going to a new run of the container's log
/// (`restarted`: a run after the first), or why the log cannot be opened.
pub(super) fn logged(
    logs: &PodLogs,
    container: &str,
    restarted: bool,
    config: GuestConfig,
) -> Result<GuestConfig, String> {
    let f = logs
        .open_run(container, restarted)
        .map_err(|e| format!("cannot open the container log: {e}"))?;
    let file = Arc::new(f);
    Ok(GuestConfig {
        stdout: Some(file.clone()),
        stderr: Some(file),
        ..config
    })
}

/// A wasi:http container: its listeners on the pod address, and its probes.
pub(super) struct HttpContainer {
    pub(super) shared: Arc<Shared>,
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) program: Program,
    pub(super) config: GuestConfig,
    pub(super) ports: Vec<u16>,
    pub(super) ip: Ipv4Addr,
    /// The pod's network namespace, when it has OCI containers too: the listeners are made
    /// there, on every address of the pod (its containers reach them on localhost).
    pub(super) netns: Option<std::path::PathBuf>,
    pub(super) container: Container,
}

impl HttpContainer {
    /// A listener on the pod's address: on the node (the address put there first), or in the
    /// pod's network namespace.
    pub(super) async fn listen(&self, port: u16) -> std::io::Result<tokio::net::TcpListener> {
        match &self.netns {
            None => {
                self.shared
                    .ctx
                    .net
                    .bind_host(self.ip)
                    .map_err(std::io::Error::other)?;
                tokio::net::TcpListener::bind(SocketAddr::from((self.ip, port))).await
            }
            Some(ns) => {
                let ns = ns.clone();
                let l = tokio::task::spawn_blocking(move || {
                    crate::sandbox::bind_in(&ns, SocketAddr::from(([0, 0, 0, 0], port)))
                })
                .await
                .map_err(std::io::Error::other)??;
                tokio::net::TcpListener::from_std(l)
            }
        }
    }

    pub(super) async fn serve(&self) -> Result<Vec<HttpServer>, String> {
        let mut servers = Vec::new();
        for port in &self.ports {
            let addr = SocketAddr::from((self.ip, *port));
            let l = self
                .listen(*port)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let server = self
                .shared
                .ctx
                .runtime
                .serve_http(&self.program, self.config.clone(), l)
                .map_err(|e| e.to_string())?;
            self.shared.ctx.local.insert(addr, server.handler());
            servers.push(server);
        }
        let how = if self.program.cached {
            "compile cache"
        } else {
            "compiled"
        };
        self.shared
            .event(
                "Normal",
                "Started",
                &format!("Started container {} (wasi:http, {how})", self.name),
            )
            .await;
        let has_readiness =
            Probe::of(&self.container, self.container.readiness_probe.as_ref()).is_some();
        self.shared.started(
            self.index,
            format!("wasm://{}", self.name),
            !has_readiness,
            &now(),
        );
        Ok(servers)
    }

    /// Takes the listeners out of the proxy's in-process table, then closes them (requests in
    /// progress finish).
    pub(super) async fn close(&self, servers: Vec<HttpServer>) {
        for server in &servers {
            self.shared.ctx.local.remove(server.addr);
        }
        // Together: each waits for its requests in progress, within the same few seconds.
        futures::future::join_all(servers.into_iter().map(HttpServer::shutdown)).await;
    }

    /// Runs the probes until `stop`: readiness flips `ready`; a failed liveness probe
    /// restarts the container (new listeners, restartCount + 1).
    pub(super) async fn supervise(
        self,
        mut servers: Vec<HttpServer>,
        mut stop: watch::Receiver<bool>,
    ) {
        let Some(mut probes) =
            Probes::new(self.shared.clone(), self.index, self.ip, &self.container)
        else {
            let _ = stop.changed().await;
            self.close(servers).await;
            return;
        };
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    self.close(servers).await;
                    return;
                }
                live = probes.run_next() => {
                    if live {
                        continue;
                    }
                    self.close(std::mem::take(&mut servers)).await;
                    self.shared.container(self.index, |c| {
                        c.ready = false;
                        c.restart_count += 1;
                        c.last_state = Some(terminated(137, "Error", None, None));
                    });
                    // Listening again may fail for a while: retried with backoff.
                    let mut backoff = Backoff::default();
                    servers = loop {
                        match self.serve().await {
                            Ok(s) => break s,
                            Err(msg) => {
                                if !not_made(&self.shared, self.index, &mut backoff, "RunContainerError", &msg, &mut stop).await {
                                    return;
                                }
                            }
                        }
                    };
                    probes.restarted();
                }
            }
        }
    }
}

/// A container's readiness and liveness probes (`httpGet`, `tcpSocket`), run against the
/// pod's address on their schedule.
pub(super) struct Probes {
    pub(super) shared: Arc<Shared>,
    pub(super) index: usize,
    pub(super) ip: Ipv4Addr,
    pub(super) readiness: Option<Probe>,
    pub(super) liveness: Option<Probe>,
    pub(super) ready: Verdict,
    pub(super) live: Verdict,
    pub(super) next_ready: Option<Instant>,
    pub(super) next_live: Option<Instant>,
}

impl Probes {
    /// None when the container has no probe.
    pub(super) fn new(
        shared: Arc<Shared>,
        index: usize,
        ip: Ipv4Addr,
        container: &Container,
    ) -> Option<Probes> {
        let readiness = Probe::of(container, container.readiness_probe.as_ref());
        let liveness = Probe::of(container, container.liveness_probe.as_ref());
        if readiness.is_none() && liveness.is_none() {
            return None;
        }
        let mut p = Probes {
            shared,
            index,
            ip,
            readiness,
            liveness,
            ready: Verdict::default(),
            live: Verdict::default(),
            next_ready: None,
            next_live: None,
        };
        p.restarted();
        Some(p)
    }

    /// Starts over, as for a container just (re)started.
    pub(super) fn restarted(&mut self) {
        let now_i = Instant::now();
        self.ready = Verdict::default();
        self.live = Verdict::default();
        self.next_ready = self.readiness.as_ref().map(|p| now_i + p.initial_delay);
        self.next_live = self.liveness.as_ref().map(|p| now_i + p.initial_delay);
    }

    /// Waits for the next probe due and runs it: a readiness verdict flips `ready`. Returns
    /// false when liveness failed: the container is to be restarted (then call
    /// [`Probes::restarted`]).
    pub(super) async fn run_next(&mut self) -> bool {
        let Some(next) = [self.next_ready, self.next_live]
            .into_iter()
            .flatten()
            .min()
        else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(next.into()).await;
        let now_i = Instant::now();
        if let (Some(p), Some(at)) = (&self.readiness, self.next_ready) {
            if at <= now_i {
                let ok = probe_once(&self.shared, p, self.ip, "Readiness").await;
                if let Some(ready) = self.ready.record(p, ok) {
                    let i = self.index;
                    self.shared.update(|s| s.containers[i].ready = ready);
                }
                self.next_ready = Some(now_i + p.period);
            }
        }
        if let (Some(p), Some(at)) = (&self.liveness, self.next_live) {
            if at <= now_i {
                let ok = probe_once(&self.shared, p, self.ip, "Liveness").await;
                self.next_live = Some(now_i + p.period);
                if self.live.record(p, ok) == Some(false) {
                    let name = self.shared.status.lock().expect("status").containers[self.index]
                        .name
                        .clone();
                    self.shared.post_event(
                        "Normal",
                        "Killing",
                        &format!("Container {name} failed liveness probe, will be restarted"),
                    );
                    return false;
                }
            }
        }
        true
    }
}

/// Runs `probe` once; a failure is an `Unhealthy` event naming the probe (`what`).
pub(super) async fn probe_once(shared: &Shared, probe: &Probe, ip: Ipv4Addr, what: &str) -> bool {
    match probe.check(ip).await {
        Ok(()) => true,
        Err(why) => {
            shared.post_event(
                "Warning",
                "Unhealthy",
                &format!("{what} probe failed: {why}"),
            );
            false
        }
    }
}

/// How one run of a container ended.
pub(super) struct RunEnd {
    pub(super) code: i64,
    pub(super) reason: &'static str,
    pub(super) started_at: String,
}

/// What one attempt to run a container came to.
pub(super) enum Run {
    /// It ran and ended.
    Ended(RunEnd),
    /// `stop` ended it: the container is stopped and cleaned up.
    Stopped,
    /// It could not be created (waiting reason, message): retried with backoff, not a run.
    NotCreated(&'static str, String),
}

/// A container that runs to its end and is restarted under the pod's restart policy: a wasm
/// command or an OCI container.
pub(super) trait Runnable: Send + 'static {
    /// Runs once (`runs`: how many runs came before).
    fn run_once(
        &mut self,
        runs: u32,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = Run> + Send;
}

/// Runs `container` under the restart policy (Always, OnFailure, Never) with crash-loop
/// backoff: 10 s doubling to 5 min, reset after 10 min of running.
pub(super) async fn restart_loop(
    shared: Arc<Shared>,
    i: usize,
    restart: String,
    mut stop: watch::Receiver<bool>,
    mut container: impl Runnable,
) {
    let name = shared.status.lock().expect("status").containers[i]
        .name
        .clone();
    let mut backoff = Backoff::default();
    let mut runs = 0;
    loop {
        let began = Instant::now();
        let end = match container.run_once(runs, stop.clone()).await {
            Run::Ended(end) => end,
            Run::Stopped => return,
            Run::NotCreated(reason, msg) => {
                if !not_made(&shared, i, &mut backoff, reason, &msg, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        runs += 1;
        let code = end.code;
        let id = shared.status.lock().expect("status").containers[i]
            .container_id
            .clone();
        let ended = terminated(code, end.reason, Some(&end.started_at), Some(id));
        let again = match restart.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !again {
            shared.container(i, |c| {
                c.ready = false;
                c.state = ended;
            });
            return;
        }
        let delay = backoff.next(began.elapsed());
        shared
            .event(
                "Warning",
                "BackOff",
                &format!("Back-off restarting container {name} (exit code {code})"),
            )
            .await;
        shared.container(i, |c| {
            c.ready = false;
            c.last_state = Some(ended);
            c.restart_count += 1;
            c.state = waiting(
                "CrashLoopBackOff",
                &format!("back-off {}s restarting container {name}", delay.as_secs()),
            );
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A WASI command: runs like a process, its exit code the container's.
pub(super) struct WasmCommand {
    pub(super) shared: Arc<Shared>,
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) program: Program,
    pub(super) config: GuestConfig,
    pub(super) logs: PodLogs,
    pub(super) runtime: Runtime,
}

impl Runnable for WasmCommand {
    async fn run_once(&mut self, runs: u32, mut stop: watch::Receiver<bool>) -> Run {
        let name = &self.name;
        let cfg = match logged(&self.logs, name, runs > 0, self.config.clone()) {
            Ok(cfg) => cfg,
            Err(msg) => return Run::NotCreated("CreateContainerError", msg),
        };
        let started_at = now();
        let what = if runs > 0 {
            format!("restart {runs}")
        } else {
            "wasi command".to_string()
        };
        self.shared
            .event(
                "Normal",
                "Started",
                &format!("Started container {} ({what})", self.name),
            )
            .await;
        self.shared
            .started(self.index, format!("wasm://{name}"), true, &started_at);
        let code = tokio::select! {
            r = self.runtime.run_command(&self.program, &cfg) => r.unwrap_or(1),
            _ = stop.changed() => return Run::Stopped,
        };
        Run::Ended(RunEnd {
            code: code.into(),
            reason: if code == 0 { "Completed" } else { "Error" },
            started_at,
        })
    }
}

/// Why an OCI container did not start.
pub(super) enum StartFailed {
    /// Before runc ran it (log, bundle): retried as a container not yet created.
    Create(String),
    /// runc could not start it: a run that ended (`StartError`), under the restart policy.
    Run(String),
}

/// An OCI container run by runc in the pod's sandbox.
pub(super) struct OciContainer {
    pub(super) shared: Arc<Shared>,
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) id: String,
    pub(super) image: Box<skiff_oci::Image>,
    pub(super) spec: skiff_oci::ContainerSpec,
    pub(super) oci: Arc<OciNode>,
    pub(super) logs: PodLogs,
    pub(super) ip: Ipv4Addr,
    pub(super) container: Container,
}

impl OciContainer {
    /// Starts the container (or, on the first run, takes over one an earlier agent run left
    /// running) and returns its init PID and start time.
    pub(super) async fn start(&self, runs: u32) -> Result<(i32, String, bool), StartFailed> {
        let oci = &self.oci;
        if runs == 0 {
            if let Some(st) = oci.runc.state(&self.id).await {
                if st.status == "running" && st.pid > 0 {
                    return Ok((st.pid, now(), true));
                }
            }
        }
        let _ = oci.runc.delete(&self.id).await;
        let log = self
            .logs
            .open_run(&self.name, runs > 0)
            .map_err(|e| StartFailed::Create(format!("cannot open the container log: {e}")))?;
        let bundle = oci
            .containers
            .prepare(&self.id, &oci.store, &self.image, &self.spec)
            .map_err(|e| StartFailed::Create(e.to_string()))?;
        let pid = oci.runc.run(&self.id, &bundle, log).await.map_err(|e| {
            // runc says why on the container's stderr: the last line of its log.
            let log = std::fs::read_to_string(self.logs.current(&self.name)).unwrap_or_default();
            match log.lines().last() {
                Some(last) if !last.is_empty() => format!("{e}: {last}"),
                _ => e.to_string(),
            }
        });
        match pid {
            Ok(pid) => Ok((pid, now(), false)),
            Err(e) => {
                let _ = oci.runc.delete(&self.id).await;
                let _ = oci.containers.remove(&self.id);
                Err(StartFailed::Run(e))
            }
        }
    }

    /// TERM, the rest of the grace period, then KILL; then the container is deleted.
    pub(super) async fn stop(
        &self,
        exited: &mut (impl std::future::Future<Output = skiff_oci::Exit> + Unpin),
    ) {
        let grace = *self.shared.grace.lock().expect("grace");
        let oci = &self.oci;
        let _ = oci.runc.kill(&self.id, "TERM").await;
        if tokio::time::timeout(grace, &mut *exited).await.is_err() {
            let _ = oci.runc.kill(&self.id, "KILL").await;
            let _ = tokio::time::timeout(STOP_MAX, &mut *exited).await;
        }
        self.remove().await;
    }

    pub(super) async fn remove(&self) {
        if let Err(e) = self.oci.runc.delete(&self.id).await {
            tracing::warn!(container = %self.id, error = %e, "runc delete");
        }
        if let Err(e) = self.oci.containers.remove(&self.id) {
            tracing::warn!(container = %self.id, error = %e, "container cleanup");
        }
    }
}

impl OciContainer {
    /// Records that the container runs (the Started event, its status) and starts its probes.
    async fn running(
        &self,
        runs: u32,
        adopted: bool,
        started_at: &str,
    ) -> tokio::task::JoinHandle<()> {
        let what = if adopted {
            "left running by an earlier agent run".to_string()
        } else if runs > 0 {
            format!("runc, restart {runs}")
        } else {
            "runc".to_string()
        };
        self.shared
            .event(
                "Normal",
                "Started",
                &format!("Started container {} ({what})", self.name),
            )
            .await;
        let readiness = Probe::of(&self.container, self.container.readiness_probe.as_ref());
        self.shared.started(
            self.index,
            format!("runc://{}", self.id),
            readiness.is_none(),
            started_at,
        );
        tokio::spawn(probe_loop(
            self.shared.clone(),
            self.index,
            self.ip,
            self.container.clone(),
            self.oci.clone(),
            self.id.clone(),
        ))
    }

    /// How the container's exit reads in its status.
    fn end(&self, exit: skiff_oci::Exit, started_at: String) -> RunEnd {
        match exit {
            skiff_oci::Exit::Code(code) => RunEnd {
                code: code.into(),
                reason: match code {
                    0 => "Completed",
                    137 if self.spec.memory_limit.is_some() => "OOMKilled",
                    _ => "Error",
                },
                started_at,
            },
            skiff_oci::Exit::Unknown => RunEnd {
                code: 137,
                reason: "ContainerStatusUnknown",
                started_at,
            },
        }
    }
}

impl Runnable for OciContainer {
    async fn run_once(&mut self, runs: u32, mut stop: watch::Receiver<bool>) -> Run {
        let (pid, started_at, adopted) = match self.start(runs).await {
            Ok(started) => started,
            Err(StartFailed::Create(msg)) => return Run::NotCreated("CreateContainerError", msg),
            Err(StartFailed::Run(msg)) => {
                self.shared
                    .event("Warning", "Failed", &format!("Error: {msg}"))
                    .await;
                self.shared
                    .container(self.index, |c| c.state = waiting("RunContainerError", &msg));
                return Run::Ended(RunEnd {
                    code: 128,
                    reason: "StartError",
                    started_at: now(),
                });
            }
        };
        let probes = self.running(runs, adopted, &started_at).await;
        let mut exited = Box::pin(skiff_oci::runc::wait_child(pid));
        let exit = tokio::select! {
            exit = &mut exited => exit,
            _ = stop.changed() => {
                probes.abort();
                self.stop(&mut exited).await;
                return Run::Stopped;
            }
        };
        probes.abort();
        self.remove().await;
        Run::Ended(self.end(exit, started_at))
    }
}

/// The probes of an OCI container: a failed liveness probe kills it (its restart policy then
/// applies).
pub(super) async fn probe_loop(
    shared: Arc<Shared>,
    i: usize,
    ip: Ipv4Addr,
    container: Container,
    oci: Arc<OciNode>,
    id: String,
) {
    let Some(mut probes) = Probes::new(shared, i, ip, &container) else {
        return;
    };
    while probes.run_next().await {}
    let _ = oci.runc.kill(&id, "KILL").await;
}
