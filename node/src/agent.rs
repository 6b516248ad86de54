//! The agent loop: register the Node, heartbeat, and keep one worker per pod bound here.
//!
//! The pods bound to this node are also kept on disk (`DATA/pods.json`): an agent that starts
//! while the control plane is unreachable runs them from there, and catches up on reconnect.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Pod,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use skiff_api::conditions::Condition;
use skiff_api::{Resource, OCI_CONDITION, OCI_NODE_LABEL, WASM_NODE_LABEL};
use skiff_client::{Client, ClientError, DeleteParams, Event, ListParams, Patch};
use skiff_wasm::artifact::{BlobCache, ImageIndex};
use skiff_wasm::Runtime;
use tokio::sync::watch;

use crate::logs::LogIndex;
use crate::network::{IpCommand, NetError, Netlink, PodNetwork, ServiceAddresses};
use crate::oci::OciNode;
use crate::sandbox::Cni;

use crate::pod::{self, NodeContext, PodWorker};
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
    /// Lease renewals and Node status posts.
    pub heartbeat: crate::heartbeat::Timing,
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
    /// How this node's pod network reaches the other nodes' (host-gw or vxlan).
    pub pod_network: crate::routes::PodNetworkMode,
    /// The VXLAN device of the vxlan backend.
    pub vxlan: crate::routes::Vxlan,
    /// How often the node's certificates are checked and renewed when due (with jitter).
    pub cert_check_every: Duration,
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
            heartbeat: crate::heartbeat::Timing::default(),
            request_timeout: Duration::from_secs(10),
            proxy: true,
            nodeport_addresses: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            service_interface: "skiff-svc0".into(),
            oci: true,
            runc: None,
            cni_bin_dir: crate::sandbox::DEFAULT_CNI_BIN.into(),
            pod_network: Default::default(),
            vxlan: Default::default(),
            cert_check_every: crate::join::RENEW_CHECK_EVERY,
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
    #[error(transparent)]
    Join(#[from] crate::join::JoinError),
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

/// The architecture as Kubernetes names it (`amd64`, `arm64`, or Rust's name otherwise).
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// What the node offers: every CPU, the machine's memory, and up to 1,000 pods (lowered to the
/// pod network's size once the node has one).
fn node_resources() -> BTreeMap<String, Quantity> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    [
        ("cpu", cpus.to_string()),
        ("memory", format!("{}Ki", machine_memory_kib())),
        ("pods", "1000".into()),
        ("ephemeral-storage", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect()
}

/// The well-known labels of the node, and whether it runs wasm and OCI pods.
fn node_labels(c: &AgentConfig, oci: &OciState) -> BTreeMap<String, String> {
    let os = std::env::consts::OS;
    [
        ("kubernetes.io/hostname", c.name.clone()),
        ("kubernetes.io/os", os.into()),
        ("kubernetes.io/arch", arch().into()),
        ("beta.kubernetes.io/os", os.into()),
        ("beta.kubernetes.io/arch", arch().into()),
        (WASM_NODE_LABEL, "true".into()),
        (OCI_NODE_LABEL, oci.is_ok().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The versions and platform the node reports.
fn node_info(oci: &OciState) -> NodeSystemInfo {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    NodeSystemInfo {
        kubelet_version: concat!("v1.37.0+skiff-", env!("CARGO_PKG_VERSION")).into(),
        os_image: "skiff".into(),
        kernel_version: kernel,
        container_runtime_version: match oci {
            Ok(v) => format!("wasmtime://48.0.8, runc://{v}"),
            Err(_) => "wasmtime://48.0.8".to_string(),
        },
        operating_system: std::env::consts::OS.into(),
        architecture: arch().into(),
        ..Default::default()
    }
}

/// The Node this agent registers: its labels, resources, addresses, agent port, conditions and
/// versions.
fn node_object(c: &AgentConfig, port: u16, oci: &OciState) -> Node {
    let resources = node_resources();
    let address = |ty: &str, a: String| NodeAddress {
        type_: ty.into(),
        address: a,
    };
    Node {
        metadata: ObjectMeta {
            name: Some(c.name.clone()),
            labels: Some(node_labels(c, oci)),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            addresses: Some(vec![
                address("InternalIP", c.node_ip.to_string()),
                address("Hostname", c.name.clone()),
            ]),
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint { port: port.into() }),
            }),
            conditions: Some(conditions(oci)),
            node_info: Some(node_info(oci)),
            ..Default::default()
        }),
    }
}

/// The node's conditions as they stand now (transition and heartbeat times: now).
pub(crate) fn conditions(oci: &OciState) -> Vec<NodeCondition> {
    let t = time_now();
    let (oci_status, oci_reason, oci_message) = match oci {
        Ok(v) => ("True", "RuncFound", format!("runc {v} runs OCI containers")),
        Err(why) => (
            "False",
            "NoOCIRuntime",
            format!("OCI containers cannot run here: {why}"),
        ),
    };
    [
        (OCI_CONDITION, oci_status, oci_reason, oci_message.as_str()),
        (
            "Ready",
            "True",
            "KubeletReady",
            "skiff agent is posting ready status",
        ),
        ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
        ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
    ]
    .into_iter()
    .map(|(ty, status, reason, message)| NodeCondition::new(ty, status, reason, message, &t))
    .collect()
}

/// Now, to the second, as status times are written.
pub(crate) fn time_now() -> Time {
    Time(Timestamp::from_second(chrono::Utc::now().timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Creates or refreshes the Node; returns it as stored (with its pod CIDR). A Node that exists
/// is patched, labels and status: what others wrote on it (taints, annotations, the pod CIDR)
/// stays.
async fn register(
    client: &Client,
    config: &AgentConfig,
    port: u16,
    oci: &OciState,
) -> Result<Node, ClientError> {
    let want = node_object(config, port, oci);
    match client.get::<Node>(None, &config.name).await {
        Ok(_) => {
            let labels = Patch::Merge(json!({"metadata": {"labels": want.metadata.labels}}));
            client.patch::<Node>(None, &config.name, &labels).await?;
            let status = Patch::Merge(json!({"status": want.status}));
            client
                .patch_status::<Node>(None, &config.name, &status)
                .await
        }
        Err(e) if e.code() == Some(404) => client.create(None, &want).await,
        Err(e) => Err(e),
    }
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
        let (listener, port) = bind_endpoint(config.listen).await?;
        let (oci, oci_state) = open_oci(&config);
        let (serving, endpoint_tls) = endpoint_credentials(&client, &config).await?;
        let cached = load_cache(&config.data_dir);
        let cached_node = cached.as_ref().map(|(node, _)| node);
        let node = register_or_cached(&client, &config, port, &oci_state, cached_node).await?;
        let (net, cidr) = pod_network(&client, &config, &node, link).await?;
        let logs: LogIndex = Arc::default();
        let ctx = node_context(&client, &config, net, oci, &oci_state, logs.clone())?;
        let (stop, stopped) = watch::channel(false);
        spawn_renewal(&client, &config, serving, stopped.clone());
        start_routes(&client, &config, &cidr, stopped.clone()).await?;
        let task = tokio::spawn(run(
            ctx,
            config.clone(),
            node,
            cached.map(|c| c.1).unwrap_or_default(),
            (listener, endpoint_tls),
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

/// Binds the agent's endpoint; returns the listener and the port it got.
async fn bind_endpoint(addr: SocketAddr) -> Result<(tokio::net::TcpListener, u16), AgentError> {
    let failed = |e| AgentError::Listen { addr, source: e };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    let port = listener.local_addr().map_err(failed)?.port();
    Ok((listener, port))
}

/// The node's OCI side (image store, runc, CNI), unless it is turned off or cannot run here;
/// and what the node says about it. Its CNI gateway is set once the pod network is known.
fn open_oci(config: &AgentConfig) -> (Option<OciNode>, OciState) {
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
    (oci.ok(), oci_state)
}

/// The endpoint's serving certificate (and the node's client certificate): kept in the data
/// dir, asked for through `client` when missing or due. Returns the serving certificate (which
/// renewals replace) and the endpoint's TLS configuration that serves it.
async fn endpoint_credentials(
    client: &Client,
    config: &AgentConfig,
) -> Result<(Arc<crate::join::ServingCert>, Arc<rustls::ServerConfig>), AgentError> {
    let credential = crate::join::Pki::new(&config.data_dir)
        .ensure(client, &config.data_dir, &config.name, config.node_ip, None)
        .await?;
    let serving = crate::join::ServingCert::new(&credential)?;
    let endpoint_tls = credential.endpoint_tls(serving.clone())?;
    Ok((serving, endpoint_tls))
}

/// Registers the Node and returns it as stored; when the control plane is unreachable, the
/// Node cached on disk stands in for it (the agent runs offline what was bound here last time).
async fn register_or_cached(
    client: &Client,
    config: &AgentConfig,
    port: u16,
    oci_state: &OciState,
    cached: Option<&Node>,
) -> Result<Node, AgentError> {
    match register(client, config, port, oci_state).await {
        Ok(n) => Ok(n),
        Err(e) => match cached {
            Some(node) => {
                tracing::warn!(error = %e, "control plane unreachable; running the pods cached on disk");
                Ok(node.clone())
            }
            None => Err(AgentError::Register(config.name.clone(), e)),
        },
    }
}

/// The node's pod network on the pod CIDR the control plane gave it; returns it and the CIDR.
/// A node runs as many pods as its pod network has addresses: that is published as its pod
/// capacity.
async fn pod_network(
    client: &Client,
    config: &AgentConfig,
    node: &Node,
    link: Box<dyn Netlink>,
) -> Result<(PodNetwork, String), AgentError> {
    let cidr = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.clone())
        .ok_or_else(|| AgentError::NoPodCidr(config.name.clone()))?;
    let net = PodNetwork::new(&cidr, &config.bridge, link)?;
    let pods = net.capacity().to_string();
    let cap = Patch::Merge(
        json!({"status": {"capacity": {"pods": pods}, "allocatable": {"pods": pods}}}),
    );
    if let Err(e) = client.patch_status::<Node>(None, &config.name, &cap).await {
        tracing::warn!(error = %e, "could not publish the node's pod capacity");
    }
    Ok((net, cidr))
}

/// The node's service proxy (and cluster DNS), when the agent runs it.
fn start_proxy(
    client: &Client,
    config: &AgentConfig,
    local: &Arc<LocalEndpoints>,
) -> Option<Arc<skiff_proxy::Proxy>> {
    config.proxy.then(|| {
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
    })
}

/// What every pod worker of the node shares: the API client, the wasm runtime and its caches,
/// the pod network, the service proxy and the OCI side (its CNI on the pod network's gateway).
fn node_context(
    client: &Client,
    config: &AgentConfig,
    net: PodNetwork,
    oci: Option<OciNode>,
    oci_state: &OciState,
    logs: LogIndex,
) -> Result<Arc<NodeContext>, AgentError> {
    let oci = oci.map(|mut o| {
        o.cni.gateway = net.gateway();
        o.cni.prefix = net.prefix();
        Arc::new(o)
    });
    let runtime = Runtime::new(config.data_dir.join("compiled"), 1000)?;
    let local = Arc::new(LocalEndpoints::default());
    let proxy = start_proxy(client, config, &local);
    Ok(Arc::new(NodeContext {
        client: client.clone(),
        runtime,
        blobs: BlobCache::new(config.data_dir.join("blobs")),
        images: ImageIndex::open(config.data_dir.join("images.json")),
        net,
        node_name: config.name.clone(),
        node_ip: config.node_ip,
        data_dir: config.data_dir.clone(),
        insecure_registries: config.insecure_registries.clone(),
        logs,
        request_timeout: config.request_timeout,
        proxy,
        local,
        oci,
        no_oci: oci_state.as_ref().err().cloned(),
        guest_tls: guest_tls(&config.data_dir),
        api_facts: Default::default(),
    }))
}

/// What wasm guests' outgoing HTTPS trusts: the public roots and the cluster CA, so a pod
/// calls the API server at `https://kubernetes.default.svc` as a container would with its
/// mounted `ca.crt`.
fn guest_tls(data_dir: &std::path::Path) -> Option<skiff_wasm::TlsRoots> {
    let path = data_dir.join("pki").join("ca.crt");
    let pem = std::fs::read(&path).ok()?;
    match skiff_wasm::TlsRoots::with_pem(&pem) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "wasm guests will not trust the cluster CA");
            None
        }
    }
}

/// Renews the node's certificates while the agent runs: `client` and every clone of it, and
/// the endpoint (through `serving`), take the new ones.
fn spawn_renewal(
    client: &Client,
    config: &AgentConfig,
    serving: Arc<crate::join::ServingCert>,
    stopped: watch::Receiver<bool>,
) {
    tokio::spawn(
        crate::join::Renewal {
            client: client.clone(),
            serving,
            data_dir: config.data_dir.clone(),
            node: config.name.clone(),
            ip: config.node_ip,
            every: config.cert_check_every,
        }
        .run(stopped),
    );
}

/// Routes to the other nodes' pod networks, following the Nodes until the agent stops.
async fn start_routes(
    client: &Client,
    config: &AgentConfig,
    cidr: &str,
    stopped: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let route_config = crate::routes::RouteConfig {
        node: config.name.clone(),
        node_ip: config.node_ip,
        pod_cidr: cidr.parse().map_err(|_| NetError::Cidr(cidr.to_string()))?,
        bridge: config.bridge.clone(),
        mode: config.pod_network,
        vxlan: config.vxlan.clone(),
    };
    crate::routes::start(
        client.clone(),
        route_config,
        Arc::new(crate::routes::IpRoutes),
        stopped,
    )
    .await?;
    Ok(())
}

fn cache_path(dir: &std::path::Path) -> PathBuf {
    dir.join("pods.json")
}

/// The pod cache on disk: the Node as last registered and the pods bound to it.
#[derive(serde::Deserialize)]
struct Cache {
    node: Node,
    /// Each pod on its own: one that no longer decodes is skipped, not the whole cache.
    #[serde(default)]
    pods: Vec<Value>,
}

fn load_cache(dir: &std::path::Path) -> Option<(Node, Vec<Pod>)> {
    let c: Cache = serde_json::from_slice(&std::fs::read(cache_path(dir)).ok()?).ok()?;
    let pods = c
        .pods
        .into_iter()
        .filter_map(|p| serde_json::from_value(p).ok())
        .collect();
    Some((c.node, pods))
}

fn cache_body(node: &Node, pods: &[Arc<Pod>]) -> Vec<u8> {
    let list: Vec<&Pod> = pods.iter().map(|p| &**p).collect();
    serde_json::to_vec(&json!({"node": node, "pods": list})).unwrap_or_default()
}

/// Writes the pod cache atomically: a temporary file of a name no other writer uses, synced,
/// then renamed over the cache (and the directory synced), so a crash leaves the old cache or
/// the new one, never a mix.
fn write_cache(dir: &std::path::Path, body: &[u8]) {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("pods.json.{}.{seq}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, cache_path(dir))?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(error = %e, "cannot write the pod cache");
    }
}

/// What the pod cache is written from: the Node and the pods it runs, shared, not copied.
type CacheSnapshot = (Node, Vec<Arc<Pod>>);

/// Writes the pod cache off the agent's loop, which only hands over the newest snapshot: a
/// task encodes and writes it on a blocking thread, one write at a time, in order; what is
/// handed over while a write runs is coalesced into the newest. The loop neither encodes the
/// pods nor waits for a disk sync, so a change costs it one pointer per pod, however many.
struct CacheWriter {
    tx: watch::Sender<Option<CacheSnapshot>>,
    task: tokio::task::JoinHandle<()>,
}

impl CacheWriter {
    fn new(dir: PathBuf) -> CacheWriter {
        let (tx, mut rx) = watch::channel(None::<CacheSnapshot>);
        let task = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some((node, pods)) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let dir = dir.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    write_cache(&dir, &cache_body(&node, &pods))
                })
                .await;
            }
        });
        CacheWriter { tx, task }
    }

    fn save(&self, node: &Node, pods: &HashMap<String, (PodWorker, Arc<Pod>)>) {
        let pods = pods.values().map(|(_, p)| p.clone()).collect();
        self.tx.send_replace(Some((node.clone(), pods)));
    }

    /// Waits until what was handed over is on disk.
    async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// Whether the pod cache holds pod `uid`, and at which pod IP. A finished pod's address
/// does not count: it is never run again, offline or not.
fn cached_address(
    workers: &HashMap<String, (PodWorker, Arc<Pod>)>,
    uid: &str,
) -> Option<Option<String>> {
    workers.get(uid).map(|(_, p)| {
        let status = p.status.as_ref();
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        status.filter(|_| !finished).and_then(|s| s.pod_ip.clone())
    })
}

/// How often what no pod uses is collected (also at every relist).
const GC_EVERY: Duration = Duration::from_secs(600);

/// The images of the pods this node runs.
fn images_in_use(workers: &HashMap<String, (PodWorker, Arc<Pod>)>) -> HashSet<String> {
    workers.values().flat_map(|(_, p)| pod_images(p)).collect()
}

/// Collects what no pod on the node uses, in the background: OCI image layers (a round is
/// skipped while a pull runs) and the wasm caches (blobs, compiled code, index entries; their
/// directory walks on a blocking thread).
fn collect_garbage(ctx: &Arc<NodeContext>, images: HashSet<String>) -> tokio::task::JoinHandle<()> {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        if let Some(oci) = &ctx.oci {
            let removed = oci.collect_images(&images).await;
            if removed > 0 {
                tracing::info!(removed, "image layers no pod uses were removed");
            }
        }
        let c = ctx.clone();
        let report = tokio::task::spawn_blocking(move || {
            skiff_wasm::collect_garbage(
                &c.runtime,
                &c.blobs,
                &c.images,
                &images,
                Default::default(),
            )
        })
        .await;
        match report {
            Ok(report) => tracing::debug!(?report, "wasm caches collected"),
            Err(e) => tracing::warn!(error = %e, "collecting the wasm caches failed"),
        }
    })
}

/// Coalesces pod cache writes: a burst of watch events is one write, at most one a
/// [`CACHE_EVERY`].
#[derive(Debug, Default)]
struct CacheWrites {
    dirty: bool,
    last: Option<Instant>,
}

/// Fewest time between two writes of the pod cache.
const CACHE_EVERY: Duration = Duration::from_secs(1);

impl CacheWrites {
    /// The cache no longer says what the agent knows.
    fn changed(&mut self) {
        self.dirty = true;
    }

    /// A write was made now, whether it was due or not.
    fn written(&mut self, now: Instant) {
        self.dirty = false;
        self.last = Some(now);
    }

    /// Whether to write now (and if so, the write is counted as done).
    fn due(&mut self, now: Instant) -> bool {
        let due = self.dirty
            && self
                .last
                .is_none_or(|l| now.duration_since(l) >= CACHE_EVERY);
        if due {
            self.dirty = false;
            self.last = Some(now);
        }
        due
    }
}

/// Backoff between relists after a failed list or watch: 250 ms doubling to 30 s, each delay
/// drawn at random from its upper half, so agents that lost the control plane together do not
/// come back in step.
#[derive(Debug, Default)]
struct Relist {
    failures: u32,
}

impl Relist {
    fn next(&mut self) -> Duration {
        let max = Duration::from_millis(250)
            .saturating_mul(1 << self.failures.min(7))
            .min(Duration::from_secs(30));
        self.failures += 1;
        let half = max / 2;
        half + half.mul_f64(jitter())
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in [0, 1), random enough to spread retries.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The agent's endpoint the API server forwards to: `pods/{ns}/{name}/log`,
/// `pods/{ns}/{name}/exec` (OCI containers, when the node runs them), `portforward` and
/// `proxy/{port}/{path}`. It is HTTPS with the
/// node's serving certificate, and answers only the API server: a client certificate signed by
/// the cluster CA with the API server's common name.
fn serve_endpoint(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    logs: LogIndex,
    runc: Option<skiff_oci::Runc>,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let logs = logs.clone();
            let runc = runc.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                // The verifier checked the chain to the cluster CA; the name must be the API
                // server's.
                let caller = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::join::common_name(c));
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (logs, runc, caller) = (logs.clone(), runc.clone(), caller.clone());
                        async move {
                            match caller.as_deref() {
                            Some(crate::join::API_SERVER_CLIENT_CN) => {
                                endpoint(logs, runc, req).await
                            }
                            Some(other) => Ok(crate::exec::reject(
                                http::StatusCode::FORBIDDEN,
                                &format!("the agent serves logs and exec to the API server only, not to {other}"),
                            )),
                            None => Ok(crate::exec::reject(
                                http::StatusCode::UNAUTHORIZED,
                                "the agent serves logs and exec to the API server only: present its client certificate",
                            )),
                        }
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
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
    if let ["pods", ns, name, sub, ..] = parts[..] {
        if sub == "portforward" || sub == "proxy" {
            let entry = logs
                .lock()
                .expect("log index")
                .get(&format!("{ns}/{name}"))
                .cloned();
            let Some(entry) = entry.filter(|e| e.ip.is_some()) else {
                return Ok(crate::exec::reject(
                    http::StatusCode::NOT_FOUND,
                    &format!("pod {ns}/{name} does not run on this node"),
                ));
            };
            let target = crate::portforward::Target {
                namespace: ns.to_string(),
                name: name.to_string(),
                uid: entry.uid,
                ip: entry.ip,
                netns: entry.netns,
            };
            if sub == "portforward" {
                return Ok(crate::portforward::serve(target, req));
            }
            return Ok(crate::podproxy::serve(target, req).await);
        }
    }
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

/// What the agent does with a pod it hears about.
#[derive(Debug, PartialEq)]
enum Action {
    /// Run it: a worker starts.
    Start,
    /// Its worker runs already: keep the newest object.
    Update,
    /// It is being deleted: stop it within its grace period, then finish the deletion.
    Delete(Duration),
    /// Nothing: it finished (a finished pod is never run again) or is being stopped already.
    Ignore,
}

fn decide(pod: &Pod, running: bool, stopping: bool) -> Action {
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    );
    if pod.metadata.deletion_timestamp.is_some() {
        if stopping {
            return Action::Ignore;
        }
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(0)
            .max(0) as u64;
        Action::Delete(Duration::from_secs(grace.min(30)))
    } else if running {
        Action::Update
    } else if stopping || finished {
        Action::Ignore
    } else {
        Action::Start
    }
}

/// Drops what the agent never reads from a pod it keeps: its managed fields, often the
/// largest part of a pod (the kubelet's informers drop them likewise).
fn trim(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
}

/// The pods this agent runs, and those it is stopping.
#[derive(Default)]
struct Pods {
    workers: HashMap<String, (PodWorker, Arc<Pod>)>,
    /// Pods being stopped (deleted, or bound here no more), by UID: until its stop is done, what
    /// such a pod holds (containers, namespace, address, files) is still its own.
    stopping: HashMap<String, tokio::task::JoinHandle<()>>,
}

impl Pods {
    fn forget_stopped(&mut self) {
        self.stopping.retain(|_, h| !h.is_finished());
    }

    /// The UIDs of the pods whose containers and namespaces are to be kept.
    fn owned(&mut self) -> HashSet<String> {
        self.forget_stopped();
        self.workers
            .keys()
            .chain(self.stopping.keys())
            .cloned()
            .collect()
    }

    /// Stops the pod's worker (if any) in the background; then, for a pod being deleted, its
    /// API object is deleted (retried until it is), and its files go.
    fn stop(&mut self, ctx: &Arc<NodeContext>, pod: &Pod, grace: Duration, delete: bool) {
        let uid = pod::uid_of(pod).to_string();
        let worker = self.workers.remove(&uid).map(|(w, _)| w);
        let ctx = ctx.clone();
        let pod = pod.clone();
        tracing::info!(pod = %pod::name_of(&pod), ?grace, delete, running = worker.is_some(), "stopping a pod");
        let h = tokio::spawn(async move {
            let began = Instant::now();
            if let Some(w) = worker {
                w.stop(grace).await;
            }
            if delete {
                finish_deletion(&ctx.client, &pod).await;
            }
            tracing::info!(pod = %pod::name_of(&pod), took = ?began.elapsed(), "pod stopped");
            pod::forget_logs(&ctx, &pod);
            remove_pod_dir(&pod::pod_dir(&ctx.data_dir, &pod));
        });
        self.stopping.insert(uid, h);
    }

    fn handle(&mut self, ctx: &Arc<NodeContext>, pod: Pod) {
        let uid = pod::uid_of(&pod).to_string();
        self.forget_stopped();
        let running = self.workers.contains_key(&uid);
        match decide(&pod, running, self.stopping.contains_key(&uid)) {
            Action::Start => {
                let w = PodWorker::start(ctx.clone(), pod.clone());
                self.workers.insert(uid, (w, Arc::new(pod)));
            }
            Action::Update => {
                if let Some((_, cur)) = self.workers.get_mut(&uid) {
                    *cur = Arc::new(pod);
                }
            }
            Action::Delete(grace) => self.stop(ctx, &pod, grace, true),
            Action::Ignore if !running && !self.stopping.contains_key(&uid) => {
                pod::keep_logs(ctx, &pod);
            }
            Action::Ignore => {}
        }
    }

    /// Stops every pod (the agent is shutting down: the pods stay bound here, and their files
    /// are kept for the next run).
    async fn shutdown(&mut self) {
        let stops = self
            .workers
            .drain()
            .map(|(_, (w, _))| w.stop(Duration::from_secs(1)));
        futures::future::join_all(stops).await;
        for (_, h) in self.stopping.drain() {
            h.abort();
        }
    }
}

/// Deletes the API object of a pod whose containers have stopped, retrying with backoff
/// until it is gone. Only this pod's object is deleted (a UID precondition), never a new pod
/// given the same name; and once the object is gone — removed meanwhile by someone else, its
/// name perhaps taken by another pod — the work is done: the Node authorizer answers a node's
/// delete of a pod no longer bound to it with 403, and that is not retried for ever.
async fn finish_deletion(client: &Client, pod: &Pod) {
    let (ns, name, uid) = (pod::ns_of(pod), pod::name_of(pod), pod::uid_of(pod));
    let params = DeleteParams {
        precondition_uid: Some(uid.to_string()),
        ..DeleteParams::now()
    };
    let mut backoff = crate::backoff::Backoff::default();
    loop {
        let e = match client.delete::<Pod>(Some(ns), name, &params).await {
            Ok(_) => return,
            Err(e) if e.code() == Some(404) => return,
            Err(e) => e,
        };
        if matches!(e.code(), Some(403 | 409)) && object_gone(client, ns, name, uid).await {
            return;
        }
        let delay = backoff.next(Duration::ZERO);
        tracing::warn!(pod = %name, error = %e, ?delay, "finishing the pod's deletion failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Whether the pod object `ns/name` with `uid` no longer exists (a read that fails otherwise
/// says nothing).
async fn object_gone(client: &Client, ns: &str, name: &str, uid: &str) -> bool {
    match client.get::<Pod>(Some(ns), name).await {
        Ok(p) => p.metadata.uid.as_deref() != Some(uid),
        Err(e) => e.code() == Some(404),
    }
}

fn remove_pod_dir(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a pod's files"),
    }
}

/// Removes the directories of pods not in `keep` (UIDs): what pods gone while the agent was
/// away left (logs, emptyDir data, ConfigMap copies).
fn sweep_pod_dirs(data_dir: &std::path::Path, keep: &HashSet<String>) {
    let Ok(rd) = std::fs::read_dir(data_dir.join("pods")) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !keep.contains(crate::pod::pod_dir_uid(&name)) {
            tracing::info!(dir = %name, "removing the files of a pod that is gone");
            remove_pod_dir(&entry.path());
        }
    }
}

/// Between looks for the volumes of deleted claims.
const VOLUME_SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Removes the directories under `DATA/storage` whose PersistentVolume is gone (a claim with
/// reclaim policy `Delete` was deleted). A directory is kept whenever the API cannot say.
async fn sweep_volumes(ctx: &NodeContext) {
    let Ok(rd) = std::fs::read_dir(ctx.data_dir.join("storage")) else {
        return;
    };
    let pvs = Resource::lookup("persistentvolumes").expect("pvs");
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        match ctx.client.get_dyn(pvs, None, &name).await {
            Err(e) if e.code() == Some(404) => {
                tracing::info!(volume = %name, "removing the directory of a deleted volume");
                remove_pod_dir(&entry.path());
            }
            _ => {}
        }
    }
}

/// How following the watch of the node's pods ended.
#[derive(Debug, PartialEq)]
enum Followed {
    /// The agent stops.
    Stopped,
    /// The watch failed or ended: list again.
    Ended,
}

/// What the agent's loop keeps between lists: the pods it runs, the pod cache on disk and
/// its garbage collection.
struct PodSync {
    ctx: Arc<NodeContext>,
    /// The Node as registered, written into the pod cache with the pods.
    node: Node,
    pods: Pods,
    cache: CacheWrites,
    writer: CacheWriter,
    gc: Option<tokio::task::JoinHandle<()>>,
}

impl PodSync {
    fn new(ctx: Arc<NodeContext>, node: Node) -> PodSync {
        let writer = CacheWriter::new(ctx.data_dir.clone());
        PodSync {
            ctx,
            node,
            pods: Pods::default(),
            cache: CacheWrites::default(),
            writer,
            gc: None,
        }
    }

    /// Starts collecting what no pod uses, unless a collection runs already.
    fn collect_garbage(&mut self) {
        if self.gc.as_ref().is_none_or(|h| h.is_finished()) {
            self.gc = Some(collect_garbage(
                &self.ctx,
                images_in_use(&self.pods.workers),
            ));
        }
    }

    /// Runs the pods the cache on disk held (the control plane is unreachable).
    fn run_offline(&mut self, cached: Vec<Pod>) {
        for p in cached {
            self.pods.handle(&self.ctx, p);
        }
    }

    /// Makes the node run the pods of a fresh list: pods bound here no more are stopped, the
    /// others started or updated; then the pod cache is written and what pods that are gone
    /// left (files, OCI containers and namespaces, unused images) is removed.
    async fn resync(&mut self, mut items: Vec<Pod>) {
        items.iter_mut().for_each(trim);
        let live: HashSet<String> = items.iter().map(|p| pod::uid_of(p).to_string()).collect();
        let gone: Vec<Arc<Pod>> = self
            .pods
            .workers
            .iter()
            .filter(|(u, _)| !live.contains(*u))
            .map(|(_, (_, p))| p.clone())
            .collect();
        for p in gone {
            self.pods.stop(&self.ctx, &p, Duration::from_secs(1), false);
        }
        for p in items {
            self.pods.handle(&self.ctx, p);
        }
        self.writer.save(&self.node, &self.pods.workers);
        let owned = self.pods.owned();
        // Files of pods that are gone; those of finished pods stay while the pod exists.
        sweep_pod_dirs(&self.ctx.data_dir, &live.union(&owned).cloned().collect());
        if let Some(oci) = &self.ctx.oci {
            // What an earlier run left for pods that are gone.
            oci.sweep(&owned).await;
        }
        self.collect_garbage();
    }

    /// Follows the watch until it ends or the agent stops; meanwhile the pod cache is written
    /// when due, and garbage and the volumes of deleted claims are collected.
    async fn follow(
        &mut self,
        mut stream: impl futures::Stream<Item = Result<Event<Pod>, ClientError>> + Unpin,
        relist: &mut Relist,
        stop: &mut watch::Receiver<bool>,
    ) -> Followed {
        let mut tick = tokio::time::interval(CACHE_EVERY);
        let mut collect =
            tokio::time::interval_at(tokio::time::Instant::now() + GC_EVERY, GC_EVERY);
        let mut volumes = tokio::time::interval(VOLUME_SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = stop.changed() => return Followed::Stopped,
                _ = volumes.tick() => sweep_volumes(&self.ctx).await,
                _ = collect.tick() => self.collect_garbage(),
                _ = tick.tick() => {
                    if self.cache.due(Instant::now()) {
                        self.writer.save(&self.node, &self.pods.workers);
                    }
                }
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => {
                        // The watch works: the next failure starts the backoff over.
                        relist.reset();
                        self.on_event(ev);
                    }
                    _ => {
                        self.flush();
                        return Followed::Ended;
                    }
                }
            }
        }
    }

    /// Applies one watch event to the pods the node runs.
    fn on_event(&mut self, ev: Event<Pod>) {
        let (mut pod, deleted) = match ev {
            Event::Added(p) | Event::Modified(p) => (p, false),
            Event::Deleted(p) => (p, true),
            Event::Bookmark(_) => return,
        };
        trim(&mut pod);
        let uid = pod::uid_of(&pod).to_string();
        let before = cached_address(&self.pods.workers, &uid);
        if deleted {
            self.pods.forget_stopped();
            if !self.pods.stopping.contains_key(&uid) {
                self.pods
                    .stop(&self.ctx, &pod, Duration::from_secs(1), false);
            }
        } else {
            self.pods.handle(&self.ctx, pod);
        }
        self.cache.changed();
        // A pod bound here or gone, or given its address, is written at once (an agent killed
        // right after must still run it offline, at the same address); other status changes
        // are coalesced.
        if cached_address(&self.pods.workers, &uid) != before {
            self.cache.written(Instant::now());
            self.writer.save(&self.node, &self.pods.workers);
        }
    }

    /// Writes the pod cache if it is behind what the agent knows.
    fn flush(&mut self) {
        if self.cache.dirty {
            self.writer.save(&self.node, &self.pods.workers);
            self.cache.dirty = false;
        }
    }

    /// Writes the pod cache (waiting until it is on disk), ends `tasks`, then stops garbage
    /// collection and every pod.
    async fn shutdown(mut self, tasks: [tokio::task::JoinHandle<()>; 2]) {
        self.flush();
        self.writer.close().await;
        for t in tasks {
            t.abort();
        }
        if let Some(gc) = self.gc {
            gc.abort();
        }
        self.pods.shutdown().await;
    }
}

/// The agent's loop: list the pods bound to this node and run them, follow the watch, and
/// list again (with backoff) when it fails; until `stop`. If the first list fails, the pods
/// cached on disk run until one succeeds.
async fn run(
    ctx: Arc<NodeContext>,
    config: AgentConfig,
    node: Node,
    cached: Vec<Pod>,
    (listener, endpoint_tls): (tokio::net::TcpListener, Arc<rustls::ServerConfig>),
    logs: LogIndex,
    mut stop: watch::Receiver<bool>,
) {
    let endpoint = serve_endpoint(
        listener,
        endpoint_tls,
        logs,
        ctx.oci.as_ref().map(|o| o.runc.clone()),
    );
    let beats = start_heartbeat(&ctx, &config, stop.clone());
    let selector = ListParams::fields(&format!("spec.nodeName={}", config.name));
    let mut sync = PodSync::new(ctx, node);
    // The cache is for running while the API is away: used only if the first list fails.
    let mut cached = Some(cached);
    let mut relist = Relist::default();
    let mut first = true;
    loop {
        if !first {
            // Start over after a failed list or watch, with backoff.
            let delay = relist.next();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
        }
        first = false;
        // List, reconcile, then follow the watch.
        let list = match sync.ctx.client.list::<Pod>(None, &selector).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing this node's pods failed; retrying");
                // Offline: run what was bound here last time.
                sync.run_offline(cached.take().unwrap_or_default());
                continue;
            }
        };
        cached = None;
        let rv = list.resource_version.unwrap_or_default();
        sync.resync(list.items).await;
        let stream = match sync
            .ctx
            .client
            .watch::<Pod>(None, &selector, Some(&rv))
            .await
        {
            Ok(s) => Box::pin(s),
            Err(e) => {
                tracing::warn!(error = %e, "watching this node's pods failed; relisting");
                continue;
            }
        };
        if sync.follow(stream, &mut relist, &mut stop).await == Followed::Stopped {
            break;
        }
    }
    sync.shutdown([beats, endpoint]).await;
}

/// Heartbeats (Lease renewals and Node status posts) until `stop`.
fn start_heartbeat(
    ctx: &NodeContext,
    config: &AgentConfig,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let oci_state: OciState = match (&ctx.oci, &ctx.no_oci) {
        (Some(oci), _) => Ok(oci.runc.version.clone()),
        (None, why) => Err(why.clone().unwrap_or_default()),
    };
    tokio::spawn(
        crate::heartbeat::Heartbeat::new(
            ctx.client.clone(),
            &config.name,
            oci_state,
            config.heartbeat,
        )
        .run(stop),
    )
}

/// The images of a pod's containers.
fn pod_images(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.image.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, phase: &str, deleting: Option<u64>) -> Pod {
        let mut p: Pod = pod::typed(
            &json!({"metadata": {"name": "p", "namespace": "default", "uid": uid},
                           "status": {"phase": phase}}),
        );
        if let Some(grace) = deleting {
            p.metadata.deletion_timestamp =
                Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap());
            p.metadata.deletion_grace_period_seconds = Some(grace as i64);
        }
        p
    }

    #[test]
    fn a_finished_pod_is_never_started_again() {
        // An agent that starts (or relists) and finds a pod that ran to its end.
        assert_eq!(
            decide(&pod("u", "Succeeded", None), false, false),
            Action::Ignore
        );
        assert_eq!(
            decide(&pod("u", "Failed", None), false, false),
            Action::Ignore
        );
        assert_eq!(
            decide(&pod("u", "Running", None), false, false),
            Action::Start
        );
        assert_eq!(
            decide(&pod("u", "Pending", None), true, false),
            Action::Update
        );
    }

    #[test]
    fn a_deleting_pod_is_stopped_once_with_its_grace_period() {
        let p = pod("u", "Running", Some(20));
        assert_eq!(
            decide(&p, true, false),
            Action::Delete(Duration::from_secs(20))
        );
        // Seen again (its status written while it stops, or a relist): its stop runs already.
        assert_eq!(decide(&p, false, true), Action::Ignore);
    }

    /// A fake API server on loopback for `finish_deletion`: a DELETE is answered `delete`, a
    /// GET `get` (200: the pod with UID `other-uid`). Returns its URL and the requests seen,
    /// each as its method, path and body.
    async fn fake_api(delete: u16, get: u16) -> (String, crate::fake_api::Seen) {
        crate::fake_api::serve(move |method, _| {
            let code = if method == "DELETE" { delete } else { get };
            if code == 200 {
                (
                    code,
                    json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "namespace": "default", "uid": "other-uid"}}),
                )
            } else {
                (code, crate::fake_api::status(code))
            }
        })
        .await
    }

    /// The agent's last delete of a pod whose object someone else removed: the Node
    /// authorizer refuses it (403), a read finds the object gone (404) or the name taken by
    /// another pod, and the deletion is done; the delete carries the pod's UID as a
    /// precondition, so another pod of that name is never deleted.
    #[tokio::test]
    async fn a_pod_already_gone_ends_its_deletion() {
        let p = pod("u-1", "Running", Some(0));
        for get in [404, 200] {
            let (url, seen) = fake_api(403, get).await;
            let client = Client::new(&url, Some("t".into()), "default", None, true).unwrap();
            tokio::time::timeout(Duration::from_secs(5), finish_deletion(&client, &p))
                .await
                .unwrap_or_else(|_| panic!("still retrying with the object gone (GET {get})"));
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 2, "{seen:?}");
            assert!(
                seen[0].starts_with("DELETE ")
                    && seen[0].contains(r#""preconditions":{"uid":"u-1"}"#),
                "{seen:?}"
            );
            assert!(seen[1].starts_with("GET "), "{seen:?}");
        }
    }

    /// A refused delete of a pod still there (its object with the same UID) is retried.
    #[tokio::test]
    async fn a_refused_delete_of_a_pod_still_there_is_retried() {
        let mut p = pod("u-1", "Running", Some(0));
        p.metadata.uid = Some("other-uid".into());
        let (url, seen) = fake_api(403, 200).await;
        let client = Client::new(&url, Some("t".into()), "default", None, true).unwrap();
        let done =
            tokio::time::timeout(Duration::from_millis(500), finish_deletion(&client, &p)).await;
        assert!(done.is_err(), "gave up on a pod still there");
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "a delete and a read, then the backoff"
        );
    }

    #[tokio::test]
    async fn a_relist_keeps_what_a_stopping_pod_holds() {
        let mut pods = Pods::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // A graceful stop in progress.
        pods.stopping.insert(
            "u-stopping".into(),
            tokio::spawn(async move {
                let _ = rx.await;
            }),
        );
        assert!(pods.owned().contains("u-stopping"));
        let _ = tx.send(());
        let h = pods.stopping.get_mut("u-stopping").unwrap();
        (&mut *h).await.unwrap();
        assert!(
            !pods.owned().contains("u-stopping"),
            "stopped: no longer kept"
        );
    }

    #[test]
    fn cache_writes_are_coalesced() {
        let mut c = CacheWrites::default();
        let t0 = Instant::now();
        assert!(!c.due(t0), "nothing changed");
        c.changed();
        assert!(c.due(t0));
        for _ in 0..100 {
            c.changed();
        }
        assert!(!c.due(t0 + Duration::from_millis(10)), "a burst waits");
        assert!(c.due(t0 + CACHE_EVERY), "and is one write");
        assert!(!c.due(t0 + 3 * CACHE_EVERY));
    }

    #[test]
    fn the_cache_is_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let node = Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        write_cache(d.path(), &cache_body(&node, &[]));
        let (n, pods) = load_cache(d.path()).unwrap();
        assert_eq!(n, node);
        assert!(pods.is_empty());
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["pods.json"], "no temporary file left");
    }

    #[test]
    fn relists_back_off_with_jitter() {
        let mut r = Relist::default();
        let d: Vec<Duration> = (0..12).map(|_| r.next()).collect();
        assert!(d[0] >= Duration::from_millis(125) && d[0] <= Duration::from_millis(250));
        assert!(d[3] >= Duration::from_secs(1) && d[3] <= Duration::from_secs(2));
        assert!(d[11] >= Duration::from_secs(15) && d[11] <= Duration::from_secs(30));
        let spread: HashSet<Duration> = (0..20)
            .map(|_| {
                let mut r = Relist { failures: 5 };
                r.next()
            })
            .collect();
        assert!(spread.len() > 1, "delays differ between agents");
        r.reset();
        assert!(r.next() <= Duration::from_millis(250));
    }

    #[test]
    fn files_of_pods_that_are_gone_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let keep = pod("u-keep", "Running", None);
        let gone = pod("u-gone", "Running", None);
        for p in [&keep, &gone] {
            std::fs::create_dir_all(crate::pod::pod_dir(d.path(), p).join("volumes/data")).unwrap();
        }
        sweep_pod_dirs(d.path(), &HashSet::from(["u-keep".to_string()]));
        assert!(crate::pod::pod_dir(d.path(), &keep).exists());
        assert!(!crate::pod::pod_dir(d.path(), &gone).exists());
    }
}
