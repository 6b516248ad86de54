//! Controllers: level-triggered reconcilers over watch-fed caches (see [`runtime`]), and the
//! scheduler. [`start`] wires caches to queues and runs them all.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod events;
pub mod eventttl;
pub mod gc;
pub mod job;
pub mod nodelifecycle;
pub mod podgc;
pub mod pods;
pub mod replicaset;
pub mod runtime;
pub mod scheduler;
pub mod statefulset;
pub mod tainteviction;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use skiff_api::{meta, Resource};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::registry::Registry;
use crate::store::EventType;
use runtime::{key_of, Cache};

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
        }
    }
}

fn cache(name: &str) -> Arc<Cache> {
    Cache::new(Resource::lookup(name).expect("known resource"))
}

fn owner_key(obj: &Value, kind: &str) -> Option<String> {
    meta::owners(obj)
        .into_iter()
        .find(|o| o.3 && o.1 == kind)
        .map(|o| format!("{}/{}", meta::namespace(obj).unwrap_or("default"), o.2))
}

/// Starts every controller and the scheduler; they stop when `stop` turns true.
pub fn start(
    reg: Arc<Registry>,
    config: ControllerConfig,
    stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let pods = cache("pods");
    let nodes = cache("nodes");
    let services = cache("services");
    let endpoints = cache("endpoints");
    let deployments = cache("deployments");
    let replicasets = cache("replicasets");
    let namespaces = cache("namespaces");
    let leases = cache("leases");
    let budgets = cache("poddisruptionbudgets");
    let daemonsets = cache("daemonsets");
    let revisions = cache("controllerrevisions");
    let statefulsets = cache("statefulsets");
    let claims = cache("persistentvolumeclaims");
    let volumes = cache("persistentvolumes");
    let classes = cache("storageclasses");
    let jobs = cache("jobs");
    let cronjobs = cache("cronjobs");
    let mut tasks = JoinSet::new();

    // ReplicaSets.
    let (rs_q, rs_rx) = runtime::queue();
    {
        let q = rs_q.clone();
        replicasets.on_change(move |c| q.add(key_of(&c.object)));
        let q = rs_q.clone();
        let rs_cache = replicasets.clone();
        pods.on_change(move |c| match owner_key(&c.object, "ReplicaSet") {
            Some(k) => q.add(k),
            None if c.kind != EventType::Deleted => {
                // An orphan may be adopted by a ReplicaSet of its namespace.
                for rs in rs_cache.list(meta::namespace(&c.object)) {
                    q.add(key_of(&rs));
                }
            }
            None => {}
        });
    }
    // Deployments.
    let (d_q, d_rx) = runtime::queue();
    {
        let q = d_q.clone();
        deployments.on_change(move |c| q.add(key_of(&c.object)));
        let q = d_q.clone();
        replicasets.on_change(move |c| {
            if let Some(k) = owner_key(&c.object, "Deployment") {
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
            let rs = owner_key(&c.object, "ReplicaSet").and_then(|k| rs_cache.get(&k));
            if let Some(k) = rs.and_then(|rs| owner_key(&rs, "Deployment")) {
                q.add(k)
            }
        });
    }
    // DaemonSets: their pods and revisions, and every node change.
    let (ds_q, ds_rx) = runtime::queue();
    {
        let q = ds_q.clone();
        daemonsets.on_change(move |c| q.add(key_of(&c.object)));
        let q = ds_q.clone();
        pods.on_change(move |c| {
            if let Some(k) = owner_key(&c.object, "DaemonSet") {
                q.add(k)
            }
        });
        let q = ds_q.clone();
        revisions.on_change(move |c| {
            if let Some(k) = owner_key(&c.object, "DaemonSet") {
                q.add(k)
            }
        });
        let q = ds_q.clone();
        let ds_cache = daemonsets.clone();
        nodes.on_change(move |c| {
            // Heartbeats change only conditions' times: no daemon pod moves for them.
            let same = |p: &Value| {
                p.get("spec") == c.object.get("spec")
                    && p.pointer("/metadata/labels") == c.object.pointer("/metadata/labels")
            };
            if c.kind != EventType::Deleted && c.prev.as_deref().is_some_and(same) {
                return;
            }
            for ds in ds_cache.list(None) {
                q.add(key_of(&ds));
            }
        });
    }
    // StatefulSets: woken by their own changes and their pods'.
    let (sts_q, sts_rx) = runtime::queue();
    {
        let q = sts_q.clone();
        statefulsets.on_change(move |c| q.add(key_of(&c.object)));
        let q = sts_q.clone();
        pods.on_change(move |c| {
            if let Some(k) = owner_key(&c.object, "StatefulSet") {
                q.add(k)
            }
        });
    }
    // Volume binding: woken by claims, by their volumes, and by their pods being scheduled.
    let (vol_q, vol_rx) = runtime::queue();
    {
        let q = vol_q.clone();
        claims.on_change(move |c| q.add(key_of(&c.object)));
        let q = vol_q.clone();
        volumes.on_change(move |c| {
            if let (Some(ns), Some(n)) = (
                c.object
                    .pointer("/spec/claimRef/namespace")
                    .and_then(Value::as_str),
                c.object
                    .pointer("/spec/claimRef/name")
                    .and_then(Value::as_str),
            ) {
                q.add(format!("{ns}/{n}"));
            }
        });
        let q = vol_q.clone();
        pods.on_change(move |c| {
            if c.object.pointer("/spec/nodeName").is_some() {
                let ns = meta::namespace(&c.object).unwrap_or("default");
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
        jobs.on_change(move |c| q.add(key_of(&c.object)));
        let q = job_q.clone();
        pods.on_change(move |c| {
            if let Some(k) = owner_key(&c.object, "Job") {
                q.add(k)
            }
        });
        let q = cj_q.clone();
        cronjobs.on_change(move |c| q.add(key_of(&c.object)));
        let q = cj_q.clone();
        jobs.on_change(move |c| {
            if let Some(k) = owner_key(&c.object, "CronJob") {
                q.add(k)
            }
        });
    }
    // Endpoints and LoadBalancer status.
    let (ep_q, ep_rx) = runtime::queue();
    {
        let q = ep_q.clone();
        services.on_change(move |c| q.add(key_of(&c.object)));
        let q = ep_q.clone();
        endpoints.on_change(move |c| q.add(key_of(&c.object)));
        let q = ep_q.clone();
        let svc_cache = services.clone();
        pods.on_change(move |c| {
            let ns = meta::namespace(&c.object);
            let labels = meta::labels(&c.object);
            let prev_labels = c.prev.as_ref().map(|p| meta::labels(p));
            for s in svc_cache.list(ns) {
                let sel = meta::string_map(s.pointer("/spec/selector"));
                if sel.is_empty() {
                    continue;
                }
                let m = |l: &std::collections::BTreeMap<String, String>| {
                    sel.iter().all(|(k, v)| l.get(k) == Some(v))
                };
                if m(&labels) || prev_labels.as_ref().is_some_and(m) {
                    q.add(key_of(&s));
                }
            }
        });
        let q = ep_q.clone();
        let svc_cache = services.clone();
        nodes.on_change(move |_| {
            for s in svc_cache.list(None) {
                if s.pointer("/spec/type").and_then(Value::as_str) == Some("LoadBalancer") {
                    q.add(key_of(&s));
                }
            }
        });
    }
    // Garbage collection and namespaces.
    let (gc_q, gc_rx) = runtime::queue();
    {
        for c in [
            &pods,
            &replicasets,
            &deployments,
            &daemonsets,
            &revisions,
            &statefulsets,
            &claims,
            &jobs,
            &cronjobs,
        ] {
            let q = gc_q.clone();
            let r = c.resource;
            let deps = vec![
                pods.clone(),
                replicasets.clone(),
                revisions.clone(),
                claims.clone(),
                jobs.clone(),
            ];
            c.on_change(move |ch| {
                let o = &ch.object;
                if ch.kind == EventType::Deleted {
                    let uid = meta::uid(o);
                    for d in &deps {
                        for dep in d.list(meta::namespace(o)) {
                            if meta::owners(&dep).iter().any(|ow| ow.0 == uid) {
                                q.add(gc::dep_key(d.resource, &dep));
                            }
                        }
                    }
                    return;
                }
                if meta::is_deleting(o)
                    && meta::finalizers(o)
                        .iter()
                        .any(|f| f == "foregroundDeletion" || f == "orphan")
                {
                    q.add(gc::owner_key(r, o));
                }
                if ch.kind == EventType::Added && !meta::owners(o).is_empty() && ch.prev.is_none() {
                    q.add(gc::dep_key(r, o));
                }
            });
        }
        let q = gc_q.clone();
        namespaces.on_change(move |c| {
            if meta::is_deleting(&c.object) {
                q.add(format!("ns:{}", meta::name(&c.object)));
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

    for c in [
        &pods,
        &nodes,
        &services,
        &endpoints,
        &deployments,
        &replicasets,
        &namespaces,
        &leases,
        &budgets,
        &daemonsets,
        &revisions,
        &statefulsets,
        &claims,
        &volumes,
        &classes,
        &jobs,
        &cronjobs,
    ] {
        tasks.spawn(c.clone().run(reg.clone(), stop.clone()));
    }
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
        Arc::new(gc::GarbageCollector {
            reg: reg.clone(),
            dependents: vec![
                pods.clone(),
                replicasets.clone(),
                revisions.clone(),
                claims.clone(),
                jobs.clone(),
            ],
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
    pub claims: Arc<Cache>,
    pub volumes: Arc<Cache>,
}

/// The scheduling loop: every wake-up (and every 5 s), bind what can be bound.
async fn run_scheduler(
    reg: Arc<Registry>,
    pods: Arc<Cache>,
    nodes: Arc<Cache>,
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
    pods: &Cache,
    nodes: &Cache,
    pinned: Option<&Pinned>,
    kinds: &Arc<scheduler::ImageKinds>,
    start: &mut usize,
) -> Result<Option<u64>, skiff_api::ApiError> {
    let all_pods = pods.list(None);
    let node_list = nodes.list(None);
    // Whether a pod has OCI containers matters only if some node cannot run them.
    let wasm_only_nodes = node_list.iter().any(|n| {
        meta::labels(n)
            .get(skiff_api::OCI_NODE_LABEL)
            .map(String::as_str)
            == Some("false")
    });
    let mut pending: Vec<(Arc<Value>, bool)> = all_pods
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
        let t = |p: &Value| {
            p.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        t(a).cmp(&t(b)).then(key_of(a).cmp(&key_of(b)))
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
            Ok(i) => binds.push(((**pod).clone(), infos[i].name.clone())),
            Err(why) => scheduler::mark_unschedulable(reg, pod, &why)?,
        }
    }
    if binds.is_empty() {
        return Ok(None);
    }
    let mut last = 0;
    for chunk in binds.chunks(1000) {
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
