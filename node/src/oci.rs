//! OCI containers on the node: the image store, the runc driver and the CNI setup the pod
//! workers share, the container spec a pod's container maps to, and the cleanup of what an
//! earlier agent run left.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use skiff_api::quantity;
use skiff_oci::{BindMount, ContainerSpec, Containers, ImageStore, Runc};

use crate::sandbox::{self, Cni, Sandbox};

/// Most processes one container may run unless the node says otherwise (a fork bomb stays
/// inside its container).
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;

/// How long an image no pod uses is kept (a rollback finds it still here).
pub const IMAGE_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// What the node needs to run OCI containers.
pub struct OciNode {
    pub store: ImageStore,
    pub containers: Containers,
    pub runc: Runc,
    pub cni: Cni,
    /// Pulls hold it shared; image garbage collection exclusively.
    pub gc_lock: tokio::sync::RwLock<()>,
}

/// Why this node cannot run OCI containers.
#[derive(Debug, Clone)]
pub struct NoOci(pub String);

impl OciNode {
    /// Sets up the OCI side under `dir`, or says why this node cannot run OCI containers
    /// (no runc, no CNI plugins, not root).
    pub fn new(
        dir: &Path,
        insecure: Vec<String>,
        runc_binary: Option<&Path>,
        cni: Cni,
    ) -> Result<OciNode, NoOci> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NoOci("the agent does not run as root".into()));
        }
        let runc = Runc::find(runc_binary, dir.join("runc"))
            .ok_or_else(|| NoOci("runc is not installed".into()))?;
        cni.available().map_err(NoOci)?;
        skiff_oci::runc::become_subreaper().map_err(|e| NoOci(e.to_string()))?;
        let store =
            ImageStore::new(dir.join("images"), insecure).map_err(|e| NoOci(e.to_string()))?;
        let containers =
            Containers::new(dir.join("containers")).map_err(|e| NoOci(e.to_string()))?;
        Ok(OciNode {
            store,
            containers,
            runc,
            cni,
            gc_lock: tokio::sync::RwLock::new(()),
        })
    }

    /// Stops and removes every container, rootfs and pod namespace whose pod is not in
    /// `keep` (pod UIDs): what an earlier agent run left for pods deleted meanwhile.
    pub async fn sweep(&self, keep: &HashSet<String>) {
        let owned = |id: &str| keep.iter().any(|uid| id.starts_with(&format!("{uid}-")));
        for state in self.runc.list().await {
            if !owned(&state.id) {
                tracing::info!(container = %state.id, "removing a container whose pod is gone");
                let _ = self.runc.delete(&state.id).await;
            }
        }
        for id in self.containers.ids() {
            if !owned(&id) {
                let _ = self.containers.remove(&id);
            }
        }
        for ns in self.cni.existing() {
            let uid = ns.trim_start_matches("skiff-");
            if !keep.contains(uid) {
                tracing::info!(netns = %ns, "removing a pod network namespace whose pod is gone");
                self.cni.remove_stale(&ns).await;
            }
        }
    }

    /// Forgets images no pod on the node uses and none used within [`IMAGE_MIN_AGE`], and
    /// deletes their layers that no other image and no container shares.
    /// Skipped while a pull is in progress (a later round collects): it never waits for the
    /// network.
    pub async fn collect_images(&self, in_use: &HashSet<String>) -> usize {
        let Ok(_guard) = self.gc_lock.try_write() else {
            return 0;
        };
        self.store
            .gc(in_use, IMAGE_MIN_AGE, &self.containers.layers_in_use())
    }
}

/// Stops every OCI container the agent with data in `dir` started, and removes their root
/// filesystems and pod namespaces (the agent itself must not be running). Returns how many
/// containers were stopped.
pub async fn reset(dir: &Path) -> Result<usize, String> {
    let oci_dir = dir.join("oci");
    if !oci_dir.is_dir() {
        return Ok(0);
    }
    let runc = Runc::find(None, oci_dir.join("runc")).ok_or("runc is not installed")?;
    let containers = Containers::new(oci_dir.join("containers")).map_err(|e| e.to_string())?;
    let cni = Cni {
        bin_dir: sandbox::DEFAULT_CNI_BIN.into(),
        bridge: String::new(),
        gateway: Ipv4Addr::UNSPECIFIED,
        prefix: 24,
        state_dir: oci_dir.join("netns"),
    };
    let node = OciNode {
        store: ImageStore::new(oci_dir.join("images"), vec![]).map_err(|e| e.to_string())?,
        containers,
        runc,
        cni,
        gc_lock: tokio::sync::RwLock::new(()),
    };
    let count = node.runc.list().await.len();
    node.sweep(&HashSet::new()).await;
    Ok(count)
}

/// The runc ID of a pod's container: the pod UID keeps it unique on the node.
pub fn container_id(pod_uid: &str, container: &str) -> String {
    format!("{pod_uid}-{container}")
}

/// Files every container of a sandboxed pod gets: its resolv.conf (the cluster DNS and the
/// namespace's search path), hosts and hostname.
pub fn pod_files(
    pod_dir: &Path,
    pod_name: &str,
    namespace: &str,
    ip: Ipv4Addr,
    dns: Option<Ipv4Addr>,
) -> std::io::Result<Vec<BindMount>> {
    let etc = pod_dir.join("etc");
    std::fs::create_dir_all(&etc)?;
    let resolv = match dns {
        Some(dns) => format!(
            "nameserver {dns}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        ),
        None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    std::fs::write(etc.join("resolv.conf"), resolv)?;
    std::fs::write(
        etc.join("hosts"),
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{pod_name}\n"
        ),
    )?;
    std::fs::write(etc.join("hostname"), format!("{pod_name}\n"))?;
    Ok(["resolv.conf", "hosts", "hostname"]
        .iter()
        .map(|f| BindMount {
            source: etc.join(f),
            destination: format!("/etc/{f}"),
            read_only: true,
        })
        .collect())
}

/// The runtime spec of one of a pod's containers (image aside).
pub fn container_spec(
    pod: &Pod,
    container: &Container,
    env: Vec<(String, String)>,
    sandbox: &Sandbox,
    mounts: Vec<BindMount>,
    cgroups_path: String,
) -> ContainerSpec {
    let sc = container.security_context.clone().unwrap_or_default();
    let pod_sc = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.clone())
        .unwrap_or_default();
    let id = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
    let resources = container.resources.clone().unwrap_or_default();
    let amount = |m: &Option<BTreeMap<String, Quantity>>, k: &str| {
        m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone())
    };
    let caps = sc.capabilities.clone().unwrap_or_default();
    ContainerSpec {
        command: container.command.clone().unwrap_or_default(),
        args: container.args.clone().unwrap_or_default(),
        env,
        working_dir: container.working_dir.clone(),
        run_as_user: id(sc.run_as_user.or(pod_sc.run_as_user)),
        run_as_group: id(sc.run_as_group.or(pod_sc.run_as_group)),
        hostname: crate::pod::hostname(pod).to_string(),
        netns: Some(sandbox.path.clone()),
        read_only_root: sc.read_only_root_filesystem.unwrap_or(false),
        mounts,
        memory_limit: amount(&resources.limits, "memory").and_then(|q| quantity::bytes(&q)),
        cpu_limit_millis: amount(&resources.limits, "cpu").and_then(|q| quantity::cpu_millis(&q)),
        cpu_request_millis: amount(&resources.requests, "cpu")
            .and_then(|q| quantity::cpu_millis(&q)),
        pids_limit: Some(DEFAULT_PIDS_LIMIT),
        cgroups_path,
        add_capabilities: caps.add.unwrap_or_default(),
        drop_capabilities: caps.drop.unwrap_or_default(),
        privileged: sc.privileged.unwrap_or(false),
    }
}

/// The pod's `hostPort` mappings.
pub fn host_ports(pod: &Pod) -> Vec<sandbox::PortMapping> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(sandbox::PortMapping {
                host_port: p.host_port.filter(|h| *h > 0)? as u16,
                container_port: p.container_port as u16,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pod_container_maps_to_a_runtime_spec() {
        let pod = json!({"metadata": {"name": "web-1"}, "spec": {"securityContext": {"runAsUser": 1000},
            "containers": [{"name": "a", "ports": [{"containerPort": 8080, "hostPort": 18080}, {"containerPort": 9090}]}]}});
        let c = json!({"name": "a", "command": ["/bin/sh"], "args": ["-c", "echo hi"],
            "securityContext": {"readOnlyRootFilesystem": true, "capabilities": {"add": ["NET_ADMIN"]}},
            "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}, "requests": {"cpu": "250m"}}});
        let sb = Sandbox {
            name: "skiff-u".into(),
            path: "/run/netns/skiff-u".into(),
            ip: Ipv4Addr::new(10, 88, 0, 5),
            ports: vec![],
        };
        let pod = crate::pod::typed(&pod);
        let c: Container = serde_json::from_value(c).unwrap();
        let s = container_spec(&pod, &c, vec![], &sb, vec![], "/skiff/u-a".into());
        assert_eq!(s.command, vec!["/bin/sh"]);
        assert_eq!(s.args, vec!["-c", "echo hi"]);
        assert_eq!(s.hostname, "web-1");
        assert_eq!(s.run_as_user, Some(1000));
        assert!(s.read_only_root);
        assert_eq!(s.memory_limit, Some(64 << 20));
        assert_eq!(s.cpu_limit_millis, Some(500));
        assert_eq!(s.cpu_request_millis, Some(250));
        assert_eq!(s.add_capabilities, vec!["NET_ADMIN"]);
        assert_eq!(s.netns.as_deref(), Some(Path::new("/run/netns/skiff-u")));
        let ports = host_ports(&pod);
        assert_eq!(ports.len(), 1);
        assert_eq!((ports[0].host_port, ports[0].container_port), (18080, 8080));
    }

    #[test]
    fn pod_files_point_at_the_cluster_dns() {
        let dir = tempfile::tempdir().unwrap();
        let m = pod_files(
            dir.path(),
            "web-1",
            "shop",
            Ipv4Addr::new(10, 88, 0, 5),
            Some(Ipv4Addr::new(10, 96, 0, 10)),
        )
        .unwrap();
        assert_eq!(m.len(), 3);
        let resolv = std::fs::read_to_string(dir.path().join("etc/resolv.conf")).unwrap();
        assert!(resolv.contains("nameserver 10.96.0.10"));
        assert!(resolv.contains("search shop.svc.cluster.local"));
        let hosts = std::fs::read_to_string(dir.path().join("etc/hosts")).unwrap();
        assert!(hosts.contains("10.88.0.5\tweb-1"));
    }
}
