//! One way to set a status condition, for every kind that has them.
//!
//! Kubernetes' rule: a condition's `lastTransitionTime` changes only when its `status` does;
//! reason and message follow the latest observation. [`set`] applies that rule to any of
//! k8s-openapi's condition types through the [`Condition`] trait, and reports whether anything
//! a reader would see changed, so callers write status only when it did.

use k8s_openapi::api::apps::v1::{
    DaemonSetCondition, DeploymentCondition, ReplicaSetCondition, StatefulSetCondition,
};
use k8s_openapi::api::batch::v1::JobCondition;
use k8s_openapi::api::core::v1::{
    NodeCondition, PersistentVolumeClaimCondition, PodCondition, ReplicationControllerCondition,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition as MetaCondition, Time};

/// A status condition: a type, a status ("True", "False", "Unknown"), why, and since when.
pub trait Condition: Sized {
    /// A condition of type `ty` with `status`, `reason` and `message`, changed at `now`.
    fn new(ty: &str, status: &str, reason: &str, message: &str, now: &Time) -> Self;
    fn type_(&self) -> &str;
    fn status(&self) -> &str;
    fn reason(&self) -> &str;
    fn message(&self) -> &str;
    /// Takes status, reason and message from `new`; the transition time only when the status
    /// changed. Probe and heartbeat times, where the type has them, become `now`.
    fn update(&mut self, new: Self, now: &Time);
}

/// Sets `new` in `conditions` by type. Returns true when the status, reason or message changed
/// (a new probe or heartbeat time alone is not a change).
pub fn set<C: Condition>(conditions: &mut Vec<C>, new: C, now: &Time) -> bool {
    match conditions.iter_mut().find(|c| c.type_() == new.type_()) {
        Some(c) => {
            let changed = c.status() != new.status()
                || c.reason() != new.reason()
                || c.message() != new.message();
            c.update(new, now);
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition of type `ty`, if present.
pub fn get<'a, C: Condition>(conditions: Option<&'a [C]>, ty: &str) -> Option<&'a C> {
    conditions?.iter().find(|c| c.type_() == ty)
}

/// True when the condition of type `ty` is present with status "True".
pub fn is_true<C: Condition>(conditions: Option<&[C]>, ty: &str) -> bool {
    get(conditions, ty).is_some_and(|c| c.status() == "True")
}

/// Removes the condition of type `ty`; true when there was one.
pub fn remove<C: Condition>(conditions: &mut Vec<C>, ty: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_() != ty);
    conditions.len() != before
}

/// `type` and `status` are `String` in some k8s-openapi condition types, `Option<String>` in
/// others (apps/v1's); this reads and builds either.
trait Text {
    fn text(&self) -> &str;
    fn of(s: &str) -> Self;
}

impl Text for String {
    fn text(&self) -> &str {
        self
    }
    fn of(s: &str) -> Self {
        s.to_string()
    }
}

impl Text for Option<String> {
    fn text(&self) -> &str {
        self.as_deref().unwrap_or("")
    }
    fn of(s: &str) -> Self {
        Some(s.to_string())
    }
}

/// Condition types whose fields are all optional besides type and status; `$probe` names the
/// extra time field set on every update (`last_probe_time`, `last_update_time`, ...), if any.
macro_rules! optional_condition {
    ($ty:ty $(, $probe:ident)*) => {
        impl Condition for $ty {
            // Some of these types have fields beyond those set here, some do not.
            #[allow(clippy::needless_update)]
            fn new(ty: &str, status: &str, reason: &str, message: &str, now: &Time) -> Self {
                Self {
                    type_: Text::of(ty),
                    status: Text::of(status),
                    reason: Some(reason.to_string()).filter(|s| !s.is_empty()),
                    message: Some(message.to_string()).filter(|s| !s.is_empty()),
                    last_transition_time: Some(now.clone()),
                    $($probe: Some(now.clone()),)*
                    ..Default::default()
                }
            }
            fn type_(&self) -> &str {
                self.type_.text()
            }
            fn status(&self) -> &str {
                self.status.text()
            }
            fn reason(&self) -> &str {
                self.reason.as_deref().unwrap_or("")
            }
            fn message(&self) -> &str {
                self.message.as_deref().unwrap_or("")
            }
            fn update(&mut self, new: Self, now: &Time) {
                if self.status != new.status || self.last_transition_time.is_none() {
                    self.last_transition_time = Some(now.clone());
                }
                self.status = new.status;
                self.reason = new.reason;
                self.message = new.message;
                $(self.$probe = Some(now.clone());)*
            }
        }
    };
}

optional_condition!(PodCondition, last_probe_time);
optional_condition!(NodeCondition, last_heartbeat_time);
optional_condition!(JobCondition, last_probe_time);
optional_condition!(DeploymentCondition, last_update_time);
optional_condition!(ReplicaSetCondition);
optional_condition!(DaemonSetCondition);
optional_condition!(StatefulSetCondition);
optional_condition!(ReplicationControllerCondition);
optional_condition!(PersistentVolumeClaimCondition, last_probe_time);
optional_condition!(CustomResourceDefinitionCondition);

impl Condition for MetaCondition {
    fn new(ty: &str, status: &str, reason: &str, message: &str, now: &Time) -> Self {
        MetaCondition {
            type_: ty.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            last_transition_time: now.clone(),
            observed_generation: None,
        }
    }
    fn type_(&self) -> &str {
        &self.type_
    }
    fn status(&self) -> &str {
        &self.status
    }
    fn reason(&self) -> &str {
        &self.reason
    }
    fn message(&self) -> &str {
        &self.message
    }
    fn update(&mut self, new: Self, now: &Time) {
        if self.status != new.status {
            self.last_transition_time = now.clone();
        }
        self.status = new.status;
        self.reason = new.reason;
        self.message = new.message;
        self.observed_generation = new.observed_generation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let mut cs: Vec<PodCondition> = Vec::new();
        assert!(set(
            &mut cs,
            Condition::new("Ready", "False", "Starting", "", &at(1)),
            &at(1)
        ));
        // Same status, new reason: changed, but the transition time stays.
        assert!(set(
            &mut cs,
            Condition::new("Ready", "False", "Probe", "", &at(2)),
            &at(2)
        ));
        assert_eq!(cs[0].last_transition_time, Some(at(1)));
        assert_eq!(cs[0].last_probe_time, Some(at(2)));
        // Nothing new: not a change.
        assert!(!set(
            &mut cs,
            Condition::new("Ready", "False", "Probe", "", &at(3)),
            &at(3)
        ));
        assert!(set(
            &mut cs,
            Condition::new("Ready", "True", "", "", &at(4)),
            &at(4)
        ));
        assert_eq!(cs[0].last_transition_time, Some(at(4)));
        assert!(is_true(Some(&cs), "Ready"));
        assert!(!is_true(Some(&cs), "ContainersReady"));
        assert_eq!(cs.len(), 1);
        assert!(remove(&mut cs, "Ready"));
        assert!(cs.is_empty());
    }

    #[test]
    fn meta_conditions_follow_the_same_rule() {
        let mut cs: Vec<MetaCondition> = Vec::new();
        set(
            &mut cs,
            Condition::new("Established", "True", "Init", "ok", &at(1)),
            &at(1),
        );
        set(
            &mut cs,
            Condition::new("Established", "True", "Again", "ok", &at(5)),
            &at(5),
        );
        assert_eq!(cs[0].last_transition_time, at(1));
        assert_eq!(cs[0].reason, "Again");
    }
}
