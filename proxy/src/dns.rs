//! Service discovery by name: `NAME.NAMESPACE.svc.cluster.local` answers with the service's
//! ClusterIP (a headless service: its ready endpoints' addresses). A headless service's
//! endpoints with a hostname (pods whose `hostname` and `subdomain` name it, as a
//! StatefulSet's) are `HOSTNAME.NAME.NAMESPACE.svc.cluster.local`, and each named port is an
//! SRV record `_PORT._PROTO.NAME.NAMESPACE.svc.cluster.local` (targets: the service, or each
//! endpoint of a headless one).
//!
//! Two ways in: a DNS server on each node at the `kube-system/kube-dns` service address (UDP
//! and TCP port 53), for OCI pods and anything else that speaks DNS; and
//! [`Names::resolve`], which applies a pod's search path in-process for wasm guests'
//! outgoing requests. Names outside the cluster domain are forwarded to the node's own
//! resolver.

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, Endpoints, Service};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, rdata::SRV, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::table;

pub const DEFAULT_DOMAIN: &str = "cluster.local";
/// TTL of cluster answers: short, so clients follow services that come and go.
const TTL: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster's names at one moment.
#[derive(Debug, Default)]
pub struct Names {
    domain: String,
    /// (namespace, service) → addresses.
    services: HashMap<(String, String), Vec<Ipv4Addr>>,
    /// (namespace, headless service, hostname) → the endpoint's address.
    hosts: HashMap<(String, String, String), Vec<Ipv4Addr>>,
    /// (namespace, service, `_port`, `_proto`) → (port, target name without the domain).
    srv: HashMap<SrvKey, Vec<(u16, String)>>,
}

/// (namespace, service, `_port`, `_proto`).
type SrvKey = (String, String, String, String);

/// What the cluster says about a fully qualified name.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(Vec<Ipv4Addr>),
    /// A named port: (port, fully qualified target) per SRV record.
    Srv(Vec<(u16, String)>),
    /// In the cluster domain, but no such service.
    NoSuchName,
    /// Not a cluster name.
    Outside,
}

impl Names {
    pub fn build(
        services: &BTreeMap<String, Service>,
        endpoints: &BTreeMap<String, Endpoints>,
        domain: &str,
    ) -> Names {
        let mut out = HashMap::new();
        let mut hosts: HashMap<(String, String, String), Vec<Ipv4Addr>> = HashMap::new();
        let mut srv: HashMap<SrvKey, Vec<(u16, String)>> = HashMap::new();
        let d = domain.trim_matches('.').to_ascii_lowercase();
        for (k, svc) in services {
            let Some((ns, name)) = k.split_once('/') else {
                continue;
            };
            let no_spec = Default::default();
            let spec = svc.spec.as_ref().unwrap_or(&no_spec);
            let headless = spec.cluster_ip.as_deref() == Some("None");
            let subsets = endpoints
                .get(k)
                .and_then(|e| e.subsets.as_deref())
                .unwrap_or_default();
            // Each ready address with the subset (and so the ports) it belongs to.
            let ready: Vec<(&EndpointAddress, &EndpointSubset)> = subsets
                .iter()
                .flat_map(|s| s.addresses.iter().flatten().map(move |a| (a, s)))
                .collect();
            if headless {
                for (a, _) in &ready {
                    if let (Some(h), Ok(ip)) = (&a.hostname, a.ip.parse()) {
                        hosts
                            .entry((ns.into(), name.into(), h.to_ascii_lowercase()))
                            .or_default()
                            .push(ip);
                    }
                }
            }
            for p in spec.ports.iter().flatten() {
                let Some(pname) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                    continue;
                };
                let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
                let key = (
                    ns.to_string(),
                    name.to_string(),
                    format!("_{}", pname.to_ascii_lowercase()),
                    format!("_{proto}"),
                );
                let mut targets = Vec::new();
                if headless {
                    // One record per endpoint, at the port the endpoint serves.
                    for (a, subset) in &ready {
                        let port = subset
                            .ports
                            .iter()
                            .flatten()
                            .find(|ep| ep.name.as_deref() == Some(pname))
                            .map(|ep| ep.port);
                        let Some(port) = port else { continue };
                        let host = match &a.hostname {
                            Some(h) => h.clone(),
                            None => a.ip.replace('.', "-"),
                        };
                        targets.push((port as u16, format!("{host}.{name}.{ns}.svc.{d}.")));
                    }
                } else {
                    targets.push((p.port as u16, format!("{name}.{ns}.svc.{d}.")));
                }
                targets.sort();
                targets.dedup();
                srv.insert(key, targets);
            }
            let ips = match table::cluster_ip(svc) {
                Some(ip) => vec![ip],
                None if headless => {
                    let mut ips: Vec<Ipv4Addr> = ready
                        .iter()
                        .filter_map(|(a, _)| a.ip.parse().ok())
                        .collect();
                    ips.sort();
                    ips.dedup();
                    ips
                }
                None => continue,
            };
            out.insert((ns.to_string(), name.to_string()), ips);
        }
        Names {
            domain: d,
            services: out,
            hosts,
            srv,
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Looks up a fully qualified name (trailing dot optional, any case).
    pub fn lookup(&self, fqdn: &str) -> Lookup {
        let name = fqdn.trim_end_matches('.').to_ascii_lowercase();
        let Some(rest) = name.strip_suffix(&self.domain).and_then(|r| {
            if r.is_empty() {
                Some(r)
            } else {
                r.strip_suffix('.')
            }
        }) else {
            return Lookup::Outside;
        };
        let Some(svc_ns) = rest.strip_suffix(".svc") else {
            return Lookup::NoSuchName;
        };
        let labels: Vec<&str> = svc_ns.split('.').collect();
        let found = match labels[..] {
            [svc, ns] => self
                .services
                .get(&(ns.to_string(), svc.to_string()))
                .map(|ips| Lookup::Found(ips.clone())),
            [host, svc, ns] => self
                .hosts
                .get(&(ns.to_string(), svc.to_string(), host.to_string()))
                .map(|ips| Lookup::Found(ips.clone())),
            [port, proto, svc, ns] => self
                .srv
                .get(&(ns.into(), svc.into(), port.into(), proto.into()))
                .map(|t| Lookup::Srv(t.clone())),
            _ => None,
        };
        found.unwrap_or(Lookup::NoSuchName)
    }

    /// Resolves `host` as a resolver inside a pod of `namespace` would, with the search path
    /// `NAMESPACE.svc.DOMAIN svc.DOMAIN DOMAIN`. None when it is not a cluster name.
    pub fn resolve(&self, host: &str, namespace: &str) -> Option<Ipv4Addr> {
        if host.parse::<IpAddr>().is_ok() {
            return None;
        }
        let host = host.trim_end_matches('.');
        let d = &self.domain;
        let candidates = [
            host.to_string(),
            format!("{host}.{namespace}.svc.{d}"),
            format!("{host}.svc.{d}"),
            format!("{host}.{d}"),
        ];
        candidates.iter().find_map(|c| match self.lookup(c) {
            Lookup::Found(ips) => ips.first().copied(),
            _ => None,
        })
    }
}

/// The current names, swapped whole when services change.
pub type SharedNames = Arc<RwLock<Arc<Names>>>;

/// The answer to one DNS query, or None when it should go upstream.
pub fn answer(query: &[u8], names: &Names) -> Option<Vec<u8>> {
    let req = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return None,
    };
    let mut resp = Message::new();
    resp.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true);
    if req.op_code() != OpCode::Query || req.queries().len() != 1 {
        resp.set_response_code(ResponseCode::NotImp);
        return resp.to_vec().ok();
    }
    let q = req.queries()[0].clone();
    let lookup = names.lookup(&q.name().to_ascii());
    resp.add_query(q.clone());
    match lookup {
        Lookup::Outside => return None,
        Lookup::NoSuchName => {
            resp.set_authoritative(true)
                .set_response_code(ResponseCode::NXDomain);
        }
        Lookup::Found(ips) => {
            resp.set_authoritative(true);
            if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
                for ip in ips {
                    resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
                }
            }
            // Other types of an existing name: NOERROR with no answers, so resolvers asking
            // for AAAA next to A do not give up on the name.
        }
        Lookup::Srv(targets) => {
            resp.set_authoritative(true);
            if matches!(q.query_type(), RecordType::SRV | RecordType::ANY) {
                let weight = (100 / targets.len().max(1)) as u16;
                for (port, target) in targets {
                    let Ok(t) = Name::from_ascii(&target) else {
                        continue;
                    };
                    resp.add_answer(Record::from_rdata(
                        q.name().clone(),
                        TTL,
                        RData::SRV(SRV::new(0, weight, port, t.clone())),
                    ));
                    if let Lookup::Found(ips) = names.lookup(&target) {
                        for ip in ips {
                            resp.add_additional(Record::from_rdata(
                                t.clone(),
                                TTL,
                                RData::A(A(ip)),
                            ));
                        }
                    }
                }
            }
        }
    }
    resp.to_vec().ok()
}

/// The node's own resolver (from `/etc/resolv.conf`), unless it is `not`.
pub fn upstream(not: IpAddr) -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .find(|a| *a != not)
        .map(|a| SocketAddr::new(a, 53))
}

async fn ask_upstream(query: &[u8], upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    let up = upstream?;
    let bind: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    sock.send_to(query, up).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = Message::new();
    resp.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_response_code(ResponseCode::ServFail)
        .add_queries(req.queries().to_vec());
    resp.to_vec().ok()
}

/// The upstream's answer to a query that is not the cluster's, or SERVFAIL.
async fn forward(query: &[u8], upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    match ask_upstream(query, upstream).await {
        Some(r) => Some(r),
        None => servfail(query),
    }
}

async fn respond(
    query: Vec<u8>,
    names: &SharedNames,
    upstream: Option<SocketAddr>,
) -> Option<Vec<u8>> {
    let current = names.read().expect("names").clone();
    match answer(&query, &current) {
        Some(r) => Some(r),
        None => forward(&query, upstream).await,
    }
}

/// A running DNS server. Dropping it stops it.
pub struct DnsServer {
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl DnsServer {
    /// Serves DNS on `addr` over UDP and TCP.
    pub async fn start(
        addr: SocketAddr,
        names: SharedNames,
        upstream: Option<SocketAddr>,
    ) -> std::io::Result<DnsServer> {
        let udp = Arc::new(UdpSocket::bind(addr).await?);
        let addr = udp.local_addr()?;
        let tcp = TcpListener::bind(addr).await?;
        let n = names.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((len, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let query = buf[..len].to_vec();
                let current = n.read().expect("names").clone();
                match answer(&query, &current) {
                    Some(r) => {
                        let _ = udp.send_to(&r, peer).await;
                    }
                    None => {
                        // Not a cluster name: the upstream answers, without holding up
                        // the queries behind this one.
                        let udp = udp.clone();
                        tokio::spawn(async move {
                            if let Some(r) = forward(&query, upstream).await {
                                let _ = udp.send_to(&r, peer).await;
                            }
                        });
                    }
                }
            }
        });
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = tcp.accept().await else {
                    continue;
                };
                let names = names.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok(len) = conn.read_u16().await else {
                            return;
                        };
                        let mut query = vec![0u8; len as usize];
                        if conn.read_exact(&mut query).await.is_err() {
                            return;
                        }
                        let Some(r) = respond(query, &names, upstream).await else {
                            return;
                        };
                        let Ok(n) = u16::try_from(r.len()) else {
                            return;
                        };
                        if conn.write_u16(n).await.is_err() || conn.write_all(&r).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(DnsServer {
            addr,
            tasks: vec![udp_task, tcp_task],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use serde_json::json;

    fn typed<K: serde::de::DeserializeOwned>(v: serde_json::Value) -> K {
        serde_json::from_value(v).unwrap()
    }

    fn names() -> Names {
        let mut services = BTreeMap::new();
        services.insert(
            "default/web".to_string(),
            typed(json!({"spec": {"clusterIP": "10.96.0.20"}})),
        );
        services.insert(
            "shop/db".to_string(),
            typed(json!({"spec": {"clusterIP": "None"}})),
        );
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            "shop/db".to_string(),
            typed(json!({"subsets": [{"addresses": [{"ip": "10.88.0.9"}, {"ip": "10.88.0.4"}]}]})),
        );
        Names::build(&services, &endpoints, DEFAULT_DOMAIN)
    }

    #[test]
    fn fully_qualified_names() {
        let n = names();
        assert_eq!(
            n.lookup("web.default.svc.cluster.local."),
            Lookup::Found(vec!["10.96.0.20".parse().unwrap()])
        );
        assert_eq!(
            n.lookup("WEB.Default.svc.cluster.local"),
            Lookup::Found(vec!["10.96.0.20".parse().unwrap()])
        );
        assert_eq!(
            n.lookup("db.shop.svc.cluster.local"),
            Lookup::Found(vec![
                "10.88.0.4".parse().unwrap(),
                "10.88.0.9".parse().unwrap()
            ])
        );
        assert_eq!(
            n.lookup("nope.default.svc.cluster.local"),
            Lookup::NoSuchName
        );
        assert_eq!(n.lookup("a.b.c.svc.cluster.local"), Lookup::NoSuchName);
        assert_eq!(n.lookup("example.org"), Lookup::Outside);
        assert_eq!(n.lookup("notcluster.local"), Lookup::Outside);
    }

    #[test]
    fn pods_of_a_headless_service_and_named_ports() {
        let mut services = BTreeMap::new();
        services.insert(
            "default/web".to_string(),
            typed(json!({"spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})),
        );
        services.insert(
            "default/api".to_string(),
            typed(json!({"spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "grpc", "port": 9000}]}})),
        );
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            "default/web".to_string(),
            typed(json!({"subsets": [{"addresses": [{"ip": "10.88.0.5", "hostname": "web-0"}, {"ip": "10.88.0.6", "hostname": "web-1"}],
                                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]})),
        );
        let n = Names::build(&services, &endpoints, DEFAULT_DOMAIN);
        assert_eq!(
            n.lookup("web-1.web.default.svc.cluster.local"),
            Lookup::Found(vec!["10.88.0.6".parse().unwrap()])
        );
        assert_eq!(
            n.lookup("web-7.web.default.svc.cluster.local"),
            Lookup::NoSuchName
        );
        assert_eq!(
            n.lookup("_http._tcp.web.default.svc.cluster.local"),
            Lookup::Srv(vec![
                (8080, "web-0.web.default.svc.cluster.local.".into()),
                (8080, "web-1.web.default.svc.cluster.local.".into())
            ])
        );
        assert_eq!(
            n.lookup("_grpc._tcp.api.default.svc.cluster.local"),
            Lookup::Srv(vec![(9000, "api.default.svc.cluster.local.".into())])
        );
        let r = Message::from_vec(
            &answer(
                &query("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
                &n,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(r.answers().len(), 2);
        let srv = r.answers()[0].data().as_srv().unwrap();
        assert_eq!(srv.port(), 8080);
        assert_eq!(
            srv.target().to_ascii(),
            "web-0.web.default.svc.cluster.local."
        );
        assert_eq!(
            r.additionals().len(),
            2,
            "the targets' addresses come along"
        );
    }

    #[test]
    fn search_path_of_a_pod() {
        let n = names();
        let web: Ipv4Addr = "10.96.0.20".parse().unwrap();
        assert_eq!(n.resolve("web", "default"), Some(web));
        assert_eq!(
            n.resolve("web", "shop"),
            None,
            "short names stay in the pod's namespace"
        );
        assert_eq!(n.resolve("web.default", "shop"), Some(web));
        assert_eq!(n.resolve("web.default.svc", "shop"), Some(web));
        assert_eq!(n.resolve("web.default.svc.cluster.local", "x"), Some(web));
        assert_eq!(n.resolve("example.org", "default"), None);
        assert_eq!(n.resolve("10.1.2.3", "default"), None);
    }

    fn query(name: &str, ty: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
        m.to_vec().unwrap()
    }

    #[test]
    fn wire_answers() {
        let n = names();
        let r = Message::from_vec(
            &answer(&query("web.default.svc.cluster.local.", RecordType::A), &n).unwrap(),
        )
        .unwrap();
        assert_eq!(r.id(), 4242);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        let ips: Vec<_> = r
            .answers()
            .iter()
            .filter_map(|a| a.data().as_a().map(|a| a.0))
            .collect();
        assert_eq!(ips, vec!["10.96.0.20".parse::<Ipv4Addr>().unwrap()]);

        let r = Message::from_vec(
            &answer(
                &query("web.default.svc.cluster.local.", RecordType::AAAA),
                &n,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());

        let r = Message::from_vec(
            &answer(&query("gone.default.svc.cluster.local.", RecordType::A), &n).unwrap(),
        )
        .unwrap();
        assert_eq!(r.response_code(), ResponseCode::NXDomain);

        assert!(
            answer(&query("example.org.", RecordType::A), &n).is_none(),
            "goes upstream"
        );
        assert!(answer(b"garbage", &n).is_none());
    }

    #[tokio::test]
    async fn serves_udp_and_tcp() {
        let shared: SharedNames = Arc::new(RwLock::new(Arc::new(names())));
        let server = DnsServer::start("127.0.0.1:0".parse().unwrap(), shared, None)
            .await
            .unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(
            &query("web.default.svc.cluster.local.", RecordType::A),
            server.addr,
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 512];
        let len = sock.recv(&mut buf).await.unwrap();
        let r = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(r.answers().len(), 1);

        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let q = query("example.org.", RecordType::A);
        tcp.write_u16(q.len() as u16).await.unwrap();
        tcp.write_all(&q).await.unwrap();
        let len = tcp.read_u16().await.unwrap();
        let mut buf = vec![0u8; len as usize];
        tcp.read_exact(&mut buf).await.unwrap();
        let r = Message::from_vec(&buf).unwrap();
        assert_eq!(
            r.response_code(),
            ResponseCode::ServFail,
            "no upstream given"
        );
    }
}
