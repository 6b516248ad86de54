//! Disk use of a `skiff server`'s store under churn: small merge patches from concurrent
//! clients next to large ConfigMaps that are rewritten and then deleted, measured against the
//! live data, also after a restart. Prints the figures; run it by hand:
//!
//! ```text
//! cargo build -p skiff
//! STORE_PATCHES=100000 cargo test --workspace --test e2e -- --ignored --nocapture store_disk::
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use skiff_api::Resource;
use skiff_client::Client;
use skiff_e2e::ServerProcess;

fn start(dir: &Path, port: u16) -> anyhow::Result<ServerProcess> {
    ServerProcess::start(dir, port)
}

async fn connect(dir: &Path) -> anyhow::Result<Client> {
    ServerProcess::client(dir, Duration::from_secs(30)).await
}

/// Bytes the files under `dir` take on disk, as `du` counts them.
fn disk_use(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Bytes of every object the server holds, as JSON.
async fn live_data(c: &Client) -> anyhow::Result<u64> {
    let mut total = 0;
    for plural in [
        "configmaps",
        "namespaces",
        "serviceaccounts",
        "services",
        "endpoints",
        "secrets",
        "events",
        "clusterroles",
        "clusterrolebindings",
        "roles",
        "rolebindings",
        "leases",
    ] {
        let r = Resource::lookup(plural).unwrap();
        let list = c.list_dyn(r, None, None, None).await?;
        for o in list["items"].as_array().into_iter().flatten() {
            total += serde_json::to_vec(o)?.len() as u64;
        }
    }
    Ok(total)
}

const MIB: f64 = 1024.0 * 1024.0;

fn large(i: usize, n: usize) -> serde_json::Value {
    let fill: String = (0..950_000)
        .map(|k| (b'a' + ((k * 7 + n * 13 + i) % 26) as u8) as char)
        .collect();
    json!({"metadata": {"name": format!("large-{i}")}, "data": {"blob": fill}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn store_disk_use_on_a_server() -> anyhow::Result<()> {
    let patches: usize = std::env::var("STORE_PATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    const CLIENTS: usize = 16;
    const SMALL: usize = 1000;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let store = dir.join("store");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = start(dir, port)?;
    let c = connect(dir).await?;
    let cms = Resource::lookup("configmaps").unwrap();
    for i in 0..SMALL {
        let cm = json!({"metadata": {"name": format!("small-{i}")}, "data": {"n": "0"}});
        c.create_dyn(cms, Some("default"), &cm).await?;
    }
    for i in 0..4 {
        c.create_dyn(cms, Some("default"), &large(i, 0)).await?;
    }
    println!(
        "start: live {:.1} MiB, store {:.1} MiB",
        live_data(&c).await? as f64 / MIB,
        disk_use(&store) as f64 / MIB
    );
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CLIENTS {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for n in 0..patches / CLIENTS {
                let global = n * CLIENTS + w;
                let i = global % SMALL;
                let body = json!({"data": {"n": global.to_string()}});
                let t = Instant::now();
                c.patch_dyn(
                    cms,
                    Some("default"),
                    &format!("small-{i}"),
                    None,
                    "application/merge-patch+json",
                    &body,
                )
                .await?;
                lat.push(t.elapsed());
                if global.is_multiple_of((patches / 20).max(1)) {
                    let l = global % 4;
                    let name = format!("large-{l}");
                    c.replace_dyn(cms, Some("default"), &name, &large(l, global))
                        .await?;
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let took = t0.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    let live = live_data(&c).await?;
    println!(
        "{} merge patches from {CLIENTS} clients in {:.1}s: p50 {:?} p99 {:?}; live {:.1} MiB, store {:.1} MiB",
        lat.len(),
        took.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        live as f64 / MIB,
        disk_use(&store) as f64 / MIB
    );
    for i in 0..4 {
        c.delete_dyn(cms, Some("default"), &format!("large-{i}"), None, None)
            .await?;
    }
    let live = live_data(&c).await?;
    println!(
        "large ConfigMaps deleted: live {:.1} MiB, store {:.1} MiB",
        live as f64 / MIB,
        disk_use(&store) as f64 / MIB
    );
    drop(server);
    let _server = start(dir, port)?;
    let c = connect(dir).await?;
    let after = disk_use(&store);
    println!(
        "restarted: live {:.1} MiB, store {:.1} MiB",
        live_data(&c).await? as f64 / MIB,
        after as f64 / MIB
    );
    assert!(
        after <= 2 * live + (64 << 20),
        "{after} bytes for {live} live"
    );
    Ok(())
}
