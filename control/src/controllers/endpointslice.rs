//! The EndpointSlice controller: for each Service with a selector, its pods' addresses in
//! `discovery.k8s.io/v1` EndpointSlices of at most 100 endpoints, one set of slices per
//! resolved port set, as Kubernetes' endpointslice controller keeps them: labelled
//! `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by`, owned by the
//! Service, each endpoint with `ready`/`serving`/`terminating`, its node, hostname and pod.
//! A Service with no endpoints has one empty slice. A Service without a selector gets its
//! hand-written Endpoints mirrored into slices (managed by
//! `endpointslicemirroring-controller.k8s.io`, owned by the Endpoints), as Kubernetes'
//! mirroring controller does. The Endpoints controller runs beside it.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use skiff_api::selector::Selector;
use skiff_api::ApiError;

use super::api;
use super::endpoints::target_port;
use super::pods;
use super::runtime::{split_key, Action, Cache, Expectations, Reconciler};
use crate::registry::Registry;

/// The label naming a slice's Service.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label naming a slice's manager.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// This controller's name in [`MANAGED_BY`], as Kubernetes'.
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// The manager of slices mirrored from a selectorless Service's Endpoints.
pub const MIRRORING: &str = "endpointslicemirroring-controller.k8s.io";
/// The label on Endpoints that are not to be mirrored.
pub const SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// Endpoints per slice (`--max-endpoints-per-slice`'s default).
pub const MAX_ENDPOINTS: usize = 100;

pub struct EndpointSliceController {
    pub reg: Arc<Registry>,
    pub services: Arc<Cache<Service>>,
    pub pods: Arc<Cache<Pod>>,
    pub endpoints: Arc<Cache<Endpoints>>,
    pub slices: Arc<Cache<EndpointSlice>>,
    pub expect: Expectations,
}

/// What one slice holds: its ports and endpoints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Content {
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// The slices a Service's pods make: endpoints grouped by the ports they resolve to, sorted by
/// address, cut into slices of at most `max`. No endpoints: one empty slice.
pub fn desired(svc: &Service, pods: &[Arc<Pod>], max: usize) -> Vec<Content> {
    let spec = svc.spec.clone().unwrap_or_default();
    let ports: &[ServicePort] = spec.ports.as_deref().unwrap_or_default();
    let svc_name = svc.metadata.name.as_deref().unwrap_or("");
    let publish = spec.publish_not_ready_addresses == Some(true);
    let mut groups: BTreeMap<String, Content> = BTreeMap::new();
    for p in pods {
        let Some(ip) = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
        else {
            continue;
        };
        if pods::is_terminal(p) {
            continue;
        }
        let eps: Vec<EndpointPort> = ports
            .iter()
            .filter_map(|sp| {
                Some(EndpointPort {
                    port: Some(target_port(sp, p)?),
                    protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                    name: Some(sp.name.clone().unwrap_or_default()),
                    app_protocol: sp.app_protocol.clone(),
                })
            })
            .collect();
        if eps.is_empty() && !ports.is_empty() {
            continue;
        }
        let pod_spec = p.spec.as_ref();
        // As Kubernetes: `ready` never true for a terminating pod (unless the Service
        // publishes not-ready addresses); `serving` is the pod's readiness whatever it is.
        let serving = pods::is_ready(p);
        let terminating = p.metadata.deletion_timestamp.is_some();
        let ready = publish || (serving && !terminating);
        let hostname = pod_spec
            .filter(|s| s.subdomain.as_deref() == Some(svc_name))
            .and_then(|s| s.hostname.clone());
        let endpoint = Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            hostname,
            node_name: pod_spec.and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                namespace: p.metadata.namespace.clone(),
                uid: p.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let key = serde_json::to_string(&eps).unwrap_or_default();
        groups
            .entry(key)
            .or_insert_with(|| Content {
                ports: eps,
                endpoints: Vec::new(),
            })
            .endpoints
            .push(endpoint);
    }
    let mut out = Vec::new();
    for (_, mut g) in groups {
        g.endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
        for chunk in g.endpoints.chunks(max.max(1)) {
            out.push(Content {
                ports: g.ports.clone(),
                endpoints: chunk.to_vec(),
            });
        }
    }
    if out.is_empty() {
        out.push(Content::default());
    }
    out
}

fn content_of(s: &EndpointSlice) -> Content {
    Content {
        ports: s.ports.clone().unwrap_or_default(),
        endpoints: s.endpoints.clone().unwrap_or_default(),
    }
}

/// The labels of a Service's slices: the Service's own, the service name and the manager,
/// and `service.kubernetes.io/headless` for a headless Service, as Kubernetes sets them.
fn labels(svc: &Service) -> BTreeMap<String, String> {
    let mut l = svc.metadata.labels.clone().unwrap_or_default();
    l.remove("service.kubernetes.io/headless");
    if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        l.insert("service.kubernetes.io/headless".into(), String::new());
    }
    l.insert(
        SERVICE_NAME.into(),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    l.insert(MANAGED_BY.into(), CONTROLLER.into());
    l
}

/// A selectorless Service's hand-written Endpoints as slices, as Kubernetes'
/// endpointslicemirroring controller makes them: a slice per subset (cut at 100), ready
/// addresses ready, not-ready ones not.
pub fn mirrored(ep: &Endpoints, max: usize) -> Vec<Content> {
    let mut out = Vec::new();
    for subset in ep.subsets.iter().flatten() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                port: Some(p.port),
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                name: Some(p.name.clone().unwrap_or_default()),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for (ready, addrs) in [
            (true, subset.addresses.iter().flatten()),
            (false, subset.not_ready_addresses.iter().flatten()),
        ] {
            for a in addrs.filter(|a| a.ip.parse::<std::net::Ipv4Addr>().is_ok()) {
                endpoints.push(Endpoint {
                    addresses: vec![a.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        ..Default::default()
                    }),
                    hostname: a.hostname.clone(),
                    node_name: a.node_name.clone(),
                    target_ref: a.target_ref.clone(),
                    ..Default::default()
                });
            }
        }
        for chunk in endpoints.chunks(max.max(1)) {
            out.push(Content {
                ports: ports.clone(),
                endpoints: chunk.to_vec(),
            });
        }
    }
    out
}

impl EndpointSliceController {
    pub fn new(
        reg: Arc<Registry>,
        services: Arc<Cache<Service>>,
        pods: Arc<Cache<Pod>>,
        endpoints: Arc<Cache<Endpoints>>,
        slices: Arc<Cache<EndpointSlice>>,
    ) -> Self {
        EndpointSliceController {
            reg,
            services,
            pods,
            endpoints,
            slices,
            expect: Expectations::default(),
        }
    }

    /// The slices `manager` made for the Service `ns/name`, by name.
    fn owned(&self, ns: Option<&str>, name: &str, manager: &str) -> Vec<Arc<EndpointSlice>> {
        let mut out: Vec<_> = self
            .slices
            .list(ns)
            .into_iter()
            .filter(|s| {
                let l = s.metadata.labels.as_ref();
                l.and_then(|l| l.get(SERVICE_NAME)).map(String::as_str) == Some(name)
                    && l.and_then(|l| l.get(MANAGED_BY)).map(String::as_str) == Some(manager)
            })
            .collect();
        out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        out
    }

    fn delete(&self, s: &EndpointSlice) -> Result<u64, ApiError> {
        let m = &s.metadata;
        match api::delete::<EndpointSlice>(
            &self.reg,
            m.namespace.as_deref(),
            m.name.as_deref().unwrap_or(""),
            &Default::default(),
        ) {
            Ok(rev) => Ok(rev),
            Err(e) if e.code == 404 => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Deletes every slice `manager` made for `ns/name`; the revision of the last write.
    fn delete_all(&self, ns: Option<&str>, name: &str, manager: &str) -> Result<u64, ApiError> {
        let mut last = 0;
        for s in self.owned(ns, name, manager) {
            last = last.max(self.delete(&s)?);
        }
        Ok(last)
    }

    /// Makes `existing` hold `want`: slices already holding a wanted content stay, the rest
    /// are rewritten, new ones made and leftovers deleted. The revision of the last write.
    fn sync(
        &self,
        ns: Option<&str>,
        name: &str,
        existing: &[Arc<EndpointSlice>],
        want: Vec<Content>,
        labels: &BTreeMap<String, String>,
        owner: &OwnerReference,
    ) -> Result<u64, ApiError> {
        let mut last = 0;
        let owners = std::slice::from_ref(owner);
        let mut used = vec![false; existing.len()];
        let mut todo = Vec::new();
        for c in want {
            match (0..existing.len()).find(|&i| !used[i] && content_of(&existing[i]) == c) {
                Some(i) => {
                    used[i] = true;
                    let s = &existing[i];
                    if s.metadata.labels.as_ref() != Some(labels)
                        || s.metadata.owner_references.as_deref() != Some(owners)
                    {
                        let mut next = (**s).clone();
                        next.metadata.labels = Some(labels.clone());
                        next.metadata.owner_references = Some(owners.to_vec());
                        let out = api::update(&self.reg, &next)?;
                        last = last.max(api::revision(&out.metadata));
                    }
                }
                None => todo.push(c),
            }
        }
        for c in todo {
            let slot = (0..existing.len()).find(|&i| !used[i]);
            let out = match slot {
                Some(i) => {
                    used[i] = true;
                    let mut next = (*existing[i]).clone();
                    next.metadata.labels = Some(labels.clone());
                    next.metadata.owner_references = Some(owners.to_vec());
                    next.address_type = "IPv4".into();
                    next.ports = Some(c.ports);
                    next.endpoints = Some(c.endpoints);
                    api::update(&self.reg, &next)?
                }
                None => api::create(
                    &self.reg,
                    ns,
                    &EndpointSlice {
                        metadata: ObjectMeta {
                            generate_name: Some(format!("{name}-")),
                            namespace: ns.map(String::from),
                            labels: Some(labels.clone()),
                            owner_references: Some(owners.to_vec()),
                            ..Default::default()
                        },
                        address_type: "IPv4".into(),
                        ports: Some(c.ports),
                        endpoints: Some(c.endpoints),
                    },
                )?,
            };
            last = last.max(api::revision(&out.metadata));
        }
        for (i, s) in existing.iter().enumerate() {
            if !used[i] {
                last = last.max(self.delete(s)?);
            }
        }
        Ok(last)
    }

    /// A selectorless Service's slices mirror its Endpoints, unless they are marked
    /// `endpointslice.kubernetes.io/skip-mirror` (the `kubernetes` Service's are).
    fn mirror(&self, key: &str) -> Result<u64, ApiError> {
        let (ns, name) = split_key(key);
        let ep = self.endpoints.get(key).filter(|ep| {
            ep.metadata
                .labels
                .as_ref()
                .is_none_or(|l| l.get(SKIP_MIRROR).map(String::as_str) != Some("true"))
        });
        let Some(ep) = ep else {
            return self.delete_all(ns, name, MIRRORING);
        };
        let mut labels = ep.metadata.labels.clone().unwrap_or_default();
        labels.insert(SERVICE_NAME.into(), name.to_string());
        labels.insert(MANAGED_BY.into(), MIRRORING.into());
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Endpoints".into(),
            name: name.to_string(),
            uid: ep.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let existing = self.owned(ns, name, MIRRORING);
        self.sync(
            ns,
            name,
            &existing,
            mirrored(&ep, MAX_ENDPOINTS),
            &labels,
            &owner,
        )
    }
}

impl Reconciler for EndpointSliceController {
    fn name(&self) -> &'static str {
        "endpointslice"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        self.expect.settle(key, &self.slices).await;
        let (ns, name) = split_key(key);
        let Some(svc) = self.services.get(key) else {
            // The Service is gone: so are its slices (the garbage collector would also
            // take them, by their owner).
            let last = self
                .delete_all(ns, name, CONTROLLER)?
                .max(self.delete_all(ns, name, MIRRORING)?);
            self.expect.wrote(key, last);
            return Ok(Action::AwaitChange);
        };
        let Some(sel_map) = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .filter(|m| !m.is_empty())
        else {
            // No selector: its Endpoints are someone else's, mirrored into slices.
            let last = self
                .delete_all(ns, name, CONTROLLER)?
                .max(self.mirror(key)?);
            self.expect.wrote(key, last);
            return Ok(Action::AwaitChange);
        };
        let pods = self.pods.select(ns, &Selector::from_map(sel_map));
        let want = desired(&svc, &pods, MAX_ENDPOINTS);
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Service".into(),
            name: name.to_string(),
            uid: svc.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let existing = self.owned(ns, name, CONTROLLER);
        let last = self
            .sync(ns, name, &existing, want, &labels(&svc), &owner)?
            .max(self.delete_all(ns, name, MIRRORING)?);
        self.expect.wrote(key, last);
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(i: usize, ready: bool) -> Arc<Pod> {
        let st = if ready { "True" } else { "False" };
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("web-{i}"), "namespace": "default", "uid": format!("u{i}")},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": format!("10.88.{}.{}", i / 200, i % 200 + 2),
                           "conditions": [{"type": "Ready", "status": st}]}
            }))
            .unwrap(),
        )
    }

    fn svc() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "s1", "labels": {"app": "web"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}
        }))
        .unwrap()
    }

    #[test]
    fn slices_hold_at_most_a_hundred_endpoints() {
        let pods: Vec<_> = (0..250).map(|i| pod(i, true)).collect();
        let want = desired(&svc(), &pods, MAX_ENDPOINTS);
        assert_eq!(
            want.iter().map(|c| c.endpoints.len()).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
        for c in &want {
            assert_eq!(c.ports.len(), 1);
            assert_eq!(c.ports[0].name.as_deref(), Some("web"));
            assert_eq!(c.ports[0].port, Some(8080));
        }
        let all: std::collections::BTreeSet<_> = want
            .iter()
            .flat_map(|c| c.endpoints.iter().map(|e| e.addresses[0].clone()))
            .collect();
        assert_eq!(all.len(), 250, "every pod in exactly one slice");
        let e = &want[0].endpoints[0];
        assert_eq!(e.node_name.as_deref(), Some("n1"));
        assert_eq!(
            e.target_ref.as_ref().and_then(|r| r.kind.as_deref()),
            Some("Pod")
        );
    }

    #[test]
    fn hand_written_endpoints_are_mirrored() {
        let ep: Endpoints = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": "192.168.1.5"}], "notReadyAddresses": [{"ip": "192.168.1.6"}],
                         "ports": [{"name": "pg", "port": 5432}]}]
        }))
        .unwrap();
        let m = mirrored(&ep, MAX_ENDPOINTS);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].ports[0].port, Some(5432));
        assert_eq!(m[0].ports[0].protocol.as_deref(), Some("TCP"));
        let ready: Vec<_> = m[0]
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].as_str(),
                    e.conditions.as_ref().unwrap().ready,
                )
            })
            .collect();
        assert_eq!(
            ready,
            vec![("192.168.1.5", Some(true)), ("192.168.1.6", Some(false))]
        );
    }

    #[test]
    fn conditions_follow_readiness_and_termination() {
        let mut terminating = (*pod(1, true)).clone();
        terminating.metadata.deletion_timestamp = Some(api::now());
        let pods = vec![pod(0, true), Arc::new(terminating), pod(2, false)];
        let want = desired(&svc(), &pods, MAX_ENDPOINTS);
        let conds: Vec<_> = want[0]
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (c.ready, c.serving, c.terminating)
            })
            .collect();
        assert_eq!(
            conds,
            vec![
                (Some(true), Some(true), Some(false)),
                (Some(false), Some(true), Some(true)),
                (Some(false), Some(false), Some(false)),
            ]
        );
        // No pods: one empty slice.
        assert_eq!(
            desired(&svc(), &[], MAX_ENDPOINTS),
            vec![Content::default()]
        );
        let l = labels(&svc());
        assert_eq!(l[SERVICE_NAME], "web");
        assert_eq!(l[MANAGED_BY], CONTROLLER);
        assert_eq!(l["app"], "web");
    }
}
