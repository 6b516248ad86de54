//! CEL validation rules of custom resources (`x-kubernetes-validations`), as the Kubernetes
//! API server evaluates them on create and update: each rule sees `self`, the value at the
//! schema node it is written on, and — on updates, when an old value exists there — `oldSelf`.
//! A rule that reads `oldSelf` (a transition rule) is skipped where there is no old value.
//!
//! Rules are compiled once per definition version ([`Rules::compile`]); a rule that does not
//! compile refuses the definition ([`compile_errors`]).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ::cel::common::ast::{EntryExpr, Expr, IdedEntryExpr};
use ::cel::{Context, IdedExpr, Program, Value as Cel};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps as Schema, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool, ValidationRule,
};
use serde_json::Value;

use crate::error::Cause;

/// The variables a rule may read.
const VARIABLES: [&str; 2] = ["self", "oldSelf"];

/// One compiled rule.
#[derive(Debug)]
struct Rule {
    spec: ValidationRule,
    program: Program,
    message: Option<Program>,
    transition: bool,
}

/// The compiled rules of a schema, in a tree that follows the schema's nodes holding rules.
#[derive(Debug, Default)]
pub struct Rules {
    here: Vec<Rule>,
    properties: BTreeMap<String, Rules>,
    additional: Option<Box<Rules>>,
    items: Option<Box<Rules>>,
}

fn item_schema(s: &Schema) -> Option<&Schema> {
    match s.items.as_ref()? {
        JSONSchemaPropsOrArray::Schema(s) => Some(s),
        JSONSchemaPropsOrArray::Schemas(v) => v.first(),
    }
}

fn additional(s: &Schema) -> Option<&Schema> {
    match s.additional_properties.as_ref()? {
        JSONSchemaPropsOrBool::Schema(a) => Some(a),
        JSONSchemaPropsOrBool::Bool(_) => None,
    }
}

/// Compiles `source`, refusing variables other than `self` and `oldSelf`.
fn compile(source: &str) -> Result<Program, String> {
    let program = catch_unwind(|| Program::compile(source))
        .map_err(|_| "the expression could not be parsed".to_string())?
        .map_err(|e| e.to_string())?;
    let mut free = Vec::new();
    free_variables(program.expression(), &mut Vec::new(), &mut free);
    free.retain(|v| !VARIABLES.contains(&v.as_str()));
    free.sort_unstable();
    if let Some(v) = free.first() {
        return Err(format!("undeclared reference to '{v}'"));
    }
    Ok(program)
}

/// The identifiers `e` reads that no enclosing macro binds (`x` in `l.all(x, x > 0)` is bound).
fn free_variables(e: &IdedExpr, bound: &mut Vec<String>, out: &mut Vec<String>) {
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            if !name.starts_with('@') && !bound.contains(name) && !out.contains(name) {
                out.push(name.clone());
            }
        }
        Expr::Call(call) => {
            if let Some(t) = &call.target {
                free_variables(t, bound, out);
            }
            for a in &call.args {
                free_variables(a, bound, out);
            }
        }
        Expr::Comprehension(c) => {
            free_variables(&c.iter_range, bound, out);
            free_variables(&c.accu_init, bound, out);
            let before = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            free_variables(&c.loop_cond, bound, out);
            free_variables(&c.loop_step, bound, out);
            free_variables(&c.result, bound, out);
            bound.truncate(before);
        }
        Expr::List(l) => {
            for x in &l.elements {
                free_variables(x, bound, out);
            }
        }
        Expr::Select(s) => free_variables(&s.operand, bound, out),
        Expr::Map(m) => entries(&m.entries, bound, out),
        Expr::Struct(s) => entries(&s.entries, bound, out),
    }
}

fn entries(list: &[IdedEntryExpr], bound: &mut Vec<String>, out: &mut Vec<String>) {
    for entry in list {
        match &entry.expr {
            EntryExpr::StructField(f) => free_variables(&f.value, bound, out),
            EntryExpr::MapEntry(m) => {
                free_variables(&m.key, bound, out);
                free_variables(&m.value, bound, out);
            }
        }
    }
}

/// The problems of the rules of a schema, with `path` the schema's own field path in the
/// definition, as Kubernetes reports them when a definition is created or updated.
pub fn compile_errors(s: &Schema, path: &str) -> Vec<Cause> {
    let mut out = Vec::new();
    Rules::build(s, path, &mut out);
    out
}

impl Rules {
    /// The compiled rules of a schema; rules that do not compile are left out (a definition
    /// holding one is refused by [`compile_errors`]).
    pub fn compile(s: &Schema) -> Rules {
        Rules::build(s, "", &mut Vec::new())
    }

    fn is_empty(&self) -> bool {
        self.here.is_empty()
            && self.properties.is_empty()
            && self.additional.is_none()
            && self.items.is_none()
    }

    fn build(s: &Schema, path: &str, errors: &mut Vec<Cause>) -> Rules {
        let mut out = Rules::default();
        for (i, r) in s.x_kubernetes_validations.iter().flatten().enumerate() {
            let at = format!("{path}.x-kubernetes-validations[{i}]");
            if r.rule.trim().is_empty() {
                errors.push(Cause {
                    reason: "FieldValueRequired".into(),
                    field: format!("{at}.rule"),
                    message: "Required value: rule is not specified".into(),
                });
                continue;
            }
            let program = match compile(&r.rule) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(Cause::invalid(
                        format!("{at}.rule"),
                        format!("{:?}", r.rule),
                        &format!("compilation failed: {e}"),
                    ));
                    continue;
                }
            };
            let message = match r.message_expression.as_deref().filter(|m| !m.is_empty()) {
                None => None,
                Some(m) => match compile(m) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        errors.push(Cause::invalid(
                            format!("{at}.messageExpression"),
                            format!("{m:?}"),
                            &format!("messageExpression compilation failed: {e}"),
                        ));
                        continue;
                    }
                },
            };
            if let Some(reason) = r.reason.as_deref() {
                if !matches!(
                    reason,
                    "FieldValueInvalid"
                        | "FieldValueForbidden"
                        | "FieldValueRequired"
                        | "FieldValueDuplicate"
                ) {
                    errors.push(Cause {
                        reason: "FieldValueNotSupported".into(),
                        field: format!("{at}.reason"),
                        message: format!("Unsupported value: {reason:?}: supported values: \"FieldValueDuplicate\", \"FieldValueForbidden\", \"FieldValueInvalid\", \"FieldValueRequired\""),
                    });
                    continue;
                }
            }
            let transition = program.references().has_variable("oldSelf");
            out.here.push(Rule {
                spec: r.clone(),
                program,
                message,
                transition,
            });
        }
        for (k, ps) in s.properties.iter().flatten() {
            let r = Rules::build(ps, &format!("{path}.properties[{k}]"), errors);
            if !r.is_empty() {
                out.properties.insert(k.clone(), r);
            }
        }
        if let Some(a) = additional(s) {
            let r = Rules::build(a, &format!("{path}.additionalProperties"), errors);
            if !r.is_empty() {
                out.additional = Some(Box::new(r));
            }
        }
        if let Some(is) = item_schema(s) {
            let r = Rules::build(is, &format!("{path}.items"), errors);
            if !r.is_empty() {
                out.items = Some(Box::new(r));
            }
        }
        out
    }

    /// Evaluates the rules against `new` (and `old`, on updates); `s` is the schema the rules
    /// were compiled from.
    pub fn validate(&self, s: &Schema, new: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
        if !self.is_empty() {
            self.check(s, new, old, "", causes);
        }
    }

    fn check(
        &self,
        s: &Schema,
        v: &Value,
        old: Option<&Value>,
        path: &str,
        causes: &mut Vec<Cause>,
    ) {
        if v.is_null() {
            return;
        }
        if !self.here.is_empty() {
            let this = to_cel(s, v);
            let before = old.filter(|o| !o.is_null()).map(|o| to_cel(s, o));
            for r in &self.here {
                if r.transition && before.is_none() {
                    continue;
                }
                if let Some(c) = evaluate(r, s, &this, before.as_ref(), path) {
                    causes.push(c);
                }
            }
        }
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let child = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let was = old.and_then(|o| o.get(k));
                    if let Some((r, ps)) = self
                        .properties
                        .get(k)
                        .zip(s.properties.as_ref().and_then(|p| p.get(k)))
                    {
                        r.check(ps, x, was, &child, causes);
                    } else if s.properties.as_ref().is_none_or(|p| !p.contains_key(k)) {
                        if let Some((r, a)) = self.additional.as_deref().zip(additional(s)) {
                            r.check(a, x, was, &child, causes);
                        }
                    }
                }
            }
            Value::Array(list) => {
                let (Some(r), Some(is)) = (self.items.as_deref(), item_schema(s)) else {
                    return;
                };
                let olds = old.and_then(Value::as_array);
                for (i, x) in list.iter().enumerate() {
                    let was = olds.and_then(|o| correlate(s, x, o));
                    r.check(is, x, was, &format!("{path}[{i}]"), causes);
                }
            }
            _ => {}
        }
    }
}

/// The old item an item of a list corresponds to: by its keys in a `map` list, by equality
/// in a `set`; the items of atomic lists have none, as in Kubernetes.
fn correlate<'a>(s: &Schema, item: &Value, old: &'a [Value]) -> Option<&'a Value> {
    match s.x_kubernetes_list_type.as_deref() {
        Some("map") => {
            let keys = s.x_kubernetes_list_map_keys.as_deref().unwrap_or(&[]);
            if keys.is_empty() {
                return None;
            }
            old.iter()
                .find(|o| keys.iter().all(|k| o.get(k) == item.get(k)))
        }
        Some("set") => old.iter().find(|o| *o == item),
        _ => None,
    }
}

/// A JSON value as CEL sees it, its numbers typed by the schema (`number` fields are doubles
/// even when written without a fraction).
fn to_cel(s: &Schema, v: &Value) -> Cel {
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => {
            if s.type_.as_deref() == Some("number") {
                Cel::Float(n.as_f64().unwrap_or(0.0))
            } else if let Some(i) = n.as_i64() {
                Cel::Int(i)
            } else if let Some(u) = n.as_u64() {
                Cel::UInt(u)
            } else {
                Cel::Float(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(x) => Cel::String(Arc::new(x.clone())),
        Value::Array(list) => {
            let is = item_schema(s);
            let empty = Schema::default();
            let is = is.unwrap_or(&empty);
            Cel::List(Arc::new(list.iter().map(|x| to_cel(is, x)).collect()))
        }
        Value::Object(m) => {
            let empty = Schema::default();
            let map: HashMap<String, Cel> = m
                .iter()
                .map(|(k, x)| {
                    let ps = s
                        .properties
                        .as_ref()
                        .and_then(|p| p.get(k))
                        .or_else(|| additional(s))
                        .unwrap_or(&empty);
                    (k.clone(), to_cel(ps, x))
                })
                .collect();
            Cel::Map(map.into())
        }
    }
}

/// The schema type of a node, as Kubernetes prints it as the invalid value.
fn type_of(s: &Schema) -> String {
    let t = s.type_.as_deref().unwrap_or("");
    if t.is_empty() && s.x_kubernetes_int_or_string == Some(true) {
        "\"\"".into()
    } else {
        format!("{t:?}")
    }
}

/// `failed rule: RULE`, or the rule's message.
fn rule_text(r: &ValidationRule) -> String {
    match r
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        Some(m) => m.to_string(),
        None => r.rule.trim().to_string(),
    }
}

/// The field path of a node (`<nil>` for the root, as Kubernetes prints an empty path).
fn shown_path(path: &str) -> String {
    if path.is_empty() {
        "<nil>".into()
    } else {
        path.to_string()
    }
}

/// `path` + a rule's `fieldPath` (`.spec.max`, `.x['y']`, `.list[0]`).
fn with_field_path(path: &str, field_path: &str) -> String {
    let rel = field_path.trim().trim_start_matches('.');
    if rel.is_empty() {
        return shown_path(path);
    }
    if path.is_empty() {
        rel.to_string()
    } else if rel.starts_with('[') {
        format!("{path}{rel}")
    } else {
        format!("{path}.{rel}")
    }
}

fn run(p: &Program, ctx: &Context<'_, '_>) -> Result<Cel, String> {
    match catch_unwind(AssertUnwindSafe(|| p.execute(ctx))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the evaluation failed".into()),
    }
}

/// A rule's verdict on a value: `None` when it holds.
fn evaluate(r: &Rule, s: &Schema, this: &Cel, old: Option<&Cel>, path: &str) -> Option<Cause> {
    let mut ctx = Context::default();
    ctx.add_variable_from_value("self", this.clone());
    if let Some(o) = old {
        ctx.add_variable_from_value("oldSelf", o.clone());
    }
    let ty = type_of(s);
    match run(&r.program, &ctx) {
        Ok(Cel::Bool(true)) => None,
        Ok(Cel::Bool(false)) => {
            let field = match r.spec.field_path.as_deref() {
                Some(fp) if !fp.is_empty() => with_field_path(path, fp),
                _ => shown_path(path),
            };
            let from_expression = r.message.as_ref().and_then(|m| match run(m, &ctx) {
                Ok(Cel::String(text)) if !text.trim().is_empty() && !text.contains('\n') => {
                    Some(text.trim().to_string())
                }
                _ => None,
            });
            let detail = from_expression.unwrap_or_else(|| {
                match r
                    .spec
                    .message
                    .as_deref()
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                {
                    Some(m) => m.to_string(),
                    None => format!("failed rule: {}", rule_text(&r.spec)),
                }
            });
            Some(match r.spec.reason.as_deref() {
                Some("FieldValueForbidden") => Cause::forbidden(field, &detail),
                Some("FieldValueRequired") => Cause {
                    reason: "FieldValueRequired".into(),
                    field,
                    message: format!("Required value: {detail}"),
                },
                Some("FieldValueDuplicate") => Cause {
                    reason: "FieldValueDuplicate".into(),
                    field,
                    message: format!("Duplicate value: {ty}"),
                },
                _ => Cause::invalid(field, ty, &detail),
            })
        }
        Ok(other) => Some(Cause::invalid(
            shown_path(path),
            ty,
            &format!(
                "rule evaluated to {:?}, not a bool: {}",
                other.type_of(),
                rule_text(&r.spec)
            ),
        )),
        Err(e) => Some(Cause::invalid(
            shown_path(path),
            ty,
            &format!("{e} evaluating rule: {}", rule_text(&r.spec)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: Value) -> Schema {
        serde_json::from_value(v).unwrap()
    }

    fn widget() -> Schema {
        schema(json!({"type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.spec.replicas <= self.spec.max"},
        ],
        "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [{
                "rule": "!has(self.tier) || self.tier.startsWith('gold')",
                "message": "tier must start with gold",
                "fieldPath": ".tier",
                "reason": "FieldValueForbidden",
            }],
            "properties": {
            "replicas": {"type": "integer"},
            "max": {"type": "integer"},
            "tier": {"type": "string"},
            "name": {"type": "string", "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "name is immutable"},
            ]},
            "ports": {"type": "array", "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object",
                    "x-kubernetes-validations": [
                        {"rule": "self.port > 0 && size(self.name) <= 5",
                         "messageExpression": "'port ' + self.name + ' is invalid'"},
                        {"rule": "self.port == oldSelf.port"},
                    ],
                    "properties": {
                        "name": {"type": "string"},
                        "port": {"type": "integer"},
                    }}},
        }}}}))
    }

    fn check(new: Value, old: Option<Value>) -> Vec<String> {
        let s = widget();
        assert!(compile_errors(&s, "schema").is_empty());
        let mut c = Vec::new();
        Rules::compile(&s).validate(&s, &new, old.as_ref(), &mut c);
        c.iter().map(|c| format!("{}|{}", c.reason, c)).collect()
    }

    #[test]
    fn a_rule_on_the_root_sees_the_whole_object() {
        assert!(check(json!({"spec": {"replicas": 3, "max": 5}}), None).is_empty());
        assert_eq!(
            check(json!({"spec": {"replicas": 6, "max": 5}}), None),
            [
                r#"FieldValueInvalid|<nil>: Invalid value: "object": failed rule: self.spec.replicas <= self.spec.max"#
            ]
        );
    }

    #[test]
    fn messages_field_paths_and_reasons_are_the_rules() {
        assert_eq!(
            check(
                json!({"spec": {"replicas": 1, "max": 5, "tier": "silver"}}),
                None
            ),
            ["FieldValueForbidden|spec.tier: Forbidden: tier must start with gold"]
        );
        assert!(check(
            json!({"spec": {"replicas": 1, "max": 5, "tier": "gold-1"}}),
            None
        )
        .is_empty());
    }

    #[test]
    fn a_rule_on_list_items_names_the_item() {
        let got = check(
            json!({"spec": {"replicas": 1, "max": 5, "ports": [
                {"name": "http", "port": 80},
                {"name": "toolong", "port": 0},
            ]}}),
            None,
        );
        assert_eq!(
            got,
            [
                r#"FieldValueInvalid|spec.ports[1]: Invalid value: "object": port toolong is invalid"#
            ]
        );
    }

    #[test]
    fn transition_rules_run_only_where_an_old_value_exists() {
        let new = json!({"spec": {"replicas": 1, "max": 5, "name": "b",
            "ports": [{"name": "a", "port": 2}, {"name": "b", "port": 3}]}});
        // On create there is no oldSelf: the rules are skipped.
        assert!(check(new.clone(), None).is_empty());
        // Unchanged: they hold.
        assert!(check(new.clone(), Some(new.clone())).is_empty());
        let old = json!({"spec": {"replicas": 1, "max": 5, "name": "a",
            "ports": [{"name": "b", "port": 4}]}});
        assert_eq!(
            check(new, Some(old)),
            [
                r#"FieldValueInvalid|spec.name: Invalid value: "string": name is immutable"#,
                r#"FieldValueInvalid|spec.ports[1]: Invalid value: "object": failed rule: self.port == oldSelf.port"#,
            ]
        );
    }

    #[test]
    fn evaluation_errors_are_causes_not_panics() {
        // `self.spec.max` is missing: CEL's "no such key".
        let got = check(json!({"spec": {"replicas": 1}}), None);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with(r#"FieldValueInvalid|<nil>: Invalid value: "object": No such key: max evaluating rule: self.spec.replicas <= self.spec.max"#),
            "{got:?}"
        );
    }

    #[test]
    fn rules_that_do_not_compile_are_reported_on_the_schema() {
        let s = schema(
            json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [
                {"rule": "self.a <="},
                {"rule": "self.a == other"},
                {"rule": ""},
                {"rule": "true", "reason": "Nope"},
            ]}}}),
        );
        let c = compile_errors(&s, "spec.versions[0].schema.openAPIV3Schema");
        let at =
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations";
        let fields: Vec<&str> = c.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                format!("{at}[0].rule"),
                format!("{at}[1].rule"),
                format!("{at}[2].rule"),
                format!("{at}[3].reason"),
            ]
        );
        assert!(
            c[0].message
                .starts_with(r#"Invalid value: "self.a <=": compilation failed: "#),
            "{c:?}"
        );
        assert!(
            c[1].message
                .ends_with("compilation failed: undeclared reference to 'other'"),
            "{c:?}"
        );
        assert_eq!(c[2].reason, "FieldValueRequired");
    }

    #[test]
    fn the_standard_functions_and_macros_work() {
        let s = schema(
            json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {
                "name": {"type": "string"},
                "ratio": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            }}}}),
        );
        let v = json!({"spec": {"name": "web-1", "ratio": 1, "tags": ["a", "bb"],
            "labels": {"app": "web"}}});
        let rules = [
            "has(self.spec.name) && !has(self.spec.other)",
            "size(self.spec.tags) == 2 && self.spec.tags.size() == 2",
            "self.spec.name.matches('^[a-z]+-[0-9]$')",
            "self.spec.name.startsWith('web') && self.spec.name.endsWith('-1')",
            "self.spec.name.contains('b-')",
            "self.spec.tags.all(t, size(t) <= 2) && self.spec.tags.exists(t, t == 'bb')",
            "self.spec.tags.exists_one(t, t == 'a')",
            "self.spec.tags.map(t, t + '!') == ['a!', 'bb!']",
            "self.spec.tags.filter(t, t != 'a') == ['bb']",
            "'app' in self.spec.labels && 'a' in self.spec.tags",
            "self.spec.ratio == 1.0 && int(self.spec.ratio) == 1 && string(2) == '2'",
            "timestamp('2024-01-01T00:00:00Z') + duration('1h') > timestamp('2024-01-01T00:00:00Z')",
        ];
        for rule in rules {
            let mut with = s.clone();
            with.x_kubernetes_validations = Some(vec![ValidationRule {
                rule: rule.into(),
                ..Default::default()
            }]);
            assert!(compile_errors(&with, "schema").is_empty(), "{rule}");
            let mut c = Vec::new();
            Rules::compile(&with).validate(&with, &v, None, &mut c);
            assert!(c.is_empty(), "{rule}: {c:?}");
        }
    }
}
