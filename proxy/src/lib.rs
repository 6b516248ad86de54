//! The service proxy that runs inside every agent.
//!
//! It watches Services and EndpointSlices (a service's slices merged) and keeps, for every service port, listening sockets on
//! this node: the ClusterIP (bound to a local interface, as kube-proxy's IPVS mode binds
//! virtual IPs to a dummy interface), the NodePort (on every node address), and for a
//! LoadBalancer service its port on the node's InternalIP (the ingress address the control
//! plane publishes, as k3s's ServiceLB does). Traffic is balanced over ready endpoints of
//! both kinds, wasm and OCI (or, while none is ready, over terminating endpoints that still
//! serve, as kube-proxy):
//!
//! - HTTP/1 (declared, or recognised from the first bytes) is balanced per request; an
//!   endpoint that is a wasm component on this node gets the request in-process, with no
//!   socket opened ([`LocalHttp`]).
//! - Anything else is balanced per connection and copied both ways.
//!
//! A frontend whose service has no ready endpoints does not listen, so clients are refused
//! at once instead of hanging. `kube-system/kube-dns` is not proxied: its address is served
//! by this node's DNS server ([`dns`]).
//!
//! Module map: [`table`] (objects → frontends, pure), [`balance`] (choosing an endpoint),
//! [`serve`] (the data path), [`dns`] (names), [`vip`] (what binds service addresses locally).

pub mod balance;
pub mod dns;
pub mod serve;
pub mod table;
pub mod vip;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use skiff_client::{Client, Event, Kind, ListParams};
use tokio::sync::{mpsc, watch};

use crate::balance::{Backend, Route};
use crate::dns::{DnsServer, Names, SharedNames};
use crate::serve::FrontendState;
pub use crate::serve::{Body, BoxError, BoxFuture, InProcess, LocalHttp};
use crate::table::{Frontend, NodeAddresses};
pub use crate::vip::VipLink;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node: NodeAddresses,
    pub cluster_domain: String,
    /// Serve cluster DNS at the kube-dns service address.
    pub dns: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            node: NodeAddresses::default(),
            cluster_domain: dns::DEFAULT_DOMAIN.into(),
            dns: true,
        }
    }
}

/// What the data path and the agent read while the sync loop writes.
struct Shared {
    names: SharedNames,
    /// Every endpoint in some route, and those still finishing requests.
    backends: Mutex<HashMap<SocketAddr, Arc<Backend>>>,
    /// Endpoint IPs in rotation somewhere.
    routed: RwLock<HashSet<IpAddr>>,
    synced: watch::Sender<u64>,
}

/// A running proxy. Dropping it stops it.
pub struct Proxy {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A change to one of the collections the proxy follows.
enum Change<K> {
    Reset(Vec<K>),
    Upsert(Box<K>),
    Delete(Box<K>),
}

enum Update {
    Services(Change<Service>),
    Slices(Change<EndpointSlice>),
}

/// Lists, then follows the watch, of one collection; on any error starts over.
async fn reflect<K: Kind>(client: Client, wrap: fn(Change<K>) -> Update, tx: mpsc::Sender<Update>) {
    let params = ListParams::default();
    loop {
        let list = match client.list::<K>(None, &params).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(resource = K::URL_PATH_SEGMENT, error = %e, "proxy list failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if tx.send(wrap(Change::Reset(list.items))).await.is_err() {
            return;
        }
        let rv = list.resource_version;
        let Ok(stream) = client.watch::<K>(None, &params, rv.as_deref()).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut stream = Box::pin(stream);
        while let Some(Ok(ev)) = stream.next().await {
            let c = match ev {
                Event::Added(o) | Event::Modified(o) => Change::Upsert(Box::new(o)),
                Event::Deleted(o) => Change::Delete(Box::new(o)),
                Event::Bookmark(_) => continue,
            };
            if tx.send(wrap(c)).await.is_err() {
                return;
            }
        }
    }
}

struct Listening {
    state: Arc<FrontendState>,
    /// One accept loop per data-path thread.
    accept: Vec<tokio::task::JoinHandle<()>>,
}

impl Listening {
    fn close(self) {
        for a in self.accept {
            a.abort();
        }
    }
}

/// The sync loop's own state: what is bound and listening now.
struct Programmer {
    config: ProxyConfig,
    local: Arc<dyn LocalHttp>,
    link: Arc<dyn VipLink>,
    shared: Arc<Shared>,
    services: BTreeMap<String, Service>,
    /// Every EndpointSlice, by `namespace/name`.
    slices: BTreeMap<String, EndpointSlice>,
    listeners: HashMap<SocketAddr, Listening>,
    /// Addresses that could not be bound (tried again every [`RETRY_BIND`]).
    failed: HashSet<SocketAddr>,
    vips: HashSet<std::net::Ipv4Addr>,
    dns: Option<DnsServer>,
    generation: u64,
    workers: serve::Workers,
}

impl Programmer {
    fn backend(&self, addr: SocketAddr) -> Arc<Backend> {
        self.shared
            .backends
            .lock()
            .expect("backends")
            .entry(addr)
            .or_insert_with(|| Arc::new(Backend::new(addr)))
            .clone()
    }

    fn route(&self, f: &Frontend) -> Route {
        Route::new(f.backends.iter().map(|a| self.backend(*a)).collect())
    }

    async fn apply(&mut self) {
        let by_service = table::slices_by_service(&self.slices);
        let want = table::build(&self.services, &by_service, &self.config.node);
        let endpoints: BTreeMap<String, k8s_openapi::api::core::v1::Endpoints> = by_service
            .iter()
            .map(|(k, s)| (k.clone(), table::as_endpoints(s)))
            .collect();
        let names = Names::build(&self.services, &endpoints, &self.config.cluster_domain);
        *self.shared.names.write().expect("names") = Arc::new(names);

        // Service addresses first, so their listeners can bind.
        let dns_ip = self
            .services
            .get(&format!(
                "{}/{}",
                table::DNS_SERVICE.0,
                table::DNS_SERVICE.1
            ))
            .and_then(table::cluster_ip)
            .filter(|_| self.config.dns);
        let mut vips: HashSet<std::net::Ipv4Addr> = want
            .values()
            .filter(|f| f.cluster_ip && !f.backends.is_empty())
            .filter_map(|f| match f.addr.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })
            .collect();
        vips.extend(dns_ip);
        let add: Vec<_> = vips.difference(&self.vips).copied().collect();
        let remove: Vec<_> = self.vips.difference(&vips).copied().collect();
        if !add.is_empty() || !remove.is_empty() {
            let link = self.link.clone();
            let results = tokio::task::spawn_blocking(move || {
                let mut added = Vec::new();
                for ip in add {
                    match link.add(ip) {
                        Ok(()) => added.push(ip),
                        Err(e) => tracing::warn!(%ip, error = %e, "cannot bind a service address"),
                    }
                }
                for ip in &remove {
                    if let Err(e) = link.remove(*ip) {
                        tracing::warn!(%ip, error = %e, "cannot release a service address");
                    }
                }
                (added, remove)
            })
            .await;
            if let Ok((added, removed)) = results {
                self.vips.extend(added);
                for ip in removed {
                    self.vips.remove(&ip);
                }
            }
        }

        // Cluster DNS.
        match (dns_ip, &self.dns) {
            (Some(ip), Some(d)) if d.addr.ip() == IpAddr::V4(ip) => {}
            (Some(ip), _) if self.vips.contains(&ip) => {
                self.dns = None;
                let addr = SocketAddr::from((ip, 53));
                match DnsServer::start(
                    addr,
                    self.shared.names.clone(),
                    dns::upstream(IpAddr::V4(ip)),
                )
                .await
                {
                    Ok(d) => {
                        tracing::info!(%addr, "cluster DNS serving");
                        self.dns = Some(d);
                    }
                    Err(e) => tracing::warn!(%addr, error = %e, "cannot serve cluster DNS"),
                }
            }
            (None, Some(_)) => self.dns = None,
            _ => {}
        }

        // Listeners: a frontend listens while it has endpoints.
        let gone: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|a| want.get(a).is_none_or(|f| f.backends.is_empty()))
            .copied()
            .collect();
        for a in gone {
            if let Some(l) = self.listeners.remove(&a) {
                tracing::debug!(addr = %a, service = %l.state.service, "frontend closed");
                l.close();
            }
        }
        for (addr, f) in &want {
            if f.backends.is_empty() {
                continue;
            }
            let route = self.route(f);
            if let Some(l) = self.listeners.get(addr) {
                if l.state.service == f.service && l.state.mode == f.mode {
                    l.state.set_route(route);
                    continue;
                }
                if let Some(old) = self.listeners.remove(addr) {
                    old.close();
                }
            }
            let state = Arc::new(FrontendState::new(
                f.service.clone(),
                f.mode,
                route,
                f.affinity,
            ));
            match self.workers.listen(*addr, &state, &self.local) {
                Ok(accept) => {
                    self.failed.remove(addr);
                    tracing::debug!(%addr, service = %f.service, "frontend listening");
                    self.listeners.insert(*addr, Listening { state, accept });
                }
                Err(e) => {
                    if self.failed.insert(*addr) {
                        tracing::warn!(%addr, service = %f.service, error = %e, "cannot listen for a service");
                    }
                }
            }
        }

        // Publish what is routed, and forget endpoints nothing routes to and nothing uses.
        let in_route: HashSet<SocketAddr> = self
            .listeners
            .values()
            .flat_map(|l| {
                l.state
                    .route()
                    .backends
                    .iter()
                    .map(|b| b.addr)
                    .collect::<Vec<_>>()
            })
            .collect();
        let routed: HashSet<IpAddr> = in_route.iter().map(SocketAddr::ip).collect();
        self.shared
            .backends
            .lock()
            .expect("backends")
            .retain(|a, b| in_route.contains(a) || b.inflight() > 0);
        *self.shared.routed.write().expect("routed") = routed;
        self.generation += 1;
        self.shared.synced.send_replace(self.generation);
    }

    fn update(&mut self, u: Update) {
        match u {
            Update::Services(c) => apply_change(&mut self.services, c),
            Update::Slices(c) => apply_change(&mut self.slices, c),
        }
    }
}

fn apply_change<K: Kind>(objects: &mut BTreeMap<String, K>, c: Change<K>) {
    match c {
        Change::Reset(items) => {
            *objects = items.into_iter().map(|o| (table::key(&o), o)).collect();
        }
        Change::Upsert(o) => {
            objects.insert(table::key(&*o), *o);
        }
        Change::Delete(o) => {
            objects.remove(&table::key(&*o));
        }
    }
}

/// Which collection `u` lists in full, if it is a reset.
fn reset_of(u: &Update) -> Option<&'static str> {
    match u {
        Update::Services(Change::Reset(_)) => Some("services"),
        Update::Slices(Change::Reset(_)) => Some("endpointslices"),
        _ => None,
    }
}

/// How often frontends that could not bind are tried again.
const RETRY_BIND: Duration = Duration::from_secs(5);

impl Proxy {
    /// Starts watching the cluster and programming this node.
    pub fn start(
        client: Client,
        config: ProxyConfig,
        local: Arc<dyn LocalHttp>,
        link: Arc<dyn VipLink>,
    ) -> Proxy {
        let (synced, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            names: Arc::new(RwLock::new(Arc::new(Names::default()))),
            backends: Mutex::new(HashMap::new()),
            routed: RwLock::new(HashSet::new()),
            synced,
        });
        let mut p = Programmer {
            config,
            local,
            link,
            shared: shared.clone(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            listeners: HashMap::new(),
            failed: HashSet::new(),
            vips: HashSet::new(),
            dns: None,
            generation: 0,
            workers: serve::Workers::start(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
        };
        let task = tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(1024);
            let watchers = [
                tokio::spawn(reflect(client.clone(), Update::Services, tx.clone())),
                tokio::spawn(reflect(client, Update::Slices, tx)),
            ];
            let mut have = HashSet::new();
            loop {
                let first = tokio::select! {
                    u = rx.recv() => u,
                    _ = tokio::time::sleep(RETRY_BIND), if !p.failed.is_empty() => {
                        p.apply().await;
                        continue;
                    }
                };
                let Some(u) = first else { break };
                have.extend(reset_of(&u));
                p.update(u);
                // Take every update already queued before programming once.
                while let Ok(u) = rx.try_recv() {
                    have.extend(reset_of(&u));
                    p.update(u);
                }
                if have.len() == 2 {
                    p.apply().await;
                }
            }
            for w in watchers {
                w.abort();
            }
        });
        Proxy { shared, task }
    }

    /// The cluster's names, for resolving wasm guests' outgoing requests.
    pub fn names(&self) -> SharedNames {
        self.shared.names.clone()
    }

    /// Whether requests may still reach `ip` through this proxy: it is in some service's
    /// rotation, or requests to it are in flight.
    pub fn routes_to(&self, ip: IpAddr) -> bool {
        self.shared.routed.read().expect("routed").contains(&ip)
            || self
                .shared
                .backends
                .lock()
                .expect("backends")
                .values()
                .any(|b| b.addr.ip() == ip && b.inflight() > 0)
    }

    /// Waits until nothing is routed to `ip` (its pod left every service's endpoints and
    /// its last request finished), or `deadline` passes. True when drained.
    pub async fn drain(&self, ip: IpAddr, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        let mut synced = self.shared.synced.subscribe();
        loop {
            if !self.routes_to(ip) {
                return true;
            }
            tokio::select! {
                _ = synced.changed() => {}
                // In-flight requests end without a sync: look again shortly.
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tokio::time::sleep_until(until) => return false,
            }
        }
    }
}

/// The service addresses this proxy bound are released when it stops.
impl Drop for Programmer {
    fn drop(&mut self) {
        for ip in &self.vips {
            let _ = self.link.remove(*ip);
        }
    }
}
