//! What the kubectl-like verbs send, built as plain objects so they can be tested without a
//! server: `create deployment`, `run`, `expose`, `set image`, `rollout status|history|undo`
//! (of Deployments, through their ReplicaSets, and of DaemonSets, through their
//! ControllerRevisions).

use serde_json::{json, Value};
use skiff_api::conditions;
use skiff_api::k8s::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use skiff_api::k8s::api::batch::v1::{CronJob, Job};
use skiff_api::k8s::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use skiff_api::{meta, POD_TEMPLATE_HASH, REVISION_ANNOTATION};

use crate::ClientError;

/// The container name kubectl derives from an image: the last path segment without tag/digest.
pub fn container_name(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    let base = last.split(['@', ':']).next().unwrap_or(last);
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    cleaned.trim_matches('-').to_string()
}

/// `create deployment NAME --image=... [--port] [--replicas]`.
pub fn deployment(name: &str, images: &[String], port: Option<i32>, replicas: i32) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .map(|img| {
            let mut c = json!({"name": container_name(img), "image": img});
            if let Some(p) = port {
                c["ports"] = json!([{"containerPort": p}]);
            }
            c
        })
        .collect();
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}},
        }
    })
}

/// The pod template of `create job` / `create cronjob`: one container named NAME running
/// `command` (kubectl puts what follows `--` in `command`).
fn job_template(name: &str, image: &str, command: &[String], restart: &str) -> Value {
    let mut c = json!({"name": name, "image": image});
    if !command.is_empty() {
        c["command"] = json!(command);
    }
    json!({"spec": {"containers": [c], "restartPolicy": restart}})
}

/// `create job NAME --image=IMG [-- CMD...]`.
pub fn job(name: &str, image: &str, command: &[String]) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": job_template(name, image, command, "Never")},
    })
}

/// `create cronjob NAME --image=IMG --schedule=S [-- CMD...]`.
pub fn cronjob(name: &str, image: &str, schedule: &str, command: &[String]) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name},
        "spec": {
            "schedule": schedule,
            "jobTemplate": {
                "metadata": {"name": name},
                "spec": {"template": job_template(name, image, command, "OnFailure")},
            },
        },
    })
}

/// `create job NAME --from=cronjob/X`: a Job from the CronJob's job template, owned by it and
/// annotated `cronjob.kubernetes.io/instantiate: manual`, as kubectl makes it.
pub fn job_from_cronjob(name: &str, cj: &CronJob) -> Job {
    let tmpl = cj.spec.job_template.clone();
    let from = tmpl.metadata.unwrap_or_default();
    let mut annotations = from.annotations.unwrap_or_default();
    annotations.insert("cronjob.kubernetes.io/instantiate".into(), "manual".into());
    Job {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(from.labels.unwrap_or_default()),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "CronJob".into(),
                name: cj.metadata.name.clone().unwrap_or_default(),
                uid: cj.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(tmpl.spec.unwrap_or_default()),
        ..Default::default()
    }
}

/// `run NAME --image [--restart] [--port] [-- args]`.
pub fn pod(
    name: &str,
    image: &str,
    restart: &str,
    port: Option<i32>,
    args: &[String],
    command: bool,
) -> Value {
    let mut c = json!({"name": name, "image": image});
    if let Some(p) = port {
        c["ports"] = json!([{"containerPort": p}]);
    }
    if !args.is_empty() {
        c[if command { "command" } else { "args" }] = json!(args);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"run": name}},
           "spec": {"containers": [c], "restartPolicy": restart}})
}

/// `expose KIND/NAME --type --port --target-port --name`: a Service selecting what `target` selects.
/// `create service KIND NAME --tcp=PORT[:TARGET]...`: a service selecting `app=NAME`.
pub fn service(
    kind: &str,
    name: &str,
    tcp: &[String],
    node_port: Option<i32>,
) -> Result<Value, ClientError> {
    let ty = match kind.to_ascii_lowercase().as_str() {
        "clusterip" => "ClusterIP",
        "nodeport" => "NodePort",
        "loadbalancer" => "LoadBalancer",
        other => {
            return Err(ClientError::Usage(format!(
                "unknown service type {other:?}: use clusterip, nodeport or loadbalancer"
            )))
        }
    };
    if node_port.is_some() && ty == "ClusterIP" {
        return Err(ClientError::Usage(
            "--node-port applies to nodeport and loadbalancer services".into(),
        ));
    }
    let mut ports = Vec::new();
    for spec in tcp {
        let (port, target) = spec.split_once(':').unwrap_or((spec, spec));
        let bad =
            || ClientError::Usage(format!("bad --tcp {spec:?}: want PORT or PORT:TARGETPORT"));
        let port: i32 = port.parse().map_err(|_| bad())?;
        let target: Value = match target.parse::<i32>() {
            Ok(n) => json!(n),
            Err(_) if !target.is_empty() => json!(target),
            Err(_) => return Err(bad()),
        };
        let mut p = json!({"name": format!("{port}-{}", target.as_i64().map(|n| n.to_string()).unwrap_or_else(|| target.as_str().unwrap_or("").to_string())),
                           "protocol": "TCP", "port": port, "targetPort": target});
        if let (Some(np), true) = (node_port, ports.is_empty()) {
            p["nodePort"] = json!(np);
        }
        ports.push(p);
    }
    Ok(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"type": ty, "selector": {"app": name}, "ports": ports},
    }))
}

pub fn expose(
    target: &Value,
    name: Option<&str>,
    ty: &str,
    port: Option<i32>,
    target_port: Option<&str>,
    node_port: Option<i32>,
) -> Result<Value, ClientError> {
    // Any of six kinds, known only from the object: read as JSON.
    let kind = target["kind"].as_str().unwrap_or("");
    let selector = match kind {
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" => target
            .pointer("/spec/selector/matchLabels")
            .cloned()
            .ok_or_else(|| {
                ClientError::Usage(format!(
                    "cannot expose {kind} {}: its selector has no matchLabels",
                    meta::name(target)
                ))
            })?,
        "Pod" => target.pointer("/metadata/labels").cloned().ok_or_else(|| {
            ClientError::Usage(format!(
                "cannot expose pod {}: it has no labels",
                meta::name(target)
            ))
        })?,
        "Service" => target
            .pointer("/spec/selector")
            .cloned()
            .unwrap_or(json!({})),
        other => return Err(ClientError::Usage(format!("cannot expose a {other}"))),
    };
    let container_ports: Vec<i64> = match kind {
        "Pod" => target.pointer("/spec/containers"),
        _ => target.pointer("/spec/template/spec/containers"),
    }
    .and_then(Value::as_array)
    .into_iter()
    .flatten()
    .flat_map(|c| {
        c.get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    })
    .filter_map(|p| p.get("containerPort").and_then(Value::as_i64))
    .collect();
    let port = match port {
        Some(p) => p as i64,
        None => *container_ports.first().ok_or_else(|| {
            ClientError::Usage(format!(
                "couldn't find port via --port flag or introspection of {}",
                meta::name(target)
            ))
        })?,
    };
    let mut sp = json!({"port": port, "protocol": "TCP"});
    sp["targetPort"] = match target_port {
        Some(t) => t
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(t)),
        None => json!(port),
    };
    if let Some(np) = node_port {
        sp["nodePort"] = json!(np);
    }
    let name = name.unwrap_or(meta::name(target));
    Ok(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": target.pointer("/metadata/labels").cloned().unwrap_or(json!({}))},
        "spec": {"type": ty, "selector": selector, "ports": [sp]},
    }))
}

/// `set image KIND/NAME c1=img1 c2=img2`: a strategic merge patch (`*` sets every container).
pub fn set_image_patch(obj: &Value, pairs: &[(String, String)]) -> Result<Value, ClientError> {
    let (path, pod) = if obj["kind"] == "Pod" {
        ("/spec/containers", false)
    } else {
        ("/spec/template/spec/containers", true)
    };
    let names: Vec<String> = obj
        .pointer(path)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let mut containers = Vec::new();
    for (c, img) in pairs {
        if c == "*" {
            containers.extend(names.iter().map(|n| json!({"name": n, "image": img})));
        } else if names.contains(c) {
            containers.push(json!({"name": c, "image": img}));
        } else {
            return Err(ClientError::Usage(format!(
                "unable to find container named \"{c}\""
            )));
        }
    }
    Ok(if pod {
        json!({"spec": {"template": {"spec": {"containers": containers}}}})
    } else {
        json!({"spec": {"containers": containers}})
    })
}

fn revision_of(m: &ObjectMeta) -> i64 {
    m.annotations
        .as_ref()
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Whether `m` names `uid` as its controller.
fn controlled_by(m: &ObjectMeta, uid: &str) -> bool {
    m.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// The ReplicaSets a deployment owns, by revision.
pub fn owned_replicasets(d: &Value, replicasets: &[Value]) -> Result<Vec<ReplicaSet>, ClientError> {
    let d: Deployment = typed(d, "Deployment")?;
    let uid = d.metadata.uid.unwrap_or_default();
    let mut out: Vec<ReplicaSet> = replicasets
        .iter()
        .map(|rs| typed::<ReplicaSet>(rs, "ReplicaSet"))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|rs| controlled_by(&rs.metadata, &uid))
        .collect();
    out.sort_by_key(|rs| revision_of(&rs.metadata));
    Ok(out)
}

/// `rollout history`: (revision, change-cause) per revision.
pub fn history(d: &Value, replicasets: &[Value]) -> Result<Vec<(i64, String)>, ClientError> {
    Ok(owned_replicasets(d, replicasets)?
        .into_iter()
        .map(|rs| {
            let cause = rs
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kubernetes.io/change-cause").cloned())
                .unwrap_or_else(|| "<none>".into());
            (revision_of(&rs.metadata), cause)
        })
        .collect())
}

/// `rollout undo [--to-revision N]`: the JSON patch that puts an old template back, and the
/// revision rolled back to.
pub fn rollback_patch(
    d: &Value,
    replicasets: &[Value],
    to_revision: Option<i64>,
) -> Result<(Value, i64), ClientError> {
    let owned = owned_replicasets(d, replicasets)?;
    let current = revision_of(&typed::<Deployment>(d, "Deployment")?.metadata);
    let target = match to_revision.filter(|r| *r > 0) {
        Some(r) => owned
            .iter()
            .find(|rs| revision_of(&rs.metadata) == r)
            .ok_or_else(|| {
                ClientError::Usage(format!("unable to find specified revision {r} in history"))
            })?,
        None => owned
            .iter()
            .rev()
            .find(|rs| revision_of(&rs.metadata) != current)
            .ok_or_else(|| {
                ClientError::Usage("no rollout history found for the previous revision".into())
            })?,
    };
    let mut template = target.spec.template.clone().unwrap_or_default();
    if let Some(l) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(POD_TEMPLATE_HASH);
    }
    let patch = json!([{"op": "replace", "path": "/spec/template", "value": template}]);
    Ok((patch, revision_of(&target.metadata)))
}

/// `rollout status` of a StatefulSet: (done, message), by kubectl's rules.
pub fn statefulset_rollout_status(s: &Value) -> Result<(bool, String), ClientError> {
    let s: StatefulSet = typed(s, "StatefulSet")?;
    let spec = s.spec;
    let status = s.status.unwrap_or_default();
    let strategy = spec.update_strategy.unwrap_or_default();
    if strategy.type_.as_deref().unwrap_or("RollingUpdate") != "RollingUpdate" {
        return Err(ClientError::Usage(
            "rollout status is only available for RollingUpdate strategy type".into(),
        ));
    }
    let observed = status.observed_generation.unwrap_or(0);
    if observed == 0 || s.metadata.generation.unwrap_or(0) > observed {
        return Ok((
            false,
            "Waiting for statefulset spec update to be observed...".into(),
        ));
    }
    let replicas = spec.replicas.unwrap_or(1);
    let ready = status.ready_replicas.unwrap_or(0);
    if ready < replicas {
        return Ok((
            false,
            format!("Waiting for {} pods to be ready...", replicas - ready),
        ));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    // As kubectl: any `rollingUpdate` (the API defaults `partition: 0`) is a partitioned
    // roll out, complete once the ordinals at or above the partition are updated.
    if let Some(ru) = strategy.rolling_update {
        let partition = ru.partition.unwrap_or(0);
        if updated < replicas - partition {
            return Ok((false, format!("Waiting for partitioned roll out to finish: {updated} out of {} new pods have been updated...", replicas - partition)));
        }
        return Ok((
            true,
            format!("partitioned roll out complete: {updated} new pods have been updated..."),
        ));
    }
    let current = status.current_revision.unwrap_or_default();
    let update = status.update_revision.unwrap_or_default();
    if update != current {
        return Ok((false, format!("waiting for statefulset rolling update to complete {updated} pods at revision {update}...")));
    }
    Ok((
        true,
        format!(
            "statefulset rolling update complete {} pods at revision {current}...",
            status.current_replicas.unwrap_or(0)
        ),
    ))
}

/// `rollout status`: (done, message), by kubectl's rules.
pub fn rollout_status(d: &Value) -> Result<(bool, String), ClientError> {
    // Deployments and StatefulSets come here: the kind is only known from the object.
    if d.get("kind").and_then(Value::as_str) == Some("StatefulSet") {
        return statefulset_rollout_status(d);
    }
    let d: Deployment = typed(d, "Deployment")?;
    let name = d.metadata.name.clone().unwrap_or_default();
    let status = d.status.unwrap_or_default();
    if status.observed_generation.unwrap_or(0) < d.metadata.generation.unwrap_or(0) {
        return Ok((
            false,
            "Waiting for deployment spec update to be observed...".into(),
        ));
    }
    let progressing = conditions::get(status.conditions.as_deref(), "Progressing");
    if progressing.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded")) {
        return Err(ClientError::Usage(format!(
            "deployment \"{name}\" exceeded its progress deadline"
        )));
    }
    let (want, updated, total, available) = (
        d.spec.replicas.unwrap_or(0),
        status.updated_replicas.unwrap_or(0),
        status.replicas.unwrap_or(0),
        status.available_replicas.unwrap_or(0),
    );
    if updated < want {
        return Ok((false, format!("Waiting for deployment \"{name}\" rollout to finish: {updated} out of {want} new replicas have been updated...")));
    }
    if total > updated {
        return Ok((false, format!("Waiting for deployment \"{name}\" rollout to finish: {} old replicas are pending termination...", total - updated)));
    }
    if available < updated {
        return Ok((false, format!("Waiting for deployment \"{name}\" rollout to finish: {available} of {updated} updated replicas are available...")));
    }
    Ok((
        true,
        format!("deployment \"{name}\" successfully rolled out"),
    ))
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> Result<T, ClientError> {
    serde_json::from_value(v.clone()).map_err(|e| {
        ClientError::Usage(format!(
            "the server sent a {what} that does not decode: {e}"
        ))
    })
}

/// The ControllerRevisions a DaemonSet controls, oldest revision first.
pub fn daemonset_revisions(
    ds: &Value,
    revisions: &[Value],
) -> Result<Vec<ControllerRevision>, ClientError> {
    let uid = meta::uid(ds);
    let mut out: Vec<ControllerRevision> = revisions
        .iter()
        .filter(|r| meta::controller_uid(r).as_deref() == Some(uid))
        .map(|r| typed(r, "ControllerRevision"))
        .collect::<Result<_, _>>()?;
    out.sort_by_key(|r| r.revision.unwrap_or(0));
    Ok(out)
}

/// `rollout history ds/NAME`: (revision, change-cause) per revision.
pub fn daemonset_history(
    ds: &Value,
    revisions: &[Value],
) -> Result<Vec<(i64, String)>, ClientError> {
    Ok(daemonset_revisions(ds, revisions)?
        .into_iter()
        .map(|r| {
            let cause = r
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kubernetes.io/change-cause").cloned())
                .unwrap_or_else(|| "<none>".into());
            (r.revision.unwrap_or(0), cause)
        })
        .collect())
}

/// `rollout undo ds/NAME [--to-revision N]`: as kubectl, the revision's data (a strategic
/// merge patch that restores its template) and the revision rolled back to. Without a
/// revision, the newest one before the current.
pub fn daemonset_rollback_patch(
    ds: &Value,
    revisions: &[Value],
    to_revision: Option<i64>,
) -> Result<(Value, i64), ClientError> {
    let revs = daemonset_revisions(ds, revisions)?;
    let target = match to_revision.filter(|r| *r > 0) {
        Some(r) => revs.iter().find(|x| x.revision == Some(r)).ok_or_else(|| {
            ClientError::Usage(format!("unable to find specified revision {r} in history"))
        })?,
        None if revs.len() <= 1 => {
            return Err(ClientError::Usage(
                "no last revision to roll back to".into(),
            ))
        }
        None => &revs[revs.len() - 2],
    };
    Ok((target.data.0.clone(), target.revision.unwrap_or(0)))
}

/// `rollout status ds/NAME`: (done, message), by kubectl's rules for DaemonSets.
pub fn daemonset_rollout_status(ds: &Value) -> Result<(bool, String), ClientError> {
    let d: DaemonSet = typed(ds, "DaemonSet")?;
    let name = d.metadata.name.clone().unwrap_or_default();
    let strategy = d
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate");
    if strategy != "RollingUpdate" {
        return Err(ClientError::Usage(
            "rollout status is only available for RollingUpdate strategy type".into(),
        ));
    }
    let status = d.status.unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > status.observed_generation.unwrap_or(0) {
        return Ok((
            false,
            "Waiting for daemon set spec update to be observed...".into(),
        ));
    }
    let (desired, updated, available) = (
        status.desired_number_scheduled,
        status.updated_number_scheduled.unwrap_or(0),
        status.number_available.unwrap_or(0),
    );
    if updated < desired {
        return Ok((false, format!("Waiting for daemon set \"{name}\" rollout to finish: {updated} out of {desired} new pods have been updated...")));
    }
    if available < desired {
        return Ok((false, format!("Waiting for daemon set \"{name}\" rollout to finish: {available} of {desired} updated pods are available...")));
    }
    Ok((
        true,
        format!("daemon set \"{name}\" successfully rolled out"),
    ))
}

/// Splits multi-document YAML (or one JSON object / a List) into objects.
pub fn documents(text: &str) -> Result<Vec<Value>, ClientError> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| ClientError::Usage(format!("error parsing YAML: {e}")))?;
        match v {
            Value::Null => {}
            Value::Object(_)
                if v["kind"].as_str().is_some_and(|k| k.ends_with("List"))
                    && v["items"].is_array() =>
            {
                out.extend(v["items"].as_array().cloned().unwrap_or_default())
            }
            Value::Object(_) => out.push(v),
            _ => {
                return Err(ClientError::Usage(
                    "error parsing YAML: a document is not an object".into(),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_deployment_like_kubectl() {
        let d = deployment(
            "kubernetes-bootcamp",
            &["127.0.0.1:5000/bootcamp:v1".into()],
            Some(8080),
            1,
        );
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["name"],
            "bootcamp"
        );
        assert_eq!(
            d["spec"]["selector"]["matchLabels"]["app"],
            "kubernetes-bootcamp"
        );
        assert_eq!(
            container_name("gcr.io/google-samples/kubernetes-bootcamp:v1"),
            "kubernetes-bootcamp"
        );
    }

    #[test]
    fn create_service() {
        let s = service(
            "NodePort",
            "web",
            &["80:8080".into(), "9000".into()],
            Some(30080),
        )
        .unwrap();
        assert_eq!(s["spec"]["type"], "NodePort");
        assert_eq!(s["spec"]["selector"]["app"], "web");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(s["spec"]["ports"][0]["nodePort"], 30080);
        assert_eq!(s["spec"]["ports"][0]["name"], "80-8080");
        assert_eq!(s["spec"]["ports"][1]["targetPort"], 9000);
        assert!(service("headless", "web", &["80".into()], None).is_err());
        assert!(service("clusterip", "web", &["x:80".into()], None).is_err());
        assert!(service("clusterip", "web", &["80".into()], Some(30000)).is_err());
    }

    #[test]
    fn expose_and_set_image() {
        let d = deployment("web", &["x:v1".into()], Some(8080), 1);
        let s = expose(&d, None, "NodePort", None, None, None).unwrap();
        assert_eq!(s["spec"]["ports"][0]["port"], 8080);
        assert_eq!(s["spec"]["selector"]["app"], "web");
        let p = set_image_patch(&d, &[("x".into(), "x:v2".into())]).unwrap();
        assert_eq!(
            p["spec"]["template"]["spec"]["containers"][0]["image"],
            "x:v2"
        );
        assert!(set_image_patch(&d, &[("nope".into(), "x".into())]).is_err());
    }

    #[test]
    fn rollback_picks_the_previous_revision() {
        let d = json!({"metadata": {"uid": "u", "resourceVersion": "9", "annotations": {REVISION_ANNOTATION: "2"}}});
        let rs = |rev: &str, img: &str| {
            json!({"metadata": {"annotations": {REVISION_ANNOTATION: rev},
            "ownerReferences": [{"uid": "u", "controller": true, "kind": "Deployment", "name": "d"}]},
            "spec": {"template": {"metadata": {"labels": {"app": "d", POD_TEMPLATE_HASH: "h"}}, "spec": {"containers": [{"name": "c", "image": img}]}}}})
        };
        let all = vec![rs("1", "v1"), rs("2", "v2")];
        let (patch, rev) = rollback_patch(&d, &all, None).unwrap();
        assert_eq!(rev, 1);
        assert_eq!(patch[0]["value"]["spec"]["containers"][0]["image"], "v1");
        assert!(patch[0]["value"]["metadata"]["labels"]
            .get(POD_TEMPLATE_HASH)
            .is_none());
        assert!(rollback_patch(&d, &all, Some(7)).is_err());
    }

    #[test]
    fn statefulset_status_messages() {
        let mut s = json!({"kind": "StatefulSet", "metadata": {"name": "web", "generation": 2},
            "spec": {"replicas": 3, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}},
            "status": {"observedGeneration": 1}});
        assert_eq!(
            rollout_status(&s).unwrap(),
            (
                false,
                "Waiting for statefulset spec update to be observed...".into()
            )
        );
        s["status"] = json!({"observedGeneration": 2, "readyReplicas": 2});
        assert_eq!(
            rollout_status(&s).unwrap().1,
            "Waiting for 1 pods to be ready..."
        );
        s["status"] = json!({"observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 1,
            "currentReplicas": 2, "currentRevision": "web-a", "updateRevision": "web-b"});
        assert_eq!(
            rollout_status(&s).unwrap().1,
            "Waiting for partitioned roll out to finish: 1 out of 3 new pods have been updated..."
        );
        s["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = json!(2);
        assert_eq!(
            rollout_status(&s).unwrap(),
            (
                true,
                "partitioned roll out complete: 1 new pods have been updated...".into()
            )
        );
        s["spec"]["updateStrategy"] = json!({"type": "RollingUpdate"});
        assert_eq!(
            rollout_status(&s).unwrap().1,
            "waiting for statefulset rolling update to complete 1 pods at revision web-b..."
        );
        s["status"] = json!({"observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 3,
            "currentReplicas": 3, "currentRevision": "web-b", "updateRevision": "web-b"});
        assert_eq!(
            rollout_status(&s).unwrap(),
            (
                true,
                "statefulset rolling update complete 3 pods at revision web-b...".into()
            )
        );
        s["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        assert!(rollout_status(&s).is_err());
    }

    #[test]
    fn status_messages() {
        let d = json!({"metadata": {"name": "d", "generation": 2}, "spec": {"replicas": 4},
                       "status": {"observedGeneration": 2, "replicas": 5, "updatedReplicas": 4, "availableReplicas": 3}});
        let (done, msg) = rollout_status(&d).unwrap();
        assert!(!done);
        assert!(msg.contains("1 old replicas are pending termination"));
        assert_eq!(documents("a: 1\n---\n---\nb: 2\n").unwrap().len(), 2);
    }

    fn ds(generation: i64, status: Value) -> Value {
        json!({"metadata": {"name": "agent", "uid": "u1", "generation": generation},
               "spec": {"selector": {}, "template": {}, "updateStrategy": {"type": "RollingUpdate"}},
               "status": status})
    }

    #[test]
    fn daemonset_rollout_status_follows_kubectl() {
        let (done, msg) = daemonset_rollout_status(&ds(2, json!({"observedGeneration": 1, "desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberReady": 3, "numberMisscheduled": 0}))).unwrap();
        assert!(!done);
        assert_eq!(msg, "Waiting for daemon set spec update to be observed...");
        let (done, msg) = daemonset_rollout_status(&ds(2, json!({"observedGeneration": 2, "desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberReady": 3, "numberMisscheduled": 0, "updatedNumberScheduled": 1, "numberAvailable": 3}))).unwrap();
        assert!(!done);
        assert!(
            msg.contains("1 out of 3 new pods have been updated"),
            "{msg}"
        );
        let (done, msg) = daemonset_rollout_status(&ds(2, json!({"observedGeneration": 2, "desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberReady": 3, "numberMisscheduled": 0, "updatedNumberScheduled": 3, "numberAvailable": 3}))).unwrap();
        assert!(done);
        assert_eq!(msg, "daemon set \"agent\" successfully rolled out");
        let mut on_delete = ds(1, json!({}));
        on_delete["spec"]["updateStrategy"]["type"] = json!("OnDelete");
        assert!(daemonset_rollout_status(&on_delete).is_err());
    }

    #[test]
    fn daemonset_history_and_undo_use_controller_revisions() {
        let d = ds(3, json!({}));
        let rev = |n: i64, owner: &str, image: &str| {
            json!({"metadata": {"name": format!("agent-{n}"), "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": owner, "controller": true}]},
                   "revision": n,
                   "data": {"spec": {"template": {"$patch": "replace", "spec": {"containers": [{"name": "c", "image": image}]}}}}})
        };
        let revs = vec![rev(2, "u1", "v2"), rev(1, "u1", "v1"), rev(9, "other", "x")];
        assert_eq!(
            daemonset_history(&d, &revs).unwrap(),
            vec![(1, "<none>".to_string()), (2, "<none>".to_string())]
        );
        let (patch, to) = daemonset_rollback_patch(&d, &revs, None).unwrap();
        assert_eq!(to, 1);
        assert_eq!(
            patch["spec"]["template"]["spec"]["containers"][0]["image"],
            "v1"
        );
        assert!(daemonset_rollback_patch(&d, &revs, Some(7)).is_err());
        assert!(daemonset_rollback_patch(&d, &revs[..1], None).is_err());
    }

    #[test]
    fn create_job_and_cronjob_bodies() {
        let cmd = vec!["echo".to_string(), "hi".to_string()];
        let j = job("pi", "reg/pi:v1", &cmd);
        assert_eq!(j["spec"]["template"]["spec"]["restartPolicy"], "Never");
        assert_eq!(
            j["spec"]["template"]["spec"]["containers"][0]["command"],
            json!(cmd)
        );
        let cj = cronjob("tick", "reg/pi:v1", "*/1 * * * *", &[]);
        assert_eq!(cj["spec"]["schedule"], "*/1 * * * *");
        let tmpl = &cj["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(tmpl["restartPolicy"], "OnFailure");
        assert!(tmpl["containers"][0].get("command").is_none());
        let mut stored = cj.clone();
        stored["metadata"]["uid"] = json!("u-1");
        let m = job_from_cronjob("tick-manual", &serde_json::from_value(stored).unwrap());
        let m = serde_json::to_value(m).unwrap();
        assert_eq!(
            m["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"],
            "manual"
        );
        assert_eq!(m["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(m["spec"]["template"]["spec"]["restartPolicy"], "OnFailure");
    }
}
