//! `events.k8s.io/v1` Events: the core `v1` Events seen in another shape, as Kubernetes
//! stores both under `/registry/events/`. The registry keeps the core form; reads through
//! events.k8s.io are converted with [`from_core`], and writes with [`to_core`], as
//! Kubernetes' conversion in `pkg/apis/events/v1` does (`note` ↔ `message`, `regarding` ↔
//! `involvedObject`, `deprecatedSource` ↔ `source`, `deprecatedCount` ↔ `count`,
//! `deprecated{First,Last}Timestamp` ↔ `{first,last}Timestamp`; the rest by name).

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::events::v1 as events;
use serde_json::Value;

use crate::error::{ApiError, Cause};
use crate::resources::Resource;
use crate::validation::typed;

/// The API group of the second shape of Events.
pub const GROUP: &str = "events.k8s.io";

/// Whether `r` is events.k8s.io's view of the core Events.
pub fn is_events_v1(r: &Resource) -> bool {
    r.group == GROUP && r.plural == "events"
}

/// The core resource whose objects events.k8s.io shows.
pub fn core_events() -> &'static Resource {
    Resource::by_path("", "v1", "events").expect("core events are served")
}

fn encode<T: serde::Serialize>(t: &T, api_version: &str) -> Result<Value, ApiError> {
    let mut v = serde_json::to_value(t).map_err(|e| ApiError::internal(e.to_string()))?;
    v["apiVersion"] = Value::from(api_version);
    v["kind"] = Value::from("Event");
    Ok(v)
}

/// A stored core Event in events.k8s.io's shape.
pub fn from_core(obj: &Value) -> Result<Value, ApiError> {
    let e: core::Event = typed(obj)?;
    let out = events::Event {
        metadata: e.metadata,
        action: e.action,
        deprecated_count: e.count,
        deprecated_first_timestamp: e.first_timestamp,
        deprecated_last_timestamp: e.last_timestamp,
        deprecated_source: e.source,
        event_time: e.event_time,
        note: e.message,
        reason: e.reason,
        regarding: Some(e.involved_object),
        related: e.related,
        reporting_controller: e.reporting_component,
        reporting_instance: e.reporting_instance,
        series: e.series.map(|s| events::EventSeries {
            count: s.count.unwrap_or_default(),
            last_observed_time: s.last_observed_time.unwrap_or_else(|| {
                k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Default::default())
            }),
        }),
        type_: e.type_,
    };
    encode(&out, "events.k8s.io/v1")
}

/// An events.k8s.io Event in the core shape it is stored in.
pub fn to_core(obj: &Value) -> Result<Value, ApiError> {
    let e: events::Event = typed(obj)?;
    let out = core::Event {
        metadata: e.metadata,
        action: e.action,
        count: e.deprecated_count,
        first_timestamp: e.deprecated_first_timestamp,
        last_timestamp: e.deprecated_last_timestamp,
        source: e.deprecated_source,
        event_time: e.event_time,
        message: e.note,
        reason: e.reason,
        involved_object: e.regarding.unwrap_or_default(),
        related: e.related,
        reporting_component: e.reporting_controller,
        reporting_instance: e.reporting_instance,
        series: e.series.map(|s| core::EventSeries {
            count: Some(s.count),
            last_observed_time: Some(s.last_observed_time),
        }),
        type_: e.type_,
    };
    encode(&out, "v1")
}

/// What Kubernetes requires of an Event created through events.k8s.io/v1
/// (`ValidateEventCreate` for that version): an event time, a reporting controller and
/// instance, an action and a reason, a type of Normal or Warning, and a note of at most 1 kB.
pub fn validate_create(obj: &Value) -> Result<(), ApiError> {
    let e: events::Event = typed(obj)?;
    let mut causes = Vec::new();
    if e.event_time.is_none() {
        causes.push(Cause::required("eventTime"));
    }
    let ty = e.type_.as_deref().unwrap_or("");
    if ty != "Normal" && ty != "Warning" {
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            field: "type".into(),
            message: format!(
                "Unsupported value: {ty:?}: supported values: \"Normal\", \"Warning\""
            ),
        });
    }
    for (field, value, max) in [
        ("reportingController", &e.reporting_controller, 253),
        ("reportingInstance", &e.reporting_instance, 128),
        ("action", &e.action, 128),
        ("reason", &e.reason, 128),
    ] {
        match value.as_deref() {
            None | Some("") => causes.push(Cause::required(field)),
            Some(v) if v.len() > max => causes.push(Cause::too_long(field, max)),
            _ => {}
        }
    }
    if e.note.as_deref().is_some_and(|n| n.len() > 1024) {
        causes.push(Cause::too_long("note", 1024));
    }
    if causes.is_empty() {
        return Ok(());
    }
    let name = e.metadata.name.clone().unwrap_or_default();
    Err(ApiError::invalid("Event", &name, causes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn new_style() -> Value {
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
               "metadata": {"name": "web.1", "namespace": "default"},
               "eventTime": "2026-12-03T10:00:00.000000Z",
               "reportingController": "example.com/operator", "reportingInstance": "op-1",
               "action": "Scaling", "reason": "ScaledUp", "type": "Normal",
               "note": "scaled to 3",
               "regarding": {"kind": "Deployment", "namespace": "default", "name": "web"},
               "deprecatedCount": 2,
               "deprecatedSource": {"component": "operator"}})
    }

    #[test]
    fn both_shapes_convert_into_each_other() {
        let core = to_core(&new_style()).unwrap();
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["message"], "scaled to 3");
        assert_eq!(core["involvedObject"]["name"], "web");
        assert_eq!(core["reportingComponent"], "example.com/operator");
        assert_eq!(core["count"], 2);
        assert_eq!(core["source"]["component"], "operator");
        assert!(core.get("note").is_none() && core.get("regarding").is_none());
        let back = from_core(&core).unwrap();
        assert_eq!(back, new_style());
        validate_create(&new_style()).unwrap();
    }

    #[test]
    fn an_event_without_its_required_fields_is_invalid() {
        let mut e = new_style();
        for f in ["eventTime", "action", "reportingController"] {
            e.as_object_mut().unwrap().remove(f);
        }
        e["type"] = json!("Bad");
        let err = validate_create(&e).unwrap_err();
        assert_eq!(err.code, 422);
        let mut fields: Vec<_> = err.causes.iter().map(|c| c.field.clone()).collect();
        fields.sort();
        assert_eq!(
            fields,
            vec!["action", "eventTime", "reportingController", "type"]
        );
    }
}
