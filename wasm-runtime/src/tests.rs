use super::*;

fn runtime() -> (tempfile::TempDir, Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(dir.path().join("cache"), 16).unwrap();
    (dir, rt)
}

#[test]
fn rejects_what_is_not_wasm() {
    let (_d, rt) = runtime();
    assert!(matches!(
        rt.load(b"#!/bin/sh\necho hi\n"),
        Err(WasmError::NotWasm)
    ));
    let no_start = wat::parse_str("(module (func (export \"other\")))").unwrap();
    assert!(matches!(rt.load(&no_start), Err(WasmError::NothingToRun)));
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
    let p = rt.load(&wasm).unwrap();
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
    let p2 = rt.load(&wasm).unwrap();
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
    let p = rt.load(&wasm).unwrap();
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
    let p = rt.load(&wasm).unwrap();
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

#[test]
fn insecure_registries() {
    assert!(artifact::is_insecure("127.0.0.1:5000", &[]));
    assert!(artifact::is_insecure("localhost:5000", &[]));
    assert!(!artifact::is_insecure("ghcr.io", &[]));
    assert!(artifact::is_insecure(
        "edge-registry:5000",
        &["edge-registry:5000".into()]
    ));
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
    let p = rt.load(&sample("bootcamp-v1.wasm")).unwrap();
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
    let v2 = rt.load(&sample("bootcamp-v2.wasm")).unwrap();
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
    let p = rt.load(&sample("hello-command.wasm")).unwrap();
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
    let p = rt.load(&sample("misbehave.wasm")).unwrap();
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
