//! Routing of `pods/{name}/log` and `pods/{name}/exec` to the node agent that runs the pod.
//!
//! The agent advertises its endpoint in the Node's `status.daemonEndpoints.kubeletEndpoint.Port`
//! at its InternalIP, as a kubelet does; the API server forwards the request there over TLS
//! (the agent's serving certificate is signed by the cluster CA for that address, and the API
//! server presents its `skiff-apiserver-kubelet-client` certificate).

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use serde_json::Value;
use skiff_api::{ApiError, Resource};

use super::Shared;

pub async fn forward(
    state: &Shared,
    ns: &str,
    pod: &str,
    sub: &str,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let pods = Resource::lookup("pods").expect("pods");
    let nodes = Resource::lookup("nodes").expect("nodes");
    let p = state.registry.get(pods, Some(ns), pod)?;
    let node_name = p
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {pod} is not scheduled to a node yet"))
        })?;
    let node = state.registry.get(nodes, None, node_name)?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let ip = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
        .and_then(|x| x["address"].as_str())
        .unwrap_or("");
    if port == 0 || ip.is_empty() {
        return Err(ApiError::bad_request(format!(
            "node {node_name} has no agent endpoint to serve {sub}"
        )));
    }
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let url = format!("https://{ip}:{port}/pods/{ns}/{pod}/{sub}{query}");
    // Agents serve logs and exec only to the API server's client certificate; their serving
    // certificate is checked against the cluster CA for the node's address.
    crate::httpfwd::forward(&url, req, Some(state.kubelet_client.clone())).await
}
