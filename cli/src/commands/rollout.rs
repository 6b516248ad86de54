//! `rollout status|history|undo` of Deployments and DaemonSets.

use super::*;

impl Ctx {
    /// A deployment and every ReplicaSet of its namespace (its revisions are among them).
    pub(super) async fn deployment_and_replicasets(
        &self,
        name: &str,
    ) -> Result<(Value, Vec<Value>)> {
        let d = self
            .client
            .get_dyn(resource("deployments")?, Some(&self.ns), name)
            .await?;
        let rss = self
            .client
            .list_dyn(resource("replicasets")?, Some(&self.ns), None, None)
            .await?;
        Ok((d, rss["items"].as_array().cloned().unwrap_or_default()))
    }

    pub(super) async fn rollout(&self, what: RolloutWhat) -> Result<()> {
        let parse = |t: &str| -> Result<(&'static skiff_api::Resource, String)> {
            let (r, n) = target(&[t.to_string()])?;
            if r.kind != "Deployment" && r.kind != "DaemonSet" {
                bail!("rollout is supported for deployments and daemonsets only");
            }
            Ok((r, n))
        };
        match what {
            RolloutWhat::Status { target: t, timeout } => {
                let (r, name) = target(&[t.to_string()])?;
                if !matches!(r.kind, "Deployment" | "DaemonSet" | "StatefulSet") {
                    bail!("rollout status is supported for deployments, daemonsets and statefulsets only");
                }
                let deadline = (timeout > 0)
                    .then(|| tokio::time::Instant::now() + Duration::from_secs(timeout));
                let mut last = String::new();
                loop {
                    let d = self.client.get_dyn(r, Some(&self.ns), &name).await?;
                    let (done, msg) = if r.kind == "DaemonSet" {
                        verbs::daemonset_rollout_status(&d)?
                    } else {
                        verbs::rollout_status(&d)?
                    };
                    if msg != last {
                        println!("{msg}");
                        last = msg;
                    }
                    if done {
                        return Ok(());
                    }
                    // A Deployment, DaemonSet or StatefulSet: read as JSON.
                    let rv = d["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    let fs = format!("metadata.name={name}");
                    let mut stream = Box::pin(
                        self.client
                            .watch_dyn(r, Some(&self.ns), Some(&rv), Some(&fs), None)
                            .await?,
                    );
                    let wait = async {
                        while let Some(ev) = stream.next().await {
                            if ev.is_err() || ev.is_ok_and(|e| e.kind != "BOOKMARK") {
                                break;
                            }
                        }
                    };
                    match deadline {
                        Some(dl) => {
                            if tokio::time::timeout_at(dl, wait).await.is_err() {
                                bail!("timed out waiting for the condition");
                            }
                        }
                        None => wait.await,
                    }
                }
            }
            RolloutWhat::History { target: t } => {
                let (r, name) = parse(&t)?;
                let history = if r.kind == "DaemonSet" {
                    let (d, items) = self.daemonset_and_revisions(&name).await?;
                    println!("daemonset.apps/{name}");
                    verbs::daemonset_history(&d, &items)?
                } else {
                    let (d, items) = self.deployment_and_replicasets(&name).await?;
                    println!("deployment.apps/{name}");
                    verbs::history(&d, &items)?
                };
                let mut rows = vec![vec!["REVISION".to_string(), "CHANGE-CAUSE".to_string()]];
                rows.extend(history.into_iter().map(|(r, c)| vec![r.to_string(), c]));
                print::print_rows(&rows);
                Ok(())
            }
            RolloutWhat::Undo {
                target: t,
                to_revision,
            } => {
                let (r, name) = parse(&t)?;
                let (patch, rev, content_type) = if r.kind == "DaemonSet" {
                    let (d, items) = self.daemonset_and_revisions(&name).await?;
                    let (patch, rev) = verbs::daemonset_rollback_patch(&d, &items, to_revision)?;
                    (patch, rev, "application/strategic-merge-patch+json")
                } else {
                    let (d, items) = self.deployment_and_replicasets(&name).await?;
                    let (patch, rev) = verbs::rollback_patch(&d, &items, to_revision)?;
                    (patch, rev, "application/json-patch+json")
                };
                self.client
                    .patch_dyn(r, Some(&self.ns), &name, None, content_type, &patch)
                    .await?;
                println!("{}.apps/{name} rolled back (to revision {rev})", r.singular);
                Ok(())
            }
        }
    }

    pub(super) async fn daemonset_and_revisions(&self, name: &str) -> Result<(Value, Vec<Value>)> {
        let d = self
            .client
            .get_dyn(resource("daemonsets")?, Some(&self.ns), name)
            .await?;
        let revs = self
            .client
            .list_dyn(resource("controllerrevisions")?, Some(&self.ns), None, None)
            .await?;
        Ok((d, revs["items"].as_array().cloned().unwrap_or_default()))
    }
}
