//! A highly available control plane: real etcd members (three, on loopback ports of their own)
//! and two real `skiff server` processes on them. Skipped, saying so, when no `etcd` binary is
//! installed (`apt-get install etcd-server`; `scripts/setup.sh` does it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use skiff_api::Resource;
use skiff_client::Client;
use skiff_e2e::{eventually, skiff_binary};

/// A loopback port no one listens on, below the ephemeral range: a port the kernel handed out
/// (`bind` to 0) could be taken as the source port of another test's outgoing connection
/// before etcd or the server binds it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + ((std::process::id() * 131 + n * 7) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn etcd_installed() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("SKIPPED: no `etcd` binary on PATH (apt-get install etcd-server)");
    }
    found
}

/// A process that is killed (-9) when dropped.
struct Proc(Option<Child>);

impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three etcd members on loopback ports of their own.
struct Etcd {
    dir: PathBuf,
    ports: Vec<(u16, u16)>,
    members: Vec<Proc>,
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let mut etcd = Etcd {
            dir: dir.to_path_buf(),
            ports,
            members: Vec::new(),
        };
        for i in 0..3 {
            let p = etcd.spawn(i);
            etcd.members.push(p);
        }
        etcd
    }

    fn spawn(&self, i: usize) -> Proc {
        let cluster = self
            .ports
            .iter()
            .enumerate()
            .map(|(j, (_, peer))| format!("e{j}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let (client, peer) = self.ports[i];
        let client = format!("http://127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(self.dir.join(format!("e{i}.log"))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("e{i}")))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("ha-{}", self.ports[0].1),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        Proc(Some(child))
    }

    /// Waits until every member answers healthy: a server started before the quorum is up
    /// exits, saying it cannot reach the datastore.
    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        for (client, _) in &self.ports {
            let url = format!("http://127.0.0.1:{client}/health");
            eventually(
                &format!("etcd at {url} healthy"),
                Duration::from_secs(60),
                || {
                    let (http, url) = (http.clone(), url.clone());
                    async move {
                        let Ok(r) = http.get(&url).send().await else {
                            return Ok(None);
                        };
                        let body = r.text().await.unwrap_or_default();
                        Ok(body.contains("\"health\":\"true\"").then_some(()))
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    fn endpoints(&self) -> String {
        self.ports
            .iter()
            .map(|(c, _)| format!("http://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    fn restart(&mut self, i: usize) {
        self.members[i] = self.spawn(i);
    }
}

/// A `skiff server` on the etcd cluster, its stderr in `DIR.log`.
fn server(dir: &Path, port: u16, endpoints: &str, token: &str) -> Proc {
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let child = Command::new(skiff_binary().unwrap())
        .args(["server", "--data-dir"])
        .arg(dir)
        .args(["--api-addr", &format!("127.0.0.1:{port}")])
        .args(["--datastore-endpoint", endpoints, "--token", token])
        .args([
            "--leader-elect-lease-duration",
            "4s",
            "--leader-elect-renew-deadline",
            "3s",
            "--leader-elect-retry-period",
            "500ms",
        ])
        .env("SKIFF_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(Some(child))
}

/// The kubeconfig of `dir` pointed at another server's port.
fn kubeconfig_for(dir: &Path, from_port: u16, to_port: u16, out: &Path) -> PathBuf {
    let text = std::fs::read_to_string(dir.join("kubeconfig")).unwrap();
    let path = out.join(format!("kubeconfig-{to_port}"));
    std::fs::write(
        &path,
        text.replace(
            &format!("127.0.0.1:{from_port}"),
            &format!("127.0.0.1:{to_port}"),
        ),
    )
    .unwrap();
    path
}

async fn connect(kubeconfig: &Path) -> anyhow::Result<Client> {
    // A debug server derives its key from the token (PBKDF2) before it answers: slow on a
    // loaded machine.
    let answered = eventually("the API server", Duration::from_secs(120), || async {
        let Ok(c) = Client::from_kubeconfig(Some(kubeconfig)) else {
            return Ok(None);
        };
        Ok(c.get_path("/version").await.ok().map(|_| c))
    })
    .await;
    answered.map_err(|e| {
        // The server's own account of why, when the kubeconfig is in its data dir.
        let log = kubeconfig
            .parent()
            .map(|d| d.with_extension("log"))
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!("{e}\n--- server log (last lines):\n{}", tail.join("\n"))
    })
}

struct Cluster {
    tmp: tempfile::TempDir,
    etcd: Etcd,
    servers: Vec<Proc>,
    ports: Vec<u16>,
    /// One kubeconfig (the first server's) per server, only `server:` changed.
    clients: Vec<Client>,
}

async fn cluster() -> anyhow::Result<Option<Cluster>> {
    if !etcd_installed() {
        return Ok(None);
    }
    let tmp = tempfile::tempdir()?;
    let etcd = Etcd::start(tmp.path());
    etcd.wait_healthy().await?;
    let endpoints = etcd.endpoints();
    let ports = vec![free_port(), free_port()];
    let dirs: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("s{i}"))).collect();
    let mut servers = vec![server(&dirs[0], ports[0], &endpoints, "ha-token")];
    let first = connect(&dirs[0].join("kubeconfig")).await?;
    servers.push(server(&dirs[1], ports[1], &endpoints, "ha-token"));
    let second_own = connect(&dirs[1].join("kubeconfig")).await?;
    drop(second_own);
    let shared = kubeconfig_for(&dirs[0], ports[0], ports[1], tmp.path());
    let second = connect(&shared).await?;
    Ok(Some(Cluster {
        tmp,
        etcd,
        servers,
        ports,
        clients: vec![first, second],
    }))
}

/// Two servers, one cluster: the same kubeconfig works on both (same CA, same admin token), a
/// write through one is read through the other with the same resourceVersion, a watch on one
/// sees a change made through the other; a server with another token exits with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_serve_one_cluster() -> anyhow::Result<()> {
    let Some(c) = cluster().await? else {
        return Ok(());
    };
    let cms = Resource::lookup("configmaps").unwrap();
    let (a, b) = (&c.clients[0], &c.clients[1]);
    let made = a
        .create_dyn(
            cms,
            Some("default"),
            &json!({"metadata": {"name": "through-a"}, "data": {"k": "v"}}),
        )
        .await?;
    let read = b.get_dyn(cms, Some("default"), "through-a").await?;
    assert_eq!(read["data"]["k"], "v");
    assert_eq!(
        read["metadata"]["resourceVersion"],
        made["metadata"]["resourceVersion"]
    );
    // A watch on a, from that version, sees what b writes.
    let rv = made["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut watch = Box::pin(
        a.watch_dyn(cms, Some("default"), Some(&rv), None, None)
            .await?,
    );
    b.create_dyn(
        cms,
        Some("default"),
        &json!({"metadata": {"name": "through-b"}}),
    )
    .await?;
    let ev = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await?
        .expect("the watch stays open")?;
    assert_eq!(ev.kind, "ADDED");
    assert_eq!(ev.object["metadata"]["name"], "through-b");
    // Both servers' certificates verify with the one CA in the shared kubeconfig (the clients
    // above); a third server with the wrong token refuses to start, saying why in one line.
    let dir = c.tmp.path().join("wrong");
    let out = Command::new(skiff_binary()?)
        .args(["server", "--data-dir"])
        .arg(&dir)
        .args(["--api-addr", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--datastore-endpoint",
            &c.etcd.endpoints(),
            "--token",
            "wrong",
        ])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("another --token"), "{stderr}");
    Ok(())
}

/// The holder of the controllers' Lease, by server index (from the Lease's holderIdentity and
/// the identity each server logged).
async fn leader(c: &Cluster) -> anyhow::Result<usize> {
    let leases = Resource::lookup("leases").unwrap();
    eventually("a leader", Duration::from_secs(30), || async {
        let Ok(lease) = c.clients[0]
            .get_dyn(leases, Some("kube-system"), "skiff-controllers")
            .await
        else {
            return Ok(None);
        };
        let holder = lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or("")
            .to_string();
        for i in 0..2 {
            let log = std::fs::read_to_string(c.tmp.path().join(format!("s{i}.log")))?;
            if !holder.is_empty() && log.contains(&holder) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    })
    .await
}

/// kill -9 of the leader: the other server takes the Lease and its controllers act (a
/// Deployment created through it gets its ReplicaSet and pods). Prints the failover time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_server_takes_over_when_the_leader_dies() -> anyhow::Result<()> {
    let Some(mut c) = cluster().await? else {
        return Ok(());
    };
    let lead = leader(&c).await?;
    let other = 1 - lead;
    let killed = Instant::now();
    c.servers[lead].kill();
    let client = c.clients[other].clone();
    let deployments = Resource::lookup("deployments").unwrap();
    let pods = Resource::lookup("pods").unwrap();
    client
        .create_dyn(
            deployments,
            Some("default"),
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "web"},
                    "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                             "template": {"metadata": {"labels": {"app": "web"}},
                                          "spec": {"containers": [{"name": "web", "image": "example/web:1"}]}}}}),
        )
        .await?;
    eventually(
        "the survivor's controllers make the pods",
        Duration::from_secs(60),
        || async {
            let list = client
                .list_dyn(pods, Some("default"), Some("app=web"), None)
                .await?;
            Ok((list["items"].as_array().map_or(0, Vec::len) == 2).then_some(()))
        },
    )
    .await?;
    let leases = Resource::lookup("leases").unwrap();
    let lease = client
        .get_dyn(leases, Some("kube-system"), "skiff-controllers")
        .await?;
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or("");
    let log = std::fs::read_to_string(c.tmp.path().join(format!("s{other}.log")))?;
    assert!(log.contains(holder), "the survivor holds the Lease");
    eprintln!(
        "failover: {:.1} s from kill -9 of the leader to its successor's pods (lease 4 s, retry 0.5 s)",
        killed.elapsed().as_secs_f64()
    );
    let _ = c.ports;
    Ok(())
}

/// One etcd member of three down: writes succeed. Two down: a write fails with a 5xx Status
/// and nothing is stored. Both back: writes succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_the_etcd_quorum() -> anyhow::Result<()> {
    let Some(mut c) = cluster().await? else {
        return Ok(());
    };
    let cms = Resource::lookup("configmaps").unwrap();
    let client = c.clients[0].clone();
    let write = |name: &'static str| {
        let client = client.clone();
        async move {
            client
                .create_dyn(cms, Some("default"), &json!({"metadata": {"name": name}}))
                .await
        }
    };
    c.etcd.kill(2);
    eventually(
        "a write with one member down",
        Duration::from_secs(30),
        || async {
            match write("one-down").await {
                Ok(_) => Ok(Some(())),
                Err(e) if e.code() == Some(409) => Ok(Some(())),
                Err(_) => Ok(None),
            }
        },
    )
    .await?;
    c.etcd.kill(1);
    // The last member notices it has no leader within its election timeout (1 s); until then
    // a write may still be taken and be in doubt, so the refused write is one after that.
    let status = eventually(
        "a write refused without a quorum",
        Duration::from_secs(30),
        || async {
            match write("no-quorum").await {
                Err(e) if e.code().is_some_and(|c| c >= 500) => Ok(Some(e.code().unwrap())),
                _ => Ok(None),
            }
        },
    )
    .await?;
    assert!(status >= 500);
    c.etcd.restart(1);
    c.etcd.restart(2);
    eventually(
        "writes once the quorum is back",
        Duration::from_secs(60),
        || async {
            match write("after").await {
                Ok(_) => Ok(Some(())),
                Err(e) if e.code() == Some(409) => Ok(Some(())),
                Err(_) => Ok(None),
            }
        },
    )
    .await?;
    let list = c.clients[1]
        .list_dyn(cms, Some("default"), None, None)
        .await?;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"one-down") && names.contains(&"after"),
        "{names:?}"
    );
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Sequential creates then gets of small ConfigMaps through `client`: (create p50, p99, get
/// p50, p99) in milliseconds.
async fn latencies(client: &Client, n: usize) -> anyhow::Result<[f64; 4]> {
    let cms = Resource::lookup("configmaps").unwrap();
    let (mut creates, mut gets) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let t = Instant::now();
        client
            .create_dyn(
                cms,
                Some("default"),
                &json!({"metadata": {"name": format!("bench-{i}")}, "data": {"k": "v"}}),
            )
            .await?;
        creates.push(t.elapsed());
    }
    for i in 0..n {
        let t = Instant::now();
        client
            .get_dyn(cms, Some("default"), &format!("bench-{i}"))
            .await?;
        gets.push(t.elapsed());
    }
    creates.sort();
    gets.sort();
    Ok([
        percentile(&creates, 0.5),
        percentile(&creates, 0.99),
        percentile(&gets, 0.5),
        percentile(&gets, 0.99),
    ])
}

/// Figures, not a check: API create/get latency on the embedded store against a 3-member etcd,
/// in the same run (`cargo test -p skiff-e2e --test ha -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn api_latency_embedded_against_etcd() -> anyhow::Result<()> {
    let Some(c) = cluster().await? else {
        return Ok(());
    };
    let dir = c.tmp.path().join("embedded");
    let port = free_port();
    let log = std::fs::File::create(c.tmp.path().join("embedded.log"))?;
    let _embedded = Proc(Some(
        Command::new(skiff_binary()?)
            .args(["server", "--data-dir"])
            .arg(&dir)
            .args(["--api-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    ));
    let embedded = connect(&dir.join("kubeconfig")).await?;
    const N: usize = 500;
    let s = latencies(&embedded, N).await?;
    let e = latencies(&c.clients[0], N).await?;
    eprintln!("API latency, {N} sequential small ConfigMaps (ms)   create p50  create p99  get p50  get p99");
    eprintln!(
        "  embedded SQLite                                 {:>9.2}  {:>10.2}  {:>7.2}  {:>7.2}",
        s[0], s[1], s[2], s[3]
    );
    eprintln!(
        "  etcd, 3 members (2 servers up)                  {:>9.2}  {:>10.2}  {:>7.2}  {:>7.2}",
        e[0], e[1], e[2], e[3]
    );
    Ok(())
}
