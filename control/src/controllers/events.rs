//! Event recording. Repeats of one (object, reason, message) bump `count` on one Event,
//! as Kubernetes' event aggregation does.

use std::hash::{Hash, Hasher};

use serde_json::{json, Value};
use skiff_api::{meta, Resource};

use crate::registry::{now, Registry, Sub, WriteOptions};

pub fn record(reg: &Registry, obj: &Value, ty: &str, reason: &str, message: &str, component: &str) {
    let events = Resource::lookup("events").expect("events");
    let ns = meta::namespace(obj).unwrap_or("default").to_string();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (meta::uid(obj), reason, message).hash(&mut h);
    let name = format!("{}.{:016x}", meta::name(obj), h.finish());
    let ts = now();
    let result = match reg.try_get(events, Some(&ns), &name) {
        Ok(Some(mut ev)) => {
            let count = ev.get("count").and_then(Value::as_i64).unwrap_or(1);
            ev["count"] = json!(count + 1);
            ev["lastTimestamp"] = json!(ts);
            reg.update(events, Some(&ns), &name, ev, Sub::Main, &WriteOptions::default()).map(|_| ())
        }
        Ok(None) => reg
            .create(
                events,
                Some(&ns),
                json!({
                    "metadata": {"name": name, "namespace": ns},
                    "involvedObject": {
                        "kind": obj.get("kind"), "apiVersion": obj.get("apiVersion"),
                        "name": meta::name(obj), "namespace": meta::namespace(obj),
                        "uid": meta::uid(obj), "resourceVersion": obj.pointer("/metadata/resourceVersion"),
                    },
                    "reason": reason, "message": message, "type": ty,
                    "source": {"component": component},
                    "reportingComponent": component,
                    "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
                }),
                &WriteOptions::default(),
            )
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, reason, "event not recorded");
    }
}
