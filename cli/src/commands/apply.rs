//! `apply`, `create -f`, `delete -f`: manifests from files, and the apply patch.

use super::*;

pub(super) fn read_sources(files: &[String]) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for f in files {
        if f == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            docs.extend(verbs::documents(&s)?);
            continue;
        }
        let p = Path::new(f);
        let paths: Vec<std::path::PathBuf> = if p.is_dir() {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .with_context(|| format!("reading {f}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            v.sort();
            v
        } else {
            vec![p.to_path_buf()]
        };
        for path in paths {
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("the path {:?} does not exist", path.display().to_string())
            })?;
            docs.extend(verbs::documents(&text).with_context(|| format!("{}", path.display()))?);
        }
    }
    Ok(docs)
}

/// A strategic merge patch from the live object to the desired one: every field the desired
/// object sets, and `null` for fields the last applied configuration had but the new one drops.
pub(super) fn apply_patch(live: &Value, desired: &Value) -> Value {
    let last: Option<Value> = meta::annotations(live)
        .get("kubectl.kubernetes.io/last-applied-configuration")
        .and_then(|s| serde_json::from_str(s).ok());
    let mut patch = desired.clone();
    if let Some(last) = last {
        remove_dropped(&last, desired, &mut patch);
    }
    patch
}

pub(super) fn remove_dropped(last: &Value, desired: &Value, patch: &mut Value) {
    if let (Value::Object(l), Value::Object(d)) = (last, desired) {
        for (k, lv) in l {
            match d.get(k) {
                None => {
                    patch[k.as_str()] = Value::Null;
                }
                Some(dv) => {
                    if let Some(p) = patch.get_mut(k) {
                        remove_dropped(lv, dv, p);
                    }
                }
            }
        }
    }
}

impl Ctx {
    pub(super) async fn apply_files(&self, files: &[String], mode: Mode) -> Result<()> {
        let docs = read_sources(files)?;
        if docs.is_empty() {
            bail!(
                "no objects passed to {}",
                match mode {
                    Mode::Create => "create",
                    Mode::Apply => "apply",
                    Mode::Delete(_) => "delete",
                }
            );
        }
        // Check every document names a known kind before changing anything.
        let mut typed = Vec::new();
        for d in docs {
            let av = d["apiVersion"].as_str().unwrap_or("");
            let kind = d["kind"].as_str().unwrap_or("");
            // Manifests of any kind, known only from the document: handled as JSON.
            let r = Resource::by_kind(av, kind).ok_or_else(|| {
                anyhow!("resource mapping not found for kind {kind:?} in version {av:?}")
            })?;
            if meta::name(&d).is_empty() && d.pointer("/metadata/generateName").is_none() {
                bail!("{kind}: metadata.name is required");
            }
            typed.push((r, d));
        }
        for (r, d) in typed {
            let ns = self.ns_for(r, &d);
            let name = meta::name(&d).to_string();
            let shown = print::name_of(r, &d);
            match &mode {
                Mode::Create => {
                    self.client.create_dyn(r, ns, &d).await?;
                    println!("{shown} created");
                }
                Mode::Delete(p) => {
                    match self.client.delete_dyn(r, ns, &name, Some(p), None).await {
                        Ok(_) => println!("{shown} deleted"),
                        Err(e) if e.code() == Some(404) => {
                            eprintln!("Error from server (NotFound): {e}")
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Mode::Apply => {
                    let mut desired = d.clone();
                    let last = serde_json::to_string(&d)?;
                    if !desired["metadata"]["annotations"].is_object() {
                        desired["metadata"]["annotations"] = json!({});
                    }
                    desired["metadata"]["annotations"]
                        ["kubectl.kubernetes.io/last-applied-configuration"] = json!(last);
                    match self.client.get_dyn(r, ns, &name).await {
                        Err(e) if e.code() == Some(404) => {
                            self.client.create_dyn(r, ns, &desired).await?;
                            println!("{shown} created");
                        }
                        Err(e) => return Err(e.into()),
                        Ok(cur) => {
                            let patch = apply_patch(&cur, &desired);
                            let out = self
                                .client
                                .patch_dyn(r, ns, &name, None, SMP, &patch)
                                .await?;
                            let changed = out.pointer("/metadata/resourceVersion")
                                != cur.pointer("/metadata/resourceVersion");
                            println!(
                                "{shown} {}",
                                if changed { "configured" } else { "unchanged" }
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Ctx {
    /// `delete TYPE NAME…`, `delete TYPE/NAME…` or `delete -f`.
    pub(super) async fn delete(&self, args: DeleteArgs) -> Result<()> {
        let DeleteArgs {
            args,
            filename,
            cascade,
            grace_period,
            ignore_not_found,
        } = args;
        let propagation = match cascade.as_deref() {
            None | Some("background") | Some("true") => "Background",
            Some("foreground") => "Foreground",
            Some("orphan") | Some("false") => "Orphan",
            Some(o) => bail!("invalid --cascade {o:?}: use background, foreground or orphan"),
        };
        if !filename.is_empty() {
            return self
                .apply_files(&filename, Mode::Delete(propagation.to_string()))
                .await;
        }
        let pairs: Vec<(&'static Resource, String)> = match args.as_slice() {
            [] => bail!("you must provide one or more resources by TYPE NAME, TYPE/NAME or -f"),
            [one] if one.contains('/') => vec![target(std::slice::from_ref(one))?],
            [t, names @ ..] if !t.contains('/') && !names.is_empty() => {
                let r = resource(t)?;
                names.iter().map(|n| (r, n.clone())).collect()
            }
            all => all
                .iter()
                .map(|a| target(std::slice::from_ref(a)))
                .collect::<Result<_>>()?,
        };
        for (r, n) in pairs {
            match self
                .client
                .delete_dyn(r, Some(&self.ns), &n, Some(propagation), grace_period)
                .await
            {
                Ok(_) => println!(
                    "{} deleted",
                    print::name_of(r, &json!({"metadata": {"name": n}}))
                ),
                Err(e) if ignore_not_found && e.code() == Some(404) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
