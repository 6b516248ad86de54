//! Volume binding for the `local-path` StorageClass (`WaitForFirstConsumer`), after k3s's
//! local-path provisioner: when a pod using an unbound claim has been scheduled, a
//! PersistentVolume `pvc-<claim uid>` on that node is made (`hostPath` `storage/pvc-<uid>`,
//! relative to the node's data directory; node affinity to the node) and bound: the claim
//! gets `spec.volumeName` and phase `Bound`. A deleted claim's volume goes with it when its
//! reclaim policy is `Delete`. The scheduler keeps later pods of a claim on its volume's node
//! ([`pinned_node`]).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeClaimStatus, PersistentVolumeSpec,
    PersistentVolumeStatus, Pod, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use skiff_api::ApiError;

use super::api;
use super::runtime::{split_key, Action, Cache, Reconciler};
use crate::registry::{Registry, Sub};

pub const PROVISIONER: &str = "skiff.dev/local-path";
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

pub struct VolumeBinder {
    pub reg: Arc<Registry>,
    pub claims: Arc<Cache<PersistentVolumeClaim>>,
    pub volumes: Arc<Cache<PersistentVolume>>,
    pub classes: Arc<Cache<StorageClass>>,
    pub pods: Arc<Cache<Pod>>,
}

/// The claims a pod names.
pub fn claims_of(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone())
        .collect()
}

/// The one node a volume may be used on, from its node affinity (`kubernetes.io/hostname In`).
pub fn volume_node(pv: &PersistentVolume) -> Option<String> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .find(|e| e.key == HOSTNAME_LABEL && e.operator == "In")
        .and_then(|e| e.values.as_ref()?.first().cloned())
}

/// The node a pending pod must go to because a claim it uses is bound to a volume there.
pub fn pinned_node(
    pod: &Pod,
    claims: &Cache<PersistentVolumeClaim>,
    volumes: &Cache<PersistentVolume>,
) -> Option<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    claims_of(pod).iter().find_map(|c| {
        let claim = claims.get(&format!("{ns}/{c}"))?;
        let vname = claim.spec.as_ref()?.volume_name.as_deref()?;
        volume_node(&*volumes.get(vname)?)
    })
}

impl VolumeBinder {
    /// The class a claim asks for: its own, or the default one.
    fn class_of(&self, claim: &PersistentVolumeClaim) -> Option<StorageClass> {
        let classes: Vec<StorageClass> = self
            .classes
            .list(None)
            .iter()
            .map(|c| (**c).clone())
            .collect();
        match claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.as_deref())
        {
            Some(name) => classes
                .into_iter()
                .find(|c| c.metadata.name.as_deref() == Some(name)),
            None => classes.into_iter().find(|c| {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                    .is_some_and(|v| v == "true")
            }),
        }
    }

    /// A claim is gone: its provisioned volume goes too when its reclaim policy says so.
    fn release(&self, ns: &str, name: &str) -> Result<Action, ApiError> {
        for pv in self.volumes.list(None) {
            let spec = pv.spec.clone().unwrap_or_default();
            let bound_here = spec.claim_ref.as_ref().is_some_and(|r| {
                r.namespace.as_deref() == Some(ns) && r.name.as_deref() == Some(name)
            });
            if !bound_here {
                continue;
            }
            let live_claim = self.claims.get(&format!("{ns}/{name}"));
            let same_uid = live_claim.as_ref().is_some_and(|c| {
                c.metadata.uid.as_deref() == spec.claim_ref.as_ref().and_then(|r| r.uid.as_deref())
            });
            if same_uid {
                continue;
            }
            if spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete") {
                let pv_name = pv.metadata.name.as_deref().unwrap_or("");
                match api::delete::<PersistentVolume>(&self.reg, None, pv_name, &Default::default())
                {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            } else if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Released") {
                api::update_status(
                    &self.reg,
                    &*pv,
                    &PersistentVolumeStatus {
                        phase: Some("Released".into()),
                        ..Default::default()
                    },
                )?;
            }
        }
        Ok(Action::AwaitChange)
    }
}

impl Reconciler for VolumeBinder {
    fn name(&self) -> &'static str {
        "volume-binder"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let (ns, name) = split_key(key);
        let ns = ns.unwrap_or("default");
        let Some(claim) = self.claims.get(key) else {
            return self.release(ns, name);
        };
        if claim.metadata.deletion_timestamp.is_some() {
            return self.release(ns, name);
        }
        let spec = claim.spec.clone().unwrap_or_default();
        if spec.volume_name.as_deref().is_some_and(|v| !v.is_empty()) {
            // Bound (or being bound): make sure the claim says so.
            let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
            if phase != Some("Bound") {
                let vname = spec.volume_name.clone().unwrap_or_default();
                let Some(pv) = self.volumes.get(&vname) else {
                    return Ok(Action::AwaitChange);
                };
                let pvs = pv.spec.clone().unwrap_or_default();
                api::update_status(
                    &self.reg,
                    &*claim,
                    &PersistentVolumeClaimStatus {
                        phase: Some("Bound".into()),
                        access_modes: pvs.access_modes,
                        capacity: pvs.capacity,
                        ..Default::default()
                    },
                )?;
            }
            return Ok(Action::AwaitChange);
        }
        let Some(class) = self.class_of(&claim) else {
            return Ok(Action::AwaitChange);
        };
        if class.provisioner != PROVISIONER {
            return Ok(Action::AwaitChange);
        }
        // The first consumer scheduled decides the node.
        let node = self.pods.list(Some(ns)).into_iter().find_map(|pod| {
            if pod.metadata.deletion_timestamp.is_some()
                || !claims_of(&pod).iter().any(|c| c == name)
            {
                return None;
            }
            pod.spec
                .as_ref()?
                .node_name
                .clone()
                .filter(|n| !n.is_empty())
        });
        let Some(node) = node else {
            return Ok(Action::AwaitChange);
        };
        let uid = claim.metadata.uid.clone().unwrap_or_default();
        let pv_name = format!("pvc-{uid}");
        let capacity = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage").cloned())
            .unwrap_or(Quantity("1Gi".into()));
        if self.volumes.get(&pv_name).is_none() {
            let pv = PersistentVolume {
                metadata: ObjectMeta {
                    name: Some(pv_name.clone()),
                    annotations: Some(
                        [(
                            "pv.kubernetes.io/provisioned-by".to_string(),
                            PROVISIONER.to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeSpec {
                    access_modes: spec.access_modes.clone(),
                    capacity: Some([("storage".to_string(), capacity)].into()),
                    claim_ref: Some(ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("PersistentVolumeClaim".into()),
                        namespace: Some(ns.into()),
                        name: Some(name.into()),
                        uid: Some(uid.clone()),
                        ..Default::default()
                    }),
                    host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                        path: format!("storage/{pv_name}"),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    node_affinity: Some(VolumeNodeAffinity {
                        required: Some(NodeSelector {
                            node_selector_terms: vec![NodeSelectorTerm {
                                match_expressions: Some(vec![NodeSelectorRequirement {
                                    key: HOSTNAME_LABEL.into(),
                                    operator: "In".into(),
                                    values: Some(vec![node.clone()]),
                                }]),
                                match_fields: None,
                            }],
                        }),
                    }),
                    persistent_volume_reclaim_policy: Some(
                        class.reclaim_policy.clone().unwrap_or("Delete".into()),
                    ),
                    storage_class_name: class.metadata.name.clone(),
                    volume_mode: spec.volume_mode.clone(),
                    ..Default::default()
                }),
                status: None,
            };
            let created = match api::create(&self.reg, None, &pv) {
                Ok(o) => o,
                Err(e) if e.code == 409 => return Ok(Action::AwaitChange),
                Err(e) => return Err(e),
            };
            api::update_status(
                &self.reg,
                &created,
                &PersistentVolumeStatus {
                    phase: Some("Bound".into()),
                    ..Default::default()
                },
            )?;
        }
        // Bind the claim to it: `spec.volumeName`, then `Bound` (next pass, from the cache).
        // Only the fields this binder owns are written, at the version it read.
        let class_name = spec
            .storage_class_name
            .clone()
            .or_else(|| class.metadata.name.clone());
        api::patch::<PersistentVolumeClaim>(
            &self.reg,
            Some(ns),
            name,
            &json!({
                "metadata": {
                    "resourceVersion": claim.metadata.resource_version,
                    "annotations": {
                        "pv.kubernetes.io/bind-completed": "yes",
                        "volume.kubernetes.io/selected-node": node,
                        "volume.kubernetes.io/storage-provisioner": PROVISIONER,
                    },
                },
                "spec": {"volumeName": pv_name, "storageClassName": class_name},
            }),
            Sub::Main,
        )?;
        Ok(Action::AwaitChange)
    }
}
