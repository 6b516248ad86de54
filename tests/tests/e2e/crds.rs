//! CustomResourceDefinitions with the real kubectl: a definition with a schema, printer
//! columns, status and scale subresources and two versions is applied and served (discovery,
//! `api-resources`), its objects created, listed with their columns, patched, scaled and
//! watched; an invalid object is refused with 422, an unknown field pruned and a default
//! filled in; ConfigMaps owned by a deleted ConfigMap and by a custom object are collected;
//! deleting the definition deletes its objects. CEL validation rules (`x-kubernetes-validations`)
//! refuse violating objects and updates, and a definition whose rule does not compile.

use std::process::Stdio;
use std::time::Duration;

use skiff_e2e::{eventually, TestCluster};
use tokio::io::{AsyncBufReadExt, BufReader};

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wg]
  versions:
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale:
        specReplicasPath: .spec.replicas
        statusReplicasPath: .status.replicas
    additionalPrinterColumns:
    - {name: Size, type: string, jsonPath: .spec.size}
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: string, enum: [small, large]}
              replicas: {type: integer, minimum: 0, maximum: 10}
              color: {type: string, default: blue}
          status:
            type: object
            properties:
              replicas: {type: integer}
"#;

const WIDGET: &str = r#"
apiVersion: example.com/v1
kind: Widget
metadata:
  name: w1
spec:
  size: small
  replicas: 2
  bogus: dropped
"#;

const INVALID: &str = r#"
apiVersion: example.com/v1
kind: Widget
metadata:
  name: w2
spec:
  size: huge
  replicas: 11
"#;

fn apply_ok(c: &TestCluster, yaml: &str, extra: &[&str]) -> anyhow::Result<String> {
    let out = c.kubectl_apply(yaml, extra)?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_resources_with_kubectl() -> anyhow::Result<()> {
    let c = TestCluster::start(|_| {}).await?;
    apply_ok(&c, CRD, &[])?;
    let established = c.kubectl_ok(&[
        "get",
        "crd",
        "widgets.example.com",
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
    ])?;
    assert_eq!(established, "True");
    let resources = c.kubectl_ok(&["api-resources", "--api-group=example.com"])?;
    assert!(
        resources.contains("widgets") && resources.contains("wg") && resources.contains("Widget"),
        "{resources}"
    );

    // A watch started before the object exists sees it come and change.
    let mut watch = tokio::process::Command::new("kubectl")
        .args([
            "get",
            "widgets",
            "--watch",
            "-o",
            r#"jsonpath={.metadata.name} {.spec.size}{"\n"}"#,
        ])
        .env("KUBECONFIG", c.kubeconfig())
        .env("HOME", c.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();

    // An unknown field is pruned (kubectl asks for no strict validation), a default filled in.
    apply_ok(&c, WIDGET, &["--validate=false"])?;
    let w1: serde_json::Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "wg", "w1", "-o", "json"])?)?;
    assert_eq!(w1["spec"]["color"], "blue", "{w1}");
    assert!(w1["spec"].get("bogus").is_none(), "{w1}");
    assert_eq!(w1["apiVersion"], "example.com/v1");
    // With strict validation the unknown field is an error, as for built-in kinds.
    let strict = c.kubectl_apply(&WIDGET.replace("w1", "w3"), &[])?;
    assert!(!strict.status.success());
    assert!(
        String::from_utf8_lossy(&strict.stderr).contains("unknown field \"spec.bogus\""),
        "{}",
        String::from_utf8_lossy(&strict.stderr)
    );

    // Printer columns.
    let table = c.kubectl_ok(&["get", "widgets"])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "SIZE", "REPLICAS", "AGE"], "{table}");
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], ["w1", "small", "2"], "{table}");

    // Patch, scale and status.
    c.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":"large"}}"#,
    ])?;
    c.kubectl_ok(&["scale", "widget", "w1", "--replicas=5"])?;
    c.kubectl_ok(&[
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":5},"spec":{"size":"small"}}"#,
    ])?;
    let w1: serde_json::Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "widget", "w1", "-o", "json"])?)?;
    assert_eq!(w1["spec"]["replicas"], 5, "{w1}");
    assert_eq!(
        w1["spec"]["size"], "large",
        "a status write changes only status: {w1}"
    );
    assert_eq!(w1["status"]["replicas"], 5, "{w1}");
    assert_eq!(w1["metadata"]["generation"], 3, "{w1}");
    let scale: serde_json::Value = serde_json::from_str(&c.kubectl_ok(&[
        "get",
        "--raw",
        "/apis/example.com/v1/namespaces/default/widgets/w1/scale",
    ])?)?;
    assert_eq!(
        (
            scale["spec"]["replicas"].as_i64(),
            scale["status"]["replicas"].as_i64()
        ),
        (Some(5), Some(5))
    );

    // Read through the other version: the same object, shown in that version.
    let beta = c.kubectl_ok(&[
        "get",
        "widgets.v1beta1.example.com",
        "w1",
        "-o",
        "jsonpath={.apiVersion} {.spec.size}",
    ])?;
    assert_eq!(beta, "example.com/v1beta1 large");

    // The watch saw it added and modified.
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = Vec::new();
        while let Some(l) = lines.next_line().await? {
            seen.push(l);
            if seen.iter().any(|l| l == "w1 large") {
                break;
            }
        }
        anyhow::Ok(seen)
    })
    .await??;
    assert_eq!(
        seen.first().map(String::as_str),
        Some("w1 small"),
        "{seen:?}"
    );
    watch.kill().await?;

    // An invalid object: 422 with Kubernetes' field paths and messages.
    let out = c.kubectl_apply(INVALID, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is invalid"), "{err}");
    assert!(
        err.contains(r#"spec.size: Unsupported value: "huge": supported values: "small", "large""#),
        "{err}"
    );
    assert!(err.contains("spec.replicas: Invalid value: 11: spec.replicas in body should be less than or equal to 10"), "{err}");

    // Garbage collection of any kind: a ConfigMap owned by a ConfigMap, one by a Widget.
    apply_ok(
        &c,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: parent}\n",
        &[],
    )?;
    let parent_uid = c.kubectl_ok(&["get", "cm", "parent", "-o", "jsonpath={.metadata.uid}"])?;
    let w1_uid = c.kubectl_ok(&["get", "widget", "w1", "-o", "jsonpath={.metadata.uid}"])?;
    let owned = |name: &str, api: &str, kind: &str, owner: &str, uid: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  ownerReferences:\n  - {{apiVersion: {api}, kind: {kind}, name: {owner}, uid: {uid}}}\n")
    };
    apply_ok(
        &c,
        &owned("child", "v1", "ConfigMap", "parent", &parent_uid),
        &[],
    )?;
    apply_ok(
        &c,
        &owned("of-widget", "example.com/v1", "Widget", "w1", &w1_uid),
        &[],
    )?;
    c.kubectl_ok(&["delete", "cm", "parent"])?;
    let gone = |name: &'static str| {
        let c = &c;
        move || async move {
            let out = c.kubectl(&["get", "cm", name])?;
            Ok((!out.status.success()).then_some(()))
        }
    };
    eventually(
        "the ConfigMap owned by a deleted ConfigMap to go",
        Duration::from_secs(10),
        gone("child"),
    )
    .await?;
    assert!(c.kubectl(&["get", "cm", "of-widget"])?.status.success());

    // Deleting the definition deletes its objects (and so what they own).
    c.kubectl_ok(&["delete", "crd", "widgets.example.com", "--timeout=20s"])?;
    eventually(
        "the ConfigMap owned by a deleted Widget to go",
        Duration::from_secs(10),
        gone("of-widget"),
    )
    .await?;
    let out = c.kubectl(&["get", "widgets"])?;
    assert!(!out.status.success(), "widgets are still served");
    // Defined again, it starts empty.
    apply_ok(&c, CRD, &[])?;
    let left = c.kubectl_ok(&["get", "widgets", "-o", "name"])?;
    assert_eq!(left.trim(), "", "objects outlived their definition");
    Ok(())
}

const GADGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-validations:
        - rule: self.spec.replicas <= self.spec.max
        properties:
          spec:
            type: object
            properties:
              replicas: {type: integer}
              max: {type: integer}
              owner:
                type: string
                x-kubernetes-validations:
                - {rule: self == oldSelf, message: owner is immutable}
"#;

fn gadget(replicas: i64, owner: &str) -> String {
    format!(
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g1\n\
         spec:\n  replicas: {replicas}\n  max: 3\n  owner: {owner}\n"
    )
}

fn refused(out: &std::process::Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted; wanted {want:?}");
    assert!(err.contains(want), "wanted {want:?} in: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validation_rules_with_kubectl() -> anyhow::Result<()> {
    let c = TestCluster::start(|_| {}).await?;
    // A rule that does not compile refuses the definition.
    let broken = GADGETS.replace(
        "self.spec.replicas <= self.spec.max",
        "self.spec.replicas <=",
    );
    refused(&c.kubectl_apply(&broken, &[])?, "compilation failed");
    apply_ok(&c, GADGETS, &[])?;

    // The rule on the root is checked on create, with Kubernetes' message.
    refused(
        &c.kubectl_apply(&gadget(5, "ann"), &[])?,
        r#"<nil>: Invalid value: "object": failed rule: self.spec.replicas <= self.spec.max"#,
    );
    assert!(!c.kubectl(&["get", "gadget", "g1"])?.status.success());
    apply_ok(&c, &gadget(2, "ann"), &[])?;

    // On update: the transition rule holds the owner, the other rules still apply.
    refused(
        &c.kubectl_apply(&gadget(2, "bob"), &[])?,
        r#"spec.owner: Invalid value: "string": owner is immutable"#,
    );
    refused(
        &c.kubectl_apply(&gadget(4, "ann"), &[])?,
        "failed rule: self.spec.replicas <= self.spec.max",
    );
    apply_ok(&c, &gadget(3, "ann"), &[])?;
    let stored = c.kubectl_ok(&[
        "get",
        "gadget",
        "g1",
        "-o",
        "jsonpath={.spec.replicas} {.spec.owner}",
    ])?;
    assert_eq!(stored, "3 ann");
    Ok(())
}
