//! Services end to end on `skiff up` with real parts (docker-registry, the skiff binary with
//! its proxy, wasmtime, curl, dig), inside a network namespace of the test's own: NodePort,
//! ClusterIP and LoadBalancer answer and spread over the pods, cluster DNS resolves service
//! names, a service's EndpointSlice lists its pods, a service without endpoints refuses at once, and rolling updates, rollbacks and
//! scale-downs under steady load lose no request.
//! Needs root, iproute2, curl, dig, docker-registry and the samples (`samples/build.sh`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use skiff_e2e::eventually;
use skiff_e2e::load::Load;
use skiff_e2e::netns::{Netns, SkiffUp};

/// How long a rollout of the bootcamp deployment may take.
const ROLLOUT: Duration = Duration::from_secs(90);

async fn cluster(ns: &mut Netns, dir: &std::path::Path) -> anyhow::Result<SkiffUp> {
    ns.start_registry(dir).await?;
    let up = SkiffUp::start(ns, dir, &[]).await?;
    up.push_samples(
        ns,
        &[
            ("bootcamp-v1.wasm", "bootcamp:v1"),
            ("bootcamp-v2.wasm", "bootcamp:v2"),
            ("fetch.wasm", "fetch:v1"),
        ],
    )?;
    Ok(up)
}

fn deploy(up: &SkiffUp, ns: &Netns, replicas: u32) -> anyhow::Result<()> {
    up.create_bootcamp(ns, replicas)?;
    up.rolled_out(ns, "kubernetes-bootcamp", ROLLOUT)
}

/// A cluster running the bootcamp deployment with `replicas` pods behind a NodePort service;
/// returns the node port.
async fn exposed(
    ns: &mut Netns,
    dir: &std::path::Path,
    replicas: u32,
) -> anyhow::Result<(SkiffUp, u16)> {
    let up = cluster(ns, dir).await?;
    deploy(&up, ns, replicas)?;
    up.skiff(
        ns,
        &[
            "expose",
            "deployment/kubernetes-bootcamp",
            "--type=NodePort",
            "--port=8080",
        ],
    )?;
    let np = node_port(&up, ns, "kubernetes-bootcamp")?;
    Ok((up, np))
}

/// Eight keep-alive clients hitting `addr` back to back, already answered 100 times.
async fn steady_load(ns: &Netns, addr: &str) -> anyhow::Result<Load> {
    let load = Load::start(&ns.name, addr, 8);
    eventually("load flowing", Duration::from_secs(10), || async {
        Ok((load.report().ok > 100).then_some(()))
    })
    .await?;
    Ok(load)
}

fn node_port(up: &SkiffUp, ns: &Netns, svc: &str) -> anyhow::Result<u16> {
    let v = up.json(ns, &["get", "svc", svc])?;
    v["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .map(|p| p as u16)
        .ok_or_else(|| anyhow::anyhow!("service {svc} has no node port: {v}"))
}

fn curl(ns: &Netns, url: &str) -> anyhow::Result<String> {
    ns.run(&["curl", "-sf", "--max-time", "5", url])
}

/// The pods a service's answers came from, over `n` requests.
fn answering_pods(ns: &Netns, url: &str, n: usize) -> anyhow::Result<BTreeSet<String>> {
    let mut pods = BTreeSet::new();
    for _ in 0..n {
        let body = curl(ns, url)?;
        let pod = body
            .split("Running on: ")
            .nth(1)
            .and_then(|r| r.split(" |").next())
            .ok_or_else(|| anyhow::anyhow!("unexpected answer {body:?}"))?;
        pods.insert(pod.to_string());
    }
    Ok(pods)
}

fn running_pods(up: &SkiffUp, ns: &Netns) -> anyhow::Result<BTreeSet<String>> {
    let v = up.json(ns, &["get", "pods", "-l", "app=kubernetes-bootcamp"])?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
        .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_port_cluster_ip_load_balancer_and_dns() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new()?;
    let (up, np) = exposed(&mut ns, dir.path(), 3).await?;
    let svc = up.json(&ns, &["get", "svc", "kubernetes-bootcamp"])?;
    let cip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();

    // NodePort on the node's address: answers come from every pod, round and round.
    let url = format!("http://127.0.0.1:{np}/");
    let pods = running_pods(&up, &ns)?;
    eventually(
        "the node port answering",
        Duration::from_secs(20),
        || async { Ok(curl(&ns, &url).ok()) },
    )
    .await?;
    assert_eq!(
        answering_pods(&ns, &url, 6)?,
        pods,
        "answers spread over the pods"
    );
    // The ClusterIP answers on the service port.
    assert_eq!(
        answering_pods(&ns, &format!("http://{cip}:8080/"), 6)?,
        pods
    );

    // Not HTTP (TLS to the API server behind `kubernetes`): balanced per connection, bytes
    // copied through.
    let version = ns.run(&[
        "curl",
        "-sk",
        "--max-time",
        "5",
        "https://10.96.0.1/version",
    ])?;
    assert!(version.contains("gitVersion"), "{version}");

    // get / describe show the service like kubectl.
    let table = up.skiff(&ns, &["get", "svc", "kubernetes-bootcamp"])?;
    assert!(table.contains("TYPE") && table.contains("CLUSTER-IP") && table.contains("PORT(S)"));
    assert!(
        table.contains(&format!("8080:{np}/TCP")) && table.contains("NodePort"),
        "{table}"
    );
    let described = up.skiff(&ns, &["describe", "svc", "kubernetes-bootcamp"])?;
    let eps = up.json(&ns, &["get", "endpoints", "kubernetes-bootcamp"])?;
    for a in eps["subsets"][0]["addresses"].as_array().unwrap() {
        let ip = a["ip"].as_str().unwrap();
        assert!(
            described.contains(ip),
            "describe lists endpoint {ip}:\n{described}"
        );
    }

    // The Service's EndpointSlice lists its pods, as `kubectl get endpointslices -l` shows.
    let want: BTreeSet<(String, String)> = up
        .pod_ips(&ns, "app=kubernetes-bootcamp")?
        .into_iter()
        .collect();
    eventually(
        "the service's slice listing its pods",
        Duration::from_secs(10),
        || async {
            let slices = up.json(
                &ns,
                &[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=kubernetes-bootcamp",
                ],
            )?;
            let listed: BTreeSet<(String, String)> = slices["items"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .filter(|e| e["conditions"]["ready"] == true)
                .filter_map(|e| {
                    Some((
                        e["targetRef"]["name"].as_str()?.to_string(),
                        e["addresses"][0].as_str()?.to_string(),
                    ))
                })
                .collect();
            Ok((listed == want).then_some(()))
        },
    )
    .await?;

    // Cluster DNS at the kube-dns address, as a pod's resolver would ask.
    let dns = up.json(&ns, &["get", "svc", "kube-dns", "-n", "kube-system"])?;
    let dns_ip = dns["spec"]["clusterIP"].as_str().unwrap().to_string();
    let dig = |name: &str| {
        ns.run(&[
            "dig",
            "+short",
            "+time=2",
            "+tries=2",
            &format!("@{dns_ip}"),
            name,
            "A",
        ])
    };
    eventually("cluster DNS", Duration::from_secs(20), || async {
        Ok(dig("kubernetes-bootcamp.default.svc.cluster.local")
            .ok()
            .filter(|a| a.trim() == cip))
    })
    .await?;
    let tcp = ns.run(&[
        "dig",
        "+short",
        "+tcp",
        &format!("@{dns_ip}"),
        "kubernetes.default.svc.cluster.local",
    ])?;
    assert_eq!(tcp.trim(), "10.96.0.1", "over TCP too");
    let missing = ns.run(&[
        "dig",
        &format!("@{dns_ip}"),
        "nothing.default.svc.cluster.local",
        "A",
    ])?;
    assert!(missing.contains("NXDOMAIN"), "{missing}");

    // A wasm pod calling the service by its short name: resolved in the pod's namespace.
    let manifest = dir.path().join("fetcher.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: fetcher}\nspec:\n  containers:\n  - name: fetch\n    image: 127.0.0.1:5000/fetch:v1\n    ports: [{containerPort: 8080}]\n    env: [{name: UPSTREAM, value: 'http://kubernetes-bootcamp:8080/'}]\n",
    )?;
    up.skiff(&ns, &["apply", "-f", manifest.to_str().unwrap()])?;
    let fetched = eventually(
        "the fetcher pod answering",
        Duration::from_secs(30),
        || async {
            let p = up.json(&ns, &["get", "pod", "fetcher"])?;
            Ok(match p["status"]["podIP"].as_str() {
                Some(ip) => curl(&ns, &format!("http://{ip}:8080/")).ok(),
                None => None,
            })
        },
    )
    .await?;
    assert!(
        fetched.starts_with("fetched http://kubernetes-bootcamp:8080/ from fetcher: 200 Hello Kubernetes bootcamp! | Running on: kubernetes-bootcamp-"),
        "{fetched}"
    );

    // LoadBalancer: an EXTERNAL-IP (the node's address) that answers on the service port.
    up.skiff(
        &ns,
        &[
            "expose",
            "deployment/kubernetes-bootcamp",
            "--name=bootcamp-lb",
            "--type=LoadBalancer",
            "--port=9090",
            "--target-port=8080",
        ],
    )?;
    eventually(
        "the load balancer's address",
        Duration::from_secs(20),
        || async {
            let t = up.skiff(&ns, &["get", "svc", "bootcamp-lb"])?;
            Ok(t.contains("127.0.0.1").then_some(()))
        },
    )
    .await?;
    eventually(
        "the load balancer answering",
        Duration::from_secs(20),
        || async { Ok(curl(&ns, "http://127.0.0.1:9090/").ok()) },
    )
    .await?;

    // No endpoints: refused at once, not left hanging.
    up.skiff(
        &ns,
        &["create", "service", "nodeport", "nothing", "--tcp=80:8080"],
    )?;
    let nothing = up.json(&ns, &["get", "svc", "nothing"])?;
    let np2 = nothing["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let vip2 = nothing["spec"]["clusterIP"].as_str().unwrap().to_string();
    for url in [
        format!("http://127.0.0.1:{np2}/"),
        format!("http://{vip2}:80/"),
    ] {
        let t = Instant::now();
        let out = ns.output(&["curl", "-s", "--max-time", "5", &url])?;
        assert_eq!(
            out.status.code(),
            Some(7),
            "{url}: connection refused (curl exit 7)"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{url} took {:?}",
            t.elapsed()
        );
    }

    // Node ports out of range or taken are refused by the API, one clear line.
    for (port, why) in [
        ("29999".to_string(), "not in the valid range"),
        (np.to_string(), "already allocated"),
    ] {
        let out = up.skiff_output(
            &ns,
            &[
                "create",
                "service",
                "nodeport",
                "bad",
                "--tcp=80:8080",
                "--node-port",
                &port,
            ],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "node port {port}: {err}"
        );
    }
    // A targetPort no container declares: an Event on the service.
    let badport = dir.path().join("badport.yaml");
    std::fs::write(
        &badport,
        "apiVersion: v1\nkind: Service\nmetadata: {name: badport}\nspec:\n  selector: {app: kubernetes-bootcamp}\n  ports: [{port: 80, targetPort: nope}]\n",
    )?;
    up.skiff(&ns, &["apply", "-f", badport.to_str().unwrap()])?;
    eventually(
        "an event on the service",
        Duration::from_secs(20),
        || async {
            let events = up.json(&ns, &["get", "events"])?;
            Ok(events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| {
                    e["involvedObject"]["kind"] == "Service"
                        && e["involvedObject"]["name"] == "badport"
                        && e["reason"] == "FailedToResolveTargetPort"
                })
                .then_some(()))
        },
    )
    .await?;

    // A service that loses all its pods stops answering: its node port closes.
    up.skiff(
        &ns,
        &["scale", "deployment/kubernetes-bootcamp", "--replicas=0"],
    )?;
    eventually("the node port closing", Duration::from_secs(30), || async {
        Ok(ns
            .output(&["curl", "-s", "--max-time", "2", &url])?
            .status
            .code()
            .filter(|c| *c == 7)
            .map(|_| ()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_lost_during_rollout_rollback_and_scale_down() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new()?;
    let (up, np) = exposed(&mut ns, dir.path(), 4).await?;
    let url = format!("http://127.0.0.1:{np}/");
    eventually(
        "the node port answering",
        Duration::from_secs(20),
        || async { Ok(curl(&ns, &url).ok()) },
    )
    .await?;
    let addr = format!("127.0.0.1:{np}");

    // Rolling update v1 → v2 under steady load.
    let load = steady_load(&ns, &addr).await?;
    up.set_bootcamp_image(&ns, "v2")?;
    up.rolled_out(&ns, "kubernetes-bootcamp", ROLLOUT)?;
    let seen_v2 = load.report().ok;
    eventually("v2 answering", Duration::from_secs(20), || async {
        let r = load.report();
        Ok((r.ok > seen_v2 + 100 && r.answers.keys().any(|a| a.ends_with("v=2\n"))).then_some(()))
    })
    .await?;
    let report = load.finish()?;
    assert_eq!(
        report.failed, 0,
        "failed during the rolling update: {:?}",
        report.errors
    );
    let v1 = report
        .answers
        .keys()
        .filter(|a| a.ends_with("v=1\n"))
        .count();
    let v2 = report
        .answers
        .keys()
        .filter(|a| a.ends_with("v=2\n"))
        .count();
    assert!(
        v1 >= 4 && v2 >= 4,
        "answers from 4 v1 and 4 v2 pods: {:?}",
        report.answers.keys()
    );
    eprintln!("rolling update: {} requests, 0 failed", report.ok);

    // Rollback under load.
    let load = Load::start(&ns.name, &addr, 8);
    up.skiff(&ns, &["rollout", "undo", "deployments/kubernetes-bootcamp"])?;
    up.rolled_out(&ns, "kubernetes-bootcamp", ROLLOUT)?;
    let pods = running_pods(&up, &ns)?;
    eventually("only v1 answering", Duration::from_secs(30), || async {
        Ok((pods.len() == 4
            && answering_pods(&ns, &url, 8)?
                .iter()
                .all(|p| pods.contains(p)))
        .then_some(()))
    })
    .await?;
    let report = load.finish()?;
    assert_eq!(
        report.failed, 0,
        "failed during the rollback: {:?}",
        report.errors
    );

    // Scale 4 → 2 under load.
    let load = steady_load(&ns, &addr).await?;
    up.skiff(
        &ns,
        &["scale", "deployments/kubernetes-bootcamp", "--replicas=2"],
    )?;
    eventually("two pods left", Duration::from_secs(30), || async {
        let v = up.json(&ns, &["get", "pods", "-l", "app=kubernetes-bootcamp"])?;
        Ok((v["items"].as_array().map(Vec::len) == Some(2)).then_some(()))
    })
    .await?;
    let after = load.report().ok;
    eventually(
        "load flowing after the scale-down",
        Duration::from_secs(10),
        || async { Ok((load.report().ok > after + 100).then_some(())) },
    )
    .await?;
    let report = load.finish()?;
    assert_eq!(
        report.failed, 0,
        "failed during the scale-down: {:?}",
        report.errors
    );
    eprintln!("scale-down: {} requests, 0 failed", report.ok);
    Ok(())
}
