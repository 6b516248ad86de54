//! The `skiff` binary: argument parsing and output only. Every role is a subcommand.

#[cfg(not(feature = "system-alloc"))]
mod alloc;
mod commands;
mod print;
mod trim;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "skiff: a WebAssembly-first lightweight orchestrator"
)]
pub struct Cli {
    /// Kubeconfig to use (else KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, env = "SKIFF_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace (else the context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The API server's URL, or the URLs of several servers of one cluster separated by commas
    /// (tried in turn, the next one when the current one cannot be reached): for the verbs,
    /// instead of the kubeconfig's; for `agent`, the servers it joins and runs against.
    #[arg(short = 's', long, global = true, env = "SKIFF_SERVER")]
    pub server: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct ServerArgs {
    /// Where the store, token and kubeconfig live.
    #[arg(long, env = "SKIFF_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the API.
    #[arg(long, env = "SKIFF_API_ADDR", default_value = "127.0.0.1:6443")]
    pub api_addr: SocketAddr,
    /// How long a node's Lease and status may stand still before it is marked NotReady and
    /// tainted unreachable (`15s`, `1m`; a bare number is seconds).
    #[arg(long, alias = "node-grace-seconds", default_value = "15s", value_parser = parse_duration)]
    pub node_monitor_grace_period: std::time::Duration,
    /// The longest lifetime a requested ServiceAccount token gets: longer requests are
    /// shortened to it (`24h`; between 1 hour and 2^32 seconds; unset: no cap).
    #[arg(long, value_parser = parse_duration)]
    pub service_account_max_token_expiration: Option<std::time::Duration>,
    /// How long node certificates are valid (365 days; tests: `60s`).
    #[arg(long, default_value = "8760h", value_parser = parse_duration, hide = true)]
    pub node_cert_validity: std::time::Duration,
    /// `tolerationSeconds` new pods get for the `node.kubernetes.io/not-ready:NoExecute`
    /// taint unless they tolerate it themselves: how long they stay on a NotReady node.
    #[arg(long, default_value_t = 10)]
    pub default_not_ready_toleration_seconds: i64,
    /// The same for `node.kubernetes.io/unreachable:NoExecute` (a node gone silent).
    #[arg(long, default_value_t = 10)]
    pub default_unreachable_toleration_seconds: i64,
    /// Finished pods kept before the oldest are deleted (0: keep them all).
    #[arg(long, default_value_t = 12500)]
    pub terminated_pod_gc_threshold: usize,
    /// Seconds an Event is kept after it last happened (Kubernetes' `--event-ttl`).
    #[arg(long, default_value_t = 3600)]
    pub event_ttl_seconds: u64,
    /// Events kept at most, the oldest deleted first (0: no limit).
    #[arg(long, default_value_t = 5000)]
    pub max_events: usize,
    /// Prefix length of each node's pod network, cut from 10.88.0.0/16 (24: 253 pods a node).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(16..=28))]
    pub node_cidr_mask_size: u8,
    /// Open API connections at most (default: 10000, or less to stay below the open-file limit).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Open API connections at most from one client address.
    #[arg(long, default_value_t = skiff_control::apiserver::transport::MAX_CONNECTIONS_PER_CLIENT)]
    pub max_connections_per_client: usize,
    /// Requests per second one client (user, else address) may keep up before it is answered
    /// 429; `system:masters` is exempt and nodes have their own share.
    #[arg(long, default_value_t = skiff_control::apiserver::fairness::CLIENT_QPS)]
    pub client_qps: f64,
    /// Requests one client may send at once after a quiet spell.
    #[arg(long, default_value_t = skiff_control::apiserver::fairness::CLIENT_BURST)]
    pub client_burst: u32,
    /// Watches one client may hold open at once.
    #[arg(long, default_value_t = skiff_control::apiserver::fairness::MAX_WATCHES_PER_CLIENT)]
    pub max_watches_per_client: usize,
    /// How long a client has to complete the TLS handshake (default 10s; tests: short).
    #[arg(long, value_parser = parse_duration, hide = true)]
    pub tls_handshake_timeout: Option<std::time::Duration>,
    /// How long a client has to send a request's headers (default 32s).
    #[arg(long, value_parser = parse_duration, hide = true)]
    pub request_header_timeout: Option<std::time::Duration>,
    /// How long a client has to send a request's body (default 60s).
    #[arg(long, value_parser = parse_duration, hide = true)]
    pub request_body_timeout: Option<std::time::Duration>,
    /// How long a kept-alive connection may wait for its next request (default 90s).
    #[arg(long, value_parser = parse_duration, hide = true)]
    pub idle_connection_timeout: Option<std::time::Duration>,
    /// Record every authenticated request in this file, a JSON line each (time, user, groups,
    /// verb, resource, namespace, name, code).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Megabytes the audit log may hold before it is rotated to `PATH.1`.
    #[arg(long, default_value_t = 100)]
    pub audit_log_maxsize: u64,
    /// Rotated audit logs kept.
    #[arg(long, default_value_t = 3)]
    pub audit_log_maxbackup: usize,
    /// An etcd datastore shared by several servers, and the leader election among them.
    #[command(flatten)]
    pub datastore: Box<DatastoreArgs>,
}

#[derive(Args, Clone)]
pub struct DatastoreArgs {
    /// etcd client URLs, comma-separated (`http://10.0.0.1:2379,http://10.0.0.2:2379`): the
    /// store several servers share. Without it the embedded store in the data dir is used.
    #[arg(long, env = "SKIFF_DATASTORE_ENDPOINT", value_delimiter = ',')]
    pub datastore_endpoint: Vec<String>,
    /// How long to wait for the datastore at start (its members starting, no quorum yet)
    /// before giving up (`5m`); without it the server waits as long as it takes, retrying
    /// with backoff and logging a line every few seconds.
    #[arg(long, value_parser = parse_duration)]
    pub datastore_wait_timeout: Option<std::time::Duration>,
    /// CA certificate (PEM) that signed etcd's serving certificates.
    #[arg(long, env = "SKIFF_DATASTORE_CAFILE")]
    pub datastore_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "SKIFF_DATASTORE_CERTFILE")]
    pub datastore_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "SKIFF_DATASTORE_KEYFILE")]
    pub datastore_keyfile: Option<PathBuf>,
    /// The cluster token, the same on every server of a datastore: it seals the CA, the
    /// signing keys and the admin credentials the first server stores there.
    #[arg(long, env = "SKIFF_CLUSTER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With --datastore-endpoint: how long the controllers' Lease holds without renewal
    /// before another server takes it (Kubernetes' `--leader-elect-lease-duration`).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: std::time::Duration,
    /// How long the leader keeps trying to renew before it stops its controllers.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: std::time::Duration,
    /// How often candidates try to take the Lease, and the leader renews it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: std::time::Duration,
}

#[derive(Args, Clone)]
pub struct NodeArgs {
    /// Node name (default: the host name).
    #[arg(long, env = "SKIFF_NODE_NAME")]
    pub name: Option<String>,
    /// The node's InternalIP (NodePorts answer there).
    #[arg(long, env = "SKIFF_NODE_IP", default_value = "127.0.0.1")]
    pub node_ip: std::net::Ipv4Addr,
    /// Address of the agent's endpoint (logs) the API server connects to; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub agent_addr: SocketAddr,
    /// Registries reached over plain HTTP (loopback registries always are).
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Bridge for the pod network.
    #[arg(long, default_value = "skiff0")]
    pub bridge: String,
    /// Seconds between renewals of the node's Lease.
    #[arg(long, default_value_t = 4)]
    pub heartbeat_seconds: u64,
    /// The node Lease's duration, in seconds.
    #[arg(long, default_value_t = 15)]
    pub node_lease_duration_seconds: u64,
    /// Seconds between posts of the Node's status when nothing changed.
    #[arg(long, default_value_t = 60)]
    pub node_status_report_seconds: u64,
    /// Addresses node ports are opened on (0.0.0.0: every address of the node).
    #[arg(long, value_delimiter = ',', default_value = "0.0.0.0")]
    pub nodeport_addresses: Vec<std::net::IpAddr>,
    /// Interface that holds service ClusterIPs (created as a dummy interface; `lo` where the
    /// kernel has no dummy driver).
    #[arg(long, default_value = "skiff-svc0")]
    pub service_interface: String,
    /// Do not run the service proxy and cluster DNS in this agent.
    #[arg(long)]
    pub disable_proxy: bool,
    /// Run wasm pods only: no OCI containers on this node, even where runc is installed.
    #[arg(long)]
    pub disable_oci: bool,
    /// The runc binary for OCI containers (default: `runc` on PATH).
    #[arg(long)]
    pub runc: Option<std::path::PathBuf>,
    /// Where the CNI plugins (bridge, static, loopback, portmap) are.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin_dir: std::path::PathBuf,
    /// How pods reach pods on other nodes: host-gw (a route per node's pod CIDR via its
    /// InternalIP; nodes on one link) or vxlan (an overlay between the nodes' InternalIPs).
    #[arg(long, default_value = "host-gw")]
    pub pod_network: skiff_node::routes::PodNetworkMode,
    /// Seconds between checks of the node's certificates (renewed when a third of their
    /// validity is left); for tests.
    #[arg(long, default_value_t = 3600, hide = true)]
    pub cert_check_seconds: u64,
}

// Parsed once per process: the size of the server's and agent's flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Run the control plane (API server, store, scheduler, controllers).
    Server(ServerArgs),
    /// Run the control plane and a node agent in one process: a single-node cluster.
    Up {
        #[command(flatten)]
        server: Box<ServerArgs>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Run a node agent that joins a control plane.
    Agent(AgentArgs),
    /// Stop every OCI container a stopped node agent (or `skiff up`) left running, and remove
    /// their root filesystems and pod networks. Containers outlive their agent, as with any
    /// kubelet; this is the clean-up for a node taken out of service.
    Reset {
        /// The data dir given to `skiff up` or `skiff agent`.
        #[arg(long, env = "SKIFF_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Publish a wasm module or component to an OCI registry (CNCF wasm layout).
    Push {
        file: PathBuf,
        /// REGISTRY/REPO:TAG
        reference: String,
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
    },
    /// Display one or many resources (TYPE[,TYPE...] [NAME]).
    Get(GetArgs),
    /// Show details of a resource, with its events.
    Describe { kind: String, name: String },
    /// Create a resource from a file or with a generator.
    Create {
        #[command(subcommand)]
        what: Option<CreateWhat>,
        #[arg(short = 'f', long)]
        filename: Vec<String>,
    },
    /// Run a pod.
    Run(RunArgs),
    /// Expose a deployment, pod or service as a new Service.
    Expose(ExposeArgs),
    /// Set the replicas of a deployment or replica set.
    Scale {
        target: Vec<String>,
        #[arg(long)]
        replicas: i64,
    },
    /// Set fields: `set image TYPE/NAME CONTAINER=IMAGE...`.
    Set {
        #[command(subcommand)]
        what: SetWhat,
    },
    /// Manage a rollout: status, history, undo.
    Rollout {
        #[command(subcommand)]
        what: RolloutWhat,
    },
    /// Create or update resources from files (multi-document YAML, a directory, or - for stdin).
    Apply {
        #[arg(short = 'f', long, required = true)]
        filename: Vec<String>,
    },
    /// Delete resources by type and name, or from files.
    Delete(DeleteArgs),
    /// Add, change (--overwrite) or remove (key-) labels.
    Label {
        kind: String,
        name: String,
        labels: Vec<String>,
        #[arg(long)]
        overwrite: bool,
    },
    /// Add or remove (key:Effect-) taints on a node.
    Taint {
        /// Always "nodes" (or "node").
        kind: String,
        name: String,
        taints: Vec<String>,
    },
    /// Mark a node unschedulable: no new pods go there.
    Cordon { node: String },
    /// Mark a node schedulable again.
    Uncordon { node: String },
    /// Cordon a node and evict its pods (through the eviction API), waiting until they are gone.
    Drain(DrainArgs),
    /// Print a pod's container logs (served by the node through the API server); `job/NAME`
    /// prints those of the Job's first pod.
    Logs(LogsArgs),
    /// Run a command in a pod's OCI container: `skiff exec POD [-c C] [-i] [-t] -- CMD [ARG...]`.
    /// Exits with the command's exit code.
    Exec(ExecArgs),
    /// Manage join tokens (what `skiff agent --token` takes).
    Token {
        #[command(subcommand)]
        what: TokenWhat,
    },
    /// Show where the control plane is.
    ClusterInfo,
    /// Print client and server versions.
    Version,
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
}

// The arguments of the subcommands that take many; the help text of each subcommand is the
// doc comment of its `Command` variant.

#[derive(Args)]
pub struct AgentArgs {
    /// The join token: the server's `DATA/node-token`, or one from `skiff token create`
    /// (`K10<CA hash>::<credential>`). The agent checks the server's CA against the hash
    /// before sending it, then runs with a node certificate of its own. With --ca-cert it
    /// may also be a plain admin token.
    #[arg(long, env = "SKIFF_TOKEN")]
    pub token: String,
    /// The cluster CA certificate (PEM), from the server's data dir (instead of fetching
    /// it from the server and checking it against the token's hash).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Where the agent keeps images, compiled code, logs and its pod cache.
    #[arg(long, env = "SKIFF_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Args)]
pub struct GetArgs {
    pub types: String,
    pub names: Vec<String>,
    #[arg(short = 'o', long)]
    pub output: Option<String>,
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    #[arg(long)]
    pub field_selector: Option<String>,
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    #[arg(short = 'w', long)]
    pub watch: bool,
    #[arg(long)]
    pub show_labels: bool,
}

#[derive(Args)]
pub struct RunArgs {
    pub name: String,
    #[arg(long)]
    pub image: String,
    #[arg(long, default_value = "Always")]
    pub restart: String,
    #[arg(long)]
    pub port: Option<i32>,
    /// Treat the arguments after -- as the command, not args.
    #[arg(long)]
    pub command: bool,
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Args)]
pub struct ExposeArgs {
    /// TYPE/NAME or TYPE NAME.
    pub target: Vec<String>,
    #[arg(long = "type", default_value = "ClusterIP")]
    pub service_type: String,
    #[arg(long)]
    pub port: Option<i32>,
    #[arg(long)]
    pub target_port: Option<String>,
    #[arg(long)]
    pub node_port: Option<i32>,
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Args)]
pub struct DeleteArgs {
    pub args: Vec<String>,
    #[arg(short = 'f', long)]
    pub filename: Vec<String>,
    #[arg(long)]
    pub cascade: Option<String>,
    #[arg(long)]
    pub grace_period: Option<i64>,
    #[arg(long)]
    pub ignore_not_found: bool,
}

#[derive(Args)]
pub struct DrainArgs {
    pub node: String,
    /// Leave DaemonSet pods (they would come back at once).
    #[arg(long)]
    pub ignore_daemonsets: bool,
    /// Evict pods with emptyDir volumes too (their data is lost).
    #[arg(long)]
    pub delete_emptydir_data: bool,
    /// Evict pods no controller will replace too.
    #[arg(long)]
    pub force: bool,
    /// Give up after this long (`0s`: wait for ever).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Args)]
pub struct LogsArgs {
    pub pod: String,
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[arg(long)]
    pub tail: Option<i64>,
    #[arg(short = 'p', long)]
    pub previous: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    pub pod: String,
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Pass standard input to the command.
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// Run the command on a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand)]
pub enum TokenWhat {
    /// Create a join token and print it.
    Create {
        /// How long it can be used to join (e.g. 24h, 30m; 0: never expires).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens.
    List,
    /// Delete join tokens by ID.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum CreateWhat {
    /// A deployment with the given image(s).
    Deployment {
        name: String,
        #[arg(long, required = true)]
        image: Vec<String>,
        #[arg(long)]
        port: Option<i32>,
        #[arg(long, default_value_t = 1)]
        replicas: i32,
    },
    /// A Job: `create job NAME --image=IMG [-- CMD...]` or `create job NAME --from=cronjob/X`.
    Job {
        name: String,
        #[arg(long, required_unless_present = "from")]
        image: Option<String>,
        /// `cronjob/NAME`: a Job from that CronJob's template.
        #[arg(long, conflicts_with = "image")]
        from: Option<String>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// A CronJob: `create cronjob NAME --image=IMG --schedule="*/1 * * * *" [-- CMD...]`.
    #[command(name = "cronjob", visible_alias = "cj")]
    CronJob {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        schedule: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// A namespace.
    Namespace { name: String },
    /// A service: `create service clusterip|nodeport|loadbalancer NAME --tcp=PORT[:TARGET]`
    /// (selects pods labelled app=NAME, as kubectl's does).
    Service {
        /// clusterip, nodeport or loadbalancer.
        kind: String,
        name: String,
        /// PORT or PORT:TARGETPORT; repeat for several ports.
        #[arg(long, required = true)]
        tcp: Vec<String>,
        /// The node port (nodeport and loadbalancer; default: allocated).
        #[arg(long)]
        node_port: Option<i32>,
    },
}

#[derive(Subcommand)]
pub enum SetWhat {
    /// Update container images: TYPE/NAME CONTAINER=IMAGE...
    Image { target: String, pairs: Vec<String> },
}

#[derive(Subcommand)]
pub enum RolloutWhat {
    /// Watch a rollout until it completes.
    Status {
        target: String,
        /// Seconds to wait (0: forever).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
    /// List revisions.
    History { target: String },
    /// Roll back to the previous (or a given) revision.
    Undo {
        target: String,
        #[arg(long)]
        to_revision: Option<i64>,
    },
}

/// A duration as Kubernetes' flags take them: `15s`, `1m`, `500ms`, `1m30s`; a bare number
/// is seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(n));
    }
    let bad = || format!("invalid duration {s:?} (use e.g. 15s, 1m, 500ms)");
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit] {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n * 60),
            "h" => std::time::Duration::from_secs(n * 3600),
            _ => return Err(bad()),
        };
        rest = &rest[unit..];
    }
    Ok(total)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SKIFF_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SKIFF_LOG_FORMAT").is_ok_and(|v| v == "json");
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// A client command whose reader goes away (`skiff get pods | head -1`) ends quietly, as
/// `ls` does, instead of panicking on the closed pipe (Rust ignores SIGPIPE by default).
/// Not for the server, agent or proxy: they must outlive peers that close their sockets.
fn end_quietly_on_closed_stdout() {
    // SAFETY: restores the default action of one signal, before any thread is started.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Threads of the blocking pool (store work, request authorization, flush waits) at most.
/// Every thread that ever allocated keeps allocator pages of its own, and an idle one gives
/// back nothing: a burst of pods grew tokio's default pool (512) to over a hundred threads
/// that the periodic work of an idle node then kept alive, and the memory they held stayed
/// in the RSS after the pods were gone.
const MAX_BLOCKING_THREADS: usize = 32;

/// An idle blocking thread exits after this long (tokio's default is 10 s), and the
/// allocator pages it held go with it.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// The process's runtime: the default multi-threaded one with the blocking pool bounded.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Server(_) | Command::Up { .. } | Command::Agent(_)
    ) {
        init_tracing();
    } else {
        end_quietly_on_closed_stdout();
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A burst of blocking work runs on at most `MAX_BLOCKING_THREADS` threads; the rest
    /// waits its turn instead of growing the pool.
    #[test]
    fn blocking_pool_is_bounded() {
        let rt = super::runtime().unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let tasks: Vec<_> = (0..3 * super::MAX_BLOCKING_THREADS)
                .map(|_| {
                    let (running, most) = (running.clone(), most.clone());
                    tokio::task::spawn_blocking(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let most = most.load(Ordering::SeqCst);
        assert!(
            most <= super::MAX_BLOCKING_THREADS,
            "{most} blocking tasks ran at once"
        );
    }

    #[test]
    fn durations_as_kubernetes_flags_take_them() {
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("s").is_err());
    }
}
