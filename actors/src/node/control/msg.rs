//! The control actor's messages.

use super::*;

/// Messages of the control actor (remotable: each payload a [`Wire`], encoded only when it
/// crosses to another node).
#[derive(RactorClusterMessage)]
#[allow(missing_debug_implementations)]
pub enum ControlMsg {
    /// Commands, in order ; the answer is each one's result.
    #[rpc]
    Submit(Wire<Vec<Command>>, RpcReplyPort<Wire<Vec<SubmitResult>>>),
    /// A read, and its answer.
    #[rpc]
    Read(Wire<Read>, RpcReplyPort<Wire<Result<ReadReply, PersistError>>>),
    /// A member's report; the answer is the cluster's status.
    #[rpc]
    Heartbeat(Wire<MemberStatus>, RpcReplyPort<Wire<ClusterStatus>>),
    /// A client request, and its answer.
    #[rpc]
    Request(Wire<Request>, RpcReplyPort<Wire<Response>>),
    /// A mutating client request with the client's id for it:
    /// answered once, the answer remembered in the log, so that the request sent again — even
    /// after a restart of this node — gets the first answer instead of acting twice.
    #[rpc]
    Asked(Wire<(RequestId, Request)>, RpcReplyPort<Wire<Response>>),
    /// The answer to an asked request, remembered: it goes to
    /// every try of the request that arrived meanwhile.
    Answered(Wire<(RequestId, Response)>),
    /// Place a run on a live node that runs its flow and serves its
    /// queue, when its queue and deployment let it go.
    Place(Wire<Placement>),
    /// A flow run ended: its slots free.
    Ended(Wire<FlowRunId>),
    /// The runs running now, read back after a start or a missed event.
    Restore(Wire<Vec<Running>>),
    /// The work queues now.
    Queues(Wire<Vec<flotilla_runtime::WorkQueue>>),
    /// Runs of deployments waiting, read back after a start: held until the scheduler hands
    /// them out (a claim of one before is refused).
    Held(Wire<Vec<FlowRunId>>),
    /// The tag limits now.
    Limits(Wire<Vec<flotilla_runtime::ConcurrencyLimit>>),
    /// The slot holdings recorded before a start, (tag, holder, node) each (None: never
    /// recorded).
    Holds(Wire<Option<Vec<(String, TaskRunId, NodeId)>>>),
    /// A task run asks for slots of its tags (a `SlotRequest::Acquire`); the answer comes when it
    /// holds them.
    #[rpc]
    AcquireSlots(Wire<SlotRequest>, RpcReplyPort<Wire<SlotGrant>>),
    /// Leases released (a `SlotRequest::Release`).
    Slots(Wire<SlotRequest>),
    /// A holder renews its leases (a `SlotRequest::Renew`); the answer says whether it holds them (false: it lost its slots and must stop).
    #[rpc]
    RenewSlots(Wire<SlotRequest>, RpcReplyPort<Wire<bool>>),
    /// Runs a restarted node resumed: placed as they are
    /// now, under their queue's and deployment's limits.
    Resumed(Wire<Vec<FlowRunId>>),
    /// Time to look for silent members.
    Tick,
    /// A run handed to a node that never started it, still waiting:
    /// placed again.
    TakeBack(Wire<Placement>),
}
