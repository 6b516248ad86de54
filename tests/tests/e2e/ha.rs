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
    /// Whether the process still runs.
    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

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
    /// Three members' ports and directories, none started yet.
    fn new(dir: &Path) -> Etcd {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        Etcd {
            dir: dir.to_path_buf(),
            ports,
            members: Vec::new(),
        }
    }

    fn start(dir: &Path) -> Etcd {
        let mut etcd = Etcd::new(dir);
        etcd.start_all();
        etcd
    }

    fn start_all(&mut self) {
        for i in 0..3 {
            let p = self.spawn(i);
            self.members.push(p);
        }
    }

    /// The command line of member `i`.
    fn args(&self, i: usize) -> Vec<String> {
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
        let data = self.dir.join(format!("e{i}"));
        [
            "etcd",
            "--name",
            &format!("e{i}"),
            "--data-dir",
            &data.to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &format!("ha-{}", self.ports[0].1),
        ]
        .map(String::from)
        .into()
    }

    fn spawn(&self, i: usize) -> Proc {
        let args = self.args(i);
        let log = std::fs::File::create(self.dir.join(format!("e{i}.log"))).unwrap();
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        Proc(Some(child))
    }

    /// Waits until every member answers healthy.
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

/// The command line of a `skiff server` on the etcd cluster; with `short_lease` its
/// controllers' Lease lasts 4 s (else Kubernetes' defaults: 15 s, renewed every 2 s).
fn server_args(
    dir: &Path,
    port: u16,
    endpoints: &str,
    token: &str,
    short_lease: bool,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        skiff_binary().unwrap().to_string_lossy().into_owned(),
        "server".into(),
        "--data-dir".into(),
        dir.to_string_lossy().into_owned(),
        "--api-addr".into(),
        format!("127.0.0.1:{port}"),
        "--datastore-endpoint".into(),
        endpoints.into(),
        "--token".into(),
        token.into(),
    ];
    if short_lease {
        args.extend(
            [
                "--leader-elect-lease-duration",
                "4s",
                "--leader-elect-renew-deadline",
                "3s",
                "--leader-elect-retry-period",
                "500ms",
            ]
            .map(String::from),
        );
    }
    args
}

/// A `skiff server` on the etcd cluster (short controllers' Lease), its stderr in `DIR.log`.
fn server(dir: &Path, port: u16, endpoints: &str, token: &str) -> Proc {
    server_with(dir, port, endpoints, token, true)
}

fn server_with(dir: &Path, port: u16, endpoints: &str, token: &str, short_lease: bool) -> Proc {
    let args = server_args(dir, port, endpoints, token, short_lease);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    let child = Command::new(&args[0])
        .args(&args[1..])
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
    cluster_with(true).await
}

/// Three etcd members and two servers on them (`short_lease`: see [`server_args`]).
async fn cluster_with(short_lease: bool) -> anyhow::Result<Option<Cluster>> {
    if !etcd_installed() {
        return Ok(None);
    }
    let tmp = tempfile::tempdir()?;
    let etcd = Etcd::start(tmp.path());
    etcd.wait_healthy().await?;
    let endpoints = etcd.endpoints();
    let ports = vec![free_port(), free_port()];
    let dirs: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("s{i}"))).collect();
    let mut servers = vec![server_with(
        &dirs[0],
        ports[0],
        &endpoints,
        "ha-token",
        short_lease,
    )];
    let first = connect(&dirs[0].join("kubeconfig")).await?;
    servers.push(server_with(
        &dirs[1],
        ports[1],
        &endpoints,
        "ha-token",
        short_lease,
    ));
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

impl Cluster {
    /// A client of both servers (the first one's kubeconfig with both URLs), talking to the
    /// first while it answers.
    fn client_of_both(&self) -> anyhow::Result<Client> {
        let list = self
            .ports
            .iter()
            .map(|p| format!("https://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(Client::from_kubeconfig_at(
            Some(&self.tmp.path().join("s0/kubeconfig")),
            Some(&list),
        )?)
    }
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

/// kill -9 of the leader, then a Deployment created through the other server: seconds from
/// the kill until the survivor's controllers made its pods (the survivor must hold the Lease).
async fn failover_seconds(c: &mut Cluster) -> anyhow::Result<f64> {
    let lead = leader(c).await?;
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
    let acted = eventually(
        "the survivor's controllers make the pods",
        Duration::from_secs(90),
        || async {
            let list = client
                .list_dyn(pods, Some("default"), Some("app=web"), None)
                .await?;
            Ok((list["items"].as_array().map_or(0, Vec::len) == 2).then(|| killed.elapsed()))
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
    Ok(acted.as_secs_f64())
}

/// kill -9 of the leader: the other server takes the Lease and its controllers act (a
/// Deployment created through it gets its ReplicaSet and pods). Prints the failover time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_server_takes_over_when_the_leader_dies() -> anyhow::Result<()> {
    let Some(mut c) = cluster().await? else {
        return Ok(());
    };
    let took = failover_seconds(&mut c).await?;
    eprintln!(
        "failover: {took:.1} s from kill -9 of the leader to its successor's pods (lease 4 s, retry 0.5 s)"
    );
    Ok(())
}

/// Figures, not a check: the same failover with Kubernetes' default Lease timings (15 s
/// lease, 10 s renew deadline, 2 s retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn failover_with_the_default_lease() -> anyhow::Result<()> {
    let Some(mut c) = cluster_with(false).await? else {
        return Ok(());
    };
    let took = failover_seconds(&mut c).await?;
    eprintln!(
        "failover: {took:.1} s from kill -9 of the leader to the next controller action (lease 15 s, retry 2 s)"
    );
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
/// in the same run (`cargo test --workspace --test e2e -- --ignored --nocapture ha::api_latency`).
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

/// A server started before its etcd members waits for them, saying so, instead of exiting;
/// once a quorum is up it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_waits_for_the_etcd_quorum() -> anyhow::Result<()> {
    if !etcd_installed() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let mut etcd = Etcd::new(tmp.path());
    let dir = tmp.path().join("s0");
    let mut s = server(&dir, free_port(), &etcd.endpoints(), "ha-token");
    let log = dir.with_extension("log");
    eventually(
        "the server saying it waits for the datastore",
        Duration::from_secs(60),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains("waiting for the datastore").then_some(()))
        },
    )
    .await?;
    assert!(s.running(), "the server exited without its datastore");
    etcd.start_all();
    let client = connect(&dir.join("kubeconfig")).await?;
    let cms = Resource::lookup("configmaps").unwrap();
    client
        .create_dyn(
            cms,
            Some("default"),
            &json!({"metadata": {"name": "after-the-wait"}}),
        )
        .await?;
    assert!(s.running());
    Ok(())
}

/// The `default/kubernetes` Endpoints as (address, port) pairs.
async fn api_endpoints(client: &Client) -> anyhow::Result<Vec<(String, u64)>> {
    let ep = Resource::lookup("endpoints").unwrap();
    let v = client.get_dyn(ep, Some("default"), "kubernetes").await?;
    let mut out = Vec::new();
    for subset in v["subsets"].as_array().into_iter().flatten() {
        for a in subset["addresses"].as_array().into_iter().flatten() {
            for p in subset["ports"].as_array().into_iter().flatten() {
                out.push((
                    a["ip"].as_str().unwrap_or_default().to_string(),
                    p["port"].as_u64().unwrap_or_default(),
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The `kubernetes` Service's Endpoints list every live server: both, then only the
/// survivor once the killed one's lease has expired (15 s), then both again when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_endpoints_list_the_live_servers() -> anyhow::Result<()> {
    let Some(mut c) = cluster().await? else {
        return Ok(());
    };
    let both: Vec<(String, u64)> = {
        let mut v: Vec<_> = c
            .ports
            .iter()
            .map(|p| ("127.0.0.1".to_string(), *p as u64))
            .collect();
        v.sort();
        v
    };
    let first = vec![("127.0.0.1".to_string(), c.ports[0] as u64)];
    let client = c.clients[0].clone();
    let wait_for = |want: Vec<(String, u64)>, what: &'static str| {
        let client = client.clone();
        async move {
            eventually(what, Duration::from_secs(60), || {
                let (client, want) = (client.clone(), want.clone());
                async move {
                    let now = api_endpoints(&client).await?;
                    anyhow::ensure!(now == want, "the Endpoints list {now:?}");
                    Ok(Some(()))
                }
            })
            .await
        }
    };
    wait_for(both.clone(), "both servers in the kubernetes Endpoints").await?;
    let killed = Instant::now();
    c.servers[1].kill();
    wait_for(first.clone(), "the killed server out of the Endpoints").await?;
    // Not before its lease (15 s) could have expired.
    assert!(
        killed.elapsed() >= Duration::from_secs(10),
        "dropped after {:?}",
        killed.elapsed()
    );
    eprintln!(
        "a killed server left the kubernetes Endpoints after {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    c.servers[1] = server(
        &c.tmp.path().join("s1"),
        c.ports[1],
        &c.etcd.endpoints(),
        "ha-token",
    );
    wait_for(both, "the restarted server back in the Endpoints").await?;
    Ok(())
}

/// kill -9 of a server during a burst of concurrent creates from clients of both servers:
/// every create that was acknowledged is there afterwards, read through the other server,
/// and the writers went on through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_killed_server() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let Some(mut c) = cluster().await? else {
        return Ok(());
    };
    let cms = Resource::lookup("configmaps").unwrap();
    let client = c.client_of_both()?;
    let acked = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let (client, acked, failed, stop, killed) = (
            client.clone(),
            acked.clone(),
            failed.clone(),
            stop.clone(),
            killed.clone(),
        );
        writers.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("burst-{w}-{i}");
                i += 1;
                let after = killed.load(Ordering::SeqCst);
                match client
                    .create_dyn(
                        cms,
                        Some("default"),
                        &json!({"metadata": {"name": name}, "data": {"w": w.to_string()}}),
                    )
                    .await
                {
                    Ok(_) => acked.lock().unwrap().push((name, after)),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
    }
    let count = |after: bool| {
        acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, a)| *a == after)
            .count()
    };
    eventually(
        "100 acknowledged creates",
        Duration::from_secs(60),
        || async { Ok((count(false) >= 100).then_some(())) },
    )
    .await?;
    // The writers talk to the first server: it dies in the middle of the burst.
    c.servers[0].kill();
    killed.store(true, Ordering::SeqCst);
    eventually(
        "100 creates acknowledged after the kill",
        Duration::from_secs(60),
        || async { Ok((count(true) >= 100).then_some(())) },
    )
    .await?;
    stop.store(true, Ordering::SeqCst);
    while writers.join_next().await.is_some() {}
    let list = c.clients[1]
        .list_dyn(cms, Some("default"), None, None)
        .await?;
    let stored: std::collections::BTreeSet<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    let acked = acked.lock().unwrap();
    let lost: Vec<&str> = acked
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !stored.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged creates lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    eprintln!(
        "{} creates acknowledged ({} after the kill), {} failed, none lost",
        acked.len(),
        acked.iter().filter(|(_, a)| *a).count(),
        failed.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Whether process `pid` inside `ns` holds an established connection to 127.0.0.1:`port`.
fn connected(ns: &skiff_e2e::netns::Netns, pid: u32, port: u16) -> bool {
    ns.run(&["ss", "-tnpH", "state", "established"])
        .map(|out| {
            out.lines().any(|l| {
                l.contains(&format!("127.0.0.1:{port} ")) && l.contains(&format!("pid={pid},"))
            })
        })
        .unwrap_or(false)
}

/// An agent joined with both servers' URLs, in a network namespace with the etcd members, the
/// servers and a registry: it runs a wasm pod; kill -9 of the server it talks to moves its
/// heartbeats, watches and status writes to the other one. The node stays Ready, the pod keeps
/// answering, a pod scheduled afterwards starts on the node, and its logs come through the
/// surviving server (the node's serving certificate verifies there too). The skiff CLI is given
/// both URLs as well and follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_a_live_server() -> anyhow::Result<()> {
    use skiff_e2e::netns::{Netns, SkiffUp};
    if !etcd_installed() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut ns = Netns::new()?;
    ns.start_registry(dir).await?;
    let etcd = Etcd::new(dir);
    for i in 0..3 {
        let args = etcd.args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ns.spawn(&args, &dir.join(format!("e{i}.log")))?;
    }
    for (port, _) in &etcd.ports {
        let url = format!("http://127.0.0.1:{port}/health");
        eventually(&format!("etcd {url}"), Duration::from_secs(60), || async {
            Ok(ns
                .run(&["curl", "-sf", "--max-time", "2", &url])
                .ok()
                .filter(|b| b.contains("\"health\":\"true\""))
                .map(|_| ()))
        })
        .await?;
    }
    let ports = [6443u16, 6444];
    let dirs = [dir.join("s0"), dir.join("s1")];
    let mut servers = Vec::new();
    for (d, port) in dirs.iter().zip(ports) {
        let args = server_args(d, port, &etcd.endpoints(), "ha-token", true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        servers.push(ns.spawn(&args, &d.with_extension("log"))?);
        let url = format!("https://127.0.0.1:{port}/version");
        eventually(
            &format!("the server at {url}"),
            Duration::from_secs(120),
            || async {
                Ok(ns
                    .run(&["curl", "-sfk", "--max-time", "2", &url])
                    .ok()
                    .map(|_| ()))
            },
        )
        .await?;
    }
    let list = format!(
        "https://127.0.0.1:{},https://127.0.0.1:{}",
        ports[0], ports[1]
    );
    let token = std::fs::read_to_string(dirs[0].join("node-token"))?;
    let agent_dir = dir.join("agent");
    ns.reset_on_drop(&agent_dir);
    let bin = skiff_binary()?.to_string_lossy().into_owned();
    let agent_log = dir.join("agent.log");
    let agent = ns.spawn(
        &[
            &bin,
            "agent",
            "--server",
            &list,
            "--token",
            token.trim(),
            "--data-dir",
            &agent_dir.to_string_lossy(),
            "--name",
            "edge-1",
            "--heartbeat-seconds",
            "2",
        ],
        &agent_log,
    )?;
    let agent_pid = ns.pid(agent);
    let s0_pid = ns.pid(servers[0]);
    let up = SkiffUp {
        dir: dirs[0].clone(),
        index: servers[0],
        log: agent_log.clone(),
    };
    // The CLI with both servers' URLs.
    let cli = |args: &[&str]| {
        let mut a = vec!["--server", list.as_str()];
        a.extend_from_slice(args);
        up.skiff(&ns, &a)
    };
    let cli_json = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&cli(&a)?)?)
    };
    let ready = |node: &serde_json::Value| {
        node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    eventually("node edge-1 Ready", Duration::from_secs(60), || async {
        Ok(cli_json(&["get", "node", "edge-1"])
            .ok()
            .filter(ready)
            .map(|_| ()))
    })
    .await?;
    up.push_samples(&ns, &[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    up.create_bootcamp(&ns, 1)?;
    up.rolled_out(&ns, "kubernetes-bootcamp", Duration::from_secs(90))?;
    let before = up.pod_ips(&ns, "app=kubernetes-bootcamp")?;
    assert_eq!(before.len(), 1);
    let answers = |(name, ip): &(String, String)| {
        ns.run(&[
            "curl",
            "-sf",
            "--max-time",
            "2",
            &format!("http://{ip}:8080/"),
        ])
        .is_ok_and(|b| b.contains(&format!("Running on: {name} |")))
    };
    eventually("the pod answering", Duration::from_secs(30), || async {
        Ok(answers(&before[0]).then_some(()))
    })
    .await?;
    // The agent talks to the first server in its list.
    eventually(
        "the agent connected to the first server",
        Duration::from_secs(30),
        || async { Ok(connected(&ns, agent_pid, ports[0]).then_some(())) },
    )
    .await?;

    let killed = Instant::now();
    // By its PID (the namespace's handle is borrowed by the helpers above).
    let status = Command::new("kill")
        .args(["-9", &s0_pid.to_string()])
        .status()?;
    assert!(status.success());
    // Renewals written after this went through the other server.
    let killed_at = chrono::Utc::now();
    // Its heartbeats reach the other server: the node's Lease is renewed after the kill.
    eventually(
        "a node Lease renewal after the kill",
        Duration::from_secs(30),
        || async {
            let lease = cli_json(&["-n", "kube-node-lease", "get", "lease", "edge-1"]);
            let renewed = lease.ok().and_then(|l| {
                let t = l["spec"]["renewTime"].as_str()?.to_string();
                chrono::DateTime::parse_from_rfc3339(&t).ok()
            });
            Ok(renewed.filter(|t| *t > killed_at).map(|_| ()))
        },
    )
    .await?;
    eprintln!(
        "the agent's Lease renewed through the other server {:.1} s after the kill (heartbeat every 2 s)",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        connected(&ns, agent_pid, ports[1]),
        "the agent is connected to the second server"
    );
    // Longer than the node grace period (15 s) and the controllers' failover: the node stays
    // Ready and untainted, and the pod keeps answering, at every look.
    while killed.elapsed() < Duration::from_secs(30) {
        let node = cli_json(&["get", "node", "edge-1"])?;
        assert!(
            ready(&node),
            "edge-1 not Ready after the kill: {}",
            node["status"]
        );
        let tainted = node["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable");
        assert!(!tainted, "edge-1 tainted unreachable: {}", node["spec"]);
        assert!(answers(&before[0]), "the pod stopped answering");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A pod scheduled now (by the surviving server's controllers) starts on the node.
    cli(&["scale", "deployment/kubernetes-bootcamp", "--replicas", "2"])?;
    let after = eventually(
        "a second pod answering",
        Duration::from_secs(90),
        || async {
            let v = cli_json(&["get", "pods", "-l", "app=kubernetes-bootcamp"])?;
            let running: Vec<(String, String)> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["status"]["phase"] == "Running" && p["spec"]["nodeName"] == "edge-1")
                .filter_map(|p| {
                    Some((
                        p["metadata"]["name"].as_str()?.to_string(),
                        p["status"]["podIP"].as_str()?.to_string(),
                    ))
                })
                .collect();
            Ok((running.len() == 2 && running.iter().all(answers)).then_some(running))
        },
    )
    .await?;
    let new = after.iter().find(|p| **p != before[0]).expect("a new pod");
    // Its logs come from the node through the surviving server.
    eventually("the new pod's logs", Duration::from_secs(30), || async {
        Ok(cli(&["logs", &new.0]).ok().map(|_| ()))
    })
    .await?;
    assert!(answers(&before[0]), "the first pod still answers");
    Ok(())
}

/// The scheduler end to end as `benches/control.rs` measures it — pods in the store, decoded,
/// scheduled and bound in store transactions — on `store`: seconds taken.
fn schedule_end_to_end(
    store: skiff_control::store::DynStore,
    nodes: usize,
    pods: usize,
) -> anyhow::Result<f64> {
    use skiff_api::k8s::api::core::v1::{Node, Pod};
    use skiff_control::controllers::scheduler::{self, NodeInfo, PodRequest};
    use skiff_control::registry::{ClusterConfig, Registry};
    use skiff_control::store::Op;
    let node_infos: Vec<NodeInfo> = (0..nodes)
        .map(|i| {
            let n: Node = serde_json::from_value(json!({"metadata": {"name": format!("node-{i:04}"), "labels": {"zone": format!("z{}", i % 3)}},
                "status": {"allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                           "conditions": [{"type": "Ready", "status": "True"}]}}))
            .unwrap();
            NodeInfo::from_node(&n)
        })
        .collect();
    let pod = |i: usize| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": format!("p-{i:05}"), "namespace": "default", "resourceVersion": "1",
                            "ownerReferences": [{"uid": format!("rs-{}", i % 100), "controller": true, "kind": "ReplicaSet", "name": "rs"}]},
               "spec": {"containers": [{"name": "c", "image": "x:v1", "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}})
    };
    let reg = Registry::new(store.clone(), ClusterConfig::default());
    let pods_r = Resource::lookup("pods").unwrap();
    let batch = store.max_txn_ops().min(1000);
    for chunk in (0..pods).collect::<Vec<_>>().chunks(batch) {
        store.txn(
            chunk
                .iter()
                .map(|i| Op::Create {
                    key: pods_r.key(Some("default"), &format!("p-{i:05}")),
                    value: pod(*i),
                })
                .collect(),
        )?;
    }
    let (stored, _) = store.list(&pods_r.key_prefix())?;
    anyhow::ensure!(stored.len() == pods, "{} pods stored", stored.len());
    let t = Instant::now();
    let mut ns = node_infos;
    let mut start = 0;
    let reqs: Vec<PodRequest> = stored
        .iter()
        .map(|p| PodRequest::from_pod(&serde_json::from_value::<Pod>(p.clone()).unwrap()))
        .collect();
    let placed = scheduler::schedule(&mut ns, &reqs, &mut start);
    let binds: Vec<(serde_json::Value, String)> = stored
        .iter()
        .zip(placed)
        .map(|(p, r)| (p.clone(), ns[r.unwrap()].name.clone()))
        .collect();
    for chunk in binds.chunks(batch) {
        reg.bind_all(chunk.to_vec())?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Figures, not a check: the scheduler end to end (as `benches/control.rs`' scheduler bench)
/// on the embedded store and on the 3-member etcd, in one run. `SKIFF_BENCH_NODES` and
/// `SKIFF_BENCH_PODS` scale it (1,000 × 10,000 by default). A debug build, unlike the bench.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn scheduler_end_to_end_embedded_against_etcd() -> anyhow::Result<()> {
    let Some(c) = cluster().await? else {
        return Ok(());
    };
    let size = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (nodes, pods) = (
        size("SKIFF_BENCH_NODES", 1000),
        size("SKIFF_BENCH_PODS", 10_000),
    );
    let dir = c.tmp.path().join("embedded-store");
    let embedded: skiff_control::store::DynStore =
        std::sync::Arc::new(skiff_control::store::sqlite::SqliteStore::open(&dir)?);
    let mut etcd_config = skiff_control::store::etcd::EtcdConfig::new(
        c.etcd.endpoints().split(',').map(String::from).collect(),
    );
    // Away from the servers' keys.
    etcd_config.prefix = "/bench".into();
    let endpoints = etcd_config.clone();
    let etcd: skiff_control::store::DynStore = tokio::task::spawn_blocking(move || {
        skiff_control::store::etcd::EtcdStore::connect(&endpoints).map(std::sync::Arc::new)
    })
    .await??;
    let (s, e) = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, f64)> {
        Ok((
            schedule_end_to_end(embedded, nodes, pods)?,
            schedule_end_to_end(etcd, nodes, pods)?,
        ))
    })
    .await??;
    let rate = |secs: f64| pods as f64 / secs;
    eprintln!("scheduler end to end, {nodes} nodes x {pods} pods (decode, schedule, bind in store transactions)");
    eprintln!("  embedded SQLite      {:>8.0} pods/s  ({s:.2} s)", rate(s));
    eprintln!("  etcd, 3 members      {:>8.0} pods/s  ({e:.2} s)", rate(e));
    Ok(())
}
