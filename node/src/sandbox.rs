//! Pod sandboxes: the network namespace a pod with OCI containers lives in, set up with the
//! standard CNI plugins (loopback; bridge with static IPAM, so the node's own allocator stays
//! the one source of pod addresses; portmap for `hostPort`). Every container of such a pod
//! joins it, a wasm container's listeners included.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Where Debian's containernetworking-plugins live.
pub const DEFAULT_CNI_BIN: &str = "/usr/lib/cni";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("CNI plugin {plugin} ({command}): {msg}")]
    Plugin {
        plugin: String,
        command: String,
        msg: String,
    },
    #[error("network namespace {name}: {msg}")]
    Netns { name: String, msg: String },
}

/// A `hostPort` mapping of the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
}

/// The CNI setup of this node's pod network.
#[derive(Debug, Clone)]
pub struct Cni {
    pub bin_dir: PathBuf,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// One file per namespace this agent made: what is its own to clean up (other agents
    /// on the same host have theirs).
    pub state_dir: PathBuf,
}

/// A pod's network namespace.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub name: String,
    pub path: PathBuf,
    pub ip: Ipv4Addr,
    pub ports: Vec<PortMapping>,
}

/// The netns name of a pod (by its UID: unique across nodes and test runs).
pub fn netns_name(pod_uid: &str) -> String {
    format!("skiff-{pod_uid}")
}

impl Cni {
    /// Whether the plugins this setup needs are installed.
    pub fn available(&self) -> Result<(), String> {
        for p in ["bridge", "static", "loopback", "portmap"] {
            if !self.bin_dir.join(p).is_file() {
                return Err(format!(
                    "CNI plugin {p} not found in {}",
                    self.bin_dir.display()
                ));
            }
        }
        Ok(())
    }

    fn bridge_conf(&self, ip: Ipv4Addr) -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "skiff", "type": "bridge",
            "bridge": self.bridge, "isGateway": true, "ipMasq": true, "hairpinMode": true,
            "ipam": {
                "type": "static",
                "addresses": [{"address": format!("{ip}/{}", self.prefix), "gateway": self.gateway.to_string()}],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        })
    }

    fn portmap_conf(ports: &[PortMapping], prev: Option<Value>) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "skiff", "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": ports.iter().map(|p| json!({
                "hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol.to_lowercase(),
            })).collect::<Vec<_>>()},
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev;
        }
        conf
    }

    async fn plugin(
        &self,
        command: &str,
        conf: &Value,
        pod_uid: &str,
        netns: &Path,
        ifname: &str,
    ) -> Result<Value, SandboxError> {
        let kind = conf["type"].as_str().unwrap_or("").to_string();
        let err = |msg: String| SandboxError::Plugin {
            plugin: kind.clone(),
            command: command.to_string(),
            msg,
        };
        let mut child = tokio::process::Command::new(self.bin_dir.join(&kind))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod_uid)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.bin_dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| err(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(conf.to_string().as_bytes())
                .await
                .map_err(|e| err(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| err(e.to_string()))?;
        let stdout: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            let msg = stdout["msg"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
            return Err(err(msg));
        }
        Ok(stdout)
    }

    /// Creates the pod's namespace and plugs it into the bridge with `ip`. A namespace left
    /// by an earlier agent run for the same pod is kept as it is.
    pub async fn setup(
        &self,
        pod_uid: &str,
        ip: Ipv4Addr,
        ports: Vec<PortMapping>,
    ) -> Result<Sandbox, SandboxError> {
        let name = netns_name(pod_uid);
        let path = Path::new("/run/netns").join(&name);
        let sandbox = Sandbox {
            name: name.clone(),
            path: path.clone(),
            ip,
            ports: ports.clone(),
        };
        if path.exists() && has_address(&name, ip).await {
            return Ok(sandbox);
        }
        let _ = ip_netns(&["del", &name]).await;
        let _ = std::fs::create_dir_all(&self.state_dir);
        let _ = std::fs::write(self.state_dir.join(&name), state(&sandbox).to_string());
        ip_netns(&["add", &name])
            .await
            .map_err(|msg| SandboxError::Netns {
                name: name.clone(),
                msg,
            })?;
        let result = async {
            let lo = json!({"cniVersion": "1.0.0", "name": "skiff-lo", "type": "loopback"});
            self.plugin("ADD", &lo, pod_uid, &path, "lo").await?;
            let prev = self
                .plugin("ADD", &self.bridge_conf(ip), pod_uid, &path, "eth0")
                .await?;
            if !ports.is_empty() {
                self.plugin(
                    "ADD",
                    &Self::portmap_conf(&ports, Some(prev)),
                    pod_uid,
                    &path,
                    "eth0",
                )
                .await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            self.teardown(&sandbox, pod_uid).await;
            return Err(e);
        }
        Ok(sandbox)
    }

    /// Unplugs and deletes the pod's namespace. Best effort: every step runs even if one fails.
    pub async fn teardown(&self, sandbox: &Sandbox, pod_uid: &str) {
        if !sandbox.ports.is_empty() {
            let _ = self
                .plugin(
                    "DEL",
                    &Self::portmap_conf(&sandbox.ports, None),
                    pod_uid,
                    &sandbox.path,
                    "eth0",
                )
                .await;
        }
        if let Err(e) = self
            .plugin(
                "DEL",
                &self.bridge_conf(sandbox.ip),
                pod_uid,
                &sandbox.path,
                "eth0",
            )
            .await
        {
            tracing::debug!(netns = %sandbox.name, error = %e, "CNI DEL");
        }
        if let Err(e) = ip_netns(&["del", &sandbox.name]).await {
            tracing::debug!(netns = %sandbox.name, error = %e, "netns del");
        }
        let _ = std::fs::remove_file(self.state_dir.join(&sandbox.name));
    }

    /// The pod namespaces this agent made and has not removed.
    pub fn existing(&self) -> Vec<String> {
        std::fs::read_dir(&self.state_dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes a namespace this agent made whose pod is gone: unplugged first, as at the end
    /// of a pod (the plugins find the pod's address, masquerade and port rules through it).
    pub async fn remove_stale(&self, name: &str) {
        let recorded = std::fs::read_to_string(self.state_dir.join(name))
            .ok()
            .and_then(|text| parse_state(name, &text));
        match recorded {
            Some(sandbox) => {
                let uid = name.trim_start_matches("skiff-").to_string();
                self.teardown(&sandbox, &uid).await;
            }
            None => {
                let _ = ip_netns(&["del", name]).await;
                let _ = std::fs::remove_file(self.state_dir.join(name));
            }
        }
    }
}

/// What is recorded of a namespace the agent made: enough to unplug it later.
fn state(sandbox: &Sandbox) -> Value {
    json!({
        "ip": sandbox.ip.to_string(),
        "ports": sandbox.ports.iter().map(|p| json!({
            "hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol,
        })).collect::<Vec<_>>(),
    })
}

/// A recorded namespace (also the bare address earlier versions wrote).
fn parse_state(name: &str, text: &str) -> Option<Sandbox> {
    let (ip, ports) = match serde_json::from_str::<Value>(text) {
        Ok(v) if v.is_object() => {
            let ip = v["ip"].as_str()?.parse().ok()?;
            let ports = v["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some(PortMapping {
                        host_port: p["hostPort"].as_u64()? as u16,
                        container_port: p["containerPort"].as_u64()? as u16,
                        protocol: p["protocol"].as_str()?.to_string(),
                    })
                })
                .collect();
            (ip, ports)
        }
        _ => (text.trim().parse().ok()?, vec![]),
    };
    Some(Sandbox {
        name: name.to_string(),
        path: Path::new("/run/netns").join(name),
        ip,
        ports,
    })
}

async fn ip_netns(args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .arg("netns")
        .args(args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

async fn has_address(name: &str, ip: Ipv4Addr) -> bool {
    let out = tokio::process::Command::new("ip")
        .args(["-n", name, "-4", "addr", "show", "dev", "eth0"])
        .output()
        .await;
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("inet {ip}/")))
}

/// Binds a TCP listener inside the network namespace at `netns`: a thread enters the
/// namespace, binds, and ends; the socket stays in the namespace it was made in.
pub fn bind_in(netns: &Path, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| std::io::Error::other(format!("setns {}: {e}", netns.display())))?;
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| std::io::Error::other("bind thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_configs() {
        let cni = Cni {
            bin_dir: DEFAULT_CNI_BIN.into(),
            bridge: "skiff0".into(),
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            prefix: 24,
            state_dir: "/nonexistent".into(),
        };
        let b = cni.bridge_conf(Ipv4Addr::new(10, 88, 0, 7));
        assert_eq!(b["bridge"], "skiff0");
        assert_eq!(b["ipam"]["type"], "static");
        assert_eq!(b["ipam"]["addresses"][0]["address"], "10.88.0.7/24");
        assert_eq!(b["ipam"]["addresses"][0]["gateway"], "10.88.0.1");
        let p = Cni::portmap_conf(
            &[PortMapping {
                host_port: 8081,
                container_port: 8080,
                protocol: "TCP".into(),
            }],
            Some(json!({"ips": []})),
        );
        assert_eq!(p["runtimeConfig"]["portMappings"][0]["hostPort"], 8081);
        assert_eq!(p["runtimeConfig"]["portMappings"][0]["protocol"], "tcp");
        assert!(p.get("prevResult").is_some());
        assert_eq!(netns_name("u-1"), "skiff-u-1");
    }

    #[test]
    fn a_recorded_namespace_can_be_unplugged_later() {
        let sb = Sandbox {
            name: "skiff-u".into(),
            path: "/run/netns/skiff-u".into(),
            ip: Ipv4Addr::new(10, 88, 0, 9),
            ports: vec![PortMapping {
                host_port: 18080,
                container_port: 8080,
                protocol: "TCP".into(),
            }],
        };
        let back = parse_state("skiff-u", &state(&sb).to_string()).unwrap();
        assert_eq!(
            (back.ip, &back.path, &back.ports),
            (sb.ip, &sb.path, &sb.ports)
        );
        // What earlier versions wrote: the address alone.
        let old = parse_state("skiff-u", "10.88.0.9").unwrap();
        assert_eq!((old.ip, old.ports.len()), (sb.ip, 0));
    }
}
