//! Disk use of the embedded store under churn: many small updates next to large objects that
//! are rewritten and then deleted, measured against the live data, also after a restart.
//!
//! `store_disk_bound` runs a short version and asserts the bound; the ignored
//! `store_disk_report` runs the full one and prints the figures:
//!
//! ```text
//! STORE_UPDATES=100000 cargo test --release -p skiff-control --test store_disk -- --ignored --nocapture
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skiff_control::store::{DynStore, Op, Store};

fn open(dir: &Path) -> DynStore {
    Arc::new(skiff_control::store::sqlite::SqliteStore::open(dir).unwrap())
}

/// Bytes the files under `dir` take on disk (allocated blocks, as `du` counts them).
fn disk_use(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Bytes of every object the store holds, as JSON.
fn live_data(store: &dyn Store) -> u64 {
    let (items, _) = store.list("/").unwrap();
    items
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap().len() as u64)
        .sum()
}

const MB: f64 = 1024.0 * 1024.0;
/// The bound: twice the live data plus 64 MiB.
fn bound(live: u64) -> u64 {
    2 * live + (64 << 20)
}

fn small(i: usize, n: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("small-{i}"), "namespace": "default",
                     "labels": {"app": "churn"}},
        "data": {"counter": n.to_string(), "status": "x".repeat(300)},
    })
}

fn large(i: usize, n: usize) -> Value {
    // ~950 KB each, different every time so nothing can be shared between versions.
    let fill: String = (0..950_000)
        .map(|k| (b'a' + ((k * 7 + n * 13 + i) % 26) as u8) as char)
        .collect();
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("large-{i}"), "namespace": "default"},
        "data": {"blob": fill},
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Report {
    live: u64,
    after_churn: u64,
    after_delete: u64,
    after_restart: u64,
    live_after_delete: u64,
}

/// Creates `SMALL` small objects and four large ones (3.8 MB), runs `updates` small updates
/// from `writers` threads while the large objects are rewritten every `updates / 20`, deletes
/// the large objects, and reopens the store.
fn churn(dir: &Path, updates: usize, writers: usize) -> Report {
    const SMALL: usize = 1000;
    const LARGE: usize = 4;
    let store = open(dir);
    let empty = disk_use(dir);
    for i in 0..SMALL {
        store
            .txn(vec![Op::Create {
                key: format!("/registry/configmaps/default/small-{i}"),
                value: small(i, 0),
            }])
            .unwrap();
    }
    for i in 0..LARGE {
        store
            .txn(vec![Op::Create {
                key: format!("/registry/configmaps/default/large-{i}"),
                value: large(i, 0),
            }])
            .unwrap();
    }
    let start_live = live_data(&*store);
    println!(
        "start: live {:.1} MiB, disk {:.1} MiB (empty store {:.1} MiB)",
        start_live as f64 / MB,
        disk_use(dir) as f64 / MB,
        empty as f64 / MB
    );
    let t0 = Instant::now();
    let per_writer = updates / writers;
    let large_every = (updates / 20).max(1);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut txn = Vec::with_capacity(per_writer);
                let mut get = Vec::with_capacity(per_writer);
                for n in 0..per_writer {
                    let i = (w + n * writers) % SMALL;
                    let key = format!("/registry/configmaps/default/small-{i}");
                    let t = Instant::now();
                    store
                        .txn(vec![Op::Update {
                            key: key.clone(),
                            value: small(i, n + 1),
                            expect: None,
                        }])
                        .unwrap();
                    txn.push(t.elapsed());
                    let t = Instant::now();
                    assert!(store.get(&key).unwrap().is_some());
                    get.push(t.elapsed());
                    let global = n * writers + w;
                    if global.is_multiple_of(large_every) {
                        let l = (global / large_every) % LARGE;
                        store
                            .txn(vec![Op::Update {
                                key: format!("/registry/configmaps/default/large-{l}"),
                                value: large(l, global + 1),
                                expect: None,
                            }])
                            .unwrap();
                    }
                }
                (txn, get)
            })
        })
        .collect();
    let (mut txn, mut get) = (Vec::new(), Vec::new());
    for t in threads {
        let (a, b) = t.join().unwrap();
        txn.extend(a);
        get.extend(b);
    }
    let took = t0.elapsed();
    txn.sort();
    get.sort();
    let live = live_data(&*store);
    let after_churn = disk_use(dir);
    println!(
        "{} updates from {writers} writers in {:.1}s ({:.0}/s): txn p50 {:?} p99 {:?}, get p50 {:?} p99 {:?}",
        txn.len(),
        took.as_secs_f64(),
        txn.len() as f64 / took.as_secs_f64(),
        percentile(&txn, 0.5),
        percentile(&txn, 0.99),
        percentile(&get, 0.5),
        percentile(&get, 0.99),
    );
    println!(
        "after churn: live {:.1} MiB, disk {:.1} MiB (bound {:.1} MiB)",
        live as f64 / MB,
        after_churn as f64 / MB,
        bound(live) as f64 / MB
    );
    for i in 0..LARGE {
        store
            .txn(vec![Op::Delete {
                key: format!("/registry/configmaps/default/large-{i}"),
                expect: None,
            }])
            .unwrap();
    }
    let live_after_delete = live_data(&*store);
    let after_delete = disk_use(dir);
    println!(
        "large objects deleted: live {:.1} MiB, disk {:.1} MiB",
        live_after_delete as f64 / MB,
        after_delete as f64 / MB
    );
    drop(store);
    let t = Instant::now();
    let store = open(dir);
    let reopen = t.elapsed();
    assert_eq!(live_data(&*store), live_after_delete);
    let after_restart = disk_use(dir);
    println!(
        "restarted in {reopen:?}: disk {:.1} MiB",
        after_restart as f64 / MB
    );
    Report {
        live,
        after_churn,
        after_delete,
        after_restart,
        live_after_delete,
    }
}

fn assert_bounded(r: &Report) {
    assert!(
        r.after_churn <= bound(r.live),
        "after churn: {} bytes on disk for {} live",
        r.after_churn,
        r.live
    );
    for (what, used) in [
        ("after deleting the large objects", r.after_delete),
        ("after a restart", r.after_restart),
    ] {
        assert!(
            used <= bound(r.live_after_delete),
            "{what}: {used} bytes on disk for {} live",
            r.live_after_delete
        );
    }
}

/// A short churn stays within twice the live data plus 64 MiB, after deletes and a restart.
#[test]
fn store_disk_bound() {
    let dir = tempfile::tempdir().unwrap();
    let r = churn(dir.path(), 5_000, 8);
    assert_bounded(&r);
}

/// The full measurement (`STORE_UPDATES`, default 100,000; `STORE_WRITERS`, default 16;
/// `STORE_DIR` to keep the store somewhere else than a temporary directory).
#[test]
#[ignore]
fn store_disk_report() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var("STORE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().join("store"));
    let r = churn(
        &dir,
        env("STORE_UPDATES", 100_000),
        env("STORE_WRITERS", 16),
    );
    assert_bounded(&r);
}

/// sled, the earlier back end, under the same churn with its own settings
/// (`SLED_WRITERS` concurrent writers, each applying a batch and flushing as the sled store did;
/// `SLED_SEGMENT` bytes per segment; `SLED_EXPORT=1` to export and import into a new directory
/// at the end, as a compaction on start would):
/// how far its own knobs hold its disk use.
#[test]
#[ignore]
fn sled_settings_report() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let updates = env("STORE_UPDATES").unwrap_or(20_000) as usize;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sled");
    let mut config = sled::Config::new().path(&dir).cache_capacity(8 << 20);
    if let Some(s) = env("SLED_SEGMENT") {
        config = config.segment_size(s as usize);
    }
    let db = config.open().unwrap();
    let tree = db.open_tree("registry").unwrap();
    let key = |i: usize| format!("/registry/configmaps/default/small-{i}");
    for i in 0..1000 {
        tree.insert(key(i), serde_json::to_vec(&small(i, 0)).unwrap())
            .unwrap();
    }
    for i in 0..4 {
        tree.insert(
            format!("/registry/configmaps/default/large-{i}"),
            serde_json::to_vec(&large(i, 0)).unwrap(),
        )
        .unwrap();
    }
    db.flush().unwrap();
    let t0 = Instant::now();
    // As the sled store wrote: each writer applied a batch (its object and the revision) and
    // flushed; `SLED_WRITERS` of them at once.
    let writers = env("SLED_WRITERS").unwrap_or(1) as usize;
    let large_every = (updates / 20).max(1);
    std::thread::scope(|scope| {
        for w in 0..writers {
            let (db, tree) = (&db, &tree);
            scope.spawn(move || {
                for n in (w..updates).step_by(writers) {
                    let mut batch = sled::Batch::default();
                    batch.insert(
                        key(n % 1000).as_bytes(),
                        serde_json::to_vec(&small(n % 1000, n + 1)).unwrap(),
                    );
                    if n.is_multiple_of(large_every) {
                        let l = (n / large_every) % 4;
                        batch.insert(
                            format!("/registry/configmaps/default/large-{l}").as_bytes(),
                            serde_json::to_vec(&large(l, n + 1)).unwrap(),
                        );
                    }
                    batch.insert(&b"\0revision"[..], &(n as u64).to_be_bytes());
                    tree.apply_batch(batch).unwrap();
                    db.flush().unwrap();
                }
            });
        }
    });
    db.flush().unwrap();
    let live: u64 = tree.iter().map(|kv| kv.unwrap().1.len() as u64).sum();
    println!(
        "sled {updates} updates in {:.1}s: live {:.1} MiB, disk {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        live as f64 / MB,
        disk_use(&dir) as f64 / MB
    );
    for i in 0..4 {
        tree.remove(format!("/registry/configmaps/default/large-{i}"))
            .unwrap();
    }
    db.flush().unwrap();
    println!("large deleted: disk {:.1} MiB", disk_use(&dir) as f64 / MB);
    if env("SLED_EXPORT") == Some(1) {
        let export = db.export();
        let fresh = sled::Config::new()
            .path(tmp.path().join("fresh"))
            .open()
            .unwrap();
        fresh.import(export);
        fresh.flush().unwrap();
        println!(
            "exported into a new directory: disk {:.1} MiB",
            disk_use(&tmp.path().join("fresh")) as f64 / MB
        );
    }
    drop(tree);
    drop(db);
    let mut config = sled::Config::new().path(&dir);
    if let Some(s) = env("SLED_SEGMENT") {
        config = config.segment_size(s as usize);
    }
    drop(config.open().unwrap());
    println!("restarted: disk {:.1} MiB", disk_use(&dir) as f64 / MB);
}
