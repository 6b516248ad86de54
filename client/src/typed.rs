//! The typed API: `client.get::<Pod>(ns, name)`, `list`, `create`, `replace`, `patch`,
//! `patch_status`, `delete` and `watch` for any k8s-openapi type, its path derived from the
//! type's group, version and plural. The untyped calls (`*_dyn`, over a [`skiff_api::Resource`]
//! and `serde_json::Value`) stay for what only knows its kind at run time: `get RESOURCE`, apply
//! of arbitrary manifests.

use std::any::TypeId;

use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use skiff_api::k8s::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta};
use skiff_api::k8s::{Metadata, NamespaceResourceScope, Resource};

use crate::{encode_query, Client, ClientError};

/// A kind the typed calls work on: every k8s-openapi resource type.
pub trait Kind:
    Resource<Scope: 'static>
    + Metadata<Ty = ObjectMeta>
    + DeserializeOwned
    + Serialize
    + Clone
    + Send
    + 'static
{
}

impl<K> Kind for K where
    K: Resource<Scope: 'static>
        + Metadata<Ty = ObjectMeta>
        + DeserializeOwned
        + Serialize
        + Clone
        + Send
        + 'static
{
}

/// Whether `K` lives in a namespace.
pub fn namespaced<K: Kind>() -> bool {
    TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>()
}

/// The path of `K`'s collection (`name` None) or of one object. `ns` is ignored for a
/// cluster-scoped kind; None for a namespaced one means every namespace.
pub fn path_of<K: Kind>(ns: Option<&str>, name: Option<&str>) -> String {
    let mut p = if K::GROUP.is_empty() {
        format!("/api/{}", K::VERSION)
    } else {
        format!("/apis/{}/{}", K::GROUP, K::VERSION)
    };
    if let (true, Some(ns)) = (namespaced::<K>(), ns) {
        p.push_str(&format!("/namespaces/{ns}"));
    }
    p.push('/');
    p.push_str(K::URL_PATH_SEGMENT);
    if let Some(n) = name {
        p.push('/');
        p.push_str(n);
    }
    p
}

/// Which objects a list or watch returns.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
}

impl ListParams {
    pub fn labels(selector: &str) -> Self {
        ListParams {
            label_selector: Some(selector.to_string()),
            ..Default::default()
        }
    }

    pub fn fields(selector: &str) -> Self {
        ListParams {
            field_selector: Some(selector.to_string()),
            ..Default::default()
        }
    }

    /// `labelSelector=…&fieldSelector=…` (empty selectors left out), without the `?`.
    pub(crate) fn query(&self) -> Vec<String> {
        let mut q = Vec::new();
        if let Some(l) = self.label_selector.as_deref().filter(|s| !s.is_empty()) {
            q.push(format!("labelSelector={}", encode_query(l)));
        }
        if let Some(f) = self.field_selector.as_deref().filter(|s| !s.is_empty()) {
            q.push(format!("fieldSelector={}", encode_query(f)));
        }
        q
    }
}

/// A list answer: the objects and the resource version to watch from.
#[derive(Debug, Clone)]
pub struct ObjectList<K> {
    pub items: Vec<K>,
    pub resource_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(bound = "K: DeserializeOwned")]
struct RawList<K> {
    #[serde(default)]
    items: Option<Vec<K>>,
    #[serde(default)]
    metadata: ListMeta,
}

/// A patch body and its media type.
#[derive(Debug, Clone)]
pub enum Patch {
    /// `application/merge-patch+json` (RFC 7386).
    Merge(Value),
    /// `application/strategic-merge-patch+json`.
    Strategic(Value),
    /// `application/json-patch+json` (RFC 6902).
    Json(Value),
}

impl Patch {
    pub fn content_type(&self) -> &'static str {
        match self {
            Patch::Merge(_) => "application/merge-patch+json",
            Patch::Strategic(_) => "application/strategic-merge-patch+json",
            Patch::Json(_) => "application/json-patch+json",
        }
    }

    pub fn body(&self) -> &Value {
        match self {
            Patch::Merge(v) | Patch::Strategic(v) | Patch::Json(v) => v,
        }
    }
}

/// How a delete proceeds.
#[derive(Debug, Clone, Default)]
pub struct DeleteParams {
    /// `Foreground`, `Background` or `Orphan`.
    pub propagation: Option<String>,
    pub grace_period_seconds: Option<i64>,
    /// Delete only the object with this UID (`preconditions.uid`): 409 if the name now
    /// belongs to another.
    pub precondition_uid: Option<String>,
}

impl DeleteParams {
    /// At once: grace period 0.
    pub fn now() -> Self {
        DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        }
    }
}

/// A typed watch event.
#[derive(Debug, Clone)]
pub enum Event<K> {
    Added(K),
    Modified(K),
    Deleted(K),
    /// A bookmark: only the resource version moved.
    Bookmark(String),
}

fn decode<K: DeserializeOwned>(server: &str, v: Value) -> Result<K, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Transport {
        url: server.to_string(),
        reason: format!("unexpected answer: {e}"),
    })
}

impl Client {
    /// One object of kind `K`.
    pub async fn get<K: Kind>(&self, ns: Option<&str>, name: &str) -> Result<K, ClientError> {
        let v = self.get_path(&path_of::<K>(ns, Some(name))).await?;
        decode(&self.server(), v)
    }

    /// Objects of kind `K` in `ns` (every namespace when None).
    pub async fn list<K: Kind>(
        &self,
        ns: Option<&str>,
        params: &ListParams,
    ) -> Result<ObjectList<K>, ClientError> {
        let mut p = path_of::<K>(ns, None);
        let q = params.query();
        if !q.is_empty() {
            p = format!("{p}?{}", q.join("&"));
        }
        let raw: RawList<K> = decode(&self.server(), self.get_path(&p).await?)?;
        Ok(ObjectList {
            items: raw.items.unwrap_or_default(),
            resource_version: raw.metadata.resource_version,
        })
    }

    /// Creates `obj` in `ns`; the server's copy is returned.
    pub async fn create<K: Kind>(&self, ns: Option<&str>, obj: &K) -> Result<K, ClientError> {
        let v = self.create_dyn_path(&path_of::<K>(ns, None), obj).await?;
        decode(&self.server(), v)
    }

    /// Replaces the whole object. Only for objects this caller owns entirely: a typed struct
    /// drops the fields it does not know, so prefer [`Client::patch`] for anything else.
    pub async fn replace<K: Kind>(
        &self,
        ns: Option<&str>,
        name: &str,
        obj: &K,
    ) -> Result<K, ClientError> {
        let v = self
            .put_value(&path_of::<K>(ns, Some(name)), &to_value(obj)?)
            .await?;
        decode(&self.server(), v)
    }

    pub async fn patch<K: Kind>(
        &self,
        ns: Option<&str>,
        name: &str,
        patch: &Patch,
    ) -> Result<K, ClientError> {
        let v = self
            .patch_path(&path_of::<K>(ns, Some(name)), patch)
            .await?;
        decode(&self.server(), v)
    }

    /// Patches the `status` subresource.
    pub async fn patch_status<K: Kind>(
        &self,
        ns: Option<&str>,
        name: &str,
        patch: &Patch,
    ) -> Result<K, ClientError> {
        let p = format!("{}/status", path_of::<K>(ns, Some(name)));
        let v = self.patch_path(&p, patch).await?;
        decode(&self.server(), v)
    }

    /// Deletes one object; what the server answered (the object, while finalizers or a grace
    /// period hold it, or a `Status`) is not decoded.
    pub async fn delete<K: Kind>(
        &self,
        ns: Option<&str>,
        name: &str,
        params: &DeleteParams,
    ) -> Result<(), ClientError> {
        self.delete_path(&path_of::<K>(ns, Some(name)), params)
            .await
            .map(drop)
    }

    /// Watches `K` from `resource_version` (every current object first when None).
    pub async fn watch<K: Kind>(
        &self,
        ns: Option<&str>,
        params: &ListParams,
        resource_version: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Event<K>, ClientError>>, ClientError> {
        let mut q = params.query();
        if let Some(rv) = resource_version {
            q.insert(0, format!("resourceVersion={rv}"));
        }
        let stream = self.watch_path(&path_of::<K>(ns, None), &q).await?;
        let server = self.server();
        Ok(stream.filter_map(move |ev| {
            let server = server.clone();
            async move {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => return Some(Err(e)),
                };
                Some(Ok(match ev.kind.as_str() {
                    "ADDED" => Event::Added(decode(&server, ev.object).ok()?),
                    "MODIFIED" => Event::Modified(decode(&server, ev.object).ok()?),
                    "DELETED" => Event::Deleted(decode(&server, ev.object).ok()?),
                    // A bookmark carries only its resource version, not a whole object.
                    "BOOKMARK" => Event::Bookmark(
                        ev.object
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    _ => return None,
                }))
            }
        }))
    }
}

fn to_value<T: Serialize>(obj: &T) -> Result<Value, ClientError> {
    serde_json::to_value(obj).map_err(|e| ClientError::Config(format!("cannot encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_api::k8s::api::apps::v1::Deployment;
    use skiff_api::k8s::api::coordination::v1::Lease;
    use skiff_api::k8s::api::core::v1::{Node, Pod};

    #[test]
    fn paths_come_from_the_type() {
        assert_eq!(
            path_of::<Pod>(Some("default"), Some("web")),
            "/api/v1/namespaces/default/pods/web"
        );
        assert_eq!(path_of::<Pod>(None, None), "/api/v1/pods");
        assert_eq!(
            path_of::<Node>(Some("ignored"), Some("n1")),
            "/api/v1/nodes/n1"
        );
        assert_eq!(
            path_of::<Deployment>(Some("a"), None),
            "/apis/apps/v1/namespaces/a/deployments"
        );
        assert_eq!(
            path_of::<Lease>(Some("kube-node-lease"), Some("n1")),
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1"
        );
    }

    #[test]
    fn list_params_encode_selectors() {
        let p = ListParams {
            label_selector: Some("app=web".into()),
            field_selector: Some("spec.nodeName=n 1".into()),
        };
        assert_eq!(
            p.query(),
            vec![
                "labelSelector=app%3Dweb",
                "fieldSelector=spec.nodeName%3Dn%201"
            ]
        );
        assert!(ListParams::labels("").query().is_empty());
    }

    #[test]
    fn a_list_without_items_is_empty() {
        let raw: RawList<Pod> = serde_json::from_value(
            serde_json::json!({"metadata": {"resourceVersion": "7"}, "items": null}),
        )
        .unwrap();
        assert!(raw.items.unwrap_or_default().is_empty());
        assert_eq!(raw.metadata.resource_version.as_deref(), Some("7"));
    }
}
