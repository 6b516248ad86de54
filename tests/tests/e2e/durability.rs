//! Durability: `kill -9` the server during a burst of writes, restart it on the same data dir,
//! and find every write it acknowledged.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use skiff_api::Resource;
use skiff_client::Client;
use skiff_e2e::{eventually, ServerProcess};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(dir: &Path, port: u16) -> anyhow::Result<ServerProcess> {
    ServerProcess::start(dir, port)
}

async fn connect(dir: &Path) -> anyhow::Result<Client> {
    ServerProcess::client(dir, Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut server = start(dir.path(), port)?;
    let client = connect(dir.path()).await?;
    let cms = Resource::lookup("configmaps").unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let c = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("cm-{w}-{i}");
                let cm = json!({"metadata": {"name": name}, "data": {"writer": w.to_string(), "i": i.to_string()}});
                match c.create_dyn(cms, Some("default"), &cm).await {
                    Ok(_) => acked.lock().unwrap().push(name),
                    Err(_) => return,
                }
            }
        }));
    }
    // Let the burst run, then kill -9 in the middle of it.
    eventually(
        "200 acknowledged writes",
        Duration::from_secs(30),
        || async { Ok((acked.lock().unwrap().len() >= 200).then_some(())) },
    )
    .await?;
    server.0.kill()?; // SIGKILL
    server.0.wait()?;
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    drop(server);

    let _server = start(dir.path(), port)?;
    let client = connect(dir.path()).await?;
    let list = client.list_dyn(cms, Some("default"), None, None).await?;
    let present: std::collections::HashSet<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    // The store keeps working after recovery.
    client
        .create_dyn(
            cms,
            Some("default"),
            &json!({"metadata": {"name": "after-restart"}}),
        )
        .await?;
    Ok(())
}
