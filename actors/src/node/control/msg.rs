//! The control actor's messages.

use super::*;

/// Messages of the control actor (remotable: every payload is encoded bytes).
#[derive(RactorClusterMessage)]
#[allow(missing_debug_implementations)]
pub enum ControlMsg {
    /// Commands, in order (encoded `Vec<Command>`); the answer is the encoded `Vec<SubmitResult>`.
    #[rpc]
    Submit(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A read (encoded `Read`); the answer is the encoded `Result<ReadReply, PersistError>`.
    #[rpc]
    Read(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A member's report (encoded `MemberStatus`); the answer is the encoded `ClusterStatus`.
    #[rpc]
    Heartbeat(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A client request (encoded `Request`); the answer is the encoded `Response`.
    #[rpc]
    Request(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A mutating client request with the client's id for it (encoded `(RequestId, Request)`):
    /// answered once, the answer remembered in the log, so that the request sent again — even
    /// after a restart of this node — gets the first answer instead of acting twice.
    #[rpc]
    Asked(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// The answer to an asked request (encoded `(RequestId, answer)`), remembered: it goes to
    /// every try of the request that arrived meanwhile.
    Answered(Vec<u8>),
    /// Place a run (an encoded [`Placement`]) on a live node that runs its flow and serves its
    /// queue, when its queue and deployment let it go.
    Place(Vec<u8>),
    /// A flow run ended (its id's 16 bytes): its slots free.
    Ended(Vec<u8>),
    /// The runs running now (encoded `Vec<Running>`), read back after a start or a missed event.
    Restore(Vec<u8>),
    /// The work queues now (encoded `Vec<WorkQueue>`).
    Queues(Vec<u8>),
    /// The tag limits now (encoded `Vec<ConcurrencyLimit>`).
    Limits(Vec<u8>),
    /// The slot holdings recorded before a start (encoded
    /// `Option<Vec<(tag, TaskRunId, NodeId)>>`; None: never recorded).
    Holds(Vec<u8>),
    /// A task run asks for slots of its tags (an encoded `SlotRequest::Acquire`); the answer, an
    /// encoded `SlotGrant`, comes when it holds them.
    #[rpc]
    AcquireSlots(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Leases released (an encoded `SlotRequest::Release`).
    Slots(Vec<u8>),
    /// A holder renews its leases (an encoded `SlotRequest::Renew`); the answer, an encoded
    /// `bool`, says whether it holds them (false: it lost its slots and must stop).
    #[rpc]
    RenewSlots(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Runs a restarted node resumed (their ids' 16 bytes each, encoded): placed as they are
    /// now, under their queue's and deployment's limits.
    Resumed(Vec<u8>),
    /// Time to look for silent members.
    Tick,
    /// A run handed to a node that never started it, still waiting (an encoded [`Placement`]):
    /// placed again.
    TakeBack(Vec<u8>),
}
