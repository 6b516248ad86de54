//! The OCI runtime bundle (`config.json`) of one container: the image config's process,
//! overridden by the pod's container spec, inside the pod's network namespace, with
//! containerd-like defaults for capabilities, masked paths and seccomp.

use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use crate::OciError;

/// A bind mount into the container.
#[derive(Debug, Clone, PartialEq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// What a container is to be, beyond its image.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// The pod's `command` (replaces the image's Entrypoint) and `args` (replace its Cmd).
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Added to, and overriding, the image's environment.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// `runAsUser` / `runAsGroup`; otherwise the image's User.
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub hostname: String,
    /// The pod's network namespace (a path under /run/netns).
    pub netns: Option<PathBuf>,
    pub read_only_root: bool,
    pub mounts: Vec<BindMount>,
    pub memory_limit: Option<i64>,
    /// CPU limit in millicores (quota over a 100 ms period).
    pub cpu_limit_millis: Option<i64>,
    /// CPU request in millicores (shares: 1024 per core).
    pub cpu_request_millis: Option<i64>,
    pub pids_limit: Option<i64>,
    pub cgroups_path: String,
    /// Extra capabilities (`securityContext.capabilities.add`), like `CAP_NET_ADMIN`.
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    pub privileged: bool,
}

/// containerd's default capability set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Syscalls the default seccomp profile refuses with EPERM: those Docker's and containerd's
/// default profiles leave out for a container without extra capabilities (kernel modules,
/// mounts, reboot, clock setting, kexec, bpf, keyrings, namespaces, tracing other processes…).
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The process's argv: `command` replaces Entrypoint, `args` replace Cmd (and a `command`
/// alone drops the image's Cmd), as Kubernetes does.
pub fn argv(image: &ImageConfiguration, spec: &ContainerSpec) -> Vec<String> {
    let cfg = image.config().as_ref();
    let entrypoint = cfg.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = cfg.and_then(|c| c.cmd().clone()).unwrap_or_default();
    match (spec.command.is_empty(), spec.args.is_empty()) {
        (true, true) => [entrypoint, cmd].concat(),
        (true, false) => [entrypoint, spec.args.clone()].concat(),
        (false, true) => spec.command.clone(),
        (false, false) => [spec.command.clone(), spec.args.clone()].concat(),
    }
}

/// The image's environment with the container's on top (same name: the container wins).
pub fn environment(image: &ImageConfiguration, spec: &ContainerSpec) -> Vec<String> {
    let mut env: Vec<(String, String)> = image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    for (k, v) in &spec.env {
        env.retain(|(a, _)| a != k);
        env.push((k.clone(), v.clone()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `uid[:gid]` or `name[:group]` from the image's User, names looked up in the root
/// filesystem's /etc/passwd and /etc/group.
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), OciError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(rootfs.join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| {
                (
                    f[2].parse().unwrap_or(0),
                    f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0),
                )
            })
        })
    };
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, lookup_uid_gid(rootfs, uid).unwrap_or(0)),
        Err(_) => lookup("etc/passwd", u).ok_or_else(|| {
            OciError::Config(format!("user {u:?} is not in the image's /etc/passwd"))
        })?,
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("etc/group", g).map(|(gid, _)| gid).ok_or_else(|| {
                OciError::Config(format!("group {g:?} is not in the image's /etc/group"))
            })?,
        };
    }
    Ok((uid, gid))
}

fn lookup_uid_gid(rootfs: &Path, uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[2].parse() == Ok(uid)).then(|| f[3].parse().unwrap_or(0))
    })
}

/// Builds the runtime spec for a container whose root filesystem is `rootfs`.
pub fn spec(
    image: &ImageConfiguration,
    c: &ContainerSpec,
    rootfs: &Path,
) -> Result<Spec, OciError> {
    let (uid, gid) = match c.run_as_user {
        Some(uid) => (
            uid,
            c.run_as_group
                .or_else(|| lookup_uid_gid(rootfs, uid))
                .unwrap_or(0),
        ),
        None => {
            let user = image
                .config()
                .as_ref()
                .and_then(|c| c.user().clone())
                .unwrap_or_default();
            let (u, g) = resolve_user(&user, rootfs)?;
            (u, c.run_as_group.unwrap_or(g))
        }
    };
    let args = argv(image, c);
    if args.is_empty() {
        return Err(OciError::Config(
            "the image has no Entrypoint or Cmd and the container no command".into(),
        ));
    }
    let cwd = c
        .working_dir
        .clone()
        .or_else(|| {
            image
                .config()
                .as_ref()
                .and_then(|c| c.working_dir().clone())
        })
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());
    let mut caps: Vec<String> = if c.privileged {
        crate::all_capabilities()
    } else {
        DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect()
    };
    let norm = |s: &String| {
        let s = s.to_uppercase();
        if s.starts_with("CAP_") {
            s
        } else {
            format!("CAP_{s}")
        }
    };
    for a in c.add_capabilities.iter().map(norm) {
        if !caps.contains(&a) {
            caps.push(a);
        }
    }
    let dropped: Vec<String> = c.drop_capabilities.iter().map(norm).collect();
    if dropped.iter().any(|d| d == "CAP_ALL") {
        caps.clear();
    }
    caps.retain(|c| !dropped.contains(c));

    let mut v = serde_json::to_value(Spec::default()).expect("default spec");
    v["hostname"] = json!(c.hostname);
    v["root"] = json!({"path": rootfs, "readonly": c.read_only_root});
    v["process"]["args"] = json!(args);
    v["process"]["env"] = json!(environment(image, c));
    v["process"]["cwd"] = json!(cwd);
    v["process"]["user"] = json!({"uid": uid, "gid": gid});
    v["process"]["terminal"] = json!(false);
    v["process"]["noNewPrivileges"] = json!(!c.privileged);
    let capset = json!(caps);
    v["process"]["capabilities"] =
        json!({"bounding": capset, "effective": capset, "permitted": capset});
    // As many open files as the runtime may grant: containerd's 1048576, or the node's limit.
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(1_048_576))
        .unwrap_or(1024);
    v["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]);

    let mut mounts = v["mounts"].as_array().cloned().unwrap_or_default();
    // /sys read-only, as containerd mounts it for an unprivileged container.
    for m in mounts.iter_mut() {
        if m["destination"] == "/sys" && !c.privileged {
            m["options"] = json!(["nosuid", "noexec", "nodev", "ro"]);
        }
    }
    for b in &c.mounts {
        let mut options = vec!["rbind", "rprivate"];
        if b.read_only {
            options.push("ro");
        }
        mounts.push(json!({"destination": b.destination, "type": "bind", "source": b.source, "options": options}));
    }
    v["mounts"] = Value::Array(mounts);

    let linux = &mut v["linux"];
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    namespaces.push(match &c.netns {
        Some(p) => json!({"type": "network", "path": p}),
        None => json!({"type": "network"}),
    });
    linux["namespaces"] = json!(namespaces);
    linux["cgroupsPath"] = json!(c.cgroups_path);
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(m) = c.memory_limit {
        resources["memory"] = json!({"limit": m});
    }
    let mut cpu = serde_json::Map::new();
    if let Some(l) = c.cpu_limit_millis {
        cpu.insert("quota".into(), json!(l * 100));
        cpu.insert("period".into(), json!(100_000));
    }
    if let Some(r) = c.cpu_request_millis {
        cpu.insert("shares".into(), json!((r * 1024 / 1000).max(2)));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if let Some(p) = c.pids_limit {
        resources["pids"] = json!({"limit": p});
    }
    linux["resources"] = resources;
    if c.privileged {
        linux["maskedPaths"] = json!([]);
        linux["readonlyPaths"] = json!([]);
    } else {
        linux["seccomp"] = seccomp();
    }
    serde_json::from_value(v).map_err(|e| OciError::Config(format!("runtime spec: {e}")))
}

fn seccomp() -> Value {
    let arch = match std::env::consts::ARCH {
        "aarch64" => vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        _ => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    };
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": arch,
        "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

/// Writes `config.json` into `bundle`.
pub fn write(spec: &Spec, bundle: &Path) -> Result<(), OciError> {
    std::fs::create_dir_all(bundle)
        .map_err(|e| OciError::Store(format!("{}: {e}", bundle.display())))?;
    spec.save(bundle.join("config.json"))
        .map_err(|e| OciError::Store(format!("{}: {e}", bundle.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], cmd: &[&str], env: &[&str], user: &str) -> ImageConfiguration {
        serde_json::from_value(json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": env, "User": user, "WorkingDir": "/app"},
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .unwrap()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_and_args_override_entrypoint_and_cmd() {
        let img = image(&["/bin/server"], &["--port", "80"], &[], "");
        let mut c = ContainerSpec::default();
        assert_eq!(argv(&img, &c), strs(&["/bin/server", "--port", "80"]));
        c.args = strs(&["--port", "8080"]);
        assert_eq!(argv(&img, &c), strs(&["/bin/server", "--port", "8080"]));
        c.command = strs(&["/bin/sh", "-c"]);
        assert_eq!(argv(&img, &c), strs(&["/bin/sh", "-c", "--port", "8080"]));
        c.args.clear();
        assert_eq!(argv(&img, &c), strs(&["/bin/sh", "-c"]));
    }

    #[test]
    fn container_env_wins_over_the_image() {
        let img = image(&["x"], &[], &["PATH=/bin", "MODE=image", "KEEP=1"], "");
        let c = ContainerSpec {
            env: vec![("MODE".into(), "pod".into())],
            ..Default::default()
        };
        let env = environment(&img, &c);
        assert!(env.contains(&"PATH=/bin".to_string()));
        assert!(env.contains(&"KEEP=1".to_string()));
        assert!(env.contains(&"MODE=pod".to_string()));
        assert!(!env.contains(&"MODE=image".to_string()));
    }

    #[test]
    fn users_by_number_and_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user("", dir.path()).unwrap(), (0, 0));
        assert_eq!(resolve_user("www", dir.path()).unwrap(), (33, 34));
        assert_eq!(resolve_user("33", dir.path()).unwrap(), (33, 34));
        assert_eq!(resolve_user("www:staff", dir.path()).unwrap(), (33, 50));
        assert_eq!(resolve_user("1000:1000", dir.path()).unwrap(), (1000, 1000));
        assert!(resolve_user("nobody-here", dir.path()).is_err());
    }

    #[test]
    fn the_spec_carries_namespaces_limits_mounts_and_a_seccomp_profile() {
        let img = image(&["/bin/server"], &[], &[], "");
        let c = ContainerSpec {
            hostname: "web-1".into(),
            netns: Some("/run/netns/p1".into()),
            read_only_root: true,
            memory_limit: Some(64 << 20),
            cpu_limit_millis: Some(500),
            pids_limit: Some(100),
            cgroups_path: "/skiff/p1-web".into(),
            mounts: vec![BindMount {
                source: "/tmp/v".into(),
                destination: "/data".into(),
                read_only: true,
            }],
            add_capabilities: strs(&["NET_ADMIN"]),
            drop_capabilities: strs(&["MKNOD"]),
            ..Default::default()
        };
        let s = serde_json::to_value(spec(&img, &c, Path::new("/r")).unwrap()).unwrap();
        assert_eq!(s["hostname"], "web-1");
        assert_eq!(s["root"]["readonly"], true);
        assert_eq!(s["process"]["cwd"], "/app");
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.contains(&json!({"type": "network", "path": "/run/netns/p1"})));
        assert!(ns.contains(&json!({"type": "pid"})));
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(s["linux"]["resources"]["pids"]["limit"], 100);
        assert_eq!(s["linux"]["cgroupsPath"], "/skiff/p1-web");
        let caps = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&json!("CAP_NET_ADMIN")));
        assert!(!caps.contains(&json!("CAP_MKNOD")));
        assert!(!caps.contains(&json!("CAP_SYS_ADMIN")));
        assert!(s["linux"]["seccomp"]["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("mount")));
        let mounts = s["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/data"
            && m["options"].as_array().unwrap().contains(&json!("ro"))));
        assert!(mounts.iter().any(|m| m["destination"] == "/proc"));
    }

    #[test]
    fn an_image_with_nothing_to_run_is_refused() {
        let img = image(&[], &[], &[], "");
        assert!(spec(&img, &ContainerSpec::default(), Path::new("/r")).is_err());
    }
}
