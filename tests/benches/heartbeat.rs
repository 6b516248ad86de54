//! What heartbeats cost the control plane: 100 simulated nodes heartbeat against a `skiff
//! server` process, first as agents now do (Lease renewed every 4 s, Node status every 60 s),
//! then as they did before (Node status — a GET and a PATCH — every 10 s), then the old way
//! at the pace the 15 s grace period would need (every 4 s), each against a fresh server in
//! the same run. Printed per mode: requests and bytes on the wire (TLS
//! included, both directions, counted by a relay in front of the server) per node per minute,
//! the server's CPU % (of one core) and RSS.
//!
//! The nodes run the agent's own heartbeat code (`skiff_node::heartbeat`). Run with
//! `cargo test -p skiff-e2e --bench heartbeat --release` or, on a debug build of the binary,
//! without `--release` (the server measured is the `skiff` next to the bench executable;
//! `cargo build -p skiff` first). `SKIFF_BENCH_SECONDS` sets how long each mode is measured
//! (default 60).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use skiff_api::Resource;
use skiff_client::Client;
use skiff_node::heartbeat::{Heartbeat, Timing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NODES: usize = 100;

struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    token: String,
    ca: String,
    _dir: tempfile::TempDir,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_server() -> anyhow::Result<ServerProcess> {
    let dir = tempfile::tempdir()?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let child = Command::new(skiff_e2e::skiff_binary()?)
        .args(["server", "--api-addr", &addr.to_string(), "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let token_path = dir.path().join("token");
    let ca_path = dir.path().join("ca.crt");
    let mut server = ServerProcess {
        child,
        addr,
        token: String::new(),
        ca: String::new(),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let (Ok(t), Ok(ca)) = (
            std::fs::read_to_string(&token_path),
            std::fs::read_to_string(&ca_path),
        ) {
            let c = Client::new(
                &format!("https://{addr}"),
                Some(t.trim().into()),
                "default",
                Some(&ca),
                false,
            )?;
            let ns = Resource::lookup("namespaces").expect("namespaces");
            if c.get_dyn(ns, None, "kube-node-lease").await.is_ok() {
                server.token = t.trim().to_string();
                server.ca = ca;
                return Ok(server);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "skiff server did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP relay in front of the server that counts the bytes going each way.
async fn relay(to: SocketAddr, bytes: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut dr, mut dw) = down.into_split();
                let (mut ur, mut uw) = up.into_split();
                let b1 = bytes.clone();
                let a = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = dr.read(&mut buf).await {
                        if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        b1.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = uw.shutdown().await;
                });
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = ur.read(&mut buf).await {
                    if n == 0 || dw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = dw.shutdown().await;
                let _ = a.await;
            });
        }
    });
    Ok(addr)
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn node(name: &str) -> serde_json::Value {
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                   "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                   "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "lastHeartbeatTime": now, "lastTransitionTime": now}]}})
}

struct Figures {
    requests: f64,
    bytes: f64,
    cpu: f64,
    rss: f64,
}

async fn measure(timing: Timing, seconds: u64) -> anyhow::Result<Figures> {
    let server = start_server().await?;
    let pid = server.child.id();
    let bytes = Arc::new(AtomicU64::new(0));
    let via = relay(server.addr, bytes.clone()).await?;
    let nodes_r = Resource::lookup("nodes").expect("nodes");
    let requests: Vec<Arc<AtomicU64>> = (0..NODES).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (i, count) in requests.iter().enumerate() {
        let client = Client::new(
            &format!("https://{via}"),
            Some(server.token.clone()),
            "default",
            Some(&server.ca),
            false,
        )?;
        let name = format!("sim-{i:03}");
        client.create_dyn(nodes_r, None, &node(&name)).await?;
        let count = count.clone();
        let stopped = stopped.clone();
        // Nodes start spread over one beat interval, as real nodes do.
        let offset = timing.renew_every * i as u32 / NODES as u32;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut hb = Heartbeat::new(client, &name, Ok("1.1.5".into()), timing);
            while !*stopped.borrow() {
                hb.beat().await;
                count.store(hb.requests(), Ordering::Relaxed);
                tokio::time::sleep(timing.renew_every).await;
            }
        }));
    }
    // Warm up: every node has beaten (created its Lease, posted its first status).
    tokio::time::sleep(timing.renew_every * 2).await;
    let sum = |v: &[Arc<AtomicU64>]| v.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let (r0, b0, c0, t0) = (
        sum(&requests),
        bytes.load(Ordering::Relaxed),
        cpu_seconds(pid),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    let (r1, b1, c1) = (
        sum(&requests),
        bytes.load(Ordering::Relaxed),
        cpu_seconds(pid),
    );
    let rss = rss_mib(pid);
    let _ = stop.send(true);
    for t in tasks {
        t.abort();
    }
    let per_node_minute = |x: f64| x / NODES as f64 * 60.0 / wall;
    Ok(Figures {
        requests: per_node_minute((r1 - r0) as f64),
        bytes: per_node_minute((b1 - b0) as f64),
        cpu: (c1 - c0) / wall * 100.0,
        rss,
    })
}

fn print(label: &str, f: &Figures) {
    println!(
        "{label:<44} {:>6.1} req/node/min {:>8.0} B/node/min   server CPU {:>5.1} %   RSS {:>5.1} MiB",
        f.requests, f.bytes, f.cpu, f.rss
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("SKIFF_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let binary = skiff_e2e::skiff_binary()?;
    println!(
        "heartbeats of {NODES} simulated nodes, {seconds} s per mode ({})",
        Path::new(&binary).display()
    );
    let lease = measure(Timing::default(), seconds).await?;
    let old = measure(
        Timing {
            renew_every: Duration::from_secs(10),
            node_status_only: true,
            ..Timing::default()
        },
        seconds,
    )
    .await?;
    // What the old way needs for the same 15 s grace period (three beats in it).
    let same = measure(
        Timing {
            renew_every: Duration::from_secs(4),
            node_status_only: true,
            ..Timing::default()
        },
        seconds,
    )
    .await?;
    print("Lease every 4 s + Node status every 60 s", &lease);
    print("baseline: Node status every 10 s (40 s grace)", &old);
    print("baseline: Node status every 4 s (15 s grace)", &same);
    for (name, b) in [("10 s", &old), ("4 s", &same)] {
        println!(
            "Leases vs Node status every {name}: {:.2}x requests, {:.2}x bytes, {:.2}x server CPU",
            lease.requests / b.requests,
            lease.bytes / b.bytes,
            lease.cpu / b.cpu.max(f64::EPSILON)
        );
    }
    Ok(())
}
