//! Event recording. Repeats of one (object, reason, message) bump `count` on one Event,
//! as Kubernetes' event aggregation does.

use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

use super::api;
use super::runtime::Object;
use crate::registry::{Registry, Sub};

/// Records an event about `obj`.
pub fn record<K: Object>(
    reg: &Registry,
    obj: &K,
    ty: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let m = obj.metadata();
    let about = ObjectReference {
        kind: Some(K::KIND.to_string()),
        api_version: Some(K::API_VERSION.to_string()),
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        ..Default::default()
    };
    record_about(reg, about, ty, reason, message, component)
}

fn record_about(
    reg: &Registry,
    about: ObjectReference,
    ty: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let ns = about
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (about.uid.as_deref().unwrap_or(""), reason, message).hash(&mut h);
    let name = format!(
        "{}.{:016x}",
        about.name.as_deref().unwrap_or(""),
        h.finish()
    );
    let ts = api::now();
    let result = match api::get::<Event>(reg, Some(&ns), &name) {
        Ok(Some(ev)) => api::patch::<Event>(
            reg,
            Some(&ns),
            &name,
            &json!({
                "count": ev.count.unwrap_or(1) + 1,
                "lastTimestamp": ts,
                "metadata": {"resourceVersion": ev.metadata.resource_version},
            }),
            Sub::Main,
        )
        .map(|_| ()),
        Ok(None) => api::create(
            reg,
            Some(&ns),
            &Event {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                involved_object: about,
                reason: Some(reason.to_string()),
                message: Some(message.to_string()),
                type_: Some(ty.to_string()),
                source: Some(EventSource {
                    component: Some(component.to_string()),
                    ..Default::default()
                }),
                reporting_component: Some(component.to_string()),
                first_timestamp: Some(ts.clone()),
                last_timestamp: Some(ts),
                count: Some(1),
                ..Default::default()
            },
        )
        .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, reason, "event not recorded");
    }
}
