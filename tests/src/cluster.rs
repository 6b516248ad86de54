//! A multi-node cluster of network namespaces: a "LAN" namespace holding a bridge (with the
//! server's address on it), and one namespace per node joined to the bridge by a veth pair,
//! each with its own LAN address. `skiff server` and the `docker-registry` run in the LAN
//! namespace on the LAN address; a `skiff agent` runs in each node's namespace with its own
//! data dir, and its own bridge, pod routes and service addresses (they live in its namespace).
//! Everything goes when the cluster is dropped: agents (by PID), their containers
//! (`skiff reset`), the server and registry, the namespaces and with them the veths.
//! Needs root, iproute2, iptables, runc, the CNI plugins, docker-registry, skopeo and curl.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::netns::{Netns, SkiffUp};
use crate::{eventually, skiff_binary};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The API port of the server, on the LAN address.
pub const API_PORT: u16 = 6443;
/// The registry's port, on the LAN address.
pub const REGISTRY_PORT: u16 = 5000;
/// The agents' endpoint port, on each node's LAN address.
pub const AGENT_PORT: u16 = 10250;

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Extra `skiff agent` flags for every node (e.g. `--pod-network vxlan`).
    pub agent_flags: Vec<String>,
    /// Extra `skiff server` flags.
    pub server_flags: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            agent_flags: Vec::new(),
            server_flags: Vec::new(),
        }
    }
}

/// One node: its namespace, LAN address and agent.
pub struct ClusterNode {
    pub name: String,
    /// The node's LAN address (its InternalIP).
    pub ip: String,
    /// The LAN side of its veth (in the LAN namespace): down is a pulled cable.
    pub lan_link: String,
    pub data: PathBuf,
    pub log: PathBuf,
    /// The agent's process in `ns` while it runs.
    pub agent: Option<usize>,
    pub ns: Netns,
}

pub struct Cluster {
    /// The nodes, dropped (agents killed, containers reset, namespaces deleted) before the LAN.
    pub nodes: Vec<ClusterNode>,
    /// The server and registry's namespace, holding the LAN bridge.
    pub lan: Netns,
    /// The LAN's /24, as `192.168.X`.
    pub subnet: String,
    /// The server's LAN address.
    pub server_ip: String,
    pub server_dir: PathBuf,
    /// The server as a cluster the skiff CLI drives (in the LAN namespace).
    pub up: SkiffUp,
    dir: PathBuf,
    options: ClusterOptions,
}

impl Cluster {
    /// A LAN, a registry and a server on it, and `options.nodes` nodes joined and Ready.
    pub async fn start(dir: &Path, options: ClusterOptions) -> anyhow::Result<Cluster> {
        // A /24 of its own per cluster (the namespaces keep them apart anyway; distinct
        // addresses make logs of parallel tests easier to tell apart).
        let k = (std::process::id() + NEXT.fetch_add(1, Ordering::SeqCst)) % 200;
        let subnet = format!("192.168.{}", 20 + k);
        let server_ip = format!("{subnet}.254");
        let mut lan = Netns::new()?;
        // Its MAC set by hand, so it never changes as ports join (a bridge otherwise takes the
        // lowest of its ports', and nodes that cached the old one are cut off until they ask
        // again).
        lan.run(&[
            "ip",
            "link",
            "add",
            "lan0",
            "address",
            "02:00:00:00:00:fe",
            "type",
            "bridge",
        ])?;
        lan.run(&[
            "ip",
            "addr",
            "add",
            &format!("{server_ip}/24"),
            "dev",
            "lan0",
        ])?;
        lan.run(&["ip", "link", "set", "lan0", "up"])?;
        lan.start_registry_at(dir, &format!("{server_ip}:{REGISTRY_PORT}"))
            .await?;
        let bin = skiff_binary()?;
        let server_dir = dir.join("server");
        let mut args: Vec<String> = vec![
            bin.to_string_lossy().into_owned(),
            "server".into(),
            "--data-dir".into(),
            server_dir.to_string_lossy().into_owned(),
            "--api-addr".into(),
            format!("{server_ip}:{API_PORT}"),
        ];
        args.extend(options.server_flags.iter().cloned());
        let log = dir.join("server.log");
        let index = lan.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &log)?;
        eventually(
            "the server's join token",
            Duration::from_secs(20),
            || async { Ok(std::fs::read_to_string(server_dir.join("node-token")).ok()) },
        )
        .await?;
        let up = SkiffUp {
            dir: server_dir.clone(),
            index,
            log,
        };
        let mut cluster = Cluster {
            nodes: Vec::new(),
            lan,
            subnet,
            server_ip,
            server_dir,
            up,
            dir: dir.to_path_buf(),
            options: options.clone(),
        };
        eventually("the API server", Duration::from_secs(20), || async {
            Ok(cluster.skiff(&["get", "namespaces"]).ok().map(|_| ()))
        })
        .await?;
        for n in 1..=options.nodes {
            cluster.add_node(n)?;
        }
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// The flags that join an agent to this cluster: the server's URL and its join token
    /// (`DATA/node-token`) and nothing else, as a user adds a node; the agent checks the
    /// server's CA against the token and gets a credential of its own. The one place they
    /// are made.
    pub fn join_args(&self) -> anyhow::Result<Vec<String>> {
        let token = std::fs::read_to_string(self.server_dir.join("node-token"))?;
        Ok(vec![
            "--server".into(),
            format!("https://{}:{API_PORT}", self.server_ip),
            "--token".into(),
            token.trim().to_string(),
        ])
    }

    /// `host:port` of the registry, as the nodes reach it.
    pub fn registry(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.server_ip)
    }

    /// Makes node `n` (`node-n` at `SUBNET.n`) and starts its agent.
    fn add_node(&mut self, n: usize) -> anyhow::Result<()> {
        let ns = Netns::new()?;
        let name = format!("node-{n}");
        let ip = format!("{}.{n}", self.subnet);
        let lan_link = format!("lan{n}");
        self.lan.run(&[
            "ip", "link", "add", &lan_link, "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ])?;
        self.lan
            .run(&["ip", "link", "set", &lan_link, "master", "lan0", "up"])?;
        ns.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        ns.run(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        let data = self.dir.join(&name);
        let log = self.dir.join(format!("{name}.log"));
        let mut node = ClusterNode {
            name,
            ip,
            lan_link,
            data,
            log,
            agent: None,
            ns,
        };
        node.ns.reset_on_drop(&node.data.clone());
        self.nodes.push(node);
        self.start_agent(self.nodes.len() - 1)
    }

    /// The `skiff agent` command line of node `i`.
    pub fn agent_args(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let node = &self.nodes[i];
        let mut args = vec![
            skiff_binary()?.to_string_lossy().into_owned(),
            "agent".into(),
        ];
        args.extend(self.join_args()?);
        args.extend(
            [
                "--data-dir",
                &node.data.to_string_lossy(),
                "--name",
                &node.name,
                "--node-ip",
                &node.ip,
                "--agent-addr",
                &format!("{}:{AGENT_PORT}", node.ip),
                "--insecure-registry",
                &self.registry(),
                "--heartbeat-seconds",
                "1",
            ]
            .map(String::from),
        );
        args.extend(self.options.agent_flags.iter().cloned());
        Ok(args)
    }

    /// Starts node `i`'s agent (again).
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let args = self.agent_args(i)?;
        let node = &mut self.nodes[i];
        let index = node.ns.spawn_appending(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &node.log,
        )?;
        node.agent = Some(index);
        Ok(())
    }

    /// `kill -9` node `i`'s agent (by its PID). Its containers keep running, as a kubelet's do.
    pub fn kill_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        if let Some(index) = node.agent.take() {
            node.ns.kill(index)?;
        }
        Ok(())
    }

    /// Takes node `i`'s link to the LAN down (`up = false`: a pulled cable) or up again.
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        self.lan.run(&[
            "ip",
            "link",
            "set",
            &self.nodes[i].lan_link,
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }

    /// Waits until every node with a running agent is Ready.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let want: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.agent.is_some())
            .map(|n| n.name.as_str())
            .collect();
        eventually(&format!("nodes {want:?} Ready"), within, || async {
            let v = self.json(&["get", "nodes"])?;
            let ready = |name: &str| {
                v["items"].as_array().into_iter().flatten().any(|n| {
                    n["metadata"]["name"] == name
                        && n["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            };
            Ok(want.iter().all(|n| ready(n)).then_some(()))
        })
        .await
    }

    /// The skiff CLI in the LAN namespace against this cluster; it must succeed.
    pub fn skiff(&self, args: &[&str]) -> anyhow::Result<String> {
        self.up
            .skiff(&self.lan, args)
            .map_err(|e| anyhow::anyhow!("{e}\n{}", self.agent_logs(15)))
    }

    /// The last `lines` of every agent's log, for a failure's message.
    pub fn agent_logs(&self, lines: usize) -> String {
        let tails: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(lines).collect();
                format!(
                    "--- {} agent log (last lines):\n{}",
                    n.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        tails.join("\n")
    }

    pub fn skiff_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.up.skiff_output(&self.lan, args)
    }

    /// `get ... -o json`.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.skiff(&a)?)?)
    }

    /// Writes `manifest` to a file and applies it.
    pub fn apply(&self, name: &str, manifest: &str) -> anyhow::Result<()> {
        let f = self.dir.join(name);
        std::fs::write(&f, manifest)?;
        self.skiff(&["apply", "-f", f.to_str().unwrap()])?;
        Ok(())
    }

    /// Pushes wasm samples built by `samples/build.sh`: `(FILE, REPO:TAG)` → `REGISTRY/REPO:TAG`.
    pub fn push_samples(&self, samples: &[(&str, &str)]) -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/build");
        let registry = self.registry();
        for (file, reference) in samples {
            self.skiff(&[
                "push",
                dir.join(file).to_str().unwrap(),
                &format!("{registry}/{reference}"),
                "--insecure-registry",
                &registry,
            ])?;
        }
        Ok(())
    }

    /// Copies sample OCI layouts to the registry: `(LAYOUT:TAG, REPO:TAG)`.
    pub fn push_images(&self, images: &[(&str, &str)]) -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/build");
        for (src, reference) in images {
            let from = format!("oci:{}", dir.join(src).display());
            let to = format!("docker://{}/{reference}", self.registry());
            self.lan.run(&[
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &from,
                &to,
            ])?;
        }
        Ok(())
    }

    /// (name, podIP, node) of the live pods matching `selector`.
    pub fn pods(&self, selector: &str) -> anyhow::Result<Vec<(String, String, String)>> {
        let v = self.json(&["get", "pods", "-l", selector])?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
            .filter_map(|p| {
                Some((
                    p["metadata"]["name"].as_str()?.to_string(),
                    p["status"]["podIP"].as_str()?.to_string(),
                    p["spec"]["nodeName"].as_str()?.to_string(),
                ))
            })
            .collect())
    }

    /// Runs a command in node `i`'s namespace: its output, whatever the exit status.
    pub fn on_node(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        self.nodes[i].ns.output(args)
    }

    /// `curl -sf URL` from node `i`'s namespace; the body on success.
    pub fn curl(&self, i: usize, url: &str) -> anyhow::Result<String> {
        self.nodes[i]
            .ns
            .run(&["curl", "-sf", "--max-time", "5", url])
    }

    /// The routes node `i`'s agent made (`ip route show proto 83`), one per line.
    pub fn pod_routes(&self, i: usize) -> anyhow::Result<Vec<String>> {
        Ok(self.nodes[i]
            .ns
            .run(&["ip", "-4", "route", "show", "proto", "83"])?
            .lines()
            .map(str::to_string)
            .collect())
    }
}
