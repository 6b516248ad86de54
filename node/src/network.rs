//! Pod and service addresses. Every pod takes an address from the node's pod CIDR; the node holds the
//! gateway (`.1`) on its bridge and each wasm pod's address, so listeners bind there and any
//! client, proxy or pod reaches both kinds of pod the same way.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Mutex, OnceLock};

use skiff_proxy::vip::{VipError, VipLink};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("bad pod CIDR {0:?}")]
    Cidr(String),
    #[error("the pod CIDR {0} is exhausted")]
    Exhausted(String),
    #[error("`{cmd}` failed: {msg}")]
    Command { cmd: String, msg: String },
    #[error("--pod-network vxlan needs the kernel's vxlan driver, which is missing ({0})")]
    NoVxlan(String),
}

/// What the node does to its network. The real one runs `ip`; tests use a fake.
pub trait Netlink: Send + Sync + 'static {
    /// Creates the bridge (if missing) with `gateway/prefix` on it, up.
    fn ensure_bridge(&self, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetError>;
    fn add_address(&self, bridge: &str, ip: Ipv4Addr) -> Result<(), NetError>;
    fn remove_address(&self, bridge: &str, ip: Ipv4Addr) -> Result<(), NetError>;
    /// The IPv4 addresses on the bridge, with their prefix lengths.
    fn addresses(&self, bridge: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError>;
}

/// Drives iproute2's `ip`.
pub struct IpCommand;

fn ip(args: &[&str]) -> Result<String, NetError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Command {
            cmd: format!("ip {}", args.join(" ")),
            msg: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(NetError::Command {
            cmd: format!("ip {}", args.join(" ")),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl Netlink for IpCommand {
    fn ensure_bridge(&self, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        if ip(&["link", "show", bridge]).is_err() {
            ip(&["link", "add", bridge, "type", "bridge"])?;
        }
        pin_mac(bridge)?;
        let have = ip(&["-4", "addr", "show", "dev", bridge])?;
        let cidr = format!("{gateway}/{prefix}");
        if !have.contains(&format!("inet {cidr} ")) {
            ip(&["addr", "add", &cidr, "dev", bridge])?;
        }
        ip(&["link", "set", bridge, "up"])?;
        Ok(())
    }

    fn add_address(&self, bridge: &str, addr: Ipv4Addr) -> Result<(), NetError> {
        add_host_address(bridge, addr)
    }

    fn remove_address(&self, bridge: &str, addr: Ipv4Addr) -> Result<(), NetError> {
        remove_host_address(bridge, addr)
    }

    fn addresses(&self, bridge: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        Ok(parse_addresses(&ip(&[
            "-4", "-o", "addr", "show", "dev", bridge,
        ])?))
    }
}

/// Sets a bridge's MAC address to what it is. A bridge whose address was never set takes the
/// lowest of its ports' and changes it as ports come and go; every neighbour that cached the
/// old one (pods for their gateway) then sends frames the bridge no longer takes as its own,
/// and they are dropped until the neighbour asks again. One set by hand never changes.
fn pin_mac(bridge: &str) -> Result<(), NetError> {
    let out = ip(&["-o", "link", "show", bridge])?;
    let mac = link_mac(&out).ok_or_else(|| NetError::Command {
        cmd: format!("ip -o link show {bridge}"),
        msg: "no MAC address".into(),
    })?;
    ip(&["link", "set", bridge, "address", mac])?;
    Ok(())
}

/// The MAC address in `ip -o link show` output.
fn link_mac(out: &str) -> Option<&str> {
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
}

/// The `inet ADDR/PREFIX` of `ip -4 -o addr show` output.
fn parse_addresses(out: &str) -> Vec<(Ipv4Addr, u8)> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            let (a, p) = words.next()?.split_once('/')?;
            Some((a.parse().ok()?, p.parse().ok()?))
        })
        .collect()
}

/// Adds `addr/32` to `dev`; already there is fine.
fn add_host_address(dev: &str, addr: Ipv4Addr) -> Result<(), NetError> {
    match ip(&["addr", "add", &format!("{addr}/32"), "dev", dev]) {
        Err(NetError::Command { msg, .. })
            if msg.contains("exists") || msg.contains("already assigned") =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// Removes `addr/32` from `dev`; already gone is fine.
fn remove_host_address(dev: &str, addr: Ipv4Addr) -> Result<(), NetError> {
    match ip(&["addr", "del", &format!("{addr}/32"), "dev", dev]) {
        Err(NetError::Command { msg, .. }) if msg.contains("Cannot assign") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Where the service proxy's ClusterIPs live: a dummy interface (like kube-proxy's
/// `kube-ipvs0`) where the kernel has the dummy driver, else the loopback interface. Either
/// way the node, and pods routed through it, reach them.
pub struct ServiceAddresses {
    name: String,
    device: OnceLock<String>,
}

impl ServiceAddresses {
    pub fn new(name: &str) -> ServiceAddresses {
        ServiceAddresses {
            name: name.to_string(),
            device: OnceLock::new(),
        }
    }

    /// The interface holding the addresses: created on first use.
    fn device(&self) -> &str {
        self.device.get_or_init(|| {
            let exists = ip(&["link", "show", &self.name]).is_ok()
                || ip(&["link", "add", &self.name, "type", "dummy"]).is_ok();
            if exists && ip(&["link", "set", &self.name, "up"]).is_ok() {
                return self.name.clone();
            }
            tracing::info!("no dummy interface driver; service addresses go on lo");
            let _ = ip(&["link", "set", "lo", "up"]);
            "lo".to_string()
        })
    }
}

fn vip_error(e: NetError) -> VipError {
    match e {
        NetError::Command { cmd, msg } => VipError { cmd, msg },
        other => VipError {
            cmd: String::new(),
            msg: other.to_string(),
        },
    }
}

impl VipLink for ServiceAddresses {
    fn add(&self, addr: Ipv4Addr) -> Result<(), VipError> {
        add_host_address(self.device(), addr).map_err(vip_error)
    }

    fn remove(&self, addr: Ipv4Addr) -> Result<(), VipError> {
        remove_host_address(self.device(), addr).map_err(vip_error)
    }
}

/// Allocates pod addresses in the node's pod CIDR (a /24 or larger).
pub struct PodNetwork {
    pub bridge: String,
    base: u32,
    size: u32,
    prefix: u8,
    used: Mutex<BTreeSet<u32>>,
    /// The reserved addresses put on the bridge ([`PodNetwork::bind_host`]): only these are
    /// taken off it again.
    bound: Mutex<BTreeSet<u32>>,
    /// Where the next search for a free address starts: addresses are handed out round-robin,
    /// as host-local IPAM does, so a just-released address is not reused at once.
    next: Mutex<u32>,
    link: Box<dyn Netlink>,
}

impl PodNetwork {
    pub fn new(cidr: &str, bridge: &str, link: Box<dyn Netlink>) -> Result<PodNetwork, NetError> {
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| NetError::Cidr(cidr.to_string()))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| NetError::Cidr(cidr.to_string()))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| NetError::Cidr(cidr.to_string()))?;
        let size = 1u32 << (32 - prefix);
        let base = u32::from(addr) & !(size - 1);
        let net = PodNetwork {
            bridge: bridge.to_string(),
            base,
            size,
            prefix,
            used: Mutex::new(BTreeSet::new()),
            bound: Mutex::new(BTreeSet::new()),
            next: Mutex::new(base + 2),
            link,
        };
        net.link.ensure_bridge(bridge, net.gateway(), prefix)?;
        net.remove_stale()?;
        Ok(net)
    }

    /// Removes the pod addresses (`/32`s of this pod CIDR) an earlier run left on the bridge:
    /// a new network holds none yet, and a stale one would shadow the route to an OCI pod later
    /// given that address.
    fn remove_stale(&self) -> Result<(), NetError> {
        for (ip, prefix) in self.link.addresses(&self.bridge)? {
            let a = u32::from(ip);
            if prefix == 32 && a > self.base + 1 && a < self.base + self.size - 1 {
                tracing::info!(%ip, "removing a pod address an earlier run left");
                self.link.remove_address(&self.bridge, ip)?;
            }
        }
        Ok(())
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// How many pods the network can address (all but network, gateway and broadcast).
    pub fn capacity(&self) -> u32 {
        self.size - 3
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }

    /// Reserves `want` if it is free and in range (a pod coming back after a restart), else
    /// the next free address. A wasm-only pod's address goes on the node when one of its
    /// containers listens ([`PodNetwork::bind_host`]); a sandboxed pod's goes in its namespace.
    pub fn allocate(&self, want: Option<Ipv4Addr>) -> Result<Ipv4Addr, NetError> {
        let ip = {
            let mut used = self.used.lock().expect("used");
            let pick = want
                .map(u32::from)
                .filter(|w| {
                    *w > self.base + 1 && *w < self.base + self.size - 1 && !used.contains(w)
                })
                .or_else(|| {
                    let (first, count) = (self.base + 2, self.size - 3);
                    let start = *self.next.lock().expect("next");
                    (0..count)
                        .map(|k| first + (start - first + k) % count)
                        .find(|i| !used.contains(i))
                })
                .ok_or_else(|| NetError::Exhausted(self.cidr()))?;
            used.insert(pick);
            if want.map(u32::from) != Some(pick) {
                *self.next.lock().expect("next") = pick + 1;
            }
            Ipv4Addr::from(pick)
        };
        Ok(ip)
    }

    /// Puts a reserved address on the node's bridge, for a wasm-only pod's listeners (once:
    /// a pod's second listener finds it there).
    pub fn bind_host(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        let mut bound = self.bound.lock().expect("bound");
        if !bound.contains(&u32::from(ip)) {
            self.link.add_address(&self.bridge, ip)?;
            bound.insert(u32::from(ip));
        }
        Ok(())
    }

    /// Frees a reserved address, taking it off the bridge if it was put there.
    pub fn release(&self, ip: Ipv4Addr) {
        let was_bound = self.bound.lock().expect("bound").remove(&u32::from(ip));
        if self.used.lock().expect("used").remove(&u32::from(ip)) && was_bound {
            if let Err(e) = self.link.remove_address(&self.bridge, ip) {
                tracing::warn!(%ip, error = %e, "could not remove a pod address");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Default, Clone)]
    struct Fake(Arc<Mutex<Vec<String>>>);
    impl Netlink for Fake {
        fn ensure_bridge(&self, b: &str, g: Ipv4Addr, p: u8) -> Result<(), NetError> {
            self.0.lock().unwrap().push(format!("bridge {b} {g}/{p}"));
            Ok(())
        }
        fn add_address(&self, _: &str, ip: Ipv4Addr) -> Result<(), NetError> {
            self.0.lock().unwrap().push(format!("add {ip}"));
            Ok(())
        }
        fn remove_address(&self, _: &str, ip: Ipv4Addr) -> Result<(), NetError> {
            self.0.lock().unwrap().push(format!("del {ip}"));
            Ok(())
        }
        fn addresses(&self, _: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
            // What the calls so far left on the bridge.
            let mut have: Vec<(Ipv4Addr, u8)> = Vec::new();
            for call in self.0.lock().unwrap().iter() {
                let words: Vec<&str> = call.split_whitespace().collect();
                match words[..] {
                    ["bridge", _, cidr] => {
                        let (a, p) = cidr.split_once('/').unwrap();
                        have.push((a.parse().unwrap(), p.parse().unwrap()));
                    }
                    ["add", a] => have.push((a.parse().unwrap(), 32)),
                    ["del", a] => have.retain(|(h, p)| !(*p == 32 && h.to_string() == a)),
                    _ => {}
                }
            }
            Ok(have)
        }
    }

    #[test]
    fn a_new_network_removes_pod_addresses_an_earlier_run_left() {
        let fake = Fake::default();
        // An earlier run: two wasm pods' addresses on the bridge, never released (it was
        // killed, or a stop timed out).
        let before = PodNetwork::new("10.88.3.0/24", "skiff0", Box::new(fake.clone())).unwrap();
        let a = before.allocate(None).unwrap();
        before.bind_host(a).unwrap();
        before.bind_host(Ipv4Addr::new(10, 88, 3, 9)).unwrap();
        // Someone else's address on the same bridge, outside this pod CIDR.
        fake.add_address("skiff0", Ipv4Addr::new(192, 168, 7, 7))
            .unwrap();
        drop(before);
        let _after = PodNetwork::new("10.88.3.0/24", "skiff0", Box::new(fake.clone())).unwrap();
        let left: BTreeSet<(Ipv4Addr, u8)> =
            fake.addresses("skiff0").unwrap().into_iter().collect();
        assert_eq!(
            left,
            BTreeSet::from([
                (Ipv4Addr::new(10, 88, 3, 1), 24),
                (Ipv4Addr::new(192, 168, 7, 7), 32)
            ]),
            "the gateway and the foreign address stay, the pod addresses go"
        );
    }

    #[test]
    fn only_addresses_put_on_the_bridge_are_taken_off_it() {
        let fake = Fake::default();
        let net = PodNetwork::new("10.88.3.0/24", "skiff0", Box::new(fake.clone())).unwrap();
        // A pod of commands: an address, never on the bridge.
        let quiet = net.allocate(None).unwrap();
        // A pod that serves: on the bridge once, however many listeners it has.
        let serving = net.allocate(None).unwrap();
        net.bind_host(serving).unwrap();
        net.bind_host(serving).unwrap();
        net.release(quiet);
        net.release(serving);
        net.release(serving);
        let calls = fake.0.lock().unwrap()[1..].to_vec();
        assert_eq!(
            calls,
            vec![format!("add {serving}"), format!("del {serving}")]
        );
    }

    #[test]
    fn the_mac_is_read_from_ip_output() {
        let out = "7: skiff0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 5a:ad:15:13:02:0d brd ff:ff:ff:ff:ff:ff\n";
        assert_eq!(link_mac(out), Some("5a:ad:15:13:02:0d"));
        assert_eq!(link_mac("1: lo: <LOOPBACK> link/loopback 00:00"), None);
    }

    #[test]
    fn addresses_are_read_from_ip_output() {
        let out = "5: skiff0    inet 10.88.0.1/24 brd 10.88.0.255 scope global skiff0\\       valid_lft forever preferred_lft forever\n5: skiff0    inet 10.88.0.7/32 scope global skiff0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(
            parse_addresses(out),
            vec![
                (Ipv4Addr::new(10, 88, 0, 1), 24),
                (Ipv4Addr::new(10, 88, 0, 7), 32)
            ]
        );
    }

    #[test]
    fn allocates_in_the_pod_cidr() {
        let fake = Fake::default();
        let net = PodNetwork::new("10.88.3.0/24", "skiff0", Box::new(fake.clone())).unwrap();
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 88, 3, 1));
        let a = net.allocate(None).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 88, 3, 2));
        // A pod coming back keeps its address.
        let b = net.allocate(Some(Ipv4Addr::new(10, 88, 3, 77))).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 88, 3, 77));
        // Out of range or taken: the next free one.
        assert_eq!(
            net.allocate(Some(Ipv4Addr::new(10, 99, 0, 5))).unwrap(),
            Ipv4Addr::new(10, 88, 3, 3)
        );
        net.release(a);
        // Round-robin: the released address is not handed out again at once.
        assert_eq!(net.allocate(None).unwrap(), Ipv4Addr::new(10, 88, 3, 4));
        assert_eq!(fake.0.lock().unwrap()[0], "bridge skiff0 10.88.3.1/24");
        let small = PodNetwork::new("10.0.0.0/30", "b", Box::new(Fake::default())).unwrap();
        small.allocate(None).unwrap();
        assert!(matches!(small.allocate(None), Err(NetError::Exhausted(_))));
    }
}
