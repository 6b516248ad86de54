//! The Priority and RuntimeClass admission of a pod being created, as Kubernetes' plugins:
//! `priorityClassName` resolved to `priority` and `preemptionPolicy` (the global default
//! class, else 0, when it names none), and `runtimeClassName` checked to name a RuntimeClass
//! whose overhead and scheduling (node selector, tolerations) the pod then carries.

use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use serde_json::{json, Value};
use skiff_api::fields::FieldSelector;
use skiff_api::selector::Selector;
use skiff_api::{meta, ApiError, Resource};

use crate::registry::Registry;

/// What Kubernetes' admission plugins answer: 403 `pods "NAME" is forbidden: WHY`.
fn forbidden(pod: &Value, why: String) -> ApiError {
    let mut e = ApiError::unauthorized();
    e.code = 403;
    e.reason = "Forbidden";
    e.message = format!("pods \"{}\" is forbidden: {why}", meta::name(pod));
    e
}

fn class<K: serde::de::DeserializeOwned + k8s_openapi::Resource>(
    registry: &Registry,
    name: &str,
) -> Result<Option<K>, ApiError> {
    let r = Resource::lookup(K::URL_PATH_SEGMENT).expect("a served resource");
    registry
        .try_get(r, None, name)?
        .map(|v| skiff_api::validation::typed(&v))
        .transpose()
}

/// The Priority and RuntimeClass admission of a new pod, in place.
pub fn admit_pod(registry: &Registry, pod: &mut Value) -> Result<(), ApiError> {
    priority(registry, pod)?;
    runtime_class(registry, pod)
}

/// The class with `globalDefault` (the lowest valued of several), as `getDefaultPriority`.
fn default_class(registry: &Registry) -> Result<Option<PriorityClass>, ApiError> {
    let r = Resource::lookup("priorityclasses").expect("priorityclasses");
    let (items, _) = registry.list(r, None, &Selector::default(), &FieldSelector::default())?;
    Ok(items
        .iter()
        .filter_map(|v| skiff_api::validation::typed::<PriorityClass>(v).ok())
        .filter(|c| c.global_default == Some(true))
        .min_by_key(|c| c.value.unwrap_or(0)))
}

fn priority(registry: &Registry, pod: &mut Value) -> Result<(), ApiError> {
    let asked = pod
        .pointer("/spec/priorityClassName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(String::from);
    let (name, value, policy) = match asked {
        Some(name) => match class::<PriorityClass>(registry, &name)? {
            Some(c) => (Some(name), c.value.unwrap_or(0), c.preemption_policy),
            None => {
                return Err(forbidden(
                    pod,
                    format!("no PriorityClass with name {name} was found"),
                ))
            }
        },
        None => match default_class(registry)? {
            Some(c) => (c.metadata.name, c.value.unwrap_or(0), c.preemption_policy),
            None => (None, 0, None),
        },
    };
    let policy = policy.unwrap_or_else(|| "PreemptLowerPriority".to_string());
    let Some(spec) = pod.get("spec").filter(|s| s.is_object()) else {
        return Ok(());
    };
    if let Some(p) = spec.get("priority").and_then(Value::as_i64) {
        if p != i64::from(value) {
            return Err(forbidden(pod, format!("the integer value of priority ({p}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name")));
        }
    }
    if let Some(p) = spec.get("preemptionPolicy").and_then(Value::as_str) {
        if p != policy {
            return Err(forbidden(pod, format!("the string value of PreemptionPolicy ({p}) must not be provided in pod spec; priority admission controller computed {policy} from the given PriorityClass name")));
        }
    }
    let spec = &mut pod["spec"];
    if let Some(name) = name {
        spec["priorityClassName"] = json!(name);
    }
    spec["priority"] = json!(value);
    spec["preemptionPolicy"] = json!(policy);
    Ok(())
}

fn runtime_class(registry: &Registry, pod: &mut Value) -> Result<(), ApiError> {
    let Some(name) = pod
        .pointer("/spec/runtimeClassName")
        .and_then(Value::as_str)
        .map(String::from)
    else {
        return Ok(());
    };
    let Some(rc) = class::<RuntimeClass>(registry, &name)? else {
        return Err(forbidden(
            pod,
            format!("pod rejected: RuntimeClass {name:?} not found"),
        ));
    };
    // The class's overhead: the pod may only repeat it.
    if let Some(fixed) = rc.overhead.and_then(|o| o.pod_fixed) {
        let want = serde_json::to_value(&fixed).unwrap_or_default();
        match pod.pointer("/spec/overhead") {
            Some(have) if *have != want => {
                return Err(forbidden(
                    pod,
                    "pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead"
                        .into(),
                ))
            }
            _ => pod["spec"]["overhead"] = want,
        }
    }
    let Some(scheduling) = rc.scheduling else {
        return Ok(());
    };
    // Its node selector joins the pod's (a different value for one key is refused) and its
    // tolerations are added to the pod's.
    for (k, v) in scheduling.node_selector.unwrap_or_default() {
        match pod
            .pointer(&format!(
                "/spec/nodeSelector/{}",
                k.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_str)
        {
            Some(have) if have != v => {
                return Err(forbidden(pod, format!("pod rejected: conflict: runtimeClass.scheduling.nodeSelector[{k}] = {v}; pod.spec.nodeSelector[{k}] = {have}")));
            }
            Some(_) => {}
            None => {
                let spec = &mut pod["spec"];
                if !spec.get("nodeSelector").is_some_and(Value::is_object) {
                    spec["nodeSelector"] = json!({});
                }
                spec["nodeSelector"][k] = json!(v);
            }
        }
    }
    for t in scheduling.tolerations.unwrap_or_default() {
        let t = serde_json::to_value(&t).unwrap_or_default();
        let spec = &mut pod["spec"];
        if !spec.get("tolerations").is_some_and(Value::is_array) {
            spec["tolerations"] = json!([]);
        }
        if let Some(list) = spec["tolerations"].as_array_mut() {
            if !list.contains(&t) {
                list.push(t);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::registry::{ClusterConfig, WriteOptions};
    use crate::store::sqlite::SqliteStore;

    fn registry(dir: &std::path::Path) -> Arc<Registry> {
        let store = Arc::new(SqliteStore::open(&dir.join("store")).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        reg
    }

    fn create(reg: &Registry, plural: &str, obj: Value) -> Result<Value, ApiError> {
        let r = Resource::lookup(plural).unwrap();
        let ns = r.namespaced.then_some("default");
        reg.create(r, ns, obj, &WriteOptions::default())
    }

    fn pod(name: &str, extra: Value) -> Value {
        let mut spec = json!({"containers": [{"name": "c", "image": "example.com/a:v1"}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"metadata": {"name": name}, "spec": spec})
    }

    #[test]
    fn priority_classes_resolve_at_admission() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let p = create(&reg, "pods", pod("a", json!({}))).unwrap();
        assert_eq!(p["spec"]["priority"], 0);
        assert_eq!(p["spec"]["preemptionPolicy"], "PreemptLowerPriority");
        let p = create(
            &reg,
            "pods",
            pod("b", json!({"priorityClassName": "system-node-critical"})),
        )
        .unwrap();
        assert_eq!(p["spec"]["priority"], 2_000_001_000);
        let e = create(&reg, "pods", pod("c", json!({"priorityClassName": "nope"}))).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                403,
                "pods \"c\" is forbidden: no PriorityClass with name nope was found"
            )
        );
        // A priority other than the class's is refused; the global default class applies to
        // pods that name none.
        let e = create(
            &reg,
            "pods",
            pod(
                "d",
                json!({"priorityClassName": "system-node-critical", "priority": 5}),
            ),
        )
        .unwrap_err();
        assert_eq!(e.code, 403, "{}", e.message);
        create(
            &reg,
            "priorityclasses",
            json!({"metadata": {"name": "batch"}, "value": 100, "globalDefault": true,
                   "preemptionPolicy": "Never"}),
        )
        .unwrap();
        let p = create(&reg, "pods", pod("e", json!({}))).unwrap();
        assert_eq!(
            (
                &p["spec"]["priorityClassName"],
                &p["spec"]["priority"],
                &p["spec"]["preemptionPolicy"]
            ),
            (&json!("batch"), &json!(100), &json!("Never"))
        );
    }

    #[test]
    fn runtime_classes_must_exist_and_bring_their_scheduling() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        create(&reg, "pods", pod("a", json!({"runtimeClassName": "runc"}))).unwrap();
        let e = create(
            &reg,
            "pods",
            pod("b", json!({"runtimeClassName": "gvisor"})),
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                403,
                "pods \"b\" is forbidden: pod rejected: RuntimeClass \"gvisor\" not found"
            )
        );
        create(
            &reg,
            "runtimeclasses",
            json!({"metadata": {"name": "edge"}, "handler": "wasmtime",
                   "overhead": {"podFixed": {"memory": "10Mi"}},
                   "scheduling": {"nodeSelector": {"zone": "edge"},
                                  "tolerations": [{"key": "edge", "operator": "Exists"}]}}),
        )
        .unwrap();
        let p = create(&reg, "pods", pod("c", json!({"runtimeClassName": "edge"}))).unwrap();
        assert_eq!(p["spec"]["nodeSelector"], json!({"zone": "edge"}));
        assert_eq!(p["spec"]["overhead"], json!({"memory": "10Mi"}));
        assert!(p["spec"]["tolerations"]
            .as_array()
            .unwrap()
            .contains(&json!({"key": "edge", "operator": "Exists"})));
        let e = create(
            &reg,
            "pods",
            pod(
                "d",
                json!({"runtimeClassName": "edge", "nodeSelector": {"zone": "core"}}),
            ),
        )
        .unwrap_err();
        assert!(e.message.contains("conflict: runtimeClass.scheduling.nodeSelector[zone] = edge; pod.spec.nodeSelector[zone] = core"), "{}", e.message);
    }
}
