//! The `kubernetes` Service's Endpoints when several API servers share a datastore, as
//! Kubernetes' lease endpoint reconciler (`--endpoint-reconciler-type=lease`) keeps them:
//! every server holds a lease of its own (here a `coordination.k8s.io/v1` Lease in
//! `kube-system` labelled [`LABEL`], its `holderIdentity` the server's `IP:PORT`) and renews it
//! every [`RenewConfig::interval`]; the Endpoints list the servers whose lease is live, this one
//! always among them. A server that stops renewing drops out once its lease has stood still for
//! its duration ([`RenewConfig::ttl`], 15 s as Kubernetes' `masterleases` TTL), measured on
//! the observing server's clock from when it saw the lease change: no two clocks are compared.
//! A server that shuts down cleanly deletes its lease and takes itself out at once.
//!
//! Servers on one address and different ports (several on one machine) are listed in one
//! subset per port, so every endpoint is a real server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use skiff_api::fields::FieldSelector;
use skiff_api::selector::Selector;
use skiff_api::{ApiError, Resource};
use tokio::sync::watch;

use crate::registry::{Registry, Sub, WriteOptions};

/// The label that marks an API server's endpoint lease.
pub const LABEL: &str = "skiff.dev/apiserver-endpoint";
pub const NAMESPACE: &str = "kube-system";

#[derive(Debug, Clone)]
pub struct RenewConfig {
    /// How often a server renews its lease and reconciles the Endpoints.
    pub interval: Duration,
    /// How long a lease that stood still counts as live.
    pub ttl: Duration,
}

impl Default for RenewConfig {
    fn default() -> Self {
        RenewConfig {
            interval: Duration::from_secs(5),
            ttl: Duration::from_secs(15),
        }
    }
}

/// The name of the lease of the server at `addr`: `apiserver-10-0-0-1-6443`.
pub fn lease_name(addr: SocketAddr) -> String {
    let ip: String = addr
        .ip()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("apiserver-{ip}-{}", addr.port())
}

fn micro_now() -> MicroTime {
    MicroTime(
        Timestamp::from_microsecond(chrono::Utc::now().timestamp_micros())
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(e.to_string())
}

/// The Endpoints' subsets for `servers`: one subset per port, addresses sorted.
pub fn subsets(servers: &BTreeSet<SocketAddr>) -> Value {
    let mut by_port: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
    for s in servers {
        by_port
            .entry(s.port())
            .or_default()
            .insert(s.ip().to_string());
    }
    Value::Array(
        by_port
            .into_iter()
            .map(|(port, ips)| {
                json!({"addresses": ips.into_iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                       "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})
            })
            .collect(),
    )
}

/// One server's view of the other servers' leases.
pub struct Reconciler {
    addr: SocketAddr,
    config: RenewConfig,
    /// Per lease name: its resourceVersion as last seen, and when this server saw it change.
    seen: HashMap<String, (Option<String>, Instant)>,
}

impl Reconciler {
    pub fn new(addr: SocketAddr, config: RenewConfig) -> Reconciler {
        Reconciler {
            addr,
            config,
            seen: HashMap::new(),
        }
    }

    /// Renews this server's lease (made when missing).
    fn renew(&self, reg: &Registry) -> Result<(), ApiError> {
        let leases = Resource::lookup("leases").expect("leases are served");
        let name = lease_name(self.addr);
        let opts = WriteOptions::default();
        let duration = self.config.ttl.as_secs().max(1) as i32;
        match reg.try_get(leases, Some(NAMESPACE), &name)? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name),
                        namespace: Some(NAMESPACE.into()),
                        labels: Some([(LABEL.to_string(), "true".to_string())].into()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.addr.to_string()),
                        lease_duration_seconds: Some(duration),
                        renew_time: Some(micro_now()),
                        ..Default::default()
                    }),
                };
                match reg.create(
                    leases,
                    Some(NAMESPACE),
                    serde_json::to_value(&lease).map_err(internal)?,
                    &opts,
                ) {
                    Err(e) if e.code != 409 => Err(e),
                    _ => Ok(()),
                }
            }
            Some(raw) => {
                let mut lease: Lease = serde_json::from_value(raw).map_err(internal)?;
                let spec = lease.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(self.addr.to_string());
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(micro_now());
                match reg.update(
                    leases,
                    Some(NAMESPACE),
                    &lease_name(self.addr),
                    serde_json::to_value(&lease).map_err(internal)?,
                    Sub::Main,
                    &opts,
                ) {
                    // Another writer in between (an old process on this address): next round.
                    Err(e) if e.code != 409 && e.code != 404 => Err(e),
                    _ => Ok(()),
                }
            }
        }
    }

    /// The servers whose lease is live now, this one always among them.
    fn live(&mut self, reg: &Registry) -> Result<BTreeSet<SocketAddr>, ApiError> {
        let leases = Resource::lookup("leases").expect("leases are served");
        let selector = Selector::parse(LABEL)?;
        let (items, _) = reg.list(
            leases,
            Some(NAMESPACE),
            &selector,
            &FieldSelector::default(),
        )?;
        let now = Instant::now();
        let mut live = BTreeSet::from([self.addr]);
        let mut names = BTreeSet::new();
        for item in items {
            let Ok(lease) = serde_json::from_value::<Lease>(item) else {
                continue;
            };
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            let spec = lease.spec.unwrap_or_default();
            let Some(addr) = spec
                .holder_identity
                .as_deref()
                .and_then(|h| h.parse::<SocketAddr>().ok())
            else {
                continue;
            };
            let version = lease.metadata.resource_version;
            let entry = self
                .seen
                .entry(name.clone())
                .or_insert((version.clone(), now));
            if entry.0 != version {
                *entry = (version, now);
            }
            let ttl = spec
                .lease_duration_seconds
                .map_or(self.config.ttl, |s| Duration::from_secs(s.max(1) as u64));
            if now.duration_since(entry.1) <= ttl {
                live.insert(addr);
            }
            names.insert(name);
        }
        self.seen.retain(|n, _| names.contains(n));
        Ok(live)
    }

    /// One round: renew, then make the Endpoints list the live servers.
    pub fn reconcile(&mut self, reg: &Registry) -> Result<(), ApiError> {
        self.renew(reg)?;
        let live = self.live(reg)?;
        write_endpoints(reg, &live)
    }

    /// A clean shutdown: this server's lease goes, and it leaves the Endpoints now.
    pub fn remove(&mut self, reg: &Registry) -> Result<(), ApiError> {
        let leases = Resource::lookup("leases").expect("leases are served");
        match reg.delete(
            leases,
            Some(NAMESPACE),
            &lease_name(self.addr),
            &Default::default(),
        ) {
            Err(e) if e.code != 404 => return Err(e),
            _ => {}
        }
        let mut live = self.live(reg)?;
        live.remove(&self.addr);
        if live.is_empty() {
            // The last server keeps itself listed: an empty list helps no client.
            return Ok(());
        }
        write_endpoints(reg, &live)
    }
}

/// Writes `default/kubernetes` — its Endpoints and EndpointSlices — with `servers` when they
/// list others.
fn write_endpoints(reg: &Registry, servers: &BTreeSet<SocketAddr>) -> Result<(), ApiError> {
    write_endpoints_only(reg, servers)?;
    write_slices(reg, &subsets(servers))
}

fn write_endpoints_only(reg: &Registry, servers: &BTreeSet<SocketAddr>) -> Result<(), ApiError> {
    let ep = Resource::lookup("endpoints").expect("endpoints");
    let want = subsets(servers);
    let opts = WriteOptions::default();
    let mut next = json!({"metadata": {"name": "kubernetes", "namespace": "default",
                                       "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                          "subsets": want});
    match reg.try_get(ep, Some("default"), "kubernetes")? {
        None => match reg.create(ep, Some("default"), next, &opts) {
            Err(e) if e.code != 409 => Err(e),
            _ => Ok(()),
        },
        Some(cur) if cur.get("subsets") != next.get("subsets") => {
            next["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
            tracing::info!(servers = ?servers, "the kubernetes Service's endpoints change");
            match reg.update(ep, Some("default"), "kubernetes", next, Sub::Main, &opts) {
                Err(e) if e.code != 409 => Err(e),
                _ => Ok(()),
            }
        }
        Some(_) => Ok(()),
    }
}

/// The `kubernetes` Service's EndpointSlices for the Endpoints' `subsets`, as the
/// kube-apiserver's reconciler writes them beside the Endpoints (the proxy reads slices): one
/// slice per subset — `kubernetes` for the first, `kubernetes-PORT` for servers on other ports —
/// labelled with the Service and no manager; slices of ports no longer served are deleted.
pub fn write_slices(reg: &Registry, subsets: &Value) -> Result<(), ApiError> {
    let slices = Resource::lookup("endpointslices").expect("endpointslices");
    let opts = WriteOptions::default();
    let mut wanted = BTreeSet::new();
    for (i, subset) in subsets.as_array().into_iter().flatten().enumerate() {
        let port = subset
            .pointer("/ports/0/port")
            .cloned()
            .unwrap_or(Value::Null);
        let name = match i {
            0 => "kubernetes".to_string(),
            _ => format!("kubernetes-{port}"),
        };
        let endpoints: Vec<Value> = subset["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| json!({"addresses": [a["ip"]], "conditions": {"ready": true}}))
            .collect();
        let mut next = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                              "metadata": {"name": name, "namespace": "default",
                                           "labels": {"kubernetes.io/service-name": "kubernetes"}},
                              "addressType": "IPv4",
                              "endpoints": endpoints,
                              "ports": [{"name": "https", "port": port, "protocol": "TCP"}]});
        match reg.try_get(slices, Some("default"), &name)? {
            None => match reg.create(slices, Some("default"), next, &opts) {
                Err(e) if e.code != 409 => return Err(e),
                _ => {}
            },
            Some(cur)
                if cur.get("endpoints") != next.get("endpoints")
                    || cur.get("ports") != next.get("ports") =>
            {
                next["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
                match reg.update(slices, Some("default"), &name, next, Sub::Main, &opts) {
                    Err(e) if e.code != 409 => return Err(e),
                    _ => {}
                }
            }
            Some(_) => {}
        }
        wanted.insert(name);
    }
    let ours = Selector::parse("kubernetes.io/service-name=kubernetes")?;
    let (have, _) = reg.list(slices, Some("default"), &ours, &FieldSelector::default())?;
    for slice in have {
        let name = skiff_api::meta::name(&slice);
        let managed = slice
            .pointer("/metadata/labels/endpointslice.kubernetes.io~1managed-by")
            .is_some();
        if !managed && !wanted.contains(name) {
            match reg.delete(slices, Some("default"), name, &Default::default()) {
                Err(e) if e.code != 404 => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Renews this server's lease and reconciles the Endpoints every interval until `stop`, then
/// takes this server out.
pub async fn run(
    reg: Arc<Registry>,
    addr: SocketAddr,
    config: RenewConfig,
    mut stop: watch::Receiver<bool>,
) {
    let interval = config.interval;
    let rec = Arc::new(std::sync::Mutex::new(Reconciler::new(addr, config)));
    let once = |remove: bool| {
        let (reg, rec) = (reg.clone(), rec.clone());
        tokio::task::spawn_blocking(move || {
            let mut rec = rec.lock().unwrap_or_else(|e| e.into_inner());
            if remove {
                rec.remove(&reg)
            } else {
                rec.reconcile(&reg)
            }
        })
    };
    loop {
        match once(false).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e.message, "the kubernetes Service's endpoints: cannot renew or reconcile")
            }
            Err(e) => tracing::warn!(error = %e, "the kubernetes Service's endpoints"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    match once(true).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e.message, "taking this server out of the kubernetes Service's endpoints")
        }
        Err(e) => {
            tracing::warn!(error = %e, "taking this server out of the kubernetes Service's endpoints")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempfile::TempDir, Arc<Registry>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::sqlite::SqliteStore::open(dir.path()).unwrap());
        let reg = Registry::new(store, Default::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        (dir, reg)
    }

    fn listed(reg: &Registry) -> Value {
        let ep = Resource::lookup("endpoints").unwrap();
        reg.get(ep, Some("default"), "kubernetes").unwrap()["subsets"].clone()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn subsets_group_servers_by_port() {
        let s: BTreeSet<SocketAddr> = [
            addr("10.0.0.2:6443"),
            addr("10.0.0.1:6443"),
            addr("10.0.0.1:6444"),
        ]
        .into();
        assert_eq!(
            subsets(&s),
            json!([{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]},
                   {"addresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "https", "port": 6444, "protocol": "TCP"}]}])
        );
        assert_eq!(lease_name(addr("10.0.0.1:6443")), "apiserver-10-0-0-1-6443");
    }

    /// Two servers are both listed; one that stops renewing drops out after the TTL (and not
    /// before), on the other's clock; one that shuts down cleanly drops out at once.
    #[test]
    fn live_servers_are_listed_and_a_silent_one_drops_out() {
        let (_dir, reg) = registry();
        let config = RenewConfig {
            interval: Duration::from_millis(100),
            ttl: Duration::from_secs(1),
        };
        let (a, b) = (addr("127.0.0.1:6443"), addr("127.0.0.1:6444"));
        let mut ra = Reconciler::new(a, config.clone());
        let mut rb = Reconciler::new(b, config.clone());
        ra.reconcile(&reg).unwrap();
        rb.reconcile(&reg).unwrap();
        ra.reconcile(&reg).unwrap();
        assert_eq!(listed(&reg), subsets(&[a, b].into()));
        // b goes silent: a keeps it for the TTL, then drops it.
        let silent = Instant::now();
        while listed(&reg) != subsets(&[a].into()) {
            assert!(
                silent.elapsed() < Duration::from_secs(10),
                "b never dropped out"
            );
            std::thread::sleep(Duration::from_millis(50));
            ra.reconcile(&reg).unwrap();
        }
        assert!(
            silent.elapsed() >= Duration::from_millis(900),
            "{:?}",
            silent.elapsed()
        );
        // b is back; then a shuts down cleanly and leaves at once.
        rb.reconcile(&reg).unwrap();
        assert_eq!(listed(&reg), subsets(&[a, b].into()));
        ra.remove(&reg).unwrap();
        assert_eq!(listed(&reg), subsets(&[b].into()));
        // The last server keeps itself listed.
        rb.remove(&reg).unwrap();
        assert_eq!(listed(&reg), subsets(&[b].into()));
    }
}
