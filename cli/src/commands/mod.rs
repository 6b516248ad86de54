//! The verbs: each turns parsed arguments into API calls through `skiff_client`. This module
//! dispatches; the verbs live by family: [`get`] (get, describe, watch), [`apply`] (apply,
//! create/delete -f), [`rollout`], [`logs_exec`], [`cluster`] (server, agent, push, token,
//! cordon, drain).

mod apply;
mod cluster;
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
