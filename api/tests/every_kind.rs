//! A minimal object of every stored built-in kind: it decodes strictly into its k8s-openapi
//! type, gets the defaults Kubernetes' `SetDefaults_*` functions fill in (and only drops what
//! Kubernetes treats as unset), passes validation, and prints a row as wide as its columns.
//! A kind added to the resource table without a row here fails `every_stored_kind_has_a_row`.

use serde_json::{json, Value};
use skiff_api::resources::RESOURCES;
use skiff_api::{defaults, table, validation, Resource};

/// A kind, a minimal object of it, and the defaulted fields: (JSON pointer, value), where
/// `Value::Null` means the field must be absent.
type Row = (&'static str, Value, Vec<(&'static str, Value)>);

fn containers() -> Value {
    json!([{"name": "c", "image": "example.com/app:v1"}])
}

fn rows() -> Vec<Row> {
    let meta = json!({"name": "a", "namespace": "default"});
    let cluster = json!({"name": "a"});
    vec![
        (
            "Namespace",
            json!({"metadata": cluster}),
            vec![
                ("/spec/finalizers", json!(["kubernetes"])),
                ("/status/phase", json!("Active")),
            ],
        ),
        ("Node", json!({"metadata": cluster}), vec![]),
        (
            "Pod",
            json!({"metadata": meta, "spec": {"containers": containers()}}),
            vec![
                ("/spec/restartPolicy", json!("Always")),
                ("/spec/dnsPolicy", json!("ClusterFirst")),
                ("/spec/terminationGracePeriodSeconds", json!(30)),
                ("/spec/schedulerName", json!("default-scheduler")),
                ("/spec/containers/0/imagePullPolicy", json!("IfNotPresent")),
                ("/spec/containers/0/terminationMessagePolicy", json!("File")),
                ("/status/phase", json!("Pending")),
            ],
        ),
        (
            "Service",
            // kubectl's `create service nodeport` sends `nodePort: 0`: unset, so allocated.
            json!({"metadata": meta, "spec": {"type": "NodePort", "clusterIP": "",
                   "ports": [{"port": 8080, "nodePort": 0}]}}),
            vec![
                ("/spec/sessionAffinity", json!("None")),
                ("/spec/externalTrafficPolicy", json!("Cluster")),
                ("/spec/internalTrafficPolicy", json!("Cluster")),
                ("/spec/ports/0/protocol", json!("TCP")),
                ("/spec/ports/0/targetPort", json!(8080)),
                ("/spec/ports/0/nodePort", Value::Null),
                ("/spec/clusterIP", Value::Null),
            ],
        ),
        (
            "Endpoints",
            json!({"metadata": meta, "subsets": [{"addresses": [{"ip": "10.0.0.1"}],
                   "ports": [{"port": 80}]}]}),
            vec![("/subsets/0/ports/0/protocol", json!("TCP"))],
        ),
        (
            "Event",
            json!({"metadata": meta, "involvedObject": {"kind": "Pod", "name": "p"}}),
            vec![],
        ),
        ("ConfigMap", json!({"metadata": meta}), vec![]),
        (
            "Secret",
            json!({"metadata": meta}),
            vec![("/type", json!("Opaque"))],
        ),
        ("ServiceAccount", json!({"metadata": meta}), vec![]),
        (
            "PersistentVolumeClaim",
            json!({"metadata": meta, "spec": {"accessModes": ["ReadWriteOnce"],
                   "resources": {"requests": {"storage": "1Gi"}}}}),
            vec![
                ("/spec/volumeMode", json!("Filesystem")),
                ("/status/phase", json!("Pending")),
            ],
        ),
        (
            "PersistentVolume",
            json!({"metadata": cluster, "spec": {"capacity": {"storage": "1Gi"},
                   "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/tmp/a"}}}),
            vec![
                ("/spec/persistentVolumeReclaimPolicy", json!("Retain")),
                ("/spec/volumeMode", json!("Filesystem")),
                ("/status/phase", json!("Pending")),
            ],
        ),
        (
            "ResourceQuota",
            json!({"metadata": meta, "spec": {"hard": {"pods": "10"}}}),
            vec![],
        ),
        (
            "LimitRange",
            json!({"metadata": meta, "spec": {"limits": [
                {"type": "Container", "max": {"cpu": "1"}, "min": {"memory": "1Mi"}}]}}),
            vec![
                ("/spec/limits/0/default/cpu", json!("1")),
                ("/spec/limits/0/defaultRequest/cpu", json!("1")),
                ("/spec/limits/0/defaultRequest/memory", json!("1Mi")),
                ("/spec/limits/0/default/memory", Value::Null),
            ],
        ),
        (
            "PodTemplate",
            json!({"metadata": meta, "template": {"spec": {"containers": containers()}}}),
            vec![("/template/spec/restartPolicy", json!("Always"))],
        ),
        (
            "ReplicationController",
            json!({"metadata": meta, "spec": {"template": {"metadata": {"labels": {"app": "a"}},
                   "spec": {"containers": containers()}}}}),
            vec![
                ("/spec/replicas", json!(1)),
                ("/spec/selector", json!({"app": "a"})),
                ("/metadata/labels", json!({"app": "a"})),
                ("/spec/template/spec/dnsPolicy", json!("ClusterFirst")),
            ],
        ),
        (
            "Deployment",
            json!({"metadata": meta, "spec": {"selector": {"matchLabels": {"app": "a"}},
                   "template": {"metadata": {"labels": {"app": "a"}},
                                "spec": {"containers": containers()}}}}),
            vec![
                ("/spec/replicas", json!(1)),
                ("/spec/revisionHistoryLimit", json!(10)),
                ("/spec/progressDeadlineSeconds", json!(600)),
                ("/spec/strategy/type", json!("RollingUpdate")),
                ("/spec/strategy/rollingUpdate/maxSurge", json!("25%")),
                ("/spec/strategy/rollingUpdate/maxUnavailable", json!("25%")),
            ],
        ),
        (
            "ReplicaSet",
            json!({"metadata": meta, "spec": {"selector": {"matchLabels": {"app": "a"}},
                   "template": {"metadata": {"labels": {"app": "a"}},
                                "spec": {"containers": containers()}}}}),
            vec![("/spec/replicas", json!(1))],
        ),
        (
            "DaemonSet",
            json!({"metadata": meta, "spec": {"selector": {"matchLabels": {"app": "a"}},
                   "template": {"metadata": {"labels": {"app": "a"}},
                                "spec": {"containers": containers()}}}}),
            vec![
                ("/spec/revisionHistoryLimit", json!(10)),
                ("/spec/updateStrategy/type", json!("RollingUpdate")),
                (
                    "/spec/updateStrategy/rollingUpdate/maxUnavailable",
                    json!(1),
                ),
                ("/spec/updateStrategy/rollingUpdate/maxSurge", json!(0)),
            ],
        ),
        (
            "ControllerRevision",
            json!({"metadata": meta, "revision": 1}),
            vec![],
        ),
        (
            "StatefulSet",
            json!({"metadata": meta, "spec": {"serviceName": "a",
                   "selector": {"matchLabels": {"app": "a"}},
                   "template": {"metadata": {"labels": {"app": "a"}},
                                "spec": {"containers": containers()}}}}),
            vec![
                ("/spec/replicas", json!(1)),
                ("/spec/podManagementPolicy", json!("OrderedReady")),
                ("/spec/revisionHistoryLimit", json!(10)),
                ("/spec/updateStrategy/rollingUpdate/partition", json!(0)),
                (
                    "/spec/persistentVolumeClaimRetentionPolicy",
                    json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
                ),
            ],
        ),
        (
            "Job",
            json!({"metadata": {"name": "a", "namespace": "default", "uid": "u-1"},
                   "spec": {"template": {"spec": {"containers": containers(),
                                                  "restartPolicy": "Never"}}}}),
            vec![
                ("/spec/completions", json!(1)),
                ("/spec/parallelism", json!(1)),
                ("/spec/backoffLimit", json!(6)),
                ("/spec/completionMode", json!("NonIndexed")),
                ("/spec/suspend", json!(false)),
                (
                    "/spec/selector/matchLabels/batch.kubernetes.io~1controller-uid",
                    json!("u-1"),
                ),
            ],
        ),
        (
            "CronJob",
            json!({"metadata": meta, "spec": {"schedule": "*/5 * * * *",
                   "jobTemplate": {"spec": {"template": {"spec": {
                       "containers": containers(), "restartPolicy": "OnFailure"}}}}}}),
            vec![
                ("/spec/concurrencyPolicy", json!("Allow")),
                ("/spec/suspend", json!(false)),
                ("/spec/successfulJobsHistoryLimit", json!(3)),
                ("/spec/failedJobsHistoryLimit", json!(1)),
                ("/spec/jobTemplate/spec/backoffLimit", json!(6)),
            ],
        ),
        (
            "PodDisruptionBudget",
            json!({"metadata": meta, "spec": {"minAvailable": 1,
                   "selector": {"matchLabels": {"app": "a"}}}}),
            vec![],
        ),
        ("Lease", json!({"metadata": meta, "spec": {}}), vec![]),
        (
            "EndpointSlice",
            json!({"metadata": meta, "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.42.0.5"]}], "ports": [{"port": 80}]}),
            vec![
                ("/ports/0/protocol", json!("TCP")),
                ("/ports/0/name", json!("")),
            ],
        ),
        (
            "StorageClass",
            json!({"metadata": cluster, "provisioner": "example.com/p"}),
            vec![
                ("/reclaimPolicy", json!("Delete")),
                ("/volumeBindingMode", json!("Immediate")),
            ],
        ),
        (
            "CSIDriver",
            json!({"metadata": cluster, "spec": {}}),
            vec![
                ("/spec/attachRequired", json!(true)),
                ("/spec/podInfoOnMount", json!(false)),
                ("/spec/storageCapacity", json!(false)),
                ("/spec/requiresRepublish", json!(false)),
                ("/spec/fsGroupPolicy", json!("ReadWriteOnceWithFSType")),
                ("/spec/volumeLifecycleModes", json!(["Persistent"])),
            ],
        ),
        (
            "CSINode",
            json!({"metadata": cluster, "spec": {"drivers": []}}),
            vec![],
        ),
        (
            "VolumeAttachment",
            json!({"metadata": cluster, "spec": {"attacher": "example.com/p", "nodeName": "n",
                   "source": {"persistentVolumeName": "pv"}}}),
            vec![],
        ),
        (
            "CSIStorageCapacity",
            json!({"metadata": meta, "storageClassName": "local-path"}),
            vec![],
        ),
        ("Role", json!({"metadata": meta, "rules": []}), vec![]),
        (
            "RoleBinding",
            json!({"metadata": meta, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                   "kind": "Role", "name": "r"}, "subjects": [{"kind": "User", "name": "u"}]}),
            vec![("/subjects/0/apiGroup", json!("rbac.authorization.k8s.io"))],
        ),
        (
            "ClusterRole",
            json!({"metadata": cluster, "rules": []}),
            vec![],
        ),
        (
            "ClusterRoleBinding",
            json!({"metadata": cluster, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                   "kind": "ClusterRole", "name": "r"},
                   "subjects": [{"kind": "ServiceAccount", "name": "s", "namespace": "default"}]}),
            vec![("/subjects/0/apiGroup", Value::Null)],
        ),
        (
            "CustomResourceDefinition",
            json!({"metadata": {"name": "widgets.example.com"}, "spec": {"group": "example.com",
                   "names": {"plural": "widgets", "kind": "Widget"}, "scope": "Namespaced",
                   "versions": [{"name": "v1", "served": true, "storage": true,
                                 "schema": {"openAPIV3Schema": {"type": "object"}}}]}}),
            vec![
                ("/spec/names/singular", json!("widget")),
                ("/spec/names/listKind", json!("WidgetList")),
                ("/spec/conversion/strategy", json!("None")),
            ],
        ),
        (
            "Ingress",
            json!({"metadata": meta, "spec": {"rules": [{"host": "a.example.com", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "s", "port": {"number": 80}}}}]}}]}}),
            vec![],
        ),
        (
            "IngressClass",
            json!({"metadata": cluster, "spec": {"controller": "example.com/ingress",
                   "parameters": {"kind": "Params", "name": "p"}}}),
            vec![("/spec/parameters/scope", json!("Cluster"))],
        ),
        (
            "NetworkPolicy",
            json!({"metadata": meta, "spec": {"podSelector": {},
                   "egress": [{"ports": [{"port": 53}]}]}}),
            vec![
                ("/spec/policyTypes", json!(["Ingress", "Egress"])),
                ("/spec/egress/0/ports/0/protocol", json!("TCP")),
            ],
        ),
        (
            "HorizontalPodAutoscaler",
            json!({"metadata": meta, "spec": {"maxReplicas": 3, "scaleTargetRef":
                   {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d"}}}),
            vec![
                ("/spec/minReplicas", json!(1)),
                ("/spec/metrics/0/resource/name", json!("cpu")),
                (
                    "/spec/metrics/0/resource/target/averageUtilization",
                    json!(80),
                ),
                ("/spec/behavior", Value::Null),
            ],
        ),
        (
            "ValidatingWebhookConfiguration",
            json!({"metadata": cluster, "webhooks": [{"name": "check.example.com",
                   "clientConfig": {"service": {"namespace": "default", "name": "s"}},
                   "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                              "operations": ["CREATE"], "resources": ["pods"]}],
                   "admissionReviewVersions": ["v1"], "sideEffects": "None"}]}),
            vec![
                ("/webhooks/0/failurePolicy", json!("Fail")),
                ("/webhooks/0/matchPolicy", json!("Equivalent")),
                ("/webhooks/0/timeoutSeconds", json!(10)),
                ("/webhooks/0/namespaceSelector", json!({})),
                ("/webhooks/0/objectSelector", json!({})),
                ("/webhooks/0/rules/0/scope", json!("*")),
                ("/webhooks/0/clientConfig/service/port", json!(443)),
                ("/webhooks/0/reinvocationPolicy", Value::Null),
            ],
        ),
        (
            "MutatingWebhookConfiguration",
            json!({"metadata": cluster, "webhooks": [{"name": "mutate.example.com",
                   "clientConfig": {"url": "https://example.com/m"},
                   "admissionReviewVersions": ["v1"], "sideEffects": "None"}]}),
            vec![
                ("/webhooks/0/failurePolicy", json!("Fail")),
                ("/webhooks/0/reinvocationPolicy", json!("Never")),
                ("/webhooks/0/timeoutSeconds", json!(10)),
            ],
        ),
        (
            "ValidatingAdmissionPolicy",
            json!({"metadata": cluster, "spec": {"matchConstraints": {"resourceRules": [
                {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE"],
                 "resources": ["deployments"]}]},
                   "validations": [{"expression": "object.spec.replicas <= 5"}]}}),
            vec![
                ("/spec/failurePolicy", json!("Fail")),
                ("/spec/matchConstraints/matchPolicy", json!("Equivalent")),
                ("/spec/matchConstraints/resourceRules/0/scope", json!("*")),
            ],
        ),
        (
            "ValidatingAdmissionPolicyBinding",
            json!({"metadata": cluster, "spec": {"policyName": "p",
                   "validationActions": ["Deny"]}}),
            vec![],
        ),
        (
            "PriorityClass",
            json!({"metadata": cluster, "value": 1000}),
            vec![("/preemptionPolicy", json!("PreemptLowerPriority"))],
        ),
        (
            "RuntimeClass",
            json!({"metadata": {"name": "wasmtime"}, "handler": "wasmtime"}),
            vec![],
        ),
        (
            "CertificateSigningRequest",
            json!({"metadata": cluster, "spec": {"request": "UkVRVUVTVA==",
                   "signerName": "example.com/signer", "usages": ["digital signature"]}}),
            vec![],
        ),
    ]
}

fn stored() -> impl Iterator<Item = &'static Resource> {
    RESOURCES.iter().filter(|r| !r.create_only)
}

fn resource(kind: &str) -> &'static Resource {
    stored()
        .find(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("{kind} is not served"))
}

#[test]
fn every_stored_kind_has_a_row() {
    let rows = rows();
    let missing: Vec<&str> = stored()
        .map(|r| r.kind)
        .filter(|k| !rows.iter().any(|(kind, _, _)| kind == k))
        .collect();
    assert!(missing.is_empty(), "kinds with no row: {missing:?}");
}

#[test]
fn minimal_objects_decode_default_and_validate() {
    for (kind, mut obj, want) in rows() {
        let r = resource(kind);
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(kind);
        validation::decode(r, &obj, true).unwrap_or_else(|e| panic!("{kind}: {}", e.message));
        defaults::apply(kind, &mut obj);
        for (at, value) in want {
            let got = obj.pointer(at);
            if value.is_null() {
                assert!(got.is_none(), "{kind}: {at} should be unset, is {got:?}");
            } else {
                assert_eq!(got, Some(&value), "{kind}: {at}");
            }
        }
        // The defaulted object is still of its type, and valid.
        validation::decode(r, &obj, true)
            .unwrap_or_else(|e| panic!("{kind} after defaults: {}", e.message));
        validation::validate(r, &obj).unwrap_or_else(|e| panic!("{kind}: {}", e.message));
        let cells = table::row(kind, &obj, 0);
        assert_eq!(cells.len(), table::columns(kind).len(), "{kind}: row width");
    }
}

#[test]
fn every_row_names_its_type_and_singular() {
    for r in RESOURCES {
        assert!(r.wire.is_some(), "{} has no wire type", r.kind);
        assert_eq!(r.singular, r.kind.to_ascii_lowercase(), "{}", r.kind);
    }
    assert_eq!(
        skiff_api::resources::group_version("autoscaling"),
        Some("v2")
    );
    assert_eq!(
        Resource::lookup("hpa").map(|r| r.api_version()),
        Some("autoscaling/v2".to_string())
    );
    assert_eq!(Resource::lookup("pc").unwrap().kind, "PriorityClass");
    assert!(!Resource::lookup("runtimeclasses").unwrap().namespaced);
}

/// A bad object of each new kind is refused with Kubernetes' words.
#[test]
fn new_kinds_refuse_what_kubernetes_refuses() {
    let bad = [
        (
            "Ingress",
            json!({"metadata": {"name": "bad", "namespace": "default"}, "spec": {"rules": [{"http": {"paths": [
                {"path": "/", "backend": {"service": {"name": "s", "port": {"number": 80}}}}]}}]}}),
            "spec.rules[0].http.paths[0].pathType: Required value: pathType must be specified",
        ),
        (
            "Ingress",
            json!({"metadata": {"name": "bad", "namespace": "default"}, "spec": {"rules": [{"http": {"paths": [
                {"path": "api", "pathType": "Prefix",
                 "backend": {"service": {"name": "s", "port": {"number": 80}}}}]}}]}}),
            "spec.rules[0].http.paths[0].path: Invalid value: \"api\": must be an absolute path",
        ),
        (
            "PriorityClass",
            json!({"metadata": {"name": "bad"}, "value": 2_000_000_000}),
            "value: Forbidden: maximum allowed value of a user defined priority is 1000000000",
        ),
        (
            "PriorityClass",
            json!({"metadata": {"name": "system-mine"}, "value": 10}),
            "metadata.name: Forbidden: priority class names with 'system-' prefix are reserved for system use only",
        ),
        (
            "HorizontalPodAutoscaler",
            json!({"metadata": {"name": "bad", "namespace": "default"}, "spec": {"minReplicas": 5,
                   "maxReplicas": 3, "scaleTargetRef": {"kind": "Deployment", "name": "d"}}}),
            "spec.maxReplicas: Invalid value: 3: must be greater than or equal to `minReplicas`",
        ),
        (
            "RuntimeClass",
            json!({"metadata": {"name": "bad"}, "handler": "Not_A_Label"}),
            "handler: Invalid value: \"Not_A_Label\"",
        ),
    ];
    for (kind, mut obj, want) in bad {
        let r = resource(kind);
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(kind);
        let e = validation::decode(r, &obj, true)
            .and_then(|()| {
                defaults::apply(kind, &mut obj);
                validation::validate(r, &obj)
            })
            .expect_err(kind);
        assert_eq!(e.code, 422, "{kind}: {}", e.message);
        assert!(
            e.message.starts_with(&format!(
                "{kind} \"{}\" is invalid: ",
                obj["metadata"]["name"].as_str().unwrap()
            )),
            "{}",
            e.message
        );
        assert!(e.message.contains(want), "{kind}: {}", e.message);
    }
}
