//! The pod's status as this worker records it, and its writing to the API: the record,
//! the PodStatus built from it, and the writer that patches it whenever it changes.

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
    pub(super) state: Value,
    pub(super) last_state: Value,
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

pub(super) fn status_json(s: &PodStatus, node_ip: Ipv4Addr) -> Value {
    let ready = s.ready();
    let since = if ready {
        s.ready_since
            .clone()
            .unwrap_or_else(|| s.not_ready_since.clone())
    } else {
        s.not_ready_since.clone()
    };
    let r = if ready { "True" } else { "False" };
    let mut conds = vec![
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": s.start_time, "lastProbeTime": null}),
        json!({"type": "Initialized", "status": "True", "lastTransitionTime": s.start_time, "lastProbeTime": null}),
        json!({"type": "ContainersReady", "status": r, "lastTransitionTime": since, "lastProbeTime": null}),
        json!({"type": "Ready", "status": r, "lastTransitionTime": since, "lastProbeTime": null}),
    ];
    if !ready {
        for c in conds.iter_mut().skip(2) {
            c["reason"] = json!(if s.phase == "Succeeded" {
                "PodCompleted"
            } else {
                "ContainersNotReady"
            });
        }
    }
    let mut status = json!({
        "phase": s.phase,
        "hostIP": node_ip.to_string(),
        "hostIPs": [{"ip": node_ip.to_string()}],
        "startTime": s.start_time,
        "qosClass": "BestEffort",
        "conditions": conds,
        "containerStatuses": s.containers.iter().map(|c| {
            let mut v = json!({"name": c.name, "image": c.image, "imageID": c.image_id, "ready": c.ready, "started": c.started,
                               "restartCount": c.restart_count, "state": c.state});
            if !c.container_id.is_empty() {
                v["containerID"] = json!(c.container_id);
            }
            if !c.last_state.is_null() {
                v["lastState"] = c.last_state.clone();
            }
            v
        }).collect::<Vec<_>>(),
    });
    if let Some(ip) = s.pod_ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if let Some(m) = &s.message {
        status["message"] = json!(m);
    }
    if let Some(r) = &s.reason {
        status["reason"] = json!(r);
    }
    status
}

/// Writes the status whenever it changes (coalescing bursts).
pub(super) async fn status_writer(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let pods = Resource::lookup("pods").expect("pods");
    let ns = meta::namespace(&shared.pod)
        .unwrap_or("default")
        .to_string();
    let name = meta::name(&shared.pod).to_string();
    let mut last = Value::Null;
    loop {
        let st = status_json(&shared.status.lock().expect("status"), shared.ctx.node_ip);
        if st != last {
            match shared
                .ctx
                .client
                .patch_dyn(
                    pods,
                    Some(&ns),
                    &name,
                    Some("status"),
                    "application/merge-patch+json",
                    &json!({"status": st}),
                )
                .await
            {
                Ok(_) => last = st,
                Err(e) if e.code() == Some(404) => return,
                Err(e) => {
                    tracing::debug!(pod = %name, error = %e, "status update failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

pub(super) fn waiting(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

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
            state: json!({}),
            last_state: Value::Null,
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
        let st = status_json(&s, Ipv4Addr::LOCALHOST);
        assert_eq!(st["conditions"][3]["status"], "True");
        assert_eq!(st["conditions"][3]["lastTransitionTime"], json!(since));
        // Not ready again: the transition is recorded, and the status is stable.
        s.change(|s| s.containers[0].ready = false);
        let st = status_json(&s, Ipv4Addr::LOCALHOST);
        assert_eq!(st["conditions"][3]["status"], "False");
        assert_eq!(
            st["conditions"][3]["lastTransitionTime"],
            json!(s.not_ready_since)
        );
        assert_ne!(s.not_ready_since, "2026-01-01T00:00:00Z");
        assert_eq!(st, status_json(&s, Ipv4Addr::LOCALHOST));
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
            state: json!({}),
            last_state: Value::Null,
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
        let st = status_json(&s, Ipv4Addr::LOCALHOST);
        assert_eq!(st["conditions"][3]["status"], "False");
        assert_eq!(st["podIP"], "10.88.0.2");
        s.containers[1].ready = true;
        assert_eq!(
            status_json(&s, Ipv4Addr::LOCALHOST)["conditions"][3]["status"],
            "True"
        );
    }
}
