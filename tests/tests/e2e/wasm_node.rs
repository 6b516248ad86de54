//! The reference walk on `skiff up` with the wasm bootcamp app, end to end with real parts:
//! a `docker-registry` process, the `skiff` binary (API server + agent + wasmtime), pod
//! addresses on a bridge — all inside a network namespace of the test's own.
//! Needs root, iproute2, curl, docker-registry and the samples (`samples/build.sh`).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, SkiffUp};

fn curl(ns: &Netns, ip: &str) -> anyhow::Result<String> {
    ns.run(&[
        "curl",
        "-sf",
        "--max-time",
        "5",
        &format!("http://{ip}:8080/"),
    ])
}

/// Every ready bootcamp pod answers at its pod IP with its own name and `version`.
fn check_answers(up: &SkiffUp, ns: &Netns, want: usize, version: &str) -> anyhow::Result<()> {
    let pods = up.pod_ips(ns, "app=kubernetes-bootcamp")?;
    anyhow::ensure!(
        pods.len() == want,
        "{} pods, wanted {want}: {pods:?}",
        pods.len()
    );
    let mut names = BTreeSet::new();
    for (name, ip) in &pods {
        let body = curl(ns, ip)?;
        anyhow::ensure!(
            body == format!("Hello Kubernetes bootcamp! | Running on: {name} | v={version}\n"),
            "pod {name} at {ip} answered {body:?}"
        );
        names.insert(name.clone());
    }
    anyhow::ensure!(names.len() == want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_walk_with_wasm_pods() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(
        &ns,
        &[
            ("bootcamp-v1.wasm", "bootcamp:v1"),
            ("bootcamp-v2.wasm", "bootcamp:v2"),
            ("hello-command.wasm", "hello:v1"),
        ],
    )?;

    // create → one pod answering at its pod IP
    up.create_bootcamp(&ns, 1)?;
    up.rolled_out(&ns, "kubernetes-bootcamp", Duration::from_secs(60))?;
    check_answers(&up, &ns, 1, "1")?;
    let node = up.json(&ns, &["get", "node", "edge-1"])?;
    assert_eq!(
        node["metadata"]["labels"][skiff_api::WASM_NODE_LABEL],
        "true"
    );

    // scale to 4: four pods, each answering with its own name
    up.skiff(
        &ns,
        &["scale", "deployments/kubernetes-bootcamp", "--replicas=4"],
    )?;
    up.rolled_out(&ns, "kubernetes-bootcamp", Duration::from_secs(60))?;
    check_answers(&up, &ns, 4, "1")?;

    // set image v2, then roll back to v1
    up.set_bootcamp_image(&ns, "v2")?;
    up.rolled_out(&ns, "kubernetes-bootcamp", Duration::from_secs(60))?;
    eventually("four v2 pods", Duration::from_secs(20), || async {
        Ok(check_answers(&up, &ns, 4, "2").ok())
    })
    .await?;
    up.skiff(&ns, &["rollout", "undo", "deployments/kubernetes-bootcamp"])?;
    up.rolled_out(&ns, "kubernetes-bootcamp", Duration::from_secs(60))?;
    eventually("four v1 pods", Duration::from_secs(20), || async {
        Ok(check_answers(&up, &ns, 4, "1").ok())
    })
    .await?;

    // A command pod: its output is its log, its exit code its status.
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  restartPolicy: Never\n  containers:\n  - name: hello\n    image: 127.0.0.1:5000/hello:v1\n    args: [\"first\"]\n    env:\n    - {name: EXIT_CODE, value: \"3\"}\n")?;
    up.skiff(&ns, &["apply", "-f", job.to_str().unwrap()])?;
    let status = eventually(
        "the command pod to finish",
        Duration::from_secs(30),
        || async {
            let p = up.json(&ns, &["get", "pod", "hello"])?;
            Ok((p["status"]["phase"] == "Failed").then(|| p["status"].clone()))
        },
    )
    .await?;
    assert_eq!(
        status["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        3
    );
    let logs = up.skiff(&ns, &["logs", "hello"])?;
    assert!(
        logs.contains("hello from hello")
            && logs.contains("arg 1: first")
            && logs.contains("exiting with 3"),
        "{logs}"
    );
    // The real kubectl reads the same logs through the API server.
    let kc = up.dir.join("kubeconfig");
    let by_kubectl = ns.run(&[
        "kubectl",
        "--kubeconfig",
        kc.to_str().unwrap(),
        "logs",
        "hello",
    ])?;
    assert_eq!(by_kubectl, logs);

    // An image that is not there: ErrImagePull, then ImagePullBackOff with the registry's message.
    up.skiff(
        &ns,
        &["run", "missing", "--image=127.0.0.1:5000/nothere:v1"],
    )?;
    let reason = eventually("a pull error", Duration::from_secs(30), || async {
        let p = up.json(&ns, &["get", "pod", "missing"])?;
        Ok(
            p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                .as_str()
                .filter(|r| r.contains("Image"))
                .map(|r| {
                    (
                        r.to_string(),
                        p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    )
                }),
        )
    })
    .await?;
    assert!(
        reason.0 == "ErrImagePull" || reason.0 == "ImagePullBackOff",
        "{reason:?}"
    );
    assert!(
        reason.1.to_lowercase().contains("unknown")
            || reason.1.contains("not found")
            || reason.1.contains("404"),
        "{reason:?}"
    );
    up.skiff(&ns, &["delete", "pod", "missing", "hello"])?;

    // A configMap volume, seen by the guest as a read-only directory.
    let cm = dir.path().join("cm.yaml");
    std::fs::write(&cm, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: greeting\ndata:\n  message.txt: \"hi from a configmap\"\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: reader\nspec:\n  restartPolicy: Never\n  volumes:\n  - name: cfg\n    configMap: {name: greeting}\n  containers:\n  - name: hello\n    image: 127.0.0.1:5000/hello:v1\n    env:\n    - {name: CAT_FILE, value: /config/message.txt}\n    volumeMounts:\n    - {name: cfg, mountPath: /config}\n")?;
    up.skiff(&ns, &["apply", "-f", cm.to_str().unwrap()])?;
    eventually(
        "the reader pod to succeed",
        Duration::from_secs(30),
        || async {
            let p = up.json(&ns, &["get", "pod", "reader"])?;
            Ok((p["status"]["phase"] == "Succeeded").then_some(()))
        },
    )
    .await?;
    let logs = up.skiff(&ns, &["logs", "reader"])?;
    assert!(logs.contains("hi from a configmap"), "{logs}");
    up.skiff(&ns, &["delete", "pod", "reader"])?;

    // Readiness probes: a pod whose probe passes is Ready; one probing a port nothing serves
    // keeps running but never becomes Ready, and says why in its events.
    let probed = dir.path().join("probed.yaml");
    let pod = |name: &str, port: u16| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: web\n    image: 127.0.0.1:5000/bootcamp:v1\n    ports: [{{containerPort: 8080, name: http}}]\n    readinessProbe:\n      httpGet: {{path: /, port: {port}}}\n      periodSeconds: 1\n      failureThreshold: 1\n")
    };
    std::fs::write(
        &probed,
        format!("{}---\n{}", pod("probe-ok", 8080), pod("probe-bad", 9999)),
    )?;
    up.skiff(&ns, &["apply", "-f", probed.to_str().unwrap()])?;
    eventually("probe-ok Ready", Duration::from_secs(20), || async {
        let p = up.json(&ns, &["get", "pod", "probe-ok"])?;
        Ok(p["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .then_some(()))
    })
    .await?;
    eventually("probe-bad Unhealthy", Duration::from_secs(20), || async {
        let ev = up.json(
            &ns,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=probe-bad",
            ],
        )?;
        Ok(ev["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["reason"] == "Unhealthy"))
            .then_some(()))
    })
    .await?;
    let bad = up.json(&ns, &["get", "pod", "probe-bad"])?;
    assert_eq!(bad["status"]["phase"], "Running");
    assert!(
        bad["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "False"),
        "{}",
        bad["status"]
    );
    up.skiff(&ns, &["delete", "-f", probed.to_str().unwrap()])?;

    // kill -9 and start again: the same pods come back, not duplicated, from the compile cache.
    let before: BTreeSet<(String, String)> = up
        .pod_ips(&ns, "app=kubernetes-bootcamp")?
        .into_iter()
        .collect();
    ns.kill(up.index)?;
    let up = SkiffUp::start(&mut ns, dir.path(), &[]).await?;
    eventually(
        "the same four pods serving again",
        Duration::from_secs(30),
        || async {
            let now: BTreeSet<(String, String)> = up
                .pod_ips(&ns, "app=kubernetes-bootcamp")?
                .into_iter()
                .collect();
            Ok((now == before && check_answers(&up, &ns, 4, "1").is_ok()).then_some(()))
        },
    )
    .await?;
    let events = up.json(&ns, &["get", "events"])?;
    let cached = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("compile cache"))
        })
        .count();
    assert!(
        cached >= 4,
        "restarted pods were served from the compile cache ({cached} events say so)"
    );

    up.skiff(&ns, &["delete", "deployment", "kubernetes-bootcamp"])?;
    eventually("pods gone", Duration::from_secs(30), || async {
        Ok(up
            .pod_ips(&ns, "app=kubernetes-bootcamp")?
            .is_empty()
            .then_some(()))
    })
    .await?;
    let _: Value = up.json(&ns, &["get", "deployments"])?;
    Ok(())
}
