//! A wasm component built outside this project runs as it is: a Python wasi:http app built with
//! componentize-py (`samples/python-hello`, built by `samples/build.sh`), pushed with
//! `skiff push`, deployed, scaled and reached at its pod IPs on `skiff up`, like the project's
//! own samples. Needs root, iproute2, curl, docker-registry and the samples.

use std::time::Duration;

use skiff_e2e::eventually;
use skiff_e2e::netns::SkiffUp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_component_built_with_componentize_py_serves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(&ns, &[("python-hello.wasm", "python-hello:v1")])?;
    up.skiff(
        &ns,
        &[
            "create",
            "deployment",
            "py",
            "--image=127.0.0.1:5000/python-hello:v1",
            "--port=8080",
        ],
    )?;
    // The first start compiles an 18 MB component (CPython inside); later ones load it from
    // the compile cache.
    up.rolled_out(&ns, "py", Duration::from_secs(600))?;
    up.skiff(&ns, &["scale", "deployment/py", "--replicas=3"])?;
    up.rolled_out(&ns, "py", Duration::from_secs(60))?;
    let pods = up.pod_ips(&ns, "app=py")?;
    assert_eq!(pods.len(), 3, "{pods:?}");
    for (name, ip) in &pods {
        let body = eventually(
            "the python pod to answer",
            Duration::from_secs(10),
            || async {
                Ok(ns
                    .run(&[
                        "curl",
                        "-sf",
                        "--max-time",
                        "5",
                        &format!("http://{ip}:8080/x?y=1"),
                    ])
                    .ok())
            },
        )
        .await?;
        assert_eq!(
            body,
            format!("Hello from Python | Running on: {name} | path=/x?y=1\n")
        );
    }
    let events = up.skiff(&ns, &["get", "events"])?;
    assert!(
        events.contains("compile cache"),
        "later pods load from the compile cache:\n{events}"
    );
    Ok(())
}
