//! Service addresses on the node. Each ClusterIP with endpoints is added as a /32 to a local
//! interface so the node, and pods routed through it, reach it; the proxy listens there.
//! The interface is a dummy one (`skiff-svc0`, like kube-proxy's `kube-ipvs0`) where the
//! kernel has the dummy driver, else the loopback interface.

use std::net::Ipv4Addr;
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
#[error("`{cmd}` failed: {msg}")]
pub struct VipError {
    pub cmd: String,
    pub msg: String,
}

pub trait VipLink: Send + Sync + 'static {
    fn add(&self, ip: Ipv4Addr) -> Result<(), VipError>;
    fn remove(&self, ip: Ipv4Addr) -> Result<(), VipError>;
}

/// Service addresses are already local, or not wanted (tests on loopback).
pub struct NoVips;

impl VipLink for NoVips {
    fn add(&self, _: Ipv4Addr) -> Result<(), VipError> {
        Ok(())
    }
    fn remove(&self, _: Ipv4Addr) -> Result<(), VipError> {
        Ok(())
    }
}

/// Drives iproute2's `ip`.
pub struct IpVips {
    name: String,
    device: OnceLock<String>,
}

impl IpVips {
    pub fn new(name: &str) -> IpVips {
        IpVips {
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

fn ip(args: &[&str]) -> Result<String, VipError> {
    let cmd = || format!("ip {}", args.join(" "));
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| VipError {
            cmd: cmd(),
            msg: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(VipError {
            cmd: cmd(),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl VipLink for IpVips {
    fn add(&self, addr: Ipv4Addr) -> Result<(), VipError> {
        match ip(&["addr", "add", &format!("{addr}/32"), "dev", self.device()]) {
            Err(e) if e.msg.contains("exists") || e.msg.contains("already assigned") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn remove(&self, addr: Ipv4Addr) -> Result<(), VipError> {
        match ip(&["addr", "del", &format!("{addr}/32"), "dev", self.device()]) {
            Err(e) if e.msg.contains("Cannot assign") => Ok(()),
            other => other.map(|_| ()),
        }
    }
}
