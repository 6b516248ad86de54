//! Changing objects in place: `scale`, `set image`, `label`, `taint`.

use skiff_api::k8s::api::core::v1::{Node, Taint};
use skiff_client::Patch;

use super::*;

impl Ctx {
    /// `scale TYPE/NAME --replicas`, through the scale subresource.
    pub(super) async fn scale(&self, t: Vec<String>, replicas: i64) -> Result<()> {
        let (r, n) = target(&t)?;
        if !r.has_scale {
            bail!("cannot scale a {}", r.kind);
        }
        self.client
            .patch_dyn(
                r,
                Some(&self.ns),
                &n,
                Some("scale"),
                MERGE,
                &json!({"spec": {"replicas": replicas}}),
            )
            .await?;
        println!(
            "{}/{n} scaled",
            print::name_of(r, &json!({})).trim_end_matches('/')
        );
        Ok(())
    }

    /// `set image TYPE/NAME CONTAINER=IMAGE…`.
    pub(super) async fn set(&self, what: SetWhat) -> Result<()> {
        let SetWhat::Image { target: t, pairs } = what;
        let (r, n) = target(std::slice::from_ref(&t))?;
        let obj = self.client.get_dyn(r, Some(&self.ns), &n).await?;
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|p| {
                p.split_once('=')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("expected CONTAINER=IMAGE, got {p:?}"))
            })
            .collect::<Result<_>>()?;
        let patch = verbs::set_image_patch(&obj, &pairs)?;
        self.client
            .patch_dyn(r, Some(&self.ns), &n, None, SMP, &patch)
            .await?;
        println!("{} image updated", print::name_of(r, &obj));
        Ok(())
    }

    /// `label KIND NAME key=value key-…`.
    pub(super) async fn label(
        &self,
        kind: String,
        name: String,
        labels: Vec<String>,
        overwrite: bool,
    ) -> Result<()> {
        let r = resource(&kind)?;
        let obj = self.client.get_dyn(r, Some(&self.ns), &name).await?;
        let current = meta::labels(&obj);
        let mut patch = serde_json::Map::new();
        for l in &labels {
            if let Some(k) = l.strip_suffix('-') {
                patch.insert(k.to_string(), Value::Null);
            } else if let Some((k, v)) = l.split_once('=') {
                if current.get(k).is_some_and(|c| c != v) && !overwrite {
                    bail!(
                        "'{k}' already has a value ({}), and --overwrite is false",
                        current[k]
                    );
                }
                patch.insert(k.to_string(), json!(v));
            } else {
                bail!("invalid label {l:?}: use key=value or key-");
            }
        }
        self.client
            .patch_dyn(
                r,
                Some(&self.ns),
                &name,
                None,
                MERGE,
                &json!({"metadata": {"labels": patch}}),
            )
            .await?;
        println!("{} labeled", print::name_of(r, &obj));
        Ok(())
    }

    /// `taint nodes NAME key=value:Effect key:Effect-…`.
    pub(super) async fn taint(
        &self,
        kind: String,
        name: String,
        taints: Vec<String>,
    ) -> Result<()> {
        let r = resource(&kind)?;
        if r.kind != "Node" {
            bail!("taints apply to nodes only");
        }
        let node = self.client.get::<Node>(None, &name).await?;
        let current = node.spec.and_then(|s| s.taints).unwrap_or_default();
        let list = apply_taints(current, &taints)?;
        let patch = Patch::Merge(json!({"spec": {"taints": list}}));
        self.client.patch::<Node>(None, &name, &patch).await?;
        println!("node/{name} tainted");
        Ok(())
    }
}

/// `taint` arguments applied to a node's taints: `key=value:Effect` adds (or replaces the
/// taint of that key and effect), `key:Effect-` or `key-` removes.
fn apply_taints(mut list: Vec<Taint>, taints: &[String]) -> Result<Vec<Taint>> {
    for t in taints {
        if let Some(rm) = t.strip_suffix('-') {
            let (key, effect) = rm
                .split_once(':')
                .map(|(k, e)| (k, Some(e)))
                .unwrap_or((rm, None));
            let before = list.len();
            list.retain(|x| !(x.key == key && effect.is_none_or(|e| x.effect == e)));
            if list.len() == before {
                bail!("taint {rm:?} not found");
            }
        } else {
            let (kv, effect) = t
                .split_once(':')
                .ok_or_else(|| anyhow!("invalid taint {t:?}: use key=value:Effect"))?;
            if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
                bail!("invalid taint effect {effect:?}: use NoSchedule, PreferNoSchedule or NoExecute");
            }
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            list.retain(|x| !(x.key == k && x.effect == effect));
            list.push(Taint {
                key: k.to_string(),
                effect: effect.to_string(),
                value: Some(v.to_string()).filter(|v| !v.is_empty()),
                time_added: None,
            });
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_are_added_replaced_and_removed() {
        let keys = |l: &[Taint]| -> Vec<String> {
            l.iter()
                .map(|t| {
                    format!(
                        "{}={}:{}",
                        t.key,
                        t.value.as_deref().unwrap_or(""),
                        t.effect
                    )
                })
                .collect()
        };
        let l = apply_taints(vec![], &["a=1:NoSchedule".into(), "b:NoExecute".into()]).unwrap();
        assert_eq!(keys(&l), ["a=1:NoSchedule", "b=:NoExecute"]);
        assert_eq!(l[1].value, None, "no value: none written");
        let l = apply_taints(l, &["a=2:NoSchedule".into()]).unwrap();
        assert_eq!(keys(&l), ["b=:NoExecute", "a=2:NoSchedule"]);
        let l = apply_taints(l, &["a-".into(), "b:NoExecute-".into()]).unwrap();
        assert!(l.is_empty());
        assert!(apply_taints(vec![], &["a-".into()]).is_err());
        assert!(apply_taints(vec![], &["a=1:Sometimes".into()]).is_err());
        assert!(apply_taints(vec![], &["a=1".into()]).is_err());
    }
}
