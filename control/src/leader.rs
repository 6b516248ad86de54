//! Leader election for the controllers and the scheduler when several API servers share one
//! datastore, with a `coordination.k8s.io/v1` Lease in `kube-system`, as client-go's
//! `leaderelection` does it: a candidate takes the Lease when it is free or when its holder
//! has not renewed it for `leaseDurationSeconds` (as this server's clock measures, from when
//! it last saw the Lease change: no two clocks are compared); the holder renews it every retry
//! period and steps down when it could not renew it for the renew deadline. Every write is a
//! compare-and-swap on the Lease's resourceVersion, so two candidates cannot both take it.
//!
//! Every server serves the API; only the leader runs the controllers. A server that loses the
//! Lease stops its controllers (their tasks are aborted) and becomes a candidate again, in the
//! same process: kube-controller-manager exits instead, which a supervisor then restarts; here
//! nothing outside is needed, and the API the server also serves stays up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use skiff_api::{ApiError, Resource};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::registry::{Registry, WriteOptions};

/// The Lease the controllers' leader holds (`kube-system/NAME`).
pub const LEASE_NAME: &str = "skiff-controllers";
pub const LEASE_NAMESPACE: &str = "kube-system";

/// Kubernetes' defaults: lease 15 s, renew deadline 10 s, retry 2 s.
#[derive(Debug, Clone)]
pub struct LeaderElectionConfig {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// This server's name in the Lease's `holderIdentity`.
    pub identity: String,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "skiff".into());
        LeaderElectionConfig {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            identity: format!("{host}_{}", uuid::Uuid::new_v4()),
        }
    }
}

fn micro_now() -> MicroTime {
    MicroTime(
        Timestamp::from_microsecond(chrono::Utc::now().timestamp_micros())
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

/// The Lease as last seen: its resourceVersion and when this server saw it change.
#[derive(Default)]
struct Observed {
    version: Option<String>,
    at: Option<Instant>,
}

/// Takes or renews the Lease; says whether this server holds it now.
fn try_acquire_or_renew(
    reg: &Registry,
    config: &LeaderElectionConfig,
    observed: &mut Observed,
) -> Result<bool, ApiError> {
    let leases = Resource::lookup("leases").expect("leases are served");
    let opts = WriteOptions::default();
    let duration = config.lease_duration.as_secs().max(1) as i32;
    let now = micro_now();
    let Some(raw) = reg.try_get(leases, Some(LEASE_NAMESPACE), LEASE_NAME)? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some(LEASE_NAMESPACE.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        let value = serde_json::to_value(&lease).map_err(|e| ApiError::internal(e.to_string()))?;
        return match reg.create(leases, Some(LEASE_NAMESPACE), value, &opts) {
            Ok(_) => Ok(true),
            Err(e) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let lease: Lease =
        serde_json::from_value(raw).map_err(|e| ApiError::internal(e.to_string()))?;
    let version = lease.metadata.resource_version.clone();
    if observed.version != version || observed.at.is_none() {
        observed.version = version;
        observed.at = Some(Instant::now());
    }
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let held_for =
        Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(1) as u64);
    let expired = observed.at.is_some_and(|at| at.elapsed() > held_for);
    let mine = holder == config.identity;
    if !mine && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let mut next = lease;
    let spec = next.spec.get_or_insert_with(Default::default);
    if !mine {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(config.identity.clone());
    spec.lease_duration_seconds = Some(duration);
    spec.renew_time = Some(now);
    let value = serde_json::to_value(&next).map_err(|e| ApiError::internal(e.to_string()))?;
    match reg.update(
        leases,
        Some(LEASE_NAMESPACE),
        LEASE_NAME,
        value,
        crate::registry::Sub::Main,
        &opts,
    ) {
        Ok(written) => {
            observed.version = written
                .pointer("/metadata/resourceVersion")
                .and_then(|v| v.as_str())
                .map(String::from);
            observed.at = Some(Instant::now());
            Ok(true)
        }
        Err(e) if e.code == 409 || e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn attempt(
    reg: &Arc<Registry>,
    config: &LeaderElectionConfig,
    observed: &mut Observed,
) -> bool {
    let (reg, config) = (reg.clone(), config.clone());
    let mut mine = std::mem::take(observed);
    let (held, back) = tokio::task::spawn_blocking(move || {
        let r = try_acquire_or_renew(&reg, &config, &mut mine);
        (r, mine)
    })
    .await
    .unwrap_or_else(|e| (Err(ApiError::internal(e.to_string())), Observed::default()));
    *observed = back;
    match held {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e.message, "leader election: cannot read or write the Lease");
            false
        }
    }
}

/// Runs `lead` (which starts the controllers, stopping them when its receiver says so) while
/// this server holds the Lease, until `stop`.
pub async fn run<F>(
    reg: Arc<Registry>,
    config: LeaderElectionConfig,
    mut stop: watch::Receiver<bool>,
    lead: F,
) where
    F: Fn(watch::Receiver<bool>) -> JoinSet<()>,
{
    let mut observed = Observed::default();
    loop {
        // A candidate: try every retry period.
        loop {
            if *stop.borrow() {
                return;
            }
            if attempt(&reg, &config, &mut observed).await {
                break;
            }
            tokio::select! {
                changed = stop.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(config.retry_period) => {}
            }
        }
        tracing::info!(identity = %config.identity, "leader: this server holds the controllers' Lease; starting the controllers");
        let (led, led_rx) = watch::channel(false);
        let mut tasks = lead(led_rx);
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let _ = led.send(true);
                    tasks.abort_all();
                    return;
                }
                _ = tokio::time::sleep(config.retry_period) => {}
            }
            if attempt(&reg, &config, &mut observed).await {
                renewed = Instant::now();
            } else if renewed.elapsed() > config.renew_deadline {
                break;
            }
        }
        tracing::warn!(identity = %config.identity, "leader: lost the controllers' Lease; controllers stopped");
        let _ = led.send(true);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str) -> LeaderElectionConfig {
        LeaderElectionConfig {
            // The Lease holds whole seconds.
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(1),
            retry_period: Duration::from_millis(200),
            identity: id.into(),
        }
    }

    /// One of two candidates holds the Lease; the other takes it once the holder stops
    /// renewing for the lease duration, and not before.
    #[test]
    fn one_leader_and_a_takeover_after_the_lease_duration() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::sqlite::SqliteStore::open(dir.path()).unwrap());
        let reg = Registry::new(store, Default::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        let (a, b) = (config("a"), config("b"));
        let (mut oa, mut ob) = (Observed::default(), Observed::default());
        assert!(try_acquire_or_renew(&reg, &a, &mut oa).unwrap());
        assert!(!try_acquire_or_renew(&reg, &b, &mut ob).unwrap());
        assert!(try_acquire_or_renew(&reg, &a, &mut oa).unwrap());
        assert!(!try_acquire_or_renew(&reg, &b, &mut ob).unwrap());
        // a stops renewing: b waits a full lease duration from when it saw the last renewal.
        let seen = Instant::now();
        let deadline = seen + Duration::from_secs(10);
        while !try_acquire_or_renew(&reg, &b, &mut ob).unwrap() {
            assert!(Instant::now() < deadline, "b never took the Lease");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            seen.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            seen.elapsed()
        );
        assert!(!try_acquire_or_renew(&reg, &a, &mut oa).unwrap());
        let leases = Resource::lookup("leases").unwrap();
        let lease = reg.get(leases, Some(LEASE_NAMESPACE), LEASE_NAME).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }
}
