//! OCI containers end to end on `skiff up` with real parts: docker-registry, skopeo, runc, the
//! CNI plugins, kubectl, curl, inside a network namespace of the test's own. The bootcamp app
//! as an OCI image (built from source by `samples/build.sh`, no base image) answers at its
//! pod IP; exec works through the API server; containers are isolated; a crashing container
//! backs off; wasm and OCI containers share a pod's localhost; one service balances over
//! both kinds; an agent restart re-adopts running containers.
//! Needs root, iproute2, runc, containernetworking-plugins, skopeo, curl, docker-registry.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, SkiffUp};

const ROLLOUT: Duration = Duration::from_secs(90);

/// GET `url` from inside `ns`, retried for up to 20 s: a pod without a readiness probe is Ready
/// once its containers run, which may be before its app listens.
fn curl(ns: &Netns, url: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match ns.run(&["curl", "-sf", "--max-time", "5", url]) {
            Ok(body) => return Ok(body),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e.context(format!("no answer from {url} within 20 s")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The node's OCI label and its OCI runtime condition.
fn oci_node(up: &SkiffUp, ns: &Netns) -> anyhow::Result<(Value, Value)> {
    let node = up.json(ns, &["get", "node", "edge-1"])?;
    let cond = node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == skiff_api::OCI_CONDITION)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no {} condition", skiff_api::OCI_CONDITION))?;
    Ok((
        node["metadata"]["labels"][skiff_api::OCI_NODE_LABEL].clone(),
        cond,
    ))
}

/// `skiff exec POD -- ARGS`: (exit code, stdout, stderr).
fn exec(
    up: &SkiffUp,
    ns: &Netns,
    pod: &str,
    args: &[&str],
) -> anyhow::Result<(i32, String, String)> {
    let mut a = vec!["exec", pod, "--"];
    a.extend_from_slice(args);
    let out = up.skiff_output(ns, &a)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

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

fn pod_status(up: &SkiffUp, ns: &Netns, pod: &str) -> anyhow::Result<Value> {
    Ok(up.json(ns, &["get", "pod", pod])?["status"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_pods_answer_exec_are_isolated_and_crash_loops_back_off() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    // zstd first: skopeo reuses a gzip blob the registry already has instead of recompressing.
    up.push_image(
        &ns,
        "bootcamp-oci:v1",
        "zstd-layers:v1",
        &["--dest-compress", "--dest-compress-format", "zstd"],
    )?;
    up.push_images(
        &ns,
        &[
            ("bootcamp-oci:v1", "bootcamp-oci:v1"),
            ("bootcamp-oci:v2", "bootcamp-oci:v2"),
            ("bootcamp-oci:foreign", "bootcamp-oci:foreign"),
        ],
    )?;

    // The node says it runs OCI containers.
    let (label, cond) = oci_node(&up, &ns)?;
    assert_eq!(label, "true");
    assert_eq!(cond["status"], "True", "{cond}");

    // Two replicas of the OCI bootcamp app, each answering at its pod IP with its name.
    up.skiff(
        &ns,
        &[
            "create",
            "deployment",
            "web",
            "--image=127.0.0.1:5000/bootcamp-oci:v1",
            "--port=8080",
            "--replicas=2",
        ],
    )?;
    up.rolled_out(&ns, "web", ROLLOUT)?;
    let web = up.pod_ips(&ns, "app=web")?;
    assert_eq!(web.len(), 2, "{web:?}");
    for (name, ip) in &web {
        let body = curl(&ns, &format!("http://{ip}:8080/"))?;
        assert_eq!(
            body,
            format!("Hello Kubernetes bootcamp! | Running on: {name} | v=1\n")
        );
        let st = pod_status(&up, &ns, name)?;
        let cs = &st["containerStatuses"][0];
        assert!(
            cs["containerID"].as_str().unwrap().starts_with("runc://"),
            "{cs}"
        );
        assert!(cs["imageID"].as_str().unwrap().contains("@sha256:"), "{cs}");
        assert_eq!(st["podIP"].as_str(), Some(ip.as_str()));
    }
    let (a, b) = (&web[0].0, &web[1].0);

    // The same image as a Docker v2 manifest, with zstd layers (pushed above), and behind a
    // multi-platform index (this node's image is picked).
    up.push_image(
        &ns,
        "bootcamp-oci:v1",
        "docker-format:v1",
        &["--format", "v2s2"],
    )?;
    up.push_image(&ns, "bootcamp-oci:multi", "multi-platform:v1", &["--all"])?;
    for (pod, image) in [
        ("docker", "docker-format:v1"),
        ("zstd", "zstd-layers:v1"),
        ("multi", "multi-platform:v1"),
    ] {
        up.skiff(
            &ns,
            &["run", pod, &format!("--image=127.0.0.1:5000/{image}")],
        )?;
    }
    for pod in ["docker", "zstd", "multi"] {
        let ip = eventually(
            &format!("pod {pod} to run"),
            Duration::from_secs(60),
            || async {
                let st = pod_status(&up, &ns, pod)?;
                Ok((st["phase"] == "Running")
                    .then(|| st["podIP"].as_str().unwrap_or("").to_string()))
            },
        )
        .await?;
        let body = eventually(
            &format!("pod {pod} to answer"),
            Duration::from_secs(10),
            || async { Ok(curl(&ns, &format!("http://{ip}:8080/")).ok()) },
        )
        .await?;
        assert_eq!(
            body,
            format!("Hello Kubernetes bootcamp! | Running on: {pod} | v=1\n")
        );
    }
    let zstd = ns.run(&[
        "curl",
        "-sf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        "http://127.0.0.1:5000/v2/zstd-layers/manifests/v1",
    ])?;
    assert!(
        zstd.contains("tar+zstd"),
        "the registry holds zstd layers: {zstd}"
    );
    up.skiff(&ns, &["delete", "pod", "docker", "zstd", "multi"])?;

    // Logs of the OCI container, through the API server.
    let logs = up.skiff(&ns, &["logs", a])?;
    assert!(logs.contains(&format!("Running On: {a}")), "{logs}");

    // exec: streams, exit code, stdin, and kubectl's own exec.
    let (code, out, err) = exec(&up, &ns, a, &["sh", "-c", "echo out; echo err >&2; exit 3"])?;
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
    let kube = ns.output(&[
        "kubectl",
        "--kubeconfig",
        up.dir.join("kubeconfig").to_str().unwrap(),
        "exec",
        a,
        "--",
        "hostname",
    ])?;
    assert!(
        kube.status.success(),
        "{}",
        String::from_utf8_lossy(&kube.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&kube.stdout), format!("{a}\n"));
    let cat = ns.output(&[
        "sh",
        "-c",
        &format!(
            "echo piped-in | {} --kubeconfig {} exec -i {a} -- cat",
            skiff_e2e::skiff_binary()?.display(),
            up.dir.join("kubeconfig").display()
        ),
    ])?;
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "piped-in\n");
    // The agent's own endpoint (HTTPS) answers the API server's client certificate only.
    let node = up.json(&ns, &["get", "node", "edge-1"])?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_i64)
        .unwrap();
    for path in [
        format!("pods/default/{a}/log"),
        format!("pods/default/{a}/exec?command=id"),
    ] {
        let code = ns.run(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-k",
            &format!("https://127.0.0.1:{port}/{path}"),
        ])?;
        assert_eq!(code, "401", "{path}");
    }
    // An unknown container is named.
    let (code, _, err) = {
        let out = up.skiff_output(&ns, &["exec", a, "-c", "nope", "--", "true"])?;
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_ne!(code, Some(0));
    assert!(err.contains("nope"), "{err}");

    // Isolation: a container sees its own processes only, not the host's files, not the
    // other pod's files.
    let (_, ps, _) = exec(&up, &ns, b, &["ps", "-o", "pid,comm"])?;
    let procs: Vec<&str> = ps
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert!(procs.iter().all(|p| *p == "bootcamp" || *p == "ps"), "{ps}");
    assert!(
        ps.lines().nth(1).unwrap_or("").trim().starts_with("1 "),
        "PID 1 is the app: {ps}"
    );
    let marker = std::env::temp_dir().join(format!("skiff-host-marker-{}", std::process::id()));
    std::fs::write(&marker, "host")?;
    let (code, _, _) = exec(&up, &ns, b, &["ls", marker.to_str().unwrap()])?;
    assert_ne!(code, 0, "the host's files are not visible");
    std::fs::remove_file(&marker)?;
    let (code, _, _) = exec(&up, &ns, a, &["touch", "/tmp/only-in-a"])?;
    assert_eq!(code, 0);
    let (code, _, _) = exec(&up, &ns, b, &["ls", "/tmp/only-in-a"])?;
    assert_ne!(code, 0, "another pod's files are not visible");
    let (_, root, _) = exec(&up, &ns, b, &["ls", "/"])?;
    assert!(
        !root.contains("home") && !root.contains("usr"),
        "only the image's root: {root}"
    );
    // Unprivileged: no mounts (seccomp and capabilities).
    let (code, _, _) = exec(&up, &ns, b, &["mount", "-t", "tmpfs", "x", "/mnt"])?;
    assert_ne!(code, 0);

    // A container exiting at once: CrashLoopBackOff with its exit code and a growing backoff.
    apply(
        &up,
        &ns,
        dir.path(),
        "crash.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: crash}\nspec:\n  containers:\n  - name: c\n    image: 127.0.0.1:5000/bootcamp-oci:v1\n    command: [/bin/sh, -c, 'echo dying; exit 3']\n",
    )?;
    eventually(
        "crash to back off twice",
        Duration::from_secs(60),
        || async {
            let st = pod_status(&up, &ns, "crash")?;
            let cs = &st["containerStatuses"][0];
            let waiting = cs
                .pointer("/state/waiting/message")
                .and_then(Value::as_str)
                .unwrap_or("");
            Ok(
                (cs["restartCount"].as_i64() >= Some(2) && waiting.contains("back-off 40s")).then(
                    || {
                        assert_eq!(
                            cs.pointer("/state/waiting/reason"),
                            Some(&Value::from("CrashLoopBackOff"))
                        );
                        assert_eq!(
                            cs.pointer("/lastState/terminated/exitCode"),
                            Some(&Value::from(3))
                        );
                    },
                ),
            )
        },
    )
    .await?;
    let prev = up.skiff(&ns, &["logs", "crash", "--previous"])?;
    assert_eq!(prev, "dying\n");

    // An image for another architecture: a clear pull error.
    up.skiff(
        &ns,
        &[
            "run",
            "foreign",
            "--image=127.0.0.1:5000/bootcamp-oci:foreign",
        ],
    )?;
    eventually(
        "the foreign image to fail",
        Duration::from_secs(30),
        || async {
            let st = pod_status(&up, &ns, "foreign")?;
            let msg = st
                .pointer("/containerStatuses/0/state/waiting/message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            Ok(msg.contains("is built for linux/").then_some(msg))
        },
    )
    .await
    .map(|msg| assert!(msg.contains("this node is linux/"), "{msg}"))?;

    // A layer that does not match its digest (v2's own layer, changed in the registry's
    // storage): the pull fails, and nothing of it is unpacked into the store.
    let layout =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/build/bootcamp-oci");
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifest_of = |tag: &str| -> anyhow::Result<Value> {
        let m = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap();
        let hex = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        Ok(serde_json::from_slice(&std::fs::read(
            layout.join("blobs/sha256").join(hex),
        )?)?)
    };
    let v2_layer = manifest_of("v2")?["layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let stored = dir
        .path()
        .join("registry/docker/registry/v2/blobs/sha256")
        .join(&v2_layer[..2])
        .join(&v2_layer)
        .join("data");
    let mut bytes = std::fs::read(&stored)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&stored, bytes)?;
    up.skiff(
        &ns,
        &["run", "tampered", "--image=127.0.0.1:5000/bootcamp-oci:v2"],
    )?;
    let msg = eventually(
        "the tampered image to fail",
        Duration::from_secs(30),
        || async {
            let st = pod_status(&up, &ns, "tampered")?;
            let msg = st
                .pointer("/containerStatuses/0/state/waiting/message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            Ok(msg.contains("digest").then_some(msg))
        },
    )
    .await?;
    assert!(msg.contains(&v2_layer[..12]), "{msg}");
    let layers = std::fs::read_dir(up.dir.join("agent/oci/images/layers"))?.count();
    assert_eq!(layers, 2, "v1's two layers only (v2 shares the base one)");

    // Deleting the pods stops their containers and removes their networks.
    up.skiff(&ns, &["delete", "deployment", "web"])?;
    up.skiff(&ns, &["delete", "pod", "crash", "foreign", "tampered"])?;
    eventually("containers to be gone", Duration::from_secs(60), || async {
        let out = ns.run(&[
            "runc",
            "--root",
            up.dir.join("agent/oci/runc").to_str().unwrap(),
            "list",
            "-q",
        ])?;
        let netns = std::fs::read_dir(up.dir.join("agent/oci/netns"))?.count();
        Ok((out.trim().is_empty() && netns == 0).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_and_oci_share_pods_and_services_and_survive_an_agent_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(
        &ns,
        &[
            ("bootcamp-v1.wasm", "bootcamp:v1"),
            ("fetch.wasm", "fetch:v1"),
        ],
    )?;
    up.push_images(&ns, &[("bootcamp-oci:v2", "bootcamp-oci:v2")])?;

    // One pod, a wasm container and an OCI one, on one localhost: the wasm component fetches
    // from the OCI server at localhost:8081, and the OCI container reaches the component at
    // localhost:8080.
    apply(
        &up,
        &ns,
        dir.path(),
        "mixed.yaml",
        r#"apiVersion: v1
kind: Pod
metadata: {name: mixed}
spec:
  containers:
  - name: fetch
    image: 127.0.0.1:5000/fetch:v1
    ports: [{containerPort: 8080}]
    env: [{name: UPSTREAM, value: "http://localhost:8081/"}]
  - name: side
    image: 127.0.0.1:5000/bootcamp-oci:v2
    env: [{name: PORT, value: "8081"}]
    ports: [{containerPort: 8081, hostPort: 18081}]
"#,
    )?;
    let ip = eventually(
        "the mixed pod to be ready",
        Duration::from_secs(60),
        || async {
            let st = pod_status(&up, &ns, "mixed")?;
            let ready = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            Ok(ready.then(|| st["podIP"].as_str().unwrap_or("").to_string()))
        },
    )
    .await?;
    let hello = "Hello Kubernetes bootcamp! | Running on: mixed | v=2\n";
    let body = curl(&ns, &format!("http://{ip}:8080/"))?;
    assert_eq!(
        body,
        format!("fetched http://localhost:8081/ from mixed: 200 {hello}")
    );
    let (code, out, err) = exec(
        &up,
        &ns,
        "mixed",
        &["wget", "-qO-", "http://localhost:8080/"],
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, body,
        "the OCI container reaches the wasm one on localhost"
    );

    // One service over a wasm deployment (v=1) and an OCI one (v=2).
    for (name, image) in [
        ("mixed-wasm", "bootcamp:v1"),
        ("mixed-oci", "bootcamp-oci:v2"),
    ] {
        apply(
            &up,
            &ns,
            dir.path(),
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: both, kind: {name}}}}}\n  template:\n    metadata: {{labels: {{app: both, kind: {name}}}}}\n    spec:\n      containers:\n      - {{name: app, image: 127.0.0.1:5000/{image}, ports: [{{containerPort: 8080}}]}}\n"
            ),
        )?;
    }
    apply(
        &up,
        &ns,
        dir.path(),
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: both}\nspec:\n  type: NodePort\n  selector: {app: both}\n  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]\n",
    )?;
    up.rolled_out(&ns, "mixed-wasm", ROLLOUT)?;
    up.rolled_out(&ns, "mixed-oci", ROLLOUT)?;
    let answers = eventually(
        "answers from both kinds",
        Duration::from_secs(30),
        || async {
            let mut seen = BTreeSet::new();
            for _ in 0..24 {
                if let Ok(body) = curl(&ns, "http://127.0.0.1:30080/") {
                    seen.insert(body);
                }
            }
            let v1 = seen.iter().filter(|b| b.ends_with("v=1\n")).count();
            let v2 = seen.iter().filter(|b| b.ends_with("v=2\n")).count();
            Ok((v1 == 2 && v2 == 2).then_some(seen))
        },
    )
    .await?;
    assert_eq!(answers.len(), 4, "four pods, two of each kind: {answers:?}");

    // kill -9 the node and start it again: the OCI containers keep running and are taken
    // over, not started twice.
    let pids = up.containers(&ns)?;
    assert_eq!(pids.len(), 3, "side + 2 mixed-oci: {pids:?}");
    ns.kill(up.index)?;
    let up = SkiffUp::start(&mut ns, dir.path(), &[]).await?;
    eventually(
        "the pods to be ready again",
        Duration::from_secs(60),
        || async {
            let oci = up.pod_ips(&ns, "kind=mixed-oci")?;
            let ready = up.json(&ns, &["get", "pods"])?["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| {
                    p["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .count();
            Ok((oci.len() == 2 && ready == 5).then_some(()))
        },
    )
    .await?;
    let pids_after = up.containers(&ns)?;
    assert_eq!(pids, pids_after, "the same containers, the same processes");
    for (name, ip) in up.pod_ips(&ns, "kind=mixed-oci")? {
        assert_eq!(
            curl(&ns, &format!("http://{ip}:8080/"))?,
            format!("Hello Kubernetes bootcamp! | Running on: {name} | v=2\n")
        );
    }
    assert_eq!(
        curl(&ns, &format!("http://{ip}:8080/"))?,
        format!("fetched http://localhost:8081/ from mixed: 200 {hello}")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_runc_says_so_and_oci_pods_wait_for_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &["--disable-oci"]).await?;
    up.push_samples(&ns, &[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    up.push_images(&ns, &[("bootcamp-oci:v1", "bootcamp-oci:v1")])?;
    let (label, cond) = oci_node(&up, &ns)?;
    assert_eq!(label, "false");
    assert_eq!(cond["status"], "False");
    assert!(
        cond["message"].as_str().unwrap().contains("disabled"),
        "{cond}"
    );

    up.skiff(
        &ns,
        &["run", "oci", "--image=127.0.0.1:5000/bootcamp-oci:v1"],
    )?;
    up.skiff(&ns, &["run", "wasm", "--image=127.0.0.1:5000/bootcamp:v1"])?;
    let why = eventually(
        "the OCI pod to be unschedulable",
        Duration::from_secs(30),
        || async {
            let st = pod_status(&up, &ns, "oci")?;
            let c = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                .cloned();
            Ok(c.map(|c| c["message"].as_str().unwrap_or("").to_string()))
        },
    )
    .await?;
    assert_eq!(
        why,
        "0/1 nodes are available: 1 node(s) cannot run OCI containers (no runc)."
    );
    eventually("the wasm pod to run", Duration::from_secs(30), || async {
        Ok((pod_status(&up, &ns, "wasm")?["phase"] == "Running").then_some(()))
    })
    .await?;
    assert_eq!(pod_status(&up, &ns, "oci")?["phase"], "Pending");
    Ok(())
}
