//! Container logs: one file per container run, size-capped (the oldest half is dropped when a
//! file passes the cap), the previous run's file kept for `--previous`; and the node's log
//! endpoint the API server forwards `pods/{name}/log` to.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};

/// Largest a container's log file grows before it is trimmed.
pub const MAX_LOG_BYTES: u64 = 10 * 1024 * 1024;

/// Where one pod's container logs live.
#[derive(Debug, Clone)]
pub struct PodLogs {
    pub dir: PathBuf,
}

impl PodLogs {
    pub fn new(dir: PathBuf) -> std::io::Result<PodLogs> {
        std::fs::create_dir_all(&dir)?;
        Ok(PodLogs { dir })
    }

    pub fn current(&self, container: &str) -> PathBuf {
        self.dir.join(format!("{container}.log"))
    }

    pub fn previous(&self, container: &str) -> PathBuf {
        self.dir.join(format!("{container}.previous.log"))
    }

    /// Opens the log of a new run of `container` (append); the last run's log becomes
    /// the previous one when `restart` is set.
    pub fn open_run(&self, container: &str, restart: bool) -> std::io::Result<std::fs::File> {
        let cur = self.current(container);
        if restart && cur.exists() {
            std::fs::rename(&cur, self.previous(container))?;
        }
        trim(&cur)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cur)
    }
}

impl PodLogs {
    /// Trims every container log of the pod that grew past the cap (wasm guests and OCI
    /// containers append to their files themselves, so the files are checked from outside).
    pub fn trim_all(&self) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                if let Err(e) = trim(&path) {
                    tracing::warn!(log = %path.display(), error = %e, "cannot trim a container log");
                }
            }
        }
    }
}

/// Drops the older half of a log file that grew past the cap.
pub fn trim(path: &Path) -> std::io::Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.len() <= MAX_LOG_BYTES {
        return Ok(());
    }
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(meta.len() / 2))?;
    let mut rest = Vec::new();
    f.read_to_end(&mut rest)?;
    let start = rest.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1);
    std::fs::write(path, &rest[start..])
}

/// The last `n` lines of `text`.
pub fn tail(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &text[text.len()..];
    }
    let mut seen = 0;
    let end = if text.ends_with(b"\n") {
        text.len() - 1
    } else {
        text.len()
    };
    for i in (0..end).rev() {
        if text[i] == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// A pod this node runs, as its endpoint (logs, exec) sees it.
#[derive(Debug, Clone)]
pub struct PodEntry {
    pub uid: String,
    pub logs: PodLogs,
    /// Every container's name…
    pub containers: Vec<String>,
    /// …and those that are OCI containers (exec runs there).
    pub oci: Vec<String>,
    /// The pod's address, once it has one (port-forward reaches its listeners there)…
    pub ip: Option<std::net::Ipv4Addr>,
    /// …or inside its network namespace, when it has one.
    pub netns: Option<std::path::PathBuf>,
}

/// Pods this node serves logs and exec for, by `namespace/name`.
pub type LogIndex = Arc<Mutex<HashMap<String, PodEntry>>>;

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(code: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg)).boxed());
    *r.status_mut() = code;
    r
}

/// Serves `GET /pods/{ns}/{name}/log?container=&tailLines=&previous=&follow=`.
pub async fn serve(
    index: LogIndex,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(String::from)
        .collect();
    let q: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let ["pods", ns, name, "log"] = path.iter().map(String::as_str).collect::<Vec<_>>()[..] else {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n".into()));
    };
    let entry = index
        .lock()
        .expect("log index")
        .get(&format!("{ns}/{name}"))
        .cloned();
    let Some(PodEntry {
        logs, containers, ..
    }) = entry
    else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{name} is not running on this node\n"),
        ));
    };
    let container = match q.get("container") {
        Some(c) if containers.contains(c) => c.clone(),
        Some(c) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("container {c} is not valid for pod {name}\n"),
            ))
        }
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]\n",
                    containers.join(" ")
                ),
            ))
        }
    };
    let previous = q.get("previous").is_some_and(|v| v == "true");
    let path = if previous {
        logs.previous(&container)
    } else {
        logs.current(&container)
    };
    let content = match std::fs::read(&path) {
        Ok(c) => c,
        Err(_) if previous => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "previous terminated container \"{container}\" in pod \"{name}\" not found\n"
                ),
            ))
        }
        Err(_) => Vec::new(),
    };
    let shown = match q.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        Some(n) => tail(&content, n).to_vec(),
        None => content.clone(),
    };
    let follow = q.get("follow").is_some_and(|v| v == "true");
    if !follow || previous {
        return Ok(Response::new(Full::new(Bytes::from(shown)).boxed()));
    }
    // Follow: send what is there, then what is appended, until the pod leaves this node.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let key = format!("{ns}/{name}");
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(Bytes::from(shown)))).await.is_err() {
            return;
        }
        let mut offset = content.len() as u64;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !index.lock().expect("log index").contains_key(&key) {
                return;
            }
            let Ok(mut f) = std::fs::File::open(&path) else {
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < offset {
                offset = 0; // trimmed or a new run
            }
            if len == offset {
                continue;
            }
            let mut buf = Vec::new();
            if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                offset += buf.len() as u64;
                if tx.send(Ok(Frame::data(Bytes::from(buf)))).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Response::new(BodyExt::boxed(StreamBody::new(
        tokio_stream_from(rx),
    ))))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_guest_log_is_held_to_the_cap() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let logs = PodLogs::new(d.path().to_path_buf()).unwrap();
        // A guest holds its log open for appending and writes past the cap.
        let mut f = logs.open_run("app", false).unwrap();
        let line = "y".repeat(99) + "\n";
        for _ in 0..(MAX_LOG_BYTES / 100 + 10) {
            f.write_all(line.as_bytes()).unwrap();
        }
        logs.trim_all();
        let after = std::fs::metadata(logs.current("app")).unwrap().len();
        assert!(after <= MAX_LOG_BYTES / 2 + 1000, "{after}");
        // The guest's next write lands at the new end, not at its old offset.
        f.write_all(b"last\n").unwrap();
        let text = std::fs::read_to_string(logs.current("app")).unwrap();
        assert!(text.ends_with("last\n"));
        assert_eq!(text.len() as u64, after + 5);
    }

    #[test]
    fn tail_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\n", 5), b"a\n");
        assert_eq!(tail(b"a\nb\n", 0), b"");
    }

    #[test]
    fn runs_rotate_to_previous_and_big_logs_are_trimmed() {
        let d = tempfile::tempdir().unwrap();
        let logs = PodLogs::new(d.path().to_path_buf()).unwrap();
        use std::io::Write;
        writeln!(logs.open_run("app", false).unwrap(), "first run").unwrap();
        writeln!(logs.open_run("app", true).unwrap(), "second run").unwrap();
        assert_eq!(
            std::fs::read_to_string(logs.previous("app")).unwrap(),
            "first run\n"
        );
        assert_eq!(
            std::fs::read_to_string(logs.current("app")).unwrap(),
            "second run\n"
        );
        let big = d.path().join("big.log");
        let line = "x".repeat(99) + "\n";
        std::fs::write(&big, line.repeat((MAX_LOG_BYTES / 100 + 10) as usize)).unwrap();
        trim(&big).unwrap();
        let after = std::fs::metadata(&big).unwrap().len();
        assert!(
            after <= MAX_LOG_BYTES / 2 + 1000 && after.is_multiple_of(100),
            "{after}"
        );
    }
}
