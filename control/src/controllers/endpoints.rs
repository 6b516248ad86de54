//! The Endpoints controller: for each Service with a selector, the addresses of matching pods,
//! ready ones in `addresses` and the rest in `notReadyAddresses`; named target ports resolved
//! per pod. It also publishes LoadBalancer ingress addresses (the nodes' InternalIPs), as
//! k3s's ServiceLB does.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};
use skiff_api::selector::Selector;
use skiff_api::{meta, ApiError, Resource};

use super::pods;
use super::runtime::{split_key, Action, Cache, Reconciler};
use crate::registry::{Registry, Sub, WriteOptions};

pub struct EndpointsController {
    pub reg: Arc<Registry>,
    pub services: Arc<Cache>,
    pub pods: Arc<Cache>,
    pub endpoints: Arc<Cache>,
    pub nodes: Arc<Cache>,
}

/// The port a service port targets on one pod: a number, or a container port by name.
fn target_port(svc_port: &Value, pod: &Value) -> Option<i64> {
    match svc_port.get("targetPort") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(name)) => {
            if let Ok(n) = name.parse::<i64>() {
                return Some(n);
            }
            pod.pointer("/spec/containers")
                .and_then(Value::as_array)?
                .iter()
                .flat_map(|c| {
                    c.get("ports")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
                .and_then(|p| p.get("containerPort").and_then(Value::as_i64))
        }
        _ => svc_port.get("port").and_then(Value::as_i64),
    }
}

/// Subsets for a service over its pods, grouped by resolved port set.
pub fn subsets(svc: &Value, pods: &[Arc<Value>]) -> (Value, Vec<String>) {
    let ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut groups: BTreeMap<String, (Value, Vec<Value>, Vec<Value>)> = BTreeMap::new();
    let mut unresolved = Vec::new();
    for p in pods {
        let ip = p
            .pointer("/status/podIP")
            .and_then(Value::as_str)
            .unwrap_or("");
        if ip.is_empty() || pods::is_terminal(p) {
            continue;
        }
        let mut eps = Vec::new();
        for sp in &ports {
            match target_port(sp, p) {
                Some(port) => {
                    let mut e = json!({"port": port, "protocol": sp.get("protocol").cloned().unwrap_or(json!("TCP"))});
                    if let Some(n) = sp
                        .get("name")
                        .filter(|n| n.as_str().is_some_and(|s| !s.is_empty()))
                    {
                        e["name"] = n.clone();
                    }
                    eps.push(e);
                }
                None => unresolved.push(format!(
                    "{} (pod {})",
                    sp.get("targetPort")
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    meta::name(p)
                )),
            }
        }
        if eps.is_empty() {
            continue;
        }
        let key = serde_json::to_string(&eps).unwrap_or_default();
        let mut addr = json!({
            "ip": ip,
            "nodeName": p.pointer("/spec/nodeName"),
            "targetRef": {"kind": "Pod", "name": meta::name(p), "namespace": meta::namespace(p), "uid": meta::uid(p)},
        });
        // A pod naming this service as its subdomain is `HOSTNAME.SERVICE.NS.svc` in DNS.
        if let Some(h) = p.pointer("/spec/hostname").and_then(Value::as_str) {
            if p.pointer("/spec/subdomain").and_then(Value::as_str) == Some(meta::name(svc)) {
                addr["hostname"] = json!(h);
            }
        }
        let entry = groups
            .entry(key)
            .or_insert_with(|| (json!(eps), Vec::new(), Vec::new()));
        if pods::is_ready(p) && !meta::is_deleting(p) {
            entry.1.push(addr);
        } else {
            entry.2.push(addr);
        }
    }
    let mut out = Vec::new();
    for (_, (ports, mut ready, mut not_ready)) in groups {
        ready.sort_by(|a, b| a["ip"].as_str().cmp(&b["ip"].as_str()));
        not_ready.sort_by(|a, b| a["ip"].as_str().cmp(&b["ip"].as_str()));
        let mut s = json!({"ports": ports});
        if !ready.is_empty() {
            s["addresses"] = json!(ready);
        }
        if !not_ready.is_empty() {
            s["notReadyAddresses"] = json!(not_ready);
        }
        out.push(s);
    }
    (json!(out), unresolved)
}

impl Reconciler for EndpointsController {
    fn name(&self) -> &'static str {
        "endpoints"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let (ns, name) = split_key(key);
        let epr = Resource::lookup("endpoints").expect("ep");
        let opts = WriteOptions::default();
        let Some(svc) = self.services.get(key) else {
            // The service is gone: so are its endpoints.
            if let Some(ep) = self.endpoints.get(key) {
                if !meta::labels(&ep).contains_key("endpointslice.kubernetes.io/skip-mirror") {
                    match self.reg.delete(epr, ns, name, &Default::default()) {
                        Ok(_) => {}
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            return Ok(Action::AwaitChange);
        };
        self.load_balancer(&svc)?;
        let Some(sel_map) = svc
            .pointer("/spec/selector")
            .filter(|s| s.as_object().is_some_and(|m| !m.is_empty()))
        else {
            return Ok(Action::AwaitChange);
        };
        let sel = Selector::from_map(&meta::string_map(Some(sel_map)));
        let pods = self.pods.select(ns, &sel);
        let (subsets, unresolved) = subsets(&svc, &pods);
        if !unresolved.is_empty() {
            super::events::record(
                &self.reg,
                &svc,
                "Warning",
                "FailedToResolveTargetPort",
                &format!(
                    "no container declares target port {}",
                    unresolved.join(", ")
                ),
                "endpoint-controller",
            );
        }
        let mut labels = meta::labels(&svc);
        labels.insert(
            "endpoints.kubernetes.io/managed-by".into(),
            "endpoint-controller".into(),
        );
        match self.endpoints.get(key) {
            Some(ep) if ep.get("subsets").cloned().unwrap_or(json!([])) == subsets => {}
            Some(ep) => {
                let mut next = (*ep).clone();
                next["subsets"] = subsets;
                next["metadata"]["labels"] = json!(labels);
                self.reg.update(epr, ns, name, next, Sub::Main, &opts)?;
            }
            None => {
                let ep = json!({"metadata": {"name": name, "namespace": ns, "labels": labels}, "subsets": subsets});
                match self.reg.create(epr, ns, ep, &opts) {
                    Ok(_) => {}
                    Err(e) if e.code == 409 => return Err(e),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Action::AwaitChange)
    }
}

impl EndpointsController {
    fn load_balancer(&self, svc: &Value) -> Result<(), ApiError> {
        if svc.pointer("/spec/type").and_then(Value::as_str) != Some("LoadBalancer") {
            return Ok(());
        }
        let mut ips: Vec<String> = self
            .nodes
            .list(None)
            .iter()
            .filter(|n| super::nodelifecycle::is_ready(n))
            .filter_map(|n| {
                n.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
                    .and_then(|x| x["address"].as_str().map(String::from))
            })
            .collect();
        ips.sort();
        ips.dedup();
        let ingress: Vec<Value> = ips
            .iter()
            .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
            .collect();
        let want = json!({"ingress": ingress});
        let want = if ingress.is_empty() { json!({}) } else { want };
        if svc.pointer("/status/loadBalancer") != Some(&want) {
            let mut next = svc.clone();
            next["status"] = json!({"loadBalancer": want});
            let svcr = Resource::lookup("services").expect("svc");
            self.reg.update(
                svcr,
                meta::namespace(svc),
                meta::name(svc),
                next,
                Sub::Status,
                &WriteOptions::default(),
            )?;
        }
        Ok(())
    }
}
