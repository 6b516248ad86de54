//! Setting a pod up and tearing it down: images pulled, volumes and config files made, the
//! pod placed on the node (address, sandbox, files) and released.

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Volume};

use super::*;

/// The pod's host name: `spec.hostname` when set (an Indexed Job's `JOB-INDEX`), else its
/// name, as the kubelet gives it.
pub fn hostname(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.hostname.as_deref())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| name_of(pod))
}

/// Environment of a container: its `env` (values and field references) and HOSTNAME.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    pod_ip: Option<Ipv4Addr>,
    node_name: &str,
) -> Vec<(String, String)> {
    let mut env = vec![("HOSTNAME".to_string(), hostname(pod).to_string())];
    for e in container.env.iter().flatten() {
        let field = e
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        let value = if let Some(v) = &e.value {
            v.clone()
        } else if let Some(path) = field {
            match path {
                "metadata.name" => name_of(pod).to_string(),
                "metadata.namespace" => ns_of(pod).to_string(),
                "metadata.uid" => uid_of(pod).to_string(),
                "status.podIP" => pod_ip.map(|i| i.to_string()).unwrap_or_default(),
                "spec.nodeName" => node_name.to_string(),
                "status.hostIP" => String::new(),
                // Any other field path, known only at run time: read from the pod's JSON.
                p => serde_json::to_value(pod)
                    .ok()
                    .and_then(|v| {
                        v.pointer(&format!("/{}", p.replace('.', "/")))
                            .and_then(Value::as_str)
                            .map(String::from)
                    })
                    .unwrap_or_default(),
            }
        } else {
            String::new()
        };
        env.retain(|(k, _)| *k != e.name);
        env.push((e.name.clone(), value));
    }
    env
}

/// A container's image, pulled.
pub(super) enum Pulled {
    Wasm(Vec<u8>),
    Oci(Box<skiff_oci::Image>),
}

pub(super) async fn pull(
    shared: &Shared,
    i: usize,
    image: &str,
    policy: &str,
) -> Result<Pulled, String> {
    let ctx = &shared.ctx;
    // Present already: no registry round trip (IfNotPresent, Never), as the kubelet does.
    if policy != "Always" {
        if let Some(pulled) = present(shared, i, image) {
            return Ok(pulled);
        }
        if policy == "Never" {
            return Err(format!(
                "image {image} is not present with pull policy of Never"
            ));
        }
    }
    shared.post_event("Normal", "Pulling", &format!("Pulling image \"{image}\""));
    let started = Instant::now();
    let resolved = tokio::time::timeout(
        PULL_TIMEOUT,
        skiff_registry::resolve(image, &ctx.insecure_registries),
    )
    .await
    .map_err(|_| format!("resolving {image} took longer than {PULL_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    let (layer, manifest) = match resolved {
        Resolved::Wasm {
            layer_digest,
            manifest_digest,
            ..
        } => (layer_digest, manifest_digest),
        Resolved::Image { .. } => {
            return pull_oci(shared, i, image, started)
                .await
                .map(|img| Pulled::Oci(Box::new(img)))
        }
    };
    let bytes = tokio::time::timeout(
        PULL_TIMEOUT,
        artifact::pull_wasm(image, &layer, &ctx.blobs, &ctx.insecure_registries),
    )
    .await
    .map_err(|_| format!("pulling {image} took longer than {PULL_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    ctx.images.put(image, &manifest, &layer);
    shared.container(i, |c| c.image_id = format!("{image}@{manifest}"));
    shared.post_event(
        "Normal",
        "Pulled",
        &format!(
            "Successfully pulled image \"{image}\" in {:?} ({} bytes)",
            started.elapsed(),
            bytes.len()
        ),
    );
    Ok(Pulled::Wasm(bytes))
}

/// The image of container `i` when this node has it already (a wasm component in the blob
/// cache, or an OCI image in the store).
fn present(shared: &Shared, i: usize, image: &str) -> Option<Pulled> {
    let ctx = &shared.ctx;
    let cached = ctx
        .images
        .get(image)
        .and_then(|(manifest, layer)| Some((manifest, ctx.blobs.get(&layer)?)));
    let pulled = match cached {
        Some((manifest, bytes)) => {
            shared.container(i, |c| c.image_id = format!("{image}@{manifest}"));
            Pulled::Wasm(bytes)
        }
        None => {
            let img = ctx.oci.as_ref()?.store.get(image)?;
            shared.container(i, |c| c.image_id = img.id());
            Pulled::Oci(Box::new(img))
        }
    };
    shared.post_event(
        "Normal",
        "Pulled",
        &format!("Container image \"{image}\" already present on machine"),
    );
    Some(pulled)
}

/// Pulls an OCI image into the node's layer store, with an Event per layer fetched.
pub(super) async fn pull_oci(
    shared: &Shared,
    i: usize,
    image: &str,
    started: Instant,
) -> Result<skiff_oci::Image, String> {
    let oci = match (&shared.ctx.oci, &shared.ctx.no_oci) {
        (Some(oci), _) => oci,
        (None, why) => {
            return Err(format!(
                "{image} is an OCI container image and this node cannot run OCI containers ({})",
                why.as_deref().unwrap_or("no OCI runtime")
            ))
        }
    };
    let _pulling = oci.gc_lock.read().await;
    let (mut total, mut fetched) = (0, 0);
    let pulling = oci.store.pull(image, |p| match p {
        skiff_oci::Progress::Resolved { layers, .. } => total = layers,
        skiff_oci::Progress::Layer {
            index,
            digest,
            size,
            cached,
        } => {
            if !cached {
                fetched += 1;
                shared.post_event(
                    "Normal",
                    "Pulling",
                    &format!("Pulled layer {}/{total} {digest} ({size} bytes)", index + 1),
                );
            }
        }
    });
    let img = tokio::time::timeout(PULL_TIMEOUT, pulling)
        .await
        .map_err(|_| format!("pulling {image} took longer than {PULL_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    shared.container(i, |c| c.image_id = img.id());
    shared.post_event(
        "Normal",
        "Pulled",
        &format!(
            "Successfully pulled image \"{image}\" in {:?} ({total} layers, {fetched} fetched)",
            started.elapsed()
        ),
    );
    Ok(img)
}

/// Pulls one container's image, retrying with backoff until `stop` (None: stopped first).
pub(super) async fn prepare(
    shared: &Shared,
    i: usize,
    container: &Container,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Option<Pulled> {
    let image = container.image.clone().unwrap_or_default();
    let policy = container
        .image_pull_policy
        .clone()
        .unwrap_or_else(|| "IfNotPresent".into());
    let mut backoff = Backoff::default();
    loop {
        match pull(shared, i, &image, &policy).await {
            Ok(p) => return Some(p),
            Err(msg) => {
                shared
                    .event(
                        "Warning",
                        "Failed",
                        &format!("Failed to pull image \"{image}\": {msg}"),
                    )
                    .await;
                shared.container(i, |c| c.state = waiting("ErrImagePull", &msg));
                let delay = backoff.next(Duration::ZERO);
                shared
                    .event(
                        "Normal",
                        "BackOff",
                        &format!("Back-off pulling image \"{image}\""),
                    )
                    .await;
                shared.container(i, |c| {
                    c.state = waiting(
                        "ImagePullBackOff",
                        &format!("Back-off pulling image \"{image}\": {msg}"),
                    )
                });
                if stopped_within(stop, delay).await {
                    return None;
                }
            }
        }
    }
}

pub(super) fn memory_limit(container: &Container) -> Option<usize> {
    let limits = container.resources.as_ref()?.limits.as_ref()?;
    quantity::bytes(&limits.get("memory")?.0).map(|b| b as usize)
}

/// The container's volume mounts as WASI preopens: `emptyDir` (a directory of the pod's),
/// `hostPath`, `configMap` (its keys written as files, always read-only) and
/// `persistentVolumeClaim` (`DATA/storage/VOLUME` once the claim is bound); and the pod's
/// ServiceAccount token directory, read-only (see [`super::token`]).
pub(super) async fn volumes(
    shared: &Shared,
    container: &Container,
    pod_dir: &std::path::Path,
) -> Result<Vec<Preopen>, String> {
    let vols = shared
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let Some(v) = vols.iter().find(|v| v.name == m.name) else {
            continue;
        };
        let mut read_only = m.read_only == Some(true);
        let host = volume_dir(shared, v, pod_dir, &mut read_only).await?;
        out.push(Preopen {
            host,
            guest: m.mount_path.clone(),
            read_only,
        });
    }
    // The ServiceAccount token, unless the container mounts something of its own there.
    if super::token::wants_token(container) {
        if let Some(dir) = super::token::pod_dir_once(shared, pod_dir).await? {
            out.push(Preopen {
                host: dir.clone(),
                guest: super::token::MOUNT_PATH.into(),
                read_only: true,
            });
        }
    }
    Ok(out)
}

/// Where volume `v` lives on the node, made ready; `read_only` is set for what must be.
async fn volume_dir(
    shared: &Shared,
    v: &Volume,
    pod_dir: &std::path::Path,
    read_only: &mut bool,
) -> Result<std::path::PathBuf, String> {
    let vname = v.name.as_str();
    let ns = ns_of(&shared.pod);
    if let Some(p) = &v.host_path {
        Ok(std::path::PathBuf::from(&p.path))
    } else if v.empty_dir.is_some() {
        let d = pod_dir.join("volumes").join(vname);
        std::fs::create_dir_all(&d).map_err(|e| format!("volume {vname}: {e}"))?;
        Ok(d)
    } else if let Some(cm) = v.config_map.as_ref().map(|c| c.name.as_str()) {
        let obj = shared
            .ctx
            .client
            .get::<ConfigMap>(Some(ns), cm)
            .await
            .map_err(|e| format!("configmap {cm}: {e}"))?;
        let d = pod_dir.join("volumes").join(vname);
        std::fs::create_dir_all(&d).map_err(|e| format!("volume {vname}: {e}"))?;
        for (k, val) in obj.data.iter().flatten() {
            std::fs::write(d.join(k), val).map_err(|e| format!("volume {vname}: {e}"))?;
        }
        *read_only = true;
        Ok(d)
    } else if let Some(pvc) = &v.persistent_volume_claim {
        // The claim's volume lives in the node's data directory under the volume's
        // name; it is used once the claim is bound (to a volume on this node).
        let claim = pvc.claim_name.as_str();
        let obj = shared
            .ctx
            .client
            .get::<PersistentVolumeClaim>(Some(ns), claim)
            .await
            .map_err(|e| format!("persistentvolumeclaim {claim}: {e}"))?;
        let volume = obj
            .spec
            .and_then(|s| s.volume_name)
            .filter(|v| !v.is_empty() && !v.contains('/') && !v.starts_with('.'))
            .ok_or_else(|| format!("persistentvolumeclaim {claim} is not bound yet"))?;
        let d = shared.ctx.data_dir.join("storage").join(volume);
        std::fs::create_dir_all(&d).map_err(|e| format!("volume {vname}: {e}"))?;
        if pvc.read_only == Some(true) {
            *read_only = true;
        }
        Ok(d)
    } else {
        Err(format!(
            "volume {vname}: only emptyDir, hostPath, configMap and persistentVolumeClaim volumes are supported"
        ))
    }
}

/// What a pod holds once it is placed on the node: its address, its network namespace (when
/// it has OCI containers), and the directory of its files and logs.
pub(super) struct Placed {
    pub(super) ip: Ipv4Addr,
    pub(super) sandbox: Option<Sandbox>,
    pub(super) pod_files: Vec<skiff_oci::BindMount>,
    pub(super) pod_dir: std::path::PathBuf,
    pub(super) logs: PodLogs,
}

/// Serves the logs a finished pod left, when the agent restarted since: its worker is not
/// started again, and its logs stay readable while the pod exists.
pub fn keep_logs(ctx: &NodeContext, pod: &Pod) {
    let dir = pod_dir(&ctx.data_dir, pod).join("logs");
    if !dir.is_dir() {
        return;
    }
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect();
    ctx.logs
        .lock()
        .expect("logs")
        .entry(log_key(pod))
        .or_insert_with(|| PodEntry {
            uid: uid_of(pod).to_string(),
            logs: PodLogs { dir },
            containers,
            oci: vec![],
            ip: None,
            netns: None,
        });
}

/// Stops serving the pod's logs (not those of a newer pod of the same name).
pub fn forget_logs(ctx: &NodeContext, pod: &Pod) {
    let mut logs = ctx.logs.lock().expect("logs");
    if logs
        .get(&log_key(pod))
        .is_some_and(|e| e.uid == uid_of(pod))
    {
        logs.remove(&log_key(pod));
    }
}

/// The directory of a pod's files on the node: logs, emptyDir volumes, ConfigMap copies,
/// /etc files. Named `NAMESPACE_NAME_UID`.
pub fn pod_dir(data_dir: &std::path::Path, pod: &Pod) -> std::path::PathBuf {
    data_dir
        .join("pods")
        .join(format!("{}_{}_{}", ns_of(pod), name_of(pod), uid_of(pod)))
}

/// The pod UID a pod directory belongs to (see [`pod_dir`]).
pub fn pod_dir_uid(dir_name: &str) -> &str {
    dir_name.rsplit('_').next().unwrap_or(dir_name)
}

/// Places the pod: its log directory, address and network. A failure gives back what was
/// made, is reported (`FailedCreatePodSandBox`) and is retried with backoff until `stop`
/// (None: stopped first).
pub(super) async fn place(
    shared: &Shared,
    pod_dir: &std::path::Path,
    sandboxed: bool,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Option<Placed> {
    let want = shared
        .pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|s| s.parse().ok());
    let mut backoff = Backoff::default();
    loop {
        match try_place(&shared.ctx, &shared.pod, pod_dir, want, sandboxed).await {
            Ok(placed) => {
                shared.update(|s| s.message = None);
                return Some(placed);
            }
            Err(msg) => {
                let delay = backoff.next(Duration::ZERO);
                shared
                    .event("Warning", "FailedCreatePodSandBox", &msg)
                    .await;
                shared.update(|s| s.message = Some(msg));
                if stopped_within(stop, delay).await {
                    return None;
                }
            }
        }
    }
}

pub(super) async fn try_place(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &std::path::Path,
    want: Option<Ipv4Addr>,
    sandboxed: bool,
) -> Result<Placed, String> {
    let logs = PodLogs::new(pod_dir.join("logs"))
        .map_err(|e| format!("cannot create the pod's log directory: {e}"))?;
    let ip = ctx
        .net
        .allocate(want)
        .map_err(|e| format!("cannot give the pod an address: {e}"))?;
    match pod_network(ctx, pod, pod_dir, ip, sandboxed).await {
        Ok((sandbox, pod_files)) => Ok(Placed {
            ip,
            sandbox,
            pod_files,
            pod_dir: pod_dir.to_path_buf(),
            logs,
        }),
        Err((msg, sandbox)) => {
            release(ctx, pod, ip, sandbox.as_ref()).await;
            Err(msg)
        }
    }
}

/// Gives back the pod's network: its namespace unplugged and deleted, its address off the
/// node and free for another pod.
pub(super) async fn release(ctx: &NodeContext, pod: &Pod, ip: Ipv4Addr, sandbox: Option<&Sandbox>) {
    if let (Some(sb), Some(oci)) = (sandbox, &ctx.oci) {
        oci.cni.teardown(sb, uid_of(pod)).await;
    }
    ctx.net.release(ip);
}

/// Removes what containers that did not stop in time left: their runc containers and root
/// filesystems, and the listeners the proxy serves in-process.
pub(super) async fn force_remove(
    ctx: &NodeContext,
    pod: &Pod,
    containers: &[Container],
    ip: Ipv4Addr,
) {
    for c in containers {
        if let Some(oci) = &ctx.oci {
            let id = oci::container_id(uid_of(pod), &c.name);
            if let Err(e) = oci.runc.delete(&id).await {
                tracing::warn!(container = %id, error = %e, "runc delete");
            }
            let _ = oci.containers.remove(&id);
        }
        for port in http_ports(c) {
            ctx.local.remove(SocketAddr::from((ip, port)));
        }
    }
}

/// Puts the pod's address where its containers listen: in a sandbox made with CNI (with the
/// /etc files its OCI containers mount), or on the node for a wasm-only pod. A wasm-only pod
/// that runs to completion (`restartPolicy` `Never` or `OnFailure`: a Job's) gets it on the node
/// only when one of its containers listens ([`HttpContainer::listen`]): a pod of commands
/// serves nothing and starts without changing the node's network. A long-running pod gets it
/// now, so its address answers as soon as its status names it. On failure, the message and
/// what was made so far.
pub(super) async fn pod_network(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &std::path::Path,
    ip: Ipv4Addr,
    sandboxed: bool,
) -> Result<(Option<Sandbox>, Vec<skiff_oci::BindMount>), (String, Option<Sandbox>)> {
    if !sandboxed {
        if !runs_to_completion(pod) {
            ctx.net
                .bind_host(ip)
                .map_err(|e| (format!("cannot give the pod an address: {e}"), None))?;
        }
        return Ok((None, vec![]));
    }
    let oci = ctx
        .oci
        .as_ref()
        .expect("OCI images are only pulled with an OCI runtime");
    let sandbox = oci
        .cni
        .setup(uid_of(pod), ip, oci::host_ports(pod))
        .await
        .map_err(|e| (format!("cannot create the pod's network: {e}"), None))?;
    let ns = ns_of(pod);
    match oci::pod_files(pod_dir, hostname(pod), ns, ip, ctx.cluster_dns(ns)) {
        Ok(files) => Ok((Some(sandbox), files)),
        Err(e) => Err((
            format!("cannot write the pod's /etc files: {e}"),
            Some(sandbox),
        )),
    }
}

/// How a wasm guest's outgoing requests resolve names: cluster services by the proxy's
/// table, and, in a sandboxed pod, `localhost` to the pod's address (its OCI containers).
pub(super) fn resolver(
    ctx: &NodeContext,
    ns: &str,
    sandboxed: Option<Ipv4Addr>,
) -> Option<skiff_wasm::Resolver> {
    let names = ctx.proxy.as_ref().map(|p| p.names());
    if names.is_none() && sandboxed.is_none() {
        return None;
    }
    let ns = ns.to_string();
    Some(skiff_wasm::Resolver(Arc::new(move |host: &str| {
        if let Some(ip) = sandboxed {
            if host == "localhost" || host == "127.0.0.1" {
                return Some(std::net::IpAddr::V4(ip));
            }
        }
        let names = names.as_ref()?.read().expect("names").clone();
        names.resolve(host, &ns).map(std::net::IpAddr::V4)
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed_spec(v: Value) -> k8s_openapi::api::core::v1::PodSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn env_from_values_and_field_refs() {
        let pod = json!({"metadata": {"name": "web-1", "namespace": "shop", "uid": "u1"}});
        let pod = typed(&pod);
        let c = json!({"name": "c", "env": [{"name": "A", "value": "1"}, {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                               {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                               {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]});
        let c: Container = serde_json::from_value(c).unwrap();
        let env = container_env(&pod, &c, Some(Ipv4Addr::new(10, 88, 0, 9)), "n1");
        let get = |k: &str| env.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOSTNAME"), Some("web-1"));
        let mut indexed = pod.clone();
        indexed.spec = Some(typed_spec(json!({"containers": [], "hostname": "sq-3"})));
        let env = container_env(&indexed, &c, None, "n1");
        assert!(env.contains(&("HOSTNAME".to_string(), "sq-3".to_string())));
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("POD"), Some("web-1"));
        assert_eq!(get("NS"), Some("shop"));
        assert_eq!(get("IP"), Some("10.88.0.9"));
    }
}
