//! `get`, `describe` and `get --watch`: reading objects and printing them.

use super::*;

/// The `Conditions:` block of `describe`: type and status, and the reason where kubectl
/// shows one (workloads).
pub(super) fn print_conditions(o: &Value, with_reason: bool) {
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

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn get(
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

    pub(super) async fn describe(&self, kind: &str, name: &str) -> Result<()> {
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
}
