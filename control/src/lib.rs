//! skiff-control: the control plane.
//!
//! - [`store`]: objects, revisions, watches (SQLite by default);
//! - [`registry`]: the API's semantics over the store (validation, defaulting, allocation, deletion);
//! - [`apiserver`]: the Kubernetes-compatible HTTP API;
//! - [`controllers`]: level-triggered reconcilers (deployments, replica sets, endpoints, GC, nodes)
//!   and the scheduler;
//! - [`server`]: wires them together (`skiff server`).

pub mod apiserver;
pub mod controllers;
pub mod httpfwd;
pub mod private_files;
pub mod registry;
pub mod server;
pub mod store;
pub mod tls;
