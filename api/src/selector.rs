//! Label selectors: the query-string syntax (`app=web,tier!=db,env in (a,b),!legacy`)
//! and the `LabelSelector` object form (`matchLabels` + `matchExpressions`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::error::ApiError;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A conjunction of requirements. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn everything() -> Self {
        Selector::default()
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Equality selector from a plain label map (a Service's `spec.selector`).
    pub fn from_map(map: &BTreeMap<String, String>) -> Self {
        Selector {
            requirements: map
                .iter()
                .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
                .collect(),
        }
    }

    /// From a `LabelSelector` object; an unknown operator is an error.
    pub fn from_label_selector(ls: &LabelSelector) -> Result<Self, String> {
        let mut requirements: Vec<Requirement> = ls
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
            .collect();
        for e in ls.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            let r = match e.operator.as_str() {
                "In" if !values.is_empty() => Requirement::In(e.key.clone(), values),
                "NotIn" if !values.is_empty() => Requirement::NotIn(e.key.clone(), values),
                "Exists" if values.is_empty() => Requirement::Exists(e.key.clone()),
                "DoesNotExist" if values.is_empty() => Requirement::DoesNotExist(e.key.clone()),
                "In" | "NotIn" => return Err(format!("operator {} needs values", e.operator)),
                "Exists" | "DoesNotExist" => {
                    return Err(format!("operator {} takes no values", e.operator))
                }
                op => return Err(format!("unknown operator {op:?}")),
            };
            requirements.push(r);
        }
        Ok(Selector { requirements })
    }

    /// Parses the query-string syntax used by `?labelSelector=` and `-l`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| {
            ApiError::bad_request(format!("unable to parse requirement: {why} in {s:?}"))
        };
        let mut requirements = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let r = if let Some(key) = part.strip_prefix('!') {
                Requirement::DoesNotExist(check_key(key.trim()).map_err(|e| bad(&e))?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(
                    check_key(k.trim()).map_err(|e| bad(&e))?,
                    v.trim().to_string(),
                )
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement::Equals(
                    check_key(k.trim()).map_err(|e| bad(&e))?,
                    v.trim().to_string(),
                )
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement::Equals(
                    check_key(k.trim()).map_err(|e| bad(&e))?,
                    v.trim().to_string(),
                )
            } else if let Some((k, rest)) = split_set_op(part, " notin ") {
                Requirement::NotIn(
                    check_key(k).map_err(|e| bad(&e))?,
                    parse_set(rest).map_err(|e| bad(&e))?,
                )
            } else if let Some((k, rest)) = split_set_op(part, " in ") {
                Requirement::In(
                    check_key(k).map_err(|e| bad(&e))?,
                    parse_set(rest).map_err(|e| bad(&e))?,
                )
            } else {
                Requirement::Exists(check_key(part).map_err(|e| bad(&e))?)
            };
            requirements.push(r);
        }
        Ok(Selector { requirements })
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!("{k}={v}"),
                Requirement::NotEquals(k, v) => format!("{k}!={v}"),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn split_set_op<'a>(part: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let idx = part.find(op)?;
    Some((part[..idx].trim(), part[idx + op.len()..].trim()))
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| "expected a parenthesised set of values".to_string())?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

fn check_key(k: &str) -> Result<String, String> {
    if k.is_empty() || k.contains(' ') || k.contains('(') || k.contains(')') {
        return Err(format!("invalid label key {k:?}"));
    }
    Ok(k.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_matches_all_operators() {
        let s = Selector::parse(
            "app=web, tier!=db,env in (prod, staging),zone notin (x),canary,!legacy",
        )
        .unwrap();
        assert_eq!(s.requirements.len(), 6);
        let good = labels(&[
            ("app", "web"),
            ("env", "prod"),
            ("zone", "y"),
            ("canary", ""),
        ]);
        assert!(s.matches(&good));
        let mut bad = good.clone();
        bad.insert("legacy".into(), "1".into());
        assert!(!s.matches(&bad));
        let mut bad = good.clone();
        bad.insert("env".into(), "dev".into());
        assert!(!s.matches(&bad));
        let mut bad = good.clone();
        bad.remove("canary");
        assert!(!s.matches(&bad));
        assert!(Selector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn rejects_malformed_selectors() {
        assert!(Selector::parse("env in prod").is_err());
        assert!(Selector::parse("=x").is_err());
    }

    #[test]
    fn label_selector_object() {
        let ls = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "track".into(),
                operator: "NotIn".into(),
                values: Some(vec!["canary".into()]),
            }]),
        };
        let s = Selector::from_label_selector(&ls).unwrap();
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("track", "canary")])));
        let bad = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "k".into(),
                operator: "Near".into(),
                values: None,
            }]),
        };
        assert!(Selector::from_label_selector(&bad).is_err());
        assert_eq!(s.to_string(), "app=web,track notin (canary)");
    }
}
