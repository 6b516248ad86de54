//! Readiness and liveness probes (`httpGet`, `tcpSocket`) against a pod's address.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{self as v1, Container};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A container's probe, with Kubernetes' defaults.
#[derive(Debug, Clone)]
pub struct Probe {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    HttpGet { port: u16, path: String },
    TcpSocket { port: u16 },
}

/// A port given by number or by the name of one of the container's ports.
fn port(v: &IntOrString, container: &Container) -> Option<u16> {
    match v {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => name.parse().ok().or_else(|| {
            container
                .ports
                .as_ref()?
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }),
    }
}

impl Probe {
    /// `probe` (the container's readiness or liveness probe), if it is one we run.
    pub fn of(container: &Container, probe: Option<&v1::Probe>) -> Option<Probe> {
        let p = probe?;
        let action = if let Some(h) = &p.http_get {
            Action::HttpGet {
                port: port(&h.port, container)?,
                path: h.path.clone().unwrap_or_else(|| "/".into()),
            }
        } else if let Some(t) = &p.tcp_socket {
            Action::TcpSocket {
                port: port(&t.port, container)?,
            }
        } else {
            return None;
        };
        let secs = |v: Option<i32>, d: u64| {
            Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(d))
        };
        let count =
            |v: Option<i32>, d: u32| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(d).max(1);
        Some(Probe {
            action,
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: count(p.success_threshold, 1),
            failure_threshold: count(p.failure_threshold, 3),
        })
    }

    /// One probe: Ok on success, Err with the reason.
    pub async fn check(&self, ip: Ipv4Addr) -> Result<(), String> {
        let fut = async {
            match &self.action {
                Action::TcpSocket { port } => {
                    tokio::net::TcpStream::connect(SocketAddr::from((ip, *port)))
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("dial tcp {ip}:{port}: {e}"))
                }
                Action::HttpGet { port, path } => {
                    let mut s = tokio::net::TcpStream::connect(SocketAddr::from((ip, *port)))
                        .await
                        .map_err(|e| format!("Get \"http://{ip}:{port}{path}\": {e}"))?;
                    let req = format!("GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: skiff-probe/1.0\r\nConnection: close\r\n\r\n");
                    s.write_all(req.as_bytes())
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut head = [0u8; 12];
                    s.read_exact(&mut head)
                        .await
                        .map_err(|e| format!("reading the response: {e}"))?;
                    let code: u16 = std::str::from_utf8(&head[9..12])
                        .ok()
                        .and_then(|c| c.parse().ok())
                        .ok_or("malformed HTTP response")?;
                    if (200..400).contains(&code) {
                        Ok(())
                    } else {
                        Err(format!("HTTP probe failed with statuscode: {code}"))
                    }
                }
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| "probe timed out".to_string())?
    }
}

/// Consecutive results turned into a verdict with the probe's thresholds.
#[derive(Debug, Default)]
pub struct Verdict {
    ok: u32,
    failed: u32,
}

impl Verdict {
    /// Records a result; returns Some(new state) when the thresholds flip it.
    pub fn record(&mut self, probe: &Probe, success: bool) -> Option<bool> {
        if success {
            self.failed = 0;
            self.ok += 1;
            (self.ok == probe.success_threshold).then_some(true)
        } else {
            self.ok = 0;
            self.failed += 1;
            (self.failed == probe.failure_threshold).then_some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_probes_with_named_ports() {
        let c = json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}],
                       "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2},
                       "livenessProbe": {"tcpSocket": {"port": 8080}}});
        let c: Container = serde_json::from_value(c).unwrap();
        let r = Probe::of(&c, c.readiness_probe.as_ref()).unwrap();
        assert_eq!(
            r.action,
            Action::HttpGet {
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(r.period, Duration::from_secs(2));
        assert_eq!(
            Probe::of(&c, c.liveness_probe.as_ref()).unwrap().action,
            Action::TcpSocket { port: 8080 }
        );
        assert!(Probe::of(&c, c.startup_probe.as_ref()).is_none());
    }

    #[test]
    fn thresholds() {
        let p = Probe {
            action: Action::TcpSocket { port: 1 },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        };
        let mut v = Verdict::default();
        assert_eq!(v.record(&p, true), Some(true));
        assert_eq!(v.record(&p, false), None);
        assert_eq!(v.record(&p, false), None);
        assert_eq!(v.record(&p, false), Some(false));
        assert_eq!(v.record(&p, true), Some(true));
    }

    #[tokio::test]
    async fn probes_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).await.unwrap();
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let resp = if ok {
                    "HTTP/1.1 200 OK\r\n\r\n"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\n\r\n"
                };
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let mk = |path: &str| Probe {
            action: Action::HttpGet {
                port,
                path: path.into(),
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 1,
        };
        assert!(mk("/ok").check(Ipv4Addr::LOCALHOST).await.is_ok());
        assert_eq!(
            mk("/bad").check(Ipv4Addr::LOCALHOST).await.unwrap_err(),
            "HTTP probe failed with statuscode: 503"
        );
        let closed = Probe {
            action: Action::TcpSocket { port: 1 },
            ..mk("/")
        };
        assert!(closed.check(Ipv4Addr::LOCALHOST).await.is_err());
    }
}
