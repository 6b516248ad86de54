//! `skiff server`: opens the store, bootstraps the cluster objects, writes the kubeconfig,
//! starts the controllers and the scheduler, and serves the API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use skiff_api::{ApiError, Resource};
use tokio::sync::watch;

use crate::apiserver::{self, ApiState};
use crate::controllers::{self, ControllerConfig};
use crate::registry::{ClusterConfig, Registry, WriteOptions};
use crate::store::{etcd::EtcdStore, sqlite::SqliteStore, DynStore};

/// Everything `skiff server` is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub cluster: ClusterConfig,
    pub controllers: ControllerConfig,
    /// Extra names and addresses the API certificate is valid for.
    pub tls_sans: Vec<String>,
    /// How long node certificates are valid (365 days; tests make it seconds).
    pub node_cert_validity: Duration,
    /// The longest lifetime of a requested ServiceAccount token
    /// (`--service-account-max-token-expiration`); None: no cap below 2^32 seconds.
    pub service_account_max_token_expiration: Option<Duration>,
    /// The API's timeouts and connection caps.
    pub transport: crate::apiserver::transport::TransportConfig,
    /// Each client's share of requests and watches.
    pub fairness: crate::apiserver::fairness::FairnessConfig,
    /// The audit log, if requests are to be recorded.
    pub audit: Option<crate::apiserver::audit::AuditConfig>,
    /// An external datastore shared with other servers (None: the embedded store in the data dir).
    pub datastore: Option<DatastoreConfig>,
    /// With a datastore: the Lease that elects the one server running the controllers.
    pub leader_election: crate::leader::LeaderElectionConfig,
}

/// An etcd cluster several servers share, and the token that seals what they must share.
#[derive(Debug, Clone)]
pub struct DatastoreConfig {
    pub etcd: crate::store::etcd::EtcdConfig,
    /// The cluster token: every server of the cluster is started with the same one.
    pub token: String,
    /// How long a server waits for the datastore (no quorum yet, no member up) before it
    /// gives up; None: it waits as long as it takes, retrying with backoff and saying so.
    pub wait_timeout: Option<Duration>,
    /// The renewal of this server's endpoint lease (the `kubernetes` Service's Endpoints).
    pub endpoint_leases: crate::masterleases::RenewConfig,
}

impl DatastoreConfig {
    pub fn new(etcd: crate::store::etcd::EtcdConfig, token: String) -> Self {
        DatastoreConfig {
            etcd,
            token,
            wait_timeout: None,
            endpoint_leases: Default::default(),
        }
    }
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, api_addr: SocketAddr) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            api_addr,
            cluster: ClusterConfig::default(),
            controllers: ControllerConfig::default(),
            tls_sans: Vec::new(),
            node_cert_validity: crate::tls::NODE_CERT_VALIDITY,
            service_account_max_token_expiration: None,
            transport: Default::default(),
            fairness: Default::default(),
            audit: None,
            datastore: None,
            leader_election: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the datastore did not answer within {waited:?}: {last}")]
    DatastoreTimeout { waited: Duration, last: String },
    #[error(transparent)]
    SharedState(#[from] crate::shared_state::SharedStateError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] ApiError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("serving the API: {0}")]
    Serve(std::io::Error),
}

/// A running control plane. Dropping the handle does not stop it; call [`Server::shutdown`].
pub struct Server {
    pub registry: Arc<Registry>,
    pub addr: SocketAddr,
    pub token: String,
    /// The join token of this server (`K10<CA hash>::node:<secret>`, also in `DIR/node-token`):
    /// enough for `skiff agent --token` to join, never an admin credential.
    pub node_token: String,
    pub kubeconfig: PathBuf,
    /// The cluster CA, PEM.
    pub ca_pem: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
    /// With a datastore: the renewal of this server's endpoint lease, which takes the server
    /// out of the `kubernetes` Endpoints when it stops.
    endpoints: Option<tokio::task::JoinHandle<()>>,
}

/// The bearer token of this data dir: made once, kept in `DIR/token`.
pub(crate) fn load_or_make_token(dir: &Path) -> Result<String, ServerError> {
    let path = dir.join("token");
    let io = |e| ServerError::DataDir {
        path: path.clone(),
        source: e,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            let t = format!("skiff-{}", uuid::Uuid::new_v4().simple());
            write_private(&path, t.as_bytes()).map_err(io)?;
            Ok(t)
        }
    }
}

/// The join token of this data dir, `K10<CA hash>::node:<secret>`: the secret is made once and
/// kept in `DIR/node-token` (mode 0600) with the hash of the current CA. Returns the token and
/// its secret.
pub(crate) fn load_or_make_node_token(
    dir: &Path,
    ca_hash: &str,
) -> Result<(String, String), ServerError> {
    let path = dir.join("node-token");
    let secret = std::fs::read_to_string(&path)
        .ok()
        .and_then(
            |t| match crate::apiserver::auth::parse_join_credential(t.trim()) {
                Some(crate::apiserver::auth::JoinCredential::Node(s)) => Some(s),
                _ => None,
            },
        )
        .unwrap_or_else(|| {
            format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            )
        });
    let token = format!("K10{ca_hash}::node:{secret}");
    if std::fs::read_to_string(&path)
        .ok()
        .as_deref()
        .map(str::trim)
        != Some(token.as_str())
    {
        write_private(&path, format!("{token}\n").as_bytes()).map_err(|e| {
            ServerError::DataDir {
                path: path.clone(),
                source: e,
            }
        })?;
    }
    Ok((token, secret))
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Binds the API's listening socket with a backlog for bursts of clients: a burst larger than
/// the kernel's queue would otherwise be accepted out of order, after SYN retransmits.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The kubeconfig both kubectl and the skiff CLI read.
pub fn kubeconfig_yaml(server_url: &str, token: &str, ca_pem: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {server_url}\n    certificate-authority-data: {ca}\nusers:\n- name: skiff-admin\n  user:\n    token: {token}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: skiff-admin\n    namespace: default\ncurrent-context: skiff\npreferences: {{}}\n"
    )
}

/// Creates `default`, `kube-system`, `kube-public`, `kube-node-lease`, the `kubernetes`
/// Service with its Endpoints and EndpointSlice, the default StorageClass `local-path`, the system priority
/// classes, the `wasmtime` and `runc` runtime classes and the default RBAC roles and
/// bindings, if missing.
pub fn bootstrap(reg: &Registry, api_addr: SocketAddr) -> Result<(), ApiError> {
    bootstrap_with(reg, api_addr, false)
}

/// As [`bootstrap`]; with `shared` (several servers on one datastore) the `kubernetes`
/// Endpoints are only made when missing: [`crate::masterleases`] keeps them listing every
/// live server.
pub fn bootstrap_with(reg: &Registry, api_addr: SocketAddr, shared: bool) -> Result<(), ApiError> {
    let ns = Resource::lookup("namespaces").expect("namespaces");
    let opts = WriteOptions::default();
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        if reg.try_get(ns, None, name)?.is_none() {
            reg.create(ns, None, json!({"metadata": {"name": name}}), &opts)?;
        }
    }
    let svc = Resource::lookup("services").expect("services");
    if reg.try_get(svc, Some("default"), "kubernetes")?.is_none() {
        let first = std::net::Ipv4Addr::from(u32::from(reg.config().service_cidr.0) + 1);
        reg.create(
            svc,
            Some("default"),
            json!({"metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                   "spec": {"clusterIP": first.to_string(), "ports": [{"name": "https", "port": 443, "targetPort": api_addr.port()}]}}),
            &opts,
        )?;
    }
    if reg.try_get(svc, Some("kube-system"), "kube-dns")?.is_none() {
        // Answered by the DNS server in every agent, at this address (like kube-dns' 10.96.0.10).
        let dns = std::net::Ipv4Addr::from(u32::from(reg.config().service_cidr.0) + 10);
        reg.create(
            svc,
            Some("kube-system"),
            json!({"metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true", "kubernetes.io/name": "skiff-dns"}},
                   "spec": {"clusterIP": dns.to_string(), "ports": [
                       {"name": "dns", "port": 53, "protocol": "UDP"},
                       {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}),
            &opts,
        )?;
    }
    // The default StorageClass: a directory on the node that first runs a claim's pod.
    let sc = Resource::lookup("storageclasses").expect("storageclasses");
    if reg.try_get(sc, None, "local-path")?.is_none() {
        reg.create(
            sc,
            None,
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                   "metadata": {"name": "local-path", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                   "provisioner": "skiff.dev/local-path", "reclaimPolicy": "Delete",
                   "volumeBindingMode": "WaitForFirstConsumer"}),
            &opts,
        )?;
    }
    // The system's priority classes, as Kubernetes creates them at start.
    let pc = Resource::lookup("priorityclasses").expect("priorityclasses");
    for (name, value) in skiff_api::validation::SYSTEM_PRIORITY_CLASSES {
        let description = if name == "system-node-critical" {
            "Used for system critical pods that must not be moved from their current node."
        } else {
            "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary."
        };
        create_missing(
            reg,
            pc,
            json!({"metadata": {"name": name}, "value": value, "description": description}),
        )?;
    }
    // A runtime class per runtime the agents have: `runtimeClassName` picks one. `wasm` is the
    // name manifests written for earlier releases use for wasmtime.
    let rc = Resource::lookup("runtimeclasses").expect("runtimeclasses");
    for (name, handler) in [
        ("wasmtime", "wasmtime"),
        ("runc", "runc"),
        ("wasm", "wasmtime"),
    ] {
        create_missing(
            reg,
            rc,
            json!({"metadata": {"name": name}, "handler": handler}),
        )?;
    }
    let ep = Resource::lookup("endpoints").expect("endpoints");
    let want = json!({"metadata": {"name": "kubernetes", "namespace": "default", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                      "subsets": [{"addresses": [{"ip": api_addr.ip().to_string()}], "ports": [{"name": "https", "port": api_addr.port(), "protocol": "TCP"}]}]});
    match reg.try_get(ep, Some("default"), "kubernetes")? {
        None => {
            reg.create(ep, Some("default"), want, &opts)?;
        }
        Some(cur) if !shared && cur.get("subsets") != want.get("subsets") => {
            let mut next = want;
            next["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
            reg.update(
                ep,
                Some("default"),
                "kubernetes",
                next,
                crate::registry::Sub::Main,
                &opts,
            )?;
        }
        Some(_) => {}
    }
    // Its EndpointSlices, as the kube-apiserver's reconciler writes them beside the Endpoints;
    // with several servers, `masterleases` keeps both listing every live one.
    let subsets = reg
        .try_get(ep, Some("default"), "kubernetes")?
        .and_then(|e| e.get("subsets").cloned())
        .unwrap_or_default();
    crate::masterleases::write_slices(reg, &subsets)?;
    crate::apiserver::policy::bootstrap(reg)
}

/// Creates a cluster-wide object unless one of its name exists (another server may have
/// created it first).
fn create_missing(reg: &Registry, r: &Resource, obj: serde_json::Value) -> Result<(), ApiError> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if reg.try_get(r, None, name)?.is_some() {
        return Ok(());
    }
    match reg.create(r, None, obj, &WriteOptions::default()) {
        Err(e) if e.code == 409 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// The embedded store in `dir`, or the datastore's, after the cluster's shared files were
/// brought into `dir` (see [`crate::shared_state`]). A datastore that does not answer yet (its
/// members starting, no quorum) is waited for, as k3s does: tried again with backoff, a log
/// line every few seconds, until it answers or `wait_timeout` has passed.
async fn open_store(
    dir: &Path,
    datastore: Option<&DatastoreConfig>,
) -> Result<DynStore, ServerError> {
    let key_file = dir.join("encryption.key");
    let Some(ds) = datastore else {
        return Ok(Arc::new(SqliteStore::open_with_key(
            &dir.join("store"),
            &key_file,
        )?));
    };
    let started = std::time::Instant::now();
    let mut failures = 0u32;
    let mut said: Option<std::time::Instant> = None;
    let store = loop {
        let (d, etcd, token) = (dir.to_path_buf(), ds.etcd.clone(), ds.token.clone());
        let attempt = tokio::task::spawn_blocking(move || -> Result<EtcdStore, ServerError> {
            let store = EtcdStore::connect(&etcd)?;
            crate::shared_state::sync(&d, &store, &token)?;
            Ok(store)
        })
        .await
        .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
        let error = match attempt {
            Ok(store) => break store,
            // Unreachable or without a quorum: wait. Anything else (a wrong token) is final.
            Err(
                e @ (ServerError::Store(_)
                | ServerError::SharedState(crate::shared_state::SharedStateError::Store(_))),
            ) => e,
            Err(e) => return Err(e),
        };
        let waited = started.elapsed();
        if ds.wait_timeout.is_some_and(|limit| waited >= limit) {
            return Err(ServerError::DatastoreTimeout {
                waited,
                last: error.to_string(),
            });
        }
        if said.is_none_or(|t| t.elapsed() >= DATASTORE_LOG_EVERY) {
            tracing::warn!(%error, waited = ?Duration::from_secs(waited.as_secs()), endpoints = ?ds.etcd.endpoints, "waiting for the datastore (etcd starting or without a quorum); retrying");
            said = Some(std::time::Instant::now());
        }
        failures += 1;
        let mut pause = datastore_backoff(failures);
        if let Some(limit) = ds.wait_timeout {
            pause = pause.min(limit.saturating_sub(waited));
        }
        tokio::time::sleep(pause).await;
    };
    if failures > 0 {
        tracing::info!(waited = ?started.elapsed(), "the datastore answers");
    }
    let encryption = crate::store::encryption::Encryption::load_or_create(&key_file)?;
    tracing::info!(endpoints = ?ds.etcd.endpoints, "using the etcd datastore");
    Ok(Arc::new(store.with_encryption(encryption)))
}

/// [`bootstrap_with`] on the blocking pool; with a datastore, retried while the datastore
/// fails (a quorum that came and went again) with the same pauses as [`open_store`].
async fn bootstrap_shared(
    reg: &Arc<Registry>,
    addr: SocketAddr,
    shared: bool,
) -> Result<(), ServerError> {
    let mut failures = 0u32;
    loop {
        let r = reg.clone();
        let result = tokio::task::spawn_blocking(move || bootstrap_with(&r, addr, shared))
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
        match result {
            Err(e) if shared && e.code >= 500 && failures < 60 => {
                failures += 1;
                tracing::warn!(error = %e.message, "bootstrapping the cluster objects failed; retrying");
                tokio::time::sleep(datastore_backoff(failures)).await;
            }
            other => return other.map_err(Into::into),
        }
    }
}

/// How often a server waiting for its datastore says so.
const DATASTORE_LOG_EVERY: Duration = Duration::from_secs(5);

/// The pause before the next attempt to reach the datastore: 250 ms doubling to 5 s, ±20 %.
fn datastore_backoff(failures: u32) -> Duration {
    use rand::Rng;
    Duration::from_millis(250)
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(Duration::from_secs(5))
        .mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

impl Server {
    /// Opens the store under `config.data_dir`, binds the API address and starts everything.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let dir = &config.data_dir;
        // Owner only: the store holds every Secret, and the CA's key and tokens lie beside it.
        crate::private_files::private_dir(dir)
            .and_then(|()| crate::private_files::restrict_files(dir))
            .map_err(|e| ServerError::DataDir {
                path: dir.clone(),
                source: e,
            })?;
        let store = open_store(dir, config.datastore.as_ref()).await?;
        let listener = listen(config.api_addr).map_err(|e| ServerError::Listen {
            addr: config.api_addr,
            source: e,
        })?;
        let addr = listener.local_addr().map_err(|e| ServerError::Listen {
            addr: config.api_addr,
            source: e,
        })?;
        let registry = Registry::new(store, config.cluster.clone());
        bootstrap_shared(&registry, addr, config.datastore.is_some()).await?;
        let token = load_or_make_token(dir)?;
        let mut sans = vec![addr.ip().to_string()];
        sans.extend(config.tls_sans.iter().cloned());
        let tls = crate::tls::load_or_create(dir, &sans)?;
        let (node_token, node_secret) = load_or_make_node_token(dir, &tls.ca.hash())?;
        let kubeconfig = dir.join("kubeconfig");
        write_private(
            &kubeconfig,
            kubeconfig_yaml(&format!("https://{addr}"), &token, &tls.ca_pem).as_bytes(),
        )
        .map_err(|e| ServerError::DataDir {
            path: kubeconfig.clone(),
            source: e,
        })?;
        let tls_ca = tls.ca_pem.clone();
        let mut state = ApiState::new(
            registry.clone(),
            &tls,
            vec![token.clone()],
            Some(node_secret),
            addr,
        );
        state.node_cert_validity = config.node_cert_validity;
        if let Some(max) = config.service_account_max_token_expiration {
            state.authenticator.tokens = Arc::new(crate::apiserver::tokens::TokenIssuer {
                max_expiration_seconds: Some(i64::try_from(max.as_secs()).unwrap_or(i64::MAX)),
                ..crate::apiserver::tokens::TokenIssuer::new(tls.service_account_key.clone())
            });
        }
        state.transport = config.transport.clone();
        state.fairness = crate::apiserver::fairness::Fairness::new(config.fairness.clone());
        if let Some(audit) = &config.audit {
            let log = crate::apiserver::audit::AuditLog::open(audit.clone()).map_err(|e| {
                ServerError::DataDir {
                    path: audit.path.clone(),
                    source: e,
                }
            })?;
            state.audit = Some(Arc::new(log));
        }
        let (stop, mut stopped) = watch::channel(false);
        let endpoints = config.datastore.as_ref().map(|ds| {
            tokio::spawn(crate::masterleases::run(
                registry.clone(),
                addr,
                ds.endpoint_leases.clone(),
                stop.subscribe(),
            ))
        });
        let mut controller_config = config.controllers.clone();
        controller_config.root_ca_pem = tls_ca.clone();
        let mut ctl = if config.datastore.is_some() {
            // Several servers share the datastore: only the Lease holder runs the controllers.
            let mut set = tokio::task::JoinSet::new();
            let reg = registry.clone();
            let roles = state.rbac.cluster_roles.clone();
            set.spawn(crate::leader::run(
                registry.clone(),
                config.leader_election.clone(),
                stop.subscribe(),
                move |led| {
                    controllers::start_sharing(
                        reg.clone(),
                        controller_config.clone(),
                        led,
                        Some(roles.clone()),
                    )
                },
            ));
            set
        } else {
            // The RBAC authorizer's cache of ClusterRoles is the aggregation controller's too.
            controllers::start_sharing(
                registry.clone(),
                controller_config,
                stop.subscribe(),
                Some(state.rbac.cluster_roles.clone()),
            )
        };
        // The RBAC authorizer's roles and bindings, listed before the first request.
        state
            .rbac
            .start(&registry, &stop.subscribe(), &mut ctl)
            .await;
        // The node authorizer's graph of pods.
        ctl.spawn(state.graph.clone().run(stop.subscribe()));
        let state = Arc::new(state);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let r = apiserver::serve(state, listener, tls.server, shutdown)
                .await
                .map_err(ServerError::Serve);
            ctl.abort_all();
            r
        });
        tracing::info!(%addr, kubeconfig = %kubeconfig.display(), "skiff API server ready");
        let ca_pem = tls_ca;
        Ok(Server {
            registry,
            addr,
            token,
            node_token,
            kubeconfig,
            ca_pem,
            stop,
            task,
            endpoints,
        })
    }

    /// Stops serving and the controllers; waits up to 5 s for open requests.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.stop.send(true);
        if let Some(endpoints) = self.endpoints {
            // Out of the kubernetes Endpoints before the API stops answering.
            let _ = tokio::time::timeout(Duration::from_secs(5), endpoints).await;
        }
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(r)) => r,
            _ => Ok(()),
        }
    }

    /// Waits until the server stops by itself (an error while serving).
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Serve(std::io::Error::other(e))),
        }
    }
}
