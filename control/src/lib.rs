//! skiff-control: the control plane.
//!
//! - [`store`]: objects, revisions, watches (SQLite by default, etcd for several servers);
//! - [`registry`]: the API's semantics over the store (validation, defaulting, allocation, deletion);
//! - [`apiserver`]: the Kubernetes-compatible HTTP API;
//! - [`controllers`]: level-triggered reconcilers (deployments, replica sets, endpoints, GC, nodes)
//!   and the scheduler;
//! - [`server`]: wires them together (`skiff server`); [`shared_state`]: what the servers of
//!   one cluster share through the datastore; [`leader`]: which of them runs the controllers.

pub mod apiserver;
pub mod controllers;
pub mod httpfwd;
pub mod leader;
pub mod masterleases;
pub mod private_files;
pub mod registry;
pub mod server;
pub mod shared_state;
pub mod store;
pub mod tls;
