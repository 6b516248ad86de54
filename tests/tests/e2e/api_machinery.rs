//! The API machinery clients rely on, driven by the real kubectl and the official Python
//! client (`pip install kubernetes`, run from `tests/python/api_machinery.py`): OpenAPI
//! (`kubectl explain`, client-side validation), lists in pages (`kubectl get --chunk-size`),
//! `nodePort: 0`, unsupported field selectors, a resourceVersion from the future, and the
//! `kube-root-ca.crt` ConfigMap of every namespace.

use std::time::Duration;

use skiff_e2e::{eventually, TestCluster};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: checked
spec:
  replicas: 0
  selector:
    matchLabels: {app: checked}
  template:
    metadata:
      labels: {app: checked}
    spec:
      containers:
      - name: c
        image: example.com/none:v1
"#;

const TOKEN_REVIEW: &str = r#"
apiVersion: authentication.k8s.io/v1
kind: TokenReview
spec:
  token: not-a-token
"#;

fn write(cluster: &TestCluster, name: &str, text: &str) -> anyhow::Result<String> {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_machinery_as_clients_use_it() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;

    // OpenAPI: explain reads the v3 schemas.
    let out = cluster.kubectl_ok(&["explain", "deployment.spec.replicas"])?;
    assert!(out.contains("replicas <integer>"), "{out}");
    assert!(out.contains("Number of desired pods"), "{out}");
    let out = cluster.kubectl_ok(&["explain", "pods.spec.containers.ports"])?;
    assert!(out.contains("containerPort"), "{out}");

    // Created with kubectl's default (strict) validation.
    let deploy = write(&cluster, "deploy.yaml", DEPLOYMENT)?;
    cluster.kubectl_ok(&["create", "-f", &deploy])?;
    // kubectl validates a TokenReview itself (it has no PATCH to learn server-side field
    // validation from): it reads the protobuf /openapi/v2, then asks whether the kind is a
    // CustomResourceDefinition's, which needs apiextensions.k8s.io to be served.
    let review = write(&cluster, "review.yaml", TOKEN_REVIEW)?;
    let crds_served = cluster
        .kubectl(&["get", "--raw", "/apis/apiextensions.k8s.io/v1"])?
        .status
        .success();
    let created = cluster.kubectl(&["create", "-f", &review, "-o", "json"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    if crds_served {
        assert!(created.status.success(), "{text}");
        assert!(text.contains("\"authenticated\""), "{text}");
    } else {
        assert!(text.contains("failed to list CRDs"), "{text}");
        assert!(!text.contains("failed to download openapi"), "{text}");
    }

    // Lists in pages: kubectl asks for 2 at a time and follows the continue tokens.
    for i in 0..7 {
        cluster.kubectl_ok(&[
            "create",
            "configmap",
            &format!("page-{i}"),
            "--from-literal=a=b",
        ])?;
    }
    let paged = cluster.kubectl(&["get", "configmaps", "--chunk-size=2", "-v=6"])?;
    let (stdout, log) = (
        String::from_utf8_lossy(&paged.stdout),
        String::from_utf8_lossy(&paged.stderr),
    );
    assert!(paged.status.success(), "{log}");
    for i in 0..7 {
        assert!(stdout.contains(&format!("page-{i}")), "{stdout}");
    }
    assert!(log.contains("configmaps?limit=2"), "{log}");
    // 7 or 8 ConfigMaps (kube-root-ca.crt may be there already): 4 pages.
    assert_eq!(log.matches("configmaps?continue=").count(), 3, "{log}");

    // `kubectl create service nodeport` sends `nodePort: 0`: one is allocated.
    cluster.kubectl_ok(&["create", "service", "nodeport", "np", "--tcp=8080:8080"])?;
    let port = cluster.kubectl_ok(&[
        "get",
        "service",
        "np",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ])?;
    let port: u16 = port.trim().parse()?;
    assert!((30000..=32767).contains(&port), "{port}");

    // Selecting on a field Kubernetes does not index is a 400, as it is there.
    let out = cluster.kubectl(&["get", "pods", "--field-selector", "spec.image=x"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("field label not supported: spec.image"),
        "{err}"
    );

    // A resourceVersion the store has not reached: 504 with the cause.
    let out = cluster.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps/page-0?resourceVersion=999999999",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("Too large resource version"), "{err}");

    // kube-root-ca.crt: the cluster CA in every namespace, put back when deleted or changed.
    let ca = || {
        cluster
            .kubectl(&[
                "get",
                "configmap",
                "kube-root-ca.crt",
                "-o",
                "jsonpath={.data.ca\\.crt}",
            ])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let want = cluster.server.ca_pem.trim().to_string();
    eventually(
        "kube-root-ca.crt in default",
        Duration::from_secs(10),
        || async { Ok(ca()?.trim().eq(&want).then_some(())) },
    )
    .await?;
    cluster.kubectl_ok(&["delete", "configmap", "kube-root-ca.crt"])?;
    eventually(
        "kube-root-ca.crt made again",
        Duration::from_secs(10),
        || async { Ok(ca()?.trim().eq(&want).then_some(())) },
    )
    .await?;
    cluster.kubectl_ok(&[
        "patch",
        "configmap",
        "kube-root-ca.crt",
        "--type=merge",
        "-p",
        r#"{"data":{"ca.crt":"tampered"}}"#,
    ])?;
    eventually(
        "kube-root-ca.crt put back",
        Duration::from_secs(10),
        || async { Ok(ca()?.trim().eq(&want).then_some(())) },
    )
    .await?;

    // The official Python client: pages, a watch, the dynamic client.
    cluster
        .python_client("api_machinery.py", "python-client")
        .await?;
    let in_new_ns =
        cluster.kubectl_ok(&["get", "configmaps", "-n", "python-client", "-o", "name"])?;
    assert!(
        in_new_ns.contains("configmap/kube-root-ca.crt"),
        "{in_new_ns}"
    );
    Ok(())
}
