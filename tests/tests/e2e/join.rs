//! Joining nodes with a join token (k3s style), node identity and node authorization: a
//! `skiff server` and `skiff agent` processes in a network namespace of the test's own.
//! The agent checks the server's CA against the token before it sends it; a wrong, unknown or
//! expired token registers nothing; a node's certificate may change only its own Node and the
//! pods bound to it; a node name cannot be taken over by another host; logs reach the API
//! through the agent's TLS endpoint.
//! Needs root, iproute2, curl, docker-registry and the samples (`samples/build.sh`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, SkiffUp};

const API: &str = "https://127.0.0.1:6443";

struct Cluster {
    up: SkiffUp,
    server_dir: PathBuf,
    bin: String,
}

impl Cluster {
    async fn start(ns: &mut Netns, dir: &Path) -> anyhow::Result<Cluster> {
        let bin = skiff_e2e::skiff_binary()?.to_string_lossy().into_owned();
        let server_dir = dir.join("server");
        let log = dir.join("server.log");
        let index = ns.spawn(
            &[
                &bin,
                "server",
                "--data-dir",
                server_dir.to_str().unwrap(),
                "--api-addr",
                "127.0.0.1:6443",
            ],
            &log,
        )?;
        let up = SkiffUp {
            dir: server_dir.clone(),
            index,
            log,
        };
        eventually("the API server", Duration::from_secs(20), || async {
            Ok(up.skiff(ns, &["get", "namespaces"]).ok().map(|_| ()))
        })
        .await?;
        Ok(Cluster {
            up,
            server_dir,
            bin,
        })
    }

    fn node_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.server_dir.join("node-token"))?
            .trim()
            .to_string())
    }

    fn agent_args(&self, dir: &Path, name: &str, token: &str, bridge: &str) -> Vec<String> {
        [
            &self.bin,
            "agent",
            "--server",
            API,
            "--token",
            token,
            "--data-dir",
            dir.to_str().unwrap(),
            "--name",
            name,
            "--bridge",
            bridge,
            "--disable-oci",
            "--disable-proxy",
            "--heartbeat-seconds",
            "2",
        ]
        .map(String::from)
        .into()
    }

    /// Runs an agent that must fail to join: its exit status and its one line on stderr.
    fn failed_join(
        &self,
        ns: &Netns,
        dir: &Path,
        name: &str,
        token: &str,
    ) -> anyhow::Result<(Output, String)> {
        let args = self.agent_args(dir, name, token, "skiffx");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut full = vec!["timeout", "60"];
        full.extend(args);
        let out = ns.output(&full)?;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        anyhow::ensure!(lines.len() == 1, "the agent should say one line: {err}");
        let line = lines[0].to_string();
        Ok((out, line))
    }

    fn has_node(&self, ns: &Netns, name: &str) -> anyhow::Result<bool> {
        let out = self.up.skiff_output(ns, &["get", "node", name])?;
        Ok(out.status.success())
    }

    async fn ready(&self, ns: &Netns, name: &str) -> anyhow::Result<()> {
        eventually(
            &format!("node {name} Ready"),
            Duration::from_secs(40),
            || async {
                Ok(self
                    .up
                    .skiff(ns, &["get", "node", name])
                    .ok()
                    .filter(|o| o.contains(" Ready"))
                    .map(|_| ()))
            },
        )
        .await
    }
}

/// `curl` inside the namespace: the HTTP status and the body.
fn curl(ns: &Netns, args: &[&str]) -> anyhow::Result<(String, String)> {
    let mut full = vec!["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    let out = ns.run(&full)?;
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok((code.trim().to_string(), body.to_string()))
}

/// `curl` with a node's certificate from its data dir.
fn as_node(
    ns: &Netns,
    node_dir: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let pki = node_dir.join("pki");
    let (cert, key, ca) = (
        pki.join("client.crt"),
        pki.join("client.key"),
        pki.join("ca.crt"),
    );
    let url = format!("{API}{path}");
    let mut args = vec![
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
        &url,
    ];
    if let Some(b) = body {
        args.extend_from_slice(&["-d", b]);
    }
    curl(ns, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_with_a_token_and_are_held_to_their_own_objects() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new()?;
    ns.start_registry(dir.path()).await?;
    let cluster = Cluster::start(&mut ns, dir.path()).await?;
    let up = &cluster.up;
    let token = cluster.node_token()?;
    // The node-token file: mode 0600, K10<sha256 of the CA PEM>::node:<secret>.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cluster.server_dir.join("node-token"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = std::fs::read(cluster.server_dir.join("ca.crt"))?;
        let hash = skiff_client::token::sha256_hex(&ca);
        assert!(
            token.starts_with(&format!("K10{hash}::node:")),
            "{token} does not carry the CA hash {hash}"
        );
    }

    // A token whose hash is not the server's CA: refused before the token is sent.
    let secret = token.split_once("::").unwrap().1;
    let wrong_hash = format!("K10{}::{secret}", "0".repeat(64));
    let (out, last) =
        cluster.failed_join(&ns, &dir.path().join("bad-hash"), "bad-hash", &wrong_hash)?;
    assert!(!out.status.success());
    assert!(
        last.starts_with("error: ") && last.contains("does not match the join token"),
        "{last}"
    );
    assert!(!cluster.has_node(&ns, "bad-hash")?);
    // Nothing of it reached the server: no node password was recorded either.
    let passwords = up.skiff(&ns, &["get", "secrets", "-n", "kube-system"])?;
    assert!(!passwords.contains("bad-hash"), "{passwords}");

    // The right hash with a wrong secret.
    let wrong_secret = format!("{}::node:not-the-secret", token.split_once("::").unwrap().0);
    let (out, last) = cluster.failed_join(
        &ns,
        &dir.path().join("bad-secret"),
        "bad-secret",
        &wrong_secret,
    )?;
    assert!(!out.status.success());
    assert!(
        last.starts_with("error: ") && last.contains("not valid"),
        "{last}"
    );
    assert!(!cluster.has_node(&ns, "bad-secret")?);

    // An expired token (`skiff token create --ttl 1s`, then wait for the clock to pass it).
    let short = up.skiff(&ns, &["token", "create", "--ttl", "1s"])?;
    let short = short.trim().to_string();
    let short_id = short
        .split_once("::")
        .unwrap()
        .1
        .split('.')
        .next()
        .unwrap()
        .to_string();
    eventually(
        "the short token to expire",
        Duration::from_secs(10),
        || async {
            Ok(up
                .skiff(&ns, &["token", "list"])?
                .lines()
                .any(|l| l.starts_with(&short_id) && l.contains("<expired>"))
                .then_some(()))
        },
    )
    .await?;
    let (out, last) = cluster.failed_join(&ns, &dir.path().join("expired"), "expired", &short)?;
    assert!(!out.status.success());
    assert!(
        last.starts_with("error: ") && last.contains("expired"),
        "{last}"
    );
    assert!(!cluster.has_node(&ns, "expired")?);
    let passwords = up.skiff(&ns, &["get", "secrets", "-n", "kube-system"])?;
    assert!(
        !passwords.contains("expired") && !passwords.contains("bad-secret"),
        "{passwords}"
    );
    up.skiff(&ns, &["token", "delete", &short_id])?;
    assert!(!up.skiff(&ns, &["token", "list"])?.contains(&short_id));

    // A join token is no admin credential: it can list nothing.
    let bearer = format!("Authorization: Bearer {token}");
    let (code, body) = curl(
        &ns,
        &[
            "-k",
            "-H",
            &bearer,
            &format!("{API}/api/v1/namespaces/kube-system/secrets"),
        ],
    )?;
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("system:bootstrap:node"), "{body}");
    // Without any credential: 401, except the CA, which anyone may fetch.
    let (code, _) = curl(&ns, &["-k", &format!("{API}/api/v1/pods")])?;
    assert_eq!(code, "401");
    let (code, ca) = curl(&ns, &["-k", &format!("{API}/cacerts")])?;
    assert_eq!(code, "200");
    assert_eq!(
        ca,
        std::fs::read_to_string(cluster.server_dir.join("ca.crt"))?
    );

    // The node-token joins edge-1; a token from `skiff token create` joins edge-2.
    let d1 = dir.path().join("edge-1");
    let d2 = dir.path().join("edge-2");
    ns.reset_on_drop(&d1);
    ns.reset_on_drop(&d2);
    let a1_args = cluster.agent_args(&d1, "edge-1", &token, "skiffa");
    let a1 = ns.spawn(
        &a1_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("edge-1.log"),
    )?;
    let t2 = up.skiff(
        &ns,
        &["token", "create", "--ttl", "1h", "--description", "edge-2"],
    )?;
    assert!(up.skiff(&ns, &["token", "list"])?.contains("edge-2"));
    let a2_args = cluster.agent_args(&d2, "edge-2", t2.trim(), "skiffb");
    let a2 = ns.spawn(
        &a2_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("edge-2.log"),
    )?;
    cluster.ready(&ns, "edge-1").await?;
    cluster.ready(&ns, "edge-2").await?;

    // The node's identity: a certificate the CA signed for system:node:edge-1, key 0600.
    let id = ns.run(&[
        "openssl",
        "x509",
        "-noout",
        "-subject",
        "-in",
        d1.join("pki/client.crt").to_str().unwrap(),
    ]);
    if let Ok(subject) = id {
        assert!(
            subject.contains("system:node:edge-1") && subject.contains("system:nodes"),
            "{subject}"
        );
    }

    // edge-1's credential: its own Node status yes, another Node no.
    let (code, body) = as_node(
        &ns,
        &d1,
        "PATCH",
        "/api/v1/nodes/edge-1/status",
        Some(r#"{"metadata":{"annotations":{"checked":"yes"}}}"#),
    )?;
    assert_eq!(code, "200", "{body}");
    let (code, body) = as_node(
        &ns,
        &d1,
        "PATCH",
        "/api/v1/nodes/edge-2",
        Some(r#"{"metadata":{"labels":{"stolen":"yes"}}}"#),
    )?;
    assert_eq!(code, "403", "{body}");
    assert!(
        body.contains(r#"nodes \"edge-2\" is forbidden: User \"system:node:edge-1\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope"#),
        "{body}"
    );
    let (code, body) = as_node(
        &ns,
        &d1,
        "GET",
        "/api/v1/namespaces/kube-system/secrets",
        None,
    )?;
    assert_eq!(code, "403", "{body}");

    // Pods bound to each node: edge-1 may report on its own, not on edge-2's.
    up.push_samples(&ns, &[("hello-command.wasm", "hello:v1")])?;
    for (pod, node) in [("on-1", "edge-1"), ("on-2", "edge-2")] {
        let f = dir.path().join(format!("{pod}.yaml"));
        std::fs::write(&f, format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\nspec:\n  nodeName: {node}\n  restartPolicy: Never\n  containers:\n  - name: hello\n    image: 127.0.0.1:5000/hello:v1\n    args: [\"{pod}\"]\n"))?;
        up.skiff(&ns, &["apply", "-f", f.to_str().unwrap()])?;
    }
    for pod in ["on-1", "on-2"] {
        eventually(
            &format!("pod {pod} to finish"),
            Duration::from_secs(40),
            || async {
                let p = up.json(&ns, &["get", "pod", pod])?;
                Ok(
                    matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
                        .then_some(()),
                )
            },
        )
        .await?;
    }
    let patch = r#"{"status":{"message":"from edge-1"}}"#;
    let (code, body) = as_node(
        &ns,
        &d1,
        "PATCH",
        "/api/v1/namespaces/default/pods/on-2/status",
        Some(patch),
    )?;
    assert_eq!(code, "403", "{body}");
    let (code, body) = as_node(
        &ns,
        &d1,
        "PATCH",
        "/api/v1/namespaces/default/pods/on-1/status",
        Some(patch),
    )?;
    assert_eq!(code, "200", "{body}");

    // Logs come through each agent's TLS endpoint.
    for pod in ["on-1", "on-2"] {
        let logs = up.skiff(&ns, &["logs", pod])?;
        assert!(logs.contains(&format!("arg 1: {pod}")), "{logs}");
    }
    // The endpoint answers only the API server's certificate: not a node's, not anonymous.
    let node = up.json(&ns, &["get", "node", "edge-1"])?;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_i64()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/pods/default/on-1/log");
    // Its serving certificate comes from the node serving CA: it does not pass for a
    // certificate of the cluster CA (which clients of the API trust).
    let ca = d1.join("pki/ca.crt");
    let out = ns.output(&[
        "curl",
        "-s",
        "--max-time",
        "10",
        "--cacert",
        ca.to_str().unwrap(),
        &url,
    ])?;
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl should refuse the certificate"
    );
    let (code, _) = curl(&ns, &["-k", &url])?;
    assert_eq!(code, "401");
    let (cert, key) = (d2.join("pki/client.crt"), d2.join("pki/client.key"));
    let (code, _) = curl(
        &ns,
        &[
            "-k",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            &url,
        ],
    )?;
    assert_eq!(code, "403");

    // Another host (another data dir, so another node password) cannot take edge-1's name.
    let (out, last) = cluster.failed_join(&ns, &dir.path().join("thief"), "edge-1", &token)?;
    assert!(!out.status.success());
    assert!(
        last.starts_with("error: ") && last.contains("another node password"),
        "{last}"
    );

    // edge-1 restarted keeps its credential (same certificate) and comes back Ready.
    let cert_before = std::fs::read(d1.join("pki/client.crt"))?;
    ns.kill(a1)?;
    ns.spawn(
        &a1_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("edge-1-again.log"),
    )?;
    let since = chrono::Utc::now();
    eventually(
        "edge-1 to heartbeat again",
        Duration::from_secs(40),
        || async {
            // The heartbeat is the node's Lease (renewed every few seconds, in microseconds).
            let l = up.json(&ns, &["get", "lease", "edge-1", "-n", "kube-node-lease"])?;
            let beat = l["spec"]["renewTime"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            Ok(beat.filter(|b| *b > since).map(|_| ()))
        },
    )
    .await?;
    assert_eq!(std::fs::read(d1.join("pki/client.crt"))?, cert_before);

    // edge-2's token is deleted, and edge-2 comes back at another address: its serving
    // certificate no longer names it, so it asks for new certificates, with its own (the
    // token is no longer valid), and the API server reaches it at the new address.
    let t2_id = t2
        .trim()
        .split_once("::")
        .unwrap()
        .1
        .split('.')
        .next()
        .unwrap()
        .to_string();
    up.skiff(&ns, &["token", "delete", &t2_id])?;
    let serving_before = std::fs::read(d2.join("pki/serving.crt"))?;
    ns.kill(a2)?;
    let mut moved = a2_args.clone();
    moved.extend(["--node-ip", "127.0.0.2", "--agent-addr", "127.0.0.2:0"].map(String::from));
    ns.spawn(
        &moved.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("edge-2-moved.log"),
    )?;
    eventually("edge-2 at 127.0.0.2", Duration::from_secs(40), || async {
        let n = up.json(&ns, &["get", "node", "edge-2"])?;
        Ok((n["status"]["addresses"][0]["address"] == "127.0.0.2").then_some(()))
    })
    .await
    .map_err(|e| {
        let log = std::fs::read_to_string(dir.path().join("edge-2-moved.log")).unwrap_or_default();
        e.context(format!("edge-2's log:\n{log}"))
    })?;
    assert_ne!(std::fs::read(d2.join("pki/serving.crt"))?, serving_before);
    // The restarted agent serves the pod's logs once it has listed its pods again.
    let logs = eventually(
        "on-2's logs from the restarted edge-2",
        Duration::from_secs(30),
        || async { Ok(up.skiff(&ns, &["logs", "on-2"]).ok()) },
    )
    .await?;
    assert!(logs.contains("arg 1: on-2"), "{logs}");
    Ok(())
}
