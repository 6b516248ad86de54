//! The verbs: each turns parsed arguments into API calls through `skiff_client`.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use skiff_api::{meta, Resource};
use skiff_client::{verbs, Client};

use crate::print::{self, Format};
use crate::{Cli, Command, CreateWhat, NodeArgs, RolloutWhat, ServerArgs, SetWhat, TokenWhat};

const SMP: &str = "application/strategic-merge-patch+json";
const MERGE: &str = "application/merge-patch+json";

fn resource(name: &str) -> Result<&'static Resource> {
    Resource::lookup(name)
        .ok_or_else(|| anyhow!("the server doesn't have a resource type \"{name}\""))
}

/// `TYPE/NAME` or `TYPE NAME`.
fn target(parts: &[String]) -> Result<(&'static Resource, String)> {
    match parts {
        [one] => match one.split_once('/') {
            Some((t, n)) => Ok((resource(t)?, n.to_string())),
            None => bail!("you must specify the resource as TYPE/NAME or TYPE NAME (got {one:?})"),
        },
        [t, n] => Ok((resource(t)?, n.clone())),
        _ => bail!("you must specify one resource as TYPE/NAME or TYPE NAME"),
    }
}

fn default_data_dir() -> std::path::PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".local/share/skiff"),
        None => std::path::PathBuf::from("/var/lib/skiff"),
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Server(args) => return server(args.clone(), None).await,
        Command::Up { server: s, node } => return server(s.clone(), Some(node.clone())).await,
        Command::Agent {
            server,
            token,
            ca_cert,
            data_dir,
            node,
        } => {
            let ca = match ca_cert {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let dir = data_dir
                .clone()
                .unwrap_or_else(|| default_data_dir().join("agent"));
            let name = node.name.clone().unwrap_or_else(host_name);
            // The CA is checked against the token before the token is sent anywhere.
            let client =
                skiff_node::join::join(server, token, ca, &dir, &name, node.node_ip).await?;
            return agent(client, dir, node.clone()).await;
        }
        Command::Push {
            file,
            reference,
            insecure_registries,
        } => return push(file, reference, insecure_registries).await,
        Command::Reset { data_dir } => {
            let dir = data_dir.clone().unwrap_or_else(default_data_dir);
            let mut stopped = 0;
            // An agent's own dir, or the one `skiff up` keeps its agent in.
            for d in [dir.clone(), dir.join("agent")] {
                stopped += skiff_node::oci::reset(&d)
                    .await
                    .map_err(|e| anyhow::anyhow!("reset {}: {e}", d.display()))?;
            }
            println!("{stopped} container(s) stopped and removed");
            return Ok(());
        }
        _ => {}
    }
    if let Command::Completion { shell } = &cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut cmd, "skiff", &mut std::io::stdout());
        return Ok(());
    }
    let client = Client::from_kubeconfig(cli.kubeconfig.as_deref())?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.namespace.clone());
    let ctx = Ctx { client, ns };
    match cli.command {
        Command::Token { what } => ctx.token(what).await,
        Command::Server(_)
        | Command::Up { .. }
        | Command::Agent { .. }
        | Command::Push { .. }
        | Command::Reset { .. }
        | Command::Completion { .. } => {
            unreachable!("handled above")
        }
        Command::Get {
            types,
            names,
            output,
            selector,
            field_selector,
            all_namespaces,
            watch,
            show_labels,
        } => {
            ctx.get(
                &types,
                &names,
                Format::parse(output.as_deref())?,
                selector.as_deref(),
                field_selector.as_deref(),
                all_namespaces,
                watch,
                show_labels,
            )
            .await
        }
        Command::Describe { kind, name } => ctx.describe(&kind, &name).await,
        Command::Create { what, filename } => match what {
            Some(CreateWhat::Deployment {
                name,
                image,
                port,
                replicas,
            }) => {
                let d = verbs::deployment(&name, &image, port, replicas);
                ctx.client
                    .create_dyn(resource("deployments")?, Some(&ctx.ns), &d)
                    .await?;
                println!("deployment.apps/{name} created");
                Ok(())
            }
            Some(CreateWhat::Job {
                name,
                image,
                from,
                command,
            }) => {
                let j = match (image, from) {
                    (_, Some(from)) => {
                        let Some(cj) = from
                            .strip_prefix("cronjob/")
                            .or_else(|| from.strip_prefix("cronjobs/"))
                            .or_else(|| from.strip_prefix("cj/"))
                        else {
                            bail!("from must be an existing cronjob: cronjob/NAME, not {from:?}");
                        };
                        let cj = ctx
                            .client
                            .get_dyn(resource("cronjobs")?, Some(&ctx.ns), cj)
                            .await?;
                        verbs::job_from_cronjob(&name, &cj)
                    }
                    (Some(image), None) => verbs::job(&name, &image, &command),
                    (None, None) => bail!("--image or --from is required"),
                };
                ctx.client
                    .create_dyn(resource("jobs")?, Some(&ctx.ns), &j)
                    .await?;
                println!("job.batch/{name} created");
                Ok(())
            }
            Some(CreateWhat::CronJob {
                name,
                image,
                schedule,
                command,
            }) => {
                let cj = verbs::cronjob(&name, &image, &schedule, &command);
                ctx.client
                    .create_dyn(resource("cronjobs")?, Some(&ctx.ns), &cj)
                    .await?;
                println!("cronjob.batch/{name} created");
                Ok(())
            }
            Some(CreateWhat::Namespace { name }) => {
                ctx.client
                    .create_dyn(
                        resource("namespaces")?,
                        None,
                        &json!({"metadata": {"name": name}}),
                    )
                    .await?;
                println!("namespace/{name} created");
                Ok(())
            }
            Some(CreateWhat::Service {
                kind,
                name,
                tcp,
                node_port,
            }) => {
                let s = verbs::service(&kind, &name, &tcp, node_port)?;
                ctx.client
                    .create_dyn(resource("services")?, Some(&ctx.ns), &s)
                    .await?;
                println!("service/{name} created");
                Ok(())
            }
            None if !filename.is_empty() => ctx.apply_files(&filename, Mode::Create).await,
            None => bail!(
                "must specify one of -f or a resource to create (deployment, job, cronjob, namespace, service)"
            ),
        },
        Command::Run {
            name,
            image,
            restart,
            port,
            command,
            args,
        } => {
            let p = verbs::pod(&name, &image, &restart, port, &args, command);
            ctx.client
                .create_dyn(resource("pods")?, Some(&ctx.ns), &p)
                .await?;
            println!("pod/{name} created");
            Ok(())
        }
        Command::Expose {
            target: t,
            service_type,
            port,
            target_port,
            node_port,
            name,
        } => {
            let (r, n) = target(&t)?;
            let obj = ctx.client.get_dyn(r, Some(&ctx.ns), &n).await?;
            let svc = verbs::expose(
                &obj,
                name.as_deref(),
                &service_type,
                port,
                target_port.as_deref(),
                node_port,
            )?;
            let created = ctx
                .client
                .create_dyn(resource("services")?, Some(&ctx.ns), &svc)
                .await?;
            println!("service/{} exposed", meta::name(&created));
            Ok(())
        }
        Command::Scale {
            target: t,
            replicas,
        } => {
            let (r, n) = target(&t)?;
            if !r.has_scale {
                bail!("cannot scale a {}", r.kind);
            }
            ctx.client
                .patch_dyn(
                    r,
                    Some(&ctx.ns),
                    &n,
                    Some("scale"),
                    MERGE,
                    &json!({"spec": {"replicas": replicas}}),
                )
                .await?;
            println!(
                "{}/{n} scaled",
                print::name_of(r, &json!({})).trim_end_matches('/')
            );
            Ok(())
        }
        Command::Set {
            what: SetWhat::Image { target: t, pairs },
        } => {
            let (r, n) = target(std::slice::from_ref(&t))?;
            let obj = ctx.client.get_dyn(r, Some(&ctx.ns), &n).await?;
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|p| {
                    p.split_once('=')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| anyhow!("expected CONTAINER=IMAGE, got {p:?}"))
                })
                .collect::<Result<_>>()?;
            let patch = verbs::set_image_patch(&obj, &pairs)?;
            ctx.client
                .patch_dyn(r, Some(&ctx.ns), &n, None, SMP, &patch)
                .await?;
            println!("{} image updated", print::name_of(r, &obj));
            Ok(())
        }
        Command::Rollout { what } => ctx.rollout(what).await,
        Command::Apply { filename } => ctx.apply_files(&filename, Mode::Apply).await,
        Command::Delete {
            args,
            filename,
            cascade,
            grace_period,
            ignore_not_found,
        } => {
            let propagation = match cascade.as_deref() {
                None | Some("background") | Some("true") => "Background",
                Some("foreground") => "Foreground",
                Some("orphan") | Some("false") => "Orphan",
                Some(o) => bail!("invalid --cascade {o:?}: use background, foreground or orphan"),
            };
            if !filename.is_empty() {
                return ctx
                    .apply_files(&filename, Mode::Delete(propagation.to_string()))
                    .await;
            }
            let pairs: Vec<(&'static Resource, String)> = match args.as_slice() {
                [] => bail!("you must provide one or more resources by TYPE NAME, TYPE/NAME or -f"),
                [one] if one.contains('/') => vec![target(std::slice::from_ref(one))?],
                [t, names @ ..] if !t.contains('/') && !names.is_empty() => {
                    let r = resource(t)?;
                    names.iter().map(|n| (r, n.clone())).collect()
                }
                all => all
                    .iter()
                    .map(|a| target(std::slice::from_ref(a)))
                    .collect::<Result<_>>()?,
            };
            for (r, n) in pairs {
                match ctx
                    .client
                    .delete_dyn(r, Some(&ctx.ns), &n, Some(propagation), grace_period)
                    .await
                {
                    Ok(_) => println!(
                        "{} deleted",
                        print::name_of(r, &json!({"metadata": {"name": n}}))
                    ),
                    Err(e) if ignore_not_found && e.code() == Some(404) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        }
        Command::Label {
            kind,
            name,
            labels,
            overwrite,
        } => {
            let r = resource(&kind)?;
            let obj = ctx.client.get_dyn(r, Some(&ctx.ns), &name).await?;
            let current = meta::labels(&obj);
            let mut patch = serde_json::Map::new();
            for l in &labels {
                if let Some(k) = l.strip_suffix('-') {
                    patch.insert(k.to_string(), Value::Null);
                } else if let Some((k, v)) = l.split_once('=') {
                    if current.get(k).is_some_and(|c| c != v) && !overwrite {
                        bail!(
                            "'{k}' already has a value ({}), and --overwrite is false",
                            current[k]
                        );
                    }
                    patch.insert(k.to_string(), json!(v));
                } else {
                    bail!("invalid label {l:?}: use key=value or key-");
                }
            }
            ctx.client
                .patch_dyn(
                    r,
                    Some(&ctx.ns),
                    &name,
                    None,
                    MERGE,
                    &json!({"metadata": {"labels": patch}}),
                )
                .await?;
            println!("{} labeled", print::name_of(r, &obj));
            Ok(())
        }
        Command::Cordon { node } => ctx.cordon(&node, true).await,
        Command::Uncordon { node } => ctx.cordon(&node, false).await,
        Command::Drain {
            node,
            ignore_daemonsets,
            delete_emptydir_data,
            force,
            timeout,
        } => {
            let opts = DrainOptions {
                ignore_daemonsets,
                delete_emptydir_data,
                force,
            };
            ctx.drain(&node, &opts, timeout).await
        }
        Command::Taint { kind, name, taints } => {
            let r = resource(&kind)?;
            if r.kind != "Node" {
                bail!("taints apply to nodes only");
            }
            let node = ctx.client.get_dyn(r, None, &name).await?;
            let mut list = node
                .pointer("/spec/taints")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for t in &taints {
                if let Some(rm) = t.strip_suffix('-') {
                    let (key, effect) = rm
                        .split_once(':')
                        .map(|(k, e)| (k, Some(e)))
                        .unwrap_or((rm, None));
                    let before = list.len();
                    list.retain(|x| !(x["key"] == key && effect.is_none_or(|e| x["effect"] == e)));
                    if list.len() == before {
                        bail!("taint {rm:?} not found");
                    }
                } else {
                    let (kv, effect) = t
                        .split_once(':')
                        .ok_or_else(|| anyhow!("invalid taint {t:?}: use key=value:Effect"))?;
                    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
                        bail!("invalid taint effect {effect:?}: use NoSchedule, PreferNoSchedule or NoExecute");
                    }
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    list.retain(|x| !(x["key"] == k && x["effect"] == effect));
                    let mut taint = json!({"key": k, "effect": effect});
                    if !v.is_empty() {
                        taint["value"] = json!(v);
                    }
                    list.push(taint);
                }
            }
            ctx.client
                .patch_dyn(
                    r,
                    None,
                    &name,
                    None,
                    MERGE,
                    &json!({"spec": {"taints": list}}),
                )
                .await?;
            println!("node/{name} tainted");
            Ok(())
        }
        Command::Exec {
            pod,
            container,
            stdin,
            tty,
            command,
        } => {
            let opts = skiff_client::exec::ExecOptions {
                container,
                command,
                stdin,
                tty,
            };
            let code = ctx
                .client
                .exec(
                    &ctx.ns,
                    &pod,
                    &opts,
                    tokio::io::stdin(),
                    tokio::io::stdout(),
                    tokio::io::stderr(),
                )
                .await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Logs {
            pod,
            container,
            follow,
            tail,
            previous,
        } => {
            let mut q = Vec::new();
            if let Some(c) = container {
                q.push(format!("container={c}"));
            }
            if follow {
                q.push("follow=true".into());
            }
            if let Some(t) = tail {
                q.push(format!("tailLines={t}"));
            }
            if previous {
                q.push("previous=true".into());
            }
            let pod = match pod.split_once('/') {
                Some(("job" | "jobs" | "job.batch", job)) => ctx.first_pod_of_job(job).await?,
                Some(("pod" | "pods", p)) => p.to_string(),
                Some((kind, _)) => bail!("cannot get logs of {kind}: use a pod or job/NAME"),
                None => pod,
            };
            let path = format!(
                "/api/v1/namespaces/{}/pods/{pod}/log?{}",
                ctx.ns,
                q.join("&")
            );
            let resp = ctx.client.get_raw(&path).await?;
            let mut s = resp.bytes_stream();
            use std::io::Write;
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                std::io::stdout().write_all(&chunk)?;
                std::io::stdout().flush()?;
            }
            Ok(())
        }
        Command::ClusterInfo => {
            ctx.client.get_path("/version").await?;
            println!(
                "Kubernetes control plane is running at {}",
                ctx.client.server
            );
            Ok(())
        }
        Command::Version => {
            println!("Client Version: v{}", env!("CARGO_PKG_VERSION"));
            let v = ctx.client.get_path("/version").await?;
            println!(
                "Server Version: {}",
                v["gitVersion"].as_str().unwrap_or("unknown")
            );
            Ok(())
        }
    }
}

/// The `Conditions:` block of `describe`: type and status, and the reason where kubectl
/// shows one (workloads).
fn print_conditions(o: &Value, with_reason: bool) {
    println!("Conditions:");
    for c in o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (ty, status) = (
            c["type"].as_str().unwrap_or(""),
            c["status"].as_str().unwrap_or(""),
        );
        if with_reason {
            println!(
                "  {ty:<16}{status:<8}{}",
                c["reason"].as_str().unwrap_or("")
            );
        } else {
            println!("  {ty:<18}{status}");
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "skiff-node".into())
}

fn agent_config(dir: std::path::PathBuf, node: &NodeArgs) -> skiff_node::AgentConfig {
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

async fn until_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Where `skiff up` keeps the server's files under its data dir.
fn server_dir_of(dir: &Path) -> std::path::PathBuf {
    dir.join("server")
}

/// `skiff server`, or with `node` set, `skiff up` (server and agent in one process).
async fn server(args: ServerArgs, node: Option<NodeArgs>) -> Result<()> {
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
    if let Some(n) = &node {
        config.tls_sans.push(n.node_ip.to_string());
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

async fn agent(client: Client, dir: std::path::PathBuf, node: NodeArgs) -> Result<()> {
    let a = skiff_node::Agent::start(client, agent_config(dir, &node)).await?;
    eprintln!("skiff node {} ready", a.name);
    until_signal().await?;
    a.shutdown().await;
    Ok(())
}

async fn push(file: &Path, reference: &str, insecure: &[String]) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let size = bytes.len() as u64;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!(
        "pushing {} ({} KiB) to {reference}",
        file.display(),
        size / 1024
    ));
    bar.enable_steady_tick(Duration::from_millis(100));
    let url = skiff_wasm::artifact::push(bytes, reference, insecure).await;
    bar.finish_and_clear();
    let url = url?;
    println!(
        "pushed {} ({size} bytes) to {reference}: {url}",
        file.display()
    );
    Ok(())
}

enum Mode {
    Create,
    Apply,
    Delete(String),
}

struct Ctx {
    client: Client,
    ns: String,
}

fn read_sources(files: &[String]) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for f in files {
        if f == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            docs.extend(verbs::documents(&s)?);
            continue;
        }
        let p = Path::new(f);
        let paths: Vec<std::path::PathBuf> = if p.is_dir() {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .with_context(|| format!("reading {f}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            v.sort();
            v
        } else {
            vec![p.to_path_buf()]
        };
        for path in paths {
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("the path {:?} does not exist", path.display().to_string())
            })?;
            docs.extend(verbs::documents(&text).with_context(|| format!("{}", path.display()))?);
        }
    }
    Ok(docs)
}

impl Ctx {
    /// `skiff token create|list|delete`: join tokens as bootstrap token Secrets.
    async fn token(&self, what: TokenWhat) -> Result<()> {
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

    fn ns_for<'a>(&'a self, r: &Resource, obj: &'a Value) -> Option<&'a str> {
        r.namespaced
            .then(|| meta::namespace(obj).unwrap_or(&self.ns))
    }

    async fn apply_files(&self, files: &[String], mode: Mode) -> Result<()> {
        let docs = read_sources(files)?;
        if docs.is_empty() {
            bail!(
                "no objects passed to {}",
                match mode {
                    Mode::Create => "create",
                    Mode::Apply => "apply",
                    Mode::Delete(_) => "delete",
                }
            );
        }
        // Check every document names a known kind before changing anything.
        let mut typed = Vec::new();
        for d in docs {
            let av = d["apiVersion"].as_str().unwrap_or("");
            let kind = d["kind"].as_str().unwrap_or("");
            let r = Resource::by_kind(av, kind).ok_or_else(|| {
                anyhow!("resource mapping not found for kind {kind:?} in version {av:?}")
            })?;
            if meta::name(&d).is_empty() && d.pointer("/metadata/generateName").is_none() {
                bail!("{kind}: metadata.name is required");
            }
            typed.push((r, d));
        }
        for (r, d) in typed {
            let ns = self.ns_for(r, &d);
            let name = meta::name(&d).to_string();
            let shown = print::name_of(r, &d);
            match &mode {
                Mode::Create => {
                    self.client.create_dyn(r, ns, &d).await?;
                    println!("{shown} created");
                }
                Mode::Delete(p) => {
                    match self.client.delete_dyn(r, ns, &name, Some(p), None).await {
                        Ok(_) => println!("{shown} deleted"),
                        Err(e) if e.code() == Some(404) => {
                            eprintln!("Error from server (NotFound): {e}")
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Mode::Apply => {
                    let mut desired = d.clone();
                    let last = serde_json::to_string(&d)?;
                    if !desired["metadata"]["annotations"].is_object() {
                        desired["metadata"]["annotations"] = json!({});
                    }
                    desired["metadata"]["annotations"]
                        ["kubectl.kubernetes.io/last-applied-configuration"] = json!(last);
                    match self.client.get_dyn(r, ns, &name).await {
                        Err(e) if e.code() == Some(404) => {
                            self.client.create_dyn(r, ns, &desired).await?;
                            println!("{shown} created");
                        }
                        Err(e) => return Err(e.into()),
                        Ok(cur) => {
                            let patch = apply_patch(&cur, &desired);
                            let out = self
                                .client
                                .patch_dyn(r, ns, &name, None, SMP, &patch)
                                .await?;
                            let changed = out.pointer("/metadata/resourceVersion")
                                != cur.pointer("/metadata/resourceVersion");
                            println!(
                                "{shown} {}",
                                if changed { "configured" } else { "unchanged" }
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn get(
        &self,
        types: &str,
        names: &[String],
        fmt: Format,
        sel: Option<&str>,
        fsel: Option<&str>,
        all_ns: bool,
        watch: bool,
        show_labels: bool,
    ) -> Result<()> {
        let (types, names): (String, Vec<String>) = match types.split_once('/') {
            Some((t, n)) => (
                t.to_string(),
                std::iter::once(n.to_string())
                    .chain(names.iter().cloned())
                    .collect(),
            ),
            None => (types.to_string(), names.to_vec()),
        };
        let rs: Vec<&'static Resource> = types
            .split(',')
            .map(|t| {
                if t == "all" {
                    Ok(vec![
                        resource("pods")?,
                        resource("services")?,
                        resource("deployments")?,
                        resource("replicasets")?,
                    ])
                } else {
                    resource(t).map(|r| vec![r])
                }
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let several = rs.len() > 1;
        let mut structured = Vec::new();
        let mut first = true;
        for r in &rs {
            let ns = if all_ns || !r.namespaced {
                None
            } else {
                Some(self.ns.as_str())
            };
            let objs: Vec<Value> = if names.is_empty() {
                let list = self.client.list_dyn(r, ns, sel, fsel).await?;
                let mut items = list["items"].as_array().cloned().unwrap_or_default();
                if r.kind == "Event" {
                    items.sort_by(|a, b| {
                        a["lastTimestamp"]
                            .as_str()
                            .cmp(&b["lastTimestamp"].as_str())
                    });
                }
                if watch {
                    return self
                        .watch(
                            r,
                            ns,
                            list["metadata"]["resourceVersion"].as_str().unwrap_or(""),
                            items,
                            fmt,
                            all_ns,
                            sel,
                            fsel,
                        )
                        .await;
                }
                items
            } else {
                let mut v = Vec::new();
                for n in &names {
                    v.push(self.client.get_dyn(r, ns, n).await?);
                }
                v
            };
            match fmt {
                Format::Yaml | Format::Json => structured.extend(objs),
                Format::Name => objs
                    .iter()
                    .for_each(|o| println!("{}", print::name_of(r, o))),
                Format::Table | Format::Wide => {
                    if objs.is_empty() {
                        if !several {
                            match ns {
                                Some(n) => eprintln!("No resources found in {n} namespace."),
                                None => eprintln!("No resources found"),
                            }
                        }
                        continue;
                    }
                    if !first {
                        println!();
                    }
                    first = false;
                    print::table(r, &objs, fmt, all_ns, several, show_labels);
                }
            }
        }
        if matches!(fmt, Format::Yaml | Format::Json) {
            print::structured(
                &structured,
                !names.is_empty() && rs.len() == 1 && names.len() == 1,
                fmt,
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn watch(
        &self,
        r: &Resource,
        ns: Option<&str>,
        rv: &str,
        initial: Vec<Value>,
        fmt: Format,
        all_ns: bool,
        sel: Option<&str>,
        fsel: Option<&str>,
    ) -> Result<()> {
        let show = |o: &Value, header: bool| match fmt {
            Format::Json => println!("{}", serde_json::to_string_pretty(o).unwrap_or_default()),
            Format::Yaml => print!("---\n{}", serde_yaml::to_string(o).unwrap_or_default()),
            Format::Name => println!("{}", print::name_of(r, o)),
            _ => {
                let cols = skiff_api::table::columns(r.kind);
                let keep: Vec<usize> = cols
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| fmt == Format::Wide || !c.wide)
                    .map(|(i, _)| i)
                    .collect();
                let cells = skiff_api::table::row(r.kind, o, print::now());
                let row: Vec<String> = keep.iter().map(|i| cells[*i].clone()).collect();
                let mut rows = vec![];
                if header {
                    rows.push(keep.iter().map(|i| cols[*i].name.to_string()).collect());
                }
                rows.push(row);
                let _ = all_ns;
                print::print_rows(&rows);
            }
        };
        let mut header = true;
        for o in &initial {
            show(o, header);
            header = false;
        }
        let mut stream = Box::pin(self.client.watch_dyn(r, ns, Some(rv), fsel, sel).await?);
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            show(&ev.object, header);
            header = false;
        }
        Ok(())
    }

    /// A deployment and every ReplicaSet of its namespace (its revisions are among them).
    async fn deployment_and_replicasets(&self, name: &str) -> Result<(Value, Vec<Value>)> {
        let d = self
            .client
            .get_dyn(resource("deployments")?, Some(&self.ns), name)
            .await?;
        let rss = self
            .client
            .list_dyn(resource("replicasets")?, Some(&self.ns), None, None)
            .await?;
        Ok((d, rss["items"].as_array().cloned().unwrap_or_default()))
    }

    /// The pod `logs job/NAME` reads, as kubectl picks it: among the Job's pods (by its
    /// selector), a running one before a finished one, then the oldest.
    async fn first_pod_of_job(&self, job: &str) -> Result<String> {
        let j = self
            .client
            .get_dyn(resource("jobs")?, Some(&self.ns), job)
            .await?;
        let labels = meta::string_map(j.pointer("/spec/selector/matchLabels"));
        let sel: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let list = self
            .client
            .list_dyn(
                resource("pods")?,
                Some(&self.ns),
                Some(&sel.join(",")),
                None,
            )
            .await?;
        let mut pods: Vec<&Value> = list["items"].as_array().into_iter().flatten().collect();
        pods.sort_by_key(|p| {
            (
                p.pointer("/status/phase").and_then(Value::as_str) != Some("Running"),
                p.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        });
        match pods.first() {
            Some(p) => Ok(meta::name(p).to_string()),
            None => bail!("no pods found for job {job}"),
        }
    }

    async fn describe(&self, kind: &str, name: &str) -> Result<()> {
        let (kind, name) = match kind.split_once('/') {
            Some((k, n)) if name.is_empty() => (k.to_string(), n.to_string()),
            _ => (kind.to_string(), name.to_string()),
        };
        let r = resource(&kind)?;
        let ns = r.namespaced.then_some(self.ns.as_str());
        let o = self.client.get_dyn(r, ns, &name).await?;
        let kv = |k: &str, v: String| println!("{:<20}{}", format!("{k}:"), v);
        let map = |m: std::collections::BTreeMap<String, String>| {
            if m.is_empty() {
                "<none>".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("\n                    ")
            }
        };
        kv("Name", name.clone());
        if let Some(n) = meta::namespace(&o) {
            kv("Namespace", n.to_string());
        }
        kv("Labels", map(meta::labels(&o)));
        let ann: std::collections::BTreeMap<String, String> = meta::annotations(&o)
            .into_iter()
            .filter(|(k, _)| k != "kubectl.kubernetes.io/last-applied-configuration")
            .collect();
        kv("Annotations", map(ann));
        kv(
            "CreationTimestamp",
            o.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        );
        let s = |p: &str| {
            o.pointer(p)
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_else(|| "<none>".into())
        };
        match r.kind {
            "Pod" => {
                kv("Node", s("/spec/nodeName"));
                kv("Status", skiff_api::table::pod_status(&o));
                kv("IP", s("/status/podIP"));
                kv(
                    "Controlled By",
                    meta::owners(&o)
                        .iter()
                        .find(|x| x.3)
                        .map(|x| format!("{}/{}", x.1, x.2))
                        .unwrap_or_else(|| "<none>".into()),
                );
                println!("Containers:");
                let statuses = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for c in o
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let n = c["name"].as_str().unwrap_or("");
                    println!("  {n}:");
                    println!("    Image:          {}", c["image"].as_str().unwrap_or(""));
                    let ports: Vec<String> = c["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            format!(
                                "{}/{}",
                                p["containerPort"],
                                p["protocol"].as_str().unwrap_or("TCP")
                            )
                        })
                        .collect();
                    println!(
                        "    Port:           {}",
                        if ports.is_empty() {
                            "<none>".into()
                        } else {
                            ports.join(", ")
                        }
                    );
                    if let Some(st) = statuses.iter().find(|x| x["name"] == n) {
                        let state = st["state"]
                            .as_object()
                            .and_then(|m| m.keys().next().cloned())
                            .unwrap_or_default();
                        println!("    State:          {state}");
                        println!("    Ready:          {}", st["ready"]);
                        println!("    Restart Count:  {}", st["restartCount"]);
                    }
                }
                print_conditions(&o, false);
            }
            "Deployment" | "ReplicaSet" => {
                kv(
                    "Selector",
                    skiff_api::table::row(r.kind, &o, 0)
                        .last()
                        .cloned()
                        .unwrap_or_default(),
                );
                kv(
                    "Replicas",
                    format!(
                        "{} desired | {} updated | {} total | {} available | {} unavailable",
                        s("/spec/replicas"),
                        s("/status/updatedReplicas"),
                        s("/status/replicas"),
                        s("/status/availableReplicas"),
                        s("/status/unavailableReplicas")
                    ),
                );
                kv("StrategyType", s("/spec/strategy/type"));
                let images: Vec<String> = o
                    .pointer("/spec/template/spec/containers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        format!(
                            "{}: {}",
                            c["name"].as_str().unwrap_or(""),
                            c["image"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                kv("Containers", images.join(", "));
                print_conditions(&o, true);
            }
            "Service" => {
                kv(
                    "Selector",
                    skiff_api::table::row("Service", &o, 0)
                        .last()
                        .cloned()
                        .unwrap_or_default(),
                );
                kv("Type", s("/spec/type"));
                kv("IP", s("/spec/clusterIP"));
                for p in o
                    .pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    kv(
                        "Port",
                        format!(
                            "{} {}/{}",
                            p["name"].as_str().unwrap_or("<unset>"),
                            p["port"],
                            p["protocol"].as_str().unwrap_or("TCP")
                        ),
                    );
                    kv(
                        "TargetPort",
                        p["targetPort"].to_string().trim_matches('"').to_string(),
                    );
                    if let Some(np) = p.get("nodePort") {
                        kv(
                            "NodePort",
                            format!("{} {np}/TCP", p["name"].as_str().unwrap_or("<unset>")),
                        );
                    }
                }
                let eps = match self.client.get_dyn(resource("endpoints")?, ns, &name).await {
                    Ok(ep) => skiff_api::table::row("Endpoints", &ep, 0)[1].clone(),
                    Err(_) => "<none>".into(),
                };
                kv("Endpoints", eps);
                kv("Session Affinity", s("/spec/sessionAffinity"));
            }
            "Node" => {
                kv(
                    "Addresses",
                    o.pointer("/status/addresses")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            format!(
                                "{}={}",
                                a["type"].as_str().unwrap_or(""),
                                a["address"].as_str().unwrap_or("")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                );
                kv("PodCIDR", s("/spec/podCIDR"));
                kv(
                    "Taints",
                    o.pointer("/spec/taints")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|t| {
                            format!(
                                "{}={}:{}",
                                t["key"].as_str().unwrap_or(""),
                                t["value"].as_str().unwrap_or(""),
                                t["effect"].as_str().unwrap_or("")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                );
                kv(
                    "Capacity",
                    o.pointer("/status/capacity")
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                );
                kv(
                    "Allocatable",
                    o.pointer("/status/allocatable")
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                );
            }
            _ => {
                if let Some(spec) = o.get("spec") {
                    println!(
                        "Spec:\n{}",
                        serde_yaml::to_string(spec)?
                            .lines()
                            .map(|l| format!("  {l}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                }
            }
        }
        let evs = self
            .client
            .list_dyn(
                resource("events")?,
                meta::namespace(&o).or(Some("default")),
                None,
                Some(&format!(
                    "involvedObject.name={name},involvedObject.kind={}",
                    r.kind
                )),
            )
            .await?;
        let mut items = evs["items"].as_array().cloned().unwrap_or_default();
        items.sort_by(|a, b| {
            a["lastTimestamp"]
                .as_str()
                .cmp(&b["lastTimestamp"].as_str())
        });
        if items.is_empty() {
            println!("Events:           <none>");
        } else {
            println!("Events:");
            let mut rows = vec![vec![
                "  Type".to_string(),
                "Reason".into(),
                "Age".into(),
                "From".into(),
                "Message".into(),
            ]];
            for e in items {
                let age = skiff_api::table::age(e["lastTimestamp"].as_str(), print::now());
                let count = e["count"].as_i64().unwrap_or(1);
                let age = if count > 1 {
                    format!("{age} (x{count})")
                } else {
                    age
                };
                rows.push(vec![
                    format!("  {}", e["type"].as_str().unwrap_or("")),
                    e["reason"].as_str().unwrap_or("").into(),
                    age,
                    e["source"]["component"].as_str().unwrap_or("").into(),
                    e["message"].as_str().unwrap_or("").into(),
                ]);
            }
            print::print_rows(&rows);
        }
        Ok(())
    }

    async fn rollout(&self, what: RolloutWhat) -> Result<()> {
        let parse = |t: &str| -> Result<(&'static skiff_api::Resource, String)> {
            let (r, n) = target(&[t.to_string()])?;
            if r.kind != "Deployment" && r.kind != "DaemonSet" {
                bail!("rollout is supported for deployments and daemonsets only");
            }
            Ok((r, n))
        };
        match what {
            RolloutWhat::Status { target: t, timeout } => {
                let (r, name) = target(&[t.to_string()])?;
                if !matches!(r.kind, "Deployment" | "DaemonSet" | "StatefulSet") {
                    bail!("rollout status is supported for deployments, daemonsets and statefulsets only");
                }
                let deadline = (timeout > 0)
                    .then(|| tokio::time::Instant::now() + Duration::from_secs(timeout));
                let mut last = String::new();
                loop {
                    let d = self.client.get_dyn(r, Some(&self.ns), &name).await?;
                    let (done, msg) = if r.kind == "DaemonSet" {
                        verbs::daemonset_rollout_status(&d)?
                    } else {
                        verbs::rollout_status(&d)?
                    };
                    if msg != last {
                        println!("{msg}");
                        last = msg;
                    }
                    if done {
                        return Ok(());
                    }
                    let rv = d["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    let fs = format!("metadata.name={name}");
                    let mut stream = Box::pin(
                        self.client
                            .watch_dyn(r, Some(&self.ns), Some(&rv), Some(&fs), None)
                            .await?,
                    );
                    let wait = async {
                        while let Some(ev) = stream.next().await {
                            if ev.is_err() || ev.is_ok_and(|e| e.kind != "BOOKMARK") {
                                break;
                            }
                        }
                    };
                    match deadline {
                        Some(dl) => {
                            if tokio::time::timeout_at(dl, wait).await.is_err() {
                                bail!("timed out waiting for the condition");
                            }
                        }
                        None => wait.await,
                    }
                }
            }
            RolloutWhat::History { target: t } => {
                let (r, name) = parse(&t)?;
                let history = if r.kind == "DaemonSet" {
                    let (d, items) = self.daemonset_and_revisions(&name).await?;
                    println!("daemonset.apps/{name}");
                    verbs::daemonset_history(&d, &items)?
                } else {
                    let (d, items) = self.deployment_and_replicasets(&name).await?;
                    println!("deployment.apps/{name}");
                    verbs::history(&d, &items)
                };
                let mut rows = vec![vec!["REVISION".to_string(), "CHANGE-CAUSE".to_string()]];
                rows.extend(history.into_iter().map(|(r, c)| vec![r.to_string(), c]));
                print::print_rows(&rows);
                Ok(())
            }
            RolloutWhat::Undo {
                target: t,
                to_revision,
            } => {
                let (r, name) = parse(&t)?;
                let (patch, rev, content_type) = if r.kind == "DaemonSet" {
                    let (d, items) = self.daemonset_and_revisions(&name).await?;
                    let (patch, rev) = verbs::daemonset_rollback_patch(&d, &items, to_revision)?;
                    (patch, rev, "application/strategic-merge-patch+json")
                } else {
                    let (d, items) = self.deployment_and_replicasets(&name).await?;
                    let (patch, rev) = verbs::rollback_patch(&d, &items, to_revision)?;
                    (patch, rev, "application/json-patch+json")
                };
                self.client
                    .patch_dyn(r, Some(&self.ns), &name, None, content_type, &patch)
                    .await?;
                println!("{}.apps/{name} rolled back (to revision {rev})", r.singular);
                Ok(())
            }
        }
    }

    async fn daemonset_and_revisions(&self, name: &str) -> Result<(Value, Vec<Value>)> {
        let d = self
            .client
            .get_dyn(resource("daemonsets")?, Some(&self.ns), name)
            .await?;
        let revs = self
            .client
            .list_dyn(resource("controllerrevisions")?, Some(&self.ns), None, None)
            .await?;
        Ok((d, revs["items"].as_array().cloned().unwrap_or_default()))
    }
}

/// A strategic merge patch from the live object to the desired one: every field the desired
/// object sets, and `null` for fields the last applied configuration had but the new one drops.
fn apply_patch(live: &Value, desired: &Value) -> Value {
    let last: Option<Value> = meta::annotations(live)
        .get("kubectl.kubernetes.io/last-applied-configuration")
        .and_then(|s| serde_json::from_str(s).ok());
    let mut patch = desired.clone();
    if let Some(last) = last {
        remove_dropped(&last, desired, &mut patch);
    }
    patch
}

fn remove_dropped(last: &Value, desired: &Value, patch: &mut Value) {
    if let (Value::Object(l), Value::Object(d)) = (last, desired) {
        for (k, lv) in l {
            match d.get(k) {
                None => {
                    patch[k.as_str()] = Value::Null;
                }
                Some(dv) => {
                    if let Some(p) = patch.get_mut(k) {
                        remove_dropped(lv, dv, p);
                    }
                }
            }
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

pub fn drain_action(pod: &Value, opts: &DrainOptions) -> DrainAction {
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    if meta::is_deleting(pod) {
        return DrainAction::Evict;
    }
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return DrainAction::Skip;
    }
    let owner = meta::owners(pod).into_iter().find(|o| o.3);
    match &owner {
        Some(o) if o.1 == "DaemonSet" => {
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
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .is_some_and(|vs| vs.iter().any(|v| v.get("emptyDir").is_some()));
    if empty_dir && !opts.delete_emptydir_data {
        return DrainAction::Refuse(
            "cannot delete Pods with local storage (use --delete-emptydir-data to override)".into(),
        );
    }
    DrainAction::Evict
}

impl Ctx {
    async fn cordon(&self, node: &str, on: bool) -> Result<()> {
        let nodes = resource("nodes")?;
        let cur = self.client.get_dyn(nodes, None, node).await?;
        let was = cur.pointer("/spec/unschedulable") == Some(&json!(true));
        let word = if on { "cordoned" } else { "uncordoned" };
        if was == on {
            println!("node/{node} already {word}");
            return Ok(());
        }
        let value = if on { json!(true) } else { Value::Null };
        self.client
            .patch_dyn(
                nodes,
                None,
                node,
                None,
                MERGE,
                &json!({"spec": {"unschedulable": value}}),
            )
            .await?;
        println!("node/{node} {word}");
        Ok(())
    }

    async fn drain(&self, node: &str, opts: &DrainOptions, timeout: Duration) -> Result<()> {
        self.cordon(node, true).await?;
        let pods_r = resource("pods")?;
        let list = self
            .client
            .list_dyn(pods_r, None, None, Some(&format!("spec.nodeName={node}")))
            .await?;
        let pods = list["items"].as_array().cloned().unwrap_or_default();
        let mut evict = Vec::new();
        let mut refused = Vec::new();
        for p in &pods {
            let who = format!(
                "{}/{}",
                meta::namespace(p).unwrap_or("default"),
                meta::name(p)
            );
            match drain_action(p, opts) {
                DrainAction::Evict => evict.push(p.clone()),
                DrainAction::Skip => {
                    if !matches!(
                        p.pointer("/status/phase").and_then(Value::as_str),
                        Some("Succeeded" | "Failed")
                    ) {
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
            let (ns, name) = (meta::namespace(p).unwrap_or("default"), meta::name(p));
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
            let (ns, name, uid) = (
                meta::namespace(p).unwrap_or("default"),
                meta::name(p),
                meta::uid(p),
            );
            loop {
                match self.client.get_dyn(pods_r, Some(ns), name).await {
                    Err(e) if e.code() == Some(404) => break,
                    Ok(cur) if meta::uid(&cur) != uid => break,
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

    fn pod(owner: Option<&str>, volumes: Value) -> Value {
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
        let mut done = pod(None, json!([]));
        done["status"]["phase"] = json!("Succeeded");
        assert_eq!(drain_action(&done, &none), DrainAction::Skip);
    }
}
