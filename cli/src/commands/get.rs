//! `get`, `describe` and `get --watch`: reading objects and printing them.

use std::collections::BTreeMap;

use skiff_api::conditions::Condition;
use skiff_api::k8s::api::apps::v1::{Deployment, ReplicaSet};
use skiff_api::k8s::api::core::v1::{Node, Pod, PodSpec, Service};
use skiff_api::k8s::apimachinery::pkg::api::resource::Quantity;
use skiff_api::k8s::apimachinery::pkg::util::intstr::IntOrString;

use super::*;

/// The `Conditions:` block of `describe`: type and status, and the reason where kubectl
/// shows one (workloads).
pub(super) fn print_conditions<C: Condition>(conditions: &[C], with_reason: bool) {
    println!("Conditions:");
    for c in conditions {
        let (ty, status) = (c.type_(), c.status());
        if with_reason {
            println!("  {ty:<16}{status:<8}{}", c.reason());
        } else {
            println!("  {ty:<18}{status}");
        }
    }
}

/// One `Key:   value` line of `describe`.
fn kv(k: &str, v: String) {
    println!("{:<20}{}", format!("{k}:"), v)
}

/// An object the server sent, in its type.
fn typed<K: skiff_client::Kind>(o: &Value) -> Result<K> {
    Ok(serde_json::from_value(o.clone())?)
}

/// The selector column of `get`'s table for `kind`.
fn table_selector(kind: &str, o: &Value) -> String {
    skiff_api::table::row(kind, o, 0)
        .last()
        .cloned()
        .unwrap_or_default()
}

/// A number, or `<none>` as kubectl shows a field that is not set.
fn or_none<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "<none>".into())
}

fn describe_pod(pod: &Pod, o: &Value) {
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    kv("Node", or_none(spec.node_name));
    kv("Status", skiff_api::table::pod_status(o));
    kv("IP", or_none(status.pod_ip));
    kv(
        "Controlled By",
        pod.metadata
            .owner_references
            .iter()
            .flatten()
            .find(|x| x.controller == Some(true))
            .map(|x| format!("{}/{}", x.kind, x.name))
            .unwrap_or_else(|| "<none>".into()),
    );
    println!("Containers:");
    let statuses = status.container_statuses.unwrap_or_default();
    for c in &spec.containers {
        let n = &c.name;
        println!("  {n}:");
        println!("    Image:          {}", c.image.as_deref().unwrap_or(""));
        let ports: Vec<String> = c
            .ports
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}/{}",
                    p.container_port,
                    p.protocol.as_deref().unwrap_or("TCP")
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
        if let Some(st) = statuses.iter().find(|x| &x.name == n) {
            let state = st.state.clone().unwrap_or_default();
            let state = if state.running.is_some() {
                "running"
            } else if state.terminated.is_some() {
                "terminated"
            } else if state.waiting.is_some() {
                "waiting"
            } else {
                ""
            };
            println!("    State:          {state}");
            println!("    Ready:          {}", st.ready);
            println!("    Restart Count:  {}", st.restart_count);
        }
    }
    print_conditions(status.conditions.as_deref().unwrap_or_default(), false);
}

/// The body of `describe` for a Deployment or ReplicaSet; `counts` are desired, updated,
/// total, available and unavailable replicas.
fn describe_workload(
    selector: &str,
    counts: [Option<i32>; 5],
    strategy: Option<String>,
    pod: Option<&PodSpec>,
) {
    kv("Selector", selector.to_string());
    let [desired, updated, total, available, unavailable] = counts.map(or_none);
    kv(
        "Replicas",
        format!("{desired} desired | {updated} updated | {total} total | {available} available | {unavailable} unavailable"),
    );
    kv("StrategyType", or_none(strategy));
    let images: Vec<String> = pod
        .into_iter()
        .flat_map(|p| p.containers.iter())
        .map(|c| format!("{}: {}", c.name, c.image.as_deref().unwrap_or("")))
        .collect();
    kv("Containers", images.join(", "));
}

fn describe_service(svc: &Service, selector: &str) {
    let spec = svc.spec.clone().unwrap_or_default();
    kv("Selector", selector.to_string());
    kv("Type", or_none(spec.type_));
    kv("IP", or_none(spec.cluster_ip));
    for p in spec.ports.iter().flatten() {
        let name = p.name.as_deref().unwrap_or("<unset>");
        kv(
            "Port",
            format!(
                "{name} {}/{}",
                p.port,
                p.protocol.as_deref().unwrap_or("TCP")
            ),
        );
        let target = match &p.target_port {
            Some(IntOrString::Int(n)) => n.to_string(),
            Some(IntOrString::String(s)) => s.clone(),
            None => "null".into(),
        };
        kv("TargetPort", target);
        if let Some(np) = p.node_port {
            kv("NodePort", format!("{name} {np}/TCP"));
        }
    }
}

fn describe_node(node: &Node) {
    let spec = node.spec.clone().unwrap_or_default();
    let status = node.status.clone().unwrap_or_default();
    kv(
        "Addresses",
        status
            .addresses
            .iter()
            .flatten()
            .map(|a| format!("{}={}", a.type_, a.address))
            .collect::<Vec<_>>()
            .join(", "),
    );
    kv("PodCIDR", or_none(spec.pod_cidr));
    kv(
        "Taints",
        spec.taints
            .iter()
            .flatten()
            .map(|t| {
                format!(
                    "{}={}:{}",
                    t.key,
                    t.value.as_deref().unwrap_or(""),
                    t.effect
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let json = |m: Option<BTreeMap<String, Quantity>>| {
        m.and_then(|m| serde_json::to_string(&m).ok())
            .unwrap_or_default()
    };
    kv("Capacity", json(status.capacity));
    kv("Allocatable", json(status.allocatable));
}

/// The header of `describe`, the same for every kind: read from the object's JSON.
fn describe_header(name: &str, o: &Value) {
    let map = |m: BTreeMap<String, String>| {
        if m.is_empty() {
            "<none>".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("\n                    ")
        }
    };
    kv("Name", name.to_string());
    if let Some(n) = meta::namespace(o) {
        kv("Namespace", n.to_string());
    }
    kv("Labels", map(meta::labels(o)));
    let mut annotations = meta::annotations(o);
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    kv("Annotations", map(annotations));
    kv(
        "CreationTimestamp",
        o.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    );
}

fn describe_deployment(d: &Deployment, selector: &str) {
    let (spec, st) = (&d.spec, d.status.clone().unwrap_or_default());
    describe_workload(
        selector,
        [
            spec.replicas,
            st.updated_replicas,
            st.replicas,
            st.available_replicas,
            st.unavailable_replicas,
        ],
        spec.strategy.as_ref().and_then(|s| s.type_.clone()),
        spec.template.spec.as_ref(),
    );
    print_conditions(st.conditions.as_deref().unwrap_or_default(), true);
}

fn describe_replicaset(rs: &ReplicaSet, selector: &str) {
    let st = rs.status.as_ref();
    describe_workload(
        selector,
        [
            rs.spec.replicas,
            None,
            st.map(|s| s.replicas),
            st.and_then(|s| s.available_replicas),
            None,
        ],
        None,
        rs.spec.template.as_ref().and_then(|t| t.spec.as_ref()),
    );
    let conditions = st.and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    print_conditions(conditions, true);
}

/// The body of `describe` for kinds without one of their own: the spec as YAML.
fn describe_spec(o: &Value) -> Result<()> {
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
    Ok(())
}

/// `TYPE[,TYPE...] [NAME...]` or `TYPE/NAME [NAME...]`: the resources (`all` is pods,
/// services, deployments and replica sets) and the names.
fn resources_and_names(
    types: &str,
    names: &[String],
) -> Result<(Vec<&'static Resource>, Vec<String>)> {
    let (types, names) = match types.split_once('/') {
        Some((t, n)) => (
            t,
            std::iter::once(n.to_string())
                .chain(names.iter().cloned())
                .collect(),
        ),
        None => (types, names.to_vec()),
    };
    let mut rs = Vec::new();
    for t in types.split(',') {
        if t == "all" {
            for all in ["pods", "services", "deployments", "replicasets"] {
                rs.push(resource(all)?);
            }
        } else {
            rs.push(resource(t)?);
        }
    }
    Ok((rs, names))
}

/// Events oldest first, as kubectl lists them.
fn sort_events(items: &mut [Value]) {
    items.sort_by(|a, b| {
        a["lastTimestamp"]
            .as_str()
            .cmp(&b["lastTimestamp"].as_str())
    });
}

impl Ctx {
    /// `get`: each resource's objects (listed, or the named ones) in the chosen format; with
    /// `--watch`, the first resource's list and then its changes, until the stream ends.
    pub(super) async fn get(&self, args: GetArgs) -> Result<()> {
        let fmt = Format::parse(args.output.as_deref())?;
        let (rs, names) = resources_and_names(&args.types, &args.names)?;
        let (sel, fsel) = (args.selector.as_deref(), args.field_selector.as_deref());
        let several = rs.len() > 1;
        let mut structured = Vec::new();
        let mut first = true;
        for r in &rs {
            let ns = (!args.all_namespaces && r.namespaced).then_some(self.ns.as_str());
            let objs = if !names.is_empty() {
                let mut v = Vec::new();
                for n in &names {
                    v.push(self.client.get_dyn(r, ns, n).await?);
                }
                v
            } else if args.watch {
                // A list of whatever RESOURCE names, so read as JSON.
                let (items, rv) = self.list(r, ns, sel, fsel).await?;
                let all_ns = args.all_namespaces;
                return self.watch(r, ns, &rv, items, fmt, all_ns, sel, fsel).await;
            } else {
                self.list(r, ns, sel, fsel).await?.0
            };
            match fmt {
                Format::Yaml | Format::Json => structured.extend(objs),
                Format::Name => objs
                    .iter()
                    .for_each(|o| println!("{}", print::name_of(r, o))),
                Format::Table | Format::Wide if objs.is_empty() => {
                    if !several {
                        match ns {
                            Some(n) => eprintln!("No resources found in {n} namespace."),
                            None => eprintln!("No resources found"),
                        }
                    }
                }
                Format::Table | Format::Wide => {
                    if !first {
                        println!();
                    }
                    first = false;
                    print::table(
                        r,
                        &objs,
                        fmt,
                        args.all_namespaces,
                        several,
                        args.show_labels,
                    );
                }
            }
        }
        if matches!(fmt, Format::Yaml | Format::Json) {
            let single = rs.len() == 1 && names.len() == 1;
            print::structured(&structured, single, fmt)?;
        }
        Ok(())
    }

    /// The objects of `r` (events oldest first) and the list's resource version.
    async fn list(
        &self,
        r: &Resource,
        ns: Option<&str>,
        sel: Option<&str>,
        fsel: Option<&str>,
    ) -> Result<(Vec<Value>, String)> {
        let list = self.client.list_dyn(r, ns, sel, fsel).await?;
        let mut items = list["items"].as_array().cloned().unwrap_or_default();
        if r.kind == "Event" {
            sort_events(&mut items);
        }
        let rv = list["metadata"]["resourceVersion"].as_str().unwrap_or("");
        Ok((items, rv.to_string()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn watch(
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

    /// `describe TYPE NAME` (or `TYPE/NAME`): the header every kind has, the kind's own
    /// block, then the object's events.
    pub(super) async fn describe(&self, kind: &str, name: &str) -> Result<()> {
        let (kind, name) = match kind.split_once('/') {
            Some((k, n)) if name.is_empty() => (k, n),
            _ => (kind, name),
        };
        let r = resource(kind)?;
        let ns = r.namespaced.then_some(self.ns.as_str());
        let o = self.client.get_dyn(r, ns, name).await?;
        describe_header(name, &o);
        match r.kind {
            "Pod" => describe_pod(&typed(&o)?, &o),
            "Deployment" => describe_deployment(&typed(&o)?, &table_selector(r.kind, &o)),
            "ReplicaSet" => describe_replicaset(&typed(&o)?, &table_selector(r.kind, &o)),
            "Service" => {
                let svc: Service = typed(&o)?;
                describe_service(&svc, &table_selector(r.kind, &o));
                let eps = match self.client.get_dyn(resource("endpoints")?, ns, name).await {
                    Ok(ep) => skiff_api::table::row("Endpoints", &ep, 0)[1].clone(),
                    Err(_) => "<none>".into(),
                };
                kv("Endpoints", eps);
                kv(
                    "Session Affinity",
                    or_none(svc.spec.and_then(|s| s.session_affinity)),
                );
            }
            "Node" => describe_node(&typed(&o)?),
            _ => describe_spec(&o)?,
        }
        self.describe_events(r, name, meta::namespace(&o)).await
    }

    /// The `Events:` block of `describe`: the object's events, oldest first.
    async fn describe_events(&self, r: &Resource, name: &str, ns: Option<&str>) -> Result<()> {
        let involved = format!("involvedObject.name={name},involvedObject.kind={}", r.kind);
        let events = resource("events")?;
        let (items, _) = self
            .list(events, ns.or(Some("default")), None, Some(&involved))
            .await?;
        if items.is_empty() {
            println!("Events:           <none>");
            return Ok(());
        }
        println!("Events:");
        let mut rows = vec![["  Type", "Reason", "Age", "From", "Message"]
            .map(String::from)
            .to_vec()];
        for e in items {
            let age = skiff_api::table::age(e["lastTimestamp"].as_str(), print::now());
            let age = match e["count"].as_i64().unwrap_or(1) {
                count if count > 1 => format!("{age} (x{count})"),
                _ => age,
            };
            let text = |v: &Value| v.as_str().unwrap_or("").to_string();
            rows.push(vec![
                format!("  {}", text(&e["type"])),
                text(&e["reason"]),
                age,
                text(&e["source"]["component"]),
                text(&e["message"]),
            ]);
        }
        print::print_rows(&rows);
        Ok(())
    }
}
