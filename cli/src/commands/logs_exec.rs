//! What `logs` and `exec` need besides the client: which pod a job's logs come from.

use skiff_api::k8s::api::batch::v1::Job;
use skiff_api::k8s::api::core::v1::Pod;
use skiff_client::ListParams;

use super::*;

impl Ctx {
    /// The pod `logs job/NAME` reads, as kubectl picks it: among the Job's pods (by its
    /// selector), a running one before a finished one, then the oldest.
    pub(super) async fn first_pod_of_job(&self, job: &str) -> Result<String> {
        let j = self.client.get::<Job>(Some(&self.ns), job).await?;
        let labels = j
            .spec
            .and_then(|s| s.selector)
            .and_then(|s| s.match_labels)
            .unwrap_or_default();
        let sel: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut pods = self
            .client
            .list::<Pod>(Some(&self.ns), &ListParams::labels(&sel.join(",")))
            .await?
            .items;
        pods.sort_by_key(|p| {
            (
                p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running"),
                p.metadata.creation_timestamp.clone(),
            )
        });
        match pods.first().and_then(|p| p.metadata.name.clone()) {
            Some(p) => Ok(p),
            None => bail!("no pods found for job {job}"),
        }
    }
}

impl Ctx {
    /// `exec POD -- COMMAND`: exits with the command's code.
    pub(super) async fn exec(&self, args: ExecArgs) -> Result<()> {
        let ExecArgs {
            pod,
            container,
            stdin,
            tty,
            command,
        } = args;
        let opts = skiff_client::exec::ExecOptions {
            container,
            command,
            stdin,
            tty,
        };
        let code = self
            .client
            .exec(
                &self.ns,
                &pod,
                &opts,
                tokio::io::stdin(),
                tokio::io::stdout(),
                tokio::io::stderr(),
            )
            .await?;
        if code != 0 {
            std::process::exit(code);
        }
        Ok(())
    }

    /// `logs POD|job/NAME`, streamed to stdout.
    pub(super) async fn logs(&self, args: LogsArgs) -> Result<()> {
        let LogsArgs {
            pod,
            container,
            follow,
            tail,
            previous,
        } = args;
        let mut q = Vec::new();
        if let Some(c) = container {
            q.push(format!("container={c}"));
        }
        if follow {
            q.push("follow=true".into());
        }
        if let Some(t) = tail {
            q.push(format!("tailLines={t}"));
        }
        if previous {
            q.push("previous=true".into());
        }
        let pod = match pod.split_once('/') {
            Some(("job" | "jobs" | "job.batch", job)) => self.first_pod_of_job(job).await?,
            Some(("pod" | "pods", p)) => p.to_string(),
            Some((kind, _)) => bail!("cannot get logs of {kind}: use a pod or job/NAME"),
            None => pod,
        };
        let path = format!(
            "/api/v1/namespaces/{}/pods/{pod}/log?{}",
            self.ns,
            q.join("&")
        );
        let resp = self.client.get_raw(&path).await?;
        let mut s = resp.bytes_stream();
        use std::io::Write;
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            std::io::stdout().write_all(&chunk)?;
            std::io::stdout().flush()?;
        }
        Ok(())
    }
}
