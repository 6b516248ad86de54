//! Jobs and CronJobs on a real `skiff up` (wasm and OCI pods): completion, parallelism,
//! Indexed jobs, backoff limits, pod failure policy, deadlines, TTL, suspend, and CronJobs
//! on the clock (a Job a minute, Forbid, Replace, history limits, `create job --from`).
//! Needs root, iproute2, docker-registry, runc, containernetworking-plugins, skopeo, kubectl
//! and the samples (`samples/build.sh`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, SkiffUp};

const IMAGE: &str = "127.0.0.1:5000/job-square:v1";
const OCI_IMAGE: &str = "127.0.0.1:5000/job-square-oci:v1";

fn apply(
    up: &SkiffUp,
    ns: &Netns,
    dir: &std::path::Path,
    name: &str,
    manifest: &str,
) -> anyhow::Result<()> {
    let f = dir.join(name);
    std::fs::write(&f, manifest)?;
    up.skiff(ns, &["apply", "-f", f.to_str().unwrap()])?;
    Ok(())
}

/// A Job manifest with the sample image, `spec` lines (indented 2) and container `env`.
fn job(name: &str, image: &str, spec: &str, env: &[(&str, &str)]) -> String {
    let env: String = env
        .iter()
        .map(|(k, v)| format!("        - {{name: {k}, value: \"{v}\"}}\n"))
        .collect();
    let env = if env.is_empty() {
        String::new()
    } else {
        format!("        env:\n{env}")
    };
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n{spec}  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: work\n        image: {image}\n{env}"
    )
}

fn condition<'a>(obj: &'a Value, ty: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == ty && c["status"] == "True")
}

/// Waits until Job `name` has condition `ty` and returns the Job.
async fn until_condition(
    up: &SkiffUp,
    ns: &Netns,
    name: &str,
    ty: &str,
    within: Duration,
) -> anyhow::Result<Value> {
    eventually(
        &format!("job {name} to have condition {ty}"),
        within,
        || async {
            let j = up.json(ns, &["get", "job", name])?;
            Ok(condition(&j, ty).is_some().then_some(j))
        },
    )
    .await
}

fn pods_of(up: &SkiffUp, ns: &Netns, job: &str) -> anyhow::Result<Vec<Value>> {
    let l = up.json(
        ns,
        &[
            "get",
            "pods",
            "-l",
            &format!("batch.kubernetes.io/job-name={job}"),
        ],
    )?;
    Ok(l["items"].as_array().cloned().unwrap_or_default())
}

/// The real kubectl against this cluster.
fn kubectl(up: &SkiffUp, ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let kc = up.dir.join("kubeconfig");
    let mut a = vec!["kubectl", "--kubeconfig", kc.to_str().unwrap()];
    a.extend_from_slice(args);
    ns.run(&a)
}

fn phase(p: &Value) -> &str {
    p["status"]["phase"].as_str().unwrap_or("")
}

fn active(p: &Value) -> bool {
    !matches!(phase(p), "Succeeded" | "Failed") && p["metadata"]["deletionTimestamp"].is_null()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_jobs_complete_fail_and_keep_their_parallelism() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(&ns, &[("job-square.wasm", "job-square:v1")])?;

    // The simplest Job, made by the CLI.
    let out = up.skiff(&ns, &["create", "job", "sq", &format!("--image={IMAGE}")])?;
    assert_eq!(out.trim(), "job.batch/sq created");
    let started = Instant::now();
    let j = until_condition(&up, &ns, "sq", "Complete", Duration::from_secs(60)).await?;
    println!("a wasm Job completed in {:?}", started.elapsed());
    assert_eq!(j["status"]["succeeded"], 1);
    assert!(j["status"]["completionTime"].is_string() && j["status"]["startTime"].is_string());
    assert!(condition(&j, "SuccessCriteriaMet").is_some(), "{j}");
    let pods = pods_of(&up, &ns, "sq")?;
    assert_eq!(pods.len(), 1);
    let uid = j["metadata"]["uid"].as_str().unwrap();
    let labels = &pods[0]["metadata"]["labels"];
    assert_eq!(labels["job-name"], "sq");
    assert_eq!(labels["controller-uid"], uid);
    assert_eq!(labels["batch.kubernetes.io/controller-uid"], uid);
    assert_eq!(
        pods[0]["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    let logs = up.skiff(&ns, &["logs", "job/sq"])?;
    assert_eq!(logs.trim(), "index 0 square 0 pi 3.");
    let kc = up.dir.join("kubeconfig");
    let kubectl = |args: &[&str]| {
        let mut a = vec!["kubectl", "--kubeconfig", kc.to_str().unwrap()];
        a.extend_from_slice(args);
        ns.run(&a)
    };
    assert_eq!(kubectl(&["logs", "job/sq"])?, logs);
    let table = kubectl(&["get", "jobs"])?;
    assert!(
        table.starts_with("NAME") && table.contains("COMPLETIONS") && table.contains("DURATION"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("sq "))
        .unwrap_or_default()
        .to_string();
    assert!(row.contains("Complete") && row.contains("1/1"), "{table}");

    // Four completions, two at a time: never more than two active pods.
    apply(
        &up,
        &ns,
        dir.path(),
        "par.yaml",
        &job(
            "par",
            IMAGE,
            "  completions: 4\n  parallelism: 2\n",
            &[("SLEEP_SECONDS", "1")],
        ),
    )?;
    let mut max_active = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pods = pods_of(&up, &ns, "par")?;
        max_active = max_active.max(pods.iter().filter(|p| active(p)).count());
        let j = up.json(&ns, &["get", "job", "par"])?;
        if condition(&j, "Complete").is_some() {
            assert_eq!(j["status"]["succeeded"], 4);
            // Listed again: the Job may have completed after the list above.
            let pods = pods_of(&up, &ns, "par")?;
            assert_eq!(pods.iter().filter(|p| phase(p) == "Succeeded").count(), 4);
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "job par did not complete: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("completions 4 / parallelism 2: at most {max_active} active pods seen");
    assert_eq!(max_active, 2, "parallelism 2 is used and never exceeded");

    // Indexed: each index succeeds exactly once, with its own output and host name.
    apply(
        &up,
        &ns,
        dir.path(),
        "idx.yaml",
        &job(
            "idx",
            IMAGE,
            "  completions: 5\n  parallelism: 3\n  completionMode: Indexed\n",
            &[],
        ),
    )?;
    let j = until_condition(&up, &ns, "idx", "Complete", Duration::from_secs(60)).await?;
    assert_eq!(j["status"]["completedIndexes"], "0-4");
    let pods = pods_of(&up, &ns, "idx")?;
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for p in &pods {
        let ix: i64 = p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
            .as_str()
            .unwrap()
            .parse()?;
        assert_eq!(p["spec"]["hostname"], format!("idx-{ix}"));
        if phase(p) == "Succeeded" {
            *seen.entry(ix).or_default() += 1;
            let name = p["metadata"]["name"].as_str().unwrap();
            let logs = up.skiff(&ns, &["logs", name])?;
            assert!(
                logs.starts_with(&format!("index {ix} square {} pi 3.", ix * ix)),
                "{logs}"
            );
        }
    }
    assert_eq!(
        seen,
        (0..5).map(|i| (i, 1)).collect(),
        "each index succeeded once"
    );

    // backoffLimit 1 and a failing command: two failed pods, then BackoffLimitExceeded.
    apply(
        &up,
        &ns,
        dir.path(),
        "fail.yaml",
        &job("fail", IMAGE, "  backoffLimit: 1\n", &[("EXIT_CODE", "3")]),
    )?;
    let j = until_condition(&up, &ns, "fail", "Failed", Duration::from_secs(60)).await?;
    assert_eq!(
        condition(&j, "Failed").unwrap()["reason"],
        "BackoffLimitExceeded"
    );
    assert_eq!(j["status"]["failed"], 2);
    let pods = pods_of(&up, &ns, "fail")?;
    assert_eq!(pods.iter().filter(|p| phase(p) == "Failed").count(), 2);
    // The retry waited out the backoff (10 s after the first failure).
    let created: Vec<i64> = pods
        .iter()
        .filter_map(|p| p["metadata"]["creationTimestamp"].as_str())
        .filter_map(skiff_api::table::parse_rfc3339)
        .collect();
    let spread = created.iter().max().unwrap() - created.iter().min().unwrap();
    assert!(
        spread >= 9,
        "the second pod came {spread} s after the first"
    );

    // A pod failure policy: exit code 42 fails the Job at once, without retries.
    apply(&up, &ns, dir.path(), "policy.yaml", &job("policy", IMAGE, "  backoffLimit: 6\n  podFailurePolicy:\n    rules:\n    - action: FailJob\n      onExitCodes: {operator: In, values: [42]}\n", &[("EXIT_CODE", "42")]))?;
    let j = until_condition(&up, &ns, "policy", "Failed", Duration::from_secs(60)).await?;
    assert_eq!(
        condition(&j, "Failed").unwrap()["reason"],
        "PodFailurePolicy"
    );
    assert_eq!(pods_of(&up, &ns, "policy")?.len(), 1);

    // A Job the API refuses: restartPolicy Always.
    let bad = job("bad", IMAGE, "", &[]).replace("restartPolicy: Never", "restartPolicy: Always");
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, bad)?;
    let out = up.skiff_output(&ns, &["apply", "-f", f.to_str().unwrap()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.template.spec.restartPolicy"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_ttl_suspend_and_an_oci_job() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(&ns, &[("job-square.wasm", "job-square:v1")])?;
    up.push_images(&ns, &[("job-square-oci:v1", "job-square-oci:v1")])?;

    // activeDeadlineSeconds: the sleeping pod is deleted and the Job fails.
    apply(
        &up,
        &ns,
        dir.path(),
        "slow.yaml",
        &job(
            "slow",
            IMAGE,
            "  activeDeadlineSeconds: 3\n",
            &[("SLEEP_SECONDS", "120")],
        ),
    )?;
    let j = until_condition(&up, &ns, "slow", "Failed", Duration::from_secs(30)).await?;
    assert_eq!(
        condition(&j, "Failed").unwrap()["reason"],
        "DeadlineExceeded"
    );
    eventually(
        "the slow job's pod to be gone",
        Duration::from_secs(60),
        || async {
            Ok(pods_of(&up, &ns, "slow")?
                .iter()
                .all(|p| !active(p) || phase(p) == "Failed")
                .then_some(()))
        },
    )
    .await?;

    // ttlSecondsAfterFinished: the finished Job and its pods are deleted.
    apply(
        &up,
        &ns,
        dir.path(),
        "ttl.yaml",
        &job("ttl", IMAGE, "  ttlSecondsAfterFinished: 2\n", &[]),
    )?;
    until_condition(&up, &ns, "ttl", "Complete", Duration::from_secs(60)).await?;
    eventually(
        "job ttl and its pods to be deleted",
        Duration::from_secs(30),
        || async {
            let jobs = up.json(&ns, &["get", "jobs"])?;
            let gone = !jobs["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|j| j["metadata"]["name"] == "ttl");
            Ok((gone && pods_of(&up, &ns, "ttl")?.is_empty()).then_some(()))
        },
    )
    .await?;

    // suspend: no pods while suspended; resumed, it runs to completion.
    apply(
        &up,
        &ns,
        dir.path(),
        "sus.yaml",
        &job("sus", IMAGE, "  suspend: true\n  completions: 2\n", &[]),
    )?;
    let j = until_condition(&up, &ns, "sus", "Suspended", Duration::from_secs(30)).await?;
    assert!(j["status"]["startTime"].is_null(), "{j}");
    assert!(pods_of(&up, &ns, "sus")?.is_empty());
    let table = up.skiff(&ns, &["get", "jobs"])?;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("sus ") && l.contains("Suspended")),
        "{table}"
    );
    kubectl(
        &up,
        &ns,
        &[
            "patch",
            "job",
            "sus",
            "--type=merge",
            "-p",
            "{\"spec\":{\"suspend\":false}}",
        ],
    )?;
    let j = until_condition(&up, &ns, "sus", "Complete", Duration::from_secs(60)).await?;
    assert_eq!(j["status"]["succeeded"], 2);

    // Suspending a running Job deletes its active pods.
    apply(
        &up,
        &ns,
        dir.path(),
        "pause.yaml",
        &job("pause", IMAGE, "", &[("SLEEP_SECONDS", "120")]),
    )?;
    eventually(
        "job pause to have a running pod",
        Duration::from_secs(30),
        || async {
            Ok(pods_of(&up, &ns, "pause")?
                .iter()
                .any(|p| phase(p) == "Running")
                .then_some(()))
        },
    )
    .await?;
    kubectl(
        &up,
        &ns,
        &[
            "patch",
            "job",
            "pause",
            "--type=merge",
            "-p",
            "{\"spec\":{\"suspend\":true}}",
        ],
    )?;
    until_condition(&up, &ns, "pause", "Suspended", Duration::from_secs(30)).await?;
    eventually(
        "job pause's pods to be gone",
        Duration::from_secs(60),
        || async { Ok(pods_of(&up, &ns, "pause")?.is_empty().then_some(())) },
    )
    .await?;

    // The same program as an OCI image.
    apply(
        &up,
        &ns,
        dir.path(),
        "oci.yaml",
        &job(
            "oci",
            OCI_IMAGE,
            "  completions: 2\n  parallelism: 2\n  completionMode: Indexed\n",
            &[],
        ),
    )?;
    let j = until_condition(&up, &ns, "oci", "Complete", Duration::from_secs(90)).await?;
    assert_eq!(j["status"]["completedIndexes"], "0-1");
    for p in pods_of(&up, &ns, "oci")? {
        let ix = p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
            .as_str()
            .unwrap()
            .to_string();
        let logs = up.skiff(&ns, &["logs", p["metadata"]["name"].as_str().unwrap()])?;
        assert!(logs.starts_with(&format!("index {ix} square")), "{logs}");
    }
    Ok(())
}

fn jobs_of(up: &SkiffUp, ns: &Netns, cronjob: &str) -> anyhow::Result<Vec<Value>> {
    let l = up.json(ns, &["get", "jobs"])?;
    Ok(l["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| {
            j["metadata"]["ownerReferences"][0]["name"] == cronjob
                && j["metadata"]["deletionTimestamp"].is_null()
        })
        .cloned()
        .collect())
}

fn finished(j: &Value) -> bool {
    condition(j, "Complete").is_some() || condition(j, "Failed").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjobs_run_on_the_minute() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ns, up) = SkiffUp::in_new_netns(dir.path(), &[]).await?;
    up.push_samples(&ns, &[("job-square.wasm", "job-square:v1")])?;
    let cron = |name: &str, extra: &str, env: &str| {
        format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: {name}}}\nspec:\n  schedule: \"*/1 * * * *\"\n{extra}  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n          - name: work\n            image: {IMAGE}\n{env}"
        )
    };
    let sleepy = "            env:\n            - {name: SLEEP_SECONDS, value: \"300\"}\n";
    let out = up.skiff(
        &ns,
        &[
            "create",
            "cronjob",
            "tick",
            &format!("--image={IMAGE}"),
            "--schedule=*/1 * * * *",
        ],
    )?;
    assert_eq!(out.trim(), "cronjob.batch/tick created");
    apply(
        &up,
        &ns,
        dir.path(),
        "forbid.yaml",
        &cron("forbid", "  concurrencyPolicy: Forbid\n", sleepy),
    )?;
    apply(
        &up,
        &ns,
        dir.path(),
        "replace.yaml",
        &cron("replace", "  concurrencyPolicy: Replace\n", sleepy),
    )?;
    apply(
        &up,
        &ns,
        dir.path(),
        "hist.yaml",
        &cron("hist", "  successfulJobsHistoryLimit: 1\n", ""),
    )?;

    // A schedule the API refuses, with one clear line.
    let out = up.skiff_output(
        &ns,
        &[
            "create",
            "cronjob",
            "bad",
            &format!("--image={IMAGE}"),
            "--schedule=* * *",
        ],
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.schedule") && err.lines().count() == 1,
        "{err}"
    );

    // A manual run from the template, at once.
    let out = up.skiff(&ns, &["create", "job", "tick-now", "--from=cronjob/tick"])?;
    assert_eq!(out.trim(), "job.batch/tick-now created");
    let j = until_condition(&up, &ns, "tick-now", "Complete", Duration::from_secs(60)).await?;
    assert_eq!(
        j["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"],
        "manual"
    );

    // The first scheduled Job, named after its scheduled minute, completes.
    let first = eventually(
        "cronjob tick to make a Job that completes",
        Duration::from_secs(150),
        || async {
            let cj = up.json(&ns, &["get", "cronjob", "tick"])?;
            Ok(jobs_of(&up, &ns, "tick")?
                .into_iter()
                .find(|j| j["metadata"]["name"] != "tick-now" && condition(j, "Complete").is_some())
                .filter(|_| cj["status"]["lastSuccessfulTime"].is_string())
                .map(|j| (j, cj)))
        },
    )
    .await?;
    let (j, cj) = first;
    let scheduled = j["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"]
        .as_str()
        .unwrap()
        .to_string();
    let minutes = skiff_api::table::parse_rfc3339(&scheduled).unwrap() / 60;
    assert_eq!(j["metadata"]["name"], format!("tick-{minutes}"));
    assert!(cj["status"]["lastScheduleTime"].is_string());
    let kc = up.dir.join("kubeconfig");
    let table = ns.run(&[
        "kubectl",
        "--kubeconfig",
        kc.to_str().unwrap(),
        "get",
        "cronjobs",
    ])?;
    assert!(
        table.starts_with("NAME") && table.contains("LAST SCHEDULE") && table.contains("TIMEZONE"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("tick ") && l.contains("*/1 * * * *")),
        "{table}"
    );

    // Two minutes later: Forbid kept its one running Job, Replace replaced its own, the
    // history limit left one finished Job.
    let first_replace = jobs_of(&up, &ns, "replace")?
        .first()
        .map(|j| j["metadata"]["name"].clone());
    eventually(
        "Replace to start a second Job in place of the first",
        Duration::from_secs(150),
        || async {
            let jobs = jobs_of(&up, &ns, "replace")?;
            Ok((jobs.len() == 1
                && first_replace
                    .as_ref()
                    .is_some_and(|f| &jobs[0]["metadata"]["name"] != f))
            .then_some(()))
        },
    )
    .await?;
    let forbid = jobs_of(&up, &ns, "forbid")?;
    assert_eq!(forbid.len(), 1, "Forbid never runs two at once");
    assert!(!finished(&forbid[0]));
    let events = up.json(&ns, &["get", "events"])?;
    assert!(
        events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["involvedObject"]["name"] == "forbid" && e["reason"] == "JobAlreadyActive"),
        "Forbid says why it skipped"
    );
    eventually(
        "hist to keep one finished Job after two runs",
        Duration::from_secs(90),
        || async {
            let cj = up.json(&ns, &["get", "cronjob", "hist"])?;
            let jobs = jobs_of(&up, &ns, "hist")?;
            let done = jobs.iter().filter(|j| finished(j)).count();
            let runs_seen = cj["status"]["lastSuccessfulTime"].is_string()
                && cj["status"]["lastScheduleTime"]
                    .as_str()
                    .and_then(skiff_api::table::parse_rfc3339)
                    > cj["metadata"]["creationTimestamp"]
                        .as_str()
                        .and_then(skiff_api::table::parse_rfc3339)
                        .map(|t| t + 60);
            Ok((runs_seen && done == 1 && jobs.len() == 1).then_some(()))
        },
    )
    .await?;
    Ok(())
}
