//! Server-side apply as kubectl and the official Python client drive it: two field managers,
//! a conflict on a field another owns (exit code and message), `--force-conflicts` taking it,
//! a field removed from a manifest leaving the object, `managedFields` shown with
//! `--show-managed-fields`, `--dry-run=server`, a client-side apply moved to server-side, and
//! a custom resource's lists merged as its schema's `x-kubernetes-list-type` says.

use skiff_e2e::TestCluster;

fn write(cluster: &TestCluster, name: &str, text: &str) -> anyhow::Result<String> {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

/// A Deployment manifest; `extra_labels` go on the object, `replicas` only when given.
fn manifest(name: &str, replicas: Option<u32>, extra_labels: &str) -> String {
    let replicas = replicas
        .map(|r| format!("  replicas: {r}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  labels:
    app: {name}
{extra_labels}spec:
{replicas}  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: c
        image: example.com/none:v1
"#
    )
}

/// A custom resource whose `rules` are a map keyed by `name` and `tags` a set.
const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: routes.ssa.example.com
spec:
  group: ssa.example.com
  scope: Namespaced
  names: {plural: routes, singular: route, kind: Route}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              rules:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [name]
                items:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string}
                    to: {type: string}
              tags:
                type: array
                x-kubernetes-list-type: set
                items: {type: string}
"#;

/// A Route with one rule and one tag.
fn route(rule: &str, tag: &str) -> String {
    format!(
        "apiVersion: ssa.example.com/v1\nkind: Route\nmetadata:\n  name: r\nspec:\n  rules:\n  - name: {rule}\n    to: svc-{rule}\n  tags: [{tag}]\n"
    )
}

fn replicas_only(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n"
    )
}

fn get(cluster: &TestCluster, name: &str, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut args = vec!["get", "deployment", name, "-o", "json"];
    args.extend_from_slice(extra);
    Ok(serde_json::from_str(&cluster.kubectl_ok(&args)?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_side_apply_with_kubectl_and_python() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;

    // Manager a creates the Deployment with two labels and 2 replicas.
    let a1 = write(
        &cluster,
        "a1.yaml",
        &manifest("web", Some(2), "    tier: front\n"),
    )?;
    let ssa = ["apply", "--server-side"];
    cluster.kubectl_ok(&[&ssa[..], &["--field-manager", "a", "-f", &a1]].concat())?;

    // Manager b changes the replicas a owns: refused, naming the field and its owner.
    let b = write(&cluster, "b.yaml", &replicas_only("web", 5))?;
    let out = cluster.kubectl(&[&ssa[..], &["--field-manager", "b", "-f", &b]].concat())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(r#"Apply failed with 1 conflict: conflict with "a": .spec.replicas"#),
        "{stderr}"
    );
    assert_eq!(get(&cluster, "web", &[])?["spec"]["replicas"], 2);

    // A server-side dry run of the forced apply changes nothing.
    cluster.kubectl_ok(
        &[
            &ssa[..],
            &[
                "--field-manager",
                "b",
                "--force-conflicts",
                "--dry-run=server",
                "-f",
                &b,
            ],
        ]
        .concat(),
    )?;
    assert_eq!(get(&cluster, "web", &[])?["spec"]["replicas"], 2);

    // Forced, b takes the field.
    cluster.kubectl_ok(
        &[
            &ssa[..],
            &["--field-manager", "b", "--force-conflicts", "-f", &b],
        ]
        .concat(),
    )?;
    assert_eq!(get(&cluster, "web", &[])?["spec"]["replicas"], 5);

    // a drops the `tier` label and the replicas from its manifest: the label (a's alone)
    // goes, the replicas (b's now) stay.
    let a2 = write(&cluster, "a2.yaml", &manifest("web", None, ""))?;
    cluster.kubectl_ok(&[&ssa[..], &["--field-manager", "a", "-f", &a2]].concat())?;
    let d = get(&cluster, "web", &[])?;
    assert!(d["metadata"]["labels"].get("tier").is_none(), "{d}");
    assert_eq!(d["metadata"]["labels"]["app"], "web");
    assert_eq!(d["spec"]["replicas"], 5);

    // Both managers are shown with --show-managed-fields, and hidden without it.
    let yaml = cluster.kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "yaml",
        "--show-managed-fields",
    ])?;
    for want in [
        "manager: a",
        "manager: b",
        "operation: Apply",
        "f:replicas: {}",
        "fieldsType: FieldsV1",
    ] {
        assert!(yaml.contains(want), "{want:?} not in\n{yaml}");
    }
    let plain = cluster.kubectl_ok(&["get", "deployment", "web", "-o", "yaml"])?;
    assert!(!plain.contains("managedFields"), "{plain}");
    let d = get(&cluster, "web", &["--show-managed-fields"])?;
    let entries = d["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let owns = |m: &str, f: &str| {
        entries
            .iter()
            .any(|e| e["manager"] == m && e["fieldsV1"].pointer(f).is_some())
    };
    assert!(owns("b", "/f:spec/f:replicas"), "{entries:?}");
    assert!(!owns("a", "/f:spec/f:replicas"), "{entries:?}");
    assert!(!owns("a", "/f:metadata/f:labels/f:tier"), "{entries:?}");

    // A client-side apply, then a server-side one of a changed manifest: kubectl moves the
    // fields of `kubectl-client-side-apply` to its own manager, and no conflict is reported.
    let c1 = write(
        &cluster,
        "c1.yaml",
        &manifest("csa", Some(1), "    tier: back\n"),
    )?;
    cluster.kubectl_ok(&["apply", "-f", &c1])?;
    let d = get(&cluster, "csa", &["--show-managed-fields"])?;
    assert!(
        d["metadata"]["managedFields"].as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["manager"] == "kubectl-client-side-apply")),
        "{d}"
    );
    let c2 = write(&cluster, "c2.yaml", &manifest("csa", Some(3), ""))?;
    cluster.kubectl_ok(&["apply", "--server-side", "-f", &c2])?;
    let d = get(&cluster, "csa", &["--show-managed-fields"])?;
    assert_eq!(d["spec"]["replicas"], 3, "{d}");
    assert!(d["metadata"]["labels"].get("tier").is_none(), "{d}");
    assert!(
        d["metadata"]["managedFields"].as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["manager"] == "kubectl" && e["operation"] == "Apply")),
        "{d}"
    );
    // And a client-side apply still works afterwards.
    let c3 = write(&cluster, "c3.yaml", &manifest("csa", Some(2), ""))?;
    cluster.kubectl_ok(&["apply", "-f", &c3])?;
    assert_eq!(get(&cluster, "csa", &[])?["spec"]["replicas"], 2);

    // A custom resource's lists merge as its schema says: rules by name, tags as a set.
    let crd = write(&cluster, "crd.yaml", CRD)?;
    cluster.kubectl_ok(&["apply", "-f", &crd])?;
    let ra = write(&cluster, "ra.yaml", &route("a", "t1"))?;
    let rb = write(&cluster, "rb.yaml", &route("b", "t2"))?;
    cluster.kubectl_ok(&[&ssa[..], &["--field-manager", "a", "-f", &ra]].concat())?;
    cluster.kubectl_ok(&[&ssa[..], &["--field-manager", "b", "-f", &rb]].concat())?;
    let r: serde_json::Value =
        serde_json::from_str(&cluster.kubectl_ok(&["get", "route", "r", "-o", "json"])?)?;
    let names: Vec<&str> = r["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"], "{r}");
    assert_eq!(r["spec"]["tags"], serde_json::json!(["t1", "t2"]), "{r}");
    // a applies another rule instead of its own: its old rule and tag go, b's stay.
    let ra2 = write(&cluster, "ra2.yaml", &route("c", "t3"))?;
    cluster.kubectl_ok(&[&ssa[..], &["--field-manager", "a", "-f", &ra2]].concat())?;
    let r: serde_json::Value =
        serde_json::from_str(&cluster.kubectl_ok(&["get", "route", "r", "-o", "json"])?)?;
    let names: Vec<&str> = r["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(names, ["b", "c"], "{r}");
    assert_eq!(r["spec"]["tags"], serde_json::json!(["t2", "t3"]), "{r}");

    // The official Python client.
    cluster
        .python_client("server_side_apply.py", "python-ssa")
        .await?;
    Ok(())
}
