//! The API's transport under attack, against a real `skiff server` process with short
//! timeouts: thousands of idle connections (TCP only, and TLS kept alive) are closed once their
//! handshake or idle timeout passes while another client is served at once; headers or a body
//! trickled a byte at a time are cut; a client flooding the API is answered 429 with
//! `Retry-After` while other users and nodes are served, and its open watches are capped; and
//! failing `accept`s (the server out of file descriptors) neither spin nor fill the log.
//!
//! Clients come from several loopback addresses (127.0.0.N) so per-address caps apply to each
//! on its own. The tests run one at a time: they measure latencies on a shared machine.
//! Needs `prlimit` (util-linux).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_e2e::{eventually, skiff_binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One test at a time: each measures how fast the API answers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `skiff server` process on its own data dir and port, killed when dropped.
struct ServerProc {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    log: PathBuf,
    token: String,
    ca_pem: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProc {
    /// Starts `skiff server` with `flags`, under `wrapper` (a command and its arguments, such
    /// as `prlimit`) if given, and waits until it answers.
    async fn start(wrapper: &[&str], flags: &[&str]) -> anyhow::Result<ServerProc> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("server");
        let log = dir.path().join("server.log");
        let bin = skiff_binary()?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(["server", "--data-dir"])
            .arg(&data)
            .args(["--api-addr", "127.0.0.1:0"])
            .args(flags)
            .env("SKIFF_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn()?;
        let mut proc = ServerProc {
            child,
            dir,
            addr: "127.0.0.1:0".parse()?,
            log: log.clone(),
            token: String::new(),
            ca_pem: String::new(),
        };
        proc.addr = eventually("the server's address", Duration::from_secs(30), || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text
                    .lines()
                    .find_map(|l| l.split("listening on https://").nth(1))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok()))
            }
        })
        .await?;
        proc.token = std::fs::read_to_string(data.join("token"))?
            .trim()
            .to_string();
        proc.ca_pem = std::fs::read_to_string(data.join("ca.crt"))?;
        let admin = proc.client(Ipv4Addr::LOCALHOST, None)?;
        let url = proc.url("/version");
        eventually("the API server", Duration::from_secs(30), || {
            let (admin, url) = (admin.clone(), url.clone());
            async move { Ok(admin.get(&url).send().await.ok().map(|_| ())) }
        })
        .await?;
        Ok(proc)
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    fn log_bytes(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An HTTPS client from `from`, as the user of `identity` (PEM certificate and key), or
    /// with the admin token.
    fn client(&self, from: Ipv4Addr, identity: Option<&str>) -> anyhow::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .local_address(IpAddr::V4(from))
            .timeout(Duration::from_secs(20));
        match identity {
            Some(pem) => b = b.identity(reqwest::Identity::from_pem(pem.as_bytes())?),
            None => {
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {}", self.token).parse()?,
                );
                b = b.default_headers(headers);
            }
        }
        Ok(b.build()?)
    }

    /// A certificate and key (PEM) the cluster CA signs for user `cn` in `groups`.
    fn identity(&self, cn: &str, groups: &[&str]) -> anyhow::Result<String> {
        identity(&self.dir.path().join("server"), cn, groups)
    }

    /// A TLS client configuration that trusts the cluster CA and presents no certificate.
    fn tls(&self) -> anyhow::Result<tokio_rustls::TlsConnector> {
        let mut roots = rustls::RootCertStore::empty();
        for c in skiff_control::tls::pem_certs(&self.ca_pem) {
            roots.add(c)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// A certificate and key (PEM) the CA of data dir `data` signs for user `cn` in `groups`.
fn identity(data: &std::path::Path, cn: &str, groups: &[&str]) -> anyhow::Result<String> {
    let ca = skiff_control::tls::ClusterCa::load_or_create(data)?;
    let (cert, key) = ca.issue(&skiff_control::tls::Subject {
        common_name: cn.into(),
        organizations: groups.iter().map(|g| g.to_string()).collect(),
        sans: Vec::new(),
        usage: skiff_control::tls::Usage::Client,
        validity: Duration::from_secs(3600),
    })?;
    Ok(format!(
        "{}{}",
        pem("CERTIFICATE", cert.as_ref()),
        pem("PRIVATE KEY", key.secret_der())
    ))
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Lets this process open as many files as it may (the test holds thousands of sockets).
fn raise_nofile() -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    s.connect(to).await
}

/// Waits until the peer closes `stream` (EOF or an error); how long that took from `since`.
async fn closed<S: tokio::io::AsyncRead + Unpin>(mut stream: S, since: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return since.elapsed(),
            Ok(_) => {}
        }
    }
}

/// Reads one HTTP response's head from `stream`: its status line.
async fn status_line<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before a response");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

fn loopback(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_are_closed_after_their_timeouts_while_others_are_served(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    anyhow::ensure!(raise_nofile()? >= 8_000, "the test needs 8000 open files");
    const TIMEOUT: Duration = Duration::from_secs(5);
    const PER_ADDRESS: usize = 1_000;
    let server = ServerProc::start(
        &[],
        &[
            "--tls-handshake-timeout",
            "5s",
            "--idle-connection-timeout",
            "5s",
            "--request-header-timeout",
            "30s",
            "--max-connections-per-client",
            "1000",
        ],
    )
    .await?;
    let addr = server.addr;
    let mut held = tokio::task::JoinSet::new();
    // 4000 connections that never start TLS, from four addresses: each at its cap, and one more
    // from the first address, which is over its cap. The kernel may hand connections to the
    // server out of order, so which of that address's 1001 is refused is not known; exactly one
    // must be, at once, and the other 1000 kept until their timeout.
    for a in 2..6u8 {
        let n = if a == 2 { PER_ADDRESS + 1 } else { PER_ADDRESS };
        for _ in 0..n {
            let s = connect_from(loopback(a), addr).await?;
            let opened = Instant::now();
            held.spawn(closed(s, opened));
        }
    }
    let refused_in = tokio::time::timeout(TIMEOUT, held.join_next())
        .await
        .map_err(|_| anyhow::anyhow!("no connection over the per-client cap was refused"))?
        .expect("connections held")?;
    // 1000 TLS connections that send one request and then stay idle, kept alive.
    let tls = server.tls()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut opening = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    for _ in 0..PER_ADDRESS {
        let (tls, name, sem) = (tls.clone(), name.clone(), sem.clone());
        opening.spawn(async move {
            let _p = sem.acquire().await?;
            let tcp = connect_from(loopback(6), addr).await?;
            let mut s = tls.connect(name, tcp).await?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: skiff\r\n\r\n")
                .await?;
            let line = status_line(&mut s).await?;
            anyhow::ensure!(line.contains(" 200 "), "healthz: {line}");
            Ok::<_, anyhow::Error>((s, Instant::now()))
        });
    }
    let mut tls_held = tokio::task::JoinSet::new();
    while let Some(r) = opening.join_next().await {
        let (s, since) = r??;
        tls_held.spawn(closed(s, since));
    }
    // Thousands are open: another client is served at once.
    let still_open = held.len() + tls_held.len();
    let admin = server.client(loopback(1), None)?;
    let started = Instant::now();
    let resp = admin
        .get(server.url("/api/v1/namespaces/default/configmaps"))
        .send()
        .await?;
    let served_in = started.elapsed();
    anyhow::ensure!(resp.status().is_success(), "list: {}", resp.status());
    eprintln!(
        "{still_open} connections held; another client served in {served_in:?}; the refused one closed in {refused_in:?}"
    );
    anyhow::ensure!(
        served_in < Duration::from_millis(500),
        "another client waited {served_in:?}"
    );
    anyhow::ensure!(
        refused_in < TIMEOUT / 2,
        "the connection over the cap was closed after {refused_in:?}, by a timeout, not refused"
    );
    // Every held connection is closed by the server once its timeout passed, not before.
    let deadline = TIMEOUT + Duration::from_secs(20);
    for (what, set) in [("without TLS", &mut held), ("idle TLS", &mut tls_held)] {
        let mut lifetimes = Vec::new();
        let wait = tokio::time::timeout(deadline, async {
            while let Some(d) = set.join_next().await {
                lifetimes.push(d.expect("reader"));
            }
        })
        .await;
        anyhow::ensure!(
            wait.is_ok(),
            "{} connections {what} still open after {deadline:?}",
            set.len()
        );
        lifetimes.sort();
        let (first, last) = (lifetimes[0], lifetimes[lifetimes.len() - 1]);
        eprintln!(
            "{} connections {what}: closed after {first:?} .. {last:?}",
            lifetimes.len()
        );
        anyhow::ensure!(
            first >= TIMEOUT - Duration::from_secs(1),
            "a connection {what} was closed after {first:?}, before its timeout"
        );
    }
    // And the server serves new connections as before.
    let resp = server
        .client(loopback(2), None)?
        .get(server.url("/version"))
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_and_bodies_are_cut() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let server = ServerProc::start(
        &[],
        &[
            "--request-header-timeout",
            "2s",
            "--request-body-timeout",
            "2s",
        ],
    )
    .await?;
    let tls = server.tls()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    // Headers, a byte every 100 ms, never ending: cut after the header timeout.
    let tcp = connect_from(loopback(7), server.addr).await?;
    let s = tls.connect(name.clone(), tcp).await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    let started = Instant::now();
    wr.write_all(b"GET /version HTTP/1.1\r\nHost: skiff\r\nX-Slow: ")
        .await?;
    let trickle = tokio::spawn(async move {
        for _ in 0..300 {
            if wr.write_all(b"a").await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut buf = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(15), rd.read_to_end(&mut buf)).await;
    let headers_cut_in = started.elapsed();
    trickle.abort();
    anyhow::ensure!(cut.is_ok(), "trickled headers were never cut");
    eprintln!(
        "trickled headers cut after {headers_cut_in:?}: {:?}",
        String::from_utf8_lossy(&buf)
    );
    anyhow::ensure!(
        headers_cut_in >= Duration::from_millis(1_500) && headers_cut_in < Duration::from_secs(8),
        "cut after {headers_cut_in:?}"
    );
    // A body, a byte every 100 ms: 408 and closed after the body timeout.
    let tcp = connect_from(loopback(7), server.addr).await?;
    let s = tls.connect(name, tcp).await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    let started = Instant::now();
    wr.write_all(
        format!(
            "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: skiff\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{",
            server.token
        )
        .as_bytes(),
    )
    .await?;
    let trickle = tokio::spawn(async move {
        for _ in 0..300 {
            if wr.write_all(b" ").await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut buf = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(15), rd.read_to_end(&mut buf)).await;
    let body_cut_in = started.elapsed();
    trickle.abort();
    anyhow::ensure!(cut.is_ok(), "a trickled body was never cut");
    let answer = String::from_utf8_lossy(&buf).to_string();
    eprintln!("trickled body cut after {body_cut_in:?}");
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 408"),
        "answer to a trickled body: {answer}"
    );
    anyhow::ensure!(
        body_cut_in >= Duration::from_millis(1_500) && body_cut_in < Duration::from_secs(8),
        "cut after {body_cut_in:?}"
    );
    // A body sent at once still goes through.
    let resp = server
        .client(loopback(7), None)?
        .post(server.url("/api/v1/namespaces/default/configmaps"))
        .json(&serde_json::json!({"metadata": {"name": "fast"}}))
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "create: {}", resp.status());
    Ok(())
}

/// A 429's `Retry-After` header and its body.
type Refusal = (Option<String>, serde_json::Value);

/// The worst of `latencies`.
fn worst(latencies: &[Duration]) -> Duration {
    latencies.iter().copied().max().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_client_gets_429_while_other_users_and_nodes_are_served() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let server = ServerProc::start(&[], &[]).await?;
    let log_before = server.log_bytes();
    let alice = server.client(loopback(8), Some(&server.identity("alice", &["dev"])?))?;
    let bob = server.client(loopback(9), Some(&server.identity("bob", &["dev"])?))?;
    let node = server.client(
        loopback(10),
        Some(&server.identity("system:node:n1", &["system:nodes"])?),
    )?;
    let admin = server.client(loopback(11), None)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let example: Arc<std::sync::Mutex<Option<Refusal>>> = Arc::default();
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (alice, url) = (alice.clone(), server.url("/api/v1/namespaces/default/pods"));
        let (stop, refused, sent, example) =
            (stop.clone(), refused.clone(), sent.clone(), example.clone());
        flood.spawn(async move {
            use std::sync::atomic::Ordering;
            while !stop.load(Ordering::SeqCst) {
                let Ok(resp) = alice.get(&url).send().await else {
                    continue;
                };
                sent.fetch_add(1, Ordering::SeqCst);
                if resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    refused.fetch_add(1, Ordering::SeqCst);
                    let retry = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    let body = resp.json().await.unwrap_or_default();
                    example.lock().unwrap().get_or_insert((retry, body));
                }
            }
        });
    }
    // While alice floods, the others' requests are answered at once, and never with 429.
    let (mut bob_took, mut node_took, mut admin_took) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused.load(std::sync::atomic::Ordering::SeqCst) < 200 || bob_took.len() < 20 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "alice was refused {} times of {} in 60 s",
            refused.load(std::sync::atomic::Ordering::SeqCst),
            sent.load(std::sync::atomic::Ordering::SeqCst)
        );
        for (who, client, path, took) in [
            ("bob", &bob, "/version", &mut bob_took),
            ("the node", &node, "/api/v1/nodes/n1", &mut node_took),
            (
                "the admin",
                &admin,
                "/api/v1/namespaces/default/pods",
                &mut admin_took,
            ),
        ] {
            let t = Instant::now();
            let resp = client.get(server.url(path)).send().await?;
            took.push(t.elapsed());
            anyhow::ensure!(
                resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS,
                "{who} was refused too"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    while flood.join_next().await.is_some() {}
    let (sent, refused) = (
        sent.load(std::sync::atomic::Ordering::SeqCst),
        refused.load(std::sync::atomic::Ordering::SeqCst),
    );
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "alice: {sent} requests in {secs:.1} s ({:.0}/s), {refused} answered 429; worst wait: bob {:?}, node {:?}, admin {:?}",
        sent as f64 / secs,
        worst(&bob_took),
        worst(&node_took),
        worst(&admin_took)
    );
    let (retry, status) = example.lock().unwrap().clone().expect("a 429");
    let retry: u64 = retry.as_deref().unwrap_or("").parse()?;
    anyhow::ensure!(retry >= 1, "Retry-After: {retry}");
    anyhow::ensure!(
        status["kind"] == "Status"
            && status["reason"] == "TooManyRequests"
            && status["code"] == 429
            && status["details"]["retryAfterSeconds"] == retry,
        "429 body: {status}"
    );
    for (who, took) in [
        ("bob", &bob_took),
        ("the node", &node_took),
        ("the admin", &admin_took),
    ] {
        anyhow::ensure!(
            worst(took) < Duration::from_secs(1),
            "{who} waited {:?}",
            worst(took)
        );
    }
    // A client's open watches are capped: the node may hold 100 at once, not 101, and one
    // more once another ends.
    let watch = server.url("/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dn1");
    let mut watches = Vec::new();
    for _ in 0..100 {
        let r = node.get(&watch).send().await?;
        anyhow::ensure!(r.status().is_success(), "watch: {}", r.status());
        watches.push(r);
    }
    let r = node.get(&watch).send().await?;
    anyhow::ensure!(
        r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS
            && r.headers().contains_key(reqwest::header::RETRY_AFTER),
        "the 101st watch: {}",
        r.status()
    );
    watches.pop();
    eventually(
        "a watch once another ended",
        Duration::from_secs(10),
        || {
            let (node, watch) = (node.clone(), watch.clone());
            async move {
                let r = node.get(&watch).send().await?;
                Ok(r.status().is_success().then_some(r))
            }
        },
    )
    .await?;
    drop(watches);
    // The flood is not logged request by request.
    let logged = server.log_bytes() - log_before;
    anyhow::ensure!(logged < 16 * 1024, "{logged} bytes logged during the flood");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_accepts_back_off_and_keep_the_log_small() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    raise_nofile()?;
    // The server may hold 256 files but is told to take 4000 connections: accept fails.
    let server = ServerProc::start(
        &["prlimit", "--nofile=256:256", "--"],
        &[
            "--max-connections",
            "4000",
            "--max-connections-per-client",
            "4000",
        ],
    )
    .await?;
    let log_before = server.log_bytes();
    let mut held = Vec::new();
    let started = Instant::now();
    for _ in 0..600 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            connect_from(loopback(12), server.addr),
        )
        .await
        {
            held.push(s);
        }
    }
    // Out of descriptors for a while: the accept loop waits between attempts and logs once
    // per interval with a count.
    eventually(
        "a logged accept failure",
        Duration::from_secs(20),
        || async { Ok(server.log_text().contains("accept failed").then_some(())) },
    )
    .await?;
    let window = Duration::from_secs(3);
    if let Some(rest) = window.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let logged = server.log_bytes() - log_before;
    let lines: Vec<String> = server
        .log_text()
        .lines()
        .filter(|l| l.contains("accept failed"))
        .map(String::from)
        .collect();
    eprintln!(
        "{} connections held for {:?}: {logged} bytes logged; {lines:?}",
        held.len(),
        started.elapsed()
    );
    anyhow::ensure!(
        logged < 8 * 1024,
        "{logged} bytes logged while accept failed"
    );
    anyhow::ensure!(
        lines.len() <= 2,
        "accept failures logged {} times",
        lines.len()
    );
    // Once the connections go, the server serves again.
    drop(held);
    let admin = server.client(loopback(1), None)?;
    let url = server.url("/api/v1/namespaces/default/configmaps");
    eventually("the API after the flood", Duration::from_secs(20), || {
        let (admin, url) = (admin.clone(), url.clone());
        async move {
            Ok(admin
                .get(&url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        }
    })
    .await?;
    Ok(())
}

/// Figures, not a check: GET of one ConfigMap and LIST of 100, over one kept-alive connection,
/// in-process, as the admin (token, `system:masters`: neither RBAC nor the limiter in its path),
/// as a `system:masters` client certificate (the certificate's cost without RBAC) and as a
/// client-certificate user allowed by RBAC (`view` through a group binding, beside 200 other
/// bindings), with the limiter off and on.
/// `cargo test --workspace --test e2e -- --ignored --nocapture api_transport::`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures"]
async fn api_latency_of_the_admin_and_of_an_rbac_user() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    const N: usize = 2_000;
    let mut figures = Vec::new();
    for round in 0..2 {
        for (who, enabled) in [
            ("admin", true),
            ("masters cert", true),
            ("RBAC user", false),
            ("RBAC user", true),
        ] {
            let cluster = skiff_e2e::TestCluster::start(|c| {
                c.fairness.enabled = enabled;
                // The bench measures the cost of the path, not refusals.
                c.fairness.client_qps = 1e9;
                c.fairness.client_burst = u32::MAX;
            })
            .await?;
            let url = |p: &str| format!("https://{}{p}", cluster.server.addr);
            let ca = reqwest::Certificate::from_pem(cluster.server.ca_pem.as_bytes())?;
            let admin = reqwest::Client::builder()
                .add_root_certificate(ca.clone())
                .build()?;
            let binding = |name: String, group: &str| {
                serde_json::json!({"metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]})
            };
            let mut writes = vec![(
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                binding("bench-view".into(), "bench"),
            )];
            for i in 0..200 {
                writes.push((
                    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                    binding(format!("other-{i}"), &format!("other-{i}")),
                ));
            }
            for i in 0..100 {
                writes.push((
                    "/api/v1/namespaces/default/configmaps",
                    serde_json::json!({"metadata": {"name": format!("bench-{i}")}, "data": {"k": "v"}}),
                ));
            }
            for (path, body) in writes {
                let r = admin
                    .post(url(path))
                    .bearer_auth(&cluster.server.token)
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
            }
            // A certificate in `system:masters` pays for the certificate but skips RBAC.
            let group = if who == "masters cert" {
                "system:masters"
            } else {
                "bench"
            };
            let client = if who == "admin" {
                admin.clone()
            } else {
                reqwest::Client::builder()
                    .add_root_certificate(ca)
                    .identity(reqwest::Identity::from_pem(
                        identity(cluster.dir.path(), "bench-user", &[group])?.as_bytes(),
                    )?)
                    .build()?
            };
            let token = (who == "admin").then(|| cluster.server.token.clone());
            let request = |path: &str| {
                let r = client.get(url(path));
                match &token {
                    Some(t) => r.bearer_auth(t),
                    None => r,
                }
            };
            let get = "/api/v1/namespaces/default/configmaps/bench-0";
            let list = "/api/v1/namespaces/default/configmaps";
            eventually(
                "the binding in the RBAC cache",
                Duration::from_secs(10),
                || {
                    let r = request(list);
                    async move { Ok(r.send().await?.status().is_success().then_some(())) }
                },
            )
            .await?;
            for (what, path) in [("get", get), ("list", list)] {
                let mut took = Vec::with_capacity(N);
                for _ in 0..N {
                    let t = Instant::now();
                    let r = request(path).send().await?;
                    anyhow::ensure!(r.status().is_success(), "{what}: {}", r.status());
                    r.bytes().await?;
                    took.push(t.elapsed());
                }
                took.sort();
                let (p50, p99) = (took[N / 2], took[N * 99 / 100]);
                figures.push(format!(
                    "round {round}, {who:12}, limiter {}, {what:4}: p50 {p50:?}, p99 {p99:?}",
                    if enabled { "on " } else { "off" }
                ));
            }
            cluster.server.shutdown().await?;
        }
    }
    for f in figures {
        eprintln!("{f}");
    }
    Ok(())
}
