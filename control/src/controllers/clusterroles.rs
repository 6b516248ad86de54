//! The ClusterRole aggregation controller: a ClusterRole with an `aggregationRule` holds the
//! rules of every ClusterRole its selectors match (as `admin`, `edit` and `view` gather the
//! roles labelled `rbac.authorization.k8s.io/aggregate-to-*`), in the order of their names,
//! each rule once. Its `rules` are the controller's: written whole by a merge patch.

use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use serde_json::json;
use skiff_api::ApiError;

use super::api;
use super::replicaset::selector;
use super::runtime::{Action, Cache, Reconciler};
use crate::registry::{Registry, Sub};

pub struct ClusterRoleAggregation {
    pub reg: Arc<Registry>,
    pub roles: Arc<Cache<ClusterRole>>,
}

/// The rules `role` aggregates from `all` (None: it has no aggregation rule).
pub fn aggregate(
    role: &ClusterRole,
    all: &[Arc<ClusterRole>],
) -> Result<Option<Vec<PolicyRule>>, ApiError> {
    let Some(rule) = &role.aggregation_rule else {
        return Ok(None);
    };
    let selectors = rule
        .cluster_role_selectors
        .iter()
        .flatten()
        .map(selector)
        .collect::<Result<Vec<_>, _>>()?;
    let empty = Default::default();
    let mut sources: Vec<&Arc<ClusterRole>> = all
        .iter()
        .filter(|r| r.metadata.name != role.metadata.name)
        .filter(|r| {
            let labels = r.metadata.labels.as_ref().unwrap_or(&empty);
            selectors.iter().any(|s| !s.is_empty() && s.matches(labels))
        })
        .collect();
    sources.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut rules: Vec<PolicyRule> = Vec::new();
    for r in sources.iter().flat_map(|s| s.rules.iter().flatten()) {
        if !rules.contains(r) {
            rules.push(r.clone());
        }
    }
    Ok(Some(rules))
}

impl Reconciler for ClusterRoleAggregation {
    fn name(&self) -> &'static str {
        "clusterrole-aggregation"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ApiError> {
        let Some(role) = self.roles.get(key) else {
            return Ok(Action::AwaitChange);
        };
        let Some(rules) = aggregate(&role, &self.roles.list(None))? else {
            return Ok(Action::AwaitChange);
        };
        if role.rules.as_deref().unwrap_or_default() == rules.as_slice() {
            return Ok(Action::AwaitChange);
        }
        let body = json!({"rules": api::encode(&rules)?});
        match api::patch::<ClusterRole>(&self.reg, None, key, &body, Sub::Main) {
            Ok(written) => self.roles.wait_for(api::revision(&written.metadata)).await,
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        Ok(Action::AwaitChange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(v: serde_json::Value) -> Arc<ClusterRole> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn aggregated_roles_gather_the_rules_of_the_roles_they_select() {
        let get = json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]});
        let edit =
            json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["update"]});
        let all = vec![
            role(
                json!({"metadata": {"name": "b-view", "labels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}},
                        "rules": [get.clone()]}),
            ),
            role(
                json!({"metadata": {"name": "a-edit", "labels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}},
                        "rules": [edit.clone(), get.clone()]}),
            ),
            role(
                json!({"metadata": {"name": "other"}, "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}),
            ),
        ];
        let view = role(
            json!({"metadata": {"name": "view"}, "aggregationRule": {"clusterRoleSelectors": [
            {"matchLabels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}}]}}),
        );
        let rules = aggregate(&view, &all).unwrap().unwrap();
        let want: Vec<PolicyRule> = serde_json::from_value(json!([edit, get])).unwrap();
        assert_eq!(rules, want);
        assert!(aggregate(&all[2], &all).unwrap().is_none());
    }
}
