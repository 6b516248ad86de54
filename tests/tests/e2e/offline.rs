//! The agent keeps running without the control plane: with `skiff server` and `skiff agent`
//! as separate processes, the server is stopped and the agent killed with -9 and started
//! again while the API is unreachable; it serves the pods it had from its on-disk cache, and
//! when the server is back it catches up without duplicating them.
//! Needs root, iproute2, curl, docker-registry and the samples (`samples/build.sh`).

use std::collections::BTreeSet;
use std::time::Duration;

use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, ServerAndAgent, SkiffUp};

fn pods(up: &SkiffUp, ns: &Netns) -> anyhow::Result<BTreeSet<(String, String)>> {
    Ok(up
        .pod_ips(ns, "app=kubernetes-bootcamp")?
        .into_iter()
        .collect())
}

fn answers(ns: &Netns, pods: &BTreeSet<(String, String)>) -> bool {
    pods.iter().all(|(name, ip)| {
        ns.run(&[
            "curl",
            "-sf",
            "--max-time",
            "2",
            &format!("http://{ip}:8080/"),
        ])
        .map(|b| b.contains(&format!("Running on: {name} |")))
        .unwrap_or(false)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_its_pods_while_the_api_is_away() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new()?;
    ns.start_registry(dir.path()).await?;
    let cluster = ServerAndAgent::start(&mut ns, dir.path()).await?;
    let up = &cluster.up;
    eventually("node edge-1 Ready", Duration::from_secs(30), || async {
        Ok(up
            .skiff(&ns, &["get", "nodes"])
            .ok()
            .filter(|o| o.contains(" Ready"))
            .map(|_| ()))
    })
    .await?;
    up.push_samples(&ns, &[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    up.create_bootcamp(&ns, 2)?;
    up.rolled_out(&ns, "kubernetes-bootcamp", Duration::from_secs(60))?;
    let before = pods(up, &ns)?;
    assert_eq!(before.len(), 2);
    assert!(answers(&ns, &before));

    // The control plane goes away; the agent is killed and started again without it.
    ns.kill(cluster.server)?;
    ns.kill(cluster.agent)?;
    let log2 = dir.path().join("agent-offline.log");
    ns.spawn(&ServerAndAgent::args(&cluster.agent_args), &log2)?;
    eventually(
        "the pods served from the agent's cache",
        Duration::from_secs(30),
        || async { Ok(answers(&ns, &before).then_some(())) },
    )
    .await
    .map_err(|e| {
        let log = std::fs::read_to_string(&log2).unwrap_or_default();
        anyhow::anyhow!("{e}\n--- agent log:\n{log}")
    })?;

    // The control plane returns: the same pods, not new ones, still answering.
    let server = ns.spawn(
        &ServerAndAgent::args(&cluster.server_args),
        &dir.path().join("server-2.log"),
    )?;
    let up = SkiffUp {
        dir: cluster.up.dir.clone(),
        index: server,
        log: log2,
    };
    eventually(
        "the same two pods after reconnecting",
        Duration::from_secs(30),
        || async {
            let now = match pods(&up, &ns) {
                Ok(p) => p,
                Err(_) => return Ok(None),
            };
            Ok((now == before && answers(&ns, &now)).then_some(()))
        },
    )
    .await?;
    Ok(())
}
