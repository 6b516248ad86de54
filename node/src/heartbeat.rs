//! The node's heartbeats, as the kubelet's `nodelease` does them: the agent renews its Lease
//! `kube-node-lease/NODE` often — one small PUT of the Lease it holds — and posts the Node's
//! status (conditions with their heartbeat times) seldom: when it starts, when its conditions
//! change, when the API answers again after failures (the node may have been marked
//! NotReady meanwhile) and otherwise every `status_every`.
//!
//! Defaults, chosen for edge devices on thin links: a 15 s Lease renewed every 4 s (a quarter
//! of its duration, as the kubelet's 10 s of 40 s), so the control plane sees a node go dark
//! within its 15 s grace period while three renewals may be lost on the way; the Node status
//! every 60 s instead of every 10 s. A Lease renewal is ~0.5 KB and wakes only Lease watchers;
//! a Node status post is a GET and a PATCH of several KB and wakes every Node watcher (the
//! scheduler, the LoadBalancer status, every node's proxy). 60 s rather than the kubelet's
//! 5 minutes keeps `kubectl describe node`'s heartbeat recent at a small cost.
//!
//! Failures are only logged: a node keeps running its pods while the API is away.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use skiff_client::{Client, ClientError, Patch};
use tokio::sync::watch;

use crate::agent::{conditions, time_now, OciState};

/// Where node Leases live.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// How often the node heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Between Lease renewals.
    pub renew_every: Duration,
    /// The Lease's `leaseDurationSeconds`.
    pub lease_duration: Duration,
    /// Between Node status posts when nothing changed.
    pub status_every: Duration,
    /// Heartbeat by Node status alone, every `renew_every`, as agents did before Leases (kept
    /// to measure one against the other).
    pub node_status_only: bool,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            renew_every: Duration::from_secs(4),
            lease_duration: Duration::from_secs(15),
            status_every: Duration::from_secs(60),
            node_status_only: false,
        }
    }
}

fn micro_now() -> MicroTime {
    MicroTime(
        Timestamp::from_microsecond(chrono::Utc::now().timestamp_micros())
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

/// Whether the Node status is due: never posted, conditions changed, the API came back, or
/// `every` passed.
pub fn status_due(
    last: Option<Instant>,
    changed: bool,
    recovered: bool,
    every: Duration,
    now: Instant,
) -> bool {
    changed || recovered || last.is_none_or(|t| now.saturating_duration_since(t) >= every)
}

/// One node's heartbeats.
pub struct Heartbeat {
    client: Client,
    name: String,
    oci: OciState,
    timing: Timing,
    /// The Lease as last stored (renewed with one PUT; re-read after a conflict).
    lease: Option<Lease>,
    last_status: Option<Instant>,
    /// The statuses of the conditions last posted.
    posted: Option<Vec<(String, String)>>,
    failing: bool,
    requests: u64,
}

impl Heartbeat {
    pub fn new(client: Client, name: &str, oci: OciState, timing: Timing) -> Heartbeat {
        Heartbeat {
            client,
            name: name.to_string(),
            oci,
            timing,
            lease: None,
            last_status: None,
            posted: None,
            failing: false,
            requests: 0,
        }
    }

    /// HTTP requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Renews (or creates) the Lease: one request while nobody else wrote it. The Lease is
    /// this node's alone, so it is replaced whole.
    pub async fn renew(&mut self) -> Result<(), ClientError> {
        let ns = Some(NODE_LEASE_NAMESPACE);
        if let Some(mut l) = self.lease.take() {
            let spec = l.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(micro_now());
            self.requests += 1;
            match self.client.replace(ns, &self.name, &l).await {
                Ok(stored) => {
                    self.lease = Some(stored);
                    return Ok(());
                }
                // Changed or removed by someone else: read it again below.
                Err(e) if matches!(e.code(), Some(404 | 409)) => {}
                Err(e) => {
                    self.lease = Some(l);
                    return Err(e);
                }
            }
        }
        let seconds = self.timing.lease_duration.as_secs().max(1) as i32;
        self.requests += 2;
        let stored = match self.client.get::<Lease>(ns, &self.name).await {
            Ok(mut l) => {
                let spec = l.spec.get_or_insert_with(Default::default);
                if spec.holder_identity.as_deref() != Some(self.name.as_str()) {
                    spec.holder_identity = Some(self.name.clone());
                    spec.acquire_time = Some(micro_now());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(micro_now());
                self.client.replace(ns, &self.name, &l).await?
            }
            Err(e) if e.code() == Some(404) => {
                let l = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(NODE_LEASE_NAMESPACE.into()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.name.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(micro_now()),
                        renew_time: Some(micro_now()),
                        ..Default::default()
                    }),
                };
                self.client.create(ns, &l).await?
            }
            Err(e) => return Err(e),
        };
        self.lease = Some(stored);
        Ok(())
    }

    /// Posts the Node's conditions with fresh heartbeat times, keeping the transition times
    /// of those whose status did not change.
    pub async fn post_status(&mut self) -> Result<(), ClientError> {
        let t = time_now();
        self.requests += 2;
        let cur = self.client.get::<Node>(None, &self.name).await?;
        let mut conds = cur.status.and_then(|s| s.conditions).unwrap_or_default();
        let want = conditions(&self.oci);
        for c in want.iter().cloned() {
            skiff_api::conditions::set(&mut conds, c, &t);
        }
        // Only the conditions this agent posts, in its order.
        let conds: Vec<NodeCondition> = want
            .iter()
            .filter_map(|w| conds.iter().find(|c| c.type_ == w.type_).cloned())
            .collect();
        self.client
            .patch_status::<Node>(
                None,
                &self.name,
                &Patch::Merge(json!({"status": {"conditions": conds}})),
            )
            .await?;
        self.posted = Some(summary(&want));
        self.last_status = Some(Instant::now());
        Ok(())
    }

    /// One beat: renew the Lease, and post the status if it is due.
    pub async fn beat(&mut self) {
        if self.timing.node_status_only {
            if let Err(e) = self.post_status().await {
                tracing::warn!(error = %e, "posting node status failed");
            }
            return;
        }
        let renewed = self.renew().await;
        let recovered = renewed.is_ok() && self.failing;
        if let Err(e) = &renewed {
            tracing::warn!(error = %e, "renewing the node lease failed");
        }
        let changed = self
            .posted
            .as_ref()
            .is_some_and(|p| *p != summary(&conditions(&self.oci)));
        let due = status_due(
            self.last_status,
            changed,
            recovered,
            self.timing.status_every,
            Instant::now(),
        );
        let mut failed = renewed.is_err();
        if due && !failed {
            if let Err(e) = self.post_status().await {
                tracing::warn!(error = %e, "posting node status failed");
                failed = true;
            }
        }
        if recovered && !failed {
            tracing::info!("the API answers again; node status posted");
        }
        self.failing = failed;
    }

    /// Beats every `renew_every` until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            self.beat().await;
            tokio::select! {
                _ = tokio::time::sleep(self.timing.renew_every) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

fn summary(conds: &[NodeCondition]) -> Vec<(String, String)> {
    conds
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_posted_on_start_change_recovery_and_period() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        assert!(status_due(None, false, false, every, t0));
        let later = t0 + Duration::from_secs(30);
        assert!(!status_due(Some(t0), false, false, every, later));
        assert!(status_due(Some(t0), true, false, every, later));
        assert!(status_due(Some(t0), false, true, every, later));
        assert!(status_due(
            Some(t0),
            false,
            false,
            every,
            t0 + Duration::from_secs(60)
        ));
    }

    #[test]
    fn leases_carry_microseconds_and_their_kind() {
        let l = Lease {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime("2026-01-01T00:00:01.5Z".parse().unwrap())),
                ..Default::default()
            }),
        };
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v["kind"], "Lease");
        assert_eq!(v["apiVersion"], "coordination.k8s.io/v1");
        let renew = l.spec.as_ref().and_then(|s| s.renew_time.as_ref());
        assert_eq!(
            serde_json::to_value(renew).unwrap(),
            json!("2026-01-01T00:00:01.500000Z"),
            "a MicroTime is written with six digits, as the API server expects"
        );
        let d = Timing::default();
        assert!(d.renew_every * 3 < d.lease_duration);
    }
}
