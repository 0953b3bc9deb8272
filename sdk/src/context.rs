//! The flow run a body runs in, as a task-local: task calls inside a flow find it here.

use flotilla_actors::engine::FlowEnv;
use flotilla_runtime::FlowRunId;

tokio::task_local! {
    static CONTEXT: FlowContext;
}

/// What a flow body can know of its run.
#[derive(Clone, Debug)]
pub struct FlowContext {
    env: FlowEnv,
}

impl FlowContext {
    pub(crate) fn new(env: FlowEnv) -> Self {
        FlowContext { env }
    }

    pub(crate) fn env(&self) -> &FlowEnv {
        &self.env
    }

    /// The flow run's id.
    pub fn flow_run_id(&self) -> FlowRunId {
        self.env.flow_run()
    }

    /// The flow's name.
    pub fn flow_name(&self) -> &str {
        self.env.flow_name()
    }

    /// The run's parameters, as JSON.
    pub fn parameters(&self) -> &serde_json::Value {
        self.env.parameters()
    }

    /// Records an event named `name` about `resource` (which needs a `flotilla.resource.id`
    /// label), with related resources (this flow run among them) and a JSON payload; durable
    /// once answered, with its id.
    pub async fn emit_event(
        &self,
        name: &str,
        resource: flotilla_runtime::Resource,
        related: Vec<flotilla_runtime::Resource>,
        payload: serde_json::Value,
    ) -> Result<flotilla_runtime::EventId, crate::Error> {
        let event = flotilla_runtime::Event::user(name, crate::client::now(), resource, related, payload);
        match self.env.emit_event(event).await? {
            Ok(flotilla_runtime::Reply::EventAppended { id }) => Ok(id),
            Ok(other) => Err(crate::Error::Storage(
                flotilla_actors::persistence::PersistError::Read(format!("unexpected answer {other:?}")),
            )),
            Err(refusal) => Err(crate::Error::Refused(refusal)),
        }
    }

    /// A block's fields, unsealed (`TYPE/NAME`, such as `env/prod`), as JSON: given by the
    /// control node only while this run runs here under its epoch. Keep it in memory only.
    pub async fn block_json(&self, reference: &str) -> Result<serde_json::Value, crate::Error> {
        let mut got = self
            .env
            .resolve_blocks(vec![reference.to_owned()])
            .await
            .map_err(crate::Error::Unavailable)?;
        got.pop()
            .map(|(_, v)| v)
            .ok_or_else(|| crate::Error::Unavailable(format!("block {reference} was not given")))
    }

    /// A block of a type the SDK knows, by name: `ctx.block::<flotilla::S3Block>("lake")`.
    pub async fn block<T: flotilla_runtime::block::TypedBlock>(&self, name: &str) -> Result<T, crate::Error> {
        let reference = format!("{}/{name}", T::TYPE);
        let v = self.block_json(&reference).await?;
        serde_json::from_value(v).map_err(|e| crate::Error::Unavailable(format!("block {reference}: {e}")))
    }

    /// The value of a `secret` block.
    pub async fn secret(&self, name: &str) -> Result<String, crate::Error> {
        Ok(self
            .block::<flotilla_runtime::block::SecretBlock>(name)
            .await?
            .value)
    }

    /// Runs `fut` with this context set.
    pub(crate) async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CONTEXT.scope(self, fut).await
    }
}

/// The context of the flow run the calling code runs in, if any (inside a flow body; not
/// inside a task body, which runs on its own).
pub fn context() -> Option<FlowContext> {
    CONTEXT.try_with(|c| c.clone()).ok()
}
