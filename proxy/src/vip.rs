//! Service addresses on the node. Each ClusterIP with endpoints is added as a /32 to a local
//! interface so the node, and pods routed through it, reach it; the proxy listens there. The
//! node's network code implements [`VipLink`] (skiff-node's `network::ServiceAddresses`).

use std::net::Ipv4Addr;

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
