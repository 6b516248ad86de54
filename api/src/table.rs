//! Human-readable columns per kind, as `kubectl get` prints them. The API server serves them
//! as `meta.k8s.io/v1` Tables; the skiff CLI prints the same rows.

use serde_json::{json, Value};

use crate::meta;

/// One column: its header, and whether it only shows with `-o wide`.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub wide: bool,
}

const fn col(name: &'static str) -> Column {
    Column { name, wide: false }
}
const fn wide(name: &'static str) -> Column {
    Column { name, wide: true }
}

/// Columns of a kind (the first is always NAME).
pub fn columns(kind: &str) -> Vec<Column> {
    match kind {
        "Pod" => vec![
            col("NAME"),
            col("READY"),
            col("STATUS"),
            col("RESTARTS"),
            col("AGE"),
            wide("IP"),
            wide("NODE"),
            wide("NOMINATED NODE"),
            wide("READINESS GATES"),
        ],
        "Deployment" => vec![
            col("NAME"),
            col("READY"),
            col("UP-TO-DATE"),
            col("AVAILABLE"),
            col("AGE"),
            wide("CONTAINERS"),
            wide("IMAGES"),
            wide("SELECTOR"),
        ],
        "ReplicaSet" => vec![
            col("NAME"),
            col("DESIRED"),
            col("CURRENT"),
            col("READY"),
            col("AGE"),
            wide("CONTAINERS"),
            wide("IMAGES"),
            wide("SELECTOR"),
        ],
        "DaemonSet" => vec![
            col("NAME"),
            col("DESIRED"),
            col("CURRENT"),
            col("READY"),
            col("UP-TO-DATE"),
            col("AVAILABLE"),
            col("NODE SELECTOR"),
            col("AGE"),
            wide("CONTAINERS"),
            wide("IMAGES"),
            wide("SELECTOR"),
        ],
        "ControllerRevision" => vec![col("NAME"), col("CONTROLLER"), col("REVISION"), col("AGE")],
        "Service" => vec![
            col("NAME"),
            col("TYPE"),
            col("CLUSTER-IP"),
            col("EXTERNAL-IP"),
            col("PORT(S)"),
            col("AGE"),
            wide("SELECTOR"),
        ],
        "Endpoints" => vec![col("NAME"), col("ENDPOINTS"), col("AGE")],
        "EndpointSlice" => vec![
            col("NAME"),
            col("ADDRESSTYPE"),
            col("PORTS"),
            col("ENDPOINTS"),
            col("AGE"),
        ],
        "Node" => vec![
            col("NAME"),
            col("STATUS"),
            col("ROLES"),
            col("AGE"),
            col("VERSION"),
            wide("INTERNAL-IP"),
            wide("EXTERNAL-IP"),
            wide("OS-IMAGE"),
            wide("KERNEL-VERSION"),
            wide("CONTAINER-RUNTIME"),
        ],
        "Namespace" => vec![col("NAME"), col("STATUS"), col("AGE")],
        "Event" => vec![
            col("LAST SEEN"),
            col("TYPE"),
            col("REASON"),
            col("OBJECT"),
            col("MESSAGE"),
        ],
        "ConfigMap" => vec![col("NAME"), col("DATA"), col("AGE")],
        "Lease" => vec![col("NAME"), col("HOLDER"), col("AGE")],
        "PodDisruptionBudget" => vec![
            col("NAME"),
            col("MIN AVAILABLE"),
            col("MAX UNAVAILABLE"),
            col("ALLOWED DISRUPTIONS"),
            col("AGE"),
        ],
        "StatefulSet" => vec![
            col("NAME"),
            col("READY"),
            col("AGE"),
            wide("CONTAINERS"),
            wide("IMAGES"),
        ],
        "PersistentVolumeClaim" => vec![
            col("NAME"),
            col("STATUS"),
            col("VOLUME"),
            col("CAPACITY"),
            col("ACCESS MODES"),
            col("STORAGECLASS"),
            col("VOLUMEATTRIBUTESCLASS"),
            col("AGE"),
            wide("VOLUMEMODE"),
        ],
        "PersistentVolume" => vec![
            col("NAME"),
            col("CAPACITY"),
            col("ACCESS MODES"),
            col("RECLAIM POLICY"),
            col("STATUS"),
            col("CLAIM"),
            col("STORAGECLASS"),
            col("VOLUMEATTRIBUTESCLASS"),
            col("REASON"),
            col("AGE"),
            wide("VOLUMEMODE"),
        ],
        "StorageClass" => vec![
            col("NAME"),
            col("PROVISIONER"),
            col("RECLAIMPOLICY"),
            col("VOLUMEBINDINGMODE"),
            col("ALLOWVOLUMEEXPANSION"),
            col("AGE"),
        ],
        "Role" | "ClusterRole" => vec![col("NAME"), col("CREATED AT")],
        "RoleBinding" | "ClusterRoleBinding" => vec![
            col("NAME"),
            col("ROLE"),
            col("AGE"),
            wide("USERS"),
            wide("GROUPS"),
            wide("SERVICEACCOUNTS"),
        ],
        "Job" => vec![
            col("NAME"),
            col("STATUS"),
            col("COMPLETIONS"),
            col("DURATION"),
            col("AGE"),
        ],
        "CronJob" => vec![
            col("NAME"),
            col("SCHEDULE"),
            col("TIMEZONE"),
            col("SUSPEND"),
            col("ACTIVE"),
            col("LAST SCHEDULE"),
            col("AGE"),
        ],
        "Ingress" => vec![
            col("NAME"),
            col("CLASS"),
            col("HOSTS"),
            col("ADDRESS"),
            col("PORTS"),
            col("AGE"),
        ],
        "IngressClass" => vec![
            col("NAME"),
            col("CONTROLLER"),
            col("PARAMETERS"),
            col("AGE"),
        ],
        "NetworkPolicy" => vec![col("NAME"), col("POD-SELECTOR"), col("AGE")],
        "HorizontalPodAutoscaler" => vec![
            col("NAME"),
            col("REFERENCE"),
            col("TARGETS"),
            col("MINPODS"),
            col("MAXPODS"),
            col("REPLICAS"),
            col("AGE"),
        ],
        "PriorityClass" => vec![
            col("NAME"),
            col("VALUE"),
            col("GLOBAL-DEFAULT"),
            col("AGE"),
            col("PREEMPTIONPOLICY"),
        ],
        "RuntimeClass" => vec![col("NAME"), col("HANDLER"), col("AGE")],
        "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration" => {
            vec![col("NAME"), col("WEBHOOKS"), col("AGE")]
        }
        "ValidatingAdmissionPolicy" => vec![
            col("NAME"),
            col("VALIDATIONS"),
            col("PARAMKIND"),
            col("AGE"),
        ],
        "ValidatingAdmissionPolicyBinding" => {
            vec![col("NAME"), col("POLICYNAME"), col("PARAMREF"), col("AGE")]
        }
        "CSIDriver" => vec![
            col("NAME"),
            col("ATTACHREQUIRED"),
            col("PODINFOONMOUNT"),
            col("STORAGECAPACITY"),
            col("TOKENREQUESTS"),
            col("REQUIRESREPUBLISH"),
            col("MODES"),
            col("AGE"),
        ],
        "CSINode" => vec![col("NAME"), col("DRIVERS"), col("AGE")],
        "VolumeAttachment" => vec![
            col("NAME"),
            col("ATTACHER"),
            col("PV"),
            col("NODE"),
            col("ATTACHED"),
            col("AGE"),
        ],
        "CSIStorageCapacity" => vec![
            col("NAME"),
            col("STORAGECLASSNAME"),
            col("CAPACITY"),
            col("AGE"),
        ],
        "ResourceQuota" => vec![col("NAME"), col("AGE"), col("REQUEST"), col("LIMIT")],
        "LimitRange" => vec![col("NAME"), col("CREATED AT")],
        "PodTemplate" => vec![
            col("NAME"),
            col("CONTAINERS"),
            col("IMAGES"),
            col("POD LABELS"),
        ],
        "ReplicationController" => vec![
            col("NAME"),
            col("DESIRED"),
            col("CURRENT"),
            col("READY"),
            col("AGE"),
            wide("CONTAINERS"),
            wide("IMAGES"),
            wide("SELECTOR"),
        ],
        "CertificateSigningRequest" => vec![
            col("NAME"),
            col("AGE"),
            col("SIGNERNAME"),
            col("REQUESTOR"),
            col("REQUESTEDDURATION"),
            col("CONDITION"),
        ],
        _ => vec![col("NAME"), col("AGE")],
    }
}

/// Age like kubectl prints it (`5s`, `3m12s`, `4h`, `2d`), from an RFC 3339 timestamp.
pub fn age(ts: Option<&str>, now_unix: i64) -> String {
    let Some(t) = ts.and_then(parse_rfc3339) else {
        return "<unknown>".into();
    };
    let s = (now_unix - t).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=599 => format!("{}m{}s", s / 60, s % 60),
        600..=10799 => format!("{}m", s / 60),
        10800..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se)
}

fn s(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

fn i(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_i64).unwrap_or(0)
}

fn or_unset(v: String) -> String {
    if v.is_empty() {
        "<unset>".into()
    } else {
        v
    }
}

/// `RWO,ROX` as kubectl abbreviates access modes.
fn access_modes(v: Option<&Value>) -> String {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn or_none(v: String) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v
    }
}

fn selector_string(v: Option<&Value>) -> String {
    let Some(v) = v else { return "<none>".into() };
    let map = if let Some(ml) = v.get("matchLabels") {
        ml
    } else {
        v
    };
    let parts: Vec<String> = meta::string_map(Some(map))
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    or_none(parts.join(","))
}

fn containers_and_images(spec: Option<&Value>) -> (String, String) {
    let cs = spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = cs.iter().map(|c| s(c.get("name"))).collect();
    let images: Vec<String> = cs.iter().map(|c| s(c.get("image"))).collect();
    (names.join(","), images.join(","))
}

/// The pod's STATUS column: a waiting/terminated reason of a container wins over the phase.
pub fn pod_status(pod: &Value) -> String {
    if meta::is_deleting(pod) {
        return "Terminating".into();
    }
    let mut reason = s(pod.pointer("/status/reason"));
    if reason.is_empty() {
        reason = s(pod.pointer("/status/phase"));
    }
    for c in pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
            if !r.is_empty() && r != "ContainerCreating" || reason == "Pending" {
                reason = r.to_string();
            }
        } else if let Some(r) = c
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str)
        {
            if reason == "Running" {
                reason = r.to_string();
            }
        }
    }
    if reason.is_empty() {
        "Pending".into()
    } else {
        reason
    }
}

/// The cells of one row, matching [`columns`].
pub fn row(kind: &str, o: &Value, now_unix: i64) -> Vec<String> {
    let name = meta::name(o).to_string();
    let age = age(
        o.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str),
        now_unix,
    );
    match kind {
        "Pod" => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses.iter().map(|c| i(c.get("restartCount"))).sum();
            vec![
                name,
                format!("{ready}/{total}"),
                pod_status(o),
                restarts.to_string(),
                age,
                or_none(s(o.pointer("/status/podIP"))),
                or_none(s(o.pointer("/spec/nodeName"))),
                "<none>".into(),
                "<none>".into(),
            ]
        }
        "Deployment" => {
            let (c, im) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                format!(
                    "{}/{}",
                    i(o.pointer("/status/readyReplicas")),
                    i(o.pointer("/spec/replicas"))
                ),
                i(o.pointer("/status/updatedReplicas")).to_string(),
                i(o.pointer("/status/availableReplicas")).to_string(),
                age,
                c,
                im,
                selector_string(o.pointer("/spec/selector")),
            ]
        }
        "ReplicaSet" => {
            let (c, im) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                i(o.pointer("/spec/replicas")).to_string(),
                i(o.pointer("/status/replicas")).to_string(),
                i(o.pointer("/status/readyReplicas")).to_string(),
                age,
                c,
                im,
                selector_string(o.pointer("/spec/selector")),
            ]
        }
        "DaemonSet" => {
            let (c, im) = containers_and_images(o.pointer("/spec/template/spec"));
            let node_selector: Vec<String> =
                meta::string_map(o.pointer("/spec/template/spec/nodeSelector"))
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
            vec![
                name,
                i(o.pointer("/status/desiredNumberScheduled")).to_string(),
                i(o.pointer("/status/currentNumberScheduled")).to_string(),
                i(o.pointer("/status/numberReady")).to_string(),
                i(o.pointer("/status/updatedNumberScheduled")).to_string(),
                i(o.pointer("/status/numberAvailable")).to_string(),
                or_none(node_selector.join(",")),
                age,
                c,
                im,
                selector_string(o.pointer("/spec/selector")),
            ]
        }
        "ControllerRevision" => {
            let controller = o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .and_then(|refs| refs.iter().find(|r| r["controller"] == true))
                .map(|r| {
                    let api = s(r.get("apiVersion"));
                    let group = api
                        .rsplit_once('/')
                        .map(|(g, _)| format!(".{g}"))
                        .unwrap_or_default();
                    format!(
                        "{}{group}/{}",
                        s(r.get("kind")).to_lowercase(),
                        s(r.get("name"))
                    )
                })
                .unwrap_or_else(|| "<none>".into());
            vec![name, controller, i(o.get("revision")).to_string(), age]
        }
        "Service" => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| match p.get("nodePort") {
                    Some(np) => format!("{}:{}/{}", i(p.get("port")), np, s(p.get("protocol"))),
                    None => format!("{}/{}", i(p.get("port")), s(p.get("protocol"))),
                })
                .collect();
            let ingress: Vec<String> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|g| s(g.get("ip")))
                .collect();
            let ty = s(o.pointer("/spec/type"));
            let external = if !ingress.is_empty() {
                ingress.join(",")
            } else if ty == "LoadBalancer" {
                "<pending>".into()
            } else {
                "<none>".into()
            };
            vec![
                name,
                ty,
                or_none(s(o.pointer("/spec/clusterIP"))),
                external,
                or_none(ports.join(",")),
                age,
                selector_string(o.pointer("/spec/selector")),
            ]
        }
        "Endpoints" => {
            let mut eps = Vec::new();
            for sub in o
                .get("subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for a in sub
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    for p in sub
                        .get("ports")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        eps.push(format!("{}:{}", s(a.get("ip")), i(p.get("port"))));
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            vec![name, or_none(shown), age]
        }
        "EndpointSlice" => {
            // As kubectl's printer: at most three, then a count of the rest.
            let list = |items: Vec<String>| match items.len() {
                0 => "<unset>".to_string(),
                n if n > 3 => format!("{} + {} more...", items[..3].join(","), n - 3),
                _ => items.join(","),
            };
            let arr = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
            let ports = arr(o.get("ports"))
                .iter()
                .map(|p| match p.get("port") {
                    Some(n) => n.to_string(),
                    None => "<unset>".into(),
                })
                .collect();
            let addrs = arr(o.get("endpoints"))
                .iter()
                .flat_map(|e| arr(e.get("addresses")))
                .map(|a| s(Some(&a)))
                .collect();
            vec![name, s(o.get("addressType")), list(ports), list(addrs), age]
        }
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            let status = if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
                format!("{ready},SchedulingDisabled")
            } else {
                ready.to_string()
            };
            let roles: Vec<String> = meta::labels(o)
                .keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/").map(String::from))
                .collect();
            let addr = |t: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|x| x["type"] == t))
                    .map(|x| s(x.get("address")))
                    .unwrap_or_else(|| "<none>".into())
            };
            vec![
                name,
                status,
                or_none(roles.join(",")),
                age,
                s(o.pointer("/status/nodeInfo/kubeletVersion")),
                addr("InternalIP"),
                addr("ExternalIP"),
                s(o.pointer("/status/nodeInfo/osImage")),
                s(o.pointer("/status/nodeInfo/kernelVersion")),
                s(o.pointer("/status/nodeInfo/containerRuntimeVersion")),
            ]
        }
        "Namespace" => vec![name, s(o.pointer("/status/phase")), age],
        "Event" => {
            // The core shape, or events.k8s.io's (`deprecatedLastTimestamp`, `regarding`, `note`).
            let last = o
                .get("lastTimestamp")
                .or(o.get("deprecatedLastTimestamp"))
                .and_then(Value::as_str)
                .or(o.get("eventTime").and_then(Value::as_str))
                .or(o
                    .pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str));
            vec![
                self::age(last, now_unix),
                s(o.get("type")),
                s(o.get("reason")),
                format!(
                    "{}/{}",
                    s(o.pointer("/involvedObject/kind")
                        .or(o.pointer("/regarding/kind")))
                    .to_lowercase(),
                    s(o.pointer("/involvedObject/name")
                        .or(o.pointer("/regarding/name")))
                ),
                s(o.get("message").or(o.get("note"))),
            ]
        }
        "ConfigMap" => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![name, n.to_string(), age]
        }
        "Lease" => vec![name, s(o.pointer("/spec/holderIdentity")), age],
        "StatefulSet" => {
            let (c, im) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                format!(
                    "{}/{}",
                    i(o.pointer("/status/readyReplicas")),
                    i(o.pointer("/spec/replicas"))
                ),
                age,
                c,
                im,
            ]
        }
        "PersistentVolumeClaim" => {
            let bound = o.pointer("/status/phase").and_then(Value::as_str) == Some("Bound");
            let (cap, modes) = if bound {
                (
                    s(o.pointer("/status/capacity/storage")),
                    access_modes(o.pointer("/status/accessModes")),
                )
            } else {
                (String::new(), String::new())
            };
            vec![
                name,
                s(o.pointer("/status/phase")),
                s(o.pointer("/spec/volumeName")),
                cap,
                modes,
                or_unset(s(o.pointer("/spec/storageClassName"))),
                or_unset(s(o.pointer("/spec/volumeAttributesClassName"))),
                age,
                s(o.pointer("/spec/volumeMode")),
            ]
        }
        "PersistentVolume" => {
            let claim = match (
                o.pointer("/spec/claimRef/namespace")
                    .and_then(Value::as_str),
                o.pointer("/spec/claimRef/name").and_then(Value::as_str),
            ) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                _ => String::new(),
            };
            vec![
                name,
                s(o.pointer("/spec/capacity/storage")),
                access_modes(o.pointer("/spec/accessModes")),
                s(o.pointer("/spec/persistentVolumeReclaimPolicy")),
                s(o.pointer("/status/phase")),
                claim,
                s(o.pointer("/spec/storageClassName")),
                or_unset(s(o.pointer("/spec/volumeAttributesClassName"))),
                s(o.pointer("/status/reason")),
                age,
                s(o.pointer("/spec/volumeMode")),
            ]
        }
        "StorageClass" => {
            let default = meta::annotations(o)
                .get("storageclass.kubernetes.io/is-default-class")
                .is_some_and(|v| v == "true");
            vec![
                if default {
                    format!("{name} (default)")
                } else {
                    name
                },
                s(o.get("provisioner")),
                s(o.get("reclaimPolicy")),
                s(o.get("volumeBindingMode")),
                o.get("allowVolumeExpansion")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .to_string(),
                age,
            ]
        }
        "Role" | "ClusterRole" => vec![name, s(o.pointer("/metadata/creationTimestamp"))],
        "RoleBinding" | "ClusterRoleBinding" => {
            let subjects = o
                .get("subjects")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let of = |kind: &str| {
                subjects
                    .iter()
                    .filter(|x| x["kind"] == kind)
                    .map(|x| match (kind, x["namespace"].as_str()) {
                        ("ServiceAccount", Some(ns)) => format!("{ns}/{}", s(x.get("name"))),
                        _ => s(x.get("name")),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                name,
                format!(
                    "{}/{}",
                    s(o.pointer("/roleRef/kind")),
                    s(o.pointer("/roleRef/name"))
                ),
                age,
                of("User"),
                of("Group"),
                of("ServiceAccount"),
            ]
        }
        "PodDisruptionBudget" => {
            let or_na = |v: String| if v.is_empty() { "N/A".to_string() } else { v };
            vec![
                name,
                or_na(s(o.pointer("/spec/minAvailable"))),
                or_na(s(o.pointer("/spec/maxUnavailable"))),
                i(o.pointer("/status/disruptionsAllowed")).to_string(),
                age,
            ]
        }
        "Job" => {
            // As kubectl prints a Job: the condition that says most, completions as
            // `succeeded/completions` (`succeeded/1 of parallelism` for a work queue), and the
            // time from start to completion (or to now).
            let cond = |t: &str| {
                o.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
            };
            let status = if cond("Complete") {
                "Complete"
            } else if cond("Failed") {
                "Failed"
            } else if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating"
            } else if cond("SuccessCriteriaMet") {
                "SuccessCriteriaMet"
            } else if cond("Suspended") {
                "Suspended"
            } else if cond("FailureTarget") {
                "FailureTarget"
            } else {
                "Running"
            };
            let succeeded = i(o.pointer("/status/succeeded"));
            let completions = match o.pointer("/spec/completions").and_then(Value::as_i64) {
                Some(c) => format!("{succeeded}/{c}"),
                None => match o.pointer("/spec/parallelism").and_then(Value::as_i64) {
                    Some(p) if p > 1 => format!("{succeeded}/1 of {p}"),
                    _ => format!("{succeeded}/1"),
                },
            };
            let start = o.pointer("/status/startTime").and_then(Value::as_str);
            let end = o
                .pointer("/status/completionTime")
                .and_then(Value::as_str)
                .and_then(parse_rfc3339)
                .unwrap_or(now_unix);
            let duration = if start.is_some() {
                self::age(start, end)
            } else {
                String::new()
            };
            vec![name, status.into(), completions, duration, age]
        }
        "CronJob" => {
            let or_none = |v: String| {
                if v.is_empty() {
                    "<none>".to_string()
                } else {
                    v
                }
            };
            let active = o
                .pointer("/status/active")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let last = o
                .pointer("/status/lastScheduleTime")
                .and_then(Value::as_str);
            vec![
                name,
                s(o.pointer("/spec/schedule")),
                or_none(s(o.pointer("/spec/timeZone"))),
                (o.pointer("/spec/suspend") == Some(&Value::Bool(true))).to_string(),
                active.to_string(),
                if last.is_some() {
                    self::age(last, now_unix)
                } else {
                    "<none>".into()
                },
                age,
            ]
        }
        "Ingress" => {
            let rules = o.pointer("/spec/rules").and_then(Value::as_array);
            let hosts: Vec<String> = rules
                .into_iter()
                .flatten()
                .filter_map(|r| r.get("host").and_then(Value::as_str))
                .map(String::from)
                .collect();
            let address: Vec<String> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|g| {
                    let ip = s(g.get("ip"));
                    if ip.is_empty() {
                        s(g.get("hostname"))
                    } else {
                        ip
                    }
                })
                .collect();
            let tls = o
                .pointer("/spec/tls")
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty());
            vec![
                name,
                or_none(s(o.pointer("/spec/ingressClassName"))),
                if hosts.is_empty() {
                    "*".into()
                } else {
                    hosts.join(",")
                },
                address.join(","),
                if tls { "80, 443" } else { "80" }.into(),
                age,
            ]
        }
        "IngressClass" => {
            let parameters = match o.pointer("/spec/parameters") {
                Some(p) => {
                    let group = s(p.get("apiGroup"));
                    let kind = if group.is_empty() {
                        s(p.get("kind"))
                    } else {
                        format!("{}.{group}", s(p.get("kind")))
                    };
                    format!("{kind}/{}", s(p.get("name")))
                }
                None => "<none>".into(),
            };
            vec![name, s(o.pointer("/spec/controller")), parameters, age]
        }
        "NetworkPolicy" => vec![name, selector_string(o.pointer("/spec/podSelector")), age],
        "HorizontalPodAutoscaler" => {
            let target = format!(
                "{}/{}",
                s(o.pointer("/spec/scaleTargetRef/kind")),
                s(o.pointer("/spec/scaleTargetRef/name"))
            );
            let current = o
                .pointer("/status/currentMetrics")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let targets: Vec<String> = o
                .pointer("/spec/metrics")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(n, m)| hpa_target(m, current.get(n)))
                .collect();
            vec![
                name,
                target,
                if targets.is_empty() {
                    "<none>".into()
                } else {
                    targets.join(", ")
                },
                o.pointer("/spec/minReplicas")
                    .and_then(Value::as_i64)
                    .map_or("<unset>".into(), |m| m.to_string()),
                i(o.pointer("/spec/maxReplicas")).to_string(),
                i(o.pointer("/status/currentReplicas")).to_string(),
                age,
            ]
        }
        "PriorityClass" => vec![
            name,
            i(o.get("value")).to_string(),
            (o.get("globalDefault") == Some(&Value::Bool(true))).to_string(),
            age,
            s(o.get("preemptionPolicy")),
        ],
        "RuntimeClass" => vec![name, s(o.get("handler")), age],
        "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration" => {
            let n = o
                .get("webhooks")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            vec![name, n.to_string(), age]
        }
        "ValidatingAdmissionPolicy" => {
            let n = o
                .pointer("/spec/validations")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let param = match o.pointer("/spec/paramKind") {
                Some(p) => format!("{}/{}", s(p.get("apiVersion")), s(p.get("kind"))),
                None => "<unset>".into(),
            };
            vec![name, n.to_string(), param, age]
        }
        "ValidatingAdmissionPolicyBinding" => {
            let param = match o.pointer("/spec/paramRef") {
                Some(p) if p.get("namespace").is_some() => {
                    format!("{}/{}", s(p.get("namespace")), s(p.get("name")))
                }
                Some(p) => or_unset(s(p.get("name"))),
                None => "<unset>".into(),
            };
            vec![name, s(o.pointer("/spec/policyName")), param, age]
        }
        "CSIDriver" => {
            let b = |k: &str| {
                (o.pointer(&format!("/spec/{k}")) == Some(&Value::Bool(true))).to_string()
            };
            let tokens: Vec<String> = o
                .pointer("/spec/tokenRequests")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|t| s(t.get("audience")))
                .collect();
            let modes: Vec<String> = o
                .pointer("/spec/volumeLifecycleModes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|m| s(Some(m)))
                .collect();
            vec![
                name,
                b("attachRequired"),
                b("podInfoOnMount"),
                b("storageCapacity"),
                or_unset(tokens.join(",")),
                b("requiresRepublish"),
                modes.join(","),
                age,
            ]
        }
        "CSINode" => {
            let n = o
                .pointer("/spec/drivers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            vec![name, n.to_string(), age]
        }
        "VolumeAttachment" => vec![
            name,
            s(o.pointer("/spec/attacher")),
            s(o.pointer("/spec/source/persistentVolumeName")),
            s(o.pointer("/spec/nodeName")),
            (o.pointer("/status/attached") == Some(&Value::Bool(true))).to_string(),
            age,
        ],
        "CSIStorageCapacity" => vec![
            name,
            s(o.get("storageClassName")),
            s(o.get("capacity")),
            age,
        ],
        "ResourceQuota" => {
            // As kubectl: `resource: used/hard`, limits apart from the rest.
            let hard = meta::string_map(o.pointer("/status/hard").or(o.pointer("/spec/hard")));
            let used = meta::string_map(o.pointer("/status/used"));
            let (mut request, mut limit) = (Vec::new(), Vec::new());
            for (k, h) in &hard {
                let u = used.get(k).map_or("0", String::as_str);
                let cell = format!("{k}: {u}/{h}");
                if k.starts_with("limits.") {
                    limit.push(cell);
                } else {
                    request.push(cell);
                }
            }
            vec![name, age, request.join(", "), limit.join(", ")]
        }
        "LimitRange" => vec![name, s(o.pointer("/metadata/creationTimestamp"))],
        "PodTemplate" => {
            let (c, im) = containers_and_images(o.pointer("/template/spec"));
            let labels: Vec<String> = meta::string_map(o.pointer("/template/metadata/labels"))
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            vec![name, c, im, or_none(labels.join(","))]
        }
        "ReplicationController" => {
            let (c, im) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                i(o.pointer("/spec/replicas")).to_string(),
                i(o.pointer("/status/replicas")).to_string(),
                i(o.pointer("/status/readyReplicas")).to_string(),
                age,
                c,
                im,
                selector_string(o.pointer("/spec/selector")),
            ]
        }
        "CertificateSigningRequest" => {
            let conds: Vec<String> = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|c| s(c.get("type")))
                .collect();
            let duration = o
                .pointer("/spec/expirationSeconds")
                .and_then(Value::as_i64)
                .map_or("<none>".into(), |d| {
                    self::age(Some("1970-01-01T00:00:00Z"), d)
                });
            vec![
                name,
                age,
                s(o.pointer("/spec/signerName")),
                s(o.pointer("/spec/username")),
                duration,
                if conds.is_empty() {
                    "Pending".into()
                } else {
                    conds.join(",")
                },
            ]
        }
        _ => vec![name, age],
    }
}

/// One metric of an HPA's TARGETS column: `cpu: 40%/80%`, `<unknown>` before it is measured.
fn hpa_target(m: &Value, current: Option<&Value>) -> String {
    let ty = s(m.get("type"));
    let source = match ty.as_str() {
        "Resource" => m.get("resource"),
        "ContainerResource" => m.get("containerResource"),
        "Pods" => m.get("pods"),
        "Object" => m.get("object"),
        "External" => m.get("external"),
        _ => None,
    };
    let Some(source) = source else {
        return "<unknown>".into();
    };
    let key = match ty.as_str() {
        "Resource" => "resource",
        "ContainerResource" => "containerResource",
        "Pods" => "pods",
        "Object" => "object",
        _ => "external",
    };
    let cur = current
        .and_then(|c| c.get(key))
        .and_then(|c| c.get("current"));
    let target = source.get("target");
    let (want, have) = match target.and_then(|t| t.get("averageUtilization")) {
        Some(u) => (
            format!("{u}%"),
            cur.and_then(|c| c.get("averageUtilization"))
                .map_or("<unknown>".into(), |c| format!("{c}%")),
        ),
        None => {
            let field = if target.and_then(|t| t.get("averageValue")).is_some() {
                "averageValue"
            } else {
                "value"
            };
            (
                s(target.and_then(|t| t.get(field))),
                cur.and_then(|c| c.get(field))
                    .map_or("<unknown>".into(), |c| s(Some(c))),
            )
        }
    };
    let label = source
        .get("name")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| {
            source
                .pointer("/metric/name")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_default();
    format!("{label}: {have}/{want}")
}

/// A `meta.k8s.io/v1` Table of `objects` (each row carries its full object).
pub fn to_table(kind: &str, objects: &[Value], resource_version: &str, now_unix: i64) -> Value {
    let cols = columns(kind);
    let defs: Vec<Value> = cols
        .iter()
        .enumerate()
        .map(|(n, c)| {
            json!({"name": title(c.name), "type": "string", "format": if n == 0 { "name" } else { "" },
                   "description": c.name, "priority": if c.wide { 1 } else { 0 }})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| json!({"cells": row(kind, o, now_unix), "object": o}))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

/// `UP-TO-DATE` → `Up-to-date`: kubectl upper-cases Table column names itself.
fn title(h: &str) -> String {
    let lower = h.to_lowercase();
    let mut c = lower.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_timestamps() {
        let t = parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
        assert_eq!(t, 1_704_067_200);
        assert_eq!(age(Some("2024-01-01T00:00:00Z"), t + 5), "5s");
        assert_eq!(age(Some("2024-01-01T00:00:00Z"), t + 200), "3m20s");
        assert_eq!(age(Some("2024-01-01T00:00:00Z"), t + 3 * 86400), "3d");
    }

    #[test]
    fn rows_match_columns() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.88.0.2",
                       "containerStatuses": [{"ready": true, "restartCount": 2, "state": {"running": {}}}]}});
        let r = row("Pod", &pod, 0);
        assert_eq!(r.len(), columns("Pod").len());
        assert_eq!(&r[..4], &["p", "1/1", "Running", "2"]);
        let svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.5",
            "ports": [{"port": 8080, "nodePort": 31000, "protocol": "TCP"}]}});
        let r = row("Service", &svc, 0);
        assert_eq!(
            &r[1..5],
            &["NodePort", "10.96.0.5", "<none>", "8080:31000/TCP"]
        );
        let crash = json!({"metadata": {"name": "c"}, "status": {"phase": "Running",
            "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        assert_eq!(pod_status(&crash), "CrashLoopBackOff");
        let lease = json!({"metadata": {"name": "n1"}, "spec": {"holderIdentity": "n1"}});
        let r = row("Lease", &lease, 0);
        assert_eq!(r.len(), columns("Lease").len());
        assert_eq!(&r[..2], &["n1", "n1"]);
        let ds = json!({"metadata": {"name": "agent"}, "spec": {"selector": {"matchLabels": {"app": "a"}},
            "template": {"spec": {"nodeSelector": {"disk": "ssd"}, "containers": [{"name": "c", "image": "i"}]}}},
            "status": {"desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberReady": 2,
                       "updatedNumberScheduled": 1, "numberAvailable": 2}});
        let r = row("DaemonSet", &ds, 0);
        assert_eq!(r.len(), columns("DaemonSet").len());
        assert_eq!(&r[..7], &["agent", "3", "3", "2", "1", "2", "disk=ssd"]);
        let rev = json!({"metadata": {"name": "agent-5d8f", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "u", "controller": true}]},
            "revision": 2, "data": {}});
        let r = row("ControllerRevision", &rev, 0);
        assert_eq!(r.len(), columns("ControllerRevision").len());
        assert_eq!(&r[..3], &["agent-5d8f", "daemonset.apps/agent", "2"]);
        let rb = json!({"metadata": {"name": "read", "namespace": "a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "User", "name": "alice"}, {"kind": "Group", "name": "dev"},
                         {"kind": "ServiceAccount", "name": "sa", "namespace": "a"}]});
        let r = row("RoleBinding", &rb, 0);
        assert_eq!(r.len(), columns("RoleBinding").len());
        assert_eq!(r[1], "Role/reader");
        assert_eq!(&r[3..], &["alice", "dev", "a/sa"]);
    }

    #[test]
    fn job_and_cronjob_rows() {
        let t = parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
        let job = json!({"metadata": {"name": "pi", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"completions": 4, "parallelism": 2},
            "status": {"succeeded": 4, "startTime": "2024-01-01T00:00:00Z",
                "completionTime": "2024-01-01T00:00:07Z",
                "conditions": [{"type": "Complete", "status": "True"}]}});
        let r = row("Job", &job, t + 60);
        assert_eq!(r.len(), columns("Job").len());
        assert_eq!(r, ["pi", "Complete", "4/4", "7s", "60s"]);
        let running = json!({"metadata": {"name": "q"}, "spec": {"completions": 3},
            "status": {"succeeded": 1, "startTime": "2024-01-01T00:00:00Z"}});
        assert_eq!(&row("Job", &running, t + 9)[1..4], ["Running", "1/3", "9s"]);
        let cj = json!({"metadata": {"name": "tick", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"schedule": "*/1 * * * *", "suspend": false},
            "status": {"active": [{"name": "tick-1"}], "lastScheduleTime": "2024-01-01T00:01:00Z"}});
        let r = row("CronJob", &cj, t + 90);
        assert_eq!(r.len(), columns("CronJob").len());
        assert_eq!(
            r,
            ["tick", "*/1 * * * *", "<none>", "false", "1", "30s", "90s"]
        );
    }
}
