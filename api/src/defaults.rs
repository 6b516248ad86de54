//! Defaulting: the fields the Kubernetes API server fills in when a client leaves them out.
//! Works on untyped objects so that what the client sent is kept as it was sent.

use serde_json::{json, Value};

fn set_default(obj: &mut Value, key: &str, value: Value) {
    if let Some(m) = obj.as_object_mut() {
        if m.get(key).is_none_or(Value::is_null) {
            m.insert(key.to_string(), value);
        }
    }
}

/// Removes `key` when it holds `zero`.
fn drop_if(obj: &mut Value, key: &str, zero: &Value) {
    if let Some(m) = obj.as_object_mut() {
        if m.get(key) == Some(zero) {
            m.remove(key);
        }
    }
}

fn child<'a>(obj: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    obj.get_mut(key).filter(|v| v.is_object())
}

/// Defaults for an object of `kind`, in place.
pub fn apply(kind: &str, obj: &mut Value) {
    match kind {
        "CustomResourceDefinition" => crate::crd::apply_defaults(obj),
        // As Kubernetes' `SetDefaults_EndpointPort`: a port's name is "" and protocol TCP.
        "EndpointSlice" => {
            if let Some(ports) = obj.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter(|p| p.is_object()) {
                    set_default(p, "name", json!(""));
                    set_default(p, "protocol", json!("TCP"));
                }
            }
        }
        "Pod" => {
            if let Some(spec) = child(obj, "spec") {
                pod_spec(spec);
            }
            set_default(obj, "status", json!({}));
            if let Some(status) = child(obj, "status") {
                set_default(status, "phase", json!("Pending"));
            }
        }
        "Deployment" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "replicas", json!(1));
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(spec, "progressDeadlineSeconds", json!(600));
                set_default(spec, "strategy", json!({}));
                if let Some(strategy) = child(spec, "strategy") {
                    set_default(strategy, "type", json!("RollingUpdate"));
                    if strategy["type"] == "RollingUpdate" {
                        set_default(strategy, "rollingUpdate", json!({}));
                        if let Some(ru) = child(strategy, "rollingUpdate") {
                            set_default(ru, "maxSurge", json!("25%"));
                            set_default(ru, "maxUnavailable", json!("25%"));
                        }
                    }
                }
                template(spec);
            }
        }
        "DaemonSet" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(spec, "updateStrategy", json!({}));
                if let Some(strategy) = child(spec, "updateStrategy") {
                    set_default(strategy, "type", json!("RollingUpdate"));
                    if strategy["type"] == "RollingUpdate" {
                        set_default(strategy, "rollingUpdate", json!({}));
                        if let Some(ru) = child(strategy, "rollingUpdate") {
                            set_default(ru, "maxUnavailable", json!(1));
                            set_default(ru, "maxSurge", json!(0));
                        }
                    }
                }
                template(spec);
            }
        }
        "StatefulSet" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "replicas", json!(1));
                set_default(spec, "podManagementPolicy", json!("OrderedReady"));
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(spec, "updateStrategy", json!({}));
                if let Some(strategy) = child(spec, "updateStrategy") {
                    set_default(strategy, "type", json!("RollingUpdate"));
                    if strategy["type"] == "RollingUpdate" {
                        set_default(strategy, "rollingUpdate", json!({}));
                        if let Some(ru) = child(strategy, "rollingUpdate") {
                            set_default(ru, "partition", json!(0));
                        }
                    }
                }
                set_default(spec, "persistentVolumeClaimRetentionPolicy", json!({}));
                if let Some(p) = child(spec, "persistentVolumeClaimRetentionPolicy") {
                    set_default(p, "whenDeleted", json!("Retain"));
                    set_default(p, "whenScaled", json!("Retain"));
                }
                template(spec);
            }
        }
        "PersistentVolumeClaim" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "volumeMode", json!("Filesystem"));
            }
            set_default(obj, "status", json!({"phase": "Pending"}));
        }
        "PersistentVolume" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
                set_default(spec, "volumeMode", json!("Filesystem"));
            }
            set_default(obj, "status", json!({"phase": "Pending"}));
        }
        "StorageClass" => {
            set_default(obj, "reclaimPolicy", json!("Delete"));
            set_default(obj, "volumeBindingMode", json!("Immediate"));
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            // Kubernetes' SetDefaults_Subject: users and groups are of the RBAC group.
            for s in obj
                .get_mut("subjects")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                // A ServiceAccount's group is "", which Kubernetes leaves out of the object.
                let group = match s.get("kind").and_then(Value::as_str) {
                    Some("User" | "Group") => "rbac.authorization.k8s.io",
                    _ => continue,
                };
                if s.get("apiGroup")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    s["apiGroup"] = json!(group);
                }
            }
        }
        "Job" => job(obj),
        "CronJob" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "concurrencyPolicy", json!("Allow"));
                set_default(spec, "suspend", json!(false));
                set_default(spec, "successfulJobsHistoryLimit", json!(3));
                set_default(spec, "failedJobsHistoryLimit", json!(1));
                if let Some(js) = spec
                    .pointer_mut("/jobTemplate/spec")
                    .filter(|s| s.is_object())
                {
                    job_spec(js);
                }
            }
        }
        "ReplicaSet" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "replicas", json!(1));
                template(spec);
            }
        }
        "Service" => {
            if let Some(spec) = child(obj, "spec") {
                // Zero and empty mean "allocate one" (kubectl's protobuf carries Go's zero
                // values); dropped here, so validation and allocation see them unset.
                drop_if(spec, "clusterIP", &json!(""));
                drop_if(spec, "clusterIPs", &json!([]));
                drop_if(spec, "healthCheckNodePort", &json!(0));
                set_default(spec, "type", json!("ClusterIP"));
                set_default(spec, "sessionAffinity", json!("None"));
                if spec["type"] != "ExternalName" {
                    set_default(spec, "internalTrafficPolicy", json!("Cluster"));
                }
                if spec["type"] == "NodePort" || spec["type"] == "LoadBalancer" {
                    set_default(spec, "externalTrafficPolicy", json!("Cluster"));
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        drop_if(p, "nodePort", &json!(0));
                        set_default(p, "protocol", json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            set_default(p, "targetPort", port);
                        }
                    }
                }
            }
        }
        "Secret" => set_default(obj, "type", json!("Opaque")),
        "Endpoints" => {
            for sub in each(obj.get_mut("subsets")) {
                for p in each(sub.get_mut("ports")) {
                    set_default(p, "protocol", json!("TCP"));
                }
            }
        }
        "ReplicationController" => replication_controller(obj),
        "PodTemplate" => template(obj),
        "LimitRange" => {
            for item in each(obj.pointer_mut("/spec/limits")) {
                limit_range_item(item);
            }
        }
        "NetworkPolicy" => {
            if let Some(spec) = child(obj, "spec") {
                for dir in ["ingress", "egress"] {
                    for rule in each(spec.get_mut(dir)) {
                        for p in each(rule.get_mut("ports")) {
                            set_default(p, "protocol", json!("TCP"));
                        }
                    }
                }
                // Kubernetes' SetDefaults_NetworkPolicy: Ingress always, Egress when it has
                // egress rules.
                if spec.get("policyTypes").is_none_or(Value::is_null) {
                    let mut types = vec![json!("Ingress")];
                    if spec
                        .get("egress")
                        .and_then(Value::as_array)
                        .is_some_and(|e| !e.is_empty())
                    {
                        types.push(json!("Egress"));
                    }
                    spec["policyTypes"] = Value::Array(types);
                }
            }
        }
        "IngressClass" => {
            if let Some(p) = obj
                .pointer_mut("/spec/parameters")
                .filter(|p| p.is_object())
            {
                set_default(p, "scope", json!("Cluster"));
            }
        }
        "HorizontalPodAutoscaler" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "minReplicas", json!(1));
                if spec
                    .get("metrics")
                    .and_then(Value::as_array)
                    .is_none_or(|m| m.is_empty())
                {
                    spec["metrics"] = json!([{"type": "Resource", "resource": {"name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 80}}}]);
                }
                // With a behavior, its rules are filled in (GenerateHPAScale{Up,Down}Rules).
                if let Some(b) = child(spec, "behavior") {
                    set_default(b, "scaleUp", json!({}));
                    if let Some(up) = child(b, "scaleUp") {
                        set_default(up, "stabilizationWindowSeconds", json!(0));
                        set_default(up, "selectPolicy", json!("Max"));
                        set_default(
                            up,
                            "policies",
                            json!([
                            {"type": "Pods", "value": 4, "periodSeconds": 15},
                            {"type": "Percent", "value": 100, "periodSeconds": 15}]),
                        );
                    }
                    set_default(b, "scaleDown", json!({}));
                    if let Some(down) = child(b, "scaleDown") {
                        set_default(down, "stabilizationWindowSeconds", json!(300));
                        set_default(down, "selectPolicy", json!("Max"));
                        set_default(
                            down,
                            "policies",
                            json!([
                            {"type": "Percent", "value": 100, "periodSeconds": 15}]),
                        );
                    }
                }
            }
        }
        "PriorityClass" => set_default(obj, "preemptionPolicy", json!("PreemptLowerPriority")),
        "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration" => {
            let mutating = kind == "MutatingWebhookConfiguration";
            for w in each(obj.get_mut("webhooks")) {
                set_default(w, "failurePolicy", json!("Fail"));
                set_default(w, "matchPolicy", json!("Equivalent"));
                set_default(w, "namespaceSelector", json!({}));
                set_default(w, "objectSelector", json!({}));
                set_default(w, "timeoutSeconds", json!(10));
                if mutating {
                    set_default(w, "reinvocationPolicy", json!("Never"));
                }
                for r in each(w.get_mut("rules")) {
                    set_default(r, "scope", json!("*"));
                }
                if let Some(svc) = w
                    .pointer_mut("/clientConfig/service")
                    .filter(|s| s.is_object())
                {
                    set_default(svc, "port", json!(443));
                }
            }
        }
        "ValidatingAdmissionPolicy" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "failurePolicy", json!("Fail"));
                if let Some(m) = child(spec, "matchConstraints") {
                    match_resources(m);
                }
            }
        }
        "ValidatingAdmissionPolicyBinding" => {
            if let Some(m) = obj
                .pointer_mut("/spec/matchResources")
                .filter(|m| m.is_object())
            {
                match_resources(m);
            }
        }
        "CSIDriver" => {
            if let Some(spec) = child(obj, "spec") {
                set_default(spec, "attachRequired", json!(true));
                set_default(spec, "podInfoOnMount", json!(false));
                set_default(spec, "storageCapacity", json!(false));
                set_default(spec, "fsGroupPolicy", json!("ReadWriteOnceWithFSType"));
                set_default(spec, "volumeLifecycleModes", json!(["Persistent"]));
                set_default(spec, "requiresRepublish", json!(false));
                set_default(spec, "seLinuxMount", json!(false));
            }
        }
        "Namespace" => {
            set_default(obj, "spec", json!({"finalizers": ["kubernetes"]}));
            set_default(obj, "status", json!({"phase": "Active"}));
        }
        _ => {}
    }
}

/// A Job's defaults and, unless `manualSelector`, the selector Kubernetes generates from its
/// uid (labels `batch.kubernetes.io/controller-uid`, `batch.kubernetes.io/job-name` and the
/// legacy `controller-uid`, `job-name` put on the template).
fn job(obj: &mut Value) {
    let uid = obj.pointer("/metadata/uid").cloned();
    let name = obj.pointer("/metadata/name").cloned();
    let Some(spec) = child(obj, "spec") else {
        return;
    };
    job_spec(spec);
    let manual = spec["manualSelector"] == json!(true);
    if let (false, Some(uid), Some(name)) = (manual, uid, name) {
        if let Some(t) = child(spec, "template") {
            set_default(t, "metadata", json!({}));
            if let Some(m) = child(t, "metadata") {
                set_default(m, "labels", json!({}));
                if let Some(l) = m.get_mut("labels").and_then(Value::as_object_mut) {
                    l.insert("batch.kubernetes.io/controller-uid".into(), uid.clone());
                    l.insert("batch.kubernetes.io/job-name".into(), name.clone());
                    l.insert("controller-uid".into(), uid.clone());
                    l.insert("job-name".into(), name);
                }
            }
        }
        set_default(
            spec,
            "selector",
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
        );
    }
}

/// The defaults of a Job's spec (also inside a CronJob's job template).
fn job_spec(spec: &mut Value) {
    if spec.get("completions").is_none() && spec.get("parallelism").is_none() {
        set_default(spec, "completions", json!(1));
    }
    set_default(spec, "parallelism", json!(1));
    set_default(spec, "backoffLimit", json!(6));
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
    set_default(spec, "manualSelector", json!(false));
    set_default(spec, "podReplacementPolicy", json!("TerminatedOrFailed"));
    // A job's pods restart only when told to: no "Always" default here (validation asks
    // for Never or OnFailure).
    if let Some(t) = child(spec, "template") {
        if let Some(ps) = child(t, "spec") {
            let rp = ps.get("restartPolicy").cloned();
            pod_spec(ps);
            match rp {
                Some(rp) => ps["restartPolicy"] = rp,
                None => {
                    if let Some(o) = ps.as_object_mut() {
                        o.remove("restartPolicy");
                    }
                }
            }
        }
    }
}

/// The elements of an array field, none when it is absent or not an array.
fn each(v: Option<&mut Value>) -> impl Iterator<Item = &mut Value> {
    v.and_then(Value::as_array_mut).into_iter().flatten()
}

/// Kubernetes' SetDefaults_ReplicationController: the selector and the labels are the
/// template's labels when not given; one replica.
fn replication_controller(obj: &mut Value) {
    let labels = obj.pointer("/spec/template/metadata/labels").cloned();
    if let (Some(l), Some(meta)) = (labels.clone(), child(obj, "metadata")) {
        if meta
            .get("labels")
            .and_then(Value::as_object)
            .is_none_or(|m| m.is_empty())
        {
            meta["labels"] = l;
        }
    }
    if let Some(spec) = child(obj, "spec") {
        if let Some(l) = labels {
            if spec
                .get("selector")
                .and_then(Value::as_object)
                .is_none_or(|m| m.is_empty())
            {
                spec["selector"] = l;
            }
        }
        set_default(spec, "replicas", json!(1));
        template(spec);
    }
}

/// Kubernetes' SetDefaults_LimitRangeItem: a container's default limit is its max, its
/// default request the default limit, else the min.
fn limit_range_item(item: &mut Value) {
    if item.get("type").and_then(Value::as_str) != Some("Container") {
        return;
    }
    let get = |item: &Value, k: &str| {
        item.get(k)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let (max, min) = (get(item, "max"), get(item, "min"));
    let mut default = get(item, "default");
    for (k, v) in &max {
        default.entry(k.clone()).or_insert(v.clone());
    }
    let mut request = get(item, "defaultRequest");
    for (k, v) in default.iter().chain(&min) {
        request.entry(k.clone()).or_insert(v.clone());
    }
    // Empty maps are left out, as Go's `omitempty` does.
    if !default.is_empty() {
        item["default"] = Value::Object(default);
    }
    if !request.is_empty() {
        item["defaultRequest"] = Value::Object(request);
    }
}

/// An admission policy's or webhook's match defaults (SetDefaults_MatchResources, _Rule).
fn match_resources(m: &mut Value) {
    set_default(m, "matchPolicy", json!("Equivalent"));
    set_default(m, "namespaceSelector", json!({}));
    set_default(m, "objectSelector", json!({}));
    for key in ["resourceRules", "excludeResourceRules"] {
        for r in each(m.get_mut(key)) {
            set_default(r, "scope", json!("*"));
        }
    }
}

fn template(spec: &mut Value) {
    if let Some(t) = child(spec, "template") {
        if let Some(ps) = child(t, "spec") {
            pod_spec(ps);
        }
    }
}

/// Defaults of a pod spec (also used inside templates).
pub fn pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                let image = c
                    .get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                set_default(c, "imagePullPolicy", json!(default_pull_policy(&image)));
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

/// The taint the node lifecycle controller puts on a node whose agent reports Ready=False.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The taint the node lifecycle controller puts on a node it has stopped hearing from.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// The DefaultTolerationSeconds admission plugin, on a pod being created: a pod with no
/// toleration of the `not-ready` (or `unreachable`) NoExecute taint gets one that lasts
/// `not_ready` (`unreachable`) seconds, so its pods leave a dead node after that long. A
/// toleration with an empty key (Exists) or an empty effect counts as tolerating it.
pub fn default_toleration_seconds(pod: &mut Value, not_ready: i64, unreachable: i64) {
    let Some(spec) = child(pod, "spec") else {
        return;
    };
    let list = spec
        .get("tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let covers = |key: &str| {
        list.iter().any(|t| {
            let k = t.get("key").and_then(Value::as_str).unwrap_or("");
            let e = t.get("effect").and_then(Value::as_str).unwrap_or("");
            (k == key || k.is_empty()) && (e == "NoExecute" || e.is_empty())
        })
    };
    let mut add = Vec::new();
    for (key, seconds) in [
        (NOT_READY_TAINT, not_ready),
        (UNREACHABLE_TAINT, unreachable),
    ] {
        if !covers(key) {
            add.push(
                json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                            "tolerationSeconds": seconds}),
            );
        }
    }
    if add.is_empty() {
        return;
    }
    let mut all = list;
    all.extend(add);
    if let Some(m) = spec.as_object_mut() {
        m.insert("tolerations".into(), Value::Array(all));
    }
}

/// `Always` for `:latest` or untagged images, else `IfNotPresent`, as Kubernetes does.
pub fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemonset_defaults() {
        let mut d =
            json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "i"}]}}}});
        apply("DaemonSet", &mut d);
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(
            d["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
        );
        assert!(d["spec"].get("replicas").is_none());
        let mut d = json!({"spec": {"updateStrategy": {"type": "OnDelete"}, "template": {}}});
        apply("DaemonSet", &mut d);
        assert!(d["spec"]["updateStrategy"].get("rollingUpdate").is_none());
    }

    #[test]
    fn deployment_defaults() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "127.0.0.1:5000/x:v1", "ports": [{"containerPort": 80}]}]}}}});
        apply("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn default_tolerations_are_added_unless_the_pod_has_its_own() {
        let mut p = json!({"spec": {"containers": []}});
        default_toleration_seconds(&mut p, 10, 20);
        assert_eq!(
            p["spec"]["tolerations"],
            json!([
                {"key": NOT_READY_TAINT, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10},
                {"key": UNREACHABLE_TAINT, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 20},
            ])
        );
        // A pod's own toleration of one taint is kept; only the other is added.
        let own = json!({"key": UNREACHABLE_TAINT, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 3600});
        let mut p = json!({"spec": {"tolerations": [own.clone()]}});
        default_toleration_seconds(&mut p, 10, 20);
        let ts = p["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(ts.len(), 2);
        assert_eq!(ts[0], own);
        assert_eq!(ts[1]["key"], NOT_READY_TAINT);
        // Tolerating everything (empty key, Exists) or any effect of the key counts.
        let mut p = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        default_toleration_seconds(&mut p, 10, 20);
        assert_eq!(p["spec"]["tolerations"].as_array().unwrap().len(), 1);
        let mut p = json!({"spec": {"tolerations": [{"key": NOT_READY_TAINT, "operator": "Exists"},
                                                    {"key": UNREACHABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]}});
        default_toleration_seconds(&mut p, 10, 20);
        let ts = p["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(
            ts.len(),
            3,
            "a NoSchedule toleration does not cover NoExecute"
        );
    }

    #[test]
    fn pull_policy_and_service_defaults() {
        assert_eq!(default_pull_policy("127.0.0.1:5000/x"), "Always");
        assert_eq!(default_pull_policy("x:latest"), "Always");
        assert_eq!(default_pull_policy("x@sha256:00"), "IfNotPresent");
        let mut s = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        apply("Service", &mut s);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["externalTrafficPolicy"], "Cluster");
        // Go's zero values ask for an allocation.
        let mut s = json!({"spec": {"clusterIP": "", "healthCheckNodePort": 0, "ports": [{"port": 80, "nodePort": 0}, {"port": 81, "nodePort": 30001}]}});
        apply("Service", &mut s);
        assert_eq!(s["spec"].get("clusterIP"), None);
        assert_eq!(s["spec"].get("healthCheckNodePort"), None);
        assert_eq!(s["spec"]["ports"][0].get("nodePort"), None);
        assert_eq!(s["spec"]["ports"][1]["nodePort"], 30001);
        // An explicit value is kept.
        let mut d = json!({"spec": {"replicas": 0, "template": {"spec": {}}}});
        apply("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 0);
    }

    #[test]
    fn job_defaults_and_generated_selector() {
        let mut j = json!({"metadata": {"name": "pi", "uid": "u-1"},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}});
        apply("Job", &mut j);
        let spec = &j["spec"];
        assert_eq!(spec["completions"], 1);
        assert_eq!(spec["parallelism"], 1);
        assert_eq!(spec["backoffLimit"], 6);
        assert_eq!(spec["completionMode"], "NonIndexed");
        assert_eq!(spec["suspend"], false);
        assert_eq!(
            spec["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
            "u-1"
        );
        let labels = &spec["template"]["metadata"]["labels"];
        assert_eq!(labels["controller-uid"], "u-1");
        assert_eq!(labels["job-name"], "pi");
        assert_eq!(spec["template"]["spec"]["restartPolicy"], "Never");
        // A work queue (parallelism alone) keeps completions unset; no restartPolicy is
        // invented (validation asks for one).
        let mut q = json!({"metadata": {"name": "q", "uid": "u-2"},
            "spec": {"parallelism": 3, "manualSelector": true, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}}});
        apply("Job", &mut q);
        assert!(q["spec"].get("completions").is_none());
        assert_eq!(q["spec"]["selector"]["matchLabels"], json!({"a": "b"}));
        assert!(q["spec"]["template"]["metadata"]["labels"]
            .get("job-name")
            .is_none());
        assert!(q["spec"]["template"]["spec"].get("restartPolicy").is_none());
        let mut cj = json!({"spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "OnFailure"}}}}}});
        apply("CronJob", &mut cj);
        assert_eq!(cj["spec"]["concurrencyPolicy"], "Allow");
        assert_eq!(cj["spec"]["successfulJobsHistoryLimit"], 3);
        assert_eq!(cj["spec"]["failedJobsHistoryLimit"], 1);
        assert_eq!(cj["spec"]["jobTemplate"]["spec"]["backoffLimit"], 6);
    }
}
