//! Validation: decoding into the Kubernetes wire types (with unknown fields reported),
//! semantic checks per kind, and the rules for what an update may change.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    admissionregistration::v1 as admission, apps::v1 as apps, autoscaling::v2 as autoscaling,
    batch::v1 as batch, certificates::v1 as certificates, coordination::v1 as coordination,
    core::v1 as core, discovery::v1 as discovery, networking::v1 as networking, node::v1 as node,
    policy::v1 as policy, rbac::v1 as rbac, scheduling::v1 as scheduling,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition as Crd;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{ApiError, Cause};
use crate::resources::Resource;
use crate::selector::Selector;

pub use crate::limits::MAX_BODY_BYTES;
use crate::limits::MAX_DATA_BYTES;

/// Decodes `obj` into its wire type. A wrong type is a 400 naming the field;
/// with `strict`, so is a field the type does not have.
pub fn decode(resource: &Resource, obj: &Value, strict: bool) -> Result<(), ApiError> {
    before_decode(resource, obj)?;
    match resource.wire {
        Some(w) => (w.decode)(obj, strict),
        None => Err(ApiError::bad_request(format!(
            "no wire type for kind {}",
            resource.kind
        ))),
    }
}

/// Fields Kubernetes' Go types leave optional, and then refuses as 422, but k8s-openapi's
/// types require: checked before decoding, so the answer is Kubernetes' and not a 400.
fn before_decode(resource: &Resource, obj: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    if resource.kind == "Ingress" {
        for (i, rule) in array(obj.pointer("/spec/rules")).iter().enumerate() {
            for (j, path) in array(rule.pointer("/http/paths")).iter().enumerate() {
                if path.get("pathType").is_none_or(Value::is_null) {
                    causes.push(Cause {
                        message: "Required value: pathType must be specified".into(),
                        ..Cause::required(format!("spec.rules[{i}].http.paths[{j}].pathType"))
                    });
                }
            }
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            resource.kind,
            crate::meta::name(obj),
            causes,
        ))
    }
}

fn array(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// Decodes into `T`. Errors as the Kubernetes API server words them.
pub fn typed<T: DeserializeOwned>(obj: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(obj).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_request(format!("error decoding field {path:?}: {}", e.inner()))
    })
}

pub(crate) fn check<T: DeserializeOwned + Serialize>(
    obj: &Value,
    strict: bool,
) -> Result<(), ApiError> {
    let t: T = typed(obj)?;
    if strict {
        let back = serde_json::to_value(&t).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut unknown = Vec::new();
        unknown_fields(obj, &back, String::new(), &mut unknown);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field {f:?}"))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
    }
    Ok(())
}

/// Fields present (and not null) in `sent` but absent after a round trip through the type.
fn unknown_fields(sent: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (sent, back) {
        (Value::Object(s), Value::Object(b)) => {
            for (k, v) in s {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    None if !v.is_null() && !is_empty_container(v) => out.push(p),
                    None => {}
                    Some(bv) => unknown_fields(v, bv, p, out),
                }
            }
        }
        (Value::Array(s), Value::Array(b)) => {
            for (i, (sv, bv)) in s.iter().zip(b).enumerate() {
                unknown_fields(sv, bv, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_empty_container(v: &Value) -> bool {
    matches!(v, Value::Object(m) if m.is_empty()) || matches!(v, Value::Array(a) if a.is_empty())
}

// ---- names ------------------------------------------------------------------------------

/// A DNS-1123 label: at most 63 lower-case alphanumerics or '-', starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
}

fn is_qualified_name(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";

/// Kinds whose names must be DNS-1123 labels rather than subdomains.
fn needs_label_name(kind: &str) -> bool {
    matches!(kind, "Namespace" | "Service")
}

fn validate_meta(kind: &str, meta: &ObjectMeta, namespaced: bool, causes: &mut Vec<Cause>) {
    let name = meta.name.as_deref().unwrap_or("");
    if name.is_empty() {
        if meta.generate_name.as_deref().unwrap_or("").is_empty() {
            causes.push(Cause::required("metadata.name"));
        }
    } else if needs_label_name(kind) {
        if !is_dns1123_label(name) {
            causes.push(Cause::invalid(
                "metadata.name",
                format!("{name:?}"),
                LABEL_MSG,
            ));
        }
    } else if matches!(
        kind,
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding"
    ) {
        // RBAC names are path segments (`system:basic-user`), as ValidateRBACName.
        if name == "." || name == ".." || name.contains(['/', '%']) {
            causes.push(Cause::invalid(
                "metadata.name",
                format!("{name:?}"),
                "may not be '.' or '..' and may not contain '/' or '%'",
            ));
        }
    } else if !is_dns1123_subdomain(name) && kind != "Event" {
        causes.push(Cause::invalid(
            "metadata.name",
            format!("{name:?}"),
            SUBDOMAIN_MSG,
        ));
    }
    if namespaced {
        if let Some(ns) = meta.namespace.as_deref() {
            if !is_dns1123_label(ns) {
                causes.push(Cause::invalid(
                    "metadata.namespace",
                    format!("{ns:?}"),
                    LABEL_MSG,
                ));
            }
        }
    }
    for (k, v) in meta.labels.iter().flatten() {
        if !is_qualified_name(k) {
            causes.push(Cause::invalid("metadata.labels", format!("{k:?}"), "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
        if !is_label_value(v) {
            causes.push(Cause::invalid("metadata.labels", format!("{v:?}"), "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
    }
}

/// The checks of `metadata` every object gets (names, labels, annotations), for kinds with
/// no checks of their own (custom resources).
pub fn validate_metadata(obj: &Value, namespaced: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    match typed::<ObjectMeta>(obj.get("metadata").unwrap_or(&Value::Null)) {
        Ok(meta) => validate_meta("", &meta, namespaced, &mut causes),
        Err(e) => causes.push(Cause::invalid("metadata", "", &e.message)),
    }
    causes
}

// ---- semantic validation -----------------------------------------------------------------

/// Semantic checks of a (defaulted) object. A failure is a 422 listing every bad field.
pub fn validate(resource: &Resource, obj: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let meta: ObjectMeta = typed(obj.get("metadata").unwrap_or(&Value::Null)).unwrap_or_default();
    if resource.kind != "Pod"
        && resource.kind != "Service"
        && obj.get("spec").is_none()
        && has_required_spec(resource.kind)
    {
        causes.push(Cause::required("spec"));
    }
    validate_meta(resource.kind, &meta, resource.namespaced, &mut causes);
    match resource.kind {
        "CustomResourceDefinition" => {
            let c: Crd = typed(obj)?;
            causes.extend(crate::crd::validate_definition(
                &c,
                &crate::resources::groups(),
            ));
        }
        "Pod" => {
            let pod: core::Pod = typed(obj)?;
            match &pod.spec {
                Some(spec) => pod_spec(spec, "spec", &mut causes),
                None => causes.push(Cause::required("spec")),
            }
        }
        "Deployment" => {
            let d: apps::Deployment = typed(obj)?;
            let spec = &d.spec;
            workload(
                spec.replicas,
                Some(&spec.selector),
                &spec.template,
                true,
                &mut causes,
            );
            if let Some(s) = &spec.strategy {
                match s.type_.as_deref() {
                    None | Some("RollingUpdate") | Some("Recreate") => {}
                    Some(t) => causes.push(Cause::invalid(
                        "spec.strategy.type",
                        format!("{t:?}"),
                        "supported values: \"Recreate\", \"RollingUpdate\"",
                    )),
                }
                if let Some(ru) = &s.rolling_update {
                    let surge = ru.max_surge.as_ref().map(|v| int_or_percent(v, 100));
                    let unavail = ru.max_unavailable.as_ref().map(|v| int_or_percent(v, 100));
                    if surge == Some(0) && unavail == Some(0) {
                        causes.push(Cause::invalid(
                            "spec.strategy.rollingUpdate.maxUnavailable",
                            "0",
                            "may not be 0 when `maxSurge` is 0",
                        ));
                    }
                }
            }
        }
        "ReplicaSet" => {
            let rs: apps::ReplicaSet = typed(obj)?;
            let tmpl = rs.spec.template.clone().unwrap_or_default();
            workload(
                rs.spec.replicas,
                Some(&rs.spec.selector),
                &tmpl,
                true,
                &mut causes,
            )
        }
        "StatefulSet" => {
            let s: apps::StatefulSet = typed(obj)?;
            // Containers may mount the claim templates: each becomes a volume of the pod.
            let mut template = s.spec.template.clone();
            if let Some(spec) = template.spec.as_mut() {
                let vols = spec.volumes.get_or_insert_with(Vec::new);
                for t in s.spec.volume_claim_templates.iter().flatten() {
                    let name = t.metadata.name.clone().unwrap_or_default();
                    if !vols.iter().any(|v| v.name == name) {
                        vols.push(core::Volume {
                            name: name.clone(),
                            persistent_volume_claim: Some(
                                core::PersistentVolumeClaimVolumeSource {
                                    claim_name: name,
                                    read_only: None,
                                },
                            ),
                            ..Default::default()
                        });
                    }
                }
            }
            workload(
                s.spec.replicas,
                Some(&s.spec.selector),
                &template,
                true,
                &mut causes,
            )
        }
        "DaemonSet" => {
            let s: apps::DaemonSet = typed(obj)?;
            workload(
                None,
                Some(&s.spec.selector),
                &s.spec.template,
                true,
                &mut causes,
            );
            if let Some(u) = &s.spec.update_strategy {
                match u.type_.as_deref() {
                    None | Some("RollingUpdate") => {}
                    Some("OnDelete") if u.rolling_update.is_some() => causes.push(Cause::invalid(
                        "spec.updateStrategy.rollingUpdate",
                        "",
                        "may not be specified when strategy `type` is 'OnDelete'",
                    )),
                    Some("OnDelete") => {}
                    Some(t) => causes.push(Cause::invalid(
                        "spec.updateStrategy.type",
                        format!("{t:?}"),
                        "supported values: \"OnDelete\", \"RollingUpdate\"",
                    )),
                }
                if let Some(ru) = &u.rolling_update {
                    let surge = ru.max_surge.as_ref().map(|v| int_or_percent(v, 100));
                    let unavail = ru.max_unavailable.as_ref().map(|v| int_or_percent(v, 100));
                    if surge.unwrap_or(0) == 0 && unavail == Some(0) {
                        causes.push(Cause::invalid(
                            "spec.updateStrategy.rollingUpdate.maxUnavailable",
                            "0",
                            "may not be 0 when `maxSurge` is 0",
                        ));
                    }
                }
            }
        }
        "Job" => {
            let j: batch::Job = typed(obj)?;
            if let Some(spec) = &j.spec {
                job_spec("spec", spec, true, &mut causes);
            }
        }
        "CronJob" => {
            let c: batch::CronJob = typed(obj)?;
            let spec = &c.spec;
            if let Err(c) = cron_schedule(&spec.schedule, spec.time_zone.as_deref()) {
                causes.push(c);
            }
            if let Some(js) = &spec.job_template.spec {
                job_spec("spec.jobTemplate.spec", js, false, &mut causes);
            }
        }
        "Service" => {
            let s: core::Service = typed(obj)?;
            service(&s, &mut causes);
        }
        "ConfigMap" => {
            let cm: core::ConfigMap = typed(obj)?;
            for k in cm
                .data
                .iter()
                .flat_map(|d| d.keys())
                .chain(cm.binary_data.iter().flat_map(|d| d.keys()))
            {
                if k.is_empty()
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    causes.push(Cause::invalid("data", format!("{k:?}"), "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
                }
            }
            let total: usize = cm
                .data
                .iter()
                .flatten()
                .map(|(_, v)| v.len())
                .sum::<usize>()
                + cm.binary_data
                    .iter()
                    .flatten()
                    .map(|(_, v)| v.0.len())
                    .sum::<usize>();
            if total > MAX_DATA_BYTES {
                // `[]`: the whole object, as Kubernetes names it.
                causes.push(Cause::too_long("[]", MAX_DATA_BYTES));
            }
        }
        "Secret" => {
            let secret: core::Secret = typed(obj)?;
            let total: usize = secret
                .data
                .iter()
                .flatten()
                .map(|(_, v)| v.0.len())
                .sum::<usize>()
                + secret
                    .string_data
                    .iter()
                    .flatten()
                    .map(|(_, v)| v.len())
                    .sum::<usize>();
            if total > MAX_DATA_BYTES {
                causes.push(Cause::too_long("data", MAX_DATA_BYTES));
            }
        }
        "PodDisruptionBudget" => {
            let b: policy::PodDisruptionBudget = typed(obj)?;
            let spec = b.spec.unwrap_or_default();
            if spec.min_available.is_some() && spec.max_unavailable.is_some() {
                causes.push(Cause::invalid(
                    "spec",
                    "minAvailable and maxUnavailable",
                    "minAvailable and maxUnavailable cannot be both set",
                ));
            }
        }
        "EndpointSlice" => {
            let es: discovery::EndpointSlice = typed(obj)?;
            endpoint_slice(&es, &mut causes);
        }
        "Lease" => {
            let l: coordination::Lease = typed(obj)?;
            let spec = l.spec.unwrap_or_default();
            if let Some(d) = spec.lease_duration_seconds.filter(|d| *d <= 0) {
                causes.push(Cause::invalid(
                    "spec.leaseDurationSeconds",
                    d,
                    "must be greater than 0",
                ));
            }
            if let Some(t) = spec.lease_transitions.filter(|t| *t < 0) {
                causes.push(Cause::invalid(
                    "spec.leaseTransitions",
                    t,
                    "must be greater than or equal to 0",
                ));
            }
        }
        "Ingress" => {
            let ing: networking::Ingress = typed(obj)?;
            ingress(&ing, &mut causes);
        }
        "IngressClass" => {
            let c: networking::IngressClass = typed(obj)?;
            let spec = c.spec.unwrap_or_default();
            if let Some(ctl) = spec.controller.as_deref() {
                if !is_qualified_path(ctl) {
                    causes.push(Cause::invalid(
                        "spec.controller",
                        format!("{ctl:?}"),
                        "must be a domain-prefixed path (such as \"acme.io/foo\")",
                    ));
                }
            }
        }
        "NetworkPolicy" => {
            let np: networking::NetworkPolicy = typed(obj)?;
            for (i, t) in np
                .spec
                .and_then(|s| s.policy_types)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if t != "Ingress" && t != "Egress" {
                    causes.push(Cause {
                        reason: "FieldValueNotSupported".into(),
                        field: format!("spec.policyTypes[{i}]"),
                        message: format!(
                            "Unsupported value: {t:?}: supported values: \"Ingress\", \"Egress\""
                        ),
                    });
                }
            }
        }
        "HorizontalPodAutoscaler" => {
            let h: autoscaling::HorizontalPodAutoscaler = typed(obj)?;
            let spec = h.spec;
            let min = spec.min_replicas.unwrap_or(1);
            if min < 1 {
                causes.push(Cause::invalid(
                    "spec.minReplicas",
                    min,
                    "must be greater than or equal to 1",
                ));
            }
            if spec.max_replicas < 1 {
                causes.push(Cause::invalid(
                    "spec.maxReplicas",
                    spec.max_replicas,
                    "must be greater than 0",
                ));
            } else if spec.max_replicas < min {
                causes.push(Cause::invalid(
                    "spec.maxReplicas",
                    spec.max_replicas,
                    "must be greater than or equal to `minReplicas`",
                ));
            }
            let target = &spec.scale_target_ref;
            if target.kind.is_empty() {
                causes.push(Cause::required("spec.scaleTargetRef.kind"));
            }
            if target.name.is_empty() {
                causes.push(Cause::required("spec.scaleTargetRef.name"));
            }
        }
        "PriorityClass" => {
            let pc: scheduling::PriorityClass = typed(obj)?;
            let value = pc.value.unwrap_or(0);
            let name = meta.name.as_deref().unwrap_or("");
            if name.starts_with(SYSTEM_PRIORITY_PREFIX) {
                if let Err(why) = known_system_priority_class(name, value, pc.global_default) {
                    causes.push(Cause::forbidden("metadata.name", &format!("priority class names with '{SYSTEM_PRIORITY_PREFIX}' prefix are reserved for system use only. error: {why}")));
                }
            } else if value > HIGHEST_USER_PRIORITY {
                causes.push(Cause::forbidden(
                    "value",
                    &format!("maximum allowed value of a user defined priority is {HIGHEST_USER_PRIORITY}"),
                ));
            }
            if let Some(p) = pc.preemption_policy.as_deref() {
                if p != "PreemptLowerPriority" && p != "Never" {
                    causes.push(Cause {
                        reason: "FieldValueNotSupported".into(),
                        field: "preemptionPolicy".into(),
                        message: format!("Unsupported value: {p:?}: supported values: \"Never\", \"PreemptLowerPriority\""),
                    });
                }
            }
        }
        "RuntimeClass" => {
            let rc: node::RuntimeClass = typed(obj)?;
            if rc.handler.is_empty() {
                causes.push(Cause::required("handler"));
            } else if !is_dns1123_label(&rc.handler) {
                causes.push(Cause::invalid(
                    "handler",
                    format!("{:?}", rc.handler),
                    LABEL_MSG,
                ));
            }
        }
        "ValidatingWebhookConfiguration" => {
            let c: admission::ValidatingWebhookConfiguration = typed(obj)?;
            for (i, w) in c.webhooks.unwrap_or_default().iter().enumerate() {
                webhook(
                    &format!("webhooks[{i}]"),
                    &w.name,
                    &w.client_config,
                    &w.admission_review_versions,
                    &w.side_effects,
                    &mut causes,
                );
            }
        }
        "MutatingWebhookConfiguration" => {
            let c: admission::MutatingWebhookConfiguration = typed(obj)?;
            for (i, w) in c.webhooks.unwrap_or_default().iter().enumerate() {
                webhook(
                    &format!("webhooks[{i}]"),
                    &w.name,
                    &w.client_config,
                    &w.admission_review_versions,
                    &w.side_effects,
                    &mut causes,
                );
            }
        }
        "LimitRange" => {
            let l: core::LimitRange = typed(obj)?;
            for (i, item) in l.spec.unwrap_or_default().limits.iter().enumerate() {
                if !["Pod", "Container", "PersistentVolumeClaim"].contains(&item.type_.as_str()) {
                    causes.push(Cause {
                        reason: "FieldValueNotSupported".into(),
                        field: format!("spec.limits[{i}].type"),
                        message: format!("Unsupported value: {:?}: supported values: \"Container\", \"PersistentVolumeClaim\", \"Pod\"", item.type_),
                    });
                }
            }
        }
        "CertificateSigningRequest" => {
            let c: certificates::CertificateSigningRequest = typed(obj)?;
            if c.spec.signer_name.is_empty() {
                causes.push(Cause::required("spec.signerName"));
            }
            if c.spec.request.0.is_empty() {
                causes.push(Cause::required("spec.request"));
            }
        }
        "Role" => {
            let r: rbac::Role = typed(obj)?;
            policy_rules(r.rules.as_deref().unwrap_or_default(), true, &mut causes);
        }
        "ClusterRole" => {
            let r: rbac::ClusterRole = typed(obj)?;
            policy_rules(r.rules.as_deref().unwrap_or_default(), false, &mut causes);
        }
        "RoleBinding" => {
            let b: rbac::RoleBinding = typed(obj)?;
            role_binding(&b.role_ref, b.subjects.as_deref(), true, &mut causes);
        }
        "ClusterRoleBinding" => {
            let b: rbac::ClusterRoleBinding = typed(obj)?;
            role_binding(&b.role_ref, b.subjects.as_deref(), false, &mut causes);
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        let name = meta
            .name
            .clone()
            .or(meta.generate_name.clone())
            .unwrap_or_default();
        Err(ApiError::invalid(resource.kind, &name, causes))
    }
}

/// Kubernetes' `ValidatePolicyRule`: verbs always; either resources (with API groups) or
/// non-resource URLs (never in a namespaced Role), not both.
fn policy_rules(rules: &[rbac::PolicyRule], namespaced: bool, causes: &mut Vec<Cause>) {
    for (i, r) in rules.iter().enumerate() {
        let at = format!("rules[{i}]");
        if r.verbs.is_empty() {
            causes.push(Cause::required(format!("{at}.verbs")));
        }
        let urls = r.non_resource_urls.as_deref().unwrap_or_default();
        let resources = r.resources.as_deref().unwrap_or_default();
        if !urls.is_empty() {
            if namespaced {
                causes.push(Cause::invalid(
                    format!("{at}.nonResourceURLs"),
                    urls.join(", "),
                    "namespaced rules cannot apply to non-resource URLs",
                ));
            }
            if !resources.is_empty()
                || r.api_groups.as_ref().is_some_and(|g| !g.is_empty())
                || r.resource_names.as_ref().is_some_and(|n| !n.is_empty())
            {
                causes.push(Cause::invalid(
                    format!("{at}.nonResourceURLs"),
                    urls.join(", "),
                    "rules cannot apply to both regular resources and non-resource URLs",
                ));
            }
            continue;
        }
        if r.api_groups.as_ref().is_none_or(|g| g.is_empty()) {
            causes.push(Cause::required(format!("{at}.apiGroups")));
        }
        if resources.is_empty() {
            causes.push(Cause::required(format!("{at}.resources")));
        }
    }
}

/// Kubernetes' binding validation: a role of this API group (a ClusterRoleBinding binds only
/// ClusterRoles) and well-formed subjects.
fn role_binding(
    role: &rbac::RoleRef,
    subjects: Option<&[rbac::Subject]>,
    namespaced: bool,
    causes: &mut Vec<Cause>,
) {
    if role.api_group.as_deref() != Some(crate::resources::RBAC_GROUP) {
        causes.push(Cause::invalid(
            "roleRef.apiGroup",
            format!("{:?}", role.api_group.as_deref().unwrap_or("")),
            "supported values: \"rbac.authorization.k8s.io\"",
        ));
    }
    let kinds: &[&str] = if namespaced {
        &["Role", "ClusterRole"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&role.kind.as_str()) {
        causes.push(Cause::invalid(
            "roleRef.kind",
            format!("{:?}", role.kind),
            if namespaced {
                "supported values: \"Role\", \"ClusterRole\""
            } else {
                "supported values: \"ClusterRole\""
            },
        ));
    }
    if role.name.is_empty() {
        causes.push(Cause::required("roleRef.name"));
    }
    for (i, s) in subjects.unwrap_or_default().iter().enumerate() {
        let at = format!("subjects[{i}]");
        if s.name.is_empty() {
            causes.push(Cause::required(format!("{at}.name")));
        }
        let group = s.api_group.as_deref().unwrap_or("");
        match s.kind.as_str() {
            "ServiceAccount" => {
                if !group.is_empty() {
                    causes.push(Cause::invalid(
                        format!("{at}.apiGroup"),
                        format!("{group:?}"),
                        "supported values: \"\"",
                    ));
                }
                if !namespaced && s.namespace.as_deref().unwrap_or("").is_empty() {
                    causes.push(Cause::required(format!("{at}.namespace")));
                }
            }
            "User" | "Group" => {
                if group != crate::resources::RBAC_GROUP {
                    causes.push(Cause::invalid(
                        format!("{at}.apiGroup"),
                        format!("{group:?}"),
                        "supported values: \"rbac.authorization.k8s.io\"",
                    ));
                }
            }
            other => causes.push(Cause::invalid(
                format!("{at}.kind"),
                format!("{other:?}"),
                "supported values: \"ServiceAccount\", \"User\", \"Group\"",
            )),
        }
    }
}

/// Priority class names with this prefix are the system's.
pub const SYSTEM_PRIORITY_PREFIX: &str = "system-";
/// The highest priority a user-defined class may have.
pub const HIGHEST_USER_PRIORITY: i32 = 1_000_000_000;
/// The system's priority classes, as Kubernetes creates them at start: name and value.
pub const SYSTEM_PRIORITY_CLASSES: [(&str, i32); 2] = [
    ("system-node-critical", 2_000_001_000),
    ("system-cluster-critical", 2_000_000_000),
];

/// Kubernetes' `IsKnownSystemPriorityClass`.
fn known_system_priority_class(
    name: &str,
    value: i32,
    global_default: Option<bool>,
) -> Result<(), String> {
    let Some((_, v)) = SYSTEM_PRIORITY_CLASSES.iter().find(|(n, _)| *n == name) else {
        return Err(format!("{name:?} is not a known system priority class"));
    };
    if *v != value {
        return Err(format!("value of {name:?} PriorityClass must be {v}"));
    }
    if global_default == Some(true) {
        return Err(format!(
            "globalDefault of {name:?} PriorityClass must be false"
        ));
    }
    Ok(())
}

/// A domain-prefixed path (`example.com/ingress-controller`), as an IngressClass controller.
fn is_qualified_path(s: &str) -> bool {
    s.split_once('/')
        .is_some_and(|(domain, path)| is_dns1123_subdomain(domain) && !path.is_empty())
        && s.len() <= 250
}

/// Kubernetes' Ingress validation: backends, rules, paths (`pathType` is checked before
/// decoding, see [`before_decode`]).
fn ingress(ing: &networking::Ingress, causes: &mut Vec<Cause>) {
    let Some(spec) = &ing.spec else {
        return;
    };
    let backend = |at: &str, b: &networking::IngressBackend, causes: &mut Vec<Cause>| match (
        &b.service,
        &b.resource,
    ) {
        (Some(_), Some(_)) => causes.push(Cause::invalid(
            at,
            "",
            "cannot set both resource and service backends",
        )),
        (None, None) => causes.push(Cause::invalid(
            at,
            "",
            "resource or service backend is required",
        )),
        (Some(svc), None) => {
            if svc.name.is_empty() {
                causes.push(Cause::required(format!("{at}.service.name")));
            }
            match &svc.port {
                None => causes.push(Cause::required(format!("{at}.service.port"))),
                Some(p) if p.name.is_some() && p.number.is_some() => causes.push(Cause::invalid(
                    format!("{at}.service.port"),
                    "",
                    "cannot set both port name & port number",
                )),
                Some(p) if p.name.is_none() && p.number.is_none() => causes.push(Cause::invalid(
                    format!("{at}.service.port"),
                    "",
                    "port name or number is required",
                )),
                Some(_) => {}
            }
        }
        (None, Some(_)) => {}
    };
    if let Some(b) = &spec.default_backend {
        backend("spec.defaultBackend", b, causes);
    }
    if spec.rules.as_ref().is_none_or(|r| r.is_empty()) && spec.default_backend.is_none() {
        causes.push(Cause::invalid(
            "spec",
            "[]",
            "either `defaultBackend` or `rules` must be specified",
        ));
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        if let Some(host) = rule.host.as_deref() {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if !is_dns1123_subdomain(bare) {
                causes.push(Cause::invalid(
                    format!("spec.rules[{i}].host"),
                    format!("{host:?}"),
                    SUBDOMAIN_MSG,
                ));
            }
        }
        for (j, path) in rule.http.iter().flat_map(|h| &h.paths).enumerate() {
            let at = format!("spec.rules[{i}].http.paths[{j}]");
            let p = path.path.as_deref().unwrap_or("");
            match path.path_type.as_str() {
                "Exact" | "Prefix" => {
                    if !p.starts_with('/') {
                        causes.push(Cause::invalid(
                            format!("{at}.path"),
                            format!("{p:?}"),
                            "must be an absolute path",
                        ));
                    }
                }
                "ImplementationSpecific" => {
                    if !p.is_empty() && !p.starts_with('/') {
                        causes.push(Cause::invalid(
                            format!("{at}.path"),
                            format!("{p:?}"),
                            "must be an absolute path",
                        ));
                    }
                }
                other => causes.push(Cause {
                    reason: "FieldValueNotSupported".into(),
                    field: format!("{at}.pathType"),
                    message: format!("Unsupported value: {other:?}: supported values: \"Exact\", \"ImplementationSpecific\", \"Prefix\""),
                }),
            }
            backend(&format!("{at}.backend"), &path.backend, causes);
        }
    }
}

/// The checks of one admission webhook (of either configuration).
fn webhook(
    at: &str,
    name: &str,
    client: &admission::WebhookClientConfig,
    review_versions: &[String],
    side_effects: &str,
    causes: &mut Vec<Cause>,
) {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() < 3 || !is_dns1123_subdomain(name) {
        causes.push(Cause::invalid(
            format!("{at}.name"),
            format!("{name:?}"),
            "should be a domain with at least three segments separated by dots",
        ));
    }
    match (&client.url, &client.service) {
        (Some(_), Some(_)) | (None, None) => causes.push(Cause {
            message: "Required value: exactly one of url or service is required".into(),
            ..Cause::required(format!("{at}.clientConfig"))
        }),
        _ => {}
    }
    if review_versions.is_empty() {
        causes.push(Cause::required(format!("{at}.admissionReviewVersions")));
    } else if !review_versions.iter().any(|v| v == "v1" || v == "v1beta1") {
        causes.push(Cause::invalid(
            format!("{at}.admissionReviewVersions"),
            format!("{review_versions:?}"),
            "must include at least one of v1, v1beta1",
        ));
    }
    if !["None", "NoneOnDryRun"].contains(&side_effects) {
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            field: format!("{at}.sideEffects"),
            message: format!(
                "Unsupported value: {side_effects:?}: supported values: \"None\", \"NoneOnDryRun\""
            ),
        });
    }
}

fn has_required_spec(kind: &str) -> bool {
    matches!(
        kind,
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" | "CronJob"
    )
}

/// Resolves an int-or-percent (`maxSurge: 25%`) against `total`; percentages round down.
pub fn int_or_percent(
    v: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    total: i32,
) -> i32 {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match v {
        IntOrString::Int(i) => *i,
        IntOrString::String(s) => s
            .trim_end_matches('%')
            .parse::<i64>()
            .map(|p| (p * total as i64 / 100) as i32)
            .unwrap_or(0),
    }
}

/// The checks of a Job's spec (`at`: where it sits). A Job's own spec has its selector by
/// now (defaulted from its uid unless `manualSelector`); a CronJob's template gets one per Job.
fn job_spec(at: &str, spec: &batch::JobSpec, own: bool, causes: &mut Vec<Cause>) {
    let mut inner = Vec::new();
    workload(
        None,
        if own { spec.selector.as_ref() } else { None },
        &spec.template,
        false,
        &mut inner,
    );
    let rp = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref());
    match rp {
        Some("Never") | Some("OnFailure") => {}
        None => inner.push(Cause::required("spec.template.spec.restartPolicy")),
        Some(other) => inner.push(Cause::invalid(
            "spec.template.spec.restartPolicy",
            format!("\"{other}\""),
            "supported values: \"OnFailure\", \"Never\"",
        )),
    }
    for (field, v) in [
        ("spec.completions", spec.completions),
        ("spec.parallelism", spec.parallelism),
        ("spec.backoffLimit", spec.backoff_limit),
    ] {
        if let Some(v) = v.filter(|v| *v < 0) {
            inner.push(Cause::invalid(
                field,
                v,
                "must be greater than or equal to 0",
            ));
        }
    }
    if spec.completion_mode.as_deref() == Some("Indexed") && spec.completions.is_none() {
        inner.push(Cause::required("spec.completions"));
    }
    if own && spec.selector.is_none() {
        inner.push(Cause::required("spec.selector"));
    }
    for mut c in inner {
        if let Some(rest) = c.field.strip_prefix("spec.") {
            c.field = format!("{at}.{rest}");
        }
        causes.push(c);
    }
}

/// The five fields of a cron macro Kubernetes (robfig/cron) accepts.
fn cron_macro(expr: &str) -> Option<&'static str> {
    Some(match expr {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return None,
    })
}

/// A CronJob's schedule as Kubernetes takes it: five fields or a macro (`@hourly`, `@daily`,
/// `@midnight`, `@weekly`, `@monthly`, `@yearly`, `@annually`), in an IANA time zone (UTC
/// when unset). The CronJob controller computes its times from what this returns.
pub fn cron_schedule(
    expr: &str,
    time_zone: Option<&str>,
) -> Result<(croner::Cron, chrono_tz::Tz), Cause> {
    let tz = match time_zone {
        None => chrono_tz::Tz::UTC,
        Some(t) => t.parse::<chrono_tz::Tz>().map_err(|_| {
            Cause::invalid("spec.timeZone", format!("\"{t}\""), "unknown time zone")
        })?,
    };
    let e = expr.trim();
    let bad = |why: &str| Cause::invalid("spec.schedule", format!("\"{expr}\""), why);
    let e = if e.starts_with('@') {
        cron_macro(e).ok_or_else(|| bad("unknown schedule macro"))?
    } else if e.split_whitespace().count() != 5 {
        return Err(bad("expected exactly 5 fields"));
    } else {
        e
    };
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(e)
        .map_err(|err| bad(&err.to_string()))?;
    Ok((cron, tz))
}

fn workload(
    replicas: Option<i32>,
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    template: &core::PodTemplateSpec,
    selector_required: bool,
    causes: &mut Vec<Cause>,
) {
    if let Some(r) = replicas {
        if r < 0 {
            causes.push(Cause::invalid(
                "spec.replicas",
                r,
                "must be greater than or equal to 0",
            ));
        }
    }
    let labels: BTreeMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    match selector {
        None if selector_required => causes.push(Cause::required("spec.selector")),
        None => {}
        Some(ls) => match Selector::from_label_selector(ls) {
            Err(e) => causes.push(Cause::invalid("spec.selector", "", &e)),
            Ok(s) if s.is_empty() => causes.push(Cause::invalid(
                "spec.selector",
                "{}",
                "empty selector is invalid for deployment",
            )),
            Ok(s) => {
                if !s.matches(&labels) {
                    let shown: Vec<String> =
                        labels.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    causes.push(Cause::invalid(
                        "spec.template.metadata.labels",
                        format!("map[{}]", shown.join(" ")),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        },
    }
    match &template.spec {
        Some(spec) => pod_spec(spec, "spec.template.spec", causes),
        None => causes.push(Cause::required("spec.template.spec")),
    }
}

fn pod_spec(spec: &core::PodSpec, at: &str, causes: &mut Vec<Cause>) {
    if spec.containers.is_empty() {
        causes.push(Cause::required(format!("{at}.containers")));
    }
    let mut names = BTreeSet::new();
    for (list, cs) in [
        ("containers", &spec.containers),
        (
            "initContainers",
            spec.init_containers.as_ref().unwrap_or(&Vec::new()),
        ),
    ] {
        for (i, c) in cs.iter().enumerate() {
            let f = format!("{at}.{list}[{i}]");
            if c.name.is_empty() {
                causes.push(Cause::required(format!("{f}.name")));
            } else if !is_dns1123_label(&c.name) {
                causes.push(Cause::invalid(
                    format!("{f}.name"),
                    format!("{:?}", c.name),
                    LABEL_MSG,
                ));
            } else if !names.insert(c.name.clone()) {
                causes.push(Cause::duplicate(
                    format!("{f}.name"),
                    format!("{:?}", c.name),
                ));
            }
            if c.image.as_deref().unwrap_or("").trim().is_empty() {
                causes.push(Cause::required(format!("{f}.image")));
            }
            for (j, p) in c.ports.iter().flatten().enumerate() {
                if !(1..=65535).contains(&p.container_port) {
                    causes.push(Cause::invalid(
                        format!("{f}.ports[{j}].containerPort"),
                        p.container_port,
                        "must be between 1 and 65535, inclusive",
                    ));
                }
                if let Some(proto) = p.protocol.as_deref() {
                    if !matches!(proto, "TCP" | "UDP" | "SCTP") {
                        causes.push(Cause::invalid(
                            format!("{f}.ports[{j}].protocol"),
                            format!("{proto:?}"),
                            "supported values: \"SCTP\", \"TCP\", \"UDP\"",
                        ));
                    }
                }
            }
            if let Some(pp) = c.image_pull_policy.as_deref() {
                if !matches!(pp, "Always" | "IfNotPresent" | "Never") {
                    causes.push(Cause::invalid(
                        format!("{f}.imagePullPolicy"),
                        format!("{pp:?}"),
                        "supported values: \"Always\", \"IfNotPresent\", \"Never\"",
                    ));
                }
            }
            for (j, e) in c.env.iter().flatten().enumerate() {
                if e.name.is_empty() {
                    causes.push(Cause::required(format!("{f}.env[{j}].name")));
                }
            }
        }
    }
    if let Some(rp) = spec.restart_policy.as_deref() {
        if !matches!(rp, "Always" | "OnFailure" | "Never") {
            causes.push(Cause::invalid(
                format!("{at}.restartPolicy"),
                format!("{rp:?}"),
                "supported values: \"Always\", \"OnFailure\", \"Never\"",
            ));
        }
    }
    let mut vols = BTreeSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if !is_dns1123_label(&v.name) {
            causes.push(Cause::invalid(
                format!("{at}.volumes[{i}].name"),
                format!("{:?}", v.name),
                LABEL_MSG,
            ));
        } else if !vols.insert(v.name.clone()) {
            causes.push(Cause::duplicate(
                format!("{at}.volumes[{i}].name"),
                format!("{:?}", v.name),
            ));
        }
    }
    for (i, c) in spec.containers.iter().enumerate() {
        for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
            if !vols.contains(&m.name) {
                causes.push(Cause::invalid(
                    format!("{at}.containers[{i}].volumeMounts[{j}].name"),
                    format!("{:?}", m.name),
                    "not found",
                ));
            }
        }
    }
}

fn service(s: &core::Service, causes: &mut Vec<Cause>) {
    let Some(spec) = &s.spec else {
        causes.push(Cause::required("spec"));
        return;
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        causes.push(Cause::invalid(
            "spec.type",
            format!("{ty:?}"),
            "supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"",
        ));
    }
    let ports = spec.ports.clone().unwrap_or_default();
    if ports.is_empty() && ty != "ExternalName" && spec.cluster_ip.as_deref() != Some("None") {
        causes.push(Cause::required("spec.ports"));
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        if !(1..=65535).contains(&p.port) {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                p.port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        if ports.len() > 1 && p.name.as_deref().unwrap_or("").is_empty() {
            causes.push(Cause::required(format!("spec.ports[{i}].name")));
        }
        if let Some(n) = &p.name {
            if !names.insert(n.clone()) {
                causes.push(Cause::duplicate(
                    format!("spec.ports[{i}].name"),
                    format!("{n:?}"),
                ));
            }
        }
        if let Some(np) = p.node_port {
            if ty == "ClusterIP" {
                causes.push(Cause::forbidden(
                    format!("spec.ports[{i}].nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            } else if !(30000..=32767).contains(&np) {
                causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), np, "provided port is not in the valid range. The range of valid ports is 30000-32767"));
            }
        }
    }
    if ty == "ExternalName" && spec.external_name.as_deref().unwrap_or("").is_empty() {
        causes.push(Cause::required("spec.externalName"));
    }
}

/// What an update may not change. `old` and `new` are the stored and the proposed object.
/// An EndpointSlice as Kubernetes' `ValidateEndpointSlice` has it: a known address type, at
/// most 1000 endpoints of 1 to 100 addresses of that type, at most 100 ports with unique names.
fn endpoint_slice(es: &discovery::EndpointSlice, causes: &mut Vec<Cause>) {
    let ty = es.address_type.as_str();
    if !["IPv4", "IPv6", "FQDN"].contains(&ty) {
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            field: "addressType".into(),
            message: format!(
                "Unsupported value: {ty:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""
            ),
        });
    }
    let endpoints = es.endpoints.as_deref().unwrap_or_default();
    if endpoints.len() > 1000 {
        causes.push(Cause {
            reason: "FieldValueTooMany".into(),
            field: "endpoints".into(),
            message: format!(
                "Too many: {}: must have at most 1000 items",
                endpoints.len()
            ),
        });
    }
    for (i, ep) in endpoints.iter().enumerate() {
        if ep.addresses.is_empty() || ep.addresses.len() > 100 {
            causes.push(Cause::invalid(
                format!("endpoints[{i}].addresses"),
                ep.addresses.len(),
                "must contain at least 1 and at most 100 addresses",
            ));
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            let ok = match ty {
                "IPv4" => a.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => a.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => is_dns1123_subdomain(a),
            };
            if !ok {
                causes.push(Cause::invalid(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?}"),
                    &format!("must be a valid {ty} address"),
                ));
            }
        }
    }
    let ports = es.ports.as_deref().unwrap_or_default();
    if ports.len() > 100 {
        causes.push(Cause {
            reason: "FieldValueTooMany".into(),
            field: "ports".into(),
            message: format!("Too many: {}: must have at most 100 items", ports.len()),
        });
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let name = p.name.as_deref().unwrap_or("");
        if !names.insert(name) {
            causes.push(Cause::duplicate(
                format!("ports[{i}].name"),
                format!("{name:?}"),
            ));
        }
        if let Some(n) = p.port.filter(|n| !(0..=65535).contains(n)) {
            causes.push(Cause::invalid(
                format!("ports[{i}].port"),
                n,
                "must be between 0 and 65535, inclusive",
            ));
        }
    }
}

pub fn validate_update(resource: &Resource, old: &Value, new: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let immutable = |path: &str, field: &str, causes: &mut Vec<Cause>| {
        let (a, b) = (old.pointer(path), new.pointer(path));
        if a.is_some() && a != b {
            causes.push(Cause::invalid(
                field,
                b.map(|v| v.to_string()).unwrap_or_default(),
                "field is immutable",
            ));
        }
    };
    match resource.kind {
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" => {
            immutable("/spec/selector", "spec.selector", &mut causes)
        }
        "EndpointSlice" => immutable("/addressType", "addressType", &mut causes),
        "Service" => {
            let a = old.pointer("/spec/clusterIP");
            let b = new.pointer("/spec/clusterIP");
            if a.is_some() && b.is_some() && a != b {
                causes.push(Cause::invalid(
                    "spec.clusterIP",
                    b.map(|v| v.to_string()).unwrap_or_default(),
                    "field is immutable",
                ));
            }
        }
        "Pod" => {
            // Only images, activeDeadlineSeconds and tolerations may change in a pod spec;
            // the scheduler's binding sets nodeName once.
            let strip = |v: &Value| {
                let mut s = v.get("spec").cloned().unwrap_or(Value::Null);
                if let Some(m) = s.as_object_mut() {
                    m.remove("activeDeadlineSeconds");
                    m.remove("tolerations");
                    if let Some(cs) = m.get_mut("containers").and_then(Value::as_array_mut) {
                        for c in cs {
                            if let Some(c) = c.as_object_mut() {
                                c.remove("image");
                            }
                        }
                    }
                    if old.pointer("/spec/nodeName").is_none() {
                        m.remove("nodeName");
                    }
                }
                s
            };
            if strip(old) != strip(new) {
                causes.push(Cause::forbidden("spec", "pod updates may not change fields other than `spec.containers[*].image`, `spec.activeDeadlineSeconds` or `spec.tolerations`"));
            }
        }
        "Job" => immutable("/spec/template", "spec.template", &mut causes),
        "PriorityClass" => {
            if old.get("value") != new.get("value") {
                causes.push(Cause::forbidden(
                    "value",
                    "may not be changed in an update.",
                ));
            }
            if old.get("preemptionPolicy") != new.get("preemptionPolicy") {
                causes.push(Cause::invalid(
                    "preemptionPolicy",
                    new.get("preemptionPolicy")
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    "field is immutable",
                ));
            }
        }
        "RuntimeClass" => immutable("/handler", "handler", &mut causes),
        "IngressClass" => immutable("/spec/controller", "spec.controller", &mut causes),
        "CustomResourceDefinition" => causes.extend(crate::crd::validate_definition_update(
            &typed(old)?,
            &typed(new)?,
        )),
        "RoleBinding" | "ClusterRoleBinding" if old.get("roleRef") != new.get("roleRef") => {
            causes.push(Cause::invalid(
                "roleRef",
                new.get("roleRef")
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                "cannot change roleRef",
            ));
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            resource.kind,
            crate::meta::name(new),
            causes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy() -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "default"},
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "web", "image": "x:v1"}]}}}})
    }

    fn res(kind: &str) -> &'static Resource {
        crate::resources::RESOURCES
            .iter()
            .find(|r| r.kind == kind)
            .unwrap()
    }

    /// ConfigMaps and Secrets hold at most 1 MiB of data, counted decoded, as Kubernetes.
    #[test]
    fn configmap_and_secret_data_is_at_most_a_mebibyte() {
        let meta = json!({"name": "big", "namespace": "default"});
        let half = "x".repeat(MAX_DATA_BYTES / 2);
        let cm = json!({"metadata": meta, "data": {"a": half, "b": half}});
        validate(res("ConfigMap"), &cm).unwrap();
        let cm = json!({"metadata": meta, "data": {"a": half, "b": half, "c": "x"}});
        let e = validate(res("ConfigMap"), &cm).unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "ConfigMap \"big\" is invalid: []: Too long: must have at most 1048576 bytes"
        );
        // Binary data counts decoded: 1 MiB of it is about 1.33 MiB of base64.
        use base64_of as b64;
        let bin = json!({"metadata": meta, "binaryData": {"a": b64(MAX_DATA_BYTES)}});
        validate(res("ConfigMap"), &bin).unwrap();
        let secret = json!({"metadata": meta, "data": {"a": b64(MAX_DATA_BYTES)}});
        validate(res("Secret"), &secret).unwrap();
        let secret =
            json!({"metadata": meta, "data": {"a": b64(MAX_DATA_BYTES)}, "stringData": {"b": "x"}});
        let e = validate(res("Secret"), &secret).unwrap_err();
        assert_eq!(e.code, 422);
        assert!(
            e.message
                .ends_with("data: Too long: must have at most 1048576 bytes"),
            "{}",
            e.message
        );
    }

    /// `n` zero bytes in base64.
    fn base64_of(n: usize) -> String {
        let mut s = "AAAA".repeat(n / 3);
        match n % 3 {
            1 => s.push_str("AA=="),
            2 => s.push_str("AAA="),
            _ => {}
        }
        s
    }

    #[test]
    fn valid_deployment_passes() {
        decode(res("Deployment"), &deploy(), true).unwrap();
        validate(res("Deployment"), &deploy()).unwrap();
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let mut d = deploy();
        d["spec"]["replica"] = json!(3);
        let e = decode(res("Deployment"), &d, true).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(
            e.message.contains("unknown field \"spec.replica\""),
            "{}",
            e.message
        );
        decode(res("Deployment"), &d, false).unwrap();
        let mut d = deploy();
        d["spec"]["replicas"] = json!("three");
        let e = decode(res("Deployment"), &d, true).unwrap_err();
        assert!(e.message.contains("spec.replicas"), "{}", e.message);
    }

    #[test]
    fn semantic_errors_list_every_field() {
        let mut d = deploy();
        d["metadata"]["name"] = json!("Web_1");
        d["spec"]["template"]["metadata"]["labels"]["app"] = json!("other");
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("");
        let e = validate(res("Deployment"), &d).unwrap_err();
        assert_eq!(e.code, 422);
        let fields: Vec<&str> = e.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "metadata.name",
                "spec.template.metadata.labels",
                "spec.template.spec.containers[0].image"
            ]
        );
    }

    #[test]
    fn job_and_cronjob_rules() {
        let tmpl = |rp: &str| json!({"metadata": {"labels": {"a": "b"}}, "spec": {"restartPolicy": rp, "containers": [{"name": "c", "image": "x"}]}});
        let job = |rp: &str| json!({"metadata": {"name": "j"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": tmpl(rp)}});
        assert!(validate(res("Job"), &job("Never")).is_ok());
        assert!(validate(res("Job"), &job("OnFailure")).is_ok());
        let e = validate(res("Job"), &job("Always")).unwrap_err();
        assert_eq!(e.causes[0].field, "spec.template.spec.restartPolicy");
        let mut idx = job("Never");
        idx["spec"]["completionMode"] = json!("Indexed");
        idx["spec"]["parallelism"] = json!(-1);
        let e = validate(res("Job"), &idx).unwrap_err();
        let fields: Vec<&str> = e.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.parallelism", "spec.completions"]);
        let cj = |sched: &str, tz: Option<&str>, rp: &str| {
            json!({"metadata": {"name": "c"},
            "spec": {"schedule": sched, "timeZone": tz, "jobTemplate": {"spec": {"template": tmpl(rp)}}}})
        };
        assert!(validate(
            res("CronJob"),
            &cj("*/5 * * * *", Some("Europe/Paris"), "OnFailure")
        )
        .is_ok());
        assert!(validate(res("CronJob"), &cj("@midnight", None, "Never")).is_ok());
        for (sched, tz, rp, field) in [
            ("* * * *", None, "Never", "spec.schedule"),
            ("0 0 * * * *", None, "Never", "spec.schedule"),
            ("@fortnightly", None, "Never", "spec.schedule"),
            ("61 * * * *", None, "Never", "spec.schedule"),
            ("* * * * *", Some("Nowhere/City"), "Never", "spec.timeZone"),
            (
                "* * * * *",
                None,
                "Always",
                "spec.jobTemplate.spec.template.spec.restartPolicy",
            ),
        ] {
            let e = validate(res("CronJob"), &cj(sched, tz, rp)).unwrap_err();
            assert_eq!(e.causes[0].field, field, "{sched} {tz:?} {rp}");
        }
    }

    #[test]
    fn service_rules() {
        let svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}});
        let e = validate(res("Service"), &svc).unwrap_err();
        assert_eq!(e.causes[0].field, "spec.ports[0].nodePort");
        let svc =
            json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}, {"port": 81}]}});
        assert_eq!(validate(res("Service"), &svc).unwrap_err().causes.len(), 2);
    }

    #[test]
    fn immutable_fields() {
        let mut d = deploy();
        d["spec"]["selector"]["matchLabels"]["app"] = json!("x");
        let e = validate_update(res("Deployment"), &deploy(), &d).unwrap_err();
        assert_eq!(e.causes[0].field, "spec.selector");
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x:1"}]}});
        let mut bound = pod.clone();
        bound["spec"]["nodeName"] = json!("n1");
        validate_update(res("Pod"), &pod, &bound).unwrap();
        let mut moved = bound.clone();
        moved["spec"]["nodeName"] = json!("n2");
        assert!(validate_update(res("Pod"), &bound, &moved).is_err());
    }

    #[test]
    fn leases_decode_and_validate() {
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "n1", "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 15,
                     "renewTime": "2026-01-01T00:00:00.123456Z"}});
        decode(res("Lease"), &lease, true).unwrap();
        validate(res("Lease"), &lease).unwrap();
        let mut bad = lease.clone();
        bad["spec"]["leaseDurationSeconds"] = json!(0);
        bad["spec"]["leaseTransitions"] = json!(-1);
        let e = validate(res("Lease"), &bad).unwrap_err();
        let fields: Vec<&str> = e.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["spec.leaseDurationSeconds", "spec.leaseTransitions"]
        );
        let mut unknown = lease;
        unknown["spec"]["holder"] = json!("n1");
        assert_eq!(decode(res("Lease"), &unknown, true).unwrap_err().code, 400);
    }

    #[test]
    fn rbac_rules_and_bindings_are_checked() {
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "r", "namespace": "a"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                      {"verbs": [], "nonResourceURLs": ["/healthz"]}]});
        decode(res("Role"), &role, true).unwrap();
        let e = validate(res("Role"), &role).unwrap_err();
        let fields: Vec<_> = e.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["rules[1].verbs", "rules[1].nonResourceURLs"]);
        let cr = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "r"}, "rules": [{"verbs": ["get"], "nonResourceURLs": ["/healthz"]}]});
        validate(res("ClusterRole"), &cr).unwrap();
        let crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "b"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
            "subjects": [{"kind": "ServiceAccount", "name": "sa"}]});
        let e = validate(res("ClusterRoleBinding"), &crb).unwrap_err();
        let fields: Vec<_> = e.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["roleRef.kind", "subjects[0].namespace"]);
        let mut changed = crb.clone();
        changed["roleRef"]["name"] = json!("other");
        assert!(validate_update(res("ClusterRoleBinding"), &crb, &changed).is_err());
    }

    #[test]
    fn names() {
        assert!(is_dns1123_label("web-1"));
        assert!(!is_dns1123_label("-web"));
        assert!(!is_dns1123_label("Web"));
        assert!(is_dns1123_subdomain("a.b-c"));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn daemonset_update_strategy_is_checked() {
        let ds = |strategy: Value| {
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "d", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"a": "b"}}, "updateStrategy": strategy,
                         "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
        };
        validate(
            res("DaemonSet"),
            &ds(json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})),
        )
        .unwrap();
        validate(res("DaemonSet"), &ds(json!({"type": "OnDelete"}))).unwrap();
        let e = validate(res("DaemonSet"), &ds(json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 0}}))).unwrap_err();
        assert_eq!(e.code, 422);
        assert!(
            e.message
                .contains("spec.updateStrategy.rollingUpdate.maxUnavailable"),
            "{}",
            e.message
        );
        let e = validate(res("DaemonSet"), &ds(json!({"type": "Sometimes"}))).unwrap_err();
        assert!(
            e.message.contains("spec.updateStrategy.type"),
            "{}",
            e.message
        );
        let e = validate(
            res("DaemonSet"),
            &ds(json!({"type": "OnDelete", "rollingUpdate": {"maxUnavailable": 1}})),
        )
        .unwrap_err();
        assert!(
            e.message.contains("spec.updateStrategy.rollingUpdate"),
            "{}",
            e.message
        );
    }
}
