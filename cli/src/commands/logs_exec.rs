//! What `logs` and `exec` need besides the client: which pod a job's logs come from.

use super::*;

impl Ctx {
    /// The pod `logs job/NAME` reads, as kubectl picks it: among the Job's pods (by its
    /// selector), a running one before a finished one, then the oldest.
    pub(super) async fn first_pod_of_job(&self, job: &str) -> Result<String> {
        let j = self
            .client
            .get_dyn(resource("jobs")?, Some(&self.ns), job)
            .await?;
        let labels = meta::string_map(j.pointer("/spec/selector/matchLabels"));
        let sel: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let list = self
            .client
            .list_dyn(
                resource("pods")?,
                Some(&self.ns),
                Some(&sel.join(",")),
                None,
            )
            .await?;
        let mut pods: Vec<&Value> = list["items"].as_array().into_iter().flatten().collect();
        pods.sort_by_key(|p| {
            (
                p.pointer("/status/phase").and_then(Value::as_str) != Some("Running"),
                p.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        });
        match pods.first() {
            Some(p) => Ok(meta::name(p).to_string()),
            None => bail!("no pods found for job {job}"),
        }
    }
}
