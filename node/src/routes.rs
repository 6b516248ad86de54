//! Routes between the nodes' pod networks, flannel-style. Every agent watches the Node objects
//! and makes each other node's `spec.podCIDR` reachable:
//!
//! - **host-gw** (the default): a route `POD_CIDR via NODE_IP` per remote node; the nodes must
//!   share a link (one L2 segment).
//! - **vxlan**: a VXLAN device (`skiff.vxlan`, VNI 1, UDP 8472 as flannel's) whose MAC is
//!   published on the Node (`skiff.dev/backend-data`, flannel's `{"VNI":..,"VtepMAC":..}`);
//!   per remote node a route `POD_CIDR via VTEP onlink dev skiff.vxlan`, a permanent neighbour
//!   `VTEP lladdr MAC` and a forwarding entry `MAC dst NODE_IP`. A node's VTEP address is the
//!   network address of its pod CIDR, which no pod takes.
//!
//! The agent removes only what it made: its routes carry their own protocol number
//! ([`ROUTE_PROTO`]), and neighbours and forwarding entries live on its own device. Traffic from
//! the node's pods to the other nodes' pod networks is exempt from masquerading (a chain of
//! `ACCEPT`s ahead of the CNI bridge plugin's `MASQUERADE` rules), so pods see each other's
//! addresses; traffic leaving the cluster's pod network is masqueraded as before.
//!
//! The decisions ([`desired`], [`sync`]) are pure over the [`RouteLink`] trait; [`IpRoutes`] is
//! the real one (iproute2's `ip` and `bridge`, `iptables-restore`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use serde::Deserialize;
use serde_json::{json, Value};
use skiff_client::{Client, Event, ListParams, Patch};
use tokio::sync::watch;

use crate::network::NetError;

/// The routing protocol number of the routes an agent makes (`ip route ... proto 83`): the
/// agent lists and removes only these.
pub const ROUTE_PROTO: &str = "83";
/// The backend a node's pod network uses (`host-gw` or `vxlan`).
pub const BACKEND_TYPE_ANNOTATION: &str = "skiff.dev/backend-type";
/// The backend's data, as flannel publishes it: `{"VNI":1,"VtepMAC":"aa:bb:.."}`.
pub const BACKEND_DATA_ANNOTATION: &str = "skiff.dev/backend-data";
/// How often the routes are checked against the Nodes even when nothing changed.
const RESYNC_EVERY: Duration = Duration::from_secs(10);

/// How pod networks of different nodes reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodNetworkMode {
    /// A route per remote pod CIDR via that node's InternalIP.
    #[default]
    HostGw,
    /// A VXLAN overlay between the nodes' InternalIPs.
    Vxlan,
}

impl std::str::FromStr for PodNetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host-gw" => Ok(PodNetworkMode::HostGw),
            "vxlan" => Ok(PodNetworkMode::Vxlan),
            other => Err(format!(
                "unknown pod network backend {other:?} (host-gw or vxlan)"
            )),
        }
    }
}

impl std::fmt::Display for PodNetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PodNetworkMode::HostGw => "host-gw",
            PodNetworkMode::Vxlan => "vxlan",
        })
    }
}

/// The VXLAN device of the vxlan backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub device: String,
    pub vni: u32,
    /// UDP port (flannel's 8472, the Linux default; IANA's is 4789).
    pub port: u16,
}

impl Default for Vxlan {
    fn default() -> Self {
        Vxlan {
            device: "skiff.vxlan".into(),
            vni: 1,
            port: 8472,
        }
    }
}

/// This node's side of the pod network.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    /// The pod bridge: names this node's masquerade exemption chain.
    pub bridge: String,
    pub mode: PodNetworkMode,
    pub vxlan: Vxlan,
}

/// Another node's pod network, as its Node object says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
    /// Its VTEP's MAC, once it published one.
    pub vtep_mac: Option<String>,
}

/// A node's peer entry: its name, pod CIDR and InternalIP (and VTEP MAC, if published).
/// `None` while the node has no pod CIDR or no InternalIP.
pub fn peer(node: &Node) -> Option<Peer> {
    let name = node.metadata.name.clone()?;
    let pod_cidr = node.spec.as_ref()?.pod_cidr.as_ref()?.parse().ok()?;
    let node_ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()?;
    let vtep_mac = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BACKEND_DATA_ANNOTATION))
        .and_then(|d| serde_json::from_str::<BackendData>(d).ok())
        .and_then(|d| d.vtep_mac.map(|m| m.to_lowercase()));
    Some(Peer {
        name,
        pod_cidr,
        node_ip,
        vtep_mac,
    })
}

/// What the agent reads of a Node's `flannel.alpha.coreos.com/backend-data` annotation.
#[derive(Debug, Deserialize)]
struct BackendData {
    #[serde(rename = "VtepMAC")]
    vtep_mac: Option<String>,
}

/// One piece of kernel state the agent owns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entry {
    /// `dst via via` (host-gw), or `dst via via dev DEV onlink` (vxlan).
    Route {
        dst: Ipv4Net,
        via: Ipv4Addr,
        dev: Option<String>,
    },
    /// A permanent neighbour: the remote VTEP's address and MAC.
    Neigh {
        ip: Ipv4Addr,
        mac: String,
        dev: String,
    },
    /// A forwarding entry: frames for the remote VTEP's MAC go to its node's address.
    Fdb {
        mac: String,
        dst: Ipv4Addr,
        dev: String,
    },
}

/// The VTEP address of a pod network: its network address.
pub fn vtep_ip(cidr: Ipv4Net) -> Ipv4Addr {
    cidr.network()
}

/// What the kernel should hold for these peers.
pub fn desired(cfg: &RouteConfig, peers: &[Peer]) -> BTreeSet<Entry> {
    let mut out = BTreeSet::new();
    for p in peers {
        // Itself, and nodes no other node can reach (a loopback InternalIP: a node alone on
        // its machine) get nothing.
        if p.name == cfg.node
            || p.pod_cidr == cfg.pod_cidr
            || p.node_ip == cfg.node_ip
            || p.node_ip.is_loopback()
        {
            continue;
        }
        match cfg.mode {
            PodNetworkMode::HostGw => {
                out.insert(Entry::Route {
                    dst: p.pod_cidr,
                    via: p.node_ip,
                    dev: None,
                });
            }
            PodNetworkMode::Vxlan => {
                let Some(mac) = &p.vtep_mac else { continue };
                let dev = cfg.vxlan.device.clone();
                let vtep = vtep_ip(p.pod_cidr);
                out.insert(Entry::Route {
                    dst: p.pod_cidr,
                    via: vtep,
                    dev: Some(dev.clone()),
                });
                out.insert(Entry::Neigh {
                    ip: vtep,
                    mac: mac.clone(),
                    dev: dev.clone(),
                });
                out.insert(Entry::Fdb {
                    mac: mac.clone(),
                    dst: p.node_ip,
                    dev,
                });
            }
        }
    }
    out
}

/// What the node does to its routes. The real one runs `ip`, `bridge` and `iptables-restore`;
/// tests use a fake.
pub trait RouteLink: Send + Sync + 'static {
    /// The entries this agent made (routes with [`ROUTE_PROTO`]; neighbours and forwarding
    /// entries on the vxlan device, where it exists).
    fn entries(&self, vxlan: &Vxlan) -> Result<BTreeSet<Entry>, NetError>;
    fn add(&self, e: &Entry) -> Result<(), NetError>;
    fn remove(&self, e: &Entry) -> Result<(), NetError>;
    /// Creates (or keeps, when it matches) the VXLAN device with `vtep/32` on it, up; returns
    /// its MAC. [`NetError::NoVxlan`] when the kernel cannot make one.
    fn ensure_vxlan(
        &self,
        vxlan: &Vxlan,
        local: Ipv4Addr,
        vtep: Ipv4Addr,
    ) -> Result<String, NetError>;
    /// Removes the VXLAN device if it exists (a node switched to host-gw).
    fn remove_vxlan(&self, vxlan: &Vxlan) -> Result<(), NetError>;
    /// Traffic from `local` to any of `cluster` keeps its source address.
    fn exempt_from_masquerade(
        &self,
        bridge: &str,
        local: Ipv4Net,
        cluster: &BTreeSet<Ipv4Net>,
    ) -> Result<(), NetError>;
    /// `net.ipv4.ip_forward=1`.
    fn enable_forwarding(&self) -> Result<(), NetError>;
}

/// What a [`sync`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
    pub failed: usize,
}

/// Brings the kernel in line with the peers: removes what this agent made that no peer asks
/// for any more (first, so a route whose next hop changed is replaced), then adds what is
/// missing. An entry that fails is logged and counted, and the others still go in.
pub fn sync(link: &dyn RouteLink, cfg: &RouteConfig, peers: &[Peer]) -> Result<Changes, NetError> {
    let want = desired(cfg, peers);
    let have = link.entries(&cfg.vxlan)?;
    let mut changes = Changes::default();
    for e in have.difference(&want) {
        match link.remove(e) {
            Ok(()) => changes.removed += 1,
            Err(err) => {
                tracing::warn!(entry = ?e, error = %err, "cannot remove a pod network entry");
                changes.failed += 1;
            }
        }
    }
    for e in want.difference(&have) {
        match link.add(e) {
            Ok(()) => changes.added += 1,
            Err(err) => {
                tracing::warn!(entry = ?e, error = %err, "cannot add a pod network entry");
                changes.failed += 1;
            }
        }
    }
    let mut cluster: BTreeSet<Ipv4Net> = peers.iter().map(|p| p.pod_cidr).collect();
    cluster.insert(cfg.pod_cidr);
    if let Err(e) = link.exempt_from_masquerade(&cfg.bridge, cfg.pod_cidr, &cluster) {
        tracing::warn!(error = %e, "cannot keep pod-to-pod traffic from being masqueraded");
    }
    Ok(changes)
}

/// Makes the node ready to route: forwarding on and, for vxlan, the device. Returns the
/// annotations the node publishes on its Node.
pub fn prepare(link: &dyn RouteLink, cfg: &RouteConfig) -> Result<Value, NetError> {
    if let Err(e) = link.enable_forwarding() {
        tracing::warn!(error = %e, "cannot turn on IP forwarding; pods on other nodes will not reach this one's");
    }
    match cfg.mode {
        PodNetworkMode::HostGw => {
            link.remove_vxlan(&cfg.vxlan)?;
            Ok(json!({
                BACKEND_TYPE_ANNOTATION: "host-gw",
                BACKEND_DATA_ANNOTATION: null,
            }))
        }
        PodNetworkMode::Vxlan => {
            let mac = link.ensure_vxlan(&cfg.vxlan, cfg.node_ip, vtep_ip(cfg.pod_cidr))?;
            Ok(json!({
                BACKEND_TYPE_ANNOTATION: "vxlan",
                BACKEND_DATA_ANNOTATION: json!({"VNI": cfg.vxlan.vni, "VtepMAC": mac}).to_string(),
            }))
        }
    }
}

/// Prepares the node ([`prepare`]), publishes its backend on its Node, and keeps its routes in
/// line with the Nodes (list, then watch; every change, relist and [`RESYNC_EVERY`] is a full
/// [`sync`]) until `stop` turns true.
pub async fn start(
    client: Client,
    cfg: RouteConfig,
    link: Arc<dyn RouteLink>,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, NetError> {
    let annotations = {
        let (link, cfg) = (link.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || prepare(&*link, &cfg))
            .await
            .map_err(|e| NetError::Command {
                cmd: "pod network set-up".into(),
                msg: e.to_string(),
            })??
    };
    // A merge patch: a null annotation (the other backend's data) is removed.
    let patch = Patch::Merge(json!({"metadata": {"annotations": annotations}}));
    if let Err(e) = client.patch::<Node>(None, &cfg.node, &patch).await {
        tracing::warn!(error = %e, "cannot publish the node's pod network backend");
    }
    tracing::info!(mode = %cfg.mode, pod_cidr = %cfg.pod_cidr, "pod network routes follow the nodes");
    Ok(tokio::spawn(follow(client, cfg, link, stop)))
}

async fn sync_now(link: &Arc<dyn RouteLink>, cfg: &RouteConfig, nodes: &BTreeMap<String, Node>) {
    let peers: Vec<Peer> = nodes.values().filter_map(peer).collect();
    let (link, cfg2) = (link.clone(), cfg.clone());
    match tokio::task::spawn_blocking(move || sync(&*link, &cfg2, &peers)).await {
        Ok(Ok(c)) if c != Changes::default() => {
            tracing::info!(
                added = c.added,
                removed = c.removed,
                failed = c.failed,
                "pod network routes changed"
            )
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the pod network routes"),
        Err(e) => tracing::warn!(error = %e, "pod network sync failed"),
    }
}

async fn follow(
    client: Client,
    cfg: RouteConfig,
    link: Arc<dyn RouteLink>,
    mut stop: watch::Receiver<bool>,
) {
    let params = ListParams::default();
    loop {
        let list = tokio::select! {
            l = client.list::<Node>(None, &params) => l,
            _ = stop.changed() => return,
        };
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "listing nodes failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let mut nodes: BTreeMap<String, Node> = list
            .items
            .into_iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n)))
            .collect();
        sync_now(&link, &cfg, &nodes).await;
        let rv = list.resource_version;
        let Ok(stream) = client.watch::<Node>(None, &params, rv.as_deref()).await else {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = stop.changed() => return,
            }
        };
        let mut stream = Box::pin(stream);
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.tick().await;
        loop {
            tokio::select! {
                ev = stream.next() => {
                    let Some(Ok(ev)) = ev else { break };
                    let (node, deleted) = match ev {
                        Event::Added(n) | Event::Modified(n) => (n, false),
                        Event::Deleted(n) => (n, true),
                        Event::Bookmark(_) => continue,
                    };
                    let Some(name) = node.metadata.name.clone() else { continue };
                    match deleted {
                        false => {
                            let same = nodes.get(&name).map(peer) == Some(peer(&node));
                            nodes.insert(name, node);
                            if same {
                                continue;
                            }
                        }
                        true => {
                            nodes.remove(&name);
                        }
                    }
                    sync_now(&link, &cfg, &nodes).await;
                }
                _ = resync.tick() => sync_now(&link, &cfg, &nodes).await,
                _ = stop.changed() => return,
            }
        }
    }
}

/// Drives iproute2's `ip` and `bridge`, and `iptables-restore`.
pub struct IpRoutes;

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    use std::io::Write;
    let err = |msg: String| NetError::Command {
        cmd: format!("{cmd} {}", args.join(" ")),
        msg,
    };
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let Some(mut s) = child.stdin.take() {
        if let Some(text) = stdin {
            s.write_all(text.as_bytes())
                .map_err(|e| err(e.to_string()))?;
        }
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args, None)
}

/// A missing entry is already removed.
fn gone(r: Result<String, NetError>) -> Result<(), NetError> {
    match r {
        Err(NetError::Command { msg, .. })
            if msg.contains("No such")
                || msg.contains("Cannot find")
                || msg.contains("does not exist")
                || msg.contains("not found") =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// What the agent reads of iproute2's JSON output (`ip -j …`, `bridge -j fdb`): every field
/// optional, so an entry lacking one is skipped rather than failing the whole answer.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IpEntry {
    dst: Option<String>,
    gateway: Option<String>,
    dev: Option<String>,
    lladdr: Option<String>,
    mac: Option<String>,
    /// A list in `ip neigh`, one word in `bridge fdb`.
    state: Option<States>,
    address: Option<String>,
    linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum States {
    Many(Vec<String>),
    One(String),
}

impl States {
    fn has(&self, s: &str) -> bool {
        match self {
            States::Many(v) => v.iter().any(|x| x == s),
            States::One(x) => x == s,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LinkInfo {
    info_kind: Option<String>,
    info_data: Option<VxlanInfo>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct VxlanInfo {
    id: Option<u64>,
    port: Option<u64>,
    local: Option<String>,
}

fn ip_entries(out: &str) -> Vec<IpEntry> {
    serde_json::from_str(out).unwrap_or_default()
}

/// `ip -j route show` lines: (dst, gateway, dev).
fn parse_routes(out: &str) -> Vec<(Ipv4Net, Ipv4Addr, String)> {
    ip_entries(out)
        .into_iter()
        .filter_map(|r| {
            let dst = r.dst?;
            let dst: Ipv4Net = dst
                .parse()
                .or_else(|_| dst.parse::<Ipv4Addr>().map(Ipv4Net::from))
                .ok()?;
            Some((dst, r.gateway?.parse().ok()?, r.dev.unwrap_or_default()))
        })
        .collect()
}

/// Permanent neighbours of `ip -j neigh show`: (ip, mac).
fn parse_neighbours(out: &str) -> Vec<(Ipv4Addr, String)> {
    ip_entries(out)
        .into_iter()
        .filter(|n| n.state.as_ref().is_some_and(|s| s.has("PERMANENT")))
        .filter_map(|n| Some((n.dst?.parse().ok()?, n.lladdr?.to_lowercase())))
        .collect()
}

/// Forwarding entries with a destination of `bridge -j fdb show`: (mac, dst).
fn parse_fdb(out: &str) -> Vec<(String, Ipv4Addr)> {
    ip_entries(out)
        .into_iter()
        .filter_map(|f| Some((f.mac?.to_lowercase(), f.dst?.parse().ok()?)))
        .collect()
}

/// Whether `ip link add ... type vxlan` failed for want of the kernel's driver.
fn no_vxlan_driver(msg: &str) -> bool {
    msg.contains("Unknown device type") || msg.contains("not supported")
}

/// The masquerade exemption chain of a bridge (iptables allows 28 characters).
fn exemption_chain(bridge: &str) -> String {
    let mut c = format!("SKIFF-NOMASQ-{bridge}");
    c.truncate(28);
    c
}

/// The `iptables-restore --noflush` input that fills the chain (declaring it flushes it).
fn exemption_rules(chain: &str, cluster: &BTreeSet<Ipv4Net>) -> String {
    let mut s = format!("*nat\n:{chain} - [0:0]\n");
    for c in cluster {
        s.push_str(&format!("-A {chain} -d {c} -j ACCEPT\n"));
    }
    s.push_str("COMMIT\n");
    s
}

impl RouteLink for IpRoutes {
    fn entries(&self, vxlan: &Vxlan) -> Result<BTreeSet<Entry>, NetError> {
        let mut out = BTreeSet::new();
        for (dst, via, dev) in
            parse_routes(&ip(&["-4", "-j", "route", "show", "proto", ROUTE_PROTO])?)
        {
            out.insert(Entry::Route {
                dst,
                via,
                dev: (dev == vxlan.device).then_some(dev),
            });
        }
        if ip(&["link", "show", &vxlan.device]).is_ok() {
            for (ip_, mac) in
                parse_neighbours(&ip(&["-4", "-j", "neigh", "show", "dev", &vxlan.device])?)
            {
                out.insert(Entry::Neigh {
                    ip: ip_,
                    mac,
                    dev: vxlan.device.clone(),
                });
            }
            for (mac, dst) in parse_fdb(&run(
                "bridge",
                &["-j", "fdb", "show", "dev", &vxlan.device],
                None,
            )?) {
                out.insert(Entry::Fdb {
                    mac,
                    dst,
                    dev: vxlan.device.clone(),
                });
            }
        }
        Ok(out)
    }

    fn add(&self, e: &Entry) -> Result<(), NetError> {
        match e {
            Entry::Route {
                dst,
                via,
                dev: None,
            } => ip(&[
                "route",
                "replace",
                &dst.to_string(),
                "via",
                &via.to_string(),
                "proto",
                ROUTE_PROTO,
            ]),
            Entry::Route {
                dst,
                via,
                dev: Some(dev),
            } => ip(&[
                "route",
                "replace",
                &dst.to_string(),
                "via",
                &via.to_string(),
                "dev",
                dev,
                "onlink",
                "proto",
                ROUTE_PROTO,
            ]),
            Entry::Neigh { ip: a, mac, dev } => ip(&[
                "neigh",
                "replace",
                &a.to_string(),
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]),
            Entry::Fdb { mac, dst, dev } => run(
                "bridge",
                &[
                    "fdb",
                    "replace",
                    mac,
                    "dev",
                    dev,
                    "dst",
                    &dst.to_string(),
                    "self",
                    "permanent",
                ],
                None,
            ),
        }
        .map(|_| ())
    }

    fn remove(&self, e: &Entry) -> Result<(), NetError> {
        gone(match e {
            Entry::Route {
                dst,
                via,
                dev: None,
            } => ip(&[
                "route",
                "del",
                &dst.to_string(),
                "via",
                &via.to_string(),
                "proto",
                ROUTE_PROTO,
            ]),
            Entry::Route {
                dst,
                via,
                dev: Some(dev),
            } => ip(&[
                "route",
                "del",
                &dst.to_string(),
                "via",
                &via.to_string(),
                "dev",
                dev,
                "proto",
                ROUTE_PROTO,
            ]),
            Entry::Neigh { ip: a, dev, .. } => ip(&["neigh", "del", &a.to_string(), "dev", dev]),
            Entry::Fdb { mac, dst, dev } => run(
                "bridge",
                &[
                    "fdb",
                    "del",
                    mac,
                    "dev",
                    dev,
                    "dst",
                    &dst.to_string(),
                    "self",
                ],
                None,
            ),
        })
    }

    fn ensure_vxlan(
        &self,
        vxlan: &Vxlan,
        local: Ipv4Addr,
        vtep: Ipv4Addr,
    ) -> Result<String, NetError> {
        let dev = vxlan.device.as_str();
        // An existing device is kept (its MAC stays what the other nodes know) if it matches.
        if let Ok(out) = ip(&["-j", "-d", "link", "show", dev]) {
            let link = ip_entries(&out).into_iter().next();
            let info = link.and_then(|l| l.linkinfo);
            let same = info.is_some_and(|i| {
                let d = i.info_data.unwrap_or_default();
                i.info_kind.as_deref() == Some("vxlan")
                    && d.id == Some(u64::from(vxlan.vni))
                    && d.port == Some(u64::from(vxlan.port))
                    && d.local == Some(local.to_string())
            });
            if !same {
                ip(&["link", "del", dev])?;
            }
        }
        if ip(&["link", "show", dev]).is_err() {
            let made = ip(&[
                "link",
                "add",
                dev,
                "type",
                "vxlan",
                "id",
                &vxlan.vni.to_string(),
                "local",
                &local.to_string(),
                "dstport",
                &vxlan.port.to_string(),
                "nolearning",
            ]);
            match made {
                Err(NetError::Command { msg, .. }) if no_vxlan_driver(&msg) => {
                    return Err(NetError::NoVxlan(msg));
                }
                other => other?,
            };
        }
        // Only the VTEP address on the device.
        let have = ip(&["-4", "-o", "addr", "show", "dev", dev])?;
        let want = format!("{vtep}/32");
        for word in have.split_whitespace().collect::<Vec<_>>().windows(2) {
            if word[0] == "inet" && word[1] != want {
                ip(&["addr", "del", word[1], "dev", dev])?;
            }
        }
        if !have.contains(&format!("inet {want} ")) {
            ip(&["addr", "add", &want, "dev", dev])?;
        }
        ip(&["link", "set", dev, "up"])?;
        let out = ip(&["-j", "link", "show", dev])?;
        ip_entries(&out)
            .into_iter()
            .next()
            .and_then(|l| l.address)
            .map(|a| a.to_lowercase())
            .ok_or_else(|| NetError::Command {
                cmd: format!("ip -j link show {dev}"),
                msg: "no MAC address".into(),
            })
    }

    fn remove_vxlan(&self, vxlan: &Vxlan) -> Result<(), NetError> {
        if ip(&["link", "show", &vxlan.device]).is_ok() {
            ip(&["link", "del", &vxlan.device])?;
        }
        Ok(())
    }

    fn exempt_from_masquerade(
        &self,
        bridge: &str,
        local: Ipv4Net,
        cluster: &BTreeSet<Ipv4Net>,
    ) -> Result<(), NetError> {
        let chain = exemption_chain(bridge);
        run(
            "iptables-restore",
            &["--noflush", "-w"],
            Some(&exemption_rules(&chain, cluster)),
        )?;
        let local = local.to_string();
        let rule = [
            "POSTROUTING",
            "-s",
            &local,
            "-m",
            "comment",
            "--comment",
            "skiff: pod traffic within the cluster keeps its source address",
            "-j",
            &chain,
        ];
        let check: Vec<&str> = ["-w", "-t", "nat", "-C"]
            .iter()
            .copied()
            .chain(rule)
            .collect();
        if run("iptables", &check, None).is_err() {
            let insert: Vec<&str> = ["-w", "-t", "nat", "-I"]
                .iter()
                .copied()
                .chain([rule[0], "1"])
                .chain(rule[1..].iter().copied())
                .collect();
            run("iptables", &insert, None)?;
        }
        Ok(())
    }

    fn enable_forwarding(&self) -> Result<(), NetError> {
        let path = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
            return Ok(());
        }
        std::fs::write(path, "1").map_err(|e| NetError::Command {
            cmd: format!("write 1 to {path}"),
            msg: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        entries: Mutex<BTreeSet<Entry>>,
        exempt: Mutex<BTreeSet<Ipv4Net>>,
        fail: Mutex<Option<Entry>>,
    }

    impl RouteLink for Fake {
        fn entries(&self, _: &Vxlan) -> Result<BTreeSet<Entry>, NetError> {
            Ok(self.entries.lock().unwrap().clone())
        }
        fn add(&self, e: &Entry) -> Result<(), NetError> {
            if self.fail.lock().unwrap().as_ref() == Some(e) {
                return Err(NetError::Command {
                    cmd: "ip route replace".into(),
                    msg: "Nexthop has invalid gateway".into(),
                });
            }
            self.entries.lock().unwrap().insert(e.clone());
            Ok(())
        }
        fn remove(&self, e: &Entry) -> Result<(), NetError> {
            self.entries.lock().unwrap().remove(e);
            Ok(())
        }
        fn ensure_vxlan(&self, _: &Vxlan, _: Ipv4Addr, _: Ipv4Addr) -> Result<String, NetError> {
            Ok("02:00:00:00:00:01".into())
        }
        fn remove_vxlan(&self, _: &Vxlan) -> Result<(), NetError> {
            Ok(())
        }
        fn exempt_from_masquerade(
            &self,
            _: &str,
            _: Ipv4Net,
            cluster: &BTreeSet<Ipv4Net>,
        ) -> Result<(), NetError> {
            *self.exempt.lock().unwrap() = cluster.clone();
            Ok(())
        }
        fn enable_forwarding(&self) -> Result<(), NetError> {
            Ok(())
        }
    }

    fn cfg(mode: PodNetworkMode) -> RouteConfig {
        RouteConfig {
            node: "a".into(),
            node_ip: "192.168.9.1".parse().unwrap(),
            pod_cidr: "10.88.0.0/24".parse().unwrap(),
            bridge: "skiff0".into(),
            mode,
            vxlan: Vxlan::default(),
        }
    }

    fn p(name: &str, n: u8, mac: Option<&str>) -> Peer {
        Peer {
            name: name.into(),
            pod_cidr: format!("10.88.{n}.0/24").parse().unwrap(),
            node_ip: Ipv4Addr::new(192, 168, 9, n + 1),
            vtep_mac: mac.map(String::from),
        }
    }

    fn route(n: u8, via: [u8; 4]) -> Entry {
        Entry::Route {
            dst: format!("10.88.{n}.0/24").parse().unwrap(),
            via: Ipv4Addr::from(via),
            dev: None,
        }
    }

    #[test]
    fn host_gw_routes_follow_nodes_as_they_come_change_and_go() {
        let link = Fake::default();
        let c = cfg(PodNetworkMode::HostGw);
        // Someone else's route with our protocol would be listed too; a route of another
        // protocol is never listed, so never touched.
        let nodes = vec![p("a", 0, None), p("b", 1, None), p("c", 2, None)];
        let ch = sync(&link, &c, &nodes).unwrap();
        assert_eq!((ch.added, ch.removed), (2, 0), "one route per other node");
        assert_eq!(
            *link.entries.lock().unwrap(),
            BTreeSet::from([route(1, [192, 168, 9, 2]), route(2, [192, 168, 9, 3])])
        );
        assert_eq!(
            link.exempt.lock().unwrap().len(),
            3,
            "every pod CIDR is exempt"
        );
        // Nothing changed: nothing done.
        assert_eq!(sync(&link, &c, &nodes).unwrap(), Changes::default());
        // c's address changes, b goes.
        let mut moved = p("c", 2, None);
        moved.node_ip = Ipv4Addr::new(192, 168, 9, 77);
        let ch = sync(&link, &c, &[p("a", 0, None), moved]).unwrap();
        assert_eq!((ch.added, ch.removed), (1, 2));
        assert_eq!(
            *link.entries.lock().unwrap(),
            BTreeSet::from([route(2, [192, 168, 9, 77])])
        );
        assert_eq!(
            *link.exempt.lock().unwrap(),
            BTreeSet::from([
                "10.88.0.0/24".parse().unwrap(),
                "10.88.2.0/24".parse().unwrap()
            ])
        );
    }

    #[test]
    fn a_failed_entry_does_not_stop_the_others_and_is_retried() {
        let link = Fake::default();
        let c = cfg(PodNetworkMode::HostGw);
        *link.fail.lock().unwrap() = Some(route(1, [192, 168, 9, 2]));
        let nodes = vec![p("b", 1, None), p("c", 2, None)];
        let ch = sync(&link, &c, &nodes).unwrap();
        assert_eq!((ch.added, ch.failed), (1, 1));
        *link.fail.lock().unwrap() = None;
        let ch = sync(&link, &c, &nodes).unwrap();
        assert_eq!(
            (ch.added, ch.failed),
            (1, 0),
            "the next sync adds the missing one"
        );
    }

    #[test]
    fn vxlan_has_route_neighbour_and_fdb_per_node_with_a_vtep_mac() {
        let link = Fake::default();
        let c = cfg(PodNetworkMode::Vxlan);
        let nodes = vec![
            p("a", 0, Some("02:00:00:00:00:01")),
            p("b", 1, Some("02:00:00:00:00:02")),
            // Not yet published its VTEP: nothing for it.
            p("c", 2, None),
        ];
        sync(&link, &c, &nodes).unwrap();
        let dev = "skiff.vxlan".to_string();
        assert_eq!(
            *link.entries.lock().unwrap(),
            BTreeSet::from([
                Entry::Route {
                    dst: "10.88.1.0/24".parse().unwrap(),
                    via: Ipv4Addr::new(10, 88, 1, 0),
                    dev: Some(dev.clone()),
                },
                Entry::Neigh {
                    ip: Ipv4Addr::new(10, 88, 1, 0),
                    mac: "02:00:00:00:00:02".into(),
                    dev: dev.clone(),
                },
                Entry::Fdb {
                    mac: "02:00:00:00:00:02".into(),
                    dst: Ipv4Addr::new(192, 168, 9, 2),
                    dev,
                },
            ])
        );
        // Switching the node to host-gw removes the overlay's entries.
        let ch = sync(&link, &cfg(PodNetworkMode::HostGw), &nodes).unwrap();
        assert_eq!((ch.added, ch.removed), (2, 3));
    }

    #[test]
    fn prepare_publishes_the_backend() {
        let link = Fake::default();
        let a = prepare(&link, &cfg(PodNetworkMode::Vxlan)).unwrap();
        let data: Value =
            serde_json::from_str(a[BACKEND_DATA_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(data, json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:01"}));
        let a = prepare(&link, &cfg(PodNetworkMode::HostGw)).unwrap();
        assert_eq!(a[BACKEND_TYPE_ANNOTATION], "host-gw");
        assert!(a[BACKEND_DATA_ANNOTATION].is_null());
    }

    #[test]
    fn a_peer_is_read_from_the_typed_node() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "b", "annotations": {BACKEND_DATA_ANNOTATION: "{\"VNI\":1,\"VtepMAC\":\"0A:00:00:00:00:02\"}"}},
            "spec": {"podCIDR": "10.88.1.0/24"},
            "status": {"addresses": [{"type": "Hostname", "address": "b"}, {"type": "InternalIP", "address": "192.168.9.2"}]},
        }))
        .unwrap();
        assert_eq!(peer(&node), Some(p("b", 1, Some("0a:00:00:00:00:02"))));
        let no_cidr: Node = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
        assert_eq!(peer(&no_cidr), None);
    }

    #[test]
    fn kernel_state_is_read_from_ip_json() {
        let routes = r#"[{"dst":"10.88.5.0/24","gateway":"192.168.77.3","dev":"v0","flags":[]},{"dst":"10.88.6.0/24","gateway":"10.88.6.0","dev":"skiff.vxlan","flags":["onlink"]}]"#;
        assert_eq!(
            parse_routes(routes),
            vec![
                (
                    "10.88.5.0/24".parse().unwrap(),
                    Ipv4Addr::new(192, 168, 77, 3),
                    "v0".into()
                ),
                (
                    "10.88.6.0/24".parse().unwrap(),
                    Ipv4Addr::new(10, 88, 6, 0),
                    "skiff.vxlan".into()
                )
            ]
        );
        let neigh = r#"[{"dst":"10.88.6.0","lladdr":"0a:0b:0c:0d:0e:0f","state":["PERMANENT"]},{"dst":"10.88.7.0","lladdr":"0a:0b:0c:0d:0e:01","state":["STALE"]}]"#;
        assert_eq!(
            parse_neighbours(neigh),
            vec![(Ipv4Addr::new(10, 88, 6, 0), "0a:0b:0c:0d:0e:0f".into())]
        );
        let fdb = r#"[{"mac":"0a:0b:0c:0d:0e:0f","dst":"192.168.77.9","flags":["self"],"state":"permanent"},{"mac":"33:33:00:00:00:01","flags":["self"],"state":"permanent"}]"#;
        assert_eq!(
            parse_fdb(fdb),
            vec![("0a:0b:0c:0d:0e:0f".into(), Ipv4Addr::new(192, 168, 77, 9))]
        );
        assert!(no_vxlan_driver("Error: Unknown device type."));
        assert!(!no_vxlan_driver("RTNETLINK answers: File exists"));
        assert_eq!(
            NetError::NoVxlan("Error: Unknown device type.".into()).to_string(),
            "--pod-network vxlan needs the kernel's vxlan driver, which is missing (Error: Unknown device type.)"
        );
        assert_eq!(
            exemption_chain("a-very-long-bridge-name-indeed"),
            "SKIFF-NOMASQ-a-very-long-bri"
        );
        assert_eq!(
            exemption_rules("C", &BTreeSet::from(["10.88.1.0/24".parse().unwrap()])),
            "*nat\n:C - [0:0]\n-A C -d 10.88.1.0/24 -j ACCEPT\nCOMMIT\n"
        );
    }
}
