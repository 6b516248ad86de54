//! The agent loop: register the Node, heartbeat, and keep one worker per pod bound here.
//!
//! The pods bound to this node are also kept on disk (`DATA/pods.json`): an agent that starts
//! while the control plane is unreachable runs them from there, and catches up on reconnect.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use skiff_api::{meta, Resource, OCI_CONDITION, OCI_NODE_LABEL, WASM_NODE_LABEL};
use skiff_client::{Client, ClientError};
use skiff_wasm::artifact::{BlobCache, ImageIndex};
use skiff_wasm::Runtime;
use tokio::sync::watch;

use crate::logs::LogIndex;
use crate::network::{IpCommand, NetError, Netlink, PodNetwork, ServiceAddresses};
use crate::oci::OciNode;
use crate::sandbox::Cni;

use crate::pod::{now, NodeContext, PodWorker};
use crate::services::LocalEndpoints;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// The node's InternalIP.
    pub node_ip: Ipv4Addr,
    /// Where the agent serves logs to the API server (port 0: any).
    pub listen: SocketAddr,
    pub insecure_registries: Vec<String>,
    /// The bridge holding the pod network's gateway and the wasm pods' addresses.
    pub bridge: String,
    pub heartbeat: Duration,
    pub request_timeout: Duration,
    /// Run the service proxy (and cluster DNS) in this agent.
    pub proxy: bool,
    /// Where node ports are opened; `0.0.0.0` is every address of the node.
    pub nodeport_addresses: Vec<IpAddr>,
    /// The interface that holds service addresses (a dummy one, or `lo` without the driver).
    pub service_interface: String,
    /// Run OCI containers (needs root, runc and the CNI plugins); off: a wasm-only node.
    pub oci: bool,
    /// The runc binary (default: `runc` on PATH).
    pub runc: Option<PathBuf>,
    /// Where the CNI plugins are.
    pub cni_bin_dir: PathBuf,
}

impl AgentConfig {
    pub fn new(name: &str, data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            name: name.to_string(),
            data_dir: data_dir.into(),
            node_ip: Ipv4Addr::LOCALHOST,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 10250)),
            insecure_registries: Vec::new(),
            bridge: "skiff0".into(),
            heartbeat: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            proxy: true,
            nodeport_addresses: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            service_interface: "skiff-svc0".into(),
            oci: true,
            runc: None,
            cni_bin_dir: crate::sandbox::DEFAULT_CNI_BIN.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("registering node {0}: {1}")]
    Register(String, ClientError),
    #[error("the control plane gave node {0} no pod CIDR")]
    NoPodCidr(String),
    #[error("pod network: {0}")]
    Network(#[from] NetError),
    #[error("wasm runtime: {0}")]
    Wasm(#[from] skiff_wasm::WasmError),
    #[error("agent endpoint {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Agent {
    pub name: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Every served wasm pod holds a listener per port and a descriptor per client connection;
/// a node with hundreds of pods needs more than the usual soft limit of 1,024. Raises the soft
/// limit on open files to the hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

fn machine_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024 * 1024)
}

/// What the node says about its OCI runtime: the runc version, or why it has none.
pub type OciState = Result<String, String>;

fn node_object(c: &AgentConfig, port: u16, oci: &OciState) -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = format!("{}Ki", machine_memory_kib());
    let arch = if std::env::consts::ARCH == "x86_64" {
        "amd64"
    } else if std::env::consts::ARCH == "aarch64" {
        "arm64"
    } else {
        std::env::consts::ARCH
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let resources =
        json!({"cpu": cpus.to_string(), "memory": mem, "pods": "1000", "ephemeral-storage": "0"});
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": c.name, "labels": {
            "kubernetes.io/hostname": c.name, "kubernetes.io/os": std::env::consts::OS, "kubernetes.io/arch": arch,
            "beta.kubernetes.io/os": std::env::consts::OS, "beta.kubernetes.io/arch": arch,
            WASM_NODE_LABEL: "true", OCI_NODE_LABEL: oci.is_ok().to_string(), "node-role.kubernetes.io/edge": "true",
        }},
        "spec": {},
        "status": {
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": c.node_ip.to_string()}, {"type": "Hostname", "address": c.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "conditions": conditions(oci),
            "nodeInfo": {"kubeletVersion": concat!("v1.37.0+skiff-", env!("CARGO_PKG_VERSION")), "kubeProxyVersion": "", "osImage": "skiff",
                         "kernelVersion": kernel, "containerRuntimeVersion": match oci {
                             Ok(v) => format!("wasmtime://48.0.8, runc://{v}"),
                             Err(_) => "wasmtime://48.0.8".to_string(),
                         }, "operatingSystem": std::env::consts::OS,
                         "architecture": arch, "machineID": "", "systemUUID": "", "bootID": ""},
        }
    })
}

fn conditions(oci: &OciState) -> Value {
    let t = now();
    let (oci_status, oci_reason, oci_message) = match oci {
        Ok(v) => ("True", "RuncFound", format!("runc {v} runs OCI containers")),
        Err(why) => (
            "False",
            "NoOCIRuntime",
            format!("OCI containers cannot run here: {why}"),
        ),
    };
    json!([
        {"type": OCI_CONDITION, "status": oci_status, "reason": oci_reason, "message": oci_message, "lastHeartbeatTime": t, "lastTransitionTime": t},
        {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "skiff agent is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t},
        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": t, "lastTransitionTime": t},
        {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": t, "lastTransitionTime": t},
        {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": t, "lastTransitionTime": t},
    ])
}

/// Creates or refreshes the Node; returns it as stored (with its pod CIDR).
async fn register(
    client: &Client,
    config: &AgentConfig,
    port: u16,
    oci: &OciState,
) -> Result<Value, ClientError> {
    let nodes = Resource::lookup("nodes").expect("nodes");
    let want = node_object(config, port, oci);
    match client.get(nodes, None, &config.name).await {
        Ok(mut cur) => {
            cur["status"] = want["status"].clone();
            for (k, v) in want["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default()
            {
                cur["metadata"]["labels"][k] = v;
            }
            let cur = client.replace(nodes, None, &config.name, &cur).await?;
            let mut st = cur.clone();
            st["status"] = want["status"].clone();
            client.replace_status(nodes, None, &config.name, &st).await
        }
        Err(e) if e.code() == Some(404) => client.create(nodes, None, &want).await,
        Err(e) => Err(e),
    }
}

async fn heartbeat(client: &Client, name: &str, oci: &OciState) -> Result<(), ClientError> {
    let nodes = Resource::lookup("nodes").expect("nodes");
    let t = now();
    let mut conds = conditions(oci);
    if let Ok(cur) = client.get(nodes, None, name).await {
        // Keep transition times of conditions whose status did not change.
        for c in conds.as_array_mut().into_iter().flatten() {
            if let Some(old) = cur
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|o| o["type"] == c["type"]))
            {
                if old["status"] == c["status"] {
                    c["lastTransitionTime"] = old["lastTransitionTime"].clone();
                }
            }
            c["lastHeartbeatTime"] = json!(t);
        }
    }
    client
        .patch(
            nodes,
            None,
            name,
            Some("status"),
            "application/merge-patch+json",
            &json!({"status": {"conditions": conds}}),
        )
        .await
        .map(|_| ())
}

impl Agent {
    /// Registers the node and starts serving its pods.
    pub async fn start(client: Client, config: AgentConfig) -> Result<Agent, AgentError> {
        Self::start_with(client, config, Box::new(IpCommand)).await
    }

    /// As [`Agent::start`], with the node's network driven by `link`.
    pub async fn start_with(
        client: Client,
        config: AgentConfig,
        link: Box<dyn Netlink>,
    ) -> Result<Agent, AgentError> {
        raise_open_files_limit();
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| AgentError::Listen {
                addr: config.listen,
                source: e,
            })?;
        let port = listener
            .local_addr()
            .map_err(|e| AgentError::Listen {
                addr: config.listen,
                source: e,
            })?
            .port();
        let oci = if config.oci {
            OciNode::new(
                &config.data_dir.join("oci"),
                config.insecure_registries.clone(),
                config.runc.as_deref(),
                Cni {
                    bin_dir: config.cni_bin_dir.clone(),
                    bridge: config.bridge.clone(),
                    gateway: Ipv4Addr::UNSPECIFIED,
                    prefix: 24,
                    state_dir: config.data_dir.join("oci/netns"),
                },
            )
            .map_err(|e| e.0)
        } else {
            Err("disabled on this node".to_string())
        };
        let oci_state: OciState = oci
            .as_ref()
            .map(|o| o.runc.version.clone())
            .map_err(Clone::clone);
        if let Err(why) = &oci_state {
            tracing::info!(%why, "this node runs wasm only");
        }
        let cached = load_cache(&config.data_dir);
        let node = match register(&client, &config, port, &oci_state).await {
            Ok(n) => n,
            Err(e) => match &cached {
                // Offline: run what was bound here last time.
                Some((node, _)) => {
                    tracing::warn!(error = %e, "control plane unreachable; running the pods cached on disk");
                    node.clone()
                }
                None => return Err(AgentError::Register(config.name.clone(), e)),
            },
        };
        let cidr = node
            .pointer("/spec/podCIDR")
            .and_then(Value::as_str)
            .ok_or_else(|| AgentError::NoPodCidr(config.name.clone()))?
            .to_string();
        let net = PodNetwork::new(&cidr, &config.bridge, link)?;
        let oci = oci.ok().map(|mut o| {
            o.cni.gateway = net.gateway();
            o.cni.prefix = net.prefix();
            Arc::new(o)
        });
        // A node runs as many pods as its pod network has addresses.
        let pods = net.capacity().to_string();
        let nodes = Resource::lookup("nodes").expect("nodes");
        let cap = json!({"status": {"capacity": {"pods": pods}, "allocatable": {"pods": pods}}});
        if let Err(e) = client
            .patch(
                nodes,
                None,
                &config.name,
                Some("status"),
                "application/merge-patch+json",
                &cap,
            )
            .await
        {
            tracing::warn!(error = %e, "could not publish the node's pod capacity");
        }
        let runtime = Runtime::new(config.data_dir.join("compiled"), 1000)?;
        let logs: LogIndex = Arc::default();
        let local = Arc::new(LocalEndpoints::default());
        let proxy = config.proxy.then(|| {
            let pc = skiff_proxy::ProxyConfig {
                node: skiff_proxy::table::NodeAddresses {
                    nodeport: config.nodeport_addresses.clone(),
                    node_ip: IpAddr::V4(config.node_ip),
                },
                ..Default::default()
            };
            Arc::new(skiff_proxy::Proxy::start(
                client.clone(),
                pc,
                local.clone(),
                Arc::new(ServiceAddresses::new(&config.service_interface)),
            ))
        });
        let ctx = Arc::new(NodeContext {
            client: client.clone(),
            runtime,
            blobs: BlobCache::new(config.data_dir.join("blobs")),
            images: ImageIndex::open(config.data_dir.join("images.json")),
            net,
            node_name: config.name.clone(),
            node_ip: config.node_ip,
            data_dir: config.data_dir.clone(),
            insecure_registries: config.insecure_registries.clone(),
            logs: logs.clone(),
            request_timeout: config.request_timeout,
            proxy,
            local,
            oci,
            no_oci: oci_state.as_ref().err().cloned(),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            ctx,
            config.clone(),
            node,
            cached.map(|c| c.1).unwrap_or_default(),
            listener,
            logs,
            stopped,
        ));
        tracing::info!(node = %config.name, %cidr, agent_port = port, "skiff agent ready");
        Ok(Agent {
            name: config.name,
            stop,
            task,
        })
    }

    /// Stops the agent and every pod it runs.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn cache_path(dir: &std::path::Path) -> PathBuf {
    dir.join("pods.json")
}

fn load_cache(dir: &std::path::Path) -> Option<(Value, Vec<Value>)> {
    let v: Value = serde_json::from_slice(&std::fs::read(cache_path(dir)).ok()?).ok()?;
    Some((
        v["node"].clone(),
        v["pods"].as_array().cloned().unwrap_or_default(),
    ))
}

fn save_cache(dir: &std::path::Path, node: &Value, pods: &HashMap<String, (PodWorker, Value)>) {
    let list: Vec<&Value> = pods.values().map(|(_, p)| p).collect();
    let body = serde_json::to_vec(&json!({"node": node, "pods": list})).unwrap_or_default();
    let tmp = cache_path(dir).with_extension("tmp");
    if std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, cache_path(dir)))
        .is_err()
    {
        tracing::warn!("cannot write the pod cache");
    }
}

/// The agent's endpoint the API server forwards to: `pods/{ns}/{name}/log` and
/// `pods/{ns}/{name}/exec` (OCI containers, when the node runs them). Requests must carry the
/// cluster token the agent itself was given, as the API server's forwarded ones do.
fn serve_endpoint(
    listener: tokio::net::TcpListener,
    logs: LogIndex,
    runc: Option<skiff_oci::Runc>,
    token: Option<String>,
) -> tokio::task::JoinHandle<()> {
    let expected = token.map(|t| format!("Bearer {t}"));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let logs = logs.clone();
            let runc = runc.clone();
            let expected = expected.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let allowed = expected.as_deref().is_none_or(|want| {
                        req.headers()
                            .get(http::header::AUTHORIZATION)
                            .is_some_and(|got| got.as_bytes() == want.as_bytes())
                    });
                    let (logs, runc) = (logs.clone(), runc.clone());
                    async move {
                        if !allowed {
                            return Ok(crate::exec::reject(
                                http::StatusCode::UNAUTHORIZED,
                                "the agent serves logs and exec to the API server only",
                            ));
                        }
                        endpoint(logs, runc, req).await
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

async fn endpoint(
    logs: LogIndex,
    runc: Option<skiff_oci::Runc>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<crate::logs::Body>, std::convert::Infallible> {
    let path = req.uri().path().trim_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').collect();
    let ["pods", ns, name, "exec"] = parts[..] else {
        return crate::logs::serve(logs, req).await;
    };
    let exec = crate::exec::ExecRequest::parse(req.uri().query().unwrap_or(""));
    let Some(runc) = runc else {
        return Ok(crate::exec::reject(
            http::StatusCode::BAD_REQUEST,
            "this node runs wasm only: exec needs OCI containers",
        ));
    };
    let found = crate::exec::find_container(
        &logs.lock().expect("log index"),
        ns,
        name,
        exec.container.as_deref(),
    );
    Ok(match found {
        Ok(id) => crate::exec::serve(runc, id, exec, req),
        Err((code, msg)) => crate::exec::reject(code, &msg),
    })
}

async fn run(
    ctx: Arc<NodeContext>,
    config: AgentConfig,
    node: Value,
    cached: Vec<Value>,
    listener: tokio::net::TcpListener,
    logs: LogIndex,
    mut stop: watch::Receiver<bool>,
) {
    let endpoint = serve_endpoint(
        listener,
        logs,
        ctx.oci.as_ref().map(|o| o.runc.clone()),
        ctx.client.token().map(String::from),
    );
    let mut workers: HashMap<String, (PodWorker, Value)> = HashMap::new();
    for p in cached {
        if !meta::is_deleting(&p) {
            workers.insert(
                meta::uid(&p).to_string(),
                (PodWorker::start(ctx.clone(), p.clone()), p),
            );
        }
    }
    let hb_client = ctx.client.clone();
    let oci_state: OciState = match (&ctx.oci, &ctx.no_oci) {
        (Some(oci), _) => Ok(oci.runc.version.clone()),
        (None, why) => Err(why.clone().unwrap_or_default()),
    };
    let name = config.name.clone();
    let every = config.heartbeat;
    let mut hb_stop = stop.clone();
    let beats = tokio::spawn(async move {
        loop {
            if let Err(e) = heartbeat(&hb_client, &name, &oci_state).await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = hb_stop.changed() => return,
            }
        }
    });
    let pods_r = Resource::lookup("pods").expect("pods");
    let selector = format!("spec.nodeName={}", config.name);
    let deleting: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    'outer: loop {
        // List, reconcile, then follow the watch; on any error start over.
        let list = match ctx.client.list(pods_r, None, None, Some(&selector)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing this node's pods failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let live: std::collections::HashSet<String> =
            items.iter().map(|p| meta::uid(p).to_string()).collect();
        let gone: Vec<String> = workers
            .keys()
            .filter(|u| !live.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some((w, _)) = workers.remove(&uid) {
                w.stop(Duration::from_secs(1)).await;
            }
        }
        for p in items {
            handle(&ctx, &mut workers, &deleting, p).await;
        }
        save_cache(&config.data_dir, &node, &workers);
        if let Some(oci) = &ctx.oci {
            // What an earlier run left for pods that are gone, and images no pod uses.
            let keep = workers.keys().cloned().collect();
            oci.sweep(&keep).await;
            let images = workers.values().flat_map(|(_, p)| pod_images(p)).collect();
            let removed = oci.collect_images(&images).await;
            if removed > 0 {
                tracing::info!(removed, "image layers no pod uses were removed");
            }
        }
        let in_use = workers.values().flat_map(|(_, p)| pod_images(p)).collect();
        let gc = skiff_wasm::collect_garbage(
            &ctx.runtime,
            &ctx.blobs,
            &ctx.images,
            &in_use,
            Default::default(),
        );
        tracing::debug!(?gc, "wasm caches collected");
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut stream = match ctx
            .client
            .watch(pods_r, None, Some(&rv), Some(&selector), None)
            .await
        {
            Ok(s) => Box::pin(s),
            Err(_) => continue,
        };
        loop {
            tokio::select! {
                _ = stop.changed() => break 'outer,
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => {
                        if ev.kind == "DELETED" {
                            if let Some((w, _)) = workers.remove(meta::uid(&ev.object)) {
                                w.stop(Duration::from_secs(1)).await;
                            }
                        } else if ev.kind != "BOOKMARK" {
                            handle(&ctx, &mut workers, &deleting, ev.object).await;
                        }
                        save_cache(&config.data_dir, &node, &workers);
                    }
                    _ => continue 'outer,
                }
            }
        }
    }
    beats.abort();
    endpoint.abort();
    for (_, (w, _)) in workers.drain() {
        w.stop(Duration::from_secs(1)).await;
    }
}

/// The images of a pod's containers.
fn pod_images(pod: &Value) -> Vec<String> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["image"].as_str().map(String::from))
        .collect()
}

async fn handle(
    ctx: &Arc<NodeContext>,
    workers: &mut HashMap<String, (PodWorker, Value)>,
    deleting: &Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    pod: Value,
) {
    let uid = meta::uid(&pod).to_string();
    if meta::is_deleting(&pod) {
        let worker = workers.remove(&uid).map(|(w, _)| w);
        let grace = pod
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let client = ctx.client.clone();
        let (ns, name) = (
            meta::namespace(&pod).unwrap_or("default").to_string(),
            meta::name(&pod).to_string(),
        );
        // Stop the containers, then finish the deletion, without holding up other pods.
        let h = tokio::spawn(async move {
            if let Some(w) = worker {
                w.stop(Duration::from_secs(grace.min(30))).await;
            }
            let pods = Resource::lookup("pods").expect("pods");
            match client.delete(pods, Some(&ns), &name, None, Some(0)).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(404) => {}
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "finishing the pod's deletion failed")
                }
            }
        });
        let mut d = deleting.lock().expect("deleting");
        d.retain(|h| !h.is_finished());
        d.push(h);
        return;
    }
    let terminal = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded") | Some("Failed")
    );
    match workers.get_mut(&uid) {
        Some((_, cur)) => *cur = pod,
        None if !terminal => {
            let w = PodWorker::start(ctx.clone(), pod.clone());
            workers.insert(uid, (w, pod));
        }
        None => {}
    }
}
