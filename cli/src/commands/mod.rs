//! The verbs: each turns parsed arguments into API calls through `skiff_client`. This module
//! dispatches; the verbs live by family: [`get`] (get, describe, watch), [`apply`] (apply,
//! create/delete -f), [`rollout`], [`logs_exec`], [`cluster`] (server, agent, push, token,
//! cordon, drain).

mod apply;
mod cluster;
mod create;
mod edit;
mod get;
mod logs_exec;
mod rollout;

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
use cluster::{agent, host_name, push, server, DrainOptions};

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
        Command::Create { what, filename } => ctx.create(what, filename).await,
        Command::Run {
            name,
            image,
            restart,
            port,
            command,
            args,
        } => ctx.run_pod(name, image, restart, port, command, args).await,
        Command::Expose {
            target,
            service_type,
            port,
            target_port,
            node_port,
            name,
        } => {
            ctx.expose(target, service_type, port, target_port, node_port, name)
                .await
        }
        Command::Scale { target, replicas } => ctx.scale(target, replicas).await,
        Command::Set { what } => ctx.set(what).await,
        Command::Rollout { what } => ctx.rollout(what).await,
        Command::Apply { filename } => ctx.apply_files(&filename, Mode::Apply).await,
        Command::Delete {
            args,
            filename,
            cascade,
            grace_period,
            ignore_not_found,
        } => {
            ctx.delete(args, filename, cascade, grace_period, ignore_not_found)
                .await
        }
        Command::Label {
            kind,
            name,
            labels,
            overwrite,
        } => ctx.label(kind, name, labels, overwrite).await,
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
        Command::Taint { kind, name, taints } => ctx.taint(kind, name, taints).await,
        Command::Exec {
            pod,
            container,
            stdin,
            tty,
            command,
        } => ctx.exec(pod, container, stdin, tty, command).await,
        Command::Logs {
            pod,
            container,
            follow,
            tail,
            previous,
        } => ctx.logs(pod, container, follow, tail, previous).await,
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

enum Mode {
    Create,
    Apply,
    Delete(String),
}

struct Ctx {
    client: Client,
    ns: String,
}

impl Ctx {
    fn ns_for<'a>(&'a self, r: &Resource, obj: &'a Value) -> Option<&'a str> {
        r.namespaced
            .then(|| meta::namespace(obj).unwrap_or(&self.ns))
    }
}
