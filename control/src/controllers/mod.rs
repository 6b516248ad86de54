//! Controllers: level-triggered reconcilers over watch-fed caches (see [`runtime`]), and the
//! scheduler. [`start`] wires caches to queues and runs them all.

pub mod api;
pub mod clusterroles;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod endpointslice;
pub mod events;
pub mod eventttl;
pub mod gc;
pub mod job;
pub mod nodelifecycle;
pub mod podgc;
pub mod pods;
pub mod replicaset;
pub mod rootca;
pub mod runtime;
pub mod scheduler;
pub mod serviceaccounts;
pub mod statefulset;
pub mod tainteviction;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service,
    ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::registry::Registry;
use crate::store::EventType;
use runtime::{key, Cache};

/// Timings of the controllers.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node whose Lease and Ready heartbeat stood still this long is marked NotReady and
    /// tainted unreachable (`--node-monitor-grace-period`). Its pods then leave after their
    /// tolerations' seconds (see `ClusterConfig`'s default toleration seconds).
    pub node_grace: Duration,
    /// Registries reached over plain HTTP when the scheduler asks what an image is
    /// (loopback ones always are).
    pub insecure_registries: Vec<String>,
    /// Finished pods kept before the oldest are deleted; 0 keeps them all
    /// (`--terminated-pod-gc-threshold`).
    pub terminated_pod_gc_threshold: usize,
    /// How often the pod garbage collector looks.
    pub pod_gc_period: Duration,
    /// How long a node must be missing before the pods bound to it are deleted.
    pub orphan_pod_quarantine: Duration,
    /// Events are deleted this long after they last happened (`--event-ttl`).
    pub event_ttl: Duration,
    /// Events kept at most, the oldest deleted first; 0: no limit (`--max-events`).
    pub max_events: usize,
    /// The cluster CA (PEM) published in every namespace as the `kube-root-ca.crt`
    /// ConfigMap; empty: none is published.
    pub root_ca_pem: String,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            // Agents renew their Lease every 4 s (a quarter of its 15 s duration, as the
            // kubelet's 10 s of 40 s): three renewals may be lost before a node goes NotReady.
            node_grace: Duration::from_secs(15),
            insecure_registries: Vec::new(),
            terminated_pod_gc_threshold: 12500,
            pod_gc_period: Duration::from_secs(20),
            orphan_pod_quarantine: Duration::from_secs(40),
            event_ttl: Duration::from_secs(3600),
            max_events: 5000,
            root_ca_pem: String::new(),
        }
    }
}

/// The queue key of the controller of kind `kind` that owns the object with metadata `m`.
fn owner_key(m: &ObjectMeta, kind: &str) -> Option<String> {
    m.owner_references
        .as_deref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == kind)
        .map(|o| format!("{}/{}", m.namespace.as_deref().unwrap_or("default"), o.name))
}

/// Starts every controller and the scheduler; they stop when `stop` turns true.
pub fn start(
    reg: Arc<Registry>,
    config: ControllerConfig,
    stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    start_sharing(reg, config, stop, None)
}

/// As [`start`], reading ClusterRoles from `cluster_roles` when given: a cache someone else
/// keeps current (the API server's RBAC caches), so the roles are watched once.
pub fn start_sharing(
    reg: Arc<Registry>,
    config: ControllerConfig,
    stop: watch::Receiver<bool>,
    cluster_roles: Option<Arc<Cache<ClusterRole>>>,
) -> JoinSet<()> {
    let pods = Cache::<Pod>::new();
    let nodes = Cache::<Node>::new();
    let services = Cache::<Service>::new();
    let endpoints = Cache::<Endpoints>::new();
    let slices = Cache::<EndpointSlice>::new();
    let deployments = Cache::<Deployment>::new();
    let replicasets = Cache::<ReplicaSet>::new();
    let namespaces = Cache::<Namespace>::new();
    let leases = Cache::<Lease>::new();
    let budgets = Cache::<PodDisruptionBudget>::new();
    let daemonsets = Cache::<DaemonSet>::new();
    let revisions = Cache::<ControllerRevision>::new();
    let statefulsets = Cache::<StatefulSet>::new();
    let claims = Cache::<PersistentVolumeClaim>::new();
    let volumes = Cache::<PersistentVolume>::new();
    let classes = Cache::<StorageClass>::new();
    let jobs = Cache::<Job>::new();
    let cronjobs = Cache::<CronJob>::new();
    let (cluster_roles, own_cluster_roles) = match cluster_roles {
        Some(shared) => (shared, false),
        None => (Cache::<ClusterRole>::new(), true),
    };
    let accounts = Cache::<ServiceAccount>::new();
    let configmaps = Cache::<ConfigMap>::new();
    let mut tasks = JoinSet::new();

    // Every namespace's `kube-root-ca.crt` ConfigMap: made as the namespace appears, and
    // again when deleted or changed.
    let (ca_q, ca_rx) = runtime::queue();
    {
        let q = ca_q.clone();
        namespaces.on_change(move |c| {
            if c.kind != EventType::Deleted {
                q.add(key(&*c.object));
            }
        });
        let q = ca_q.clone();
        configmaps.on_change(move |c| {
            let m = &c.object.metadata;
            if m.name.as_deref() == Some(rootca::ROOT_CA_CONFIGMAP) {
                q.add(m.namespace.clone().unwrap_or_default());
            }
        });
    }

    // Every namespace's `default` ServiceAccount: made as the namespace appears, and again
    // when deleted.
    let (sa_q, sa_rx) = runtime::queue();
    {
        let q = sa_q.clone();
        namespaces.on_change(move |c| {
            if c.kind != EventType::Deleted {
                q.add(key(&*c.object));
            }
        });
        let q = sa_q.clone();
        accounts.on_change(move |c| {
            let m = &c.object.metadata;
            if c.kind == EventType::Deleted
                && m.name.as_deref() == Some(serviceaccounts::DEFAULT_SERVICE_ACCOUNT)
            {
                q.add(m.namespace.clone().unwrap_or_default());
            }
        });
    }

    // ClusterRole aggregation: any ClusterRole's change may change what the aggregated
    // ones gather.
    let (agg_q, agg_rx) = runtime::queue();
    {
        let q = agg_q.clone();
        let roles = cluster_roles.clone();
        cluster_roles.on_change(move |c| {
            if c.object.aggregation_rule.is_some() {
                q.add(key(&*c.object));
            }
            let labels_changed = c.prev.as_ref().is_none_or(|p| {
                p.metadata.labels != c.object.metadata.labels || p.rules != c.object.rules
            });
            if labels_changed || c.kind == EventType::Deleted {
                for r in roles.list(None) {
                    if r.aggregation_rule.is_some() {
                        q.add(key(&*r));
                    }
                }
            }
        });
        // A shared cache may have listed already: its roles are not announced again.
        for r in cluster_roles.list(None) {
            if r.aggregation_rule.is_some() {
                agg_q.add(key(&*r));
            }
        }
    }

    // ReplicaSets.
    let (rs_q, rs_rx) = runtime::queue();
    {
        let q = rs_q.clone();
        replicasets.on_change(move |c| q.add(key(&*c.object)));
        let q = rs_q.clone();
        let rs_cache = replicasets.clone();
        pods.on_change(move |c| match owner_key(&c.object.metadata, "ReplicaSet") {
            Some(k) => q.add(k),
            None if c.kind != EventType::Deleted => {
                // An orphan may be adopted by a ReplicaSet of its namespace.
                for rs in rs_cache.list(c.object.metadata.namespace.as_deref()) {
                    q.add(key(&*rs));
                }
            }
            None => {}
        });
    }
    // Deployments.
    let (d_q, d_rx) = runtime::queue();
    {
        let q = d_q.clone();
        deployments.on_change(move |c| q.add(key(&*c.object)));
        let q = d_q.clone();
        replicasets.on_change(move |c| {
            if let Some(k) = owner_key(&c.object.metadata, "Deployment") {
                q.add(k)
            }
        });
        // A Recreate rollout waits until the old pods are gone; a ReplicaSet's status does
        // not change when a terminating pod finally goes, so the pod's deletion is the signal.
        let q = d_q.clone();
        let rs_cache = replicasets.clone();
        pods.on_change(move |c| {
            if c.kind != EventType::Deleted {
                return;
            }
            let rs = owner_key(&c.object.metadata, "ReplicaSet").and_then(|k| rs_cache.get(&k));
            if let Some(k) = rs.and_then(|rs| owner_key(&rs.metadata, "Deployment")) {
                q.add(k)
            }
        });
    }
    // DaemonSets: their pods and revisions, and every node change.
    let (ds_q, ds_rx) = runtime::queue();
    {
        let q = ds_q.clone();
        daemonsets.on_change(move |c| q.add(key(&*c.object)));
        let q = ds_q.clone();
        pods.on_change(move |c| {
            if let Some(k) = owner_key(&c.object.metadata, "DaemonSet") {
                q.add(k)
            }
        });
        let q = ds_q.clone();
        revisions.on_change(move |c| {
            if let Some(k) = owner_key(&c.object.metadata, "DaemonSet") {
                q.add(k)
            }
        });
        let q = ds_q.clone();
        let ds_cache = daemonsets.clone();
        nodes.on_change(move |c| {
            // Heartbeats change only conditions' times: no daemon pod moves for them.
            let same =
                |p: &Node| p.spec == c.object.spec && p.metadata.labels == c.object.metadata.labels;
            if c.kind != EventType::Deleted && c.prev.as_deref().is_some_and(same) {
                return;
            }
            for ds in ds_cache.list(None) {
                q.add(key(&*ds));
            }
        });
    }
    // StatefulSets: woken by their own changes and their pods'.
    let (sts_q, sts_rx) = runtime::queue();
    {
        let q = sts_q.clone();
        statefulsets.on_change(move |c| q.add(key(&*c.object)));
        let q = sts_q.clone();
        pods.on_change(move |c| {
            if let Some(k) = owner_key(&c.object.metadata, "StatefulSet") {
                q.add(k)
            }
        });
    }
    // Volume binding: woken by claims, by their volumes, and by their pods being scheduled.
    let (vol_q, vol_rx) = runtime::queue();
    {
        let q = vol_q.clone();
        claims.on_change(move |c| q.add(key(&*c.object)));
        let q = vol_q.clone();
        volumes.on_change(move |c| {
            let claim = c.object.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
            if let Some((Some(ns), Some(n))) = claim.map(|r| (&r.namespace, &r.name)) {
                q.add(format!("{ns}/{n}"));
            }
        });
        let q = vol_q.clone();
        pods.on_change(move |c| {
            if c.object
                .spec
                .as_ref()
                .is_some_and(|s| s.node_name.is_some())
            {
                let ns = c.object.metadata.namespace.as_deref().unwrap_or("default");
                for claim in volumes::claims_of(&c.object) {
                    q.add(format!("{ns}/{claim}"));
                }
            }
        });
    }
    // Jobs and CronJobs.
    let (job_q, job_rx) = runtime::queue();
    let (cj_q, cj_rx) = runtime::queue();
    {
        let q = job_q.clone();
        jobs.on_change(move |c| q.add(key(&*c.object)));
        let q = job_q.clone();
        pods.on_change(move |c| {
            if let Some(k) = owner_key(&c.object.metadata, "Job") {
                q.add(k)
            }
        });
        let q = cj_q.clone();
        cronjobs.on_change(move |c| q.add(key(&*c.object)));
        let q = cj_q.clone();
        jobs.on_change(move |c| {
            if let Some(k) = owner_key(&c.object.metadata, "CronJob") {
                q.add(k)
            }
        });
    }
    // Endpoints and LoadBalancer status, and EndpointSlices.
    let (ep_q, ep_rx) = runtime::queue();
    let (slice_q, slice_rx) = runtime::queue();
    {
        let q = ep_q.clone();
        services.on_change(move |c| q.add(key(&*c.object)));
        let q = slice_q.clone();
        services.on_change(move |c| q.add(key(&*c.object)));
        let q = ep_q.clone();
        endpoints.on_change(move |c| q.add(key(&*c.object)));
        let q = slice_q.clone();
        endpoints.on_change(move |c| q.add(key(&*c.object)));
        let q = slice_q.clone();
        slices.on_change(move |c| {
            let m = &c.object.metadata;
            if let Some(svc) = m
                .labels
                .as_ref()
                .and_then(|l| l.get(endpointslice::SERVICE_NAME))
            {
                q.add(format!(
                    "{}/{svc}",
                    m.namespace.as_deref().unwrap_or("default")
                ));
            }
        });
        let q = ep_q.clone();
        let sq = slice_q.clone();
        let svc_cache = services.clone();
        pods.on_change(move |c| {
            let ns = c.object.metadata.namespace.as_deref();
            let labels = c.object.metadata.labels.as_ref();
            let prev_labels = c.prev.as_ref().map(|p| p.metadata.labels.as_ref());
            for s in svc_cache.list(ns) {
                let Some(sel) = s.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
                    continue;
                };
                if sel.is_empty() {
                    continue;
                }
                let m = |l: Option<&std::collections::BTreeMap<String, String>>| {
                    sel.iter().all(|(k, v)| l.and_then(|l| l.get(k)) == Some(v))
                };
                if m(labels) || prev_labels.is_some_and(m) {
                    q.add(key(&*s));
                    sq.add(key(&*s));
                }
            }
        });
        let q = ep_q.clone();
        let svc_cache = services.clone();
        nodes.on_change(move |_| {
            for s in svc_cache.list(None) {
                if s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
                    q.add(key(&*s));
                }
            }
        });
    }
    // Garbage collection of every kind (one watch of the whole store), and namespaces.
    let (gc_q, gc_rx) = runtime::queue();
    let gc_graph = Arc::new(gc::Graph::default());
    tasks.spawn(gc::follow(
        reg.clone(),
        gc_graph.clone(),
        gc_q.clone(),
        stop.clone(),
    ));
    {
        let q = gc_q.clone();
        namespaces.on_change(move |c| {
            if c.object.metadata.deletion_timestamp.is_some() {
                q.add(format!(
                    "ns:{}",
                    c.object.metadata.name.as_deref().unwrap_or("")
                ));
            }
        });
    }
    // The scheduler: woken by new pending pods and by node changes.
    let wake = Arc::new(Notify::new());
    {
        let w = wake.clone();
        pods.on_change(move |c| {
            if c.kind != EventType::Deleted && scheduler::is_pending(&c.object) {
                w.notify_one();
            }
            if c.kind == EventType::Deleted {
                w.notify_one();
            }
        });
        let w = wake.clone();
        nodes.on_change(move |_| w.notify_one());
    }

    tasks.spawn(pods.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(nodes.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(services.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(endpoints.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(slices.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(deployments.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(replicasets.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(namespaces.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(leases.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(budgets.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(daemonsets.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(revisions.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(statefulsets.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(claims.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(volumes.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(classes.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(jobs.clone().run(reg.clone(), stop.clone()));
    tasks.spawn(cronjobs.clone().run(reg.clone(), stop.clone()));
    if own_cluster_roles {
        tasks.spawn(cluster_roles.clone().run(reg.clone(), stop.clone()));
    }
    tasks.spawn(accounts.clone().run(reg.clone(), stop.clone()));
    if !config.root_ca_pem.is_empty() {
        tasks.spawn(configmaps.clone().run(reg.clone(), stop.clone()));
        tasks.spawn(runtime::run(
            Arc::new(rootca::RootCaPublisher {
                reg: reg.clone(),
                namespaces: namespaces.clone(),
                configmaps: configmaps.clone(),
                ca_pem: config.root_ca_pem.clone(),
            }),
            ca_rx,
            stop.clone(),
        ));
    }
    tasks.spawn(runtime::run(
        Arc::new(serviceaccounts::ServiceAccountController {
            reg: reg.clone(),
            namespaces: namespaces.clone(),
            accounts: accounts.clone(),
        }),
        sa_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(clusterroles::ClusterRoleAggregation {
            reg: reg.clone(),
            roles: cluster_roles.clone(),
        }),
        agg_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(job::JobController::new(
            reg.clone(),
            jobs.clone(),
            pods.clone(),
        )),
        job_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(cronjob::CronJobController::new(
            reg.clone(),
            cronjobs.clone(),
            jobs.clone(),
        )),
        cj_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(replicaset::ReplicaSetController::new(
            reg.clone(),
            replicasets.clone(),
            pods.clone(),
        )),
        rs_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(deployment::DeploymentController::new(
            reg.clone(),
            deployments.clone(),
            replicasets.clone(),
            pods.clone(),
        )),
        d_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(daemonset::DaemonSetController::new(
            reg.clone(),
            daemonsets.clone(),
            pods.clone(),
            nodes.clone(),
            revisions.clone(),
        )),
        ds_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(statefulset::StatefulSetController::new(
            reg.clone(),
            statefulsets.clone(),
            pods.clone(),
            claims.clone(),
        )),
        sts_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(volumes::VolumeBinder {
            reg: reg.clone(),
            claims: claims.clone(),
            volumes: volumes.clone(),
            classes: classes.clone(),
            pods: pods.clone(),
        }),
        vol_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(endpoints::EndpointsController {
            reg: reg.clone(),
            services: services.clone(),
            pods: pods.clone(),
            endpoints: endpoints.clone(),
            nodes: nodes.clone(),
        }),
        ep_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(endpointslice::EndpointSliceController::new(
            reg.clone(),
            services.clone(),
            pods.clone(),
            endpoints.clone(),
            slices.clone(),
        )),
        slice_rx,
        stop.clone(),
    ));
    tasks.spawn(runtime::run(
        Arc::new(gc::GarbageCollector {
            reg: reg.clone(),
            graph: gc_graph,
        }),
        gc_rx,
        stop.clone(),
    ));
    let lifecycle = nodelifecycle::NodeLifecycle::new(
        reg.clone(),
        nodes.clone(),
        pods.clone(),
        leases.clone(),
        config.node_grace,
    );
    let eviction = tainteviction::TaintEviction {
        reg: reg.clone(),
        nodes: nodes.clone(),
        pods: pods.clone(),
    };
    let disruption = disruption::Disruption {
        reg: reg.clone(),
        budgets: budgets.clone(),
        pods: pods.clone(),
        replicasets: replicasets.clone(),
    };
    let mut s = stop.clone();
    tasks.spawn(async move {
        loop {
            if let Err(e) = disruption.check() {
                tracing::warn!(error = %e, "disruption budget pass failed");
            }
            if let Err(e) = lifecycle.check() {
                tracing::warn!(error = %e, "node lifecycle pass failed");
            }
            if let Err(e) = eviction.check() {
                tracing::warn!(error = %e, "taint eviction pass failed");
            }
            tokio::select! {
                _ = s.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    let podgc = podgc::PodGc::new(
        reg.clone(),
        pods.clone(),
        nodes.clone(),
        config.terminated_pod_gc_threshold,
        config.orphan_pod_quarantine,
    );
    let period = config.pod_gc_period;
    let mut s = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = s.changed() => return,
                _ = tokio::time::sleep(period) => {}
            }
            if let Err(e) = podgc.check() {
                tracing::warn!(error = %e, "pod garbage collection pass failed");
            }
        }
    });
    let expiry = Arc::new(eventttl::EventExpiry {
        reg: reg.clone(),
        ttl: config.event_ttl,
        max: config.max_events,
    });
    let mut s = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = s.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            // Store work belongs on the blocking pool.
            let e = expiry.clone();
            match tokio::task::spawn_blocking(move || e.check()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "event expiry pass failed"),
                Err(e) => tracing::warn!(error = %e, "event expiry pass stopped"),
            }
        }
    });
    let kinds = scheduler::ImageKinds::new(config.insecure_registries.clone(), wake.clone());
    let pinned = Pinned { claims, volumes };
    tasks.spawn(run_scheduler(reg, pods, nodes, pinned, kinds, wake, stop));
    tasks
}

/// The claims and volumes the scheduler looks at: a pod whose claim is bound to a volume with
/// node affinity goes to that node.
pub struct Pinned {
    pub claims: Arc<Cache<PersistentVolumeClaim>>,
    pub volumes: Arc<Cache<PersistentVolume>>,
}

/// The scheduling loop: every wake-up (and every 5 s), bind what can be bound.
async fn run_scheduler(
    reg: Arc<Registry>,
    pods: Arc<Cache<Pod>>,
    nodes: Arc<Cache<Node>>,
    pinned: Pinned,
    kinds: Arc<scheduler::ImageKinds>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut start = 0usize;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        match schedule_once(&reg, &pods, &nodes, Some(&pinned), &kinds, &mut start) {
            Ok(Some(rev)) => pods.wait_for(rev).await,
            Ok(None) => {}
            Err(e) => {
                if e.code != 409 {
                    tracing::warn!(error = %e, "scheduling pass failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                wake.notify_one();
            }
        }
    }
}

/// One scheduling pass over all pending pods. Returns the revision of the bind, if any.
pub fn schedule_once(
    reg: &Registry,
    pods: &Cache<Pod>,
    nodes: &Cache<Node>,
    pinned: Option<&Pinned>,
    kinds: &Arc<scheduler::ImageKinds>,
    start: &mut usize,
) -> Result<Option<u64>, skiff_api::ApiError> {
    let all_pods = pods.list(None);
    let node_list = nodes.list(None);
    // Whether a pod has OCI containers matters only if some node cannot run them.
    let wasm_only_nodes = node_list.iter().any(|n| {
        n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(skiff_api::OCI_NODE_LABEL))
            .map(String::as_str)
            == Some("false")
    });
    let mut pending: Vec<(Arc<Pod>, bool)> = all_pods
        .iter()
        .filter(|p| scheduler::is_pending(p))
        .filter_map(|p| {
            // A pod whose images are still being looked up waits for the next pass.
            let needs_oci = if wasm_only_nodes {
                kinds.pod_needs_oci(p)?
            } else {
                false
            };
            Some((p.clone(), needs_oci))
        })
        .collect();
    if pending.is_empty() {
        return Ok(None);
    }
    pending.sort_by(|(a, _), (b, _)| {
        let t = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        t(a).cmp(&t(b)).then(key(&**a).cmp(&key(&**b)))
    });
    let mut infos = scheduler::node_infos(&node_list, &all_pods);
    let requests: Vec<scheduler::PodRequest> = pending
        .iter()
        .map(|(p, needs_oci)| {
            let mut r = scheduler::PodRequest {
                needs_oci: *needs_oci,
                ..scheduler::PodRequest::from_pod(p)
            };
            // A claim already on a node's disk keeps its pods there.
            if let Some(node) = pinned.and_then(|v| volumes::pinned_node(p, &v.claims, &v.volumes))
            {
                r.node_selector
                    .insert("kubernetes.io/hostname".into(), node);
            }
            r
        })
        .collect();
    let placed = scheduler::schedule(&mut infos, &requests, start);
    let mut binds = Vec::new();
    for ((pod, _), result) in pending.iter().zip(placed) {
        match result {
            // The bind writes the pod as stored, so fields its type does not know survive.
            Ok(i) => match pods.get_raw(&key(&**pod)) {
                Some(raw) => binds.push(((*raw).clone(), infos[i].name.clone())),
                None => continue,
            },
            Err(why) => scheduler::mark_unschedulable(reg, pod, &why)?,
        }
    }
    if binds.is_empty() {
        return Ok(None);
    }
    let mut last = 0;
    for chunk in binds.chunks(reg.store().max_txn_ops().min(1000)) {
        match reg.bind_all(chunk.to_vec()) {
            Ok(rev) => last = rev,
            // One pod changed under us: bind the rest one by one.
            Err(e) if e.code == 409 => {
                for b in chunk {
                    if let Ok(rev) = reg.bind_all(vec![b.clone()]) {
                        last = rev;
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    tracing::debug!(bound = binds.len(), "scheduled pods");
    Ok(Some(last))
}
