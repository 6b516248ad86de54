//! The verbs: each turns parsed arguments into API calls through `skiff_client`. This module
//! dispatches; the verbs live by family: [`get`] (get, describe, watch), [`apply`] (apply,
//! create/delete -f), [`create`] (create, run, expose), [`edit`] (scale, set, label, taint),
//! [`rollout`], [`logs_exec`], [`cluster`] (server, up, agent, push, reset, token, cordon,
//! drain, cluster-info, version).

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
use crate::{
    AgentArgs, Cli, Command, CreateWhat, DeleteArgs, DrainArgs, ExecArgs, ExposeArgs, GetArgs,
    LogsArgs, NodeArgs, RolloutWhat, RunArgs, ServerArgs, SetWhat, TokenWhat,
};
use cluster::{join_and_run_agent, push, reset, server};

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

/// Runs `cli`'s command: the roles and the host tools here, the verbs through the API server
/// as the kubeconfig's user.
pub async fn run(cli: Cli) -> Result<()> {
    if matches!(
        cli.command,
        Command::Server(_) | Command::Up { .. } | Command::Agent(_)
    ) {
        // A role runs for months: what only start-up used is given back.
        crate::trim::spawn();
    }
    let command = match cli.command {
        Command::Server(args) => return server(args, None).await,
        Command::Up { server: s, node } => return server(*s, Some(node)).await,
        Command::Agent(args) => {
            let Some(server) = cli.server.filter(|s| !s.trim().is_empty()) else {
                bail!("skiff agent needs --server URL[,URL...] (or SKIFF_SERVER): the API servers to join");
            };
            return join_and_run_agent(&server, args).await;
        }
        Command::Push {
            file,
            reference,
            insecure_registries,
        } => return push(&file, &reference, &insecure_registries).await,
        Command::Reset { data_dir } => return reset(data_dir).await,
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "skiff", &mut std::io::stdout());
            return Ok(());
        }
        verb => verb,
    };
    let client = Client::from_kubeconfig_at(cli.kubeconfig.as_deref(), cli.server.as_deref())?;
    let ns = cli.namespace.unwrap_or_else(|| client.namespace.clone());
    Ctx { client, ns }.verb(command).await
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
    /// A verb, handed to its family's module.
    async fn verb(&self, command: Command) -> Result<()> {
        match command {
            // get.rs
            Command::Get(args) => self.get(args).await,
            Command::Describe { kind, name } => self.describe(&kind, &name).await,
            // create.rs
            Command::Create { what, filename } => self.create(what, filename).await,
            Command::Run(args) => self.run_pod(args).await,
            Command::Expose(args) => self.expose(args).await,
            // edit.rs
            Command::Scale { target, replicas } => self.scale(target, replicas).await,
            Command::Set { what } => self.set(what).await,
            Command::Label {
                kind,
                name,
                labels,
                overwrite,
            } => self.label(kind, name, labels, overwrite).await,
            Command::Taint { kind, name, taints } => self.taint(kind, name, taints).await,
            // apply.rs
            Command::Apply { filename } => self.apply_files(&filename, Mode::Apply).await,
            Command::Delete(args) => self.delete(args).await,
            // rollout.rs
            Command::Rollout { what } => self.rollout(what).await,
            // logs_exec.rs
            Command::Logs(args) => self.logs(args).await,
            Command::Exec(args) => self.exec(args).await,
            // cluster.rs
            Command::Token { what } => self.token(what).await,
            Command::Cordon { node } => self.cordon(&node, true).await,
            Command::Uncordon { node } => self.cordon(&node, false).await,
            Command::Drain(args) => self.drain(&args.node, &args.options(), args.timeout).await,
            Command::ClusterInfo => self.cluster_info().await,
            Command::Version => self.version().await,
            Command::Server(_)
            | Command::Up { .. }
            | Command::Agent(_)
            | Command::Push { .. }
            | Command::Reset { .. }
            | Command::Completion { .. } => unreachable!("run on this host by `run`"),
        }
    }

    fn ns_for<'a>(&'a self, r: &Resource, obj: &'a Value) -> Option<&'a str> {
        r.namespaced
            .then(|| meta::namespace(obj).unwrap_or(&self.ns))
    }
}
