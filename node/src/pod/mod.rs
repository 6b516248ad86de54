//! One pod's worker: pull each container's image, run it (wasm HTTP components are served on
//! the pod's address at their container ports; commands run under the restart policy), and
//! report status as a kubelet does.
//!
//! [`setup`] prepares what the pod needs and places it on the node, [`supervise`] runs and
//! stops its containers, [`status`] records what happens and writes it to the API; this
//! module holds the worker itself and the pod's life from start to stop.

mod setup;
mod status;
mod supervise;
mod token;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{json, Value};
use skiff_api::{quantity, Resource};
use skiff_client::Client;
use skiff_registry::Resolved;
use skiff_wasm::artifact::{self, BlobCache, ImageIndex};
use skiff_wasm::{GuestConfig, HttpServer, Kind, Preopen, Program, Runtime};

use crate::probe::{Probe, Verdict};
use tokio::sync::{watch, Notify};

use crate::backoff::Backoff;
use crate::logs::{LogIndex, PodEntry, PodLogs};
use crate::network::PodNetwork;
use crate::oci::{self, OciNode};
use crate::sandbox::Sandbox;
use crate::services::LocalEndpoints;
use setup::*;
pub use setup::{container_env, forget_logs, hostname, keep_logs, pod_dir, pod_dir_uid};
use status::*;
use supervise::*;
pub use token::ApiFacts;

/// What every pod worker on a node shares.
pub struct NodeContext {
    pub client: Client,
    pub runtime: Runtime,
    pub blobs: BlobCache,
    pub images: ImageIndex,
    pub net: PodNetwork,
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    pub data_dir: std::path::PathBuf,
    pub insecure_registries: Vec<String>,
    pub logs: LogIndex,
    /// CPU deadline of one HTTP request to a wasm component.
    pub request_timeout: Duration,
    /// This node's service proxy, when it runs one.
    pub proxy: Option<Arc<skiff_proxy::Proxy>>,
    /// The wasm HTTP endpoints the proxy serves in-process.
    pub local: Arc<LocalEndpoints>,
    /// The OCI side: image store, runc, CNI. None on a node that runs wasm only…
    pub oci: Option<Arc<OciNode>>,
    /// …and then why.
    pub no_oci: Option<String>,
    /// What wasm guests' outgoing HTTPS trusts beyond the public roots (the cluster CA).
    pub guest_tls: Option<skiff_wasm::TlsRoots>,
    /// What pod starts read from the API that seldom changes, kept a few seconds.
    pub api_facts: ApiFacts,
}

impl NodeContext {
    /// The cluster DNS address, when this node's proxy serves it (`kube-system/kube-dns`).
    fn cluster_dns(&self, ns: &str) -> Option<Ipv4Addr> {
        let names = self.proxy.as_ref()?.names();
        let names = names.read().expect("names");
        names.resolve("kube-dns.kube-system.svc.cluster.local", ns)
    }
}

/// Longest a stopping pod waits to leave every service's rotation.
const DRAIN_MAX: Duration = Duration::from_secs(10);
/// How often a pod's container logs are checked against the size cap.
const LOG_TRIM_EVERY: Duration = Duration::from_secs(30);
/// Longest an image pull may take: a registry that stops answering fails the pull (it is then
/// retried with backoff) instead of holding the pod, and the image store's lock, for good.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a container is given between TERM and KILL.
const TERM_MAX: Duration = Duration::from_secs(30);
/// Longest its containers take to stop after that.
const STOP_MAX: Duration = Duration::from_secs(5);

pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A running pod. Dropping it stops nothing: call [`PodWorker::stop`].
pub struct PodWorker {
    pub uid: String,
    /// Set to the grace period when the pod is to stop.
    stop: watch::Sender<Option<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWorker {
    pub fn start(ctx: Arc<NodeContext>, pod: Pod) -> PodWorker {
        let (stop, rx) = watch::channel(None);
        let uid = uid_of(&pod).to_string();
        let task = tokio::spawn(run(ctx, pod, rx));
        PodWorker { uid, stop, task }
    }

    /// Stops the pod and waits for the worker to finish. Within `grace` the pod first leaves
    /// the services' rotation (the proxy routes nothing more to it and its last requests
    /// finish), then its containers stop.
    ///
    /// The worker bounds its own waits (drain, TERM, KILL) and, however its containers
    /// end, gives back what the pod held (address, network, listeners, containers): it is
    /// waited for, never cut short.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
        if let Err(e) = self.task.await {
            tracing::warn!(pod = %self.uid, error = %e, "pod worker ended abnormally");
        }
    }
}

struct Shared {
    ctx: Arc<NodeContext>,
    pod: Pod,
    status: Mutex<PodStatus>,
    changed: Notify,
    /// How long the containers have between TERM and KILL when the pod stops.
    grace: Mutex<Duration>,
    /// The pod's projected ServiceAccount token directory (None: not mounted), once made.
    token_dir: tokio::sync::OnceCell<Option<std::path::PathBuf>>,
    /// The API Service's variables every container gets, once read.
    api_env: tokio::sync::OnceCell<Arc<token::Env>>,
    /// The tasks that project the token and keep it fresh; ended with the worker.
    token_tasks: Mutex<TokenTasks>,
}

/// A pod's token tasks: its first projection, begun as the pod starts, and its refresh.
#[derive(Default)]
struct TokenTasks {
    prefetch: Option<tokio::task::JoinHandle<()>>,
    refresh: Option<tokio::task::JoinHandle<()>>,
    /// The worker has ended: a refresh begun after that is ended at once.
    ended: bool,
}

impl Shared {
    /// Keeps `refresh` as the task refreshing the pod's token (ending the one before), or
    /// ends it when the worker has ended.
    fn keep_token_refresh(&self, refresh: tokio::task::JoinHandle<()>) {
        let mut tasks = self.token_tasks.lock().expect("token tasks");
        if tasks.ended {
            refresh.abort();
        } else if let Some(old) = tasks.refresh.replace(refresh) {
            old.abort();
        }
    }

    fn stop_token_refresh(&self) {
        let mut tasks = self.token_tasks.lock().expect("token tasks");
        tasks.ended = true;
        for t in [tasks.prefetch.take(), tasks.refresh.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut PodStatus)) {
        self.status.lock().expect("status").change(f);
        self.changed.notify_one();
    }

    /// Records that container `i` runs: the pod is Running from its first container on.
    fn started(&self, i: usize, id: String, ready: bool, started_at: &str) {
        self.update(|s| {
            let c = &mut s.containers[i];
            c.started = true;
            c.ready = ready;
            c.container_id = id;
            c.state = running(started_at);
            if s.phase == "Pending" {
                s.phase = "Running";
            }
        });
    }

    fn container(&self, i: usize, f: impl FnOnce(&mut ContainerStatus)) {
        self.update(|s| f(&mut s.containers[i]));
    }

    /// Records an Event. Events are best effort and never hold up the pod: the write
    /// happens in the background.
    async fn event(&self, ty: &str, reason: &str, message: &str) {
        self.post_event(ty, reason, message)
    }

    fn post_event(&self, ty: &str, reason: &str, message: &str) {
        let events = Resource::lookup("events").expect("events");
        let (ns, name, uid) = (
            ns_of(&self.pod).to_string(),
            name_of(&self.pod),
            uid_of(&self.pod),
        );
        let ts = now();
        let ev = json!({
            "metadata": {"name": format!("{name}.{:x}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)), "namespace": ns},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": name, "namespace": ns, "uid": uid},
            "reason": reason, "message": message, "type": ty,
            "source": {"component": "skiff-agent", "host": self.ctx.node_name},
            "reportingComponent": "skiff-agent", "reportingInstance": self.ctx.node_name,
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        });
        let client = self.ctx.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.create_dyn(events, Some(&ns), &ev).await {
                tracing::debug!(error = %e, "event not recorded");
            }
        });
    }
}

/// The log index key of a pod.
fn log_key(pod: &Pod) -> String {
    format!("{}/{}", ns_of(pod), name_of(pod))
}

/// A pod's namespace ("default" when it has none).
pub(crate) fn ns_of(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// A pod's name ("" when it has none).
pub(crate) fn name_of(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

/// A pod's uid ("" when it has none).
pub(crate) fn uid_of(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

/// The pod's life: set up and start its containers, run until stopped (or finished), stop.
async fn run(ctx: Arc<NodeContext>, pod: Pod, mut stop: watch::Receiver<Option<Duration>>) {
    let containers: Vec<Container> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let shared = new_shared(&ctx, &pod, &containers);
    // The containers stop on this, after the pod has left the services' rotation; the status
    // writer too, so the pod's last status (not ready) is published while it drains.
    let (stop_containers, containers_stop) = watch::channel(false);
    let writer = tokio::spawn(status_writer(shared.clone(), containers_stop.clone()));
    let began = Instant::now();
    tracing::debug!(pod = %name_of(&pod), "pod worker starting");
    let Some(mut running) = start(&shared, &containers, containers_stop, &mut stop).await else {
        writer.abort();
        shared.stop_token_refresh();
        return;
    };
    tracing::debug!(pod = %name_of(&pod), took = ?began.elapsed(), "pod started");
    let held = run_until_stopped(&shared, &mut running, &mut stop).await;
    let grace = stop.borrow().unwrap_or_default();
    if held {
        leave_rotation(&shared, running.placed.ip, grace).await;
    }
    let _ = stop_containers.send(true);
    stop_containers_of(&shared, &mut running, &containers).await;
    if held {
        let placed = &running.placed;
        release(&ctx, &pod, placed.ip, placed.sandbox.as_ref()).await;
    }
    writer.abort();
    shared.stop_token_refresh();
    forget_logs(&ctx, &pod);
}

/// What a started pod holds: its place on the node, its container tasks, its log trimmer.
struct Running {
    placed: Arc<Placed>,
    tasks: tokio::task::JoinSet<()>,
    trimmer: tokio::task::JoinHandle<()>,
}

/// The worker's shared state for a pod that has not started: Pending, every container
/// creating.
fn new_shared(ctx: &Arc<NodeContext>, pod: &Pod, containers: &[Container]) -> Arc<Shared> {
    let start_time = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_else(now);
    Arc::new(Shared {
        ctx: ctx.clone(),
        pod: pod.clone(),
        changed: Notify::new(),
        grace: Mutex::new(Duration::ZERO),
        token_dir: tokio::sync::OnceCell::new(),
        api_env: tokio::sync::OnceCell::new(),
        token_tasks: Mutex::default(),
        status: Mutex::new(PodStatus {
            phase: "Pending",
            pod_ip: None,
            start_time: start_time.clone(),
            ready_since: None,
            not_ready_since: start_time,
            message: None,
            reason: None,
            containers: containers
                .iter()
                .map(|c| ContainerStatus {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    image_id: String::new(),
                    container_id: String::new(),
                    ready: false,
                    started: false,
                    restart_count: 0,
                    state: waiting("ContainerCreating", ""),
                    last_state: None,
                })
                .collect(),
        }),
    })
}

/// Pulls the images, places the pod and starts a task per container. None when the pod was
/// stopped first.
async fn start(
    shared: &Arc<Shared>,
    containers: &[Container],
    containers_stop: watch::Receiver<bool>,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Option<Running> {
    let (ctx, pod) = (&shared.ctx, &shared.pod);
    let pod_dir = pod_dir(&ctx.data_dir, pod);
    // The ServiceAccount token is asked for while the images are made ready and the pod
    // placed, not after; the containers' setup waits for it, and reports a failure.
    if containers.iter().any(token::wants_token) {
        let (worker, dir) = (shared.clone(), pod_dir.clone());
        let prefetch = tokio::spawn(async move {
            let _ = token::pod_dir_once(&worker, &dir).await;
        });
        shared.token_tasks.lock().expect("token tasks").prefetch = Some(prefetch);
    }
    // Images first: whether any container is an OCI image decides where the pod lives.
    let mut pulled = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        pulled.push(prepare(shared, i, c, stop).await?);
    }
    // A pod with an OCI container gets a network namespace on the bridge, and its wasm
    // containers listen inside it; a wasm-only pod's address goes on the node itself.
    let sandboxed = pulled.iter().any(|p| matches!(p, Pulled::Oci(_)));
    let placed = Arc::new(place(shared, &pod_dir, sandboxed, stop).await?);
    ctx.logs.lock().expect("logs").insert(
        log_key(pod),
        PodEntry {
            uid: uid_of(pod).to_string(),
            logs: placed.logs.clone(),
            containers: containers.iter().map(|c| c.name.clone()).collect(),
            oci: vec![],
            ip: Some(placed.ip),
            netns: placed.sandbox.as_ref().map(|s| s.path.clone()),
        },
    );
    // Published only now: a client that has the address finds the pod there.
    shared.update(|s| s.pod_ip = Some(placed.ip));

    // Every container runs as a task: created (with backoff while it cannot be), then run —
    // commands and OCI containers under their restart policy, HTTP components under their
    // probes.
    let restart = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (c, p)) in containers.iter().zip(pulled).enumerate() {
        tasks.spawn(container_task(
            shared.clone(),
            placed.clone(),
            i,
            c.clone(),
            p,
            restart.clone(),
            containers_stop.clone(),
        ));
    }
    // Guests and OCI containers write their log files themselves: kept under the cap here.
    let trimmer = tokio::spawn({
        let logs = placed.logs.clone();
        async move {
            loop {
                tokio::time::sleep(LOG_TRIM_EVERY).await;
                logs.trim_all();
            }
        }
    });
    Some(Running {
        placed,
        tasks,
        trimmer,
    })
}

/// Runs until the pod is stopped. Commands finish on their own (Succeeded / Failed); servers
/// run until the pod is stopped. A finished pod gives back its address and network at once,
/// and is never run again; its logs stay while the pod object exists. True while the pod
/// still holds its place.
async fn run_until_stopped(
    shared: &Shared,
    running: &mut Running,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> bool {
    let mut held = true;
    loop {
        tokio::select! {
            _ = stop.changed() => return held,
            done = running.tasks.join_next(), if !running.tasks.is_empty() => {
                if done.is_some() && running.tasks.is_empty() {
                    let codes: Vec<i64> = shared.status.lock().expect("status").containers.iter()
                        .filter_map(|c| c.state.terminated.as_ref().map(|t| i64::from(t.exit_code))).collect();
                    shared.update(|s| s.phase = if codes.iter().all(|c| *c == 0) { "Succeeded" } else { "Failed" });
                    tracing::debug!(pod = %name_of(&shared.pod), "pod finished");
                    running.trimmer.abort();
                    let placed = &running.placed;
                    release(&shared.ctx, &shared.pod, placed.ip, placed.sandbox.as_ref()).await;
                    held = false;
                }
            }
        }
    }
}

/// Takes the pod out of rotation: not ready, then waits until no service routes to `ip`.
/// What is left of `grace` is the containers' to stop in.
async fn leave_rotation(shared: &Shared, ip: Ipv4Addr, grace: Duration) {
    let began = Instant::now();
    shared.update(|s| {
        for c in s.containers.iter_mut() {
            c.ready = false;
        }
    });
    if let Some(proxy) = &shared.ctx.proxy {
        if !proxy
            .drain(std::net::IpAddr::V4(ip), grace.min(DRAIN_MAX))
            .await
        {
            let pod = name_of(&shared.pod);
            tracing::debug!(%pod, "pod still routed when its grace period ran out");
        }
    }
    *shared.grace.lock().expect("grace") = grace.saturating_sub(began.elapsed()).min(TERM_MAX);
}

/// Waits for the containers, told to stop, to end. They end within what is left of the grace
/// period (TERM, then KILL) and a little more; whatever does not is ended here.
async fn stop_containers_of(shared: &Shared, running: &mut Running, containers: &[Container]) {
    let tasks = &mut running.tasks;
    if !tasks.is_empty() {
        shared
            .event("Normal", "Killing", "Stopping the pod's containers")
            .await;
    }
    let left = *shared.grace.lock().expect("grace");
    if tokio::time::timeout(left + 2 * STOP_MAX, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        let pod = name_of(&shared.pod);
        tracing::warn!(%pod, "containers did not stop in time; removing them");
        tasks.shutdown().await;
        force_remove(&shared.ctx, &shared.pod, containers, running.placed.ip).await;
    }
    running.trimmer.abort();
}

/// A pod object as the API handed it over, in its k8s-openapi type (the API validated it, so
/// it decodes; one that does not reads as an empty pod).
/// A pod whose containers run to completion (`restartPolicy` `Never` or `OnFailure`, a Job's
/// pods) rather than serve until stopped (`Always`, the default).
pub(super) fn runs_to_completion(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .is_some_and(|p| p != "Always")
}

pub fn typed(pod: &Value) -> Pod {
    serde_json::from_value(pod.clone()).unwrap_or_default()
}
