use super::*;

fn runtime() -> (tempfile::TempDir, Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(dir.path().join("cache"), 16).unwrap();
    (dir, rt)
}

#[tokio::test]
async fn rejects_what_is_not_wasm() {
    let (_d, rt) = runtime();
    assert!(matches!(
        rt.load(&b"#!/bin/sh\necho hi\n"[..]).await,
        Err(WasmError::NotWasm)
    ));
    let no_start = wat::parse_str("(module (func (export \"other\")))").unwrap();
    assert!(matches!(
        rt.load(&no_start[..]).await,
        Err(WasmError::NothingToRun)
    ));
}

#[tokio::test]
async fn core_command_exit_code_and_output() {
    let (d, rt) = runtime();
    let wasm = wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (memory (export "memory") 1)
            (data (i32.const 8) "hello\n")
            (func (export "_start")
              (i32.store (i32.const 0) (i32.const 8))
              (i32.store (i32.const 4) (i32.const 6))
              (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 100)))
              (call $exit (i32.const 3))))"#,
    )
    .unwrap();
    let p = rt.load(&wasm[..]).await.unwrap();
    assert_eq!(p.kind, Kind::Command);
    assert!(!p.cached);
    let out = d.path().join("out.log");
    let cfg = GuestConfig {
        stdout: Some(Arc::new(std::fs::File::create(&out).unwrap())),
        ..Default::default()
    };
    assert_eq!(rt.run_command(&p, &cfg).await.unwrap(), 3);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello\n");
    // Loaded again: from the compile cache, same behaviour.
    let p2 = rt.load(&wasm[..]).await.unwrap();
    assert!(p2.cached);
    assert_eq!(rt.run_command(&p2, &cfg).await.unwrap(), 3);
}

#[tokio::test]
async fn a_trap_is_exit_code_1_with_the_trap_in_stderr() {
    let (d, rt) = runtime();
    let wasm = wat::parse_str(
        "(module (memory (export \"memory\") 1) (func (export \"_start\") unreachable))",
    )
    .unwrap();
    let p = rt.load(&wasm[..]).await.unwrap();
    let err = d.path().join("err.log");
    let cfg = GuestConfig {
        stderr: Some(Arc::new(std::fs::File::create(&err).unwrap())),
        ..Default::default()
    };
    assert_eq!(rt.run_command(&p, &cfg).await.unwrap(), 1);
    assert!(std::fs::read_to_string(&err)
        .unwrap()
        .contains("unreachable"));
}

#[tokio::test]
async fn memory_limit_traps_growth() {
    let (_d, rt) = runtime();
    // Grows memory by 64 MiB; with a 16 MiB limit the grow traps.
    let wasm = wat::parse_str("(module (memory (export \"memory\") 1) (func (export \"_start\") (drop (memory.grow (i32.const 1024)))))").unwrap();
    let p = rt.load(&wasm[..]).await.unwrap();
    let limited = GuestConfig {
        memory_limit: Some(16 << 20),
        ..Default::default()
    };
    assert_eq!(rt.run_command(&p, &limited).await.unwrap(), 1);
    assert_eq!(
        rt.run_command(&p, &GuestConfig::default()).await.unwrap(),
        0
    );
}

/// The samples built by `samples/build.sh` (scripts/test.sh builds them first).
fn sample(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../samples/build")
        .join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run samples/build.sh first", path.display()))
}

async fn get(addr: std::net::SocketAddr) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}/")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn bootcamp_component_answers_with_its_pod_name() {
    let (_d, rt) = runtime();
    let p = rt.load(sample("bootcamp-v1.wasm")).await.unwrap();
    assert_eq!(p.kind, Kind::Http);
    let cfg = GuestConfig {
        env: vec![("HOSTNAME".into(), "bootcamp-abc12".into())],
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = rt.serve_http(&p, cfg, listener).unwrap();
    let (code, body) = get(server.addr).await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        "Hello Kubernetes bootcamp! | Running on: bootcamp-abc12 | v=1\n"
    );
    let v2 = rt.load(sample("bootcamp-v2.wasm")).await.unwrap();
    let server2 = rt
        .serve_http(
            &v2,
            GuestConfig::default(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
        .unwrap();
    assert!(get(server2.addr).await.1.ends_with("| v=2\n"));
    assert_eq!(server.counts(), (1, 0));
}

#[tokio::test]
async fn wasi_command_sample_runs_with_args_and_exit_code() {
    let (d, rt) = runtime();
    let p = rt.load(sample("hello-command.wasm")).await.unwrap();
    assert_eq!(p.kind, Kind::Command);
    let out = d.path().join("out.log");
    let f = Arc::new(std::fs::File::create(&out).unwrap());
    let cfg = GuestConfig {
        args: vec!["hello".into(), "a1".into()],
        env: vec![
            ("HOSTNAME".into(), "job-1".into()),
            ("EXIT_CODE".into(), "7".into()),
        ],
        stdout: Some(f.clone()),
        stderr: Some(f),
        ..Default::default()
    };
    assert_eq!(rt.run_command(&p, &cfg).await.unwrap(), 7);
    let log = std::fs::read_to_string(&out).unwrap();
    assert!(
        log.contains("hello from job-1")
            && log.contains("arg 1: a1")
            && log.contains("exiting with 7"),
        "{log}"
    );
}

async fn get_path(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_failing_request_is_a_500_and_the_server_keeps_serving() {
    let (_d, rt) = runtime();
    let p = rt.load(sample("misbehave.wasm")).await.unwrap();
    assert_eq!(p.kind, Kind::Http);
    let cfg = GuestConfig {
        request_timeout: Some(std::time::Duration::from_millis(300)),
        memory_limit: Some(8 << 20),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = rt.serve_http(&p, cfg, listener).unwrap();
    assert_eq!(get_path(server.addr, "/").await, (200, "ok\n".into()));

    // A trap: 500 for that request only.
    let (code, body) = get_path(server.addr, "/trap").await;
    assert_eq!(code, 500, "{body}");
    assert_eq!(get_path(server.addr, "/").await.0, 200);

    // A runaway loop: stopped at the CPU deadline and answered 500.
    let t = std::time::Instant::now();
    assert_eq!(get_path(server.addr, "/spin").await.0, 500);
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "the deadline is 300 ms; the spinning request took {took:?}"
    );
    assert_eq!(get_path(server.addr, "/").await.0, 200);

    // Memory past the limit: the growth traps (the limiter is set to), answered 500.
    let (code, body) = get_path(server.addr, "/grow").await;
    assert_eq!(code, 500, "{body}");
    assert_eq!(get_path(server.addr, "/").await.0, 200);
    let (served, failed) = server.counts();
    assert_eq!(served, 7);
    assert_eq!(failed, 3, "trap, spin and grow are counted as failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_of_one_new_binary_all_succeed_and_compile_once() {
    let (_d, rt) = runtime();
    let wasm = sample("bootcamp-v1.wasm");
    let loads: Vec<_> = (0..4)
        .map(|_| {
            let (rt, wasm) = (rt.clone(), wasm.clone());
            tokio::spawn(async move { rt.load(wasm).await })
        })
        .collect();
    let mut programs = Vec::new();
    for l in loads {
        programs.push(
            l.await
                .unwrap()
                .unwrap_or_else(|e| panic!("a concurrent load failed: {e}")),
        );
    }
    let compiled = programs.iter().filter(|p| !p.cached).count();
    assert_eq!(compiled, 1, "compiled {compiled} times");
    let left: Vec<_> = std::fs::read_dir(&rt.cache_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "the compile cache holds {left:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn compiling_does_not_block_the_async_thread() {
    let (_d, rt) = runtime();
    let wasm = sample("bootcamp-v1.wasm");
    // On a single-threaded runtime a timer fires while the compile runs: it is not on the
    // runtime's only thread.
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = ticks.clone();
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let started = std::time::Instant::now();
    let p = rt.load(wasm).await.unwrap();
    let took = started.elapsed();
    ticker.abort();
    assert!(!p.cached);
    let n = ticks.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        n >= 3,
        "the runtime thread ran {n} timer ticks during a {took:?} compile"
    );
}

#[tokio::test]
async fn the_loaded_map_drops_programs_no_one_holds() {
    let (_d, rt) = runtime();
    let v1 = rt.load(sample("bootcamp-v1.wasm")).await.unwrap();
    let v2 = rt.load(sample("bootcamp-v2.wasm")).await.unwrap();
    let handler = rt.handler(&v2, GuestConfig::default()).unwrap();
    assert_eq!(rt.loaded_digests().len(), 2);
    // A second load of a held program shares it.
    assert!(rt.load(sample("bootcamp-v1.wasm")).await.unwrap().cached);
    let d1 = v1.digest.clone();
    drop(v1);
    assert_eq!(
        rt.loaded_digests(),
        std::collections::HashSet::from([v2.digest.clone()])
    );
    // A handler keeps its program loaded.
    drop(v2);
    assert_eq!(rt.loaded_digests().len(), 1);
    drop(handler);
    assert!(rt.loaded_digests().is_empty());
    assert!(lock(&rt.loaded).is_empty());
    // Loaded again: from the compile cache.
    let again = rt.load(sample("bootcamp-v1.wasm")).await.unwrap();
    assert!(again.cached);
    assert_eq!(again.digest, d1);
}

#[tokio::test]
async fn compile_cache_gc_keeps_what_is_held_or_kept_and_bounds_the_rest() {
    let (_d, rt) = runtime();
    let held = rt.load(sample("bootcamp-v1.wasm")).await.unwrap();
    let kept = rt.load(sample("bootcamp-v2.wasm")).await.unwrap().digest;
    let unused = rt.load(sample("fetch.wasm")).await.unwrap().digest;
    // Left by another engine, and a write cut short.
    std::fs::write(rt.cache_dir.join("ab-0123456789abcdef.cwasm"), b"x").unwrap();
    std::fs::write(rt.cache_dir.join(".tmp-crash"), b"x").unwrap();
    let young = GcBounds {
        min_age: std::time::Duration::from_secs(600),
        max_bytes: u64::MAX,
    };
    let keep = std::collections::HashSet::from([kept.clone()]);
    // Recently used: only the other engine's file goes.
    assert_eq!(rt.collect_compiled(&keep, young), 1);
    let now = GcBounds {
        min_age: std::time::Duration::ZERO,
        ..young
    };
    assert_eq!(rt.collect_compiled(&keep, now), 2);
    assert!(rt.cache_path(&held.digest).is_file());
    assert!(rt.cache_path(&kept).is_file());
    assert!(!rt.cache_path(&unused).exists());
    // Over the size bound, even young unused entries go; held ones never.
    assert_eq!(
        rt.collect_compiled(
            &std::collections::HashSet::new(),
            GcBounds {
                max_bytes: 0,
                ..young
            }
        ),
        1
    );
    assert!(rt.cache_path(&held.digest).is_file());
    assert!(!rt.cache_path(&kept).exists());
}

#[test]
fn wasm_gc_keeps_the_blobs_of_images_in_use_and_forgets_the_rest() {
    let (d, rt) = runtime();
    let blobs = artifact::BlobCache::new(d.path().join("blobs"));
    let index = artifact::ImageIndex::open(d.path().join("images.json"));
    let (a, b) = (b"\0asm-a".to_vec(), b"\0asm-b".to_vec());
    let (da, db) = (sha256_digest(&a), sha256_digest(&b));
    blobs.put_for_test(&da, &a).unwrap();
    blobs.put_for_test(&db, &b).unwrap();
    index.put("reg/a:v1", "sha256:ma", &da);
    index.put("reg/b:v1", "sha256:mb", &db);
    let in_use = std::collections::HashSet::from(["reg/a:v1".to_string()]);
    let bounds = GcBounds {
        min_age: std::time::Duration::ZERO,
        max_bytes: u64::MAX,
    };
    let report = collect_garbage(&rt, &blobs, &index, &in_use, bounds);
    assert_eq!(report.blobs, 1);
    assert_eq!(report.images, 1);
    assert!(blobs.get(&da).is_some() && blobs.get(&db).is_none());
    assert!(index.get("reg/b:v1").is_none());
    // The index on disk says so too.
    let reopened = artifact::ImageIndex::open(d.path().join("images.json"));
    assert!(reopened.get("reg/a:v1").is_some() && reopened.get("reg/b:v1").is_none());
}

#[test]
fn concurrent_puts_of_one_blob_all_succeed() {
    let d = tempfile::tempdir().unwrap();
    let cache = artifact::BlobCache::new(d.path());
    let blob = vec![7u8; 1 << 20];
    let digest = sha256_digest(&blob);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..10 {
                    cache.put_for_test(&digest, &blob).unwrap();
                }
            });
        }
    });
    assert_eq!(cache.get(&digest).as_deref(), Some(&blob[..]));
}

#[test]
fn the_image_index_keeps_every_concurrent_put_across_a_reopen() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("images.json");
    let index = artifact::ImageIndex::open(&path);
    std::thread::scope(|s| {
        for t in 0..8 {
            let index = &index;
            s.spawn(move || {
                for i in 0..20 {
                    index.put(&format!("reg/app{t}:v{i}"), "sha256:m", "sha256:l");
                }
            });
        }
    });
    let reopened = artifact::ImageIndex::open(&path);
    for t in 0..8 {
        for i in 0..20 {
            assert!(
                reopened.get(&format!("reg/app{t}:v{i}")).is_some(),
                "reg/app{t}:v{i} was lost"
            );
        }
    }
}

/// A node that runs many programs one after another, several instances of each at once, keeps a
/// bounded set of warm (resident) memory slots: once `WARM_MEMORY_SLOTS` freed slots are warm,
/// a new program reuses them rather than taking cold ones. Freed async stacks keep only their
/// top `STACK_KEEP_RESIDENT` bytes resident.
#[tokio::test]
async fn freed_slots_kept_warm_are_bounded_across_programs() {
    const PROGRAMS: usize = 12;
    const AT_ONCE: usize = 8;
    // Slots freed but still in the decommit queue count as warm only once it is flushed.
    const BOUND: usize = WARM_MEMORY_SLOTS as usize + AT_ONCE + DECOMMIT_BATCH;
    let dir = tempfile::tempdir().unwrap();
    // 126 memory slots: under 128 the pool is one shard with the whole warm budget, and
    // PROGRAMS * AT_ONCE cold slots are there for the taking.
    let rt = Runtime::new(dir.path().join("cache"), 63).unwrap();
    let mut programs = Vec::new();
    for i in 0..PROGRAMS {
        // Distinct data, distinct programs; each writes to its one-page memory.
        let wasm = wat::parse_str(format!(
            r#"(module
                (memory (export "memory") 1)
                (data (i32.const 0) "program {i}")
                (func (export "_start") (i32.store (i32.const 4096) (i32.const {i}))))"#
        ))
        .unwrap();
        programs.push(rt.load(wasm).await.unwrap());
    }
    let metrics = rt.engine().pooling_allocator_metrics().unwrap();
    for (i, p) in programs.iter().enumerate() {
        // AT_ONCE instances of the program alive together, each run, then all freed.
        let Inner::Core(pre) = &*p.inner else {
            panic!("a core command")
        };
        let mut stores = Vec::new();
        for _ in 0..AT_ONCE {
            let mut store = rt.command_store(&GuestConfig::default()).unwrap();
            let instance = pre.instantiate_async(&mut store).await.unwrap();
            stores.push((store, instance));
        }
        assert_eq!(metrics.memories(), AT_ONCE);
        for (store, instance) in &mut stores {
            let start = instance
                .get_typed_func::<(), ()>(&mut *store, "_start")
                .unwrap();
            start.call_async(&mut *store, ()).await.unwrap();
        }
        drop(stores);
        assert_eq!(metrics.memories(), 0);
        // Unbounded, every program's slots stay warm: (i + 1) * AT_ONCE of them, less those
        // still queued.
        let warm = metrics.unused_warm_memories() as usize;
        assert!(
            warm <= BOUND,
            "{warm} warm memory slots after {} programs of {AT_ONCE} instances at once",
            i + 1
        );
        assert!(
            metrics.unused_memory_bytes_resident() <= warm * (64 << 10),
            "{} bytes resident in {warm} warm one-page memory slots",
            metrics.unused_memory_bytes_resident()
        );
        let stacks = metrics.unused_warm_stacks() as usize;
        let stack_bytes = metrics
            .unused_stack_bytes_resident()
            .expect("freed stacks are zeroed");
        assert!(
            stack_bytes <= stacks * STACK_KEEP_RESIDENT,
            "{stack_bytes} bytes resident in {stacks} warm stacks"
        );
    }
}
