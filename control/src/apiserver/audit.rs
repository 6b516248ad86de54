//! The audit log (`--audit-log PATH`): one JSON line per request the API server answered after
//! telling who sent it — time, user, groups, verb, resource, namespace, name, the client's
//! address and the status code — like the Kubernetes API server's log backend at the
//! `Metadata` level (no bodies). A request whose credentials fail is recorded too, with an
//! empty user and code 401, as Kubernetes' `WithFailedAuthenticationAudit` records it; those
//! are written at the rate the client address's request bucket admits (the attempts refused
//! beyond it with 429 are not), so a flood of bad tokens grows the log no faster than that.
//!
//! The file is the owner's only (`0600`) and bounded: once it would pass its size limit it
//! is renamed to `PATH.1` (the older ones to `PATH.2`, …, the oldest beyond the kept number
//! removed) and a new one started, as `--audit-log-maxsize` and `--audit-log-maxbackup` do.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use super::auth::{Attributes, UserInfo};

/// Where and how much to keep.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// Bytes a file may hold before it is rotated.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` is the newest).
    pub max_backups: usize,
}

impl AuditConfig {
    /// Kubernetes' usual sizes: 100 MiB a file, three kept.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        AuditConfig {
            path: path.into(),
            max_bytes: 100 << 20,
            max_backups: 3,
        }
    }
}

/// The name of the object a create made, which the handler leaves on its response.
#[derive(Debug, Clone)]
pub struct CreatedName(pub String);

/// One line of the log.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub user: &'a str,
    pub groups: &'a [String],
    pub verb: &'a str,
    /// `pods`, `deployments.apps`, `pods/log`; for a path that names no resource, the path.
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// The address the request came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<std::net::IpAddr>,
    pub code: u16,
}

impl<'a> Entry<'a> {
    pub fn new(user: &'a UserInfo, attrs: &'a Attributes, code: u16) -> Self {
        let (verb, resource, namespace, name) = match attrs {
            Attributes::Resource(r) => {
                let mut resource = match r.group.as_str() {
                    "" => r.resource.clone(),
                    g => format!("{}.{g}", r.resource),
                };
                if let Some(sub) = &r.subresource {
                    resource = format!("{resource}/{sub}");
                }
                (
                    r.verb.as_str(),
                    resource,
                    r.namespace.as_deref(),
                    r.name.as_deref(),
                )
            }
            Attributes::NonResource { verb, path } => (verb.as_str(), path.clone(), None, None),
        };
        Entry {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            user: &user.name,
            groups: &user.groups,
            verb,
            resource,
            namespace,
            name,
            source_ip: None,
            code,
        }
    }
}

/// The open log.
pub struct AuditLog {
    config: AuditConfig,
    file: Mutex<(File, u64)>,
}

fn open(path: &Path) -> std::io::Result<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let len = f.metadata()?.len();
    Ok((f, len))
}

impl AuditLog {
    /// Opens (or creates, owner-only) the log at `config.path`, appending to what is there.
    pub fn open(config: AuditConfig) -> std::io::Result<AuditLog> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = open(&config.path)?;
        Ok(AuditLog {
            config,
            file: Mutex::new(file),
        })
    }

    /// Writes one entry as a line; a failure to write is logged, never the request's.
    pub fn record(&self, entry: &Entry<'_>) {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        let mut file = self.file.lock().expect("audit log lock");
        if file.1 > 0 && file.1 + line.len() as u64 > self.config.max_bytes {
            match self.rotate() {
                Ok(f) => *file = f,
                Err(e) => {
                    tracing::warn!(error = %e, path = %self.config.path.display(), "cannot rotate the audit log")
                }
            }
        }
        match file.0.write_all(&line) {
            Ok(()) => file.1 += line.len() as u64,
            Err(e) => {
                tracing::warn!(error = %e, path = %self.config.path.display(), "cannot write the audit log")
            }
        }
    }

    /// Shifts `PATH.i` to `PATH.i+1` (dropping the oldest), `PATH` to `PATH.1`, and opens a
    /// new `PATH`.
    fn rotate(&self) -> std::io::Result<(File, u64)> {
        let path = &self.config.path;
        let numbered = |i: usize| {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.config.max_backups == 0 {
            std::fs::remove_file(path)?;
            return open(path);
        }
        let _ = std::fs::remove_file(numbered(self.config.max_backups));
        for i in (1..self.config.max_backups).rev() {
            match std::fs::rename(numbered(i), numbered(i + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(path, numbered(1))?;
        open(path)
    }
}

#[cfg(test)]
mod tests {
    use super::super::auth::ResourceAttributes;
    use super::*;

    fn user() -> UserInfo {
        UserInfo {
            name: "alice".into(),
            groups: vec!["dev".into(), "system:authenticated".into()],
            ..Default::default()
        }
    }

    fn get_pod(name: &str) -> Attributes {
        Attributes::Resource(ResourceAttributes {
            verb: "get".into(),
            group: String::new(),
            resource: "pods".into(),
            subresource: None,
            namespace: Some("default".into()),
            name: Some(name.into()),
        })
    }

    #[test]
    fn entries_are_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(AuditConfig::new(dir.path().join("audit.log"))).unwrap();
        let u = user();
        log.record(&Entry::new(&u, &get_pod("web"), 200));
        let scale = Attributes::Resource(ResourceAttributes {
            verb: "update".into(),
            group: "apps".into(),
            resource: "deployments".into(),
            subresource: Some("scale".into()),
            namespace: Some("prod".into()),
            name: Some("api".into()),
        });
        log.record(&Entry::new(&u, &scale, 403));
        let health = Attributes::NonResource {
            verb: "get".into(),
            path: "/metrics".into(),
        };
        log.record(&Entry::new(&u, &health, 403));
        let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["user"], "alice");
        assert_eq!(
            lines[0]["groups"],
            serde_json::json!(["dev", "system:authenticated"])
        );
        assert_eq!(lines[0]["verb"], "get");
        assert_eq!(lines[0]["resource"], "pods");
        assert_eq!(lines[0]["namespace"], "default");
        assert_eq!(lines[0]["name"], "web");
        assert_eq!(lines[0]["code"], 200);
        assert!(chrono::DateTime::parse_from_rfc3339(lines[0]["time"].as_str().unwrap()).is_ok());
        assert_eq!(lines[1]["resource"], "deployments.apps/scale");
        assert_eq!(lines[1]["code"], 403);
        assert_eq!(lines[2]["resource"], "/metrics");
        assert!(lines[2].get("namespace").is_none());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("audit.log"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// However many refused requests arrive, the files on disk never hold more than the
    /// rotation keeps: (backups + 1) × the size limit.
    #[test]
    fn a_flood_of_failed_authentications_stays_within_the_rotation_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (max_bytes, max_backups) = (4096, 2);
        let log = AuditLog::open(AuditConfig {
            path: dir.path().join("audit.log"),
            max_bytes,
            max_backups,
        })
        .unwrap();
        let nobody = UserInfo::default();
        let attrs = get_pod("web");
        let mut written = 0u64;
        for _ in 0..5000 {
            let mut entry = Entry::new(&nobody, &attrs, 401);
            entry.source_ip = Some("192.0.2.7".parse().unwrap());
            written += serde_json::to_vec(&entry).unwrap().len() as u64 + 1;
            log.record(&entry);
        }
        let sizes: Vec<u64> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        assert_eq!(sizes.len(), max_backups + 1);
        assert!(sizes.iter().all(|s| *s <= max_bytes), "{sizes:?}");
        let total: u64 = sizes.iter().sum();
        assert!(written > 50 * total, "{written} written, {total} kept");
        let last = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let line: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert_eq!(line["user"], "");
        assert_eq!(line["source_ip"], "192.0.2.7");
        assert_eq!(line["code"], 401);
    }

    #[test]
    fn the_log_rotates_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(AuditConfig {
            path: path.clone(),
            max_bytes: 1000,
            max_backups: 2,
        })
        .unwrap();
        let u = user();
        for i in 0..100 {
            log.record(&Entry::new(&u, &get_pod(&format!("p{i}")), 200));
        }
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, vec!["audit.log", "audit.log.1", "audit.log.2"]);
        for f in &files {
            let len = std::fs::metadata(dir.path().join(f)).unwrap().len();
            assert!(len <= 1000, "{f} holds {len} bytes");
        }
        // The newest entry is in the current file, the ones before it in `.1`.
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.trim_end().ends_with(r#""name":"p99","code":200}"#));
        let older = std::fs::read_to_string(dir.path().join("audit.log.1")).unwrap();
        let last_older: serde_json::Value =
            serde_json::from_str(older.lines().last().unwrap()).unwrap();
        let first_current: serde_json::Value =
            serde_json::from_str(current.lines().next().unwrap()).unwrap();
        let n = |v: &serde_json::Value| v["name"].as_str().unwrap()[1..].parse::<u32>().unwrap();
        assert_eq!(n(&last_older) + 1, n(&first_current));
    }
}
