//! From Services and EndpointSlices to frontends: which local addresses answer for which
//! service port, and which pod addresses stand behind each. Pure functions over the API
//! objects, so the proxy's whole routing decision is unit-tested without sockets.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service, ServicePort,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;

/// How a frontend treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Declared HTTP (`appProtocol: http`, or a port named `http`/`http-*`): balanced per
    /// request.
    Http,
    /// Declared as something else: balanced per connection, bytes copied both ways.
    Tcp,
    /// Undeclared: HTTP/1 when the client's first bytes are an HTTP request line, else TCP.
    Auto,
}

/// One local address answering for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub addr: SocketAddr,
    /// `namespace/name:port-name` (port name may be empty).
    pub service: String,
    /// The address is the service's ClusterIP (bound locally), not a node address.
    pub cluster_ip: bool,
    pub mode: Mode,
    /// `sessionAffinity: ClientIP` and its timeout.
    pub affinity: Option<Duration>,
    /// Ready endpoints, sorted.
    pub backends: Vec<SocketAddr>,
}

/// What this node listens on besides service virtual IPs.
#[derive(Debug, Clone)]
pub struct NodeAddresses {
    /// Where node ports are opened (kube-proxy's `--nodeport-addresses`); `0.0.0.0` means every
    /// address of the node, 127.0.0.1 included.
    pub nodeport: Vec<IpAddr>,
    /// The node's InternalIP: a LoadBalancer service's ingress address answers its port here.
    pub node_ip: IpAddr,
}

impl Default for NodeAddresses {
    fn default() -> Self {
        NodeAddresses {
            nodeport: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            node_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// The cluster DNS service: served by the node's DNS server rather than proxied.
pub const DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");

/// `namespace/name` of an object.
pub fn key<K: Metadata<Ty = ObjectMeta>>(obj: &K) -> String {
    let m = obj.metadata();
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or("")
    )
}

/// The service's virtual IP, if it has one (not headless, not ExternalName).
pub fn cluster_ip(svc: &Service) -> Option<Ipv4Addr> {
    svc.spec
        .as_ref()?
        .cluster_ip
        .as_deref()
        .and_then(|s| s.parse().ok())
}

fn mode(port: &ServicePort) -> Mode {
    let name = port.name.as_deref().unwrap_or("");
    match port.app_protocol.as_deref() {
        Some(p) if p.eq_ignore_ascii_case("http") => return Mode::Http,
        Some(_) => return Mode::Tcp,
        None => {}
    }
    if name == "http" || name.starts_with("http-") {
        Mode::Http
    } else if name == "tcp" || name.starts_with("tcp-") {
        Mode::Tcp
    } else {
        Mode::Auto
    }
}

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Every service's slices: `namespace/service` → its EndpointSlices, by the
/// `kubernetes.io/service-name` label (slices without it belong to no service).
pub fn slices_by_service(
    slices: &BTreeMap<String, EndpointSlice>,
) -> BTreeMap<String, Vec<&EndpointSlice>> {
    let mut out: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices.values() {
        let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME)) else {
            continue;
        };
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        out.entry(format!("{ns}/{svc}")).or_default().push(s);
    }
    out
}

/// An endpoint's conditions as kube-proxy reads them: `ready` and `serving` unset mean
/// true, `terminating` unset means false.
fn conditions(e: &k8s_openapi::api::discovery::v1::Endpoint) -> (bool, bool, bool) {
    let c = e.conditions.as_ref();
    (
        c.and_then(|c| c.ready).unwrap_or(true),
        c.and_then(|c| c.serving).unwrap_or(true),
        c.and_then(|c| c.terminating).unwrap_or(false),
    )
}

/// The backends of one service port over the service's slices (merged, duplicates once):
/// the ready endpoints, or, when none is ready, the terminating ones still serving, as
/// kube-proxy falls back to them so connections are not refused while pods roll.
pub fn backends(slices: &[&EndpointSlice], port_name: &str) -> Vec<SocketAddr> {
    let (mut ready, mut terminating) = (Vec::new(), Vec::new());
    for s in slices {
        if s.address_type != "IPv4" && s.address_type != "IPv6" {
            continue;
        }
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            match conditions(e) {
                (true, _, _) => ready.push(SocketAddr::new(ip, port)),
                (false, true, true) => terminating.push(SocketAddr::new(ip, port)),
                _ => {}
            }
        }
    }
    let mut out = if ready.is_empty() { terminating } else { ready };
    out.sort();
    out.dedup();
    out
}

/// A service's slices as one Endpoints (a subset per slice: ready endpoints in `addresses`,
/// the others in `notReadyAddresses`), the form cluster DNS reads.
pub fn as_endpoints(slices: &[&EndpointSlice]) -> Endpoints {
    let subsets = slices
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .map(|s| {
            let (mut ready, mut not_ready) = (Vec::new(), Vec::new());
            for e in s.endpoints.iter().flatten() {
                let Some(ip) = e.addresses.first() else {
                    continue;
                };
                let a = EndpointAddress {
                    ip: ip.clone(),
                    hostname: e.hostname.clone(),
                    node_name: e.node_name.clone(),
                    target_ref: e.target_ref.clone(),
                };
                if conditions(e).0 {
                    ready.push(a);
                } else {
                    not_ready.push(a);
                }
            }
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: s.ports.as_ref().map(|ps| {
                    ps.iter()
                        .filter_map(|p| {
                            Some(EndpointPort {
                                name: p.name.clone().filter(|n| !n.is_empty()),
                                port: p.port?,
                                protocol: p.protocol.clone(),
                                app_protocol: p.app_protocol.clone(),
                            })
                        })
                        .collect()
                }),
            }
        })
        .collect();
    Endpoints {
        metadata: Default::default(),
        subsets: Some(subsets),
    }
}

/// Every frontend a service asks of this node.
pub fn frontends(svc: &Service, slices: &[&EndpointSlice], node: &NodeAddresses) -> Vec<Frontend> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" || key(svc) == format!("{}/{}", DNS_SERVICE.0, DNS_SERVICE.1) {
        return Vec::new();
    }
    let vip = cluster_ip(svc);
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u64::try_from(t).ok());
        Duration::from_secs(timeout.unwrap_or(10_800))
    });
    let lb_ingress: Vec<IpAddr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref().and_then(|s| s.parse().ok()))
        .collect();
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        let name = port.name.as_deref().unwrap_or("");
        let base = Frontend {
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            service: format!("{}:{name}", key(svc)),
            cluster_ip: false,
            mode: mode(port),
            affinity,
            backends: backends(slices, name),
        };
        let mut at = |addr: SocketAddr, cluster_ip: bool| {
            out.push(Frontend {
                addr,
                cluster_ip,
                ..base.clone()
            })
        };
        if let Some(ip) = vip {
            at(SocketAddr::from((ip, number)), true);
        }
        if ty == "NodePort" || ty == "LoadBalancer" {
            if let Some(np) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                for ip in &node.nodeport {
                    at(SocketAddr::new(*ip, np), false);
                }
            }
        }
        if ty == "LoadBalancer" && lb_ingress.contains(&node.node_ip) {
            at(SocketAddr::new(node.node_ip, number), false);
        }
    }
    out
}

/// All frontends of all services, by address. Two services claiming one address: the
/// first by name keeps it (the API server's allocators make this rare: only a LoadBalancer
/// port equal to a node port can collide).
pub fn build(
    services: &BTreeMap<String, Service>,
    slices: &BTreeMap<String, Vec<&EndpointSlice>>,
    node: &NodeAddresses,
) -> BTreeMap<SocketAddr, Frontend> {
    let mut out = BTreeMap::new();
    for (k, svc) in services {
        let none = Vec::new();
        for f in frontends(svc, slices.get(k).unwrap_or(&none), node) {
            out.entry(f.addr).or_insert(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use serde_json::Value;

    fn svc_json(ty: &str, ports: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"type": ty, "clusterIP": "10.96.0.7", "ports": ports}})
    }

    fn svc(ty: &str, ports: Value) -> Service {
        typed(svc_json(ty, ports))
    }

    fn typed<K: serde::de::DeserializeOwned>(v: Value) -> K {
        serde_json::from_value(v).unwrap()
    }

    fn eps(ports: Value, ips: &[&str]) -> EndpointSlice {
        typed(
            json!({"metadata": {"name": "web-abcde", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "ports": ports,
               "endpoints": ips.iter().map(|i| json!({"addresses": [i], "conditions": {"ready": true}})).collect::<Vec<_>>()}),
        )
    }

    #[test]
    fn cluster_ip_maps_port_to_ready_endpoints() {
        let s = svc("ClusterIP", json!([{"port": 80, "targetPort": 8080}]));
        let e = eps(
            json!([{"name": "", "port": 8080}]),
            &["10.88.0.3", "10.88.0.2"],
        );
        let f = frontends(&s, &[&e], &NodeAddresses::default());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].addr, "10.96.0.7:80".parse().unwrap());
        assert_eq!(
            f[0].backends,
            vec![
                "10.88.0.2:8080".parse().unwrap(),
                "10.88.0.3:8080".parse().unwrap()
            ]
        );
        assert_eq!(f[0].mode, Mode::Auto);
        assert_eq!(f[0].affinity, None);
        assert!(f[0].cluster_ip);
    }

    #[test]
    fn node_port_and_load_balancer_listen_on_the_node() {
        let node = NodeAddresses {
            nodeport: vec!["0.0.0.0".parse().unwrap()],
            node_ip: "192.168.1.5".parse().unwrap(),
        };
        let s = svc(
            "NodePort",
            json!([{"port": 8080, "nodePort": 30001, "name": "http"}]),
        );
        let addrs: Vec<_> = frontends(&s, &[], &node)
            .into_iter()
            .map(|f| (f.addr.to_string(), f.mode, f.cluster_ip))
            .collect();
        assert_eq!(
            addrs,
            vec![
                ("10.96.0.7:8080".to_string(), Mode::Http, true),
                ("0.0.0.0:30001".to_string(), Mode::Http, false)
            ]
        );
        let mut lb: Service = svc("LoadBalancer", json!([{"port": 8080, "nodePort": 30002}]));
        lb.status = Some(typed(
            json!({"loadBalancer": {"ingress": [{"ip": "192.168.1.5"}]}}),
        ));
        let addrs: Vec<_> = frontends(&lb, &[], &node)
            .into_iter()
            .map(|f| f.addr.to_string())
            .collect();
        assert_eq!(
            addrs,
            vec!["10.96.0.7:8080", "0.0.0.0:30002", "192.168.1.5:8080"]
        );
    }

    #[test]
    fn several_ports_pick_endpoint_ports_by_name() {
        let s = svc(
            "ClusterIP",
            json!([{"name": "web", "port": 80}, {"name": "admin", "port": 9000, "appProtocol": "grpc"}]),
        );
        let e = eps(
            json!([{"name": "admin", "port": 9900}, {"name": "web", "port": 8080}]),
            &["10.88.0.2"],
        );
        let f = frontends(&s, &[&e], &NodeAddresses::default());
        assert_eq!(f[0].backends, vec!["10.88.0.2:8080".parse().unwrap()]);
        assert_eq!(f[1].backends, vec!["10.88.0.2:9900".parse().unwrap()]);
        assert_eq!(f[1].mode, Mode::Tcp);
    }

    #[test]
    fn affinity_headless_udp_and_dns_service() {
        let mut s: Service = svc(
            "ClusterIP",
            json!([{"port": 80}, {"port": 53, "protocol": "UDP"}]),
        );
        let spec = s.spec.as_mut().unwrap();
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = Some(typed(json!({"clientIP": {"timeoutSeconds": 60}})));
        let f = frontends(&s, &[], &NodeAddresses::default());
        assert_eq!(f.len(), 1, "UDP ports are not proxied");
        assert_eq!(f[0].affinity, Some(Duration::from_secs(60)));
        assert!(f[0].backends.is_empty());

        s.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert!(frontends(&s, &[], &NodeAddresses::default()).is_empty());

        let mut dns: Service = svc("ClusterIP", json!([{"port": 53}]));
        dns.metadata.name = Some("kube-dns".into());
        dns.metadata.namespace = Some("kube-system".into());
        assert!(frontends(&dns, &[], &NodeAddresses::default()).is_empty());
    }

    fn endpoint(ip: &str, ready: bool, serving: bool, terminating: bool) -> Value {
        json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn slice(name: &str, endpoints: Vec<Value>) -> EndpointSlice {
        typed(
            json!({"metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
                     "addressType": "IPv4", "ports": [{"name": "", "port": 8080}], "endpoints": endpoints}),
        )
    }

    #[test]
    fn not_ready_endpoints_are_not_backends() {
        let s = slice(
            "web-1",
            vec![
                endpoint("10.88.0.2", true, true, false),
                endpoint("10.88.0.9", false, false, false),
            ],
        );
        assert_eq!(backends(&[&s], ""), vec!["10.88.0.2:8080".parse().unwrap()]);
    }

    /// A service's slices are merged (split at 100 by the controller: 250 endpoints in three
    /// slices here), terminating endpoints that still serve are used only when none is ready.
    #[test]
    fn slices_of_a_service_are_merged_and_terminating_ones_are_a_fallback() {
        let ip = |i: usize| format!("10.88.{}.{}", i / 200, i % 200 + 2);
        let mut all = BTreeMap::new();
        for (n, range) in [(0, 0..100), (1, 100..200), (2, 200..250)] {
            let eps = range.map(|i| endpoint(&ip(i), true, true, false)).collect();
            all.insert(format!("default/web-{n}"), slice(&format!("web-{n}"), eps));
        }
        let mut other = slice("db-1", vec![endpoint("10.88.9.9", true, true, false)]);
        other.metadata.labels = Some([(SERVICE_NAME.to_string(), "db".to_string())].into());
        all.insert("default/db-1".into(), other);
        let by = slices_by_service(&all);
        assert_eq!(by["default/web"].len(), 3);
        assert_eq!(by["default/db"].len(), 1);
        let s = svc("ClusterIP", json!([{"port": 80, "targetPort": 8080}]));
        let f = frontends(&s, &by["default/web"], &NodeAddresses::default());
        assert_eq!(f[0].backends.len(), 250);
        assert!(f[0]
            .backends
            .contains(&format!("{}:8080", ip(249)).parse().unwrap()));

        // One ready and one terminating-but-serving: only the ready one.
        let rolling = slice(
            "web-9",
            vec![
                endpoint("10.88.0.2", true, true, false),
                endpoint("10.88.0.3", false, true, true),
                endpoint("10.88.0.4", false, false, true),
            ],
        );
        assert_eq!(
            backends(&[&rolling], ""),
            vec!["10.88.0.2:8080".parse().unwrap()]
        );
        // None ready: the terminating ones that still serve.
        let draining = slice(
            "web-9",
            vec![
                endpoint("10.88.0.3", false, true, true),
                endpoint("10.88.0.4", false, false, true),
            ],
        );
        assert_eq!(
            backends(&[&draining], ""),
            vec!["10.88.0.3:8080".parse().unwrap()]
        );
        // DNS's view: ready endpoints as addresses, the rest not ready.
        let e = as_endpoints(&[&rolling]);
        let sub = &e.subsets.unwrap()[0];
        assert_eq!(sub.addresses.as_ref().unwrap().len(), 1);
        assert_eq!(sub.not_ready_addresses.as_ref().unwrap().len(), 2);
    }
}
