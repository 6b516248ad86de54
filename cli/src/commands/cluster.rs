//! Running and operating the cluster: `server`, `up`, `agent`, `push`, `token`, `cordon`, `drain`.

use skiff_api::k8s::api::core::v1::{Node, Pod};
use skiff_client::{ListParams, Patch};

use super::*;

pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "skiff-node".into())
}

pub(super) fn agent_config(dir: std::path::PathBuf, node: &NodeArgs) -> skiff_node::AgentConfig {
    let mut c = skiff_node::AgentConfig::new(&node.name.clone().unwrap_or_else(host_name), dir);
    c.node_ip = node.node_ip;
    c.listen = node.agent_addr;
    c.insecure_registries = node.insecure_registries.clone();
    c.bridge = node.bridge.clone();
    c.heartbeat.renew_every = Duration::from_secs(node.heartbeat_seconds.max(1));
    c.heartbeat.lease_duration = Duration::from_secs(node.node_lease_duration_seconds.max(1));
    c.heartbeat.status_every = Duration::from_secs(node.node_status_report_seconds.max(1));
    c.proxy = !node.disable_proxy;
    c.nodeport_addresses = node.nodeport_addresses.clone();
    c.service_interface = node.service_interface.clone();
    c.oci = !node.disable_oci;
    c.runc = node.runc.clone();
    c.cni_bin_dir = node.cni_bin_dir.clone();
    c.pod_network = node.pod_network;
    c.cert_check_every = Duration::from_secs(node.cert_check_seconds.max(1));
    c
}

pub(super) async fn until_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Where `skiff up` keeps the server's files under its data dir.
pub(super) fn server_dir_of(dir: &Path) -> std::path::PathBuf {
    dir.join("server")
}

/// `skiff server`, or with `node` set, `skiff up` (server and agent in one process).
pub(super) async fn server(args: ServerArgs, node: Option<NodeArgs>) -> Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    let server_dir = if node.is_some() {
        server_dir_of(&dir)
    } else {
        dir.clone()
    };
    let mut config = skiff_control::server::ServerConfig::new(server_dir, args.api_addr);
    config.controllers.node_grace = args.node_monitor_grace_period;
    config.cluster.default_not_ready_toleration_seconds = args.default_not_ready_toleration_seconds;
    config.cluster.default_unreachable_toleration_seconds =
        args.default_unreachable_toleration_seconds;
    config.controllers.terminated_pod_gc_threshold = args.terminated_pod_gc_threshold;
    config.controllers.event_ttl = Duration::from_secs(args.event_ttl_seconds);
    config.controllers.max_events = args.max_events;
    config.cluster.node_cidr_mask = args.node_cidr_mask_size;
    config.node_cert_validity = args.node_cert_validity;
    if let Some(max) = args.service_account_max_token_expiration {
        // As the kube-apiserver checks the flag.
        anyhow::ensure!(
            (3600..=1u64 << 32).contains(&max.as_secs()),
            "--service-account-max-token-expiration must be between 1 hour and 2^32 seconds"
        );
        config.service_account_max_token_expiration = Some(max);
    }
    {
        use skiff_control::apiserver::transport as t;
        config.transport = t::TransportConfig {
            tls_handshake_timeout: args
                .tls_handshake_timeout
                .unwrap_or(t::TLS_HANDSHAKE_TIMEOUT),
            request_header_timeout: args
                .request_header_timeout
                .unwrap_or(t::REQUEST_HEADER_TIMEOUT),
            request_body_timeout: args.request_body_timeout.unwrap_or(t::REQUEST_BODY_TIMEOUT),
            idle_timeout: args
                .idle_connection_timeout
                .unwrap_or(t::IDLE_CONNECTION_TIMEOUT),
            max_connections: args.max_connections,
            max_connections_per_client: args.max_connections_per_client,
        };
    }
    config.fairness.client_qps = args.client_qps;
    config.fairness.client_burst = args.client_burst;
    config.fairness.max_watches_per_client = args.max_watches_per_client;
    config.audit = args
        .audit_log
        .map(|path| skiff_control::apiserver::audit::AuditConfig {
            path,
            max_bytes: args.audit_log_maxsize << 20,
            max_backups: args.audit_log_maxbackup,
        });
    if let Some(n) = &node {
        config.tls_sans.push(n.node_ip.to_string());
    }
    let ds = *args.datastore;
    if !ds.datastore_endpoint.is_empty() {
        let Some(token) = ds.token.filter(|t| !t.is_empty()) else {
            anyhow::bail!(
                "--datastore-endpoint needs --token: the cluster token every server shares"
            );
        };
        let mut etcd = skiff_control::store::etcd::EtcdConfig::new(ds.datastore_endpoint.clone());
        etcd.ca_file = ds.datastore_cafile;
        etcd.cert_file = ds.datastore_certfile;
        etcd.key_file = ds.datastore_keyfile;
        let mut datastore = skiff_control::server::DatastoreConfig::new(etcd, token);
        datastore.wait_timeout = ds.datastore_wait_timeout;
        config.datastore = Some(datastore);
        config.leader_election.lease_duration = ds.leader_elect_lease_duration;
        config.leader_election.renew_deadline = ds.leader_elect_renew_deadline;
        config.leader_election.retry_period = ds.leader_elect_retry_period;
    }
    let mut server = skiff_control::server::Server::start(config).await?;
    if node.is_some() {
        // The kubeconfig also at the top of the data dir, where users look for it.
        std::fs::copy(&server.kubeconfig, dir.join("kubeconfig"))
            .context("writing the kubeconfig")?;
        // And the join token other nodes' agents take (`skiff agent --token`).
        std::fs::copy(
            server_dir_of(&dir).join("node-token"),
            dir.join("node-token"),
        )
        .context("writing the node token")?;
    }
    eprintln!(
        "skiff API server listening on https://{} (kubeconfig: {})",
        server.addr,
        dir.join("kubeconfig").display()
    );
    let agent = match node {
        Some(n) => {
            // The local node joins like any other: with the node token, as system:node:NAME.
            let config = agent_config(dir.join("agent"), &n);
            let client = skiff_node::join::join(
                &format!("https://{}", server.addr),
                &server.node_token,
                Some(server.ca_pem.clone()),
                &config.data_dir,
                &config.name,
                config.node_ip,
            )
            .await?;
            let a = skiff_node::Agent::start(client, config).await?;
            eprintln!("skiff node {} ready", a.name);
            Some(a)
        }
        None => None,
    };
    tokio::select! {
        r = until_signal() => r?,
        r = server.wait() => return r.map_err(Into::into),
    }
    if let Some(a) = agent {
        a.shutdown().await;
    }
    server.shutdown().await?;
    Ok(())
}

/// `skiff agent`: joins the control plane (`server`: one URL or several, comma-separated) with
/// the token, then runs the node until a signal.
pub(super) async fn join_and_run_agent(server: &str, args: AgentArgs) -> Result<()> {
    let ca = match &args.ca_cert {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let dir = args
        .data_dir
        .unwrap_or_else(|| default_data_dir().join("agent"));
    let name = args.node.name.clone().unwrap_or_else(host_name);
    // The CA is checked against the token before the token is sent anywhere.
    let client =
        skiff_node::join::join(server, &args.token, ca, &dir, &name, args.node.node_ip).await?;
    agent(client, dir, args.node).await
}

async fn agent(client: Client, dir: std::path::PathBuf, node: NodeArgs) -> Result<()> {
    let a = skiff_node::Agent::start(client, agent_config(dir, &node)).await?;
    eprintln!("skiff node {} ready", a.name);
    until_signal().await?;
    a.shutdown().await;
    Ok(())
}

pub(super) async fn push(file: &Path, reference: &str, insecure: &[String]) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let size = bytes.len() as u64;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!(
        "pushing {} ({} KiB) to {reference}",
        file.display(),
        size / 1024
    ));
    bar.enable_steady_tick(Duration::from_millis(100));
    let url = skiff_registry::push_wasm(bytes, reference, insecure).await;
    bar.finish_and_clear();
    let url = url?;
    println!(
        "pushed {} ({size} bytes) to {reference}: {url}",
        file.display()
    );
    Ok(())
}

/// `skiff reset`: stops and removes the OCI containers an agent (or `skiff up`) left behind.
pub(super) async fn reset(data_dir: Option<std::path::PathBuf>) -> Result<()> {
    let dir = data_dir.unwrap_or_else(default_data_dir);
    let mut stopped = 0;
    // An agent's own dir, or the one `skiff up` keeps its agent in.
    for d in [dir.clone(), dir.join("agent")] {
        stopped += skiff_node::oci::reset(&d)
            .await
            .map_err(|e| anyhow::anyhow!("reset {}: {e}", d.display()))?;
    }
    println!("{stopped} container(s) stopped and removed");
    Ok(())
}

/// A pod's namespace and name.
fn ns_name(p: &Pod) -> (&str, &str) {
    let m = &p.metadata;
    (
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or_default(),
    )
}

impl DrainArgs {
    /// What `drain` may evict, from its flags.
    pub(super) fn options(&self) -> DrainOptions {
        DrainOptions {
            ignore_daemonsets: self.ignore_daemonsets,
            delete_emptydir_data: self.delete_emptydir_data,
            force: self.force,
        }
    }
}

/// What `drain` may evict.
#[derive(Debug, Clone, Default)]
pub struct DrainOptions {
    pub ignore_daemonsets: bool,
    pub delete_emptydir_data: bool,
    pub force: bool,
}

/// What `drain` does with one pod on the node, as kubectl's filters decide.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainAction {
    Evict,
    /// Left alone (a DaemonSet's pod with `--ignore-daemonsets`, or already finished).
    Skip,
    /// Stops the drain, with the reason.
    Refuse(String),
}

pub(super) fn drain_action(pod: &Pod, opts: &DrainOptions) -> DrainAction {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if pod.metadata.deletion_timestamp.is_some() {
        return DrainAction::Evict;
    }
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return DrainAction::Skip;
    }
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match owner {
        Some(o) if o.kind == "DaemonSet" => {
            return if opts.ignore_daemonsets {
                DrainAction::Skip
            } else {
                DrainAction::Refuse(
                    "cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore)"
                        .into(),
                )
            };
        }
        None if !opts.force => {
            return DrainAction::Refuse(
                "cannot delete Pods that declare no controller (use --force to override)".into(),
            )
        }
        _ => {}
    }
    let empty_dir = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|vs| vs.iter().any(|v| v.empty_dir.is_some()));
    if empty_dir && !opts.delete_emptydir_data {
        return DrainAction::Refuse(
            "cannot delete Pods with local storage (use --delete-emptydir-data to override)".into(),
        );
    }
    DrainAction::Evict
}

impl Ctx {
    /// `skiff token create|list|delete`: join tokens as bootstrap token Secrets.
    pub(super) async fn token(&self, what: TokenWhat) -> Result<()> {
        use skiff_client::token;
        let secrets = resource("secrets")?;
        match what {
            TokenWhat::Create { ttl, description } => {
                let ttl = token::parse_ttl(&ttl).map_err(|e| anyhow!("--ttl: {e}"))?;
                // The CA as the server hands it to joining agents: its hash goes in the token.
                let ca = self
                    .client
                    .get_raw("/cacerts")
                    .await?
                    .text()
                    .await
                    .context("reading the cluster CA")?;
                let (id, secret) = token::generate();
                let obj = token::secret(&id, &secret, ttl, chrono::Utc::now(), &description);
                self.client
                    .create_dyn(secrets, Some(token::NAMESPACE), &obj)
                    .await?;
                println!("{}", token::format_token(&ca, &id, &secret));
            }
            TokenWhat::List => {
                let list = self
                    .client
                    .list_dyn(secrets, Some(token::NAMESPACE), None, None)
                    .await?;
                let now = chrono::Utc::now();
                let mut rows = vec![["ID", "TTL", "EXPIRES", "DESCRIPTION"]
                    .map(String::from)
                    .to_vec()];
                rows.extend(
                    list["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| token::row(s, now))
                        .map(|r| r.to_vec()),
                );
                print::print_rows(&rows);
            }
            TokenWhat::Delete { ids } => {
                for id in ids {
                    self.client
                        .delete_dyn(
                            secrets,
                            Some(token::NAMESPACE),
                            &token::secret_name(&id),
                            None,
                            None,
                        )
                        .await
                        .map_err(|e| match e.code() {
                            Some(404) => anyhow!("join token {id} not found"),
                            _ => e.into(),
                        })?;
                    println!("join token {id} deleted");
                }
            }
        }
        Ok(())
    }

    /// `skiff cluster-info`.
    pub(super) async fn cluster_info(&self) -> Result<()> {
        self.client.get_path("/version").await?;
        println!(
            "Kubernetes control plane is running at {}",
            self.client.server()
        );
        Ok(())
    }

    /// `skiff version`: this binary's and the server's.
    pub(super) async fn version(&self) -> Result<()> {
        println!("Client Version: v{}", env!("CARGO_PKG_VERSION"));
        let v = self.client.get_path("/version").await?;
        println!(
            "Server Version: {}",
            v["gitVersion"].as_str().unwrap_or("unknown")
        );
        Ok(())
    }

    pub(super) async fn cordon(&self, node: &str, on: bool) -> Result<()> {
        let cur = self.client.get::<Node>(None, node).await?;
        let was = cur.spec.and_then(|s| s.unschedulable) == Some(true);
        let word = if on { "cordoned" } else { "uncordoned" };
        if was == on {
            println!("node/{node} already {word}");
            return Ok(());
        }
        let value = if on { json!(true) } else { Value::Null };
        let patch = Patch::Merge(json!({"spec": {"unschedulable": value}}));
        self.client.patch::<Node>(None, node, &patch).await?;
        println!("node/{node} {word}");
        Ok(())
    }

    pub(super) async fn drain(
        &self,
        node: &str,
        opts: &DrainOptions,
        timeout: Duration,
    ) -> Result<()> {
        self.cordon(node, true).await?;
        let on_node = ListParams::fields(&format!("spec.nodeName={node}"));
        let pods = self.client.list::<Pod>(None, &on_node).await?.items;
        let mut evict = Vec::new();
        let mut refused = Vec::new();
        for p in &pods {
            let (ns, name) = ns_name(p);
            let who = format!("{ns}/{name}");
            match drain_action(p, opts) {
                DrainAction::Evict => evict.push(p.clone()),
                DrainAction::Skip => {
                    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                    if !matches!(phase, Some("Succeeded" | "Failed")) {
                        println!("Warning: ignoring DaemonSet-managed Pods: {who}");
                    }
                }
                DrainAction::Refuse(why) => refused.push(format!("{why}: {who}")),
            }
        }
        if !refused.is_empty() {
            bail!("cannot drain node {node:?}: {}", refused.join("; "));
        }
        let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
        let out_of_time = |what: &str| -> Result<()> {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                bail!("drain did not complete within {timeout:?}: {what}");
            }
            Ok(())
        };
        for p in &evict {
            let (ns, name) = ns_name(p);
            println!("evicting pod {ns}/{name}");
            loop {
                match self.client.evict(ns, name).await {
                    Ok(_) => break,
                    Err(e) if e.code() == Some(404) => break,
                    // A disruption budget holds it: try again, as kubectl does.
                    Err(e) if e.code() == Some(429) => {
                        println!(
                            "error when evicting pods/{name} -n {ns} (will retry after 5s): {e}"
                        );
                        out_of_time(&format!("evicting pod {ns}/{name}"))?;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for p in &evict {
            let (ns, name) = ns_name(p);
            loop {
                match self.client.get::<Pod>(Some(ns), name).await {
                    Err(e) if e.code() == Some(404) => break,
                    Ok(cur) if cur.metadata.uid != p.metadata.uid => break,
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                }
                out_of_time(&format!("pod {ns}/{name} is still there"))?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            println!("pod/{name} evicted");
        }
        println!("node/{node} drained");
        Ok(())
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    fn pod(owner: Option<&str>, volumes: Value) -> Pod {
        serde_json::from_value(pod_json(owner, volumes)).unwrap()
    }

    fn pod_json(owner: Option<&str>, volumes: Value) -> Value {
        let mut p = json!({"metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c"}], "volumes": volumes}, "status": {"phase": "Running"}});
        if let Some(kind) = owner {
            p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind, "name": "o", "uid": "u", "controller": true}]);
        }
        p
    }

    #[test]
    fn drain_follows_kubectls_filters() {
        let none = DrainOptions::default();
        let all = DrainOptions {
            ignore_daemonsets: true,
            delete_emptydir_data: true,
            force: true,
        };
        assert_eq!(
            drain_action(&pod(Some("ReplicaSet"), json!([])), &none),
            DrainAction::Evict
        );
        assert!(matches!(
            drain_action(&pod(Some("DaemonSet"), json!([])), &none),
            DrainAction::Refuse(_)
        ));
        assert_eq!(
            drain_action(&pod(Some("DaemonSet"), json!([])), &all),
            DrainAction::Skip
        );
        assert!(matches!(
            drain_action(&pod(None, json!([])), &none),
            DrainAction::Refuse(_)
        ));
        assert_eq!(
            drain_action(&pod(None, json!([])), &all),
            DrainAction::Evict
        );
        let scratch = json!([{"name": "tmp", "emptyDir": {}}]);
        assert!(matches!(
            drain_action(&pod(Some("ReplicaSet"), scratch.clone()), &none),
            DrainAction::Refuse(_)
        ));
        assert_eq!(
            drain_action(&pod(Some("ReplicaSet"), scratch), &all),
            DrainAction::Evict
        );
        let mut done = pod_json(None, json!([]));
        done["status"]["phase"] = json!("Succeeded");
        let done: Pod = serde_json::from_value(done).unwrap();
        assert_eq!(drain_action(&done, &none), DrainAction::Skip);
    }
}
