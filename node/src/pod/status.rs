//! The pod's status as this worker records it, and its writing to the API: the record,
//! the PodStatus built from it, and the writer that patches it whenever it changes.

use k8s_openapi::api::core::v1::{
    self as v1, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, PodCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use skiff_api::conditions::Condition;
use skiff_client::Patch;

use super::*;

#[derive(Debug, Clone)]
pub(super) struct ContainerStatus {
    pub(super) name: String,
    pub(super) image: String,
    pub(super) image_id: String,
    /// `wasm://NAME` or `runc://ID`.
    pub(super) container_id: String,
    pub(super) ready: bool,
    pub(super) started: bool,
    pub(super) restart_count: i64,
    pub(super) state: ContainerState,
    pub(super) last_state: Option<ContainerState>,
}

#[derive(Debug, Clone)]
pub(super) struct PodStatus {
    pub(super) phase: &'static str,
    pub(super) pod_ip: Option<Ipv4Addr>,
    pub(super) start_time: String,
    pub(super) ready_since: Option<String>,
    pub(super) not_ready_since: String,
    pub(super) containers: Vec<ContainerStatus>,
    pub(super) message: Option<String>,
    pub(super) reason: Option<String>,
}

impl PodStatus {
    /// Ready: running, and every container ready.
    pub(super) fn ready(&self) -> bool {
        self.phase == "Running"
            && !self.containers.is_empty()
            && self.containers.iter().all(|c| c.ready)
    }

    /// Applies `f`, noting when the pod became ready or stopped being so: a condition's
    /// transition time changes only when its status does.
    pub(super) fn change(&mut self, f: impl FnOnce(&mut PodStatus)) {
        let was = self.ready();
        f(self);
        let is = self.ready();
        if is && (!was || self.ready_since.is_none()) {
            self.ready_since = Some(now());
        } else if was && !is {
            self.not_ready_since = now();
        }
    }
}

/// A time this worker recorded (`now()`, or the pod's own start time), as the API writes it.
pub(super) fn time(s: &str) -> Time {
    s.parse()
        .map(Time)
        .unwrap_or_else(|_| crate::agent::time_now())
}

/// The pod's status as the API shows it.
pub(super) fn pod_status(s: &PodStatus, node_ip: Ipv4Addr) -> v1::PodStatus {
    let ready = s.ready();
    let since = if ready {
        s.ready_since
            .clone()
            .unwrap_or_else(|| s.not_ready_since.clone())
    } else {
        s.not_ready_since.clone()
    };
    let r = if ready { "True" } else { "False" };
    let not_ready = match (ready, s.phase) {
        (true, _) => "",
        (false, "Succeeded") => "PodCompleted",
        (false, _) => "ContainersNotReady",
    };
    let (started, since) = (time(&s.start_time), time(&since));
    let conditions = [
        ("PodScheduled", "True", "", &started),
        ("Initialized", "True", "", &started),
        ("ContainersReady", r, not_ready, &since),
        ("Ready", r, not_ready, &since),
    ]
    .into_iter()
    .map(|(ty, status, reason, at)| PodCondition {
        // No probe behind these: a worker's observation, not a probe's.
        last_probe_time: None,
        ..PodCondition::new(ty, status, reason, "", at)
    })
    .collect();
    let ip = |ip: Ipv4Addr| v1::HostIP { ip: ip.to_string() };
    v1::PodStatus {
        phase: Some(s.phase.to_string()),
        host_ip: Some(node_ip.to_string()),
        host_ips: Some(vec![ip(node_ip)]),
        pod_ip: s.pod_ip.map(|i| i.to_string()),
        pod_ips: s.pod_ip.map(|i| vec![v1::PodIP { ip: i.to_string() }]),
        start_time: Some(started),
        qos_class: Some("BestEffort".into()),
        conditions: Some(conditions),
        container_statuses: Some(s.containers.iter().map(container_status).collect()),
        message: s.message.clone(),
        reason: s.reason.clone(),
        ..Default::default()
    }
}

fn container_status(c: &ContainerStatus) -> v1::ContainerStatus {
    v1::ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        container_id: Some(c.container_id.clone()).filter(|id| !id.is_empty()),
        ready: c.ready,
        started: Some(c.started),
        restart_count: c.restart_count as i32,
        state: Some(c.state.clone()),
        last_state: c.last_state.clone(),
        ..Default::default()
    }
}

/// A container waiting: why, and what the reason is about.
pub(super) fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: Some(message.into()),
        }),
        ..Default::default()
    }
}

/// A container running since `started_at`.
pub(super) fn running(started_at: &str) -> ContainerState {
    ContainerState {
        running: Some(ContainerStateRunning {
            started_at: Some(time(started_at)),
        }),
        ..Default::default()
    }
}

/// A container that ended now with `exit_code`.
pub(super) fn terminated(
    exit_code: i64,
    reason: &str,
    started_at: Option<&str>,
    container_id: Option<String>,
) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: exit_code as i32,
            reason: Some(reason.into()),
            started_at: started_at.map(time),
            finished_at: Some(time(&now())),
            container_id,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A change is written once the status has been quiet this long, so a burst is one write: a
/// command that runs in a few milliseconds is written once, finished, instead of Pending first
/// and Succeeded only after that write's round trip...
const SETTLE: Duration = Duration::from_millis(10);
/// ...and never later than this after the change that began the burst.
const SETTLE_MAX: Duration = Duration::from_millis(100);

/// Waits until the status has been quiet for [`SETTLE`] (at most [`SETTLE_MAX`]): true when
/// the pod is being stopped meanwhile.
async fn settle(shared: &Shared, stop: &mut watch::Receiver<bool>) -> bool {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(SETTLE) => return false,
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = stop.changed() => return true,
        }
    }
}

/// Writes the status whenever it changes; the last change before the pod stops is written
/// too. A pod that runs to completion has its burst of changes written at once (a command of a
/// few milliseconds: finished, not Pending first); a serving pod's changes are written as they
/// come, so its Ready is not held back.
pub(super) async fn status_writer(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let ns = ns_of(&shared.pod).to_string();
    let name = name_of(&shared.pod).to_string();
    let bursts = runs_to_completion(&shared.pod);
    let mut last = None;
    loop {
        let stopping = if bursts {
            settle(&shared, &mut stop).await
        } else {
            *stop.borrow()
        };
        let st = pod_status(&shared.status.lock().expect("status"), shared.ctx.node_ip);
        if last.as_ref() != Some(&st) {
            let sent = Instant::now();
            let phase = st.phase.clone();
            match shared
                .ctx
                .client
                .patch_status::<Pod>(Some(&ns), &name, &Patch::Merge(json!({"status": st})))
                .await
            {
                Ok(_) => {
                    tracing::debug!(pod = %name, ?phase, took = ?sent.elapsed(), "status written");
                    last = Some(st);
                }
                Err(e) if e.code() == Some(404) => return,
                Err(e) => {
                    tracing::debug!(pod = %name, error = %e, "status update failed; retrying");
                    if stopping {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        if stopping {
            return;
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &PodStatus) -> Value {
        serde_json::to_value(pod_status(s, Ipv4Addr::LOCALHOST)).unwrap()
    }

    /// The Ready condition of the status written for `s`.
    fn ready(s: &PodStatus) -> PodCondition {
        let st = pod_status(s, Ipv4Addr::LOCALHOST);
        skiff_api::conditions::get(st.conditions.as_deref(), "Ready")
            .cloned()
            .expect("a Ready condition")
    }

    fn status(containers: Vec<ContainerStatus>) -> PodStatus {
        PodStatus {
            phase: "Pending",
            pod_ip: None,
            start_time: "2026-01-01T00:00:00Z".into(),
            ready_since: None,
            not_ready_since: "2026-01-01T00:00:00Z".into(),
            containers,
            message: None,
            reason: None,
        }
    }

    fn container(ready: bool) -> ContainerStatus {
        ContainerStatus {
            name: "a".into(),
            image: "i".into(),
            image_id: String::new(),
            container_id: String::new(),
            ready,
            started: true,
            restart_count: 0,
            state: ContainerState::default(),
            last_state: None,
        }
    }

    #[test]
    fn the_ready_transition_time_is_when_the_pod_became_ready() {
        // A command: it is ready once it runs, which happens after the pod's containers are
        // set up (in its own task).
        let mut s = status(vec![container(false)]);
        s.change(|s| s.phase = "Running");
        s.change(|s| s.containers[0].ready = true);
        let since = s.ready_since.clone().expect("ready since");
        assert_eq!(ready(&s).status, "True");
        assert_eq!(ready(&s).last_transition_time, Some(time(&since)));
        // Not ready again: the transition is recorded, and the status is stable.
        s.change(|s| s.containers[0].ready = false);
        let st = json(&s);
        assert_eq!(ready(&s).status, "False");
        assert_eq!(
            ready(&s).last_transition_time,
            Some(time(&s.not_ready_since))
        );
        assert_ne!(s.not_ready_since, "2026-01-01T00:00:00Z");
        assert_eq!(st, json(&s));
    }

    #[test]
    fn ready_only_when_every_container_is() {
        let c = |ready| ContainerStatus {
            name: "a".into(),
            image: "i".into(),
            image_id: String::new(),
            container_id: String::new(),
            ready,
            started: true,
            restart_count: 0,
            state: ContainerState::default(),
            last_state: None,
        };
        let mut s = PodStatus {
            phase: "Running",
            pod_ip: Some(Ipv4Addr::new(10, 88, 0, 2)),
            start_time: now(),
            ready_since: None,
            not_ready_since: now(),
            containers: vec![c(true), c(false)],
            message: None,
            reason: None,
        };
        assert_eq!(ready(&s).status, "False");
        let ip = pod_status(&s, Ipv4Addr::LOCALHOST).pod_ip;
        assert_eq!(ip.as_deref(), Some("10.88.0.2"));
        s.containers[1].ready = true;
        assert_eq!(ready(&s).status, "True");
    }
}
