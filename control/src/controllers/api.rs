//! Typed writes for controllers: the in-process [`Registry`] speaks JSON for every kind; these
//! helpers convert a k8s-openapi object to JSON and the registry's answer back, at this one
//! edge, so controllers build and read typed objects only.
//!
//! Status is written whole through the status subresource ([`update_status`]): the controller
//! owns it, and a PUT (unlike a merge patch of a typed struct, which cannot say "remove this
//! field") leaves no stale field behind. Changes to objects the controller does not own
//! entirely (a pod's owner references, a node's taints) are merge patches of only the fields
//! it sets ([`patch`]), so fields a typed struct does not know survive.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::{json, Value};
use skiff_api::patch::PatchKind;
use skiff_api::{ApiError, Resource};

use super::runtime::Object;
use crate::registry::{DeleteOptions, Registry, Sub, WriteOptions};

/// The registry's resource of `K`.
pub fn resource<K: Object>() -> &'static Resource {
    Resource::lookup(K::URL_PATH_SEGMENT).expect("a served resource")
}

/// `obj` as the JSON the registry takes.
pub fn encode<T: Serialize>(obj: &T) -> Result<Value, ApiError> {
    serde_json::to_value(obj).map_err(|e| ApiError::internal(format!("encode: {e}")))
}

/// The registry's answer as `K`.
pub fn decode<K: Object>(v: Value) -> Result<K, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::internal(format!("decode {}: {e}", K::KIND)))
}

/// The store revision an object was written at (its resourceVersion), 0 if it has none.
pub fn revision(m: &ObjectMeta) -> u64 {
    m.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// Now, as the time fields of objects hold it (whole seconds).
pub fn now() -> Time {
    Time(Timestamp::from_second(chrono::Utc::now().timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Reads an object from the registry (not a cache); None if it does not exist.
pub fn get<K: Object>(reg: &Registry, ns: Option<&str>, name: &str) -> Result<Option<K>, ApiError> {
    reg.try_get(resource::<K>(), ns, name)?
        .map(decode)
        .transpose()
}

/// Creates `obj` in `ns`.
pub fn create<K: Object>(reg: &Registry, ns: Option<&str>, obj: &K) -> Result<K, ApiError> {
    decode(reg.create(resource::<K>(), ns, encode(obj)?, &WriteOptions::default())?)
}

/// Replaces `obj` (its spec and metadata; the status is kept). Only for objects the caller
/// built or owns whole: fields its type does not know are not written back.
pub fn update<K: Object>(reg: &Registry, obj: &K) -> Result<K, ApiError> {
    let m = obj.metadata();
    let name = m.name.as_deref().unwrap_or("");
    decode(reg.update(
        resource::<K>(),
        m.namespace.as_deref(),
        name,
        encode(obj)?,
        Sub::Main,
        &WriteOptions::default(),
    )?)
}

/// Replaces the status of `obj` with `status`, if `obj` is still at the resourceVersion it
/// was read with (409 otherwise).
pub fn update_status<K: Object, S: Serialize>(
    reg: &Registry,
    obj: &K,
    status: &S,
) -> Result<K, ApiError> {
    let m = obj.metadata();
    let name = m.name.as_deref().unwrap_or("");
    let body = json!({
        "apiVersion": K::API_VERSION,
        "kind": K::KIND,
        "metadata": {"name": name, "namespace": m.namespace, "resourceVersion": m.resource_version},
        "status": encode(status)?,
    });
    decode(reg.update(
        resource::<K>(),
        m.namespace.as_deref(),
        name,
        body,
        Sub::Status,
        &WriteOptions::default(),
    )?)
}

/// Applies a JSON merge patch to the object `ns/name` (or its status).
pub fn patch<K: Object>(
    reg: &Registry,
    ns: Option<&str>,
    name: &str,
    body: &Value,
    sub: Sub,
) -> Result<K, ApiError> {
    decode(reg.patch(
        resource::<K>(),
        ns,
        name,
        PatchKind::Merge,
        body,
        sub,
        &WriteOptions::default(),
    )?)
}

/// Deletes `ns/name`. Returns the revision of the write (the deletion, or the
/// `deletionTimestamp` set on an object with finalizers or grace).
pub fn delete<K: Object>(
    reg: &Registry,
    ns: Option<&str>,
    name: &str,
    opts: &DeleteOptions,
) -> Result<u64, ApiError> {
    let out = reg.delete(resource::<K>(), ns, name, opts)?;
    Ok(skiff_api::meta::resource_version(&out).unwrap_or(0))
}
