//! Several nodes, each a `skiff agent` in a network namespace of its own on one LAN bridge,
//! and `skiff server` beside the registry on the LAN (`skiff_e2e::cluster`): the pod network
//! across nodes. Pods answer at their pod IPs from every node, NodePorts and ClusterIPs on
//! any node reach pods on every node, cluster DNS answers on every node, a service mixing wasm
//! and OCI pods on different nodes answers from both, a pod reaching a pod on another node
//! keeps its source address; the same over VXLAN; a deleted node's routes go from the others.
//! Needs root, iproute2, iptables, runc, the CNI plugins, docker-registry, skopeo, curl, dig
//! and the samples (`samples/build.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use skiff_e2e::cluster::{Cluster, ClusterOptions};
use skiff_e2e::eventually;

const ROLLOUT: Duration = Duration::from_secs(120);

/// `Running on: POD` of a bootcamp answer.
fn answered_by(body: &str) -> Option<String> {
    let rest = body.split("Running on: ").nth(1)?;
    Some(rest.split(" |").next()?.trim().to_string())
}

/// A deployment of `replicas` bootcamp pods (`image` from the cluster's registry), label
/// `app=NAME` (and `tier=TIER`), optionally pinned to one node.
fn deployment(
    c: &Cluster,
    name: &str,
    image: &str,
    replicas: u32,
    node: Option<&str>,
    tier: Option<&str>,
) -> String {
    let pin = node
        .map(|n| format!("      nodeSelector: {{kubernetes.io/hostname: {n}}}\n"))
        .unwrap_or_default();
    let tier = tier.map(|t| format!(", tier: {t}")).unwrap_or_default();
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}{tier}}}}}\n    spec:\n{pin}      containers:\n      - {{name: app, image: {}/{image}, ports: [{{containerPort: 8080}}]}}\n",
        c.registry()
    )
}

/// Pods of `selector` by node; every node must have some.
fn spread(c: &Cluster, selector: &str) -> anyhow::Result<BTreeMap<String, Vec<(String, String)>>> {
    let mut by_node: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (pod, ip, node) in c.pods(selector)? {
        by_node.entry(node).or_default().push((pod, ip));
    }
    for n in &c.nodes {
        anyhow::ensure!(
            by_node.get(&n.name).is_some_and(|p| !p.is_empty()),
            "node {} runs no pod of {selector}: {by_node:?}",
            n.name
        );
    }
    Ok(by_node)
}

/// Every pod answers at its pod IP from every node's namespace.
async fn every_pod_answers_from_every_node(
    c: &Cluster,
    by_node: &BTreeMap<String, Vec<(String, String)>>,
) -> anyhow::Result<()> {
    for (i, n) in c.nodes.iter().enumerate() {
        for (pod, ip) in by_node.values().flatten() {
            let url = format!("http://{ip}:8080/");
            let body = eventually(
                &format!("{pod} at {ip} from {}", n.name),
                Duration::from_secs(20),
                || async { Ok(c.curl(i, &url).ok()) },
            )
            .await?;
            assert_eq!(
                answered_by(&body).as_deref(),
                Some(pod.as_str()),
                "{url} from {}: {body}",
                n.name
            );
        }
    }
    Ok(())
}

/// The pods answering `url` from node `i`, over `tries` requests.
fn answering(c: &Cluster, i: usize, url: &str, tries: usize) -> BTreeSet<String> {
    (0..tries)
        .filter_map(|_| c.curl(i, url).ok())
        .filter_map(|b| answered_by(&b))
        .collect()
}

/// A NodePort on node `i` is answered by pods on every node (it balances over all).
async fn node_port_reaches_every_node(
    c: &Cluster,
    i: usize,
    port: u16,
    by_node: &BTreeMap<String, Vec<(String, String)>>,
) -> anyhow::Result<BTreeSet<String>> {
    let url = format!("http://{}:{port}/", c.nodes[i].ip);
    let pod_node: BTreeMap<&str, &str> = by_node
        .iter()
        .flat_map(|(n, pods)| pods.iter().map(move |(p, _)| (p.as_str(), n.as_str())))
        .collect();
    eventually(
        &format!("{url} answered by pods on every node"),
        Duration::from_secs(30),
        || async {
            let seen = answering(c, i, &url, 24);
            let nodes: BTreeSet<&str> = seen
                .iter()
                .filter_map(|p| pod_node.get(p.as_str()).copied())
                .collect();
            Ok((nodes.len() == c.nodes.len()).then_some(seen))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_pod_network_with_services_and_dns() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Cluster::start(dir.path(), ClusterOptions::default()).await?;
    c.push_samples(&[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    c.push_images(&[("bootcamp-oci:v2", "bootcamp-oci:v2")])?;

    // Six wasm replicas spread over the three nodes.
    c.apply(
        "hello.yaml",
        &deployment(&c, "hello", "bootcamp:v1", 6, None, None),
    )?;
    c.up.rolled_out(&c.lan, "hello", ROLLOUT)?;
    let by_node = spread(&c, "app=hello")?;
    every_pod_answers_from_every_node(&c, &by_node).await?;

    // A NodePort on node-1 is answered by pods on node-2 and node-3 too.
    c.skiff(&[
        "expose",
        "deployment/hello",
        "--type=NodePort",
        "--port=80",
        "--target-port=8080",
    ])?;
    let svc = c.json(&["get", "svc", "hello"])?;
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap() as u16;
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let seen = node_port_reaches_every_node(&c, 0, node_port, &by_node).await?;
    eprintln!("NodePort {node_port} on node-1 answered by {seen:?}");
    // And from outside the nodes (the LAN), on another node's address.
    let url = format!("http://{}:{node_port}/", c.nodes[2].ip);
    let body = c.lan.run(&["curl", "-sf", "--max-time", "5", &url])?;
    assert!(answered_by(&body).is_some(), "{url} from the LAN: {body}");

    // The ClusterIP and the service's DNS name work from every node.
    let dns = c.json(&["get", "svc", "kube-dns", "-n", "kube-system"])?;
    let dns_ip = dns["spec"]["clusterIP"].as_str().unwrap().to_string();
    for (i, n) in c.nodes.iter().enumerate() {
        let url = format!("http://{cluster_ip}/");
        let seen = eventually(
            &format!(
                "ClusterIP {cluster_ip} from {} reaching two nodes' pods",
                n.name
            ),
            Duration::from_secs(20),
            || async {
                let seen = answering(&c, i, &url, 12);
                let nodes: BTreeSet<&String> = by_node
                    .iter()
                    .filter(|(_, pods)| pods.iter().any(|(p, _)| seen.contains(p)))
                    .map(|(n, _)| n)
                    .collect();
                Ok((nodes.len() >= 2).then_some(seen))
            },
        )
        .await?;
        assert!(!seen.is_empty());
        let answer = eventually(
            &format!(
                "hello.default.svc.cluster.local from {} via {dns_ip}",
                n.name
            ),
            Duration::from_secs(20),
            || async {
                let out = c.on_node(
                    i,
                    &[
                        "dig",
                        "+short",
                        "+time=2",
                        "+tries=1",
                        &format!("@{dns_ip}"),
                        "hello.default.svc.cluster.local",
                    ],
                )?;
                let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok((!s.is_empty()).then_some(s))
            },
        )
        .await?;
        assert_eq!(answer, cluster_ip, "DNS on {}", n.name);
    }

    // One service over wasm pods on node-1 and OCI pods on node-3, asked on node-2.
    let (n1, n3) = (c.nodes[0].name.clone(), c.nodes[2].name.clone());
    c.apply(
        "mixed-wasm.yaml",
        &deployment(&c, "mixed-wasm", "bootcamp:v1", 1, Some(&n1), Some("mixed")),
    )?;
    c.apply(
        "mixed-oci.yaml",
        &deployment(
            &c,
            "mixed-oci",
            "bootcamp-oci:v2",
            1,
            Some(&n3),
            Some("mixed"),
        ),
    )?;
    c.apply(
        "mixed-svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: mixed}\nspec:\n  type: NodePort\n  selector: {tier: mixed}\n  ports: [{port: 80, targetPort: 8080}]\n",
    )?;
    c.up.rolled_out(&c.lan, "mixed-wasm", ROLLOUT)?;
    c.up.rolled_out(&c.lan, "mixed-oci", ROLLOUT)?;
    let mixed = c.json(&["get", "svc", "mixed"])?;
    let mixed_port = mixed["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let url = format!("http://{}:{mixed_port}/", c.nodes[1].ip);
    eventually(
        &format!("{url} on node-2 answered by the wasm pod (v=1) and the OCI pod (v=2)"),
        Duration::from_secs(30),
        || async {
            let bodies: BTreeSet<String> = (0..16).filter_map(|_| c.curl(1, &url).ok()).collect();
            let v1 = bodies.iter().any(|b| b.ends_with("v=1\n"));
            let v2 = bodies.iter().any(|b| b.ends_with("v=2\n"));
            Ok((v1 && v2).then_some(()))
        },
    )
    .await?;

    // Pod to pod across nodes keeps the source address: an OCI pod on node-1 reports the
    // client address it sees (busybox httpd's CGI REMOTE_ADDR); the OCI pod on node-3 asks.
    c.apply(
        "addr.yaml",
        &format!(
            r##"apiVersion: v1
kind: Pod
metadata: {{name: addr}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {n1}}}
  containers:
  - name: httpd
    image: {}/bootcamp-oci:v2
    command: [/bin/sh, -c, 'mkdir -p /tmp/www/cgi-bin && printf "#!/bin/sh\necho Content-Type: text/plain\necho\necho \$REMOTE_ADDR\n" > /tmp/www/cgi-bin/addr && busybox chmod +x /tmp/www/cgi-bin/addr && exec busybox httpd -f -p 8081 -h /tmp/www']
    ports: [{{containerPort: 8081}}]
"##,
            c.registry()
        ),
    )?;
    let addr_ip = eventually("pod addr Running with an IP", ROLLOUT, || async {
        let p = c.json(&["get", "pod", "addr"])?;
        Ok((p["status"]["phase"] == "Running")
            .then(|| p["status"]["podIP"].as_str().map(str::to_string))
            .flatten())
    })
    .await?;
    let (client, client_ip, client_node) = c
        .pods("app=mixed-oci")?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no mixed-oci pod"))?;
    assert_eq!(client_node, n3);
    let url = format!("http://{addr_ip}:8081/cgi-bin/addr");
    let seen = eventually(
        &format!("{client} on {n3} fetching {url} on {n1}"),
        Duration::from_secs(30),
        || async {
            let out = c.skiff_output(&["exec", &client, "--", "wget", "-qO-", &url])?;
            // busybox httpd writes an IPv4 client as `[::ffff:A.B.C.D]`.
            let s = String::from_utf8_lossy(&out.stdout)
                .trim()
                .trim_start_matches("[::ffff:")
                .trim_end_matches(']')
                .to_string();
            Ok((out.status.success() && !s.is_empty()).then_some(s))
        },
    )
    .await?;
    assert_eq!(
        seen, client_ip,
        "the server saw the client pod's own address, not its node's"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_carries_pod_traffic_and_node_ports_across_nodes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(
        dir.path(),
        ClusterOptions {
            agent_flags: vec!["--pod-network".into(), "vxlan".into()],
            ..Default::default()
        },
    )
    .await?;
    // Each node publishes its VTEP, and routes the others' pod CIDRs through the overlay.
    for n in &c.nodes {
        let data = eventually(
            &format!("{}'s VTEP on its Node", n.name),
            Duration::from_secs(20),
            || async {
                let node = c.json(&["get", "node", &n.name])?;
                let a = &node["metadata"]["annotations"];
                Ok((a["skiff.dev/backend-type"] == "vxlan")
                    .then(|| a["skiff.dev/backend-data"].as_str().map(str::to_string))
                    .flatten())
            },
        )
        .await?;
        assert!(data.contains("\"VtepMAC\":\""), "{}: {data}", n.name);
    }
    for (i, n) in c.nodes.iter().enumerate() {
        let routes = eventually(
            &format!("{}'s routes to two pod CIDRs over skiff.vxlan", n.name),
            Duration::from_secs(20),
            || async {
                let r = c.pod_routes(i)?;
                Ok((r.iter().filter(|l| l.contains("dev skiff.vxlan")).count() == 2).then_some(r))
            },
        )
        .await?;
        eprintln!("{}: {routes:?}", n.name);
    }
    c.push_samples(&[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    c.apply(
        "hello.yaml",
        &deployment(&c, "hello", "bootcamp:v1", 6, None, None),
    )?;
    c.up.rolled_out(&c.lan, "hello", ROLLOUT)?;
    let by_node = spread(&c, "app=hello")?;
    every_pod_answers_from_every_node(&c, &by_node).await?;
    c.skiff(&[
        "expose",
        "deployment/hello",
        "--type=NodePort",
        "--port=80",
        "--target-port=8080",
    ])?;
    let svc = c.json(&["get", "svc", "hello"])?;
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap() as u16;
    let seen = node_port_reaches_every_node(&c, 1, node_port, &by_node).await?;
    eprintln!("NodePort {node_port} on node-2 answered by {seen:?}");

    // An agent restarted keeps its VTEP (the MAC the others know) and the overlay keeps working.
    let mac = |c: &Cluster| -> anyhow::Result<String> {
        Ok(
            c.json(&["get", "node", "node-2"])?["metadata"]["annotations"]
                ["skiff.dev/backend-data"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    };
    let before = mac(&c)?;
    c.kill_agent(1)?;
    c.start_agent(1)?;
    // The restarted agent has published its backend again (it logs so once done).
    eventually(
        "node-2's restarted agent to publish its VTEP",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(&c.nodes[1].log)?;
            Ok((log.matches("pod network routes follow the nodes").count() == 2).then_some(()))
        },
    )
    .await?;
    assert_eq!(mac(&c)?, before, "the VTEP survives an agent restart");
    every_pod_answers_from_every_node(&c, &by_node).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_loses_its_routes_on_the_others() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(dir.path(), ClusterOptions::default()).await?;
    let cidr_of = |name: &str| -> anyhow::Result<String> {
        Ok(c.json(&["get", "node", name])?["spec"]["podCIDR"]
            .as_str()
            .unwrap_or("")
            .to_string())
    };
    let gone = cidr_of("node-3")?;
    let via = c.nodes[2].ip.clone();
    for i in 0..2 {
        eventually(
            &format!("node-{}'s route to {gone} via {via}", i + 1),
            Duration::from_secs(20),
            || async {
                let r = c.pod_routes(i)?;
                Ok(r.iter()
                    .any(|l| l.starts_with(&format!("{gone} via {via} ")))
                    .then_some(()))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {:?}\n{}", c.pod_routes(i), c.agent_logs(30)))?;
    }
    // A route of someone else's for the same kind of destination stays.
    c.on_node(0, &["ip", "route", "add", "10.99.0.0/24", "via", &via])?;
    c.kill_agent(2)?;
    c.skiff(&["delete", "node", "node-3"])?;
    for i in 0..2 {
        eventually(
            &format!("node-{} to drop its route to {gone}", i + 1),
            Duration::from_secs(20),
            || async {
                let r = c.pod_routes(i)?;
                Ok((!r.iter().any(|l| l.starts_with(&gone)) && r.len() == 1).then_some(()))
            },
        )
        .await?;
    }
    let all = String::from_utf8_lossy(&c.on_node(0, &["ip", "route"])?.stdout).to_string();
    assert!(
        all.contains("10.99.0.0/24"),
        "a foreign route is kept: {all}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_is_reached_again_when_its_link_comes_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Cluster::start(
        dir.path(),
        ClusterOptions {
            nodes: 2,
            ..Default::default()
        },
    )
    .await?;
    c.push_samples(&[("bootcamp-v1.wasm", "bootcamp:v1")])?;
    let n2 = c.nodes[1].name.clone();
    c.apply(
        "far.yaml",
        &deployment(&c, "far", "bootcamp:v1", 1, Some(&n2), None),
    )?;
    c.up.rolled_out(&c.lan, "far", ROLLOUT)?;
    let (pod, ip, _) = c.pods("app=far")?.remove(0);
    let url = format!("http://{ip}:8080/");
    let reached = |want: bool| {
        let (c, url) = (&c, url.clone());
        async move {
            eventually(
                &format!(
                    "{url} from node-1 to be {}",
                    if want { "reachable" } else { "cut off" }
                ),
                Duration::from_secs(20),
                || async {
                    let ok = c
                        .on_node(0, &["curl", "-sf", "--max-time", "1", &url])?
                        .status
                        .success();
                    Ok((ok == want).then_some(()))
                },
            )
            .await
        }
    };
    reached(true).await?;
    c.set_link(1, false)?;
    reached(false).await?;
    c.set_link(1, true)?;
    reached(true).await?;
    assert_eq!(
        answered_by(&c.curl(0, &url)?).as_deref(),
        Some(pod.as_str())
    );
    Ok(())
}
