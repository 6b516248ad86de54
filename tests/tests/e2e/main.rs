//! The end-to-end tests: one test binary, one module per area. Run one area with
//! `cargo test --workspace --test e2e -- AREA::` (e.g. `ha::`), one test by its name.
//!
//! They start real processes (the skiff binary, docker-registry, runc, kubectl, etcd) and
//! drive them over the API. Each test brings its own ports, data dir, network namespace and
//! bridge, so the tests of every area run in parallel in one process.

mod api_input;
mod api_machinery;
mod api_transport;
mod cli;
mod controllers;
mod crds;
mod daemonsets;
mod durability;
mod external_components;
mod failover;
mod ha;
mod jobs;
mod join;
mod kinds;
mod kubectl;
mod many_images;
mod multinode;
mod multinode_failover;
mod node_certs;
mod node_reliability;
mod oci;
mod offline;
mod port_forward;
mod rbac;
mod semantics;
mod server_side_apply;
mod service_accounts;
mod services;
mod slices_events;
mod statefulsets;
mod store_disk;
mod wasm_node;
