//! The control plane as the engine and the clients see it: the persistence actor of this node
//! (on the control node), or the control node's, reached over the cluster (on a worker). Both
//! keep the same promise: commands are applied in the order they are queued, and an answer
//! means the command is durable.

use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::{Command, Event, NodeId, TaskRunId, codec};
use ractor::ActorRef;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::control::{CONTROL_GROUP, ControlMsg};
use super::typed::Wire;
use crate::persistence::{PersistError, PersistenceHandle, Read, ReadReply, SubmitResult};
use flotilla_runtime::control::{SlotGrant, SlotRequest};

/// How long a worker keeps resending a command batch while the control node is unreachable.
pub const RESEND_FOR: Duration = Duration::from_secs(120);
/// How long one call to the control node may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The most commands sent to the control node in one call.
pub const BATCH_MAX: usize = 1024;
/// The most bytes (about) sent to the control node in one call: a batch never comes near the
/// cluster's frame limit, whatever its commands hold.
pub const BATCH_BYTES_MAX: usize = 512 * 1024;
/// The largest batch ever sent: over it the session's frame limit would close the session, so
/// such a command is failed here instead.
const SEND_BYTES_MAX: usize = 15 * 1024 * 1024;

/// The control plane.
#[derive(Clone, Debug)]
pub enum ControlPlane {
    /// This node's persistence actor.
    Local(PersistenceHandle),
    /// The control node's, over the cluster.
    Remote(RemoteControl),
}

impl From<PersistenceHandle> for ControlPlane {
    fn from(h: PersistenceHandle) -> Self {
        ControlPlane::Local(h)
    }
}

impl ControlPlane {
    /// Submits a command; answers once it is durable and applied.
    pub async fn submit(&self, command: Command) -> SubmitResult {
        self.enqueue(command).await.unwrap_or(Err(PersistError::Stopped))
    }

    /// Queues a command; the answer arrives on the channel. Order is kept.
    pub fn enqueue(&self, command: Command) -> oneshot::Receiver<SubmitResult> {
        match self {
            ControlPlane::Local(h) => h.enqueue(command),
            ControlPlane::Remote(r) => r.enqueue(command),
        }
    }

    /// Reads the control state.
    pub async fn read(&self, read: Read) -> Result<ReadReply, PersistError> {
        match self {
            ControlPlane::Local(h) => h.read(read).await,
            ControlPlane::Remote(r) => r.read(read).await,
        }
    }

    /// Events from now on, once durable (on the control node; a worker gets none).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        match self {
            ControlPlane::Local(h) => h.subscribe(),
            ControlPlane::Remote(r) => r.events.subscribe(),
        }
    }

    /// This node's persistence actor, when this is the control node.
    pub fn local(&self) -> Option<&PersistenceHandle> {
        match self {
            ControlPlane::Local(h) => Some(h),
            ControlPlane::Remote(_) => None,
        }
    }

    crate::read_helpers!();
}

/// The control node's persistence, reached through its control actor.
#[derive(Clone, Debug)]
pub struct RemoteControl {
    tx: mpsc::UnboundedSender<(Command, oneshot::Sender<SubmitResult>)>,
    events: broadcast::Sender<Arc<Event>>,
}

/// The control actor, found through its process group (ractor_cluster gives remote actors new
/// ids after a reconnect, so it is looked up afresh each time): this node's own when it leads.
pub fn control_actor() -> Option<ActorRef<ControlMsg>> {
    super::control::local_control().or_else(|| {
        ractor::pg::get_members(&CONTROL_GROUP.to_owned())
            .into_iter()
            .next()
            .map(ActorRef::from)
    })
}

/// Why a call to the control actor brought no answer.
#[derive(Debug)]
enum CallError {
    /// None came (no control node, no answer in time, the call dropped): worth sending again.
    NoAnswer(String),
    /// One came that could not be decoded.
    Undecodable(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoAnswer(e) => f.write_str(e),
            CallError::Undecodable(e) => write!(f, "an undecodable answer: {e}"),
        }
    }
}

async fn call<T: Send + 'static>(
    msg: impl FnOnce(ractor::RpcReplyPort<Wire<T>>) -> ControlMsg,
) -> Result<T, CallError> {
    let control =
        control_actor().ok_or_else(|| CallError::NoAnswer("no control node is connected".into()))?;
    match control.call(msg, Some(CALL_TIMEOUT)).await {
        Ok(ractor::rpc::CallResult::Success(reply)) => reply.get().map_err(CallError::Undecodable),
        Ok(ractor::rpc::CallResult::Timeout) => Err(CallError::NoAnswer(
            "the control node did not answer in time".into(),
        )),
        Ok(ractor::rpc::CallResult::SenderError) => {
            Err(CallError::NoAnswer("the control node dropped the call".into()))
        }
        Err(e) => Err(CallError::NoAnswer(e.to_string())),
    }
}

/// Asks the control actor a client's request (from this node, over the cluster's mutual TLS).
pub async fn request(
    request: flotilla_cluster::wire::Request,
) -> Result<flotilla_cluster::wire::Response, String> {
    call(|port| ControlMsg::Request(Wire::new(request), port))
        .await
        .map_err(|e| e.to_string())
}

impl RemoteControl {
    /// Starts forwarding commands to the control node, in order, in batches.
    pub fn start() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Command, oneshot::Sender<SubmitResult>)>();
        tokio::spawn(async move {
            let mut next = None;
            loop {
                let first = match next.take() {
                    Some(x) => x,
                    None => match rx.recv().await {
                        Some(x) => x,
                        None => break,
                    },
                };
                // Capped by count and by bytes (fix 3: a batch of large log lines made a frame
                // over the session's limit, which closed the session again and again).
                let mut bytes = first.0.size_hint();
                let mut batch = vec![first];
                while batch.len() < BATCH_MAX && bytes < BATCH_BYTES_MAX {
                    match rx.try_recv() {
                        Ok(x) if bytes + x.0.size_hint() > BATCH_BYTES_MAX => {
                            next = Some(x);
                            break;
                        }
                        Ok(x) => {
                            bytes += x.0.size_hint();
                            batch.push(x);
                        }
                        Err(_) => break,
                    }
                }
                let (commands, acks): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
                let results = forward(&commands).await;
                for (ack, r) in acks.into_iter().zip(results) {
                    let _ = ack.send(r);
                }
            }
        });
        let (events, _) = broadcast::channel(1);
        RemoteControl { tx, events }
    }

    fn enqueue(&self, command: Command) -> oneshot::Receiver<SubmitResult> {
        let (ack, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, ack))) = self.tx.send((command, ack)) {
            let _ = ack.send(Err(PersistError::Stopped));
        }
        answer
    }

    async fn read(&self, read: Read) -> Result<ReadReply, PersistError> {
        let mut last = String::new();
        for attempt in 0..3u32 {
            match call(|port| ControlMsg::Read(Wire::new(read.clone()), port)).await {
                Ok(reply) => return reply,
                Err(e @ CallError::Undecodable(_)) => return Err(PersistError::Read(e.to_string())),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        Err(PersistError::Read(format!(
            "the control node cannot be read: {last}"
        )))
    }
}

/// Sends a batch until the control node answers (resends are safe: every command has an
/// idempotency key), for at most [`RESEND_FOR`].
async fn forward(commands: &[Command]) -> Vec<SubmitResult> {
    let fail = |e: PersistError| commands.iter().map(|_| Err(e.clone())).collect();
    // The size hints are never below the encoded size: only a batch they put over the limit is
    // encoded here to measure it (the message encodes it again when it crosses to the control
    // node).
    if commands.iter().map(Command::size_hint).sum::<usize>() > SEND_BYTES_MAX {
        match codec::encode(commands) {
            Ok(b) if b.len() > SEND_BYTES_MAX => {
                return fail(PersistError::Encode(format!(
                    "a command of {} bytes is over the {SEND_BYTES_MAX} a node sends the control node at once",
                    b.len()
                )));
            }
            Ok(_) => {}
            Err(e) => return fail(PersistError::Encode(e.to_string())),
        }
    }
    let deadline = tokio::time::Instant::now() + RESEND_FOR;
    let mut backoff = Duration::from_millis(50);
    loop {
        let answer = match call(|port| ControlMsg::Submit(Wire::new(commands.to_vec()), port)).await {
            // The lead moved while the batch was under way: send it again, to the new leader.
            Ok(results)
                if results
                    .iter()
                    .any(|r| matches!(r, Err(PersistError::NotLeader { .. }))) =>
            {
                Err(CallError::NoAnswer("the control node no longer leads".into()))
            }
            other => other,
        };
        match answer {
            Ok(results) if results.len() == commands.len() => return results,
            Ok(_) => {
                return fail(PersistError::Read(
                    "the control node answered a different batch".into(),
                ));
            }
            Err(e @ CallError::Undecodable(_)) => {
                return fail(PersistError::Read(e.to_string()));
            }
            Err(e) => {
                if tokio::time::Instant::now() >= deadline {
                    return fail(PersistError::LogWrite(format!(
                        "the control node is unreachable: {e}"
                    )));
                }
                tracing::debug!(error = %e, "resending to the control node");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Tag-limit slots from the control node, wherever it is.
#[derive(Debug)]
pub struct ControlSlots {
    node: NodeId,
}

impl ControlSlots {
    /// Slots for task runs of this node.
    pub fn new(node: NodeId) -> Self {
        ControlSlots { node }
    }
}

/// How long one wait for slots lasts before it is asked again (the control node keeps the
/// place in line of a holder that asks again).
const SLOT_WAIT: Duration = Duration::from_secs(10);

impl crate::engine::limits::SlotService for ControlSlots {
    fn acquire(&self, holder: TaskRunId, tags: Vec<String>) -> crate::engine::BoxFuture<Option<Duration>> {
        let node = self.node.clone();
        Box::pin(async move {
            let request = SlotRequest::Acquire { holder, node, tags };
            let mut backoff = Duration::from_millis(50);
            loop {
                let answer = match control_actor() {
                    Some(control) => {
                        let request = Wire::new(request.clone());
                        control
                            .call(|port| ControlMsg::AcquireSlots(request, port), Some(SLOT_WAIT))
                            .await
                            .ok()
                    }
                    None => None,
                };
                match answer {
                    Some(ractor::rpc::CallResult::Success(reply)) => match reply.get() {
                        Ok(SlotGrant::Held { ttl }) => return Some(ttl),
                        Ok(SlotGrant::Unlimited) => return None,
                        Err(e) => tracing::error!(error = %e, "an undecodable slot grant"),
                    },
                    // Still waiting in line: ask again (the place is kept).
                    Some(ractor::rpc::CallResult::Timeout) => continue,
                    Some(ractor::rpc::CallResult::SenderError) | None => {
                        // No control node now: try again shortly.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
        })
    }

    fn renew(&self, holder: TaskRunId, tags: Vec<String>) -> crate::engine::BoxFuture<Option<bool>> {
        let request = SlotRequest::Renew {
            holder,
            node: self.node.clone(),
            tags,
        };
        Box::pin(async move {
            let control = control_actor()?;
            match control
                .call(
                    |port| ControlMsg::RenewSlots(Wire::new(request), port),
                    Some(CALL_TIMEOUT),
                )
                .await
            {
                Ok(ractor::rpc::CallResult::Success(reply)) => reply.get().ok(),
                _ => None,
            }
        })
    }

    fn release(&self, holders: Vec<TaskRunId>) {
        if let Some(control) = control_actor() {
            let _ = control.cast(ControlMsg::Slots(Wire::new(SlotRequest::Release(holders))));
        }
    }
}
