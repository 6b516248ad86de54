//! Wasm pod start on `skiff up`: pod created through the API → first HTTP 200 at its pod IP,
//! with the image present and the compile cache warm, next to the floor measured in the same
//! run (the runtime alone: load from the cache, listen, first 200), and next to an OCI
//! container of the same app started by the same harness (runc, image present): the
//! wasm-vs-container ratio. Then memory and disk per idle OCI container (20 of one image:
//! shared layers), and agent memory per idle wasm pod with many pods running.
//!
//! The cluster runs in a network namespace of its own; the measuring half of this program
//! re-runs itself inside it. Needs root, docker-registry and `samples/build.sh`.
//! Run: `cargo bench -p skiff-e2e --bench pod_start` (or `scripts/bench.sh`).

use std::time::{Duration, Instant};

use serde_json::json;
use skiff_api::Resource;
use skiff_client::Client;

const STARTS: usize = 40;
const OCI_STARTS: usize = 20;

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

const WASM_IMAGE: &str = "127.0.0.1:5000/bootcamp:v1";
const OCI_IMAGE: &str = "127.0.0.1:5000/bootcamp-oci:v1";

fn pod(name: &str, image: &str) -> serde_json::Value {
    json!({"metadata": {"name": name, "labels": {"bench": "start"}},
           "spec": {"containers": [{"name": "web", "image": image, "ports": [{"containerPort": 8080}]}]}})
}

/// Creates `count` pods of `image` one after the other; the time from each create to its
/// first HTTP 200, after one warm-up pod that pulls the image (and compiles it, for wasm):
/// (the warm-up pod's time, the others' times).
async fn starts(
    http: &reqwest::Client,
    client: &Client,
    prefix: &str,
    image: &str,
    count: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let pods = Resource::lookup("pods").unwrap();
    let warm = format!("{prefix}-warm");
    let t = Instant::now();
    client
        .create_dyn(pods, Some("default"), &pod(&warm, image))
        .await?;
    within(
        Duration::from_secs(60),
        &format!("pod {warm}'s first HTTP 200"),
        first_200(http, client, &warm),
    )
    .await?;
    let first = t.elapsed();
    let mut times = Vec::new();
    for i in 0..count {
        let name = format!("{prefix}-{i}");
        let t = Instant::now();
        client
            .create_dyn(pods, Some("default"), &pod(&name, image))
            .await?;
        within(
            Duration::from_secs(30),
            &format!("pod {name}'s first HTTP 200"),
            first_200(http, client, &name),
        )
        .await?;
        times.push(t.elapsed());
    }
    Ok((first, times))
}

/// `fut`, or an error naming what was waited for once `limit` has passed.
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {limit:?} waiting for {what}"))?
}

/// Memory charged to a container's cgroup (cgroup v1 or v2 layout).
fn cgroup_memory(id: &str) -> u64 {
    [
        format!("/sys/fs/cgroup/memory/skiff/{id}/memory.usage_in_bytes"),
        format!("/sys/fs/cgroup/skiff/{id}/memory.current"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

async fn first_200(http: &reqwest::Client, client: &Client, name: &str) -> anyhow::Result<()> {
    let pods = Resource::lookup("pods").unwrap();
    let ip = loop {
        let p = client.get_dyn(pods, Some("default"), name).await?;
        if let Some(ip) = p["status"]["podIP"].as_str() {
            break ip.to_string();
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    loop {
        if let Ok(r) = http.get(format!("http://{ip}:8080/")).send().await {
            if r.status() == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// The measuring half, inside the namespace.
async fn inner(kubeconfig: &str, agent_pid: u32, data: &std::path::Path) -> anyhow::Result<()> {
    let client = Client::from_kubeconfig(Some(std::path::Path::new(kubeconfig)))?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()?;
    // Two passes over fresh pods: the first on a machine that has not run skiff before (page
    // cache, allocator arenas, CPU frequency all cold), the second the steady figure. Both are
    // printed, so a first run on a new machine is not mistaken for the steady state.
    let (cold, first_pass) = starts(&http, &client, "wasm", WASM_IMAGE, STARTS).await?;
    let (_, times) = starts(&http, &client, "wasm2", WASM_IMAGE, STARTS).await?;
    // The floor: the runtime alone, in this process, same binary and same machine.
    let bytes = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/build/bootcamp-v1.wasm"),
    )?;
    let dir = tempfile::tempdir()?;
    let rt = skiff_wasm::Runtime::new(dir.path(), 64)?;
    rt.load(&bytes[..]).await?;
    let mut floor = Vec::new();
    for _ in 0..STARTS {
        let rt2 = skiff_wasm::Runtime::new(dir.path(), 64)?; // fresh process state, warm disk cache
        let t = Instant::now();
        let p = rt2.load(&bytes[..]).await?;
        let server = rt2.serve_http(
            &p,
            Default::default(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        )?;
        let r = http.get(format!("http://{}/", server.addr)).send().await?;
        anyhow::ensure!(r.status() == 200);
        floor.push(t.elapsed());
    }
    println!("wasm pod start, API create -> first HTTP 200 at the pod IP ({STARTS} pods, image present, compile cache warm):");
    println!("  skiff up:            p50 {:>7.1} ms  p99 {:>7.1} ms   (target p50 <= 10 ms; runwasi 1.2-2 s, runc here ~67 ms)", ms(percentile(times.clone(), 0.5)), ms(percentile(times.clone(), 0.99)));
    println!("  runtime alone floor: p50 {:>7.1} ms  p99 {:>7.1} ms   -> the orchestration adds {:.1} ms at p50",
        ms(percentile(floor.clone(), 0.5)), ms(percentile(floor.clone(), 0.99)), ms(percentile(times.clone(), 0.5)) - ms(percentile(floor, 0.5)));
    println!("  first pass (fresh process, the same {STARTS} starts before the measured pass): p50 {:.1} ms  p99 {:.1} ms",
        ms(percentile(first_pass.clone(), 0.5)), ms(percentile(first_pass, 0.99)));
    println!("  cold, the first pod of the image (pull from the local registry + first compile): {:.1} ms", ms(cold));

    // The same app as an OCI container, same harness: the headline ratio.
    let rss_before_oci = rss_kib(agent_pid);
    let (oci_cold, oci) = starts(&http, &client, "oci", OCI_IMAGE, OCI_STARTS).await?;
    let (w50, o50) = (
        ms(percentile(times.clone(), 0.5)),
        ms(percentile(oci.clone(), 0.5)),
    );
    println!("OCI container start, same harness ({OCI_STARTS} pods, image present; runc + CNI sandbox + overlay rootfs):");
    println!(
        "  skiff up:            p50 {:>7.1} ms  p99 {:>7.1} ms",
        o50,
        ms(percentile(oci, 0.99))
    );
    println!(
        "  cold, the first pod of the image (pull + unpack its layers): {:.1} ms",
        ms(oci_cold)
    );
    println!(
        "  wasm pod start is {:.1}x faster than an OCI container start at p50 (target >= 10x)",
        o50 / w50
    );

    // Idle OCI containers: memory charged to their cgroups, the agent's own growth, and disk.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runc_root = data.join("agent/oci/runc");
    let list = std::process::Command::new("runc")
        .args(["--root", runc_root.to_str().unwrap(), "list", "-q"])
        .output()?;
    let ids: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(String::from)
        .collect();
    let n = ids.len().max(1) as u64;
    let cg: u64 = ids.iter().map(|id| cgroup_memory(id)).sum();
    let agent_growth = rss_kib(agent_pid).saturating_sub(rss_before_oci);
    println!("idle OCI containers ({n} running): {:.0} KiB per container in its cgroup, agent RSS +{:.0} KiB per container",
        cg as f64 / 1024.0 / n as f64, agent_growth as f64 / n as f64);
    let layers = skiff_oci::disk_usage(&data.join("agent/oci/images/layers"));
    let uppers: u64 = ids
        .iter()
        .map(|id| skiff_oci::disk_usage(&data.join("agent/oci/containers").join(id).join("upper")))
        .sum();
    println!("  disk for {n} containers of one image: layer store {:.2} MiB once + writable layers {:.0} KiB in all; one copy per container would be {:.2} MiB ({:.1}x more)",
        layers as f64 / 1048576.0, uppers as f64 / 1024.0, (layers * n) as f64 / 1048576.0,
        (layers * n) as f64 / (layers + uppers).max(1) as f64);
    // Out of the way before the density run.
    let pods = Resource::lookup("pods").unwrap();
    let list = client.list_dyn(pods, Some("default"), None, None).await?;
    for p in list["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        if name.starts_with("oci-") {
            client
                .delete_dyn(pods, Some("default"), name, None, None)
                .await?;
        }
    }

    // Density: memory of the whole skiff up process per idle wasm pod.
    const MORE: usize = 1000;
    let before = rss_kib(agent_pid);
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "density"},
        "spec": {"replicas": MORE, "selector": {"matchLabels": {"app": "density"}},
                 "template": {"metadata": {"labels": {"app": "density"}}, "spec": {"containers": [{"name": "web", "image": "127.0.0.1:5000/bootcamp:v1", "ports": [{"containerPort": 8080}]}]}}}});
    client
        .create_dyn(
            Resource::lookup("deployments").unwrap(),
            Some("default"),
            &deploy,
        )
        .await?;
    let t = Instant::now();
    loop {
        let d = client
            .get_dyn(
                Resource::lookup("deployments").unwrap(),
                Some("default"),
                "density",
            )
            .await?;
        if d["status"]["readyReplicas"].as_u64() == Some(MORE as u64) {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "density pods not ready in 5 min"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(agent_pid);
    println!("density: {MORE} more idle bootcamp pods ready in {:.1} s; skiff up RSS {} MiB -> {} MiB: {:.0} KiB per idle wasm pod (target <= 256 KiB)",
        all_ready.as_secs_f64(), before / 1024, after / 1024, (after.saturating_sub(before)) as f64 / MORE as f64);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let (Ok(kc), Ok(pid), Ok(data)) = (
        std::env::var("SKIFF_BENCH_KUBECONFIG"),
        std::env::var("SKIFF_BENCH_PID"),
        std::env::var("SKIFF_BENCH_DATA"),
    ) {
        return rt.block_on(inner(&kc, pid.parse()?, std::path::Path::new(&data)));
    }
    rt.block_on(async {
        use skiff_e2e::netns::SkiffUp;
        let dir = tempfile::tempdir()?;
        let (ns, up) = SkiffUp::in_new_netns(dir.path(), &["--node-cidr-mask-size", "21"]).await?;
        up.push_samples(&ns, &[("bootcamp-v1.wasm", "bootcamp:v1")])?;
        up.push_images(&ns, &[("bootcamp-oci:v1", "bootcamp-oci:v1")])?;
        let pid = ns.pid(up.index);
        let me = std::env::current_exe()?;
        let kc = up.dir.join("kubeconfig");
        // The namespace's network with the host's mounts (the cgroups are read there).
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .env("SKIFF_BENCH_KUBECONFIG", &kc)
            .env("SKIFF_BENCH_PID", pid.to_string())
            .env("SKIFF_BENCH_DATA", &up.dir)
            .arg(me)
            .status()?;
        anyhow::ensure!(out.success(), "the measuring half failed");
        Ok(())
    })
}
