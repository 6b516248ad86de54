//! A private network namespace per test: the node's bridge, pod addresses, registry and API
//! all live inside it, so tests never touch the host's network and can run in parallel.
//! Needs root and iproute2.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{eventually, skiff_binary};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
    children: Vec<Child>,
    /// Data dirs of the skiff nodes started here: their OCI containers are stopped and
    /// removed (`skiff reset`) once the processes are gone.
    node_dirs: Vec<PathBuf>,
}

impl Netns {
    pub fn new() -> anyhow::Result<Netns> {
        let name = format!(
            "skiff-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip").args(["netns", "add", &name]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "ip netns add {name} (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns {
            name,
            children: Vec::new(),
            node_dirs: Vec::new(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `nsenter --net`: the namespace's network only. Unlike `ip netns exec` it keeps the
    /// host's mounts (cgroups included, which runc needs), and the pod namespaces the
    /// node makes are visible outside, for the tests to look into and to clean up.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).args(args);
        c
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.command(args).output()?)
    }

    /// Runs a command inside the namespace; it must succeed. Returns stdout.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args)?;
        anyhow::ensure!(
            out.status.success(),
            "`{}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Starts a long-running process inside the namespace, logging to `log`. Returns its index.
    pub fn spawn(&mut self, args: &[&str], log: &Path) -> anyhow::Result<usize> {
        self.spawn_with(args, std::fs::File::create(log)?)
    }

    /// As [`Netns::spawn`], appending to `log` (a process started again keeps its history).
    pub fn spawn_appending(&mut self, args: &[&str], log: &Path) -> anyhow::Result<usize> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        self.spawn_with(args, f)
    }

    fn spawn_with(&mut self, args: &[&str], f: std::fs::File) -> anyhow::Result<usize> {
        let child = self
            .command(args)
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f))
            .spawn()?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// Has the OCI containers of the node with data in `dir` removed (`skiff reset`) when the
    /// namespace goes: for nodes started with [`Netns::spawn`] rather than [`SkiffUp`].
    pub fn reset_on_drop(&mut self, dir: &Path) {
        if !self.node_dirs.iter().any(|d| d == dir) {
            self.node_dirs.push(dir.to_path_buf());
        }
    }

    /// The PID of a process this namespace started.
    pub fn pid(&self, index: usize) -> u32 {
        self.children[index].id()
    }

    /// `kill -9` a process this namespace started (by its PID).
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        let c = &mut self.children[index];
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// Starts `docker-registry` on 127.0.0.1:5000 inside the namespace.
    pub async fn start_registry(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.start_registry_at(dir, "127.0.0.1:5000").await
    }

    /// Starts `docker-registry` on `addr` (`host:port`) inside the namespace.
    pub async fn start_registry_at(&mut self, dir: &Path, addr: &str) -> anyhow::Result<()> {
        let cfg = dir.join("registry.yml");
        std::fs::write(&cfg, format!("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n", dir.join("registry").display()))?;
        self.spawn(
            &["docker-registry", "serve", cfg.to_str().unwrap()],
            &dir.join("registry.log"),
        )?;
        eventually("the registry", Duration::from_secs(20), || async {
            Ok(self
                .run(&["curl", "-sf", &format!("http://{addr}/v2/")])
                .ok()
                .map(|_| ()))
        })
        .await
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(bin) = skiff_binary() {
            for dir in &self.node_dirs {
                let _ = self
                    .command(&[
                        bin.to_str().unwrap(),
                        "reset",
                        "--data-dir",
                        dir.to_str().unwrap(),
                    ])
                    .output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// `skiff up` inside a namespace, driven with the skiff CLI as a user would.
pub struct SkiffUp {
    pub dir: PathBuf,
    pub index: usize,
    /// The cluster's log, shown when a command fails.
    pub log: PathBuf,
}

impl SkiffUp {
    /// A fresh namespace with a registry and `skiff up` (with `extra` flags) inside it, both
    /// keeping their files under `dir`. Bind the pair in this order (`let (ns, up) = ...`):
    /// the cluster is then dropped before its namespace.
    pub async fn in_new_netns(dir: &Path, extra: &[&str]) -> anyhow::Result<(Netns, SkiffUp)> {
        let mut ns = Netns::new()?;
        ns.start_registry(dir).await?;
        let up = SkiffUp::start(&mut ns, dir, extra).await?;
        Ok((ns, up))
    }

    pub async fn start(ns: &mut Netns, dir: &Path, extra: &[&str]) -> anyhow::Result<SkiffUp> {
        let bin = skiff_binary()?;
        let data = dir.join("skiff");
        let mut args = vec![
            bin.to_str().unwrap(),
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--api-addr",
            "127.0.0.1:6443",
            "--name",
            "edge-1",
            "--heartbeat-seconds",
            "2",
        ];
        args.extend_from_slice(extra);
        let log = dir.join(format!(
            "skiff-up-{}.log",
            chrono::Utc::now().timestamp_millis()
        ));
        let index = ns.spawn(&args, &log)?;
        if !ns.node_dirs.contains(&data) {
            ns.node_dirs.push(data.clone());
        }
        let up = SkiffUp {
            dir: data,
            index,
            log,
        };
        eventually("node edge-1 Ready", Duration::from_secs(30), || async {
            Ok(up
                .skiff(ns, &["get", "nodes"])
                .ok()
                .filter(|o| o.contains("edge-1") && o.contains(" Ready"))
                .map(|_| ()))
        })
        .await?;
        Ok(up)
    }

    /// Runs the skiff CLI inside the namespace against this cluster; it must succeed.
    pub fn skiff(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
        let out = self.skiff_output(ns, args)?;
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let show = |a: &[&str]| {
                self.skiff_output(ns, a)
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default()
            };
            anyhow::bail!(
                "skiff {} failed: {}\n--- pods:\n{}--- events:\n{}--- skiff up log (last lines):\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                show(&["get", "pods", "-A", "-o", "wide"]),
                show(&["get", "events"]),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    pub fn skiff_output(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<Output> {
        let bin = skiff_binary()?;
        let kc = self.dir.join("kubeconfig");
        let mut full = vec![bin.to_str().unwrap(), "--kubeconfig", kc.to_str().unwrap()];
        full.extend_from_slice(args);
        ns.output(&full)
    }

    /// Pushes samples built by `samples/build.sh` to the namespace's registry:
    /// `(FILE, REPO:TAG)` → `127.0.0.1:5000/REPO:TAG`.
    pub fn push_samples(&self, ns: &Netns, samples: &[(&str, &str)]) -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/build");
        for (file, reference) in samples {
            self.skiff(
                ns,
                &[
                    "push",
                    dir.join(file).to_str().unwrap(),
                    &format!("127.0.0.1:5000/{reference}"),
                ],
            )?;
        }
        Ok(())
    }

    /// Copies the OCI image layouts built by `samples/build.sh` to the namespace's registry
    /// with skopeo: `(LAYOUT:TAG, REPO:TAG)` → `127.0.0.1:5000/REPO:TAG`.
    pub fn push_images(&self, ns: &Netns, images: &[(&str, &str)]) -> anyhow::Result<()> {
        for (src, reference) in images {
            self.push_image(ns, src, reference, &[])?;
        }
        Ok(())
    }

    /// One `skopeo copy` of a sample layout with extra flags (`--format v2s2`: a Docker
    /// manifest; `--dest-compress-format zstd`; `--all`: every image of an index).
    pub fn push_image(
        &self,
        ns: &Netns,
        src: &str,
        reference: &str,
        flags: &[&str],
    ) -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/build");
        let from = format!("oci:{}", dir.join(src).display());
        let to = format!("docker://127.0.0.1:5000/{reference}");
        let mut args = vec!["skopeo", "copy", "--quiet", "--dest-tls-verify=false"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[&from, &to]);
        ns.run(&args)?;
        Ok(())
    }

    /// `create deployment kubernetes-bootcamp` with the pushed `bootcamp:v1`, port 8080.
    pub fn create_bootcamp(&self, ns: &Netns, replicas: u32) -> anyhow::Result<()> {
        self.skiff(
            ns,
            &[
                "create",
                "deployment",
                "kubernetes-bootcamp",
                "--image=127.0.0.1:5000/bootcamp:v1",
                "--port=8080",
                &format!("--replicas={replicas}"),
            ],
        )?;
        Ok(())
    }

    /// `set image` of the bootcamp deployment to the pushed `bootcamp:TAG`.
    pub fn set_bootcamp_image(&self, ns: &Netns, tag: &str) -> anyhow::Result<()> {
        self.skiff(
            ns,
            &[
                "set",
                "image",
                "deployments/kubernetes-bootcamp",
                &format!("bootcamp=127.0.0.1:5000/bootcamp:{tag}"),
            ],
        )?;
        Ok(())
    }

    /// `rollout status` of a deployment, which must finish within `timeout`.
    pub fn rolled_out(
        &self,
        ns: &Netns,
        deployment: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.skiff(
            ns,
            &[
                "rollout",
                "status",
                &format!("deployment/{deployment}"),
                "--timeout",
                &timeout.as_secs().to_string(),
            ],
        )?;
        Ok(())
    }

    /// (name, podIP) of the live pods matching `selector` (not those being deleted).
    pub fn pod_ips(&self, ns: &Netns, selector: &str) -> anyhow::Result<Vec<(String, String)>> {
        let v = self.json(ns, &["get", "pods", "-l", selector])?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
            .filter_map(|p| {
                Some((
                    p["metadata"]["name"].as_str()?.to_string(),
                    p["status"]["podIP"].as_str()?.to_string(),
                ))
            })
            .collect())
    }

    /// The node's OCI containers as runc lists them: (ID, init PID).
    pub fn containers(
        &self,
        ns: &Netns,
    ) -> anyhow::Result<std::collections::BTreeSet<(String, i64)>> {
        let root = self.dir.join("agent/oci/runc");
        let out = ns.run(&[
            "runc",
            "--root",
            root.to_str().unwrap(),
            "list",
            "--format",
            "json",
        ])?;
        let list: Option<Vec<serde_json::Value>> = serde_json::from_str(&out)?;
        Ok(list
            .unwrap_or_default()
            .iter()
            .filter_map(|c| Some((c["id"].as_str()?.to_string(), c["pid"].as_i64()?)))
            .collect())
    }

    /// A JSON field of an object, via `get -o json`.
    pub fn json(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.skiff(ns, &a)?)?)
    }
}

/// `skiff server` and one `skiff agent` (node `edge-1`, heartbeats every 2 s) as separate
/// processes in a namespace: the server's files under `DIR/server`, the agent's under
/// `DIR/agent`, their logs `DIR/server.log` and `DIR/agent.log`. The arguments are kept so a
/// test can stop either and start it again as it was.
pub struct ServerAndAgent {
    pub server_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// Indexes of the processes in the namespace (for [`Netns::kill`]).
    pub server: usize,
    pub agent: usize,
    /// The server as a cluster the skiff CLI drives (its log: the agent's).
    pub up: SkiffUp,
}

impl ServerAndAgent {
    pub async fn start(ns: &mut Netns, dir: &Path) -> anyhow::Result<ServerAndAgent> {
        let bin = skiff_binary()?.to_string_lossy().into_owned();
        let server_dir = dir.join("server");
        let agent_dir = dir.join("agent");
        let server_args: Vec<String> = [
            &bin,
            "server",
            "--data-dir",
            &server_dir.to_string_lossy(),
            "--api-addr",
            "127.0.0.1:6443",
        ]
        .map(String::from)
        .into();
        let server = ns.spawn(&Self::args(&server_args), &dir.join("server.log"))?;
        eventually("the server's token", Duration::from_secs(20), || async {
            Ok(std::fs::read_to_string(server_dir.join("token")).ok())
        })
        .await?;
        let token = std::fs::read_to_string(server_dir.join("token"))?;
        let agent_args: Vec<String> = [
            &bin,
            "agent",
            "--server",
            "https://127.0.0.1:6443",
            "--token",
            token.trim(),
            "--ca-cert",
            &server_dir.join("ca.crt").to_string_lossy(),
            "--data-dir",
            &agent_dir.to_string_lossy(),
            "--name",
            "edge-1",
            "--heartbeat-seconds",
            "2",
        ]
        .map(String::from)
        .into();
        ns.reset_on_drop(&agent_dir);
        let log = dir.join("agent.log");
        let agent = ns.spawn(&Self::args(&agent_args), &log)?;
        let up = SkiffUp {
            dir: server_dir,
            index: server,
            log,
        };
        Ok(ServerAndAgent {
            server_args,
            agent_args,
            server,
            agent,
            up,
        })
    }

    /// Kept arguments in the form [`Netns::spawn`] takes.
    pub fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
}
