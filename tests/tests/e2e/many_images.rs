//! Many never-seen images at once on `skiff up`: several wasm components and two OCI images
//! (sharing their base layer) pushed to a fresh registry, then deployments of all of them
//! created together, so the node pulls one blob or layer for several pods at a time and
//! compiles one component for several pods at a time. Every pod must come up Ready at the
//! first attempt: none fails, none restarts, no replacement pod is made.
//! Needs root, iproute2, runc, containernetworking-plugins, skopeo, curl, docker-registry and
//! the samples (`samples/build.sh`).

use std::time::Duration;

use serde_json::Value;
use skiff_e2e::eventually;
use skiff_e2e::netns::SkiffUp;

/// (deployment, image, replicas, what each pod answers on `/` after its pod name, if checked).
const DEPLOYMENTS: &[(&str, &str, usize, Option<&str>)] = &[
    ("wasm-v1", "bootcamp:v1", 4, Some(" | v=1\n")),
    ("wasm-v2", "bootcamp:v2", 4, Some(" | v=2\n")),
    ("fetch", "fetch:v1", 3, None),
    ("py", "python-hello:v1", 2, None),
    ("oci-v1", "bootcamp-oci:v1", 4, Some(" | v=1\n")),
    ("oci-v2", "bootcamp-oci:v2", 4, Some(" | v=2\n")),
];

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_new_images_at_once_all_pods_ready_at_the_first_attempt() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(
        &ns,
        &[
            ("bootcamp-v1.wasm", "bootcamp:v1"),
            ("bootcamp-v2.wasm", "bootcamp:v2"),
            ("fetch.wasm", "fetch:v1"),
            ("python-hello.wasm", "python-hello:v1"),
        ],
    )?;
    up.push_images(
        &ns,
        &[
            ("bootcamp-oci:v1", "bootcamp-oci:v1"),
            ("bootcamp-oci:v2", "bootcamp-oci:v2"),
        ],
    )?;

    // All at once: every replica of an image is pulled (and compiled) by the node together.
    for (name, image, replicas, _) in DEPLOYMENTS {
        up.skiff(
            &ns,
            &[
                "create",
                "deployment",
                name,
                &format!("--image=127.0.0.1:5000/{image}"),
                "--port=8080",
                &format!("--replicas={replicas}"),
            ],
        )?;
    }
    let total: usize = DEPLOYMENTS.iter().map(|d| d.2).sum();
    // The Python component (18 MB, CPython inside) takes long to compile on a busy machine.
    // A pod that failed, restarted or was replaced ends the wait at once (Some(Err)).
    let outcome = eventually(
        &format!("all {total} pods Ready"),
        Duration::from_secs(600),
        || async {
            let list = up.json(&ns, &["get", "pods"])?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            let broken = || -> anyhow::Result<()> {
                for p in &items {
                    let phase = p["status"]["phase"].as_str().unwrap_or("");
                    anyhow::ensure!(
                        phase != "Failed",
                        "pod {} failed: {}",
                        p["metadata"]["name"],
                        p["status"]
                    );
                    for cs in p["status"]["containerStatuses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        anyhow::ensure!(
                            cs["restartCount"].as_i64().unwrap_or(0) == 0,
                            "pod {} restarted: {cs}",
                            p["metadata"]["name"]
                        );
                        // Every image is in the registry: a pull or start error is a defect.
                        let waiting = cs["state"]["waiting"]["reason"].as_str().unwrap_or("");
                        anyhow::ensure!(
                            !waiting.ends_with("Error") && !waiting.ends_with("BackOff"),
                            "pod {}: {cs}",
                            p["metadata"]["name"]
                        );
                    }
                }
                anyhow::ensure!(
                    items.len() <= total,
                    "{} pods for {total} replicas: some were replaced",
                    items.len()
                );
                Ok(())
            };
            if let Err(e) = broken() {
                return Ok(Some(Err(e)));
            }
            Ok((items.len() == total && items.iter().all(ready)).then_some(Ok(items)))
        },
    )
    .await
    .and_then(|o| o);
    let pods = outcome.map_err(|e| {
        let events = up.skiff(&ns, &["get", "events"]).unwrap_or_default();
        e.context(format!("events:\n{events}"))
    })?;

    // Each pod answers at its IP with its own name (and the version it was made from).
    for p in &pods {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        let ip = p["status"]["podIP"].as_str().unwrap_or("");
        let Some((_, _, _, Some(tail))) = DEPLOYMENTS
            .iter()
            .find(|d| p["metadata"]["labels"]["app"] == d.0)
        else {
            continue;
        };
        let body = ns.run(&[
            "curl",
            "-sf",
            "--max-time",
            "5",
            &format!("http://{ip}:8080/"),
        ])?;
        assert_eq!(
            body,
            format!("Hello Kubernetes bootcamp! | Running on: {name}{tail}")
        );
    }

    // No pod met a passing error on the way: no warning event at all.
    let events = up.json(&ns, &["get", "events"])?;
    let warnings: Vec<String> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "Warning")
        .map(|e| {
            format!(
                "{} {}: {}",
                e["involvedObject"]["name"], e["reason"], e["message"]
            )
        })
        .collect();
    assert!(warnings.is_empty(), "warnings: {warnings:#?}");
    Ok(())
}
