//! Typed reads shared by every handle on the control state (local or remote): each is a
//! [`Read`](crate::persistence::Read) and the matching reply.

/// Expands, inside an `impl` whose type has `async fn read(&self, Read) -> Result<ReadReply,
/// PersistError>`, the typed read helpers.
#[macro_export]
#[doc(hidden)]
macro_rules! read_helpers {
    () => {
        /// A flow run.
        pub async fn flow_run(
            &self,
            id: flotilla_runtime::FlowRunId,
        ) -> Result<Option<flotilla_runtime::FlowRun>, $crate::persistence::PersistError> {
            match self.read($crate::persistence::Read::FlowRun(id)).await? {
                $crate::persistence::ReadReply::FlowRun(r) => Ok(r.map(|b| *b)),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// A page of flow runs.
        pub async fn flow_runs(
            &self,
            filter: $crate::persistence::RunFilter,
            after: Option<flotilla_runtime::FlowRunId>,
            limit: usize,
        ) -> Result<Vec<flotilla_runtime::FlowRun>, $crate::persistence::PersistError> {
            match self
                .read($crate::persistence::Read::FlowRuns {
                    filter,
                    after,
                    limit,
                })
                .await?
            {
                $crate::persistence::ReadReply::FlowRuns(r) => Ok(r),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// A task run.
        pub async fn task_run(
            &self,
            id: flotilla_runtime::TaskRunId,
        ) -> Result<Option<flotilla_runtime::TaskRun>, $crate::persistence::PersistError> {
            match self.read($crate::persistence::Read::TaskRun(id)).await? {
                $crate::persistence::ReadReply::TaskRun(r) => Ok(r.map(|b| *b)),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// A page of a flow run's task runs.
        pub async fn task_runs(
            &self,
            flow_run: flotilla_runtime::FlowRunId,
            after: Option<flotilla_runtime::TaskRunId>,
            limit: usize,
        ) -> Result<Vec<flotilla_runtime::TaskRun>, $crate::persistence::PersistError> {
            match self
                .read($crate::persistence::Read::TaskRuns {
                    flow_run,
                    after,
                    limit,
                })
                .await?
            {
                $crate::persistence::ReadReply::TaskRuns(r) => Ok(r),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// A page of a flow run's state history (None: no such run).
        pub async fn flow_run_history(
            &self,
            run: flotilla_runtime::FlowRunId,
            offset: usize,
            limit: usize,
        ) -> Result<Option<Vec<flotilla_runtime::State>>, $crate::persistence::PersistError> {
            match self
                .read($crate::persistence::Read::FlowRunHistory { run, offset, limit })
                .await?
            {
                $crate::persistence::ReadReply::History(h) => Ok(h),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// The unexpired cached Completed state for a cache key at `now`.
        pub async fn cached(
            &self,
            key: String,
            now: flotilla_runtime::Timestamp,
        ) -> Result<Option<flotilla_runtime::State>, $crate::persistence::PersistError> {
            match self
                .read($crate::persistence::Read::Cached { key, now })
                .await?
            {
                $crate::persistence::ReadReply::Cached(s) => Ok(s),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// A page of events after an id.
        pub async fn events(
            &self,
            after: Option<flotilla_runtime::EventId>,
            limit: usize,
        ) -> Result<Vec<flotilla_runtime::Event>, $crate::persistence::PersistError> {
            match self
                .read($crate::persistence::Read::Events { after, limit })
                .await?
            {
                $crate::persistence::ReadReply::Events(e) => Ok(e),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// A deployment.
        pub async fn deployment(
            &self,
            id: flotilla_runtime::DeploymentId,
        ) -> Result<Option<flotilla_runtime::Deployment>, $crate::persistence::PersistError> {
            match self.read($crate::persistence::Read::Deployment(id)).await? {
                $crate::persistence::ReadReply::Deployment(d) => Ok(d.map(|b| *b)),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// Every work queue and tag limit, by key.
        /// The answer remembered for a client's request (encoded as it was sent).
        pub async fn answer_to(
            &self,
            request_id: flotilla_runtime::control::RequestId,
        ) -> Result<Option<Vec<u8>>, $crate::persistence::PersistError> {
            let now = flotilla_runtime::Timestamp::from(chrono::Utc::now());
            match self
                .read($crate::persistence::Read::Answer { request_id, now })
                .await?
            {
                $crate::persistence::ReadReply::Answer(a) => Ok(a),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// Who holds the slots of tag limits, as recorded (None: never recorded).
        pub async fn slot_holds(
            &self,
        ) -> Result<
            Option<
                Vec<(
                    String,
                    flotilla_runtime::TaskRunId,
                    flotilla_runtime::NodeId,
                )>,
            >,
            $crate::persistence::PersistError,
        > {
            match self.read($crate::persistence::Read::SlotHolds).await? {
                $crate::persistence::ReadReply::SlotHolds(s) => Ok(s),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        pub async fn settings(
            &self,
        ) -> Result<Vec<flotilla_runtime::Setting>, $crate::persistence::PersistError> {
            match self.read($crate::persistence::Read::Settings).await? {
                $crate::persistence::ReadReply::Settings(s) => Ok(s),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// A deployment, by name.
        pub async fn deployment_by_name(
            &self,
            name: &str,
        ) -> Result<Option<flotilla_runtime::Deployment>, $crate::persistence::PersistError> {
            match self
                .read($crate::persistence::Read::DeploymentByName(name.to_owned()))
                .await?
            {
                $crate::persistence::ReadReply::Deployment(d) => Ok(d.map(|b| *b)),
                other => Err($crate::persistence::unexpected(other)),
            }
        }

        /// Every deployment, in name order.
        pub async fn all_deployments(
            &self,
        ) -> Result<Vec<flotilla_runtime::Deployment>, $crate::persistence::PersistError> {
            let mut all: Vec<flotilla_runtime::Deployment> = Vec::new();
            loop {
                let after = all.last().map(|d| d.name.clone());
                match self
                    .read($crate::persistence::Read::Deployments {
                        after,
                        limit: $crate::persistence::PAGE_MAX,
                    })
                    .await?
                {
                    $crate::persistence::ReadReply::Deployments(page) if page.is_empty() => return Ok(all),
                    $crate::persistence::ReadReply::Deployments(page) => all.extend(page),
                    other => return Err($crate::persistence::unexpected(other)),
                }
            }
        }

        /// Figures about the store.
        pub async fn stats(
            &self,
        ) -> Result<$crate::persistence::StoreStats, $crate::persistence::PersistError> {
            match self.read($crate::persistence::Read::Stats).await? {
                $crate::persistence::ReadReply::Stats(s) => Ok(s),
                other => Err($crate::persistence::unexpected(other)),
            }
        }
    };
}
