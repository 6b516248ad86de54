//! The built-in kinds charts and operators use, with the real kubectl: discovery lists them,
//! `get` prints Kubernetes' columns, a bad object is refused with Kubernetes' message, pods'
//! priority and runtime classes are resolved at admission, `create service nodeport` gets a
//! port; and cert-manager's release manifest applies (client-side twice, then server-side),
//! serves its custom resources and deletes cleanly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_e2e::{eventually, TestCluster};

fn apply_ok(c: &TestCluster, yaml: &str) -> anyhow::Result<String> {
    let out = c.kubectl_apply(yaml, &[])?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// kubectl's stderr for a manifest it must refuse.
fn apply_refused(c: &TestCluster, yaml: &str) -> anyhow::Result<String> {
    let out = c.kubectl_apply(yaml, &[])?;
    anyhow::ensure!(
        !out.status.success(),
        "kubectl apply accepted what it should refuse: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

/// The header line of a `kubectl get`, split into its columns.
fn header(out: &str) -> Vec<String> {
    out.lines()
        .next()
        .unwrap_or("")
        .split("  ")
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from)
        .collect()
}

const OBJECTS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: example
spec:
  controller: example.com/ingress-controller
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
spec:
  ingressClassName: example
  rules:
  - host: web.example.com
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: web
            port:
              number: 80
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
spec:
  podSelector: {}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: web
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: web
  maxReplicas: 5
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata:
  name: high
value: 1000
---
apiVersion: v1
kind: ResourceQuota
metadata:
  name: pods
spec:
  hard:
    pods: "10"
---
apiVersion: v1
kind: LimitRange
metadata:
  name: limits
spec:
  limits:
  - type: Container
    max:
      cpu: "1"
---
apiVersion: v1
kind: Secret
metadata:
  name: plain
stringData:
  a: b
"#;

const NO_PATH_TYPE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: bad
spec:
  rules:
  - http:
      paths:
      - path: /
        backend:
          service:
            name: web
            port:
              number: 80
"#;

const TOO_HIGH: &str = r#"
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata:
  name: too-high
value: 2000000000
"#;

fn pod(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{extra}  containers:\n  - name: c\n    image: example.com/app:v1\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_kinds_with_kubectl() -> anyhow::Result<()> {
    let c = TestCluster::start(|_| {}).await?;

    // Discovery: every new kind, with its short names and group versions.
    let resources = c.kubectl_ok(&["api-resources", "--no-headers"])?;
    for (plural, version) in [
        ("ingresses", "networking.k8s.io/v1"),
        ("ingressclasses", "networking.k8s.io/v1"),
        ("networkpolicies", "networking.k8s.io/v1"),
        ("horizontalpodautoscalers", "autoscaling/v2"),
        (
            "validatingwebhookconfigurations",
            "admissionregistration.k8s.io/v1",
        ),
        (
            "mutatingwebhookconfigurations",
            "admissionregistration.k8s.io/v1",
        ),
        (
            "validatingadmissionpolicies",
            "admissionregistration.k8s.io/v1",
        ),
        ("priorityclasses", "scheduling.k8s.io/v1"),
        ("runtimeclasses", "node.k8s.io/v1"),
        ("csidrivers", "storage.k8s.io/v1"),
        ("csinodes", "storage.k8s.io/v1"),
        ("volumeattachments", "storage.k8s.io/v1"),
        ("csistoragecapacities", "storage.k8s.io/v1"),
        ("resourcequotas", "v1"),
        ("limitranges", "v1"),
        ("podtemplates", "v1"),
        ("replicationcontrollers", "v1"),
        ("certificatesigningrequests", "certificates.k8s.io/v1"),
    ] {
        anyhow::ensure!(
            resources.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&plural) && f.contains(&version)
            }),
            "api-resources lacks {plural} ({version}):\n{resources}"
        );
    }

    // Their OpenAPI schemas: what `kubectl explain` reads.
    for (what, field) in [
        ("ingress.spec.rules.http.paths.pathType", "pathType"),
        ("hpa.spec.maxReplicas", "maxReplicas"),
        ("priorityclass.value", "value"),
        (
            "validatingwebhookconfiguration.webhooks.sideEffects",
            "sideEffects",
        ),
    ] {
        let out = c.kubectl_ok(&["explain", what])?;
        anyhow::ensure!(
            out.contains(&format!("FIELD: {field}")),
            "explain {what}:\n{out}"
        );
    }

    // Built in at start, as Kubernetes: the system priority classes, and a runtime class
    // per runtime.
    let pcs = c.kubectl_ok(&["get", "priorityclass"])?;
    anyhow::ensure!(
        header(&pcs) == ["NAME", "VALUE", "GLOBAL-DEFAULT", "AGE", "PREEMPTIONPOLICY"],
        "{pcs}"
    );
    for (name, value) in [
        ("system-cluster-critical", "2000000000"),
        ("system-node-critical", "2000001000"),
    ] {
        anyhow::ensure!(
            pcs.lines()
                .any(|l| l.starts_with(name) && l.contains(value)),
            "{name} {value} missing:\n{pcs}"
        );
    }

    apply_ok(&c, OBJECTS)?;
    let out = c.kubectl_ok(&["get", "ingress,hpa,priorityclass,runtimeclass"])?;
    let blocks: Vec<&str> = out.split("\n\n").collect();
    let find = |first: &str| {
        blocks
            .iter()
            .find(|b| b.lines().nth(1).is_some_and(|l| l.starts_with(first)))
            .map(|b| b.to_string())
            .ok_or_else(|| anyhow::anyhow!("no {first} in:\n{out}"))
    };
    let ing = find("ingress.networking.k8s.io/web")?;
    anyhow::ensure!(
        header(&ing) == ["NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS", "AGE"],
        "{ing}"
    );
    anyhow::ensure!(
        ing.contains("example") && ing.contains("web.example.com") && ing.contains("80"),
        "{ing}"
    );
    let hpa = find("horizontalpodautoscaler.autoscaling/web")?;
    anyhow::ensure!(
        header(&hpa)
            == [
                "NAME",
                "REFERENCE",
                "TARGETS",
                "MINPODS",
                "MAXPODS",
                "REPLICAS",
                "AGE"
            ],
        "{hpa}"
    );
    anyhow::ensure!(
        hpa.contains("Deployment/web") && hpa.contains("cpu: <unknown>/80%"),
        "{hpa}"
    );
    let pc = find("priorityclass.scheduling.k8s.io/high")?;
    anyhow::ensure!(
        pc.contains("1000") && pc.contains("PreemptLowerPriority"),
        "{pc}"
    );
    let rc = find("runtimeclass.node.k8s.io/runc")?;
    anyhow::ensure!(header(&rc) == ["NAME", "HANDLER", "AGE"], "{rc}");
    anyhow::ensure!(
        rc.lines()
            .any(|l| l.starts_with("runtimeclass.node.k8s.io/wasmtime") && l.contains(" wasmtime ")),
        "{rc}"
    );
    let netpol = c.kubectl_ok(&["get", "netpol", "deny-all"])?;
    anyhow::ensure!(
        header(&netpol) == ["NAME", "POD-SELECTOR", "AGE"],
        "{netpol}"
    );

    // Defaults Kubernetes fills.
    let hpa = c.kubectl_ok(&["get", "hpa", "web", "-o", "jsonpath={.spec.minReplicas}"])?;
    anyhow::ensure!(hpa == "1", "HPA minReplicas {hpa}");
    let types = c.kubectl_ok(&[
        "get",
        "netpol",
        "deny-all",
        "-o",
        "jsonpath={.spec.policyTypes}",
    ])?;
    anyhow::ensure!(types == r#"["Ingress"]"#, "policyTypes {types}");
    let ty = c.kubectl_ok(&["get", "secret", "plain", "-o", "jsonpath={.type}"])?;
    anyhow::ensure!(ty == "Opaque", "Secret type {ty:?}");
    let limit = c.kubectl_ok(&[
        "get",
        "limitrange",
        "limits",
        "-o",
        "jsonpath={.spec.limits[0].defaultRequest.cpu}",
    ])?;
    anyhow::ensure!(limit == "1", "LimitRange defaultRequest {limit:?}");

    // Bad objects: 422 with Kubernetes' message.
    let err = apply_refused(&c, NO_PATH_TYPE)?;
    anyhow::ensure!(
        err.contains(r#"The Ingress "bad" is invalid: spec.rules[0].http.paths[0].pathType: Required value: pathType must be specified"#),
        "{err}"
    );
    let err = apply_refused(&c, TOO_HIGH)?;
    anyhow::ensure!(
        err.contains(r#"The PriorityClass "too-high" is invalid: value: Forbidden: maximum allowed value of a user defined priority is 1000000000"#),
        "{err}"
    );
    let err = c.kubectl(&[
        "patch",
        "priorityclass",
        "high",
        "--type=merge",
        "-p",
        r#"{"value":5}"#,
    ])?;
    anyhow::ensure!(
        !err.status.success()
            && String::from_utf8_lossy(&err.stderr).contains("may not be changed in an update"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );

    // Pods: a priority class resolved to its value, an unknown class or runtime class refused.
    apply_ok(
        &c,
        &pod("critical", "  priorityClassName: system-cluster-critical\n"),
    )?;
    let prio = c.kubectl_ok(&["get", "pod", "critical", "-o", "jsonpath={.spec.priority}"])?;
    anyhow::ensure!(prio == "2000000000", "priority {prio}");
    apply_ok(&c, &pod("plain", "  runtimeClassName: wasmtime\n"))?;
    let prio = c.kubectl_ok(&[
        "get",
        "pod",
        "plain",
        "-o",
        "jsonpath={.spec.priority}/{.spec.preemptionPolicy}",
    ])?;
    anyhow::ensure!(prio == "0/PreemptLowerPriority", "priority {prio}");
    let err = apply_refused(&c, &pod("nope", "  priorityClassName: nope\n"))?;
    anyhow::ensure!(
        err.contains(r#"pods "nope" is forbidden: no PriorityClass with name nope was found"#),
        "{err}"
    );
    let err = apply_refused(&c, &pod("nope", "  runtimeClassName: nope\n"))?;
    anyhow::ensure!(
        err.contains(r#"pods "nope" is forbidden: pod rejected: RuntimeClass "nope" not found"#),
        "{err}"
    );

    // `create service nodeport` sends `nodePort: 0`: a port is allocated.
    c.kubectl_ok(&["create", "service", "nodeport", "np", "--tcp=8080:8080"])?;
    let port = c.kubectl_ok(&[
        "get",
        "service",
        "np",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ])?;
    let port: u16 = port
        .parse()
        .map_err(|e| anyhow::anyhow!("nodePort {port:?}: {e}"))?;
    anyhow::ensure!((30000..=32767).contains(&port), "nodePort {port}");
    Ok(())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

const ISSUER: &str = r#"
apiVersion: cert-manager.io/v1
kind: Issuer
metadata:
  name: selfsigned
  namespace: cert-manager
spec:
  selfSigned: {}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cert_manager_release_applies_and_deletes() -> anyhow::Result<()> {
    let c = TestCluster::start(|_| {}).await?;
    let file = fixture("cert-manager-v1.18.0.yaml");
    let file = file.to_str().expect("utf-8 path");
    let objects = std::fs::read_to_string(file)?
        .split("\n---")
        .filter(|d| d.lines().any(|l| l.starts_with("kind: ")))
        .count();

    // Client-side: every object created, then nothing to change.
    let first = c.kubectl_ok(&["apply", "-f", file])?;
    let created = first.lines().filter(|l| l.ends_with(" created")).count();
    anyhow::ensure!(
        created == objects,
        "{created} of {objects} created:\n{first}"
    );
    // The webhook configurations' `rules` are atomic lists whose `scope` the server defaults,
    // so kubectl sends them again and says `configured`, as it does against Kubernetes.
    let second = c.kubectl_ok(&["apply", "-f", file])?;
    anyhow::ensure!(
        second.lines().count() == objects
            && second.lines().all(|l| {
                l.ends_with(" unchanged")
                    || (l.contains("webhookconfiguration.admissionregistration.k8s.io/")
                        && l.ends_with(" configured"))
            }),
        "a second apply changed something:\n{second}"
    );
    let rules = c.kubectl_ok(&[
        "get",
        "validatingwebhookconfiguration",
        "cert-manager-webhook",
        "-o",
        "jsonpath={.webhooks[0].rules[0].scope}/{.webhooks[0].clientConfig.service.name}",
    ])?;
    anyhow::ensure!(
        rules == "*/cert-manager-webhook",
        "webhook after re-apply: {rules}"
    );
    // Server-side over it. Fields the client-side applies own may move to the server-side
    // manager only where the live value still matches the last-applied configuration (as
    // Kubernetes' last-applied manager allows): the webhooks' `rules`, whose `scope` the server
    // defaulted, conflict — as against Kubernetes — and nothing else does; forced, all apply.
    let first = c.kubectl(&["apply", "--server-side", "-f", file])?;
    if !first.status.success() {
        let err = String::from_utf8_lossy(&first.stderr);
        let conflicts: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("Apply failed with"))
            .collect();
        anyhow::ensure!(
            !conflicts.is_empty()
                && conflicts
                    .iter()
                    .all(|l| l.contains("kubectl-client-side-apply")
                        && l.contains("webhooks[name=")
                        && l.ends_with("].rules")),
            "server-side apply over client-side apply failed otherwise:\n{err}"
        );
    }
    let ssa = c.kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", file])?;
    anyhow::ensure!(ssa.lines().count() == objects, "{ssa}");

    // Its custom resources are served.
    eventually(
        "the Issuer kind to be established",
        Duration::from_secs(10),
        || async {
            let out = c.kubectl(&[
                "get",
                "crd",
                "issuers.cert-manager.io",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ])?;
            Ok((String::from_utf8_lossy(&out.stdout) == "True").then_some(()))
        },
    )
    .await?;
    apply_ok(&c, ISSUER)?;
    let issuers = c.kubectl_ok(&["get", "issuers", "-n", "cert-manager"])?;
    anyhow::ensure!(
        issuers.lines().any(|l| l.starts_with("selfsigned ")),
        "{issuers}"
    );
    let hooks = c.kubectl_ok(&["get", "validatingwebhookconfigurations"])?;
    anyhow::ensure!(
        hooks
            .lines()
            .any(|l| l.starts_with("cert-manager-webhook ")),
        "{hooks}"
    );

    // Everything goes. The namespace is deleted first and its objects with it, so kubectl
    // may find some of them gone already (as it may against Kubernetes).
    let deleted = c.kubectl_ok(&["delete", "-f", file, "--ignore-not-found", "--wait=false"])?;
    anyhow::ensure!(
        deleted
            .lines()
            .any(|l| l == r#"namespace "cert-manager" deleted"#)
            && deleted.lines().all(|l| l.contains(" deleted")),
        "{deleted}"
    );
    eventually(
        "the cert-manager namespace, its Issuer and the definitions to be gone",
        Duration::from_secs(30),
        || async {
            let ns = c.kubectl(&["get", "namespace", "cert-manager"])?;
            let crds = c.kubectl_ok(&["get", "crd", "-o", "name"])?;
            let roles = c.kubectl_ok(&["get", "clusterroles", "-o", "name"])?;
            Ok((!ns.status.success()
                && !crds.contains("cert-manager.io")
                && !roles.contains("cert-manager"))
            .then_some(()))
        },
    )
    .await?;
    let left = c.kubectl_ok(&[
        "get",
        "roles,rolebindings",
        "-n",
        "kube-system",
        "-o",
        "name",
    ])?;
    anyhow::ensure!(
        !left.contains("cert-manager"),
        "left in kube-system: {left}"
    );
    Ok(())
}
