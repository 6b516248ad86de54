//! skiff-node: the node agent. It joins the cluster through the API (registers its Node,
//! heartbeats), runs the node's service proxy, watches the pods bound to it, runs them, reports their status as a kubelet
//! does, and serves their logs to the API server.
//!
//! - [`agent`]: the agent loop (registration, pod watch);
//! - [`heartbeat`]: the node Lease renewed every few seconds, the Node status posted seldom;
//! - [`pod`]: one pod's worker — pull, start, restart policy, status;
//! - [`network`]: pod addresses from the node's pod CIDR, behind a trait so tests can fake it;
//! - [`routes`]: routes to the other nodes' pod networks (host-gw or vxlan), following the Nodes;
//! - [`logs`]: per-container log files and the log endpoint;
//! - [`services`]: the wasm endpoints the service proxy (crate skiff-proxy) serves in-process;
//! - [`backoff`]: crash-loop and pull backoff (10 s doubling to 5 min, reset after 10 min).

pub mod agent;
pub mod backoff;
pub mod exec;
#[cfg(test)]
mod fake_api;
pub mod heartbeat;
pub mod join;
pub mod logs;
pub mod network;
pub mod oci;
pub mod pod;
pub mod podproxy;
pub mod portforward;
pub mod probe;
pub mod routes;
pub mod sandbox;
pub mod services;
pub mod spdy;

pub use agent::{Agent, AgentConfig};
