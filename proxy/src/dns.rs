//! Service discovery by name: `NAME.NAMESPACE.svc.cluster.local` answers with the service's
//! ClusterIP (a headless service: its ready endpoints' addresses).
//!
//! Two ways in: a DNS server on each node at the `kube-system/kube-dns` service address (UDP
//! and TCP port 53), for OCI pods and anything else that speaks DNS; and
//! [`Names::resolve`], which applies a pod's search path in-process for wasm guests'
//! outgoing requests. Names outside the cluster domain are forwarded to the node's own
//! resolver.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use serde_json::Value;
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
}

/// What the cluster says about a fully qualified name.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(Vec<Ipv4Addr>),
    /// In the cluster domain, but no such service.
    NoSuchName,
    /// Not a cluster name.
    Outside,
}

impl Names {
    pub fn build(
        services: &BTreeMap<String, Value>,
        endpoints: &BTreeMap<String, Value>,
        domain: &str,
    ) -> Names {
        let mut out = HashMap::new();
        for (k, svc) in services {
            let Some((ns, name)) = k.split_once('/') else {
                continue;
            };
            let ips = match table::cluster_ip(svc) {
                Some(ip) => vec![ip],
                None if svc.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None") => {
                    let mut ips: Vec<Ipv4Addr> = endpoints
                        .get(k)
                        .and_then(|e| e["subsets"].as_array())
                        .into_iter()
                        .flatten()
                        .flat_map(|s| s["addresses"].as_array().into_iter().flatten())
                        .filter_map(|a| a["ip"].as_str().and_then(|s| s.parse().ok()))
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
            domain: domain.trim_matches('.').to_ascii_lowercase(),
            services: out,
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
        match svc_ns.split_once('.') {
            Some((svc, ns)) if !ns.contains('.') => {
                match self.services.get(&(ns.to_string(), svc.to_string())) {
                    Some(ips) => Lookup::Found(ips.clone()),
                    None => Lookup::NoSuchName,
                }
            }
            _ => Lookup::NoSuchName,
        }
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
    use hickory_proto::rr::Name;
    use serde_json::json;

    fn names() -> Names {
        let mut services = BTreeMap::new();
        services.insert(
            "default/web".to_string(),
            json!({"spec": {"clusterIP": "10.96.0.20"}}),
        );
        services.insert(
            "shop/db".to_string(),
            json!({"spec": {"clusterIP": "None"}}),
        );
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            "shop/db".to_string(),
            json!({"subsets": [{"addresses": [{"ip": "10.88.0.9"}, {"ip": "10.88.0.4"}]}]}),
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
