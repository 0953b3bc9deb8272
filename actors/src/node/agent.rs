//! The agent, on every node: the remotable face of the node's engine. The control actor tells
//! it to run or cancel flow runs; every heartbeat interval it reports the node to the control
//! actor (its address, role, flows and slots) and learns the cluster's membership back.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_cluster::wire::{ClusterStatus, MemberStatus};
use flotilla_runtime::{FlowRunId, NodeId};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorClusterMessage;

use super::control::ControlMsg;
use super::plane::control_actor;
use super::typed::Wire;
use crate::engine::EngineHandle;

/// The process group of a node's agent.
pub fn agent_group(node: &NodeId) -> String {
    format!("flotilla.agent.{node}")
}

/// A node's agent, looked up afresh.
pub fn agent_of(node: &NodeId) -> Option<ActorRef<AgentMsg>> {
    ractor::pg::get_members(&agent_group(node))
        .into_iter()
        .next()
        .map(ActorRef::from)
}

/// Messages of an agent (remotable).
#[derive(RactorClusterMessage)]
#[allow(missing_debug_implementations)]
pub enum AgentMsg {
    /// Run this flow run here; the run as placed, when the control node had it at hand.
    Run(Wire<(FlowRunId, Option<Box<flotilla_runtime::FlowRun>>)>),
    /// Cancel this flow run if it runs here.
    Cancel(Wire<FlowRunId>),
    /// Time to report to the control node.
    Tick,
}

/// What an agent starts from.
#[allow(missing_debug_implementations)]
pub struct AgentArgs {
    /// This node.
    pub node: NodeId,
    /// Where it listens.
    pub addr: String,
    /// `control` or `worker`.
    pub role: String,
    /// Its engine.
    pub engine: EngineHandle,
    /// Its slots.
    pub slots: u32,
    /// The work queues it serves (empty: all).
    pub queues: Vec<String>,
    /// How often it reports.
    pub heartbeat_every: Duration,
    /// Where the latest membership it learned goes.
    pub view: Arc<RwLock<ClusterStatus>>,
    /// This start of the node (its start time in microseconds): what tells one life of a node
    /// from the next.
    pub incarnation: u64,
    /// A worker's own connection to the control node, for heartbeats (None: through the
    /// cluster session, as the control node's own agent does).
    pub link: Option<Arc<super::link::ControlLink>>,
}

/// The agent actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Agent;

impl Actor for Agent {
    type Msg = AgentMsg;
    type State = AgentArgs;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(agent_group(&args.node), vec![myself.get_cell()]);
        myself.send_interval(args.heartbeat_every, || AgentMsg::Tick);
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Run(start) => match start.get() {
                Ok((id, known)) => drop(s.engine.run_known(id, known)),
                Err(e) => tracing::error!(error = %e, "an undecodable run to start"),
            },
            AgentMsg::Cancel(id) => match id.get() {
                Ok(id) => drop(s.engine.cancel(id)),
                Err(e) => tracing::error!(error = %e, "an undecodable run to cancel"),
            },
            AgentMsg::Tick => {
                let Some(control) = control_actor() else {
                    return Ok(());
                };
                let (running, queued) = s.engine.load().await.unwrap_or((0, 0));
                let holds = s.engine.held().await.unwrap_or_default();
                let report = MemberStatus {
                    name: s.node.clone(),
                    addr: s.addr.clone(),
                    role: s.role.clone(),
                    reachable: true,
                    slots_used: u32::try_from(running + queued).unwrap_or(u32::MAX),
                    slots_total: s.slots,
                    flows: s.engine.flow_names(),
                    queues: s.queues.clone(),
                    last_heartbeat: None,
                    incarnation: s.incarnation,
                    holds,
                    flow_options: s.engine.flow_defaults(),
                };
                let view = s.view.clone();
                let timeout = s.heartbeat_every * 4;
                // Once the control node is known, heartbeats go on the node's own connection to
                // it, never behind bulk traffic in the cluster session.
                if let Some(link) = s.link.clone().filter(|l| l.knows_control()) {
                    tokio::spawn(async move {
                        let request = flotilla_cluster::wire::Request::Heartbeat(Box::new(report));
                        if let Ok(Ok(flotilla_cluster::wire::Response::Status(status))) =
                            tokio::time::timeout(timeout, link.ask(request)).await
                            && let Ok(mut v) = view.write()
                        {
                            *v = status;
                        }
                    });
                    return Ok(());
                }
                // Not awaited here: a slow control node must not stall the agent.
                tokio::spawn(async move {
                    if let Ok(ractor::rpc::CallResult::Success(reply)) = control
                        .call(
                            |port| ControlMsg::Heartbeat(Wire::new(report), port),
                            Some(timeout),
                        )
                        .await
                        && let Ok(status) = reply.get()
                        && let Ok(mut v) = view.write()
                    {
                        *v = status;
                    }
                });
            }
        }
        Ok(())
    }
}
