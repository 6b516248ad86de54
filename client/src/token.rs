//! Join tokens as `skiff token` manages them: kubeadm's bootstrap tokens (`<id>.<secret>`,
//! a Secret `kube-system/bootstrap-token-<id>` of type `bootstrap.kubernetes.io/token` with an
//! optional `expiration`), printed k3s style with the CA hash: `K10<sha256 of CA PEM>::<id>.<secret>`.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest;

pub const NAMESPACE: &str = "kube-system";
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The full token an agent is given.
pub fn format_token(ca_pem: &str, id: &str, secret: &str) -> String {
    format!("K10{}::{id}.{secret}", sha256_hex(ca_pem.as_bytes()))
}

fn random_chars(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A new token id (6 characters) and secret (16), `[a-z0-9]` as kubeadm's.
pub fn generate() -> (String, String) {
    (random_chars(6), random_chars(16))
}

/// The Secret name of token `id`.
pub fn secret_name(id: &str) -> String {
    format!("bootstrap-token-{id}")
}

/// Parses a TTL such as `24h`, `90m`, `1h30m`, `45s` or `0` (never expires).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("the duration is empty (e.g. 24h)".into());
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: a number must precede {c:?}"))?;
        num.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            'd' => 86400,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {c:?} (use s, m, h, d)"
                ))
            }
        };
    }
    if !num.is_empty() {
        return Err(format!("invalid duration {s:?}: missing unit (e.g. 24h)"));
    }
    Ok(Duration::from_secs(total))
}

/// The Secret of a token that expires `ttl` after `now` (never when zero).
pub fn secret(
    id: &str,
    token_secret: &str,
    ttl: Duration,
    now: chrono::DateTime<chrono::Utc>,
    description: &str,
) -> Value {
    use base64::Engine;
    let b64 = |s: &str| Value::String(base64::engine::general_purpose::STANDARD.encode(s));
    let mut data = json!({
        "token-id": b64(id),
        "token-secret": b64(token_secret),
        "usage-bootstrap-authentication": b64("true"),
        "description": b64(description),
    });
    if !ttl.is_zero() {
        let exp = now + chrono::Duration::seconds(ttl.as_secs() as i64);
        data["expiration"] = b64(&exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    json!({"apiVersion": "v1", "kind": "Secret", "type": SECRET_TYPE,
           "metadata": {"name": secret_name(id), "namespace": NAMESPACE},
           "data": data})
}

/// One line of `skiff token list`: ID, TTL left, EXPIRES, DESCRIPTION.
pub fn row(secret: &Value, now: chrono::DateTime<chrono::Utc>) -> Option<[String; 4]> {
    use base64::Engine;
    if secret["type"] != SECRET_TYPE {
        return None;
    }
    let field = |k: &str| {
        secret["data"][k]
            .as_str()
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .and_then(|v| String::from_utf8(v).ok())
    };
    let id = field("token-id")?;
    let (ttl, expires) =
        match field("expiration").and_then(|e| chrono::DateTime::parse_from_rfc3339(&e).ok()) {
            None => ("<forever>".to_string(), "<never>".to_string()),
            Some(exp) => {
                let left = exp.with_timezone(&chrono::Utc) - now;
                let ttl = if left <= chrono::Duration::zero() {
                    "<expired>".to_string()
                } else if left.num_hours() > 0 {
                    format!("{}h", left.num_hours())
                } else if left.num_minutes() > 0 {
                    format!("{}m", left.num_minutes())
                } else {
                    format!("{}s", left.num_seconds())
                };
                (ttl, exp.to_rfc3339())
            }
        };
    Some([id, ttl, expires, field("description").unwrap_or_default()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_parsed() {
        assert_eq!(parse_ttl("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_ttl("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_ttl("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_ttl("0").unwrap(), Duration::ZERO);
        for bad in ["", "h", "10", "5x", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_round_trips_through_its_secret() {
        let (id, s) = generate();
        assert_eq!((id.len(), s.len()), (6, 16));
        let now = chrono::Utc::now();
        let sec = secret(&id, &s, Duration::from_secs(3600), now, "for edge-2");
        assert_eq!(sec["metadata"]["name"], format!("bootstrap-token-{id}"));
        let r = row(&sec, now).unwrap();
        assert_eq!(r[0], id);
        assert!(r[1] == "1h" || r[1] == "59m", "{}", r[1]);
        assert_eq!(r[3], "for edge-2");
        let forever = secret(&id, &s, Duration::ZERO, now, "");
        assert_eq!(row(&forever, now).unwrap()[1], "<forever>");
        assert_eq!(
            row(&sec, now + chrono::Duration::hours(2)).unwrap()[1],
            "<expired>"
        );
        let t = format_token("CA", &id, &s);
        assert!(t.starts_with("K10") && t.ends_with(&format!("::{id}.{s}")));
        assert_eq!(t.len(), 3 + 64 + 2 + 6 + 1 + 16);
    }
}
