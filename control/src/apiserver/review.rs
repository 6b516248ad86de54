//! Access and identity reviews, answered and never stored: `authorization.k8s.io/v1`
//! SelfSubjectAccessReview (`kubectl auth can-i`), SubjectAccessReview,
//! LocalSubjectAccessReview and SelfSubjectRulesReview (`kubectl auth can-i --list`), and
//! `authentication.k8s.io/v1` SelfSubjectReview (`kubectl auth whoami`) and TokenReview
//! (answered by [`super::tokens`]).

use k8s_openapi::api::authentication::v1::{SelfSubjectReview, SelfSubjectReviewStatus};
use k8s_openapi::api::authorization::v1::{
    LocalSubjectAccessReview, NonResourceAttributes, NonResourceRule, ResourceAttributes,
    ResourceRule, SelfSubjectAccessReview, SelfSubjectRulesReview, SubjectAccessReview,
    SubjectAccessReviewStatus, SubjectRulesReviewStatus,
};
use serde::Serialize;
use serde_json::Value;
use skiff_api::validation::typed;
use skiff_api::{ApiError, Resource};

use super::auth::{self, Attributes, Decision, UserInfo};
use super::ApiState;

/// A review's answer to `user` (the requester), for a review of `r` posted in `ns`.
pub fn answer(
    state: &ApiState,
    user: &UserInfo,
    r: &Resource,
    ns: Option<&str>,
    body: &Value,
) -> Result<Value, ApiError> {
    match r.kind {
        "SelfSubjectAccessReview" => {
            let mut review: SelfSubjectAccessReview = typed(body)?;
            let attrs = attributes(
                review.spec.resource_attributes.as_ref(),
                review.spec.non_resource_attributes.as_ref(),
            )?;
            review.status = Some(access(state, user, &attrs));
            encode(&review)
        }
        "SubjectAccessReview" => {
            let mut review: SubjectAccessReview = typed(body)?;
            let subject = subject(&review.spec.user, &review.spec.groups)?;
            let attrs = attributes(
                review.spec.resource_attributes.as_ref(),
                review.spec.non_resource_attributes.as_ref(),
            )?;
            review.status = Some(access(state, &subject, &attrs));
            encode(&review)
        }
        "LocalSubjectAccessReview" => {
            let mut review: LocalSubjectAccessReview = typed(body)?;
            let subject = subject(&review.spec.user, &review.spec.groups)?;
            let mut ra =
                review.spec.resource_attributes.clone().ok_or_else(|| {
                    ApiError::bad_request("spec.resourceAttributes: Required value")
                })?;
            match ra.namespace.as_deref() {
                Some(n) if Some(n) != ns => {
                    return Err(ApiError::bad_request(
                        "spec.resourceAttributes.namespace: must match metadata.namespace",
                    ))
                }
                _ => ra.namespace = ns.map(String::from),
            }
            let attrs = attributes(Some(&ra), None)?;
            review.status = Some(access(state, &subject, &attrs));
            encode(&review)
        }
        "SelfSubjectRulesReview" => {
            let mut review: SelfSubjectRulesReview = typed(body)?;
            let ns = review.spec.namespace.as_deref().filter(|n| !n.is_empty());
            review.status = Some(rules(state, user, ns));
            encode(&review)
        }
        "SelfSubjectReview" => {
            let mut review: SelfSubjectReview = typed(body)?;
            review.status = Some(SelfSubjectReviewStatus {
                user_info: Some(k8s_openapi::api::authentication::v1::UserInfo {
                    username: Some(user.name.clone()),
                    groups: Some(user.groups.clone()),
                    uid: user.uid.clone(),
                    extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                }),
            });
            encode(&review)
        }
        "TokenReview" => state.authenticator.tokens.review(&state.registry, body),
        other => Err(ApiError::bad_request(format!("no review of kind {other}"))),
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::internal(format!("encoding a review: {e}")))
}

fn subject(user: &Option<String>, groups: &Option<Vec<String>>) -> Result<UserInfo, ApiError> {
    let name = user.clone().unwrap_or_default();
    let groups = groups.clone().unwrap_or_default();
    if name.is_empty() && groups.is_empty() {
        return Err(ApiError::bad_request(
            "spec.user: Invalid value: \"\": at least one of user or group must be specified",
        ));
    }
    Ok(UserInfo {
        name,
        groups,
        ..Default::default()
    })
}

/// The request a review asks about.
fn attributes(
    ra: Option<&ResourceAttributes>,
    nra: Option<&NonResourceAttributes>,
) -> Result<Attributes, ApiError> {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    let some = |v: &Option<String>| v.clone().filter(|x| !x.is_empty());
    match (ra, nra) {
        (Some(a), None) => Ok(Attributes::Resource(auth::ResourceAttributes {
            verb: s(&a.verb),
            group: s(&a.group),
            resource: s(&a.resource),
            subresource: some(&a.subresource),
            namespace: some(&a.namespace),
            name: some(&a.name),
        })),
        (None, Some(n)) => Ok(Attributes::NonResource {
            verb: s(&n.verb),
            path: s(&n.path),
        }),
        _ => Err(ApiError::bad_request(
            "spec: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
        )),
    }
}

fn access(state: &ApiState, user: &UserInfo, attrs: &Attributes) -> SubjectAccessReviewStatus {
    match state.authorizer.authorize(user, attrs) {
        Decision::Allow => SubjectAccessReviewStatus {
            allowed: true,
            ..Default::default()
        },
        Decision::Deny(reason) => SubjectAccessReviewStatus {
            allowed: false,
            denied: Some(true),
            reason: Some(reason).filter(|r| !r.is_empty()),
            ..Default::default()
        },
        Decision::NoOpinion => SubjectAccessReviewStatus::default(),
    }
}

/// The rules RBAC gives `user` in `ns`; incomplete for users other authorizers decide for.
fn rules(state: &ApiState, user: &UserInfo, ns: Option<&str>) -> SubjectRulesReviewStatus {
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    for r in state.rbac.rules_for(user, ns) {
        match r.non_resource_urls.clone().filter(|u| !u.is_empty()) {
            Some(urls) => non_resource_rules.push(NonResourceRule {
                verbs: r.verbs.clone(),
                non_resource_urls: Some(urls),
            }),
            None => resource_rules.push(ResourceRule {
                verbs: r.verbs.clone(),
                api_groups: r.api_groups.clone(),
                resources: r.resources.clone(),
                resource_names: r.resource_names.clone(),
            }),
        }
    }
    let other = user.node_name().is_some() || user.in_group(auth::BOOTSTRAPPERS);
    SubjectRulesReviewStatus {
        resource_rules,
        non_resource_rules,
        incomplete: other,
        evaluation_error: None,
    }
}
