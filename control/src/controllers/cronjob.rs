//! The CronJob controller: at each scheduled time (5-field cron or `@hourly`-style macros,
//! in `spec.timeZone` or UTC) it makes a Job named `CRONJOB-<scheduled unix minutes>`, keeping
//! `concurrencyPolicy` (Allow, Forbid, Replace), `startingDeadlineSeconds` and `suspend`,
//! and prunes finished Jobs to the history limits. It wakes for the next scheduled time
//! rather than polling.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use k8s_openapi::api::batch::v1::{CronJob, CronJobStatus, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use skiff_api::ApiError;

use super::api;
use super::job::is_finished;
use super::runtime::{split_key, Action, Cache, Expectations, Reconciler};
use crate::registry::{DeleteOptions, Registry};

/// The annotation a CronJob's Job carries: the time it was scheduled for (RFC 3339).
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

/// More missed start times than this and the CronJob starts nothing (an event says why).
pub const MAX_MISSED: usize = 100;

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

/// Why a schedule cannot be used (validation keeps these out of the store).
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    pub field: String,
    pub message: String,
}

impl Schedule {
    /// Parses a schedule as the API validates it ([`skiff_api::validation::cron_schedule`]).
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<Schedule, ScheduleError> {
        let (cron, tz) =
            skiff_api::validation::cron_schedule(expr, tz).map_err(|c| ScheduleError {
                field: c.field,
                message: c.message,
            })?;
        Ok(Schedule { cron, tz })
    }

    /// The first scheduled time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = self.tz.from_utc_datetime(&t.naive_utc());
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The scheduled times in `(earliest, now]`: the most recent and how many there were,
    /// counting at most `MAX_MISSED + 1` (past that, which is the most recent no longer
    /// matters: nothing starts).
    pub fn missed(
        &self,
        earliest: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> (Option<DateTime<Utc>>, usize) {
        let mut last = None;
        let mut n = 0;
        let mut t = earliest;
        while let Some(next) = self.next_after(t) {
            if next > now {
                break;
            }
            n += 1;
            last = Some(next);
            t = next;
            if n > MAX_MISSED {
                break;
            }
        }
        (last, n)
    }
}

/// What to do at `now` for a CronJob last scheduled at (or created at) `earliest`, with
/// `startingDeadlineSeconds` `deadline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Nothing due.
    Nothing,
    /// Start the Job of this scheduled time.
    Start(DateTime<Utc>),
    /// More than `MAX_MISSED` times were missed.
    TooManyMissed(usize),
}

/// Decides what is due (the rules of Kubernetes' CronJob controller): with a starting
/// deadline only the times within it are looked at, so a time missed by more is skipped.
pub fn due(
    s: &Schedule,
    earliest: DateTime<Utc>,
    deadline: Option<i64>,
    now: DateTime<Utc>,
) -> Due {
    let mut from = earliest;
    if let Some(d) = deadline {
        let limit = now - chrono::Duration::seconds(d);
        if limit > from {
            from = limit;
        }
    }
    let (last, n) = s.missed(from, now);
    if n > MAX_MISSED {
        return Due::TooManyMissed(n);
    }
    match last {
        None => Due::Nothing,
        Some(t) => Due::Start(t),
    }
}

/// The name of the Job for scheduled time `t`: `NAME-<unix minutes>`.
pub fn job_name(cronjob: &str, t: DateTime<Utc>) -> String {
    format!("{cronjob}-{}", t.timestamp() / 60)
}

pub struct CronJobController {
    pub reg: Arc<Registry>,
    pub cronjobs: Arc<Cache<CronJob>>,
    pub jobs: Arc<Cache<Job>>,
    expect: Expectations,
}

impl CronJobController {
    pub fn new(reg: Arc<Registry>, cronjobs: Arc<Cache<CronJob>>, jobs: Arc<Cache<Job>>) -> Self {
        CronJobController {
            reg,
            cronjobs,
            jobs,
            expect: Expectations::default(),
        }
    }
}

fn to_chrono(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0.as_second(), 0).unwrap_or_default()
}

fn to_time(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn job_ref(j: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: j.metadata.name.clone(),
        namespace: j.metadata.namespace.clone(),
        uid: j.metadata.uid.clone(),
        resource_version: j.metadata.resource_version.clone(),
        ..Default::default()
    }
}

fn failed(j: &Job) -> bool {
    j.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
}

/// A Job for `cj` scheduled at `t`, from its job template.
pub fn job_from_template(cj: &CronJob, t: DateTime<Utc>) -> Job {
    let name = cj.metadata.name.as_deref().unwrap_or("");
    let tmpl = &cj.spec.job_template;
    let tm = tmpl.metadata.as_ref();
    let mut annotations = tm.and_then(|m| m.annotations.clone()).unwrap_or_default();
    annotations.insert(
        SCHEDULED_TIMESTAMP.into(),
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(name, t)),
            namespace: cj.metadata.namespace.clone(),
            labels: Some(tm.and_then(|m| m.labels.clone()).unwrap_or_default()),
            annotations: Some(annotations),
            owner_references: Some(vec![super::pods::controller_ref(cj)]),
            ..Default::default()
        },
        spec: Some(tmpl.spec.clone().unwrap_or_default()),
        status: None,
    }
}

impl Reconciler for CronJobController {
    fn name(&self) -> &'static str {
        "cronjob"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        self.expect.settle(key, &self.jobs).await;
        let Some(cj) = self.cronjobs.get(key) else {
            self.expect.forget(key);
            return Ok(Action::AwaitChange);
        };
        if cj.metadata.deletion_timestamp.is_some() {
            return Ok(Action::AwaitChange);
        }
        let (ns, name) = split_key(key);
        let spec = cj.spec.clone();
        let cur = cj.status.clone().unwrap_or_default();
        let mut st: CronJobStatus = cur.clone();
        let uid = cj.metadata.uid.clone().unwrap_or_default();
        let now = Utc::now();
        let mut last_rev = 0u64;

        let owned: Vec<Arc<Job>> = self
            .jobs
            .list(ns)
            .into_iter()
            .filter(|j| {
                j.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.controller == Some(true) && o.uid == uid)
            })
            .collect();
        let mut active: Vec<&Job> = Vec::new();
        let mut done_ok: Vec<&Job> = Vec::new();
        let mut done_bad: Vec<&Job> = Vec::new();
        for j in &owned {
            let jst = j.status.clone().unwrap_or_default();
            if j.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if !is_finished(&jst) {
                active.push(j);
            } else if failed(j) {
                done_bad.push(j);
            } else {
                done_ok.push(j);
                if let Some(ct) = &jst.completion_time {
                    if unix_of(&st.last_successful_time) < Some(ct.0.as_second()) {
                        st.last_successful_time = Some(ct.clone());
                    }
                }
            }
        }
        let mut refs: Vec<ObjectReference> = active.iter().map(|j| job_ref(j)).collect();
        refs.sort_by(|a, b| a.name.cmp(&b.name));

        // History: the oldest finished Jobs beyond the limits go.
        let prune = |list: &mut Vec<&Job>, keep: i32, last_rev: &mut u64| {
            list.sort_by_key(|j| {
                j.status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .map(|t| t.0.as_second())
                    .or_else(|| {
                        j.metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.as_second())
                    })
            });
            let extra = list.len().saturating_sub(keep.max(0) as usize);
            for j in list.iter().take(extra) {
                let o = DeleteOptions {
                    propagation: Some("Background".into()),
                    ..Default::default()
                };
                let jn = j.metadata.name.as_deref().unwrap_or("");
                match api::delete::<Job>(&self.reg, ns, jn, &o) {
                    Ok(rev) => *last_rev = (*last_rev).max(rev),
                    Err(e) if e.code == 404 => {}
                    Err(e) => tracing::warn!(job = jn, error = %e, "old job not deleted"),
                }
            }
        };
        prune(
            &mut done_ok,
            spec.successful_jobs_history_limit.unwrap_or(3),
            &mut last_rev,
        );
        prune(
            &mut done_bad,
            spec.failed_jobs_history_limit.unwrap_or(1),
            &mut last_rev,
        );

        let sched = match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => {
                super::events::record(
                    &self.reg,
                    &*cj,
                    "Warning",
                    "UnparseableSchedule",
                    &e.to_string(),
                    "cronjob-controller",
                );
                None
            }
        };
        let mut requeue = None;
        if let (Some(sched), false) = (&sched, spec.suspend.unwrap_or(false)) {
            let earliest = cur
                .last_schedule_time
                .as_ref()
                .map(to_chrono)
                .or_else(|| cj.metadata.creation_timestamp.as_ref().map(to_chrono))
                .unwrap_or(now);
            match due(sched, earliest, spec.starting_deadline_seconds, now) {
                Due::Nothing => {}
                Due::TooManyMissed(n) => {
                    super::events::record(&self.reg, &*cj, "Warning", "TooManyMissedTimes", &format!("too many missed start times: {n}. Set or decrease .spec.startingDeadlineSeconds or check clock skew"), "cronjob-controller");
                }
                Due::Start(t) => {
                    let jn = job_name(name, t);
                    let exists = owned
                        .iter()
                        .any(|j| j.metadata.name.as_deref() == Some(jn.as_str()));
                    let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
                    if exists {
                        // Already made (its status may lag): nothing to do for this time.
                    } else if policy == "Forbid" && !active.is_empty() {
                        super::events::record(&self.reg, &*cj, "Normal", "JobAlreadyActive", "Not starting job because prior execution is running and concurrency policy is Forbid", "cronjob-controller");
                        // Looked at again when the running Job finishes (a Job change
                        // wakes this key), or at the next time.
                    } else {
                        if policy == "Replace" {
                            for j in &active {
                                let o = DeleteOptions {
                                    propagation: Some("Background".into()),
                                    ..Default::default()
                                };
                                let jn = j.metadata.name.as_deref().unwrap_or("");
                                match api::delete::<Job>(&self.reg, ns, jn, &o) {
                                    Ok(rev) => last_rev = last_rev.max(rev),
                                    Err(e) if e.code == 404 => {}
                                    Err(e) => return Err(e),
                                }
                                super::events::record(
                                    &self.reg,
                                    &*cj,
                                    "Normal",
                                    "SuccessfulDelete",
                                    &format!("Deleted job {jn}"),
                                    "cronjob-controller",
                                );
                            }
                            refs.clear();
                        }
                        match api::create(&self.reg, ns, &job_from_template(&cj, t)) {
                            Ok(job) => {
                                last_rev = last_rev.max(api::revision(&job.metadata));
                                refs.push(job_ref(&job));
                                st.last_schedule_time = Some(to_time(t));
                                super::events::record(
                                    &self.reg,
                                    &*cj,
                                    "Normal",
                                    "SuccessfulCreate",
                                    &format!("Created job {jn}"),
                                    "cronjob-controller",
                                );
                            }
                            Err(e) if e.code == 409 => {
                                st.last_schedule_time = Some(to_time(t));
                            }
                            Err(e) => {
                                super::events::record(
                                    &self.reg,
                                    &*cj,
                                    "Warning",
                                    "FailedCreate",
                                    &format!("Error creating job: {}", e.message),
                                    "cronjob-controller",
                                );
                                return Err(e);
                            }
                        }
                    }
                }
            }
            if let Some(next) = sched.next_after(now) {
                // A little past the minute, so the time is due when we look.
                let d = (next - now).to_std().unwrap_or_default() + Duration::from_millis(100);
                requeue = Some(d);
            }
        }
        st.active = if refs.is_empty() { None } else { Some(refs) };
        self.expect.wrote(key, last_rev);
        let norm = |s: &CronJobStatus| {
            let mut s = s.clone();
            for r in s.active.iter_mut().flatten() {
                r.resource_version = None;
            }
            if s.active.as_ref().is_some_and(|a| a.is_empty()) {
                s.active = None;
            }
            s
        };
        if norm(&st) != norm(&cur) {
            api::update_status(&self.reg, &*cj, &st)?;
        }
        Ok(requeue.map_or(Action::AwaitChange, Action::RequeueAfter))
    }
}

fn unix_of(t: &Option<Time>) -> Option<i64> {
    t.as_ref().map(|t| t.0.as_second())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_fields_and_macros_parse_six_do_not() {
        for e in [
            "*/1 * * * *",
            "0 3 * * 1-5",
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
        ] {
            assert!(Schedule::parse(e, None).is_ok(), "{e}");
        }
        assert!(Schedule::parse("0 */1 * * * *", None).is_err());
        assert!(Schedule::parse("not a schedule", None).is_err());
        assert!(Schedule::parse("@every 5m", None).is_err());
        let e = Schedule::parse("* * * * *", Some("Mars/Olympus")).unwrap_err();
        assert_eq!(e.field, "spec.timeZone");
    }

    #[test]
    fn next_times_and_macros() {
        let s = Schedule::parse("*/15 * * * *", None).unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T10:07:30Z")),
            Some(at("2026-01-01T10:15:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-01-01T10:15:00Z")),
            Some(at("2026-01-01T10:30:00Z"))
        );
        let h = Schedule::parse("@hourly", None).unwrap();
        assert_eq!(
            h.next_after(at("2026-01-01T10:07:00Z")),
            Some(at("2026-01-01T11:00:00Z"))
        );
        let d = Schedule::parse("@daily", None).unwrap();
        assert_eq!(
            d.next_after(at("2026-01-01T10:07:00Z")),
            Some(at("2026-01-02T00:00:00Z"))
        );
    }

    #[test]
    fn time_zones_shift_the_schedule() {
        // 09:00 in New York is 14:00 UTC in winter and 13:00 UTC in summer.
        let s = Schedule::parse("0 9 * * *", Some("America/New_York")).unwrap();
        assert_eq!(
            s.next_after(at("2026-01-15T00:00:00Z")),
            Some(at("2026-01-15T14:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-07-15T00:00:00Z")),
            Some(at("2026-07-15T13:00:00Z"))
        );
        let t = Schedule::parse("0 9 * * *", Some("Asia/Tokyo")).unwrap();
        assert_eq!(
            t.next_after(at("2026-01-15T00:00:00Z")),
            Some(at("2026-01-16T00:00:00Z"))
        );
    }

    #[test]
    fn missed_times_deadlines_and_the_hundred_rule() {
        let s = Schedule::parse("*/1 * * * *", None).unwrap();
        let created = at("2026-01-01T10:00:30Z");
        // Nothing due before the first minute.
        assert_eq!(
            due(&s, created, None, at("2026-01-01T10:00:59Z")),
            Due::Nothing
        );
        // Three missed: the most recent starts.
        assert_eq!(
            due(&s, created, None, at("2026-01-01T10:03:10Z")),
            Due::Start(at("2026-01-01T10:03:00Z"))
        );
        // Within a 30 s deadline: start; past it: too late.
        assert_eq!(
            due(&s, created, Some(30), at("2026-01-01T10:03:10Z")),
            Due::Start(at("2026-01-01T10:03:00Z"))
        );
        assert_eq!(
            due(&s, created, Some(5), at("2026-01-01T10:03:10Z")),
            Due::Nothing
        );
        // A time older than the deadline is never started.
        assert_eq!(
            due(&s, created, Some(40), at("2026-01-01T10:03:50Z")),
            Due::Nothing
        );
        // Over 100 missed without a deadline: nothing starts.
        assert!(matches!(
            due(&s, created, None, at("2026-01-01T12:00:10Z")),
            Due::TooManyMissed(n) if n > MAX_MISSED
        ));
        // A deadline bounds how far back to look, so the same gap is fine with one.
        assert_eq!(
            due(&s, created, Some(200), at("2026-01-01T12:00:10Z")),
            Due::Start(at("2026-01-01T12:00:00Z"))
        );
    }

    #[test]
    fn job_names_use_scheduled_unix_minutes() {
        assert_eq!(
            job_name("hello", at("2026-01-01T10:03:00Z")),
            format!("hello-{}", at("2026-01-01T10:03:00Z").timestamp() / 60)
        );
        let cj: CronJob = serde_json::from_value(json!({"metadata": {"name": "hello", "namespace": "ns", "uid": "u1"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"metadata": {"labels": {"a": "b"}}, "spec": {"template": {}}}}})).unwrap();
        let j = job_from_template(&cj, at("2026-01-01T10:03:00Z")).metadata;
        assert_eq!(
            j.annotations.unwrap()[SCHEDULED_TIMESTAMP],
            "2026-01-01T10:03:00Z"
        );
        assert_eq!(j.owner_references.unwrap()[0].kind, "CronJob");
        assert_eq!(j.labels.unwrap()["a"], "b");
    }

    mod controller {
        use super::super::*;
        use crate::registry::{ClusterConfig, WriteOptions};
        use crate::store::sqlite::SqliteStore;
        use k8s_openapi::api::batch::v1::JobStatus;
        use serde_json::{json, Value};
        use skiff_api::{meta, Resource};
        use tokio::sync::watch;

        fn res(p: &str) -> &'static Resource {
            Resource::lookup(p).unwrap()
        }

        struct World {
            reg: Arc<Registry>,
            c: CronJobController,
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
            let cronjobs = Cache::<CronJob>::new();
            let jobs = Cache::<Job>::new();
            tokio::spawn(cronjobs.clone().run(reg.clone(), rx.clone()));
            tokio::spawn(jobs.clone().run(reg.clone(), rx));
            let c = CronJobController::new(reg.clone(), cronjobs, jobs);
            World {
                reg,
                c,
                _stop: stop,
                _dir: dir,
            }
        }

        impl World {
            /// Creates CronJob `name` (`extra` merged over its spec) as last scheduled `ago`
            /// seconds before now.
            async fn cronjob(&self, name: &str, extra: Value, ago: i64) {
                let base = json!({"metadata": {"name": name, "namespace": "default"},
                    "spec": {"schedule": "*/1 * * * *", "jobTemplate": {"spec": {"template": {"spec": {
                        "restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}}});
                let cj = skiff_api::patch::strategic_merge(&base, &json!({ "spec": extra }));
                let cj: CronJob =
                    api::create(&self.reg, Some("default"), &api::decode(cj).unwrap()).unwrap();
                let last = (Utc::now() - chrono::Duration::seconds(ago))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let status: CronJobStatus =
                    serde_json::from_value(json!({ "lastScheduleTime": last })).unwrap();
                let o = api::update_status(&self.reg, &cj, &status).unwrap();
                self.c.cronjobs.wait_for(api::revision(&o.metadata)).await;
            }

            async fn reconcile(&self, name: &str) {
                let key = format!("default/{name}");
                self.c.reconcile(&key).await.unwrap();
                // The caches catch up with what the reconcile wrote.
                let jobs_rev = self.c.expect.get(&key);
                if let Some(rev) = jobs_rev {
                    self.c.jobs.wait_for(rev).await;
                }
                let cj = self
                    .reg
                    .get(res("cronjobs"), Some("default"), name)
                    .unwrap();
                self.c
                    .cronjobs
                    .wait_for(meta::resource_version(&cj).unwrap())
                    .await;
            }

            fn jobs(&self) -> Vec<Job> {
                self.c
                    .jobs
                    .list_raw(Some("default"))
                    .iter()
                    .filter(|j| !meta::is_deleting(j))
                    .map(|j| serde_json::from_value((**j).clone()).unwrap())
                    .collect()
            }

            async fn create_job(&self, j: &Job) {
                let o = api::create(&self.reg, Some("default"), j).unwrap();
                self.c.jobs.wait_for(api::revision(&o.metadata)).await;
            }

            /// Marks Job `name` finished (`Complete` or `Failed`).
            async fn finish(&self, name: &str, ty: &str, started: DateTime<Utc>) {
                let j: Job = api::get(&self.reg, Some("default"), name).unwrap().unwrap();
                let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let started = started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let status: JobStatus =
                    serde_json::from_value(json!({"startTime": started, "completionTime": now,
                    "conditions": [{"type": ty, "status": "True"}]}))
                    .unwrap();
                let o = api::update_status(&self.reg, &j, &status).unwrap();
                self.c.jobs.wait_for(api::revision(&o.metadata)).await;
            }
        }

        #[tokio::test]
        async fn starts_the_due_job_once_and_keeps_concurrency_policies() {
            let w = world().await;
            // Allow: one Job for the most recent minute, named after it, and only one.
            w.cronjob("allow", json!({}), 90).await;
            w.reconcile("allow").await;
            w.reconcile("allow").await;
            let jobs = w.jobs();
            assert_eq!(jobs.len(), 1);
            let at = Utc::now().timestamp() / 60 * 60;
            let name = jobs[0].metadata.name.clone().unwrap();
            assert!(
                name == format!("allow-{}", at / 60) || name == format!("allow-{}", at / 60 - 1),
                "{name}"
            );
            let cj: CronJob =
                serde_json::from_value((*w.c.cronjobs.get_raw("default/allow").unwrap()).clone())
                    .unwrap();
            let st = cj.status.unwrap();
            assert_eq!(st.active.unwrap()[0].name.as_deref(), Some(name.as_str()));
            assert!(st.last_schedule_time.is_some());
            w.finish(&name, "Complete", Utc::now()).await;
            w.reconcile("allow").await;
            let cj: CronJob =
                serde_json::from_value((*w.c.cronjobs.get_raw("default/allow").unwrap()).clone())
                    .unwrap();
            let st = cj.status.unwrap();
            assert!(st.active.is_none(), "a finished Job leaves active");
            assert!(st.last_successful_time.is_some());

            // Forbid: a running Job keeps the next time from starting.
            w.cronjob("forbid", json!({"concurrencyPolicy": "Forbid"}), 200)
                .await;
            let j = job_from_template(
                &serde_json::from_value(
                    w.reg
                        .get(res("cronjobs"), Some("default"), "forbid")
                        .unwrap(),
                )
                .unwrap(),
                Utc::now() - chrono::Duration::seconds(600),
            );
            w.create_job(&j).await;
            w.reconcile("forbid").await;
            let forbid: Vec<Job> = w
                .jobs()
                .into_iter()
                .filter(|j| j.metadata.name.as_deref().unwrap().starts_with("forbid-"))
                .collect();
            assert_eq!(forbid.len(), 1, "Forbid started nothing while one runs");

            // Replace: the running Job goes, the new one comes.
            w.cronjob("replace", json!({"concurrencyPolicy": "Replace"}), 200)
                .await;
            let old = job_from_template(
                &serde_json::from_value(
                    w.reg
                        .get(res("cronjobs"), Some("default"), "replace")
                        .unwrap(),
                )
                .unwrap(),
                Utc::now() - chrono::Duration::seconds(600),
            );
            let old_name = old.metadata.name.clone().unwrap();
            w.create_job(&old).await;
            w.reconcile("replace").await;
            let names: Vec<String> = w
                .jobs()
                .into_iter()
                .filter_map(|j| j.metadata.name)
                .filter(|n| n.starts_with("replace-"))
                .collect();
            assert_eq!(names.len(), 1, "{names:?}");
            assert_ne!(names[0], old_name);

            // Suspended: nothing starts.
            w.cronjob("paused", json!({"suspend": true}), 200).await;
            w.reconcile("paused").await;
            assert!(!w.jobs().iter().any(|j| j
                .metadata
                .name
                .as_deref()
                .unwrap()
                .starts_with("paused-")));
        }

        #[tokio::test]
        async fn history_limits_prune_the_oldest_finished_jobs() {
            let w = world().await;
            w.cronjob("hist", json!({"successfulJobsHistoryLimit": 2, "failedJobsHistoryLimit": 1, "suspend": true}), 30).await;
            let cj = w.reg.get(res("cronjobs"), Some("default"), "hist").unwrap();
            for (i, ty) in [
                (10, "Complete"),
                (9, "Complete"),
                (8, "Failed"),
                (7, "Complete"),
                (6, "Failed"),
            ] {
                let j = job_from_template(
                    &serde_json::from_value(cj.clone()).unwrap(),
                    Utc::now() - chrono::Duration::minutes(i),
                );
                let name = j.metadata.name.clone().unwrap();
                w.create_job(&j).await;
                w.finish(&name, ty, Utc::now() - chrono::Duration::minutes(i))
                    .await;
            }
            w.reconcile("hist").await;
            let left: Vec<String> = w
                .jobs()
                .into_iter()
                .filter_map(|j| j.metadata.name)
                .collect();
            let m = |i: i64| {
                format!(
                    "hist-{}",
                    (Utc::now() - chrono::Duration::minutes(i)).timestamp() / 60
                )
            };
            assert_eq!(left.len(), 3, "{left:?}");
            for keep in [m(9), m(7), m(6)] {
                assert!(left.contains(&keep), "{keep} kept: {left:?}");
            }
        }
    }
}
