//! Field selectors (`?fieldSelector=metadata.name=web,status.phase!=Running`).
//!
//! Any dotted path into the object may be selected on; a missing field reads as `""`,
//! so `spec.nodeName=` selects unscheduled pods as in Kubernetes.

use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {part:?} is not of the form field=value"
                )));
            };
            terms.push((path.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    /// Checks every field against those Kubernetes lets clients select `kind` on (all kinds:
    /// `metadata.name` and `metadata.namespace`), answering 400 `field label not supported`
    /// for any other, as the API server does. Event's `source` selects `source.component`.
    pub fn supported_for(mut self, kind: &str) -> Result<Self, ApiError> {
        for (path, _, _) in &mut self.terms {
            if kind == "Event" && path == "source" {
                *path = "source.component".into();
            }
            let p = path.as_str();
            let ok = matches!(p, "metadata.name" | "metadata.namespace")
                || kind_fields(kind).contains(&p)
                || (kind == "Event" && p == "source.component");
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {p}"
                )));
            }
        }
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The value of an equality term on `path`, if there is one (used to narrow lookups).
    pub fn equals(&self, path: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|(p, eq, _)| *eq && p == path)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|(path, eq, want)| {
            let got = lookup(obj, path);
            (got == *want) == *eq
        })
    }
}

/// The fields beyond `metadata.name`/`metadata.namespace` a kind may be selected on, as the
/// Kubernetes API server registers them.
fn kind_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        ],
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "type",
        ],
        "Secret" => &["type"],
        "Namespace" => &["status.phase"],
        "Node" => &["spec.unschedulable"],
        "ReplicaSet" | "ReplicationController" => &["status.replicas"],
        "Job" => &["status.successful"],
        _ => &[],
    }
}

fn lookup(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for seg in path.split('.') {
        match cur.get(seg) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selects_on_nested_fields() {
        let pod = json!({"metadata": {"name": "a", "namespace": "default"},
                         "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        assert!(FieldSelector::parse("metadata.name=a,spec.nodeName=n1")
            .unwrap()
            .matches(&pod));
        assert!(FieldSelector::parse("status.phase!=Pending")
            .unwrap()
            .matches(&pod));
        assert!(!FieldSelector::parse("metadata.namespace=kube-system")
            .unwrap()
            .matches(&pod));
        let unscheduled = json!({"metadata": {"name": "b"}, "spec": {}});
        assert!(FieldSelector::parse("spec.nodeName=")
            .unwrap()
            .matches(&unscheduled));
        assert!(FieldSelector::parse("nonsense").is_err());
        assert_eq!(
            FieldSelector::parse("metadata.name==a")
                .unwrap()
                .equals("metadata.name"),
            Some("a")
        );
    }

    #[test]
    fn only_the_fields_kubernetes_selects_on_are_supported() {
        let s = |q: &str, kind: &str| FieldSelector::parse(q).unwrap().supported_for(kind);
        assert!(s("metadata.name=a,spec.nodeName=n", "Pod").is_ok());
        assert!(s("involvedObject.name=p,type=Warning", "Event").is_ok());
        let e = s("spec.nodeName=n", "Deployment").unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(e.message, "field label not supported: spec.nodeName");
        let ev = json!({"source": {"component": "kubelet"}});
        assert!(s("source=kubelet", "Event").unwrap().matches(&ev));
    }
}
