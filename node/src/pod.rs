//! One pod's worker: pull each container's image, run it (wasm HTTP components are served on
//! the pod's address at their container ports; commands run under the restart policy), and
//! report status as a kubelet does.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use skiff_api::{meta, quantity, Resource};
use skiff_client::Client;
use skiff_wasm::artifact::{self, BlobCache, ImageIndex, Resolved};
use skiff_wasm::{GuestConfig, HttpServer, Kind, Preopen, Program, Runtime};

use crate::probe::{Probe, Verdict};
use tokio::sync::{watch, Notify};

use crate::backoff::Backoff;
use crate::logs::{LogIndex, PodEntry, PodLogs};
use crate::network::PodNetwork;
use crate::oci::{self, OciNode};
use crate::sandbox::Sandbox;
use crate::services::LocalEndpoints;

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

#[derive(Debug, Clone)]
struct ContainerStatus {
    name: String,
    image: String,
    image_id: String,
    /// `wasm://NAME` or `runc://ID`.
    container_id: String,
    ready: bool,
    started: bool,
    restart_count: i64,
    state: Value,
    last_state: Value,
}

#[derive(Debug, Clone)]
struct PodStatus {
    phase: &'static str,
    pod_ip: Option<Ipv4Addr>,
    start_time: String,
    ready_since: Option<String>,
    not_ready_since: String,
    containers: Vec<ContainerStatus>,
    message: Option<String>,
    reason: Option<String>,
}

impl PodStatus {
    /// Ready: running, and every container ready.
    fn ready(&self) -> bool {
        self.phase == "Running"
            && !self.containers.is_empty()
            && self.containers.iter().all(|c| c.ready)
    }

    /// Applies `f`, noting when the pod became ready or stopped being so: a condition's
    /// transition time changes only when its status does.
    fn change(&mut self, f: impl FnOnce(&mut PodStatus)) {
        let was = self.ready();
        f(self);
        let is = self.ready();
        if is && (!was || self.ready_since.is_none()) {
            self.ready_since = Some(now());
        } else if was && !is {
            self.not_ready_since = now();
        }
    }
}

/// A running pod. Dropping it stops nothing: call [`PodWorker::stop`].
pub struct PodWorker {
    pub uid: String,
    /// Set to the grace period when the pod is to stop.
    stop: watch::Sender<Option<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWorker {
    pub fn start(ctx: Arc<NodeContext>, pod: Value) -> PodWorker {
        let (stop, rx) = watch::channel(None);
        let uid = meta::uid(&pod).to_string();
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
    pod: Value,
    status: Mutex<PodStatus>,
    changed: Notify,
    /// How long the containers have between TERM and KILL when the pod stops.
    grace: Mutex<Duration>,
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
            c.state = json!({"running": {"startedAt": started_at}});
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
        let ns = meta::namespace(&self.pod).unwrap_or("default").to_string();
        let ts = now();
        let ev = json!({
            "metadata": {"name": format!("{}.{:x}", meta::name(&self.pod), chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)), "namespace": ns},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": meta::name(&self.pod), "namespace": ns, "uid": meta::uid(&self.pod)},
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

fn status_json(s: &PodStatus, node_ip: Ipv4Addr) -> Value {
    let ready = s.ready();
    let since = if ready {
        s.ready_since
            .clone()
            .unwrap_or_else(|| s.not_ready_since.clone())
    } else {
        s.not_ready_since.clone()
    };
    let r = if ready { "True" } else { "False" };
    let mut conds = vec![
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": s.start_time, "lastProbeTime": null}),
        json!({"type": "Initialized", "status": "True", "lastTransitionTime": s.start_time, "lastProbeTime": null}),
        json!({"type": "ContainersReady", "status": r, "lastTransitionTime": since, "lastProbeTime": null}),
        json!({"type": "Ready", "status": r, "lastTransitionTime": since, "lastProbeTime": null}),
    ];
    if !ready {
        for c in conds.iter_mut().skip(2) {
            c["reason"] = json!(if s.phase == "Succeeded" {
                "PodCompleted"
            } else {
                "ContainersNotReady"
            });
        }
    }
    let mut status = json!({
        "phase": s.phase,
        "hostIP": node_ip.to_string(),
        "hostIPs": [{"ip": node_ip.to_string()}],
        "startTime": s.start_time,
        "qosClass": "BestEffort",
        "conditions": conds,
        "containerStatuses": s.containers.iter().map(|c| {
            let mut v = json!({"name": c.name, "image": c.image, "imageID": c.image_id, "ready": c.ready, "started": c.started,
                               "restartCount": c.restart_count, "state": c.state});
            if !c.container_id.is_empty() {
                v["containerID"] = json!(c.container_id);
            }
            if !c.last_state.is_null() {
                v["lastState"] = c.last_state.clone();
            }
            v
        }).collect::<Vec<_>>(),
    });
    if let Some(ip) = s.pod_ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if let Some(m) = &s.message {
        status["message"] = json!(m);
    }
    if let Some(r) = &s.reason {
        status["reason"] = json!(r);
    }
    status
}

/// Writes the status whenever it changes (coalescing bursts).
async fn status_writer(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let pods = Resource::lookup("pods").expect("pods");
    let ns = meta::namespace(&shared.pod)
        .unwrap_or("default")
        .to_string();
    let name = meta::name(&shared.pod).to_string();
    let mut last = Value::Null;
    loop {
        let st = status_json(&shared.status.lock().expect("status"), shared.ctx.node_ip);
        if st != last {
            match shared
                .ctx
                .client
                .patch_dyn(
                    pods,
                    Some(&ns),
                    &name,
                    Some("status"),
                    "application/merge-patch+json",
                    &json!({"status": st}),
                )
                .await
            {
                Ok(_) => last = st,
                Err(e) if e.code() == Some(404) => return,
                Err(e) => {
                    tracing::debug!(pod = %name, error = %e, "status update failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// The pod's host name: `spec.hostname` when set (an Indexed Job's `JOB-INDEX`), else its
/// name, as the kubelet gives it.
pub fn hostname(pod: &Value) -> &str {
    pod.pointer("/spec/hostname")
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| meta::name(pod))
}

/// Environment of a container: its `env` (values and field references) and HOSTNAME.
pub fn container_env(
    pod: &Value,
    container: &Value,
    pod_ip: Option<Ipv4Addr>,
    node_name: &str,
) -> Vec<(String, String)> {
    let mut env = vec![("HOSTNAME".to_string(), hostname(pod).to_string())];
    for e in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = e["name"].as_str().unwrap_or("").to_string();
        let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
            v.to_string()
        } else if let Some(path) = e
            .pointer("/valueFrom/fieldRef/fieldPath")
            .and_then(Value::as_str)
        {
            match path {
                "metadata.name" => meta::name(pod).to_string(),
                "metadata.namespace" => meta::namespace(pod).unwrap_or("default").to_string(),
                "metadata.uid" => meta::uid(pod).to_string(),
                "status.podIP" => pod_ip.map(|i| i.to_string()).unwrap_or_default(),
                "spec.nodeName" => node_name.to_string(),
                "status.hostIP" => String::new(),
                p => {
                    let ptr = format!("/{}", p.replace('.', "/"));
                    pod.pointer(&ptr)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                }
            }
        } else {
            String::new()
        };
        env.retain(|(k, _)| *k != name);
        env.push((name, value));
    }
    env
}

/// A container's image, pulled.
enum Pulled {
    Wasm(Vec<u8>),
    Oci(Box<skiff_oci::Image>),
}

async fn pull(shared: &Shared, i: usize, image: &str, policy: &str) -> Result<Pulled, String> {
    let ctx = &shared.ctx;
    let present = |what: String| {
        shared.post_event(
            "Normal",
            "Pulled",
            &format!("Container image \"{image}\" already present on machine{what}"),
        )
    };
    // Present already: no registry round trip (IfNotPresent, Never), as the kubelet does.
    if policy != "Always" {
        if let Some((manifest, layer)) = ctx.images.get(image) {
            if let Some(bytes) = ctx.blobs.get(&layer) {
                shared.container(i, |c| c.image_id = format!("{image}@{manifest}"));
                present(String::new());
                return Ok(Pulled::Wasm(bytes));
            }
        }
        if let Some(oci) = &ctx.oci {
            if let Some(img) = oci.store.get(image) {
                shared.container(i, |c| c.image_id = img.id());
                present(String::new());
                return Ok(Pulled::Oci(Box::new(img)));
            }
        }
        if policy == "Never" {
            return Err(format!(
                "image {image} is not present with pull policy of Never"
            ));
        }
    }
    shared.post_event("Normal", "Pulling", &format!("Pulling image \"{image}\""));
    let started = Instant::now();
    let resolved = tokio::time::timeout(
        PULL_TIMEOUT,
        artifact::resolve(image, &ctx.insecure_registries),
    )
    .await
    .map_err(|_| format!("resolving {image} took longer than {PULL_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    let (layer, manifest) = match resolved {
        Resolved::Wasm {
            layer_digest,
            manifest_digest,
            ..
        } => (layer_digest, manifest_digest),
        Resolved::Image { .. } => {
            return pull_oci(shared, i, image, started)
                .await
                .map(|img| Pulled::Oci(Box::new(img)))
        }
    };
    let bytes = tokio::time::timeout(
        PULL_TIMEOUT,
        artifact::pull_wasm(image, &layer, &ctx.blobs, &ctx.insecure_registries),
    )
    .await
    .map_err(|_| format!("pulling {image} took longer than {PULL_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    ctx.images.put(image, &manifest, &layer);
    shared.container(i, |c| c.image_id = format!("{image}@{manifest}"));
    shared.post_event(
        "Normal",
        "Pulled",
        &format!(
            "Successfully pulled image \"{image}\" in {:?} ({} bytes)",
            started.elapsed(),
            bytes.len()
        ),
    );
    Ok(Pulled::Wasm(bytes))
}

/// Pulls an OCI image into the node's layer store, with an Event per layer fetched.
async fn pull_oci(
    shared: &Shared,
    i: usize,
    image: &str,
    started: Instant,
) -> Result<skiff_oci::Image, String> {
    let oci = match (&shared.ctx.oci, &shared.ctx.no_oci) {
        (Some(oci), _) => oci,
        (None, why) => {
            return Err(format!(
                "{image} is an OCI container image and this node cannot run OCI containers ({})",
                why.as_deref().unwrap_or("no OCI runtime")
            ))
        }
    };
    let _pulling = oci.gc_lock.read().await;
    let (mut total, mut fetched) = (0, 0);
    let pulling = oci.store.pull(image, |p| match p {
        skiff_oci::Progress::Resolved { layers, .. } => total = layers,
        skiff_oci::Progress::Layer {
            index,
            digest,
            size,
            cached,
        } => {
            if !cached {
                fetched += 1;
                shared.post_event(
                    "Normal",
                    "Pulling",
                    &format!("Pulled layer {}/{total} {digest} ({size} bytes)", index + 1),
                );
            }
        }
    });
    let img = tokio::time::timeout(PULL_TIMEOUT, pulling)
        .await
        .map_err(|_| format!("pulling {image} took longer than {PULL_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    shared.container(i, |c| c.image_id = img.id());
    shared.post_event(
        "Normal",
        "Pulled",
        &format!(
            "Successfully pulled image \"{image}\" in {:?} ({total} layers, {fetched} fetched)",
            started.elapsed()
        ),
    );
    Ok(img)
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

/// Pulls one container's image, retrying with backoff until `stop` (None: stopped first).
async fn prepare(
    shared: &Shared,
    i: usize,
    container: &Value,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Option<Pulled> {
    let image = container["image"].as_str().unwrap_or("").to_string();
    let policy = container["imagePullPolicy"]
        .as_str()
        .unwrap_or("IfNotPresent")
        .to_string();
    let mut backoff = Backoff::default();
    loop {
        match pull(shared, i, &image, &policy).await {
            Ok(p) => return Some(p),
            Err(msg) => {
                shared
                    .event(
                        "Warning",
                        "Failed",
                        &format!("Failed to pull image \"{image}\": {msg}"),
                    )
                    .await;
                shared.container(i, |c| c.state = waiting("ErrImagePull", &msg));
                let delay = backoff.next(Duration::ZERO);
                shared
                    .event(
                        "Normal",
                        "BackOff",
                        &format!("Back-off pulling image \"{image}\""),
                    )
                    .await;
                shared.container(i, |c| {
                    c.state = waiting(
                        "ImagePullBackOff",
                        &format!("Back-off pulling image \"{image}\": {msg}"),
                    )
                });
                if stopped_within(stop, delay).await {
                    return None;
                }
            }
        }
    }
}

/// Waits `delay`, or less when the pod is stopped meanwhile: true when it was.
async fn stopped_within(stop: &mut watch::Receiver<Option<Duration>>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.wait_for(Option::is_some) => return true,
    }
    stop.borrow().is_some()
}

fn memory_limit(container: &Value) -> Option<usize> {
    container
        .pointer("/resources/limits/memory")
        .and_then(Value::as_str)
        .and_then(quantity::bytes)
        .map(|b| b as usize)
}

/// The container's volume mounts as WASI preopens: `emptyDir` (a directory of the pod's),
/// `hostPath`, `configMap` (its keys written as files, always read-only) and
/// `persistentVolumeClaim` (`DATA/storage/VOLUME` once the claim is bound).
async fn volumes(
    shared: &Shared,
    container: &Value,
    pod_dir: &std::path::Path,
) -> Result<Vec<Preopen>, String> {
    let vols = shared
        .pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(v) = vols.iter().find(|v| v["name"] == m["name"]) else {
            continue;
        };
        let vname = v["name"].as_str().unwrap_or("v");
        let mut read_only = m["readOnly"] == true;
        let host = if let Some(p) = v.pointer("/hostPath/path").and_then(Value::as_str) {
            std::path::PathBuf::from(p)
        } else if v.get("emptyDir").is_some() {
            let d = pod_dir.join("volumes").join(vname);
            std::fs::create_dir_all(&d).map_err(|e| format!("volume {vname}: {e}"))?;
            d
        } else if let Some(cm) = v.pointer("/configMap/name").and_then(Value::as_str) {
            let cms = Resource::lookup("configmaps").expect("configmaps");
            let ns = meta::namespace(&shared.pod).unwrap_or("default");
            let obj = shared
                .ctx
                .client
                .get_dyn(cms, Some(ns), cm)
                .await
                .map_err(|e| format!("configmap {cm}: {e}"))?;
            let d = pod_dir.join("volumes").join(vname);
            std::fs::create_dir_all(&d).map_err(|e| format!("volume {vname}: {e}"))?;
            for (k, val) in obj["data"].as_object().into_iter().flatten() {
                std::fs::write(d.join(k), val.as_str().unwrap_or(""))
                    .map_err(|e| format!("volume {vname}: {e}"))?;
            }
            read_only = true;
            d
        } else if let Some(claim) = v
            .pointer("/persistentVolumeClaim/claimName")
            .and_then(Value::as_str)
        {
            // The claim's volume lives in the node's data directory under the volume's
            // name; it is used once the claim is bound (to a volume on this node).
            let pvcs = Resource::lookup("persistentvolumeclaims").expect("pvcs");
            let ns = meta::namespace(&shared.pod).unwrap_or("default");
            let obj = shared
                .ctx
                .client
                .get_dyn(pvcs, Some(ns), claim)
                .await
                .map_err(|e| format!("persistentvolumeclaim {claim}: {e}"))?;
            let volume = obj
                .pointer("/spec/volumeName")
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty() && !v.contains('/') && !v.starts_with('.'))
                .ok_or_else(|| format!("persistentvolumeclaim {claim} is not bound yet"))?;
            let d = shared.ctx.data_dir.join("storage").join(volume);
            std::fs::create_dir_all(&d).map_err(|e| format!("volume {vname}: {e}"))?;
            if v.pointer("/persistentVolumeClaim/readOnly") == Some(&Value::Bool(true)) {
                read_only = true;
            }
            d
        } else {
            return Err(format!(
                "volume {vname}: only emptyDir, hostPath, configMap and persistentVolumeClaim volumes are supported"
            ));
        };
        out.push(Preopen {
            host,
            guest: m["mountPath"].as_str().unwrap_or("/").to_string(),
            read_only,
        });
    }
    Ok(out)
}

/// What a pod holds once it is placed on the node: its address, its network namespace (when
/// it has OCI containers), and the directory of its files and logs.
struct Placed {
    ip: Ipv4Addr,
    sandbox: Option<Sandbox>,
    pod_files: Vec<skiff_oci::BindMount>,
    pod_dir: std::path::PathBuf,
    logs: PodLogs,
}

/// The log index key of a pod.
fn log_key(pod: &Value) -> String {
    format!(
        "{}/{}",
        meta::namespace(pod).unwrap_or("default"),
        meta::name(pod)
    )
}

async fn run(ctx: Arc<NodeContext>, pod: Value, mut stop: watch::Receiver<Option<Duration>>) {
    let name = meta::name(&pod).to_string();
    let containers: Vec<Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let pod_dir = pod_dir(&ctx.data_dir, &pod);
    let start_time = pod
        .pointer("/status/startTime")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(now);
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        pod: pod.clone(),
        changed: Notify::new(),
        grace: Mutex::new(Duration::ZERO),
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
                    name: c["name"].as_str().unwrap_or("").into(),
                    image: c["image"].as_str().unwrap_or("").into(),
                    image_id: String::new(),
                    container_id: String::new(),
                    ready: false,
                    started: false,
                    restart_count: 0,
                    state: waiting("ContainerCreating", ""),
                    last_state: Value::Null,
                })
                .collect(),
        }),
    });
    // The containers stop on this, after the pod has left the services' rotation; the status
    // writer too, so the pod's last status (not ready) is published while it drains.
    let (stop_containers, containers_stop) = watch::channel(false);
    let writer = tokio::spawn(status_writer(shared.clone(), containers_stop.clone()));

    // Images first: whether any container is an OCI image decides where the pod lives.
    let mut pulled = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        match prepare(&shared, i, c, &mut stop).await {
            Some(p) => pulled.push(p),
            None => {
                writer.abort();
                return;
            }
        }
    }
    // A pod with an OCI container gets a network namespace on the bridge, and its wasm
    // containers listen inside it; a wasm-only pod's address goes on the node itself.
    let sandboxed = pulled.iter().any(|p| matches!(p, Pulled::Oci(_)));
    let Some(placed) = place(&shared, &pod_dir, sandboxed, &mut stop).await else {
        writer.abort();
        return;
    };
    let placed = Arc::new(placed);
    ctx.logs.lock().expect("logs").insert(
        log_key(&pod),
        PodEntry {
            uid: meta::uid(&pod).to_string(),
            logs: placed.logs.clone(),
            containers: containers
                .iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect(),
            oci: vec![],
        },
    );
    // Published only now: a client that has the address finds the pod there.
    shared.update(|s| s.pod_ip = Some(placed.ip));

    // Every container runs as a task: created (with backoff while it cannot be), then run —
    // commands and OCI containers under their restart policy, HTTP components under their
    // probes.
    let restart = pod
        .pointer("/spec/restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always")
        .to_string();
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
    // Commands finish on their own (Succeeded / Failed); servers run until the pod is stopped.
    // A finished pod gives back its address and network at once, and is never run again; its
    // logs stay while the pod object exists.
    let mut held = true;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            done = tasks.join_next(), if !tasks.is_empty() => {
                if done.is_some() && tasks.is_empty() {
                    let codes: Vec<i64> = shared.status.lock().expect("status").containers.iter()
                        .filter_map(|c| c.state.pointer("/terminated/exitCode").and_then(Value::as_i64)).collect();
                    shared.update(|s| s.phase = if codes.iter().all(|c| *c == 0) { "Succeeded" } else { "Failed" });
                    trimmer.abort();
                    release(&ctx, &pod, placed.ip, placed.sandbox.as_ref()).await;
                    held = false;
                }
            }
        }
    }
    let grace = stop.borrow().unwrap_or_default();
    if held {
        // Out of rotation first: not ready, then wait until no service routes here.
        let began = Instant::now();
        shared.update(|s| {
            for c in s.containers.iter_mut() {
                c.ready = false;
            }
        });
        if let Some(proxy) = &ctx.proxy {
            if !proxy
                .drain(std::net::IpAddr::V4(placed.ip), grace.min(DRAIN_MAX))
                .await
            {
                tracing::debug!(pod = %name, "pod still routed when its grace period ran out");
            }
        }
        // What is left of the grace period is the containers' to stop in.
        *shared.grace.lock().expect("grace") = grace.saturating_sub(began.elapsed()).min(TERM_MAX);
    }
    let _ = stop_containers.send(true);
    if !tasks.is_empty() {
        shared
            .event("Normal", "Killing", "Stopping the pod's containers")
            .await;
    }
    // Containers see `stop` and end within what is left of the grace period (TERM, then
    // KILL) and a little more; whatever does not is ended here. Either way the pod gives back
    // everything it holds.
    let left = *shared.grace.lock().expect("grace");
    if tokio::time::timeout(left + 2 * STOP_MAX, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(pod = %name, "containers did not stop in time; removing them");
        tasks.shutdown().await;
        force_remove(&ctx, &pod, &containers, placed.ip).await;
    }
    trimmer.abort();
    if held {
        release(&ctx, &pod, placed.ip, placed.sandbox.as_ref()).await;
    }
    writer.abort();
    forget_logs(&ctx, &pod);
}

/// A pod object as the API handed it over, in its k8s-openapi type (the API validated it, so
/// it decodes; one that does not reads as an empty pod).
pub fn typed(pod: &Value) -> Pod {
    serde_json::from_value(pod.clone()).unwrap_or_default()
}

/// Serves the logs a finished pod left, when the agent restarted since: its worker is not
/// started again, and its logs stay readable while the pod exists.
pub fn keep_logs(ctx: &NodeContext, pod: &Value) {
    let dir = pod_dir(&ctx.data_dir, pod).join("logs");
    if !dir.is_dir() {
        return;
    }
    let containers = typed(pod)
        .spec
        .map(|s| s.containers.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    ctx.logs
        .lock()
        .expect("logs")
        .entry(log_key(pod))
        .or_insert_with(|| PodEntry {
            uid: meta::uid(pod).to_string(),
            logs: PodLogs { dir },
            containers,
            oci: vec![],
        });
}

/// Stops serving the pod's logs (not those of a newer pod of the same name).
pub fn forget_logs(ctx: &NodeContext, pod: &Value) {
    let mut logs = ctx.logs.lock().expect("logs");
    if logs
        .get(&log_key(pod))
        .is_some_and(|e| e.uid == meta::uid(pod))
    {
        logs.remove(&log_key(pod));
    }
}

/// The directory of a pod's files on the node: logs, emptyDir volumes, ConfigMap copies,
/// /etc files. Named `NAMESPACE_NAME_UID`.
pub fn pod_dir(data_dir: &std::path::Path, pod: &Value) -> std::path::PathBuf {
    data_dir.join("pods").join(format!(
        "{}_{}_{}",
        meta::namespace(pod).unwrap_or("default"),
        meta::name(pod),
        meta::uid(pod)
    ))
}

/// The pod UID a pod directory belongs to (see [`pod_dir`]).
pub fn pod_dir_uid(dir_name: &str) -> &str {
    dir_name.rsplit('_').next().unwrap_or(dir_name)
}

/// Places the pod: its log directory, address and network. A failure gives back what was
/// made, is reported (`FailedCreatePodSandBox`) and is retried with backoff until `stop`
/// (None: stopped first).
async fn place(
    shared: &Shared,
    pod_dir: &std::path::Path,
    sandboxed: bool,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Option<Placed> {
    let want = typed(&shared.pod)
        .status
        .and_then(|s| s.pod_ip)
        .and_then(|s| s.parse().ok());
    let mut backoff = Backoff::default();
    loop {
        match try_place(&shared.ctx, &shared.pod, pod_dir, want, sandboxed).await {
            Ok(placed) => {
                shared.update(|s| s.message = None);
                return Some(placed);
            }
            Err(msg) => {
                let delay = backoff.next(Duration::ZERO);
                shared
                    .event("Warning", "FailedCreatePodSandBox", &msg)
                    .await;
                shared.update(|s| s.message = Some(msg));
                if stopped_within(stop, delay).await {
                    return None;
                }
            }
        }
    }
}

async fn try_place(
    ctx: &NodeContext,
    pod: &Value,
    pod_dir: &std::path::Path,
    want: Option<Ipv4Addr>,
    sandboxed: bool,
) -> Result<Placed, String> {
    let logs = PodLogs::new(pod_dir.join("logs"))
        .map_err(|e| format!("cannot create the pod's log directory: {e}"))?;
    let ip = ctx
        .net
        .allocate(want)
        .map_err(|e| format!("cannot give the pod an address: {e}"))?;
    match pod_network(ctx, pod, pod_dir, ip, sandboxed).await {
        Ok((sandbox, pod_files)) => Ok(Placed {
            ip,
            sandbox,
            pod_files,
            pod_dir: pod_dir.to_path_buf(),
            logs,
        }),
        Err((msg, sandbox)) => {
            release(ctx, pod, ip, sandbox.as_ref()).await;
            Err(msg)
        }
    }
}

/// Gives back the pod's network: its namespace unplugged and deleted, its address off the
/// node and free for another pod.
async fn release(ctx: &NodeContext, pod: &Value, ip: Ipv4Addr, sandbox: Option<&Sandbox>) {
    if let (Some(sb), Some(oci)) = (sandbox, &ctx.oci) {
        oci.cni.teardown(sb, meta::uid(pod)).await;
    }
    ctx.net.release(ip);
}

/// Removes what containers that did not stop in time left: their runc containers and root
/// filesystems, and the listeners the proxy serves in-process.
async fn force_remove(ctx: &NodeContext, pod: &Value, containers: &[Value], ip: Ipv4Addr) {
    for c in containers {
        if let Some(oci) = &ctx.oci {
            let id = oci::container_id(meta::uid(pod), c["name"].as_str().unwrap_or(""));
            if let Err(e) = oci.runc.delete(&id).await {
                tracing::warn!(container = %id, error = %e, "runc delete");
            }
            let _ = oci.containers.remove(&id);
        }
        for port in http_ports(c) {
            ctx.local.remove(SocketAddr::from((ip, port)));
        }
    }
}

/// The ports a wasi:http container is served on (8080 when it declares none).
fn http_ports(c: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = c
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_u64())
        .map(|p| p as u16)
        .collect();
    if ports.is_empty() {
        ports.push(8080);
    }
    ports
}

/// A container made and ready to run.
enum Made {
    Http(HttpContainer, Vec<HttpServer>),
    Command(WasmCommand),
    Oci(Box<OciContainer>),
}

/// Why a container could not be made: the waiting reason (`CreateContainerConfigError`,
/// `CreateContainerError`, `RunContainerError`) and the message.
type NotMade = (&'static str, String);

/// One container of the pod: made (volumes, program, log, listeners) — with backoff while it
/// cannot be, under any restart policy, as the kubelet retries — then run until `stop`.
async fn container_task(
    shared: Arc<Shared>,
    placed: Arc<Placed>,
    i: usize,
    c: Value,
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
        Made::Command(command) => restart_loop(shared, i, restart, stop, command).await,
        Made::Oci(container) => restart_loop(shared, i, restart, stop, *container).await,
    }
}

/// Reports a container that could not be made and waits out its backoff: false when the pod
/// was stopped meanwhile.
async fn not_made(
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

async fn make(
    shared: &Arc<Shared>,
    placed: &Placed,
    i: usize,
    c: &Value,
    pulled: &Pulled,
) -> Result<Made, NotMade> {
    let ctx = &shared.ctx;
    let pod = &shared.pod;
    let cname = c["name"].as_str().unwrap_or("").to_string();
    let env = container_env(pod, c, Some(placed.ip), &ctx.node_name);
    let mounts = volumes(shared, c, &placed.pod_dir)
        .await
        .map_err(|msg| ("CreateContainerConfigError", msg))?;
    let created_msg = format!("Created container {cname}");
    let created = || shared.post_event("Normal", "Created", &created_msg);
    let bytes = match pulled {
        Pulled::Wasm(bytes) => bytes,
        Pulled::Oci(image) => {
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
            let id = oci::container_id(meta::uid(pod), &cname);
            if let Some(e) = ctx.logs.lock().expect("logs").get_mut(&log_key(pod)) {
                if !e.oci.contains(&cname) {
                    e.oci.push(cname.clone());
                }
            }
            let spec = oci::container_spec(pod, c, env, sandbox, binds, format!("/skiff/{id}"));
            created();
            return Ok(Made::Oci(Box::new(OciContainer {
                shared: shared.clone(),
                index: i,
                name: cname,
                id,
                image: image.clone(),
                spec,
                oci,
                logs: placed.logs.clone(),
                ip: placed.ip,
                container: c.clone(),
            })));
        }
    };
    let image = c["image"].as_str().unwrap_or("");
    let program = ctx
        .runtime
        .load(bytes.as_slice())
        .await
        .map_err(|e| ("CreateContainerError", format!("cannot run {image}: {e}")))?;
    let mut args: Vec<String> = vec![cname.clone()];
    for key in ["command", "args"] {
        args.extend(
            c.get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(String::from)),
        );
    }
    let ns = meta::namespace(pod).unwrap_or("default");
    let config = GuestConfig {
        args,
        env,
        memory_limit: memory_limit(c),
        request_timeout: Some(ctx.request_timeout),
        preopens: mounts,
        stdout: None,
        stderr: None,
        resolver: resolver(ctx, ns, placed.sandbox.as_ref().map(|_| placed.ip)),
    };
    match program.kind {
        Kind::Http => {
            let config = logged(&placed.logs, &cname, false, config)
                .map_err(|msg| ("CreateContainerError", msg))?;
            let http = HttpContainer {
                shared: shared.clone(),
                index: i,
                name: cname,
                program,
                config,
                ports: http_ports(c),
                ip: placed.ip,
                netns: placed.sandbox.as_ref().map(|s| s.path.clone()),
                container: c.clone(),
            };
            created();
            let servers = http
                .serve()
                .await
                .map_err(|msg| ("RunContainerError", msg))?;
            Ok(Made::Http(http, servers))
        }
        Kind::Command => {
            created();
            Ok(Made::Command(WasmCommand {
                shared: shared.clone(),
                index: i,
                name: cname,
                program,
                config,
                logs: placed.logs.clone(),
                runtime: ctx.runtime.clone(),
            }))
        }
    }
}

/// Puts the pod's address where its containers listen: in a sandbox made with CNI (with the
/// /etc files its OCI containers mount), or on the node for a wasm-only pod. On failure, the
/// message and what was made so far.
async fn pod_network(
    ctx: &NodeContext,
    pod: &Value,
    pod_dir: &std::path::Path,
    ip: Ipv4Addr,
    sandboxed: bool,
) -> Result<(Option<Sandbox>, Vec<skiff_oci::BindMount>), (String, Option<Sandbox>)> {
    if !sandboxed {
        ctx.net
            .bind_host(ip)
            .map_err(|e| (format!("cannot give the pod an address: {e}"), None))?;
        return Ok((None, vec![]));
    }
    let oci = ctx
        .oci
        .as_ref()
        .expect("OCI images are only pulled with an OCI runtime");
    let sandbox = oci
        .cni
        .setup(meta::uid(pod), ip, oci::host_ports(pod))
        .await
        .map_err(|e| (format!("cannot create the pod's network: {e}"), None))?;
    let ns = meta::namespace(pod).unwrap_or("default");
    match oci::pod_files(pod_dir, hostname(pod), ns, ip, ctx.cluster_dns(ns)) {
        Ok(files) => Ok((Some(sandbox), files)),
        Err(e) => Err((
            format!("cannot write the pod's /etc files: {e}"),
            Some(sandbox),
        )),
    }
}

/// How a wasm guest's outgoing requests resolve names: cluster services by the proxy's
/// table, and, in a sandboxed pod, `localhost` to the pod's address (its OCI containers).
fn resolver(
    ctx: &NodeContext,
    ns: &str,
    sandboxed: Option<Ipv4Addr>,
) -> Option<skiff_wasm::Resolver> {
    let names = ctx.proxy.as_ref().map(|p| p.names());
    if names.is_none() && sandboxed.is_none() {
        return None;
    }
    let ns = ns.to_string();
    Some(skiff_wasm::Resolver(Arc::new(move |host: &str| {
        if let Some(ip) = sandboxed {
            if host == "localhost" || host == "127.0.0.1" {
                return Some(std::net::IpAddr::V4(ip));
            }
        }
        let names = names.as_ref()?.read().expect("names").clone();
        names.resolve(host, &ns).map(std::net::IpAddr::V4)
    })))
}

/// `config` with the guest's stdout and stderr going to a new run of the container's log
/// (`restarted`: a run after the first), or why the log cannot be opened.
fn logged(
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
struct HttpContainer {
    shared: Arc<Shared>,
    index: usize,
    name: String,
    program: Program,
    config: GuestConfig,
    ports: Vec<u16>,
    ip: Ipv4Addr,
    /// The pod's network namespace, when it has OCI containers too: the listeners are made
    /// there, on every address of the pod (its containers reach them on localhost).
    netns: Option<std::path::PathBuf>,
    container: Value,
}

impl HttpContainer {
    async fn listen(&self, port: u16) -> std::io::Result<tokio::net::TcpListener> {
        match &self.netns {
            None => tokio::net::TcpListener::bind(SocketAddr::from((self.ip, port))).await,
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

    async fn serve(&self) -> Result<Vec<HttpServer>, String> {
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
        let has_readiness = Probe::of(&self.container, "readinessProbe").is_some();
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
    async fn close(&self, servers: Vec<HttpServer>) {
        for server in &servers {
            self.shared.ctx.local.remove(server.addr);
        }
        // Together: each waits for its requests in progress, within the same few seconds.
        futures::future::join_all(servers.into_iter().map(HttpServer::shutdown)).await;
    }

    /// Runs the probes until `stop`: readiness flips `ready`; a failed liveness probe
    /// restarts the container (new listeners, restartCount + 1).
    async fn supervise(self, mut servers: Vec<HttpServer>, mut stop: watch::Receiver<bool>) {
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
                        c.last_state = json!({"terminated": {"exitCode": 137, "reason": "Error", "finishedAt": now()}});
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
struct Probes {
    shared: Arc<Shared>,
    index: usize,
    ip: Ipv4Addr,
    readiness: Option<Probe>,
    liveness: Option<Probe>,
    ready: Verdict,
    live: Verdict,
    next_ready: Option<Instant>,
    next_live: Option<Instant>,
}

impl Probes {
    /// None when the container has no probe.
    fn new(shared: Arc<Shared>, index: usize, ip: Ipv4Addr, container: &Value) -> Option<Probes> {
        let readiness = Probe::of(container, "readinessProbe");
        let liveness = Probe::of(container, "livenessProbe");
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
    fn restarted(&mut self) {
        let now_i = Instant::now();
        self.ready = Verdict::default();
        self.live = Verdict::default();
        self.next_ready = self.readiness.as_ref().map(|p| now_i + p.initial_delay);
        self.next_live = self.liveness.as_ref().map(|p| now_i + p.initial_delay);
    }

    /// Waits for the next probe due and runs it: a readiness verdict flips `ready`. Returns
    /// false when liveness failed: the container is to be restarted (then call
    /// [`Probes::restarted`]).
    async fn run_next(&mut self) -> bool {
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
async fn probe_once(shared: &Shared, probe: &Probe, ip: Ipv4Addr, what: &str) -> bool {
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
struct RunEnd {
    code: i64,
    reason: &'static str,
    started_at: String,
}

/// What one attempt to run a container came to.
enum Run {
    /// It ran and ended.
    Ended(RunEnd),
    /// `stop` ended it: the container is stopped and cleaned up.
    Stopped,
    /// It could not be created (waiting reason, message): retried with backoff, not a run.
    NotCreated(&'static str, String),
}

/// A container that runs to its end and is restarted under the pod's restart policy: a wasm
/// command or an OCI container.
trait Runnable: Send + 'static {
    /// Runs once (`runs`: how many runs came before).
    fn run_once(
        &mut self,
        runs: u32,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = Run> + Send;
}

/// Runs `container` under the restart policy (Always, OnFailure, Never) with crash-loop
/// backoff: 10 s doubling to 5 min, reset after 10 min of running.
async fn restart_loop(
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
        let terminated = json!({"terminated": {"exitCode": code, "reason": end.reason,
                                                "startedAt": end.started_at, "finishedAt": now(), "containerID": id}});
        let again = match restart.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !again {
            shared.container(i, |c| {
                c.ready = false;
                c.state = terminated;
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
            c.last_state = terminated;
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
struct WasmCommand {
    shared: Arc<Shared>,
    index: usize,
    name: String,
    program: Program,
    config: GuestConfig,
    logs: PodLogs,
    runtime: Runtime,
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
                &format!("Started container {name} ({what})"),
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
enum StartFailed {
    /// Before runc ran it (log, bundle): retried as a container not yet created.
    Create(String),
    /// runc could not start it: a run that ended (`StartError`), under the restart policy.
    Run(String),
}

/// An OCI container run by runc in the pod's sandbox.
struct OciContainer {
    shared: Arc<Shared>,
    index: usize,
    name: String,
    id: String,
    image: Box<skiff_oci::Image>,
    spec: skiff_oci::ContainerSpec,
    oci: Arc<OciNode>,
    logs: PodLogs,
    ip: Ipv4Addr,
    container: Value,
}

impl OciContainer {
    /// Starts the container (or, on the first run, takes over one an earlier agent run left
    /// running) and returns its init PID and start time.
    async fn start(&self, runs: u32) -> Result<(i32, String, bool), StartFailed> {
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
    async fn stop(
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

    async fn remove(&self) {
        if let Err(e) = self.oci.runc.delete(&self.id).await {
            tracing::warn!(container = %self.id, error = %e, "runc delete");
        }
        if let Err(e) = self.oci.containers.remove(&self.id) {
            tracing::warn!(container = %self.id, error = %e, "container cleanup");
        }
    }
}

impl Runnable for OciContainer {
    async fn run_once(&mut self, runs: u32, mut stop: watch::Receiver<bool>) -> Run {
        let name = self.name.clone();
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
                &format!("Started container {name} ({what})"),
            )
            .await;
        let readiness = Probe::of(&self.container, "readinessProbe");
        self.shared.started(
            self.index,
            format!("runc://{}", self.id),
            readiness.is_none(),
            &started_at,
        );
        let probes = tokio::spawn(probe_loop(
            self.shared.clone(),
            self.index,
            self.ip,
            self.container.clone(),
            self.oci.clone(),
            self.id.clone(),
        ));
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
        Run::Ended(match exit {
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
        })
    }
}

/// The probes of an OCI container: a failed liveness probe kills it (its restart policy then
/// applies).
async fn probe_loop(
    shared: Arc<Shared>,
    i: usize,
    ip: Ipv4Addr,
    container: Value,
    oci: Arc<OciNode>,
    id: String,
) {
    let Some(mut probes) = Probes::new(shared, i, ip, &container) else {
        return;
    };
    while probes.run_next().await {}
    let _ = oci.runc.kill(&id, "KILL").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_from_values_and_field_refs() {
        let pod = json!({"metadata": {"name": "web-1", "namespace": "shop", "uid": "u1"}});
        let c = json!({"env": [{"name": "A", "value": "1"}, {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                               {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                               {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]});
        let env = container_env(&pod, &c, Some(Ipv4Addr::new(10, 88, 0, 9)), "n1");
        let get = |k: &str| env.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOSTNAME"), Some("web-1"));
        let mut indexed = pod.clone();
        indexed["spec"] = json!({"hostname": "sq-3"});
        let env = container_env(&indexed, &c, None, "n1");
        assert!(env.contains(&("HOSTNAME".to_string(), "sq-3".to_string())));
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("POD"), Some("web-1"));
        assert_eq!(get("NS"), Some("shop"));
        assert_eq!(get("IP"), Some("10.88.0.9"));
    }

    fn status(containers: Vec<ContainerStatus>) -> PodStatus {
        PodStatus {
            phase: "Pending",
            pod_ip: None,
            start_time: "2026-01-01T00:00:00Z".into(),
            ready_since: None,
            not_ready_since: "2026-01-01T00:00:00Z".into(),
            containers,
            message: None,
            reason: None,
        }
    }

    fn container(ready: bool) -> ContainerStatus {
        ContainerStatus {
            name: "a".into(),
            image: "i".into(),
            image_id: String::new(),
            container_id: String::new(),
            ready,
            started: true,
            restart_count: 0,
            state: json!({}),
            last_state: Value::Null,
        }
    }

    #[test]
    fn the_ready_transition_time_is_when_the_pod_became_ready() {
        // A command: it is ready once it runs, which happens after the pod's containers are
        // set up (in its own task).
        let mut s = status(vec![container(false)]);
        s.change(|s| s.phase = "Running");
        s.change(|s| s.containers[0].ready = true);
        let since = s.ready_since.clone().expect("ready since");
        let st = status_json(&s, Ipv4Addr::LOCALHOST);
        assert_eq!(st["conditions"][3]["status"], "True");
        assert_eq!(st["conditions"][3]["lastTransitionTime"], json!(since));
        // Not ready again: the transition is recorded, and the status is stable.
        s.change(|s| s.containers[0].ready = false);
        let st = status_json(&s, Ipv4Addr::LOCALHOST);
        assert_eq!(st["conditions"][3]["status"], "False");
        assert_eq!(
            st["conditions"][3]["lastTransitionTime"],
            json!(s.not_ready_since)
        );
        assert_ne!(s.not_ready_since, "2026-01-01T00:00:00Z");
        assert_eq!(st, status_json(&s, Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn ready_only_when_every_container_is() {
        let c = |ready| ContainerStatus {
            name: "a".into(),
            image: "i".into(),
            image_id: String::new(),
            container_id: String::new(),
            ready,
            started: true,
            restart_count: 0,
            state: json!({}),
            last_state: Value::Null,
        };
        let mut s = PodStatus {
            phase: "Running",
            pod_ip: Some(Ipv4Addr::new(10, 88, 0, 2)),
            start_time: now(),
            ready_since: None,
            not_ready_since: now(),
            containers: vec![c(true), c(false)],
            message: None,
            reason: None,
        };
        let st = status_json(&s, Ipv4Addr::LOCALHOST);
        assert_eq!(st["conditions"][3]["status"], "False");
        assert_eq!(st["podIP"], "10.88.0.2");
        s.containers[1].ready = true;
        assert_eq!(
            status_json(&s, Ipv4Addr::LOCALHOST)["conditions"][3]["status"],
            "True"
        );
    }
}
