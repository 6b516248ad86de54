//! Control-plane benchmarks. Prints figures, each with a baseline measured in the same run:
//!
//! - scheduler throughput, 1,000 nodes × 10,000 pending pods: the filter/score pipeline alone,
//!   and end to end with the binds written to the store (baseline: scoring every node); the
//!   store is the embedded one, or etcd when `SKIFF_BENCH_ETCD` holds its client URLs;
//! - API create/get latency over HTTPS (baseline: the same operation on the store directly);
//! - watch fan-out: 1,000 writes delivered to 100 watchers;
//! - write throughput over HTTPS: creates/s with 1, 8 and 32 concurrent clients, and GET
//!   latency while 8 and 32 writers run (baseline: GET latency with no writer).
//!
//! - controller cache: 10,000 pods listed into a watch-fed cache, then 2,000 pod updates
//!   delivered through its watch (each event decoded once for every cache of the kind).
//!
//! Run with `cargo bench -p skiff-control` (or `scripts/bench.sh` for all figures);
//! `cargo bench -p skiff-control -- NAME...` runs only the named ones
//! (`scheduler`, `api`, `watch`, `throughput`, `cache`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{json, Value};
use skiff_api::Resource;
use skiff_control::controllers::runtime::Cache;
use skiff_control::controllers::scheduler::{self, NodeInfo, PodRequest};
use skiff_control::registry::{ClusterConfig, Registry, WriteOptions};
use skiff_control::server::{Server, ServerConfig};
use skiff_control::store::{sqlite::SqliteStore, DynStore, Op, Store};

fn node(i: usize) -> Value {
    json!({"metadata": {"name": format!("node-{i:04}"), "labels": {"zone": format!("z{}", i % 3)}},
           "status": {"allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn pod(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("p-{i:05}"), "namespace": "default", "resourceVersion": "1",
                        "ownerReferences": [{"uid": format!("rs-{}", i % 100), "controller": true, "kind": "ReplicaSet", "name": "rs"}]},
           "spec": {"containers": [{"name": "c", "image": "x:v1", "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}})
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn scheduler_bench() {
    const NODES: usize = 1000;
    const PODS: usize = 10_000;
    let nodes: Vec<NodeInfo> = (0..NODES)
        .map(|i| NodeInfo::from_node(&serde_json::from_value(node(i)).unwrap()))
        .collect();
    let pods: Vec<PodRequest> = (0..PODS)
        .map(|i| PodRequest::from_pod(&serde_json::from_value(pod(i)).unwrap()))
        .collect();

    // Pipeline alone, sampling feasible nodes as kube-scheduler does on large clusters.
    let mut ns = nodes.clone();
    let mut start = 0;
    let t = Instant::now();
    let placed = scheduler::schedule(&mut ns, &pods, &mut start);
    let sampled = t.elapsed();
    assert!(placed.iter().all(Result::is_ok));

    // Baseline: score every node for every pod.
    let mut ns = nodes.clone();
    let t = Instant::now();
    for p in &pods {
        let best = ns
            .iter()
            .enumerate()
            .filter(|(_, n)| scheduler::filter(n, p).is_none())
            .max_by_key(|(_, n)| scheduler::score(n, p))
            .map(|(i, _)| i);
        if let Some(i) = best {
            ns[i].add(p);
        }
    }
    let exhaustive = t.elapsed();

    // End to end: pods in the store, scheduled and bound in store transactions; on etcd when
    // SKIFF_BENCH_ETCD names its client URLs (comma-separated), else on the embedded store.
    let dir = tempfile::tempdir().unwrap();
    let (store, backend): (DynStore, &str) = match std::env::var("SKIFF_BENCH_ETCD") {
        Ok(urls) if !urls.is_empty() => {
            let mut config = skiff_control::store::etcd::EtcdConfig::new(
                urls.split(',').map(String::from).collect(),
            );
            config.prefix = format!("/bench-{}", std::process::id());
            (
                Arc::new(skiff_control::store::etcd::EtcdStore::connect(&config).unwrap()),
                "etcd",
            )
        }
        _ => (Arc::new(SqliteStore::open(dir.path()).unwrap()), "embedded"),
    };
    let batch = store.max_txn_ops().min(1000);
    let reg = Registry::new(store.clone(), ClusterConfig::default());
    let pods_r = Resource::lookup("pods").unwrap();
    for chunk in (0..PODS).collect::<Vec<_>>().chunks(batch) {
        store
            .txn(
                chunk
                    .iter()
                    .map(|i| Op::Create {
                        key: pods_r.key(Some("default"), &format!("p-{i:05}")),
                        value: pod(*i),
                    })
                    .collect(),
            )
            .unwrap();
    }
    let (stored, _) = store.list(&pods_r.key_prefix()).unwrap();
    let t = Instant::now();
    let mut ns = nodes.clone();
    let mut start = 0;
    // Decoding the stored pods counts: a controller cache does it once per event.
    let reqs: Vec<PodRequest> = stored
        .iter()
        .map(|p| PodRequest::from_pod(&Pod::deserialize(p).unwrap()))
        .collect();
    let placed = scheduler::schedule(&mut ns, &reqs, &mut start);
    let binds: Vec<(Value, String)> = stored
        .into_iter()
        .zip(placed)
        .map(|(p, r)| (p, ns[r.unwrap()].name.clone()))
        .collect();
    for chunk in binds.chunks(batch) {
        reg.bind_all(chunk.to_vec()).unwrap();
    }
    let e2e = t.elapsed();
    let rate = |d: Duration| PODS as f64 / d.as_secs_f64();
    println!("scheduler: {NODES} nodes, {PODS} pending pods");
    println!(
        "  pipeline (sampled scoring):   {:>9.0} pods/s  ({:?})",
        rate(sampled),
        sampled
    );
    println!(
        "  baseline (score every node):  {:>9.0} pods/s  ({:?})  -> sampled is {:.1}x",
        rate(exhaustive),
        exhaustive,
        exhaustive.as_secs_f64() / sampled.as_secs_f64()
    );
    println!(
        "  end to end with store binds ({backend}): {:>9.0} pods/s  ({:?})  target >= 5000 pods/s",
        rate(e2e),
        e2e
    );
}

async fn api_bench() {
    const N: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig::new(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let base = format!(
        "https://{}/api/v1/namespaces/default/configmaps",
        server.addr
    );
    let mut creates = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        let r = http
            .post(&base)
            .bearer_auth(&server.token)
            .json(&json!({"metadata": {"name": format!("cm-{i}")}, "data": {"k": "v"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
        creates.push(t.elapsed());
    }
    let mut gets = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        let r = http
            .get(format!("{base}/cm-{i}"))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
        gets.push(t.elapsed());
    }
    // Baseline: the store alone, same data dir kind.
    let sdir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(sdir.path()).unwrap();
    let mut screates = Vec::with_capacity(N);
    let mut sgets = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        store
            .txn(vec![Op::Create {
                key: format!("/registry/configmaps/default/cm-{i}"),
                value: json!({"metadata": {"name": format!("cm-{i}")}}),
            }])
            .unwrap();
        screates.push(t.elapsed());
    }
    for i in 0..N {
        let t = Instant::now();
        store
            .get(&format!("/registry/configmaps/default/cm-{i}"))
            .unwrap()
            .unwrap();
        sgets.push(t.elapsed());
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("API latency over HTTPS, {N} sequential requests (baseline: the store alone)");
    for (name, api, base) in [("create", creates, screates), ("get", gets, sgets)] {
        let (a50, a99, b50, b99) = (
            percentile(api.clone(), 0.5),
            percentile(api, 0.99),
            percentile(base.clone(), 0.5),
            percentile(base, 0.99),
        );
        println!("  {name:<6} p50 {:>8.0} us  p99 {:>8.0} us   store p50 {:>7.0} us  p99 {:>7.0} us   API/store p50 {:.1}x", us(a50), us(a99), us(b50), us(b99), us(a50) / us(b50).max(0.001));
    }
    server.shutdown().await.unwrap();
}

async fn watch_bench() {
    const WATCHERS: usize = 100;
    const WRITES: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let reg = Registry::new(store.clone(), ClusterConfig::default());
    skiff_control::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
    let cms = Resource::lookup("configmaps").unwrap();
    let from = store.revision();
    let mut tasks = Vec::new();
    for _ in 0..WATCHERS {
        let mut rx = reg
            .watch(
                cms,
                Some("default"),
                from,
                Default::default(),
                Default::default(),
            )
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < WRITES {
                if rx.recv().await.is_none() {
                    break;
                }
                n += 1;
            }
            (n, Instant::now())
        }));
    }
    let t = Instant::now();
    for i in 0..WRITES {
        reg.create(
            cms,
            Some("default"),
            json!({"metadata": {"name": format!("w-{i}")}}),
            &WriteOptions::default(),
        )
        .unwrap();
    }
    let writes_done = t.elapsed();
    let mut last = t;
    for task in tasks {
        let (n, at) = task.await.unwrap();
        assert_eq!(n, WRITES);
        last = last.max(at);
    }
    let all = last - t;
    println!("watch fan-out: {WRITES} writes to {WATCHERS} watchers");
    println!(
        "  writes alone (baseline): {:?} ({:.0} writes/s)",
        writes_done,
        WRITES as f64 / writes_done.as_secs_f64()
    );
    println!(
        "  all {} events delivered: {:?} ({:.0} events/s); delivery adds {:.1}% to the write time",
        WRITES * WATCHERS,
        all,
        (WRITES * WATCHERS) as f64 / all.as_secs_f64(),
        (all.as_secs_f64() / writes_done.as_secs_f64() - 1.0) * 100.0
    );
}

fn new_pod_cache() -> Arc<Cache<Pod>> {
    Cache::<Pod>::new()
}

/// An HTTPS client of an in-process server, and the configmaps URL of its default namespace.
fn client_of(server: &Server) -> (reqwest::Client, String) {
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let base = format!(
        "https://{}/api/v1/namespaces/default/configmaps",
        server.addr
    );
    (http, base)
}

/// `clients` tasks, each creating configmaps one after another until `stop` is set.
/// Returns the tasks; each yields how many creates it had acknowledged.
fn writers(
    server: &Server,
    clients: usize,
    tag: &str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..clients)
        .map(|c| {
            let (http, base) = client_of(server);
            let token = server.token.clone();
            let stop = stop.clone();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http
                        .post(&base)
                        .bearer_auth(&token)
                        .json(&json!({"metadata": {"name": format!("{tag}-{c}-{n}")}, "data": {"k": "v"}}))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success(), "create: {}", r.status());
                    r.bytes().await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect()
}

async fn throughput_bench() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const RUN: Duration = Duration::from_secs(4);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig::new(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    println!("write throughput over HTTPS, in-process server, {RUN:?} per figure");
    for clients in [1, 8, 32] {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = writers(&server, clients, &format!("tp{clients}"), stop.clone());
        let t = Instant::now();
        tokio::time::sleep(RUN).await;
        stop.store(true, Ordering::Relaxed);
        let mut n = 0;
        for task in tasks {
            n += task.await.unwrap();
        }
        let took = t.elapsed();
        println!(
            "  creates, {clients:>2} clients: {:>7.0} creates/s  ({n} in {took:.2?})",
            n as f64 / took.as_secs_f64()
        );
    }
    // GET latency of one object, with no writer (baseline) and while writers run.
    let (http, base) = client_of(&server);
    let one = format!("{base}/tp1-0-0");
    for load in [0, 8, 32] {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = writers(&server, load, &format!("gl{load}"), stop.clone());
        let mut lat = Vec::new();
        let t = Instant::now();
        while t.elapsed() < RUN {
            let g = Instant::now();
            let r = http
                .get(&one)
                .bearer_auth(&server.token)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
            lat.push(g.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        let mut n = 0;
        for task in tasks {
            n += task.await.unwrap();
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let gets = lat.len();
        println!(
            "  GET with {load:>2} writers: p50 {:>7.0} us  p99 {:>7.0} us  ({gets} GETs; writers {:.0} creates/s){}",
            us(percentile(lat.clone(), 0.5)),
            us(percentile(lat, 0.99)),
            n as f64 / t.elapsed().as_secs_f64(),
            if load == 0 { "  <- baseline" } else { "" }
        );
    }
    server.shutdown().await.unwrap();
}

async fn cache_bench() {
    const PODS: usize = 10_000;
    const UPDATES: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let reg = Registry::new(store.clone(), ClusterConfig::default());
    let pods_r = Resource::lookup("pods").unwrap();
    for chunk in (0..PODS).collect::<Vec<_>>().chunks(1000) {
        store
            .txn(
                chunk
                    .iter()
                    .map(|i| Op::Create {
                        key: pods_r.key(Some("default"), &format!("p-{i:05}")),
                        value: pod(*i),
                    })
                    .collect(),
            )
            .unwrap();
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let cache = new_pod_cache();
    let listed_rev = store.revision();
    let t = Instant::now();
    tokio::spawn(cache.clone().run(reg.clone(), stop.clone()));
    // Woken by the cache's revision, not spinning: on a small machine a spinning waiter
    // would hold a core the listing's decoding needs.
    while cache.revision() < listed_rev {
        cache.wait_for(listed_rev).await;
    }
    let listed = t.elapsed();
    assert_eq!(cache.list(None).len(), PODS);
    let t = Instant::now();
    for i in 0..UPDATES {
        let mut p = pod(i);
        p["status"] = json!({"phase": "Running", "podIP": format!("10.0.{}.{}", i / 250, i % 250)});
        store
            .txn(vec![Op::Update {
                key: pods_r.key(Some("default"), &format!("p-{i:05}")),
                value: p,
                expect: None,
            }])
            .unwrap();
    }
    let writes = t.elapsed();
    let last = store.revision();
    while cache.revision() < last {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let delivered = t.elapsed();
    let _ = stop_tx.send(true);
    println!("controller cache of pods");
    println!(
        "  initial list of {PODS} pods:    {:>9.0} pods/s  ({:?})",
        PODS as f64 / listed.as_secs_f64(),
        listed
    );
    println!(
        "  {UPDATES} updates seen by the cache: {:?} (writes alone {:?}; {:.0} events/s)",
        delivered,
        writes,
        UPDATES as f64 / delivered.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes --bench; other arguments name the benchmarks to run (all if none).
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if run("scheduler") {
        scheduler_bench();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if run("api") {
        rt.block_on(api_bench());
    }
    if run("watch") {
        rt.block_on(watch_bench());
    }
    if run("throughput") {
        rt.block_on(throughput_bench());
    }
    if run("cache") {
        rt.block_on(cache_bench());
    }
}
