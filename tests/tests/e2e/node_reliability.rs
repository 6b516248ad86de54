//! The node agent over a long life: a finished pod gives back its address and is never run
//! again, even by a restarted agent; a pod whose ConfigMap comes later starts once it is
//! there; a pod being deleted keeps its grace period through a relist.
//! Needs root, iproute2, curl, docker-registry, runc, containernetworking-plugins, skopeo and
//! the samples (`samples/build.sh`).

use std::time::Duration;

use serde_json::Value;
use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, ServerAndAgent, SkiffUp};

fn apply(
    up: &SkiffUp,
    ns: &Netns,
    dir: &std::path::Path,
    name: &str,
    manifest: &str,
) -> anyhow::Result<()> {
    let f = dir.join(name);
    std::fs::write(&f, manifest)?;
    up.skiff(ns, &["apply", "-f", f.to_str().unwrap()])?;
    Ok(())
}

/// The events of pod `pod` with reason `reason`.
fn events(up: &SkiffUp, ns: &Netns, pod: &str, reason: &str) -> anyhow::Result<Vec<Value>> {
    Ok(up.json(ns, &["get", "events"])?["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == pod && e["reason"] == reason)
        .cloned()
        .collect())
}

/// The addresses on the node's bridge, as `ip` shows them.
fn bridge_addresses(ns: &Netns) -> anyhow::Result<String> {
    ns.run(&["ip", "-4", "-o", "addr", "show", "dev", "skiff0"])
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_pod_frees_its_address_and_never_runs_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(
        &ns,
        &[
            ("hello-command.wasm", "hello:v1"),
            ("bootcamp-v1.wasm", "bootcamp:v1"),
        ],
    )?;
    apply(
        &up,
        &ns,
        dir.path(),
        "once.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: once}\nspec:\n  restartPolicy: Never\n  containers:\n  - {name: once, image: 127.0.0.1:5000/hello:v1}\n",
    )?;
    let ip = eventually(
        "the command pod to succeed",
        Duration::from_secs(60),
        || async {
            let p = up.json(&ns, &["get", "pod", "once"])?;
            Ok((p["status"]["phase"] == "Succeeded")
                .then(|| p["status"]["podIP"].as_str().unwrap_or("").to_string()))
        },
    )
    .await?;
    anyhow::ensure!(!ip.is_empty(), "the pod had an address while it ran");
    // Finished: its address is off the node at once.
    eventually(
        "the finished pod's address to be released",
        Duration::from_secs(10),
        || async { Ok((!bridge_addresses(&ns)?.contains(&format!("inet {ip}/32"))).then_some(())) },
    )
    .await?;
    // Its log stays while the pod exists.
    assert!(up
        .skiff(&ns, &["logs", "once"])?
        .contains("hello from once"));

    // kill -9 the node and start it again.
    ns.kill(up.index)?;
    let up = SkiffUp::start(&mut ns, dir.path(), &[]).await?;
    // A pod created now runs once the agent has listed its pods again: by then it has seen
    // the finished one too.
    up.skiff(
        &ns,
        &[
            "run",
            "after",
            "--image=127.0.0.1:5000/bootcamp:v1",
            "--port=8080",
        ],
    )?;
    eventually(
        "a new pod to be ready after the restart",
        Duration::from_secs(60),
        || async { Ok(ready(&up.json(&ns, &["get", "pod", "after"])?).then_some(())) },
    )
    .await?;
    let p = up.json(&ns, &["get", "pod", "once"])?;
    assert_eq!(p["status"]["phase"], "Succeeded", "{p}");
    assert_eq!(
        events(&up, &ns, "once", "Started")?.len(),
        1,
        "the command ran once: {:?}",
        events(&up, &ns, "once", "Started")?
    );
    // Its address is free: on the node only if the new pod was given it.
    let after_ip = up.json(&ns, &["get", "pod", "after"])?["status"]["podIP"].clone();
    assert!(
        after_ip == ip.as_str() || !bridge_addresses(&ns)?.contains(&format!("inet {ip}/32")),
        "{ip} still held"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_applied_before_its_configmap_comes_up_with_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(&ns, &[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    apply(
        &up,
        &ns,
        dir.path(),
        "web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: app\n        image: 127.0.0.1:5000/bootcamp:v1\n        ports: [{containerPort: 8080}]\n        volumeMounts: [{name: settings, mountPath: /settings}]\n      volumes:\n      - {name: settings, configMap: {name: web-settings}}\n",
    )?;
    // Without its ConfigMap the container cannot be made; the pod says why and waits.
    let waiting = eventually(
        "the missing ConfigMap to be reported",
        Duration::from_secs(60),
        || async {
            let pods = up.json(&ns, &["get", "pods", "-l", "app=web"])?;
            Ok(pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["status"]["containerStatuses"][0]["state"]["waiting"].clone())
                .find(|w| w["reason"] == "CreateContainerConfigError"))
        },
    )
    .await?;
    assert!(
        waiting["message"]
            .as_str()
            .unwrap_or("")
            .contains("web-settings"),
        "{waiting}"
    );
    apply(
        &up,
        &ns,
        dir.path(),
        "settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web-settings}\ndata: {greeting: hello}\n",
    )?;
    // The next retry (10 s after the first failure) finds it.
    let ip = eventually(
        "the pod to come up with its ConfigMap",
        Duration::from_secs(60),
        || async {
            let pods = up.json(&ns, &["get", "pods", "-l", "app=web"])?;
            Ok(pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| ready(p))
                .map(|p| p["status"]["podIP"].as_str().unwrap_or("").to_string()))
        },
    )
    .await?;
    let body = ns.run(&[
        "curl",
        "-sf",
        "--max-time",
        "5",
        &format!("http://{ip}:8080/"),
    ])?;
    assert!(body.starts_with("Hello Kubernetes bootcamp!"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_delete_survives_a_relist() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new()?;
    ns.start_registry(dir.path()).await?;
    let cluster = ServerAndAgent::start(&mut ns, dir.path()).await?;
    let (server, up) = (cluster.server, &cluster.up);
    eventually("node edge-1 Ready", Duration::from_secs(30), || async {
        Ok(up
            .skiff(&ns, &["get", "nodes"])
            .ok()
            .filter(|o| o.contains("edge-1") && o.contains(" Ready"))
            .map(|_| ()))
    })
    .await?;
    up.push_images(&ns, &[("bootcamp-oci:v2", "bootcamp-oci:v2")])?;
    up.push_samples(&ns, &[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    // A container that ignores TERM: it stops only when its grace period is over. (The
    // finalizer keeps the pod object whatever the control plane does while it restarts, so
    // only the agent decides when the container goes.)
    apply(
        up,
        &ns,
        dir.path(),
        "stubborn.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: stubborn, finalizers: [skiff.test/hold]}\nspec:\n  terminationGracePeriodSeconds: 25\n  containers:\n  - name: app\n    image: 127.0.0.1:5000/bootcamp-oci:v2\n    command: [\"/bin/sh\", \"-c\", \"trap '' TERM; while true; do sleep 1; done\"]\n",
    )?;
    eventually("the OCI pod to run", Duration::from_secs(60), || async {
        Ok(
            (up.json(&ns, &["get", "pod", "stubborn"])?["status"]["phase"] == "Running")
                .then_some(()),
        )
    })
    .await?;
    let agent_up = SkiffUp {
        dir: dir.path().to_path_buf(),
        index: server,
        log: dir.path().join("agent.log"),
    };
    let before = agent_up.containers(&ns)?;
    anyhow::ensure!(before.len() == 1, "one container: {before:?}");
    up.skiff(&ns, &["delete", "pod", "stubborn"])?;
    let deleted_at = std::time::Instant::now();

    // The control plane restarts: the agent's watch breaks, and it lists its pods again
    // while the pod is still in its grace period.
    ns.kill(server)?;
    let server = ns.spawn(
        &ServerAndAgent::args(&cluster.server_args),
        &dir.path().join("server-2.log"),
    )?;
    let up = SkiffUp {
        dir: cluster.up.dir.clone(),
        index: server,
        log: dir.path().join("agent.log"),
    };
    eventually("the API to be back", Duration::from_secs(30), || async {
        Ok(up
            .skiff_output(&ns, &["get", "nodes"])?
            .status
            .success()
            .then_some(()))
    })
    .await?;
    // A pod created now runs once the agent has listed again.
    up.skiff(
        &ns,
        &[
            "run",
            "probe",
            "--image=127.0.0.1:5000/bootcamp:v1",
            "--port=8080",
        ],
    )?;
    eventually(
        "the agent to list its pods again",
        Duration::from_secs(60),
        || async {
            Ok(up
                .json(&ns, &["get", "pod", "probe"])
                .ok()
                .filter(ready)
                .map(|_| ()))
        },
    )
    .await?;
    anyhow::ensure!(
        deleted_at.elapsed() < Duration::from_secs(20),
        "the relist came too late to tell ({:?})",
        deleted_at.elapsed()
    );
    // Still in its grace period: the same container, still running, and the pod still there.
    assert_eq!(
        agent_up.containers(&ns)?,
        before,
        "the container was killed early"
    );
    let p = up.json(&ns, &["get", "pod", "stubborn"])?;
    assert!(p["metadata"]["deletionTimestamp"].is_string(), "{p}");
    // Once the grace period is over it is killed, and the agent finishes the deletion (the
    // finalizer keeps the object, now with no grace period left).
    eventually(
        "the container to be stopped",
        Duration::from_secs(60),
        || async { Ok(agent_up.containers(&ns)?.is_empty().then_some(())) },
    )
    .await?;
    anyhow::ensure!(
        deleted_at.elapsed() >= Duration::from_secs(24),
        "stopped before its grace period was over ({:?})",
        deleted_at.elapsed()
    );
    eventually(
        "the agent to finish the deletion",
        Duration::from_secs(30),
        || async {
            let p = up.json(&ns, &["get", "pod", "stubborn"])?;
            Ok((p["metadata"]["deletionGracePeriodSeconds"] == 0).then_some(()))
        },
    )
    .await?;
    Ok(())
}
