//! A steady HTTP load from inside a test's network namespace, counting every failure: the
//! yardstick for "no request lost" during rolling updates and scale-downs.
//!
//! The load runs on a thread of its own that has entered the namespace (`setns` affects
//! only the calling thread), with its own single-threaded runtime.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Runs `f` on a new thread inside network namespace `ns`.
pub fn in_netns<F, Fut, T>(ns: &str, f: F) -> std::thread::JoinHandle<anyhow::Result<T>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f())
    })
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, as text.
    pub errors: Vec<String>,
    /// Answer bodies and how often each came.
    pub answers: BTreeMap<String, u64>,
}

impl Report {
    fn fail(&mut self, e: String) {
        self.failed += 1;
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

/// `connections` keep-alive clients requesting `GET /` from `addr` back to back.
pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

async fn client(
    addr: String,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
) -> anyhow::Result<()> {
    let mut sender = None;
    while !stop.load(Ordering::Relaxed) {
        if sender.is_none() {
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(tcp) => {
                    let (s, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                    tokio::spawn(conn);
                    sender = Some(s);
                }
                Err(e) => {
                    report.lock().unwrap().fail(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let s: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>> =
            sender.as_mut().expect("connected");
        if s.ready().await.is_err() {
            // The server closed an idle keep-alive connection: open another (not a failure;
            // no request was sent on it).
            sender = None;
            continue;
        }
        let req = hyper::Request::get("/")
            .header("host", &addr)
            .body(Empty::<Bytes>::new())?;
        match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Ok(body) if status.is_success() => {
                        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                        let mut r = report.lock().unwrap();
                        r.ok += 1;
                        *r.answers.entry(text).or_default() += 1;
                    }
                    Ok(body) => report.lock().unwrap().fail(format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&body.to_bytes())
                    )),
                    Err(e) => {
                        report.lock().unwrap().fail(format!("body: {e}"));
                        sender = None;
                    }
                }
            }
            Err(e) => {
                report.lock().unwrap().fail(format!("request: {e}"));
                sender = None;
            }
        }
    }
    Ok(())
}

impl Load {
    pub fn start(ns: &str, addr: &str, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let (s, r, addr) = (stop.clone(), report.clone(), addr.to_string());
        let thread = in_netns(ns, move || async move {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..connections {
                set.spawn(client(addr.clone(), s.clone(), r.clone()));
            }
            while let Some(done) = set.join_next().await {
                done??;
            }
            Ok(())
        });
        Load {
            stop,
            report,
            thread,
        }
    }

    /// What happened so far.
    pub fn report(&self) -> Report {
        self.report.lock().unwrap().clone()
    }

    /// Stops the clients and returns the totals.
    pub fn finish(self) -> anyhow::Result<Report> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        Ok(self.report.lock().unwrap().clone())
    }
}
