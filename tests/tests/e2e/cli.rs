//! The `skiff` CLI as a shell user runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::json;
use skiff_api::Resource;
use skiff_e2e::{skiff_binary, TestCluster};

/// `skiff get ... | head -1`: the reader goes away after one line; the CLI must end without
/// a panic ("failed printing to stdout: Broken pipe") or an error line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_the_cli_quietly() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let cms = Resource::lookup("configmaps").unwrap();
    // Enough output that it cannot fit in the pipe's buffer before the reader leaves.
    let big = "x".repeat(4096);
    for i in 0..64 {
        let cm = json!({"metadata": {"name": format!("cm-{i}")}, "data": {"v": big}});
        cluster.client.create_dyn(cms, Some("default"), &cm).await?;
    }
    let kubeconfig = cluster.kubeconfig();
    let out = tokio::task::spawn_blocking(move || -> anyhow::Result<std::process::Output> {
        let mut child = Command::new(skiff_binary()?)
            .args(["get", "configmaps", "-o", "yaml"])
            .env("SKIFF_KUBECONFIG", &kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first)?;
        anyhow::ensure!(!first.is_empty(), "no output before the pipe closed");
        // The reader (and the pipe's read end) is gone here.
        Ok(child.wait_with_output()?)
    })
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && out.status.code() != Some(101),
        "the CLI panicked on a closed pipe: {stderr}"
    );
    assert!(
        stderr.trim().is_empty(),
        "unexpected error output: {stderr}"
    );
    Ok(())
}
