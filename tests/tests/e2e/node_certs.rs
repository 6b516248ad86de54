//! Node certificates renewed while the agent runs, and NodeRestriction on a node's own Node:
//! a `skiff server` issuing node certificates valid for 60 s and a `skiff agent` checking
//! them every 2 s, in a network namespace of the test's own. The agent's certificates change
//! while its process stays the same, the node stays Ready past the first certificate's
//! expiry, the API server still reaches the agent's endpoint (which serves the new serving
//! certificate), and the node may not set a `node-restriction.kubernetes.io/` label on itself.
//! A node whose certificate expired while it was down needs a join token again, and says so.
//! Needs root, iproute2, curl, openssl, docker-registry and the samples (`samples/build.sh`).

use std::path::Path;
use std::time::Duration;

use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, SkiffUp};

const API: &str = "https://127.0.0.1:6443";

/// `curl` with the node's current certificate from its data dir: the HTTP status and body.
fn as_node(
    ns: &Netns,
    node_dir: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(String, String)> {
    let pki = node_dir.join("pki");
    let (cert, key, ca) = (
        pki.join("client.crt"),
        pki.join("client.key"),
        pki.join("ca.crt"),
    );
    let url = format!("{API}{path}");
    let out = ns.run(&[
        "curl",
        "-s",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--cacert",
        ca.to_str().unwrap(),
        "-X",
        method,
        "-H",
        "Content-Type: application/merge-patch+json",
        "-d",
        body,
        &url,
    ])?;
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok((code.trim().to_string(), body.to_string()))
}

/// The serial number and expiry of a certificate file, as the agent reads them.
fn serial_of(path: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(path)?;
    skiff_node::join::serial(&pem)
        .ok_or_else(|| anyhow::anyhow!("{}: no certificate", path.display()))
}

/// The serial number of the certificate the agent's endpoint serves now (a new connection).
fn served_serial(ns: &Netns, port: i64) -> anyhow::Result<String> {
    let connect = format!("127.0.0.1:{port}");
    let out = ns.run(&[
        "sh",
        "-c",
        &format!("openssl s_client -connect {connect} </dev/null 2>/dev/null | openssl x509 -noout -serial"),
    ])?;
    let serial = out
        .trim()
        .strip_prefix("serial=")
        .ok_or_else(|| anyhow::anyhow!("no serial from the endpoint: {out}"))?;
    Ok(serial.to_ascii_lowercase())
}

/// `a1:b2:..` (x509-parser) → `a1b2..` (openssl).
fn plain(serial: &str) -> String {
    serial.replace(':', "").to_ascii_lowercase()
}

fn not_after(path: &Path) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let date = text
        .trim()
        .strip_prefix("notAfter=")
        .ok_or_else(|| anyhow::anyhow!("no enddate: {text}"))?;
    Ok(chrono::NaiveDateTime::parse_from_str(date, "%b %e %H:%M:%S %Y GMT")?.and_utc())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_are_renewed_while_the_agent_runs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new()?;
    ns.start_registry(dir.path()).await?;
    let bin = skiff_e2e::skiff_binary()?.to_string_lossy().into_owned();
    let server_dir = dir.path().join("server");
    let log = dir.path().join("server.log");
    let index = ns.spawn(
        &[
            &bin,
            "server",
            "--data-dir",
            server_dir.to_str().unwrap(),
            "--api-addr",
            "127.0.0.1:6443",
            "--node-cert-validity",
            "60s",
        ],
        &log,
    )?;
    let up = SkiffUp {
        dir: server_dir.clone(),
        index,
        log,
    };
    eventually("the API server", Duration::from_secs(20), || async {
        Ok(up.skiff(&ns, &["get", "namespaces"]).ok().map(|_| ()))
    })
    .await?;
    let token = std::fs::read_to_string(server_dir.join("node-token"))?
        .trim()
        .to_string();

    let node_dir = dir.path().join("renewer");
    ns.reset_on_drop(&node_dir);
    let agent_log = dir.path().join("renewer.log");
    let agent = ns.spawn(
        &[
            &bin,
            "agent",
            "--server",
            API,
            "--token",
            &token,
            "--data-dir",
            node_dir.to_str().unwrap(),
            "--name",
            "renewer",
            "--bridge",
            "skiffcert",
            "--disable-oci",
            "--disable-proxy",
            "--heartbeat-seconds",
            "2",
            "--cert-check-seconds",
            "2",
        ],
        &agent_log,
    )?;
    let pid = ns.pid(agent);
    let log_of = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    eventually("node renewer Ready", Duration::from_secs(40), || async {
        Ok(up
            .skiff(&ns, &["get", "node", "renewer"])
            .ok()
            .filter(|o| o.contains(" Ready"))
            .map(|_| ()))
    })
    .await
    .map_err(|e| e.context(format!("the agent's log:\n{}", log_of())))?;
    // A second node joins with a token of its own, stops, and its token is deleted: by the
    // time it comes back its certificate has expired, and it says it needs a join token.
    let sleeper_token = up.skiff(&ns, &["token", "create", "--ttl", "1h"])?;
    let sleeper_token = sleeper_token.trim().to_string();
    let sleeper_dir = dir.path().join("sleeper");
    ns.reset_on_drop(&sleeper_dir);
    let sleeper_args = |token: &str| -> Vec<String> {
        [
            &bin,
            "agent",
            "--server",
            API,
            "--token",
            token,
            "--data-dir",
            sleeper_dir.to_str().unwrap(),
            "--name",
            "sleeper",
            "--bridge",
            "skiffsleep",
            "--disable-oci",
            "--disable-proxy",
            "--agent-addr",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .into()
    };
    let args = sleeper_args(&sleeper_token);
    let sleeper = ns.spawn(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("sleeper.log"),
    )?;
    eventually(
        "node sleeper registered",
        Duration::from_secs(40),
        || async { Ok(up.skiff(&ns, &["get", "node", "sleeper"]).ok().map(|_| ())) },
    )
    .await?;
    ns.kill(sleeper)?;
    let sleeper_id = sleeper_token
        .split_once("::")
        .and_then(|(_, c)| c.split_once('.'))
        .map(|(id, _)| id.to_string())
        .unwrap();
    up.skiff(&ns, &["token", "delete", &sleeper_id])?;
    let sleeper_expiry = not_after(&sleeper_dir.join("pki/client.crt"))?;

    let client_crt = node_dir.join("pki/client.crt");
    let serving_crt = node_dir.join("pki/serving.crt");
    let first_serial = serial_of(&client_crt)?;
    let first_serving = serial_of(&serving_crt)?;
    let first_expiry = not_after(&client_crt)?;
    assert!(
        first_expiry < chrono::Utc::now() + chrono::Duration::seconds(61),
        "the server issues 60 s certificates: {first_expiry}"
    );

    // A pod on the node, whose logs the API server fetches from the agent's endpoint.
    up.push_samples(&ns, &[("hello-command.wasm", "hello:v1")])?;
    let f = dir.path().join("pod.yaml");
    std::fs::write(&f, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: greeter\nspec:\n  nodeName: renewer\n  restartPolicy: Never\n  containers:\n  - name: hello\n    image: 127.0.0.1:5000/hello:v1\n    args: [\"greeter\"]\n")?;
    up.skiff(&ns, &["apply", "-f", f.to_str().unwrap()])?;
    eventually("pod greeter to finish", Duration::from_secs(40), || async {
        let p = up.json(&ns, &["get", "pod", "greeter"])?;
        Ok(matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")).then_some(()))
    })
    .await?;
    assert!(up
        .skiff(&ns, &["logs", "greeter"])?
        .contains("arg 1: greeter"));

    // Renewed while running: new certificates on disk, the same agent process, and the
    // renewal logged (the files are written before the certificates are swapped in and the
    // renewal is logged, so the log line may come a moment after the files).
    eventually(
        "the agent's certificates to be renewed and the renewal logged",
        Duration::from_secs(60),
        || async {
            Ok((serial_of(&client_crt)? != first_serial
                && serial_of(&serving_crt)? != first_serving
                && log_of().contains("node certificates renewed"))
            .then_some(()))
        },
    )
    .await
    .map_err(|e| e.context(format!("the agent's log:\n{}", log_of())))?;
    assert_eq!(ns.pid(agent), pid);
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["client.key", "serving.key"] {
            let mode = std::fs::metadata(node_dir.join("pki").join(key))?
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    // Past the first certificate's expiry the node still heartbeats with its new identity.
    let past = first_expiry + chrono::Duration::seconds(2);
    eventually(
        "a Lease renewal after the first certificate expired",
        Duration::from_secs(90),
        || async {
            let l = up.json(&ns, &["get", "lease", "renewer", "-n", "kube-node-lease"])?;
            let beat = l["spec"]["renewTime"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            Ok(beat.filter(|b| *b > past).map(|_| ()))
        },
    )
    .await
    .map_err(|e| e.context(format!("the agent's log:\n{}", log_of())))?;
    let node = up.skiff(&ns, &["get", "node", "renewer"])?;
    assert!(node.contains(" Ready"), "{node}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("State:") && !l.contains("Z")),
        "the agent process {pid} is gone: {status}"
    );
    assert!(
        !log_of().contains("renewing the node certificates failed"),
        "{}",
        log_of()
    );

    // The endpoint serves the current serving certificate, and logs still come through it.
    let n = up.json(&ns, &["get", "node", "renewer"])?;
    let port = n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_i64()
        .unwrap();
    eventually(
        "the endpoint to serve the serving certificate on disk",
        Duration::from_secs(20),
        || async {
            let on_disk = plain(&serial_of(&serving_crt)?);
            let served = served_serial(&ns, port)?;
            Ok((served.trim_start_matches('0') == on_disk.trim_start_matches('0')).then_some(()))
        },
    )
    .await?;
    assert_ne!(
        plain(&first_serving).trim_start_matches('0'),
        served_serial(&ns, port)?.trim_start_matches('0')
    );
    let logs = up.skiff(&ns, &["logs", "greeter"])?;
    assert!(logs.contains("arg 1: greeter"), "{logs}");

    // NodeRestriction: the node may not label itself node-restriction.kubernetes.io/x (nor
    // change its taints); a label of its own is fine.
    let (code, body) = as_node(
        &ns,
        &node_dir,
        "PATCH",
        "/api/v1/nodes/renewer",
        r#"{"metadata":{"labels":{"node-restriction.kubernetes.io/x":"y"}}}"#,
    )?;
    assert_eq!(code, "403", "{body}");
    assert!(
        body.contains(r#"nodes \"renewer\" is forbidden: is not allowed to modify labels: node-restriction.kubernetes.io/x"#),
        "{body}"
    );
    let (code, body) = as_node(
        &ns,
        &node_dir,
        "PATCH",
        "/api/v1/nodes/renewer",
        r#"{"spec":{"taints":[{"key":"mine","effect":"NoSchedule"}]}}"#,
    )?;
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("is not allowed to modify taints"), "{body}");
    let (code, body) = as_node(
        &ns,
        &node_dir,
        "PATCH",
        "/api/v1/nodes/renewer",
        r#"{"metadata":{"labels":{"example.com/rack":"r1"}}}"#,
    )?;
    assert_eq!(code, "200", "{body}");
    let labels = up.json(&ns, &["get", "node", "renewer"])?["metadata"]["labels"].clone();
    assert_eq!(labels["example.com/rack"], "r1");
    assert!(labels.get("node-restriction.kubernetes.io/x").is_none());
    // The sleeper's certificate has expired: with its deleted token it cannot come back, and
    // says so in one line.
    let wait = sleeper_expiry - chrono::Utc::now() + chrono::Duration::seconds(2);
    if let Ok(wait) = wait.to_std() {
        tokio::time::sleep(wait).await; // the certificate's own expiry, not a readiness wait
    }
    let args = sleeper_args(&sleeper_token);
    let mut full = vec!["timeout", "60"];
    full.extend(args.iter().map(String::as_str));
    let out = ns.output(&full)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(
        lines[0].contains("client certificate of node sleeper expired at")
            && lines[0].contains("valid join token"),
        "{err}"
    );
    // An administrator may set it.
    up.skiff(
        &ns,
        &[
            "label",
            "node",
            "renewer",
            "node-restriction.kubernetes.io/x=y",
        ],
    )?;
    Ok(())
}
