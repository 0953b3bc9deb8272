//! The control actor carrying out the control machine's effects: appends to the log, starts sent
//! to nodes, runs read back from the store, slot holdings logged before their holders hear of
//! them; and the reads of the store that give the control machine what it starts from.

use super::*;

/// The largest parameters (as the log estimates them) a run's start carries to its node; a
/// node reads a run with larger ones.
pub(super) const START_PARAMS_MAX: usize = 256 * 1024;

impl ControlState {
    /// Feeds the control machine one input and carries out what it decides.
    pub(super) fn drive(&mut self, input: Input<SlotReply>) {
        let mut effects: std::collections::VecDeque<Effect<SlotReply>> =
            self.machine.handle(now(), input).into();
        while let Some(effect) = effects.pop_front() {
            match effect {
                Effect::Append(command) => drop(self.persistence.enqueue(command)),
                Effect::DeclareDead { node, command } => self.declare_dead(node, command),
                Effect::Start { node, mut placement } => {
                    // The run travels with its start unless its parameters are large (the node
                    // reads it then): a start stays far below a frame's limit. The size is the
                    // log's estimate, taken without encoding them.
                    let known = placement
                        .known
                        .take()
                        .filter(|r| flotilla_runtime::command::json_size(&r.parameters) <= START_PARAMS_MAX);
                    tracing::debug!(%node, flow_run = %placement.run, "handing a run to a node");
                    let start = (placement.run, known);
                    if !send_agent(&node, AgentMsg::Run(Wire::new(start))) {
                        // The node went away since its last heartbeat: the run waits again.
                        let input = Input::StartFailed { node, placement };
                        effects.extend(self.machine.handle(now(), input));
                    }
                }
                Effect::Recheck { node, runs } => self.take_back(&node, runs),
                Effect::Hold {
                    holder,
                    node,
                    tags,
                    reply,
                    answer,
                } => self.record_hold(holder, node, tags, reply, answer),
                // A leader that no longer leads (or has heard no quorum for a second) answers
                // no slot request: a renewal it granted could outlast the lease its successor
                // counts. The holder asks again, or stops at its lease's end.
                Effect::Answer { reply, answer } if self.leads() => {
                    reply.send(answer);
                }
                Effect::Answer { .. } => tracing::debug!("a slot answer not sent: this node no longer leads"),
                Effect::Notice(notice) => match notice {
                    Notice::Unreachable { node, silent } => {
                        tracing::warn!(%node, silent_ms = silent.as_millis() as u64, "member unreachable");
                    }
                    Notice::Reachable(node) => tracing::info!(%node, "member reachable"),
                    Notice::LeaseLapsed { tag, holder } => {
                        tracing::warn!(%tag, %holder, "a slot's lease lapsed; the slot is free again");
                    }
                },
            }
        }
    }

    /// Whether this node still leads the control state (always, without replication).
    fn leads(&self) -> bool {
        self.replication.as_ref().is_none_or(|v| {
            use openraft::async_runtime::WatchReceiver as _;
            v.raft.metrics().borrow_watched().state.is_leader()
                && !crate::replication::machine::quorum_lost(&v.raft)
        })
    }

    /// Runs handed to `node` that it does not run: each is placed again if it still waits
    /// (Scheduled, claimed by nobody).
    pub(super) fn take_back(&self, node: &NodeId, runs: Vec<FlowRunId>) {
        for run in runs {
            let p = self.persistence.clone();
            let node = node.clone();
            tokio::spawn(async move {
                if let Ok(Some(r)) = p.flow_run(run).await
                    && r.lifecycle.state.kind == StateType::Scheduled
                    && r.owner.is_none()
                    && let Some(me) = local_control()
                {
                    tracing::warn!(%node, flow_run = %run, "a run handed to the node is not running there; placing it again");
                    let placement = placement_of(&p, &r, r.expected_start_time).await;
                    let _ = me.cast(ControlMsg::TakeBack(Wire::new(placement)));
                }
            });
        }
    }

    /// Declares a node dead (its runs crash), then resumes on other nodes the runs that
    /// [`resume_after_loss`] says are to be: each is placed again once it is Scheduled under its
    /// next epoch.
    pub(super) fn declare_dead(&self, node: NodeId, command: Command) {
        let p = self.persistence.clone();
        tokio::spawn(async move {
            let crashed = match p.submit(command).await {
                Ok(Ok(Reply::NodeCrashed { crashed, .. })) => crashed,
                Ok(Ok(other)) => {
                    tracing::error!(%node, answer = ?other, "an unexpected answer to a node's death");
                    return;
                }
                Ok(Err(refusal)) => {
                    tracing::error!(%node, %refusal, "a node's death was refused");
                    return;
                }
                Err(e) => {
                    tracing::error!(%node, error = %e, "a node's death could not be recorded");
                    return;
                }
            };
            for id in crashed {
                let Ok(Some(run)) = p.flow_run(id).await else {
                    continue;
                };
                let Some(resume) = resume_after_loss(&run, &node) else {
                    continue;
                };
                match p.submit(resume).await {
                    Ok(Ok(Reply::Retried { epoch, .. })) => {
                        tracing::info!(%node, flow_run = %id, epoch = epoch.get(), "resuming a run of a lost node elsewhere");
                        match p.flow_run(id).await {
                            Ok(Some(r)) => replace(placement_of(&p, &r, now()).await),
                            other => {
                                tracing::warn!(flow_run = %id, answer = ?other, "a resumed run could not be read back")
                            }
                        }
                    }
                    other => {
                        tracing::warn!(%node, flow_run = %id, answer = ?other, "a run of a lost node could not be resumed")
                    }
                }
            }
        });
    }

    /// Records that `holder` holds these slots, then sends it `answer`; a holding not recorded,
    /// or a holder gone, gives the slots back.
    pub(super) fn record_hold(
        &self,
        holder: TaskRunId,
        node: NodeId,
        tags: Vec<String>,
        reply: SlotReply,
        answer: SlotAnswer,
    ) {
        let recorded = self
            .persistence
            .enqueue(Command::Slots(flotilla_runtime::SlotChange::Hold {
                holder,
                node,
                tags,
            }));
        tokio::spawn(async move {
            let ok = matches!(recorded.await, Ok(Ok(Ok(_))));
            if !ok || !reply.send(answer) {
                give_back(vec![holder]);
            }
        });
    }
}

/// Gives slots back through the control actor (a grant that could not be delivered).
pub(super) fn give_back(holders: Vec<TaskRunId>) {
    match local_control() {
        Some(me) => {
            let _ = me.cast(ControlMsg::Slots(Wire::new(SlotRequest::Release(holders))));
        }
        None => tracing::warn!(?holders, "no control actor to give slots back to"),
    }
}

/// Follows the store's events for the control actor: a run that ends frees its slots; after
/// missed events, what runs is read back. Reads back what runs first.
pub(super) fn follow_ends(p: PersistenceHandle, me: ActorRef<ControlMsg>) {
    let mut events = p.subscribe();
    tokio::spawn(async move {
        restore(&p, &me).await;
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(run) = ended_run(&e) {
                        let _ = me.cast(ControlMsg::Ended(Wire::new(run)));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "the control actor missed events; reading back what runs"
                    );
                    restore(&p, &me).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

/// Runs a restarted node resumed (their ids): each placed as it is now, if it still waits.
pub(super) fn place_resumed(p: PersistenceHandle, ids: Vec<FlowRunId>) {
    tokio::spawn(async move {
        for id in ids {
            if let Ok(Some(r)) = p.flow_run(id).await
                && r.lifecycle.state.kind == StateType::Scheduled
            {
                replace(placement_of(&p, &r, now()).await);
            }
        }
    });
}

/// The flow run an event says ended.
pub(super) fn ended_run(e: &flotilla_runtime::Event) -> Option<FlowRunId> {
    let state = e.event.strip_prefix("flotilla.flow-run.")?;
    if !matches!(state, "Completed" | "Failed" | "Cancelled" | "Crashed") {
        return None;
    }
    e.resource.id()?.strip_prefix("flotilla.flow-run.")?.parse().ok()
}

/// Reads back the work queues and the runs that run now, for the control actor.
pub(super) async fn restore(p: &PersistenceHandle, me: &ActorRef<ControlMsg>) {
    reload_settings(p, me).await;
    match p.slot_holds().await {
        Ok(holds) => {
            let _ = me.cast(ControlMsg::Holds(Wire::new(holds)));
        }
        Err(e) => tracing::error!(error = %e, "cannot read the slot holders"),
    }
    restore_running(p, me).await;
}

/// Reads back the work queues and tag limits, for the control actor.
pub(super) async fn reload_settings(p: &PersistenceHandle, me: &ActorRef<ControlMsg>) {
    match p.settings().await {
        Ok(settings) => {
            let (mut queues, mut limits) = (Vec::new(), Vec::new());
            for s in settings {
                match s {
                    flotilla_runtime::Setting::WorkQueue(q) => queues.push(q),
                    flotilla_runtime::Setting::ConcurrencyLimit(l) => limits.push(l),
                    flotilla_runtime::Setting::Automation(_) | flotilla_runtime::Setting::Block(_) => {}
                }
            }
            let _ = me.cast(ControlMsg::Queues(Wire::new(queues)));
            let _ = me.cast(ControlMsg::Limits(Wire::new(limits)));
        }
        Err(e) => tracing::error!(error = %e, "cannot read the work queues"),
    }
}

/// Reads back the runs that run now, for the control actor.
pub(super) async fn restore_running(p: &PersistenceHandle, me: &ActorRef<ControlMsg>) {
    let mut running = Vec::new();
    for state in [StateType::Pending, StateType::Running, StateType::Cancelling] {
        let mut after = None;
        loop {
            let page = match p.flow_runs(RunFilter::State(state), after, PAGE_MAX).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the runs running");
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            running.extend(
                page.into_iter()
                    .filter(|r| r.parent_task_run.is_none())
                    .map(|r| Running {
                        run: r.id,
                        queue: r.work_queue.clone(),
                        deployment: r.deployment_id,
                        node: r.owner.clone(),
                    }),
            );
        }
    }
    let _ = me.cast(ControlMsg::Restore(Wire::new(running)));
    // Runs made without a deployment and not started: placed; those of deployments are the
    // scheduler's to hand out, held until it does (so that a start sent before this restart
    // cannot run one beside its deployment's limit).
    let mut held = Vec::new();
    let mut after = None;
    loop {
        let page = match p
            .flow_runs(RunFilter::State(StateType::Scheduled), after, PAGE_MAX)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the runs waiting");
                return;
            }
        };
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for r in page {
            if r.parent_task_run.is_some() || r.owner.is_some() {
                continue;
            }
            if r.deployment_id.is_some() {
                held.push(r.id);
            } else {
                replace(placement_of(p, &r, r.expected_start_time).await);
            }
        }
    }
    let _ = me.cast(ControlMsg::Held(Wire::new(held)));
}

/// Hands a run back to the control actor's placement (it waits until a node can take it).
pub(super) fn replace(p: Placement) {
    match local_control() {
        Some(me) => {
            if let Err(e) = me.cast(ControlMsg::Place(Wire::new(p))) {
                tracing::warn!(error = %e, "a run to place could not be handed to the control actor");
            }
        }
        None => tracing::warn!(flow_run = %p.run, "no control actor to place a run"),
    }
}

/// How a run is placed: its queue, and its deployment's limit read from the store.
pub(crate) async fn placement_of(
    p: &PersistenceHandle,
    run: &flotilla_runtime::FlowRun,
    due: Timestamp,
) -> Placement {
    let deployment = match run.deployment_id {
        Some(id) => {
            let limit = p
                .deployment(id)
                .await
                .ok()
                .flatten()
                .and_then(|d| d.concurrency_limit.map(|l| (l, d.collision)));
            Some((id, limit))
        }
        None => None,
    };
    Placement {
        run: run.id,
        flow: run.flow_name.clone(),
        due,
        queue: run.work_queue.clone(),
        deployment,
        known: Some(Box::new(run.clone())),
    }
}

/// Sends a node's agent a message; false (and a log line) when it cannot be reached.
pub(crate) fn send_agent(node: &NodeId, msg: AgentMsg) -> bool {
    match agent_of(node) {
        Some(agent) => match agent.cast(msg) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%node, error = %e, "cannot reach the node's agent");
                false
            }
        },
        None => {
            tracing::warn!(%node, "the node's agent is not connected");
            false
        }
    }
}
