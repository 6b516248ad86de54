//! From Services and Endpoints to frontends: which local addresses answer for which service
//! port, and which pod addresses stand behind each. Pure functions over the API objects, so
//! the proxy's whole routing decision is unit-tested without sockets.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service, ServicePort};
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

/// The ready backends of one service port: the endpoint port with the service port's name,
/// in every subset.
pub fn backends(endpoints: Option<&Endpoints>, port_name: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for subset in endpoints
        .and_then(|e| e.subsets.as_ref())
        .into_iter()
        .flatten()
    {
        let Some(port) = subset
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| u16::try_from(p.port).ok())
        else {
            continue;
        };
        for a in subset.addresses.iter().flatten() {
            if let Ok(ip) = a.ip.parse::<IpAddr>() {
                out.push(SocketAddr::new(ip, port));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Every frontend a service asks of this node.
pub fn frontends(
    svc: &Service,
    endpoints: Option<&Endpoints>,
    node: &NodeAddresses,
) -> Vec<Frontend> {
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
            backends: backends(endpoints, name),
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
    endpoints: &BTreeMap<String, Endpoints>,
    node: &NodeAddresses,
) -> BTreeMap<SocketAddr, Frontend> {
    let mut out = BTreeMap::new();
    for (k, svc) in services {
        for f in frontends(svc, endpoints.get(k), node) {
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

    fn eps(ports: Value, ips: &[&str]) -> Endpoints {
        typed(json!({"metadata": {"name": "web", "namespace": "default"},
               "subsets": [{"addresses": ips.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>(), "ports": ports}]}))
    }

    #[test]
    fn cluster_ip_maps_port_to_ready_endpoints() {
        let s = svc("ClusterIP", json!([{"port": 80, "targetPort": 8080}]));
        let e = eps(json!([{"port": 8080}]), &["10.88.0.3", "10.88.0.2"]);
        let f = frontends(&s, Some(&e), &NodeAddresses::default());
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
        let addrs: Vec<_> = frontends(&s, None, &node)
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
        let addrs: Vec<_> = frontends(&lb, None, &node)
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
        let f = frontends(&s, Some(&e), &NodeAddresses::default());
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
        let f = frontends(&s, None, &NodeAddresses::default());
        assert_eq!(f.len(), 1, "UDP ports are not proxied");
        assert_eq!(f[0].affinity, Some(Duration::from_secs(60)));
        assert!(f[0].backends.is_empty());

        s.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert!(frontends(&s, None, &NodeAddresses::default()).is_empty());

        let mut dns: Service = svc("ClusterIP", json!([{"port": 53}]));
        dns.metadata.name = Some("kube-dns".into());
        dns.metadata.namespace = Some("kube-system".into());
        assert!(frontends(&dns, None, &NodeAddresses::default()).is_empty());
    }

    #[test]
    fn not_ready_addresses_are_not_backends() {
        let e: Endpoints = typed(json!({"subsets": [{"addresses": [{"ip": "10.88.0.2"}],
                                     "notReadyAddresses": [{"ip": "10.88.0.9"}],
                                     "ports": [{"port": 8080}]}]}));
        assert_eq!(
            backends(Some(&e), ""),
            vec!["10.88.0.2:8080".parse().unwrap()]
        );
    }
}
