//! The Job controller: runs a Job's pods to `completions` successes with at most `parallelism`
//! at once (`NonIndexed`, or `Indexed`: one success per completion index), replacing failed
//! pods after an exponential delay until `backoffLimit`, `activeDeadlineSeconds` or a
//! `podFailurePolicy` rule fails the Job; `suspend` deletes the active pods; a finished Job
//! is deleted `ttlSecondsAfterFinished` later. Finished pods are counted from the pod cache
//! (no `batch.kubernetes.io/job-tracking` finalizer): a finished pod deleted by hand before
//! the Job finishes is not counted again, as counts never go down.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobSpec, JobStatus, PodFailurePolicyRule};
use k8s_openapi::api::core::v1::{EnvVar, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use skiff_api::conditions::{self, Condition};
use skiff_api::selector::Selector;
use skiff_api::ApiError;

use super::api;
use super::replicaset::{now_unix, selector};
use super::runtime::{split_key, Action, Cache, Expectations, Reconciler};
use crate::registry::{DeleteOptions, Registry};

/// The completion index of an Indexed Job's pod (annotation and label).
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
pub const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";

/// Most pods created in one reconcile.
const BURST: usize = 500;

pub struct JobController {
    pub reg: Arc<Registry>,
    pub jobs: Arc<Cache<Job>>,
    pub pods: Arc<Cache<Pod>>,
    expect: Expectations,
}

impl JobController {
    pub fn new(reg: Arc<Registry>, jobs: Arc<Cache<Job>>, pods: Arc<Cache<Pod>>) -> Self {
        JobController {
            reg,
            jobs,
            pods,
            expect: Expectations::default(),
        }
    }
}

fn unix(t: &Option<Time>) -> Option<i64> {
    t.as_ref().map(|t| t.0.as_second())
}

fn time(s: i64) -> Time {
    Time(Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The delay before a Job makes a new pod after `failures` failed ones: 10 s doubling, at
/// most 6 minutes (the Job controller's `DefaultJobPodFailureBackOff`/`MaxJobPodFailureBackOff`).
pub fn backoff_delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let secs = 10u64.saturating_mul(1u64 << (failures - 1).min(16));
    Duration::from_secs(secs.min(360))
}

/// `completedIndexes` as Kubernetes writes it: ascending, runs as `a-b`, comma separated.
pub fn format_indexes(ix: &BTreeSet<i32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = ix.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b = it.next().expect("peeked");
        }
        out.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    out.join(",")
}

/// Reads `completedIndexes` back.
pub fn parse_indexes(s: &str) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<i32>(), b.parse::<i32>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.parse() {
                    out.insert(a);
                }
            }
        }
    }
    out
}

/// What a `podFailurePolicy` says about a failed pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureVerdict {
    /// Counted towards `backoffLimit` (no rule matched, or `Count`).
    Count,
    /// Not counted.
    Ignore,
    /// The Job fails at once; the message names the container and rule.
    FailJob(String),
}

fn rule_matches(rule: &PodFailurePolicyRule, pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(req) = &rule.on_exit_codes {
        let statuses = status.container_statuses.iter().flatten();
        for cs in statuses {
            if req.container_name.as_ref().is_some_and(|n| n != &cs.name) {
                continue;
            }
            let Some(code) = cs
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| t.exit_code)
            else {
                continue;
            };
            if code == 0 {
                continue;
            }
            let inside = req.values.contains(&code);
            let hit = match req.operator.as_str() {
                "In" => inside,
                "NotIn" => !inside,
                _ => false,
            };
            if hit {
                return Some(format!(
                    "Container {} for pod {}/{} failed with exit code {} matching {} rule",
                    cs.name,
                    pod.metadata.namespace.as_deref().unwrap_or("default"),
                    pod.metadata.name.as_deref().unwrap_or(""),
                    code,
                    rule.action
                ));
            }
        }
        return None;
    }
    for p in rule.on_pod_conditions.iter().flatten() {
        let has = status.conditions.iter().flatten().any(|c| {
            c.type_ == p.type_ && c.status == p.status.clone().unwrap_or_else(|| "True".into())
        });
        if has {
            return Some(format!(
                "Pod {} has condition {} matching {} rule",
                pod.metadata.name.as_deref().unwrap_or(""),
                p.type_,
                rule.action
            ));
        }
    }
    None
}

/// The verdict of `spec.podFailurePolicy` (first matching rule) on a failed pod.
pub fn failure_verdict(spec: &JobSpec, pod: &Pod) -> FailureVerdict {
    let Some(policy) = &spec.pod_failure_policy else {
        return FailureVerdict::Count;
    };
    for rule in &policy.rules {
        if let Some(msg) = rule_matches(rule, pod) {
            return match rule.action.as_str() {
                "FailJob" => FailureVerdict::FailJob(msg),
                "Ignore" => FailureVerdict::Ignore,
                _ => FailureVerdict::Count,
            };
        }
    }
    FailureVerdict::Count
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn pod_index(p: &Pod) -> Option<i32> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(COMPLETION_INDEX))
        .and_then(|s| s.parse().ok())
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .map(|c| c.restart_count)
                .sum()
        })
        .unwrap_or(0)
}

/// When a pod finished (its containers' latest finish), for the retry delay.
fn finished_at(p: &Pod) -> Option<i64> {
    let s = p.status.as_ref()?;
    s.container_statuses
        .iter()
        .flatten()
        .filter_map(|c| {
            c.state
                .as_ref()
                .and_then(|st| st.terminated.as_ref())
                .and_then(|t| unix(&t.finished_at))
        })
        .max()
        .or_else(|| unix(&p.metadata.creation_timestamp))
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn has_condition(st: &JobStatus, ty: &str) -> bool {
    st.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == ty && c.status == "True")
}

/// Sets condition `ty` through `skiff_api::conditions`.
fn set_condition(st: &mut JobStatus, ty: &str, status: &str, reason: &str, msg: &str, now: i64) {
    let t = time(now);
    conditions::set(
        st.conditions.get_or_insert_with(Vec::new),
        JobCondition::new(ty, status, reason, msg, &t),
        &t,
    );
}

/// A Job is finished once it has a true `Complete` or `Failed` condition.
pub fn is_finished(st: &JobStatus) -> bool {
    has_condition(st, "Complete") || has_condition(st, "Failed")
}

impl JobController {
    fn delete_pods(&self, ns: Option<&str>, pods: &[&Pod], last_rev: &mut u64) {
        for p in pods {
            let name = p.metadata.name.as_deref().unwrap_or("");
            match api::delete::<Pod>(&self.reg, ns, name, &DeleteOptions::default()) {
                Ok(rev) => *last_rev = (*last_rev).max(rev),
                Err(e) if e.code == 404 => {}
                Err(e) => tracing::warn!(pod = name, error = %e, "job pod not deleted"),
            }
        }
    }

    /// A new pod of `job` (index `index` for Indexed Jobs) from its template.
    fn pod_for(job: &Job, index: Option<i32>) -> Pod {
        let template = job
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let mut pod = super::pods::from_template(job, &template);
        let name = job.metadata.name.clone().unwrap_or_default();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        labels.insert(JOB_NAME_LABEL.into(), name.clone());
        labels.insert(CONTROLLER_UID_LABEL.into(), uid.clone());
        labels.insert("job-name".into(), name.clone());
        labels.insert("controller-uid".into(), uid);
        if let Some(i) = index {
            labels.insert(COMPLETION_INDEX.into(), i.to_string());
            pod.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(COMPLETION_INDEX.into(), i.to_string());
            pod.metadata.generate_name = Some(format!("{name}-{i}-"));
            let spec = pod.spec.get_or_insert_with(Default::default);
            if spec.hostname.as_deref().unwrap_or("").is_empty() {
                spec.hostname = Some(format!("{name}-{i}"));
            }
            let env = EnvVar {
                name: "JOB_COMPLETION_INDEX".into(),
                value: Some(i.to_string()),
                ..Default::default()
            };
            let inits = spec.init_containers.iter_mut().flatten();
            for c in inits.chain(spec.containers.iter_mut()) {
                let envs = c.env.get_or_insert_with(Vec::new);
                envs.retain(|e| e.name != "JOB_COMPLETION_INDEX");
                envs.push(env.clone());
            }
        }
        pod
    }
}

impl Reconciler for JobController {
    fn name(&self) -> &'static str {
        "job"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        self.expect.settle(key, &self.pods).await;
        let Some(job) = self.jobs.get(key) else {
            self.expect.forget(key);
            return Ok(Action::AwaitChange);
        };
        if job.metadata.deletion_timestamp.is_some() {
            return Ok(Action::AwaitChange);
        }
        let (ns, name) = split_key(key);
        let spec = job.spec.clone().unwrap_or_default();
        let cur = job.status.clone().unwrap_or_default();
        let mut st = cur.clone();
        let now = now_unix();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let sel: Selector = selector(&spec.selector.clone().unwrap_or_default())?;
        let mut last_rev = 0u64;

        let no_labels = Default::default();
        let owned: Vec<Arc<Pod>> = self
            .pods
            .list(ns)
            .into_iter()
            .filter(|p| {
                p.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.controller == Some(true) && o.uid == uid)
            })
            .filter(|p| sel.matches(p.metadata.labels.as_ref().unwrap_or(&no_labels)))
            .collect();
        let deleting = |p: &Pod| p.metadata.deletion_timestamp.is_some();
        let active: Vec<&Pod> = owned
            .iter()
            .map(|p| &**p)
            .filter(|p| !deleting(p) && !matches!(phase(p), "Succeeded" | "Failed"))
            .collect();

        // A finished Job only waits for its time to live.
        if is_finished(&cur) {
            if !active.is_empty() {
                self.delete_pods(ns, &active, &mut last_rev);
            }
            if let Some(ttl) = spec.ttl_seconds_after_finished {
                let done = unix(&cur.completion_time)
                    .or_else(|| {
                        cur.conditions
                            .iter()
                            .flatten()
                            .filter(|c| {
                                (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                            })
                            .filter_map(|c| unix(&c.last_transition_time))
                            .max()
                    })
                    .unwrap_or(now);
                let at = done + i64::from(ttl);
                if at <= now {
                    let o = DeleteOptions {
                        propagation: Some("Background".into()),
                        precondition_uid: Some(uid.clone()),
                        ..Default::default()
                    };
                    match api::delete::<Job>(&self.reg, ns, name, &o) {
                        Ok(_) => {}
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                    return Ok(Action::AwaitChange);
                }
                return Ok(Action::RequeueAfter(Duration::from_secs((at - now) as u64)));
            }
            return Ok(Action::AwaitChange);
        }

        let indexed = spec.completion_mode.as_deref() == Some("Indexed");
        let completions = spec.completions;
        let parallelism = spec.parallelism.unwrap_or(1).max(0);
        let backoff_limit = spec.backoff_limit.unwrap_or(6);
        let on_failure = spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            == Some("OnFailure");

        // Count what finished.
        let mut succeeded_idx: BTreeSet<i32> = cur
            .completed_indexes
            .as_deref()
            .map(parse_indexes)
            .unwrap_or_default();
        let mut succeeded_pods = 0i32;
        let mut failed_pods = 0i32;
        let mut last_failure: Option<i64> = None;
        let mut fail_job: Option<String> = None;
        for p in &owned {
            match phase(p) {
                "Succeeded" => {
                    succeeded_pods += 1;
                    if let Some(i) = pod_index(p) {
                        if completions.is_some_and(|c| i < c) {
                            succeeded_idx.insert(i);
                        }
                    }
                }
                "Failed" => match failure_verdict(&spec, p) {
                    FailureVerdict::Ignore => {}
                    FailureVerdict::Count => {
                        failed_pods += 1;
                        last_failure = last_failure.max(finished_at(p));
                    }
                    FailureVerdict::FailJob(m) => {
                        failed_pods += 1;
                        fail_job.get_or_insert(m);
                    }
                },
                _ => {}
            }
        }
        let succeeded = if indexed {
            succeeded_idx.len() as i32
        } else {
            succeeded_pods.max(cur.succeeded.unwrap_or(0))
        };
        let failed = failed_pods.max(cur.failed.unwrap_or(0));
        // With OnFailure a pod's restarts are its failures.
        let restarts_total: i32 = if on_failure {
            active.iter().map(|p| restarts(p)).sum()
        } else {
            0
        };
        st.succeeded = Some(succeeded);
        st.failed = Some(failed);
        if indexed {
            st.completed_indexes = Some(format_indexes(&succeeded_idx));
        }

        let suspended = spec.suspend.unwrap_or(false);
        let mut requeue: Option<Duration> = None;
        let mut finish: Option<(&str, String, String)> = None; // (type, reason, message)
        if let Some(m) = fail_job {
            finish = Some(("Failed", "PodFailurePolicy".into(), m));
        } else if failed + restarts_total > backoff_limit {
            finish = Some((
                "Failed",
                "BackoffLimitExceeded".into(),
                "Job has reached the specified backoff limit".into(),
            ));
        } else if let (Some(ads), Some(start), false) = (
            spec.active_deadline_seconds,
            unix(&cur.start_time),
            suspended,
        ) {
            if start + ads <= now {
                finish = Some((
                    "Failed",
                    "DeadlineExceeded".into(),
                    "Job was active longer than specified deadline".into(),
                ));
            } else {
                requeue = Some(Duration::from_secs((start + ads - now) as u64));
            }
        }
        let complete = match completions {
            Some(c) => succeeded >= c,
            // A work queue Job: done once one pod succeeded and none is left running.
            None => succeeded > 0 && active.is_empty(),
        };
        if finish.is_none() && complete {
            finish = Some(("Complete", String::new(), String::new()));
        }

        let mut result = Ok(());
        if let Some((ty, reason, msg)) = &finish {
            self.delete_pods(ns, &active, &mut last_rev);
            if *ty == "Failed" {
                set_condition(&mut st, "FailureTarget", "True", reason, msg, now);
                set_condition(&mut st, "Failed", "True", reason, msg, now);
                super::events::record(&self.reg, &*job, "Warning", reason, msg, "job-controller");
            } else {
                set_condition(
                    &mut st,
                    "SuccessCriteriaMet",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                    now,
                );
                set_condition(
                    &mut st,
                    "Complete",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                    now,
                );
                st.completion_time = Some(time(now));
                super::events::record(
                    &self.reg,
                    &*job,
                    "Normal",
                    "Completed",
                    "Job completed",
                    "job-controller",
                );
            }
            st.active = Some(0);
            st.ready = Some(0);
            if let Some(ttl) = spec.ttl_seconds_after_finished {
                requeue = Some(Duration::from_secs(ttl.max(0) as u64));
            } else {
                requeue = None;
            }
        } else if suspended {
            self.delete_pods(ns, &active, &mut last_rev);
            if !has_condition(&cur, "Suspended") {
                set_condition(
                    &mut st,
                    "Suspended",
                    "True",
                    "JobSuspended",
                    "Job suspended",
                    now,
                );
                super::events::record(
                    &self.reg,
                    &*job,
                    "Normal",
                    "Suspended",
                    "Job suspended",
                    "job-controller",
                );
            }
            st.active = Some(0);
            st.ready = Some(0);
            requeue = None;
        } else {
            if has_condition(&cur, "Suspended") {
                set_condition(
                    &mut st,
                    "Suspended",
                    "False",
                    "JobResumed",
                    "Job resumed",
                    now,
                );
                // The deadline counts from the resume, as Kubernetes resets startTime.
                st.start_time = Some(time(now));
                super::events::record(
                    &self.reg,
                    &*job,
                    "Normal",
                    "Resumed",
                    "Job resumed",
                    "job-controller",
                );
                if let Some(ads) = spec.active_deadline_seconds {
                    requeue = Some(Duration::from_secs(ads.max(0) as u64));
                }
            } else if st.start_time.is_none() {
                st.start_time = Some(time(now));
                if let Some(ads) = spec.active_deadline_seconds {
                    requeue = Some(Duration::from_secs(ads.max(0) as u64));
                }
            }
            // New pods wait out the failure backoff.
            let delay = backoff_delay((failed + restarts_total) as u32);
            let wait = last_failure
                .map(|t| t + delay.as_secs() as i64 - now)
                .filter(|w| *w > 0 && !on_failure);
            let mut to_make: Vec<Option<i32>> = Vec::new();
            if let Some(w) = wait {
                let d = Duration::from_secs(w as u64);
                requeue = Some(requeue.map_or(d, |r| r.min(d)));
            } else {
                let room = (parallelism as usize).saturating_sub(active.len());
                if indexed {
                    let running: BTreeSet<i32> =
                        active.iter().filter_map(|p| pod_index(p)).collect();
                    to_make = (0..completions.unwrap_or(0))
                        .filter(|i| !succeeded_idx.contains(i) && !running.contains(i))
                        .take(room)
                        .map(Some)
                        .collect();
                } else {
                    let left = match completions {
                        Some(c) => (c - succeeded).max(0) as usize,
                        // A work queue Job makes pods only until one succeeds.
                        None if succeeded > 0 => 0,
                        None => parallelism as usize,
                    };
                    let n = left.saturating_sub(active.len()).min(room);
                    to_make = vec![None; n];
                }
            }
            // Extra pods (parallelism lowered): the newest go.
            if active.len() > parallelism as usize {
                let mut extra: Vec<&Pod> = active.clone();
                extra.sort_by_key(|p| std::cmp::Reverse(unix(&p.metadata.creation_timestamp)));
                let n = active.len() - parallelism as usize;
                self.delete_pods(ns, &extra[..n], &mut last_rev);
            }
            for index in to_make.into_iter().take(BURST) {
                let pod = Self::pod_for(&job, index);
                match api::create(&self.reg, ns, &pod) {
                    Ok(p) => last_rev = last_rev.max(api::revision(&p.metadata)),
                    Err(e) => {
                        super::events::record(
                            &self.reg,
                            &*job,
                            "Warning",
                            "FailedCreate",
                            &format!("Error creating: {}", e.message),
                            "job-controller",
                        );
                        result = Err(e);
                        break;
                    }
                }
            }
            st.active = Some(active.len() as i32);
            st.ready = Some(active.iter().filter(|p| is_ready(p)).count() as i32);
        }
        self.expect.wrote(key, last_rev);
        result?;
        if st != cur {
            api::update_status(&self.reg, &*job, &st)?;
        }
        Ok(requeue.map_or(Action::AwaitChange, Action::RequeueAfter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn backoff_doubles_from_ten_seconds_to_six_minutes() {
        assert_eq!(backoff_delay(0), Duration::ZERO);
        assert_eq!(backoff_delay(1), Duration::from_secs(10));
        assert_eq!(backoff_delay(2), Duration::from_secs(20));
        assert_eq!(backoff_delay(6), Duration::from_secs(320));
        assert_eq!(backoff_delay(7), Duration::from_secs(360));
        assert_eq!(backoff_delay(60), Duration::from_secs(360));
    }

    #[test]
    fn completed_indexes_round_trip() {
        let ix: BTreeSet<i32> = [0, 1, 2, 4, 6, 7].into_iter().collect();
        assert_eq!(format_indexes(&ix), "0-2,4,6-7");
        assert_eq!(parse_indexes("0-2,4,6-7"), ix);
        assert_eq!(format_indexes(&BTreeSet::new()), "");
    }

    fn failed_pod(code: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code}}
            }]}
        }))
        .unwrap()
    }

    #[test]
    fn pod_failure_policy_first_matching_rule_wins() {
        let spec: JobSpec = serde_json::from_value(json!({
            "template": {},
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [3]}},
                {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
                {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [42]}}
            ]}
        }))
        .unwrap();
        assert_eq!(
            failure_verdict(&spec, &failed_pod(3)),
            FailureVerdict::Ignore
        );
        assert!(matches!(
            failure_verdict(&spec, &failed_pod(42)),
            FailureVerdict::FailJob(m) if m.contains("exit code 42")
        ));
        assert_eq!(
            failure_verdict(&spec, &failed_pod(1)),
            FailureVerdict::Count
        );
        let plain = JobSpec::default();
        assert_eq!(
            failure_verdict(&plain, &failed_pod(42)),
            FailureVerdict::Count
        );
    }

    mod controller {
        use super::super::*;
        use crate::registry::{ClusterConfig, WriteOptions};
        use crate::store::sqlite::SqliteStore;
        use k8s_openapi::api::core::v1::PodStatus;
        use serde_json::{json, Value};
        use skiff_api::{meta, Resource};
        use tokio::sync::watch;

        fn res(p: &str) -> &'static Resource {
            Resource::lookup(p).unwrap()
        }

        struct World {
            reg: Arc<Registry>,
            c: JobController,
            _stop: watch::Sender<bool>,
            _dir: tempfile::TempDir,
        }

        async fn world() -> World {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
            let reg = Registry::new(store, ClusterConfig::default());
            let opts = WriteOptions::default();
            reg.create(
                res("namespaces"),
                None,
                json!({"metadata": {"name": "default"}}),
                &opts,
            )
            .unwrap();
            let (stop, rx) = watch::channel(false);
            let jobs = Cache::<Job>::new();
            let pods = Cache::<Pod>::new();
            tokio::spawn(jobs.clone().run(reg.clone(), rx.clone()));
            tokio::spawn(pods.clone().run(reg.clone(), rx));
            let c = JobController::new(reg.clone(), jobs, pods);
            World {
                reg,
                c,
                _stop: stop,
                _dir: dir,
            }
        }

        impl World {
            /// Creates Job `name`; `spec` is merged over a one-container template.
            async fn job(&self, name: &str, spec: Value, restart: &str) {
                let base = json!({"metadata": {"name": name, "namespace": "default"},
                    "spec": {"template": {"spec": {"restartPolicy": restart,
                        "containers": [{"name": "c", "image": "x"}]}}}});
                let j = skiff_api::patch::strategic_merge(&base, &json!({ "spec": spec }));
                let o = self
                    .reg
                    .create(res("jobs"), Some("default"), j, &WriteOptions::default())
                    .unwrap();
                self.c
                    .jobs
                    .wait_for(meta::resource_version(&o).unwrap())
                    .await;
            }

            async fn reconcile(&self, name: &str) -> Action {
                let key = format!("default/{name}");
                let a = self.c.reconcile(&key).await.unwrap();
                let rev = self.c.expect.get(&key);
                if let Some(rev) = rev {
                    self.c.pods.wait_for(rev).await;
                }
                let j = self.reg.get(res("jobs"), Some("default"), name).unwrap();
                self.c
                    .jobs
                    .wait_for(meta::resource_version(&j).unwrap())
                    .await;
                a
            }

            fn status(&self, name: &str) -> JobStatus {
                let j: Job = serde_json::from_value(
                    self.reg.get(res("jobs"), Some("default"), name).unwrap(),
                )
                .unwrap();
                j.status.unwrap_or_default()
            }

            fn pods(&self) -> Vec<Arc<Pod>> {
                self.c
                    .pods
                    .list(Some("default"))
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect()
            }

            /// Sets a pod's status as its node would.
            async fn set_status(&self, pod: &Pod, status: Value) {
                let name = pod.metadata.name.as_deref().unwrap();
                let p: Pod = api::get(&self.reg, Some("default"), name).unwrap().unwrap();
                let status: PodStatus = serde_json::from_value(status).unwrap();
                let o = api::update_status(&self.reg, &p, &status).unwrap();
                self.c.pods.wait_for(api::revision(&o.metadata)).await;
            }
        }

        fn index_of(p: &Pod) -> String {
            p.metadata.annotations.as_ref().unwrap()[COMPLETION_INDEX].clone()
        }

        fn phase(p: &Pod) -> &str {
            p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .unwrap_or("")
        }

        fn job_name(p: &Pod) -> &str {
            p.metadata.labels.as_ref().unwrap()["job-name"].as_str()
        }

        fn finished(phase: &str, code: i32) -> Value {
            json!({"phase": phase, "containerStatuses": [{"name": "c", "image": "x", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "finishedAt": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}}}]})
        }

        #[tokio::test]
        async fn indexed_pods_carry_their_index_and_each_index_runs_once() {
            let w = world().await;
            w.job(
                "idx",
                json!({"completions": 3, "parallelism": 2, "completionMode": "Indexed"}),
                "Never",
            )
            .await;
            w.reconcile("idx").await;
            let pods = w.pods();
            assert_eq!(pods.len(), 2, "parallelism 2");
            let mut ix: Vec<String> = Vec::new();
            for p in &pods {
                let i = index_of(p);
                let labels = p.metadata.labels.as_ref().unwrap();
                assert_eq!(labels[COMPLETION_INDEX], i);
                assert_eq!(labels[JOB_NAME_LABEL], "idx");
                let spec = p.spec.as_ref().unwrap();
                assert_eq!(spec.hostname.as_deref(), Some(&*format!("idx-{i}")));
                let env = &spec.containers[0].env.as_ref().unwrap()[0];
                assert_eq!(
                    (env.name.as_str(), env.value.as_deref()),
                    ("JOB_COMPLETION_INDEX", Some(&*i))
                );
                let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
                assert_eq!(owner.api_version, "batch/v1");
                ix.push(i);
            }
            ix.sort();
            assert_eq!(ix, ["0", "1"]);
            // Index 1 succeeds: index 2 starts, and 1 is never run again.
            let one = pods.iter().find(|p| index_of(p) == "1").unwrap();
            w.set_status(one, finished("Succeeded", 0)).await;
            w.reconcile("idx").await;
            let st = w.status("idx");
            assert_eq!(st.completed_indexes.as_deref(), Some("1"));
            assert_eq!(st.active, Some(1));
            let mut running: Vec<String> = w
                .pods()
                .iter()
                .filter(|p| phase(p) != "Succeeded")
                .map(|p| index_of(p))
                .collect();
            running.sort();
            assert_eq!(running, ["0", "2"]);
        }

        #[tokio::test]
        async fn a_failure_waits_out_the_backoff_and_on_failure_restarts_count() {
            let w = world().await;
            w.job("never", json!({"backoffLimit": 3}), "Never").await;
            w.reconcile("never").await;
            let p = w.pods()[0].clone();
            w.set_status(&p, finished("Failed", 1)).await;
            let a = w.reconcile("never").await;
            assert_eq!(w.status("never").failed, Some(1));
            assert_eq!(w.pods().len(), 1, "no new pod before the 10 s delay");
            assert!(
                matches!(a, Action::RequeueAfter(d) if d > Duration::from_secs(7) && d <= Duration::from_secs(10)),
                "{a:?}"
            );

            // OnFailure: the node restarts the container; restarts past backoffLimit fail the Job.
            w.job("onfail", json!({"backoffLimit": 1}), "OnFailure")
                .await;
            w.reconcile("onfail").await;
            let p = w
                .pods()
                .into_iter()
                .find(|p| job_name(p) == "onfail")
                .unwrap();
            let running = |restarts: i32| {
                json!({"phase": "Running", "containerStatuses": [{"name": "c", "image": "x",
                "imageID": "", "ready": false, "restartCount": restarts, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]})
            };
            w.set_status(&p, running(1)).await;
            w.reconcile("onfail").await;
            assert!(
                !is_finished(&w.status("onfail")),
                "one restart is within backoffLimit 1"
            );
            w.set_status(&p, running(2)).await;
            w.reconcile("onfail").await;
            let st = w.status("onfail");
            let failed = st
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Failed")
                .unwrap();
            assert_eq!(failed.reason.as_deref(), Some("BackoffLimitExceeded"));
            assert!(st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "FailureTarget"));
            assert!(
                !w.pods().iter().any(|p| job_name(p) == "onfail"),
                "the restarting pod is deleted"
            );
        }

        #[tokio::test]
        async fn ignored_failures_do_not_count_and_fail_job_fails_at_once() {
            let w = world().await;
            let policy = json!({"rules": [
                {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [137]}},
                {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]});
            w.job(
                "pfp",
                json!({"backoffLimit": 0, "podFailurePolicy": policy}),
                "Never",
            )
            .await;
            w.reconcile("pfp").await;
            let p = w.pods()[0].clone();
            w.set_status(&p, finished("Failed", 137)).await;
            w.reconcile("pfp").await;
            let st = w.status("pfp");
            assert!(
                !is_finished(&st),
                "an ignored failure does not count: {st:?}"
            );
            assert_eq!(st.failed, Some(0));
            let fresh = w
                .pods()
                .into_iter()
                .find(|q| phase(q) != "Failed")
                .expect("a replacement pod at once");
            w.set_status(&fresh, finished("Failed", 42)).await;
            w.reconcile("pfp").await;
            let st = w.status("pfp");
            let failed = st
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Failed")
                .unwrap();
            assert_eq!(failed.reason.as_deref(), Some("PodFailurePolicy"));
        }
    }
}
