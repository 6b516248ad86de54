//! `create`, `run` and `expose`: objects made from flags.

use skiff_api::k8s::api::batch::v1::CronJob;

use super::*;

impl Ctx {
    /// `create KIND …` and `create -f`.
    pub(super) async fn create(
        &self,
        what: Option<CreateWhat>,
        filename: Vec<String>,
    ) -> Result<()> {
        match what {
            Some(CreateWhat::Deployment {
                name,
                image,
                port,
                replicas,
            }) => {
                let d = verbs::deployment(&name, &image, port, replicas);
                self.client
                    .create_dyn(resource("deployments")?, Some(&self.ns), &d)
                    .await?;
                println!("deployment.apps/{name} created");
                Ok(())
            }
            Some(CreateWhat::Job {
                name,
                image,
                from,
                command,
            }) => {
                let j = match (image, from) {
                    (_, Some(from)) => {
                        let Some(cj) = from
                            .strip_prefix("cronjob/")
                            .or_else(|| from.strip_prefix("cronjobs/"))
                            .or_else(|| from.strip_prefix("cj/"))
                        else {
                            bail!("from must be an existing cronjob: cronjob/NAME, not {from:?}");
                        };
                        let cj = self.client.get::<CronJob>(Some(&self.ns), cj).await?;
                        serde_json::to_value(verbs::job_from_cronjob(&name, &cj))?
                    }
                    (Some(image), None) => verbs::job(&name, &image, &command),
                    (None, None) => bail!("--image or --from is required"),
                };
                self.client
                    .create_dyn(resource("jobs")?, Some(&self.ns), &j)
                    .await?;
                println!("job.batch/{name} created");
                Ok(())
            }
            Some(CreateWhat::CronJob {
                name,
                image,
                schedule,
                command,
            }) => {
                let cj = verbs::cronjob(&name, &image, &schedule, &command);
                self.client
                    .create_dyn(resource("cronjobs")?, Some(&self.ns), &cj)
                    .await?;
                println!("cronjob.batch/{name} created");
                Ok(())
            }
            Some(CreateWhat::Namespace { name }) => {
                self.client
                    .create_dyn(
                        resource("namespaces")?,
                        None,
                        &json!({"metadata": {"name": name}}),
                    )
                    .await?;
                println!("namespace/{name} created");
                Ok(())
            }
            Some(CreateWhat::Service {
                kind,
                name,
                tcp,
                node_port,
            }) => {
                let s = verbs::service(&kind, &name, &tcp, node_port)?;
                self.client
                    .create_dyn(resource("services")?, Some(&self.ns), &s)
                    .await?;
                println!("service/{name} created");
                Ok(())
            }
            None if !filename.is_empty() => self.apply_files(&filename, Mode::Create).await,
            None => bail!(
                "must specify one of -f or a resource to create (deployment, job, cronjob, namespace, service)"
            ),
        }
    }

    /// `run NAME --image …`: one pod.
    pub(super) async fn run_pod(&self, args: RunArgs) -> Result<()> {
        let RunArgs {
            name,
            image,
            restart,
            port,
            command,
            args,
        } = args;
        let p = verbs::pod(&name, &image, &restart, port, &args, command);
        self.client
            .create_dyn(resource("pods")?, Some(&self.ns), &p)
            .await?;
        println!("pod/{name} created");
        Ok(())
    }

    /// `expose TYPE/NAME`: a Service selecting what the target selects.
    pub(super) async fn expose(&self, args: ExposeArgs) -> Result<()> {
        let ExposeArgs {
            target: t,
            service_type,
            port,
            target_port,
            node_port,
            name,
        } = args;
        let (r, n) = target(&t)?;
        let obj = self.client.get_dyn(r, Some(&self.ns), &n).await?;
        let svc = verbs::expose(
            &obj,
            name.as_deref(),
            &service_type,
            port,
            target_port.as_deref(),
            node_port,
        )?;
        let created = self
            .client
            .create_dyn(resource("services")?, Some(&self.ns), &svc)
            .await?;
        println!("service/{} exposed", meta::name(&created));
        Ok(())
    }
}
