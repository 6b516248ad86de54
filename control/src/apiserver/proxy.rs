//! The proxy subresources: `pods/{[scheme:]name[:port]}/proxy/{path}` and
//! `services/{[scheme:]name[:port]}/proxy/{path}` forward an HTTP request (method, headers
//! without the caller's credentials, body, query) to the pod's port or to a ready endpoint of
//! the service, and stream the answer back, as the Kubernetes API server does for
//! `kubectl proxy` users. A pod is reached through the agent of its node (which connects to it
//! as port-forward does); an endpoint that names no pod is reached directly.

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use skiff_api::{ApiError, Resource};

use super::path::ApiPath;
use super::Shared;

/// `[scheme:]name[:port]` as Kubernetes splits it: the scheme is empty, `http` or `https`.
pub fn split_name(id: &str) -> Result<(&str, &str, &str), ApiError> {
    let parts: Vec<&str> = id.split(':').collect();
    let (scheme, name, port) = match parts[..] {
        [name] => ("", name, ""),
        [name, port] => ("", name, port),
        [scheme, name, port] => (scheme, name, port),
        _ => return Err(ApiError::bad_request(format!("invalid proxy name {id:?}"))),
    };
    if !matches!(scheme, "" | "http" | "https") || name.is_empty() {
        return Err(ApiError::bad_request(format!("invalid proxy name {id:?}")));
    }
    Ok((scheme, name, port))
}

/// What follows `/{id}/proxy` in the request path (at least `/`).
fn path_below(uri_path: &str, id: &str) -> String {
    let marker = format!("/{id}/proxy");
    match uri_path.find(&marker) {
        Some(at) => {
            let rest = &uri_path[at + marker.len()..];
            if rest.is_empty() {
                "/".into()
            } else {
                rest.to_string()
            }
        }
        None => "/".into(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::internal(format!("stored object: {e}")))
}

pub async fn forward(
    state: &Shared,
    p: &ApiPath,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let ns = p.namespace.clone().unwrap_or_else(|| "default".into());
    let id = p.name.clone().unwrap_or_default();
    let (scheme, name, port) = split_name(&id)?;
    if scheme == "https" {
        return Err(ApiError::bad_request(
            "proxying to https endpoints is not supported; use http",
        ));
    }
    let below = path_below(req.uri().path(), &id);
    match p.resource.plural {
        "pods" => {
            let pods = Resource::lookup("pods").expect("pods");
            let reg = state.registry.clone();
            let (ns2, name2) = (ns.clone(), name.to_string());
            let pod: Pod = decode(
                tokio::task::spawn_blocking(move || reg.get(pods, Some(&ns2), &name2))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))??,
            )?;
            let port = pod_port(&pod, port)?;
            super::nodeproxy::forward(state, &ns, name, &format!("proxy/{port}{below}"), req).await
        }
        "services" => {
            let (services, endpoints) = (
                Resource::lookup("services").expect("services"),
                Resource::lookup("endpoints").expect("endpoints"),
            );
            let reg = state.registry.clone();
            let (ns2, name2) = (ns.clone(), name.to_string());
            let (svc, eps) = tokio::task::spawn_blocking(move || {
                let svc = reg.get(services, Some(&ns2), &name2)?;
                let eps = reg.get(endpoints, Some(&ns2), &name2).ok();
                Ok::<_, ApiError>((svc, eps))
            })
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
            let svc: Service = decode(svc)?;
            let eps: Option<Endpoints> = eps.map(decode).transpose()?;
            let (ip, port, pod) = endpoint(&svc, eps.as_ref(), port)?;
            match pod {
                Some(pod) => {
                    super::nodeproxy::forward(
                        state,
                        &ns,
                        &pod,
                        &format!("proxy/{port}{below}"),
                        req,
                    )
                    .await
                }
                None => {
                    let query = req
                        .uri()
                        .query()
                        .map(|q| format!("?{q}"))
                        .unwrap_or_default();
                    crate::httpfwd::forward(&format!("http://{ip}:{port}{below}{query}"), req, None)
                        .await
                }
            }
        }
        other => Err(ApiError::not_found_path(&format!("{other}/proxy"))),
    }
}

/// The pod's port a proxy name asks for: a number, a container port's name, or (none) the
/// first declared container port, else 80.
fn pod_port(pod: &Pod, port: &str) -> Result<u16, ApiError> {
    let declared = || {
        pod.spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
    };
    if port.is_empty() {
        return Ok(declared()
            .next()
            .map(|p| p.container_port as u16)
            .unwrap_or(80));
    }
    if let Ok(n) = port.parse::<u16>() {
        return Ok(n);
    }
    declared()
        .find(|p| p.name.as_deref() == Some(port))
        .map(|p| p.container_port as u16)
        .ok_or_else(|| ApiError::bad_request(format!("pod has no port named {port:?}")))
}

/// A ready endpoint of the service port a proxy name asks for (its number or name; none: the
/// service's only port): its address, port and pod. Picked at random among the ready ones.
fn endpoint(
    svc: &Service,
    eps: Option<&Endpoints>,
    port: &str,
) -> Result<(String, u16, Option<String>), ApiError> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let sp = if port.is_empty() {
        match &ports[..] {
            [only] => only.clone(),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "service {name} has several ports: name one (services/{name}:PORT/proxy)"
                )))
            }
        }
    } else {
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port) || p.port.to_string() == port)
            .cloned()
            .ok_or_else(|| {
                ApiError::unavailable(format!(
                    "no service port {port:?} found for service {name:?}"
                ))
            })?
    };
    let port_name = sp.name.clone().unwrap_or_default();
    let mut ready = Vec::new();
    for subset in eps.iter().flat_map(|e| e.subsets.iter().flatten()) {
        let Some(ep) = subset
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.clone().unwrap_or_default() == port_name)
        else {
            continue;
        };
        for a in subset.addresses.iter().flatten() {
            let pod = a
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            ready.push((a.ip.clone(), ep.port as u16, pod));
        }
    }
    if ready.is_empty() {
        return Err(ApiError::unavailable(format!(
            "no endpoints available for service {name:?}"
        )));
    }
    let i = rand::random::<usize>() % ready.len();
    Ok(ready.swap_remove(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_as_kubernetes() {
        assert_eq!(split_name("web").unwrap(), ("", "web", ""));
        assert_eq!(split_name("web:80").unwrap(), ("", "web", "80"));
        assert_eq!(
            split_name("http:web:http").unwrap(),
            ("http", "web", "http")
        );
        assert_eq!(split_name("https:web:").unwrap(), ("https", "web", ""));
        assert!(split_name("ftp:web:21").is_err());
        assert!(split_name("a:b:c:d").is_err());
    }

    #[test]
    fn the_path_below_proxy() {
        let p = "/api/v1/namespaces/default/services/web:80/proxy/a/b?x";
        assert_eq!(path_below(p, "web:80"), "/a/b?x");
        assert_eq!(
            path_below("/api/v1/namespaces/default/pods/p/proxy", "p"),
            "/"
        );
        assert_eq!(
            path_below("/api/v1/namespaces/default/pods/p/proxy/", "p"),
            "/"
        );
    }

    #[test]
    fn picks_a_ready_endpoint_of_the_named_port() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 81}]}
        }))
        .unwrap();
        let eps: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "subsets": [{
                "addresses": [{"ip": "10.0.0.5", "targetRef": {"kind": "Pod", "name": "web-1"}}],
                "notReadyAddresses": [{"ip": "10.0.0.6"}],
                "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}]
            }]
        }))
        .unwrap();
        assert_eq!(
            endpoint(&svc, Some(&eps), "80").unwrap(),
            ("10.0.0.5".into(), 8080, Some("web-1".into()))
        );
        assert_eq!(endpoint(&svc, Some(&eps), "admin").unwrap().1, 9090);
        assert!(endpoint(&svc, Some(&eps), "").is_err());
        assert_eq!(endpoint(&svc, None, "80").unwrap_err().code, 503);
    }
}
