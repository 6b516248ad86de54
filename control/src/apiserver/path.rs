//! Parsing of Kubernetes API paths.

use skiff_api::crd::CustomResources;
use skiff_api::{ApiError, Resource};

/// What a request path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPath {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

/// Parses `/api/v1/...` or `/apis/{group}/{version}/...` below the group-version prefix;
/// resources are the built-in ones, then `custom`'s.
/// Returns None for paths that are not resource paths (discovery is handled elsewhere).
pub fn parse(path: &str, custom: &CustomResources) -> Result<Option<ApiPath>, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let resolve = |plural: &str| {
        Resource::by_path(group, version, plural).or_else(|| custom.by_path(group, version, plural))
    };
    let find = |plural: &str| resolve(plural).ok_or_else(|| ApiError::not_found_path(path));
    // What follows the resource: nothing (a collection), a name, or a name and a subresource.
    let at = |resource, namespace: Option<&str>, tail: &[&str]| {
        // Only the proxy subresource has a path of its own below it.
        if tail.len() > 2 && tail[1] != "proxy" {
            return Err(ApiError::not_found_path(path));
        }
        Ok(ApiPath {
            resource,
            namespace: namespace.map(String::from),
            name: tail.first().map(|s| s.to_string()),
            sub: tail.get(1).map(|s| s.to_string()),
        })
    };
    let p = match rest {
        ["namespaces", ns, plural, tail @ ..] if resolve(plural).is_some_and(|r| r.namespaced) => {
            at(find(plural)?, Some(ns), tail)?
        }
        [plural, tail @ ..] => {
            let resource = find(plural)?;
            // A namespaced resource is addressed by name only inside its namespace.
            if resource.namespaced && !tail.is_empty() {
                return Err(ApiError::not_found_path(path));
            }
            at(resource, None, tail)?
        }
        [] => return Ok(None),
    };
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_builtin(p: &str) -> Result<Option<ApiPath>, ApiError> {
        parse(p, &CustomResources::default())
    }

    #[test]
    fn parses_resource_paths() {
        let p = parse_builtin("/api/v1/namespaces/default/pods/web-1/log")
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                p.resource.plural,
                p.namespace.as_deref(),
                p.name.as_deref(),
                p.sub.as_deref()
            ),
            ("pods", Some("default"), Some("web-1"), Some("log"))
        );
        let p = parse_builtin("/apis/apps/v1/namespaces/x/deployments")
            .unwrap()
            .unwrap();
        assert_eq!(p.resource.kind, "Deployment");
        let p = parse_builtin("/api/v1/namespaces/kube-system")
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.resource.plural, p.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let p = parse_builtin("/api/v1/namespaces/x/status")
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.resource.plural, p.sub.as_deref()),
            ("namespaces", Some("status"))
        );
        let p = parse_builtin("/apis/apps/v1/deployments").unwrap().unwrap();
        assert!(p.namespace.is_none());
        assert_eq!(parse_builtin("/api/v1/widgets").unwrap_err().code, 404);
        assert_eq!(parse_builtin("/apis/apps/v1/pods").unwrap_err().code, 404);
        assert!(parse_builtin("/api/v1").unwrap().is_none());
        let p = parse_builtin("/api/v1/namespaces/default/services/web:80/proxy/a/b")
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.resource.plural, p.name.as_deref(), p.sub.as_deref()),
            ("services", Some("web:80"), Some("proxy"))
        );
        assert_eq!(
            parse_builtin("/api/v1/namespaces/default/pods/p/log/x")
                .unwrap_err()
                .code,
            404
        );
    }
}
