//! Wasm runtime figures, each against a baseline from the same run:
//! - compile (cold) vs load from the compile cache (warm);
//! - per-request throughput and p99 with `wrk` against the bootcamp component vs a plain hyper
//!   server giving the same answer (target: wasm >= 50% of plain hyper);
//! - memory per idle served wasm program (listener + handler), 1,000 of them.
//!
//! Needs `samples/build.sh` run first and Debian's `wrk`. Run: `cargo bench -p skiff-wasm`.
//! `SKIFF_BENCH_SEQUENTIAL_ONLY=1` stops after the in-process figures (to profile them:
//! `cargo bench --profile profiling`, then `perf record` the bench binary).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use skiff_wasm::{GuestConfig, Runtime};

// The allocator the skiff binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs wrk; returns (requests/s, p99 ms).
fn wrk(url: &str) -> Option<(f64, f64)> {
    let out = std::process::Command::new("wrk")
        .args(["-t2", "-c32", "-d5s", "--latency", url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let p99 = text
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))?
        .split_whitespace()
        .nth(1)?
        .to_string();
    let ms = if let Some(v) = p99.strip_suffix("us") {
        v.parse::<f64>().ok()? / 1000.0
    } else if let Some(v) = p99.strip_suffix("ms") {
        v.parse().ok()?
    } else {
        p99.strip_suffix('s')?.parse::<f64>().ok()? * 1000.0
    };
    Some((rps, ms))
}

async fn plain_hyper(body: &'static str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        body.as_bytes(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Mean time of one request, one after the other, after a warm-up.
async fn sequential(handler: &skiff_wasm::Handler) -> Duration {
    use http_body_util::BodyExt;
    let one = || {
        http::Request::get("http://bench/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    for _ in 0..200 {
        handler.handle(one()).await.unwrap();
    }
    const SEQ: u32 = 5000;
    let t = Instant::now();
    for _ in 0..SEQ {
        let r = handler.handle(one()).await.unwrap();
        r.into_body().collect().await.unwrap();
    }
    t.elapsed() / SEQ
}

fn main() {
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/build/bootcamp-v1.wasm");
    let Ok(bytes) = std::fs::read(&sample) else {
        eprintln!(
            "{} is missing: run samples/build.sh first",
            sample.display()
        );
        std::process::exit(1);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(dir.path().join("cache"), 1000).unwrap();
        let t = Instant::now();
        let p = runtime.load(&bytes[..]).await.unwrap();
        let cold = t.elapsed();
        let t = Instant::now();
        let p2 = runtime.load(&bytes[..]).await.unwrap();
        let warm = t.elapsed();
        assert!(!p.cached && p2.cached);
        println!("bootcamp component ({} KiB): compile {:?} cold, {:?} from the compile cache ({:.0}x faster)", bytes.len() / 1024, cold, warm, cold.as_secs_f64() / warm.as_secs_f64());

        let cfg = GuestConfig { env: vec![("HOSTNAME".into(), "bench".into())], ..Default::default() };
        let server = runtime.serve_http(&p2, cfg, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
        // One request's cost in the runtime alone (no sockets): what the proxy's in-process
        // path pays, one request after the other, on a multi-threaded runtime (the guest runs
        // in a task of its own) and on a single thread.
        let handler = server.handler();
        let h2 = handler.clone();
        let multi = sequential(&handler).await;
        let single = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(sequential(&h2))
        })
        .join()
        .unwrap();
        println!("one request in the runtime alone (instantiate, handle, collect the body): {multi:?} on the multi-threaded runtime, {single:?} on one thread");
        if std::env::var_os("SKIFF_BENCH_SEQUENTIAL_ONLY").is_some() {
            // For profiling the runtime's own cost: nothing else runs.
            return;
        }
        let plain = plain_hyper("Hello Kubernetes bootcamp! | Running on: bench | v=1\n").await;
        let wasm_url = format!("http://{}/", server.addr);
        let plain_url = format!("http://{plain}/");
        let (w, h) = tokio::task::spawn_blocking(move || (wrk(&wasm_url), wrk(&plain_url))).await.unwrap();
        match (w, h) {
            (Some((wr, wp)), Some((hr, hp))) => {
                println!("per request, wrk -t2 -c32 -d5s on the same 2 cores:");
                println!("  wasm bootcamp component: {wr:>9.0} req/s  p99 {wp:.2} ms");
                println!("  plain hyper (baseline):  {hr:>9.0} req/s  p99 {hp:.2} ms");
                println!("  wasm / hyper throughput: {:.0}%  (target >= 50%)", wr / hr * 100.0);
            }
            _ => println!("per request: wrk is not installed (apt-get install wrk); skipped"),
        }
        drop(server);

        const N: usize = 1000;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kib();
        let mut servers = Vec::with_capacity(N);
        for i in 0..N {
            let cfg = GuestConfig { env: vec![("HOSTNAME".into(), format!("pod-{i}"))], ..Default::default() };
            servers.push(runtime.serve_http(&p2, cfg, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = rss_kib();
        println!("density: {N} idle served programs add {} KiB RSS: {:.1} KiB each (target <= 256 KiB per idle wasm pod)", after - before, (after - before) as f64 / N as f64);
    });
}
