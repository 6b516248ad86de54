//! The Endpoints controller: for each Service with a selector, the addresses of matching pods,
//! ready ones in `addresses` and the rest in `notReadyAddresses`; named target ports resolved
//! per pod. It also publishes LoadBalancer ingress addresses (the nodes' InternalIPs), as
//! k3s's ServiceLB does.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, LoadBalancerIngress,
    LoadBalancerStatus, Node, ObjectReference, Pod, Service, ServicePort, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use skiff_api::conditions;
use skiff_api::selector::Selector;
use skiff_api::ApiError;

use super::api;
use super::pods;
use super::runtime::{split_key, Action, Cache, Reconciler};
use crate::registry::Registry;

pub struct EndpointsController {
    pub reg: Arc<Registry>,
    pub services: Arc<Cache<Service>>,
    pub pods: Arc<Cache<Pod>>,
    pub endpoints: Arc<Cache<Endpoints>>,
    pub nodes: Arc<Cache<Node>>,
}

/// The port a service port targets on one pod: a number, or a container port by name.
pub(crate) fn target_port(svc_port: &ServicePort, pod: &Pod) -> Option<i32> {
    match &svc_port.target_port {
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
        }
        None => Some(svc_port.port),
    }
}

/// Subsets for a service over its pods, grouped by resolved port set, and the target ports
/// no container declares.
pub fn subsets(svc: &Service, pods: &[Arc<Pod>]) -> (Vec<EndpointSubset>, Vec<String>) {
    let ports: &[ServicePort] = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let svc_name = svc.metadata.name.as_deref().unwrap_or("");
    type Group = (
        Vec<EndpointPort>,
        Vec<EndpointAddress>,
        Vec<EndpointAddress>,
    );
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut unresolved = Vec::new();
    for p in pods {
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .unwrap_or("");
        if ip.is_empty() || pods::is_terminal(p) {
            continue;
        }
        let pod_name = p.metadata.name.as_deref().unwrap_or("");
        let mut eps = Vec::new();
        for sp in ports {
            match target_port(sp, p) {
                Some(port) => eps.push(EndpointPort {
                    port,
                    protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                    name: sp.name.clone().filter(|n| !n.is_empty()),
                    ..Default::default()
                }),
                None => unresolved.push(format!(
                    "{} (pod {pod_name})",
                    match &sp.target_port {
                        Some(IntOrString::Int(n)) => n.to_string(),
                        Some(IntOrString::String(s)) => format!("{s:?}"),
                        None => String::new(),
                    }
                )),
            }
        }
        if eps.is_empty() {
            continue;
        }
        let key = serde_json::to_string(&eps).unwrap_or_default();
        let spec = p.spec.as_ref();
        let mut addr = EndpointAddress {
            ip: ip.to_string(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                namespace: p.metadata.namespace.clone(),
                uid: p.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A pod naming this service as its subdomain is `HOSTNAME.SERVICE.NS.svc` in DNS.
        if let Some(h) = spec.and_then(|s| s.hostname.as_ref()) {
            if spec.and_then(|s| s.subdomain.as_deref()) == Some(svc_name) {
                addr.hostname = Some(h.clone());
            }
        }
        let entry = groups
            .entry(key)
            .or_insert_with(|| (eps, Vec::new(), Vec::new()));
        if pods::is_ready(p) && p.metadata.deletion_timestamp.is_none() {
            entry.1.push(addr);
        } else {
            entry.2.push(addr);
        }
    }
    let mut out = Vec::new();
    for (_, (ports, mut ready, mut not_ready)) in groups {
        ready.sort_by(|a, b| a.ip.cmp(&b.ip));
        not_ready.sort_by(|a, b| a.ip.cmp(&b.ip));
        out.push(EndpointSubset {
            ports: Some(ports),
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
        });
    }
    (out, unresolved)
}

impl Reconciler for EndpointsController {
    fn name(&self) -> &'static str {
        "endpoints"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let (ns, name) = split_key(key);
        let Some(svc) = self.services.get(key) else {
            // The service is gone: so are its endpoints.
            if let Some(ep) = self.endpoints.get(key) {
                let mirrored = ep
                    .metadata
                    .labels
                    .as_ref()
                    .is_none_or(|l| !l.contains_key("endpointslice.kubernetes.io/skip-mirror"));
                if mirrored {
                    match api::delete::<Endpoints>(&self.reg, ns, name, &Default::default()) {
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
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .filter(|m| !m.is_empty())
        else {
            return Ok(Action::AwaitChange);
        };
        let sel = Selector::from_map(sel_map);
        let pods = self.pods.select(ns, &sel);
        let (subsets, unresolved) = subsets(&svc, &pods);
        if !unresolved.is_empty() {
            super::events::record(
                &self.reg,
                &*svc,
                "Warning",
                "FailedToResolveTargetPort",
                &format!(
                    "no container declares target port {}",
                    unresolved.join(", ")
                ),
                "endpoint-controller",
            );
        }
        let mut labels = svc.metadata.labels.clone().unwrap_or_default();
        labels.insert(
            "endpoints.kubernetes.io/managed-by".into(),
            "endpoint-controller".into(),
        );
        match self.endpoints.get(key) {
            Some(ep) if ep.subsets.as_deref().unwrap_or_default() == subsets.as_slice() => {}
            Some(ep) => {
                // Endpoints have nothing but metadata and subsets: the whole object is ours.
                let mut next = (*ep).clone();
                next.subsets = Some(subsets);
                next.metadata.labels = Some(labels);
                api::update(&self.reg, &next)?;
            }
            None => {
                let ep = Endpoints {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: ns.map(String::from),
                        labels: Some(labels),
                        ..Default::default()
                    },
                    subsets: Some(subsets),
                };
                api::create(&self.reg, ns, &ep)?;
            }
        }
        Ok(Action::AwaitChange)
    }
}

impl EndpointsController {
    fn load_balancer(&self, svc: &Service) -> Result<(), ApiError> {
        if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) != Some("LoadBalancer") {
            return Ok(());
        }
        let mut ips: Vec<String> = self
            .nodes
            .list(None)
            .iter()
            .filter(|n| {
                conditions::is_true(
                    n.status.as_ref().and_then(|s| s.conditions.as_deref()),
                    "Ready",
                )
            })
            .filter_map(|n| {
                n.status
                    .as_ref()?
                    .addresses
                    .as_ref()?
                    .iter()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address.clone())
            })
            .collect();
        ips.sort();
        ips.dedup();
        let want = LoadBalancerStatus {
            ingress: (!ips.is_empty()).then(|| {
                ips.into_iter()
                    .map(|ip| LoadBalancerIngress {
                        ip: Some(ip),
                        ip_mode: Some("VIP".into()),
                        ..Default::default()
                    })
                    .collect()
            }),
        };
        if svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()) != Some(&want) {
            api::update_status(
                &self.reg,
                svc,
                &ServiceStatus {
                    load_balancer: Some(want),
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }
}
