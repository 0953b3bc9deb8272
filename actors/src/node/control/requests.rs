//! The client protocol on the control node: each request answered, work that waits on the
//! store on a task of its own; deployments, work queues, tag limits and events.

use super::*;

impl ControlState {
    /// Answers a client request. Work that waits on the store runs on a task of its own.
    pub(super) fn request(&mut self, request: Request, reply: RpcReplyPort<Wire<Response>>) {
        let p = self.persistence.clone();
        let answer = |reply: RpcReplyPort<Wire<Response>>, r: Response| {
            let _ = reply.send(Wire::new(r));
        };
        match request {
            Request::Status => answer(reply, Response::Status(self.status())),
            Request::Heartbeat(report) => {
                let status = self.heartbeat(*report);
                answer(reply, Response::Status(status));
            }
            Request::RemoveNode(node) => {
                use flotilla_runtime::control::machine::RemoveRefused;
                let r = match self.machine.remove_member(&node) {
                    Ok(()) => Response::Done,
                    Err(RemoveRefused::NotFound) => {
                        refused(ErrorKind::NotFound, format!("no member named {node}"))
                    }
                    Err(RemoveRefused::Reachable) => refused(
                        ErrorKind::Refused,
                        format!("{node} is reachable; stop it before removing it"),
                    ),
                };
                answer(reply, r);
            }
            Request::Voters(change) => {
                use crate::replication::voter::VoterChange as Change;
                use flotilla_cluster::wire::VoterChange as Asked;
                let Some(voter) = self.replication.clone() else {
                    return answer(
                        reply,
                        refused(
                            ErrorKind::Refused,
                            "the control state is not replicated: start the nodes with --voters",
                        ),
                    );
                };
                let change = match change {
                    Asked::Add(n) => Change::Add(n),
                    Asked::Remove(n) => Change::Remove(n),
                    Asked::TransferLeader(n) => Change::TransferLeader(n),
                };
                tokio::spawn(async move {
                    let r = match voter.change(change).await {
                        Ok(()) => Response::Status(ClusterStatus {
                            nodes: Vec::new(),
                            replication: Some(voter.status()),
                        }),
                        Err(why) => refused(ErrorKind::Refused, why),
                    };
                    answer(reply, r);
                });
            }
            Request::RunFlow {
                flow,
                params,
                id,
                idempotency_key,
            } => {
                let params = if params.is_null() {
                    serde_json::json!({})
                } else {
                    params
                };
                if let Some(f) = self.flows.get(&flow)
                    && let Err(e) = f.check_params(&params)
                {
                    return answer(
                        reply,
                        refused(ErrorKind::Invalid, format!("invalid parameters: {e}")),
                    );
                }
                // The client's id, the same on its retries: a resent request finds its run.
                let id = id.unwrap_or_else(|| FlowRunId::new(now(), &mut self.rng));
                if let Err(known) = self.machine.runs_flow(&flow) {
                    let msg = if known.contains(&flow) {
                        format!("no reachable node runs flow {flow:?} now")
                    } else {
                        format!("no node runs a flow named {flow:?} (known: {})", known.join(", "))
                    };
                    return answer(reply, refused(ErrorKind::Unavailable, msg));
                }
                let new = self
                    .catalog
                    .apply(NewFlowRun::new(id, flow, params))
                    .with_key(idempotency_key);
                // A run without a key is placed at once, beside its creation rather than after
                // it: a node's claim of it is queued after the creation, and the log keeps that
                // order, so the claim is refused if the creation is (and the node never runs
                // it). A keyed one may turn out to be an older run: placed once it is known.
                // (Large parameters are read by the node rather than sent: placed after.)
                let early = (new.idempotency_key.is_none()
                    && flotilla_runtime::command::json_size(&new.parameters) <= effects::START_PARAMS_MAX)
                    .then(|| flotilla_runtime::FlowRun::scheduled(new.clone(), now()));
                let created = p.enqueue(Command::CreateFlowRun(new));
                if let Some(run) = early.clone() {
                    let flow = run.flow_name.clone();
                    replace(Placement::plain(run.id, flow, now()).knowing(Box::new(run)));
                }
                tokio::spawn(async move {
                    let r = match created.await.unwrap_or(Err(PersistError::Stopped)) {
                        Ok(Ok(Reply::FlowRunCreated { run, created })) => {
                            // Placed like every run, in the default work queue: it goes to a
                            // node that serves it. (A run that existed was placed when made.)
                            let id = run.id;
                            if created && early.is_none() {
                                let flow = run.flow_name.clone();
                                replace(Placement::plain(id, flow, now()).knowing(run));
                            } else if !created && early.is_some() && run.lifecycle.state.is_terminal() {
                                // A resend of a run that has ended: placed again above, its
                                // start refused by the log; dispatch forgets it.
                                if let Some(me) = local_control() {
                                    let _ = me.cast(ControlMsg::Ended(Wire::new(id)));
                                }
                            }
                            Response::Ran(id)
                        }
                        Ok(Ok(other)) => {
                            refused(ErrorKind::Unavailable, format!("unexpected answer {other:?}"))
                        }
                        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Cancel(id) => {
                let tid = self.tid();
                tokio::spawn(async move {
                    let prop = Proposal::new(State::named(StateName::Cancelling, now()), tid);
                    let r = match p
                        .submit(Command::ProposeFlowRunState {
                            run: id,
                            proposal: prop,
                        })
                        .await
                    {
                        Ok(Ok(Reply::FlowRunTransition {
                            decision: Decision::Accept(s) | Decision::Reject(s),
                            ..
                        })) => {
                            // The owner as of the change (a claim just before it counts).
                            let owner = p.flow_run(id).await.ok().flatten().and_then(|r| r.owner);
                            if let Some(owner) = owner.filter(|_| !s.is_terminal()) {
                                let _ = send_agent(&owner, AgentMsg::Cancel(Wire::new(id)));
                            }
                            Response::State(s)
                        }
                        Ok(Ok(Reply::FlowRunTransition {
                            decision: Decision::Abort(r),
                            ..
                        })) => refused(ErrorKind::Refused, r.to_string()),
                        Ok(Ok(other)) => {
                            refused(ErrorKind::Unavailable, format!("unexpected answer {other:?}"))
                        }
                        Ok(Err(refusal)) => not_found_or(refusal),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Retry { run, force } => {
                let tid = self.tid();
                tokio::spawn(async move {
                    let request = RetryRequest {
                        transition_id: tid,
                        resume: false,
                        force,
                        message: None,
                    };
                    let r = match p.submit(Command::RetryFlowRun { run, request }).await {
                        Ok(Ok(Reply::Retried { state, .. })) => {
                            // Placed like a new run, by the control actor.
                            if let Ok(Some(f)) = p.flow_run(run).await {
                                replace(placement_of(&p, &f, now()).await);
                            }
                            Response::State(state)
                        }
                        Ok(Ok(other)) => {
                            refused(ErrorKind::Unavailable, format!("unexpected answer {other:?}"))
                        }
                        Ok(Err(refusal)) => not_found_or(refusal),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::PutDeployment(spec) => {
                let id = flotilla_runtime::DeploymentId::new(now(), &mut self.rng);
                tokio::spawn(async move { answer(reply, put_deployment(&p, *spec, id).await) });
            }
            Request::WorkQueue { name, change } => {
                let id = flotilla_runtime::WorkQueueId::new(now(), &mut self.rng);
                let loads = self.machine.loads();
                tokio::spawn(async move {
                    let r = queue_change(&p, name, change, id, &loads).await;
                    answer(reply, r);
                });
            }
            Request::WorkQueues => {
                let loads = self.machine.loads();
                tokio::spawn(async move {
                    let r = match p.settings().await {
                        Ok(settings) => Response::WorkQueues(queue_infos(settings, &loads)),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::ConcurrencyLimits => {
                answer(reply, Response::ConcurrencyLimits(self.machine.limits()));
            }
            Request::ConcurrencyLimit { tag, change } => {
                let current = self.machine.limits().into_iter().find(|l| l.tag == tag);
                match change {
                    LimitChange::Inspect => {
                        let r = match current {
                            Some(l) => Response::ConcurrencyLimits(vec![l]),
                            None => refused(
                                ErrorKind::NotFound,
                                format!("no concurrency limit on tag {tag:?}"),
                            ),
                        };
                        answer(reply, r);
                    }
                    LimitChange::Reset => {
                        if current.is_none() {
                            return answer(
                                reply,
                                refused(
                                    ErrorKind::NotFound,
                                    format!("no concurrency limit on tag {tag:?}"),
                                ),
                            );
                        }
                        self.drive(Input::ResetLimit(tag.clone()));
                        let l = self.machine.limits().into_iter().find(|l| l.tag == tag);
                        answer(reply, Response::ConcurrencyLimits(l.into_iter().collect()));
                    }
                    LimitChange::Put { limit, lease_ttl_ms } => {
                        let setting =
                            flotilla_runtime::Setting::ConcurrencyLimit(flotilla_runtime::ConcurrencyLimit {
                                tag,
                                limit,
                                lease_ttl: Duration::from_millis(lease_ttl_ms),
                                leases: Vec::new(),
                            });
                        tokio::spawn(async move {
                            let r = put_setting(&p, setting.clone()).await;
                            let r = match (r, setting) {
                                (Response::Done, flotilla_runtime::Setting::ConcurrencyLimit(l)) => {
                                    Response::ConcurrencyLimits(vec![l])
                                }
                                (r, _) => r,
                            };
                            answer(reply, r);
                        });
                    }
                    LimitChange::Delete => {
                        tokio::spawn(async move {
                            let key = flotilla_runtime::work_queue::limit_key(&tag);
                            let r =
                                delete_setting(&p, key, format!("no concurrency limit on tag {tag:?}")).await;
                            answer(reply, r);
                        });
                    }
                }
            }
            Request::Events {
                after,
                prefix,
                limit,
                wait_ms,
            } => {
                tokio::spawn(async move {
                    let r = events::events(&p, after, prefix, limit, wait_ms).await;
                    answer(reply, r);
                });
            }
            Request::FindEvents {
                after,
                filter,
                limit,
                wait_ms,
            } => {
                tokio::spawn(async move {
                    let r = events::find_events(&p, after, *filter, limit, wait_ms).await;
                    answer(reply, r);
                });
            }
            Request::EmitEvent(event) => {
                tokio::spawn(async move {
                    answer(reply, events::emit(&p, *event).await);
                });
            }
            Request::DeleteDeployment(name) => {
                tokio::spawn(async move {
                    let r = match p.deployment_by_name(&name).await {
                        Ok(Some(d)) => match p.submit(Command::DeleteDeployment { id: d.id }).await {
                            Ok(Ok(_)) => {
                                tell_scheduler(d.id);
                                Response::Done
                            }
                            Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
                            Err(e) => persist_err(e),
                        },
                        Ok(None) => refused(ErrorKind::NotFound, format!("no deployment named {name:?}")),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Deployment(name) => {
                tokio::spawn(async move {
                    let r = match p.deployment_by_name(&name).await {
                        Ok(Some(d)) => Response::Deployment(Box::new(d)),
                        Ok(None) => refused(ErrorKind::NotFound, format!("no deployment named {name:?}")),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Deployments => {
                tokio::spawn(async move {
                    let r = match p.all_deployments().await {
                        Ok(all) => Response::Deployments(all),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::RunDeployment {
                name,
                params,
                id,
                idempotency_key,
            } => {
                let id = id.unwrap_or_else(|| FlowRunId::new(now(), &mut self.rng));
                let catalog = self.catalog.clone();
                tokio::spawn(async move {
                    let d = match p.deployment_by_name(&name).await {
                        Ok(Some(d)) => d,
                        Ok(None) => {
                            return answer(
                                reply,
                                refused(ErrorKind::NotFound, format!("no deployment named {name:?}")),
                            );
                        }
                        Err(e) => return answer(reply, persist_err(e)),
                    };
                    let cmd = Command::CreateFlowRun(
                        catalog
                            .apply(NewFlowRun::of_deployment(id, &d, &params))
                            .with_key(idempotency_key),
                    );
                    let r = match p.submit(cmd).await {
                        Ok(Ok(Reply::FlowRunCreated { run, created })) => {
                            if created {
                                replace(Placement {
                                    run: run.id,
                                    flow: run.flow_name.clone(),
                                    due: now(),
                                    queue: d.work_queue.clone(),
                                    deployment: Some((d.id, d.concurrency_limit.map(|l| (l, d.collision)))),
                                    known: Some(run.clone()),
                                });
                            }
                            Response::Ran(run.id)
                        }
                        Ok(Ok(other)) => {
                            refused(ErrorKind::Unavailable, format!("unexpected answer {other:?}"))
                        }
                        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::SchedulerStats => {
                tokio::spawn(async move {
                    let r = match ractor::registry::where_is(crate::node::scheduler::SCHEDULER_NAME) {
                        Some(cell) => {
                            let sched: ActorRef<crate::node::scheduler::SchedulerMsg> = cell.into();
                            match sched
                                .call(
                                    crate::node::scheduler::SchedulerMsg::Stats,
                                    Some(Duration::from_secs(10)),
                                )
                                .await
                            {
                                Ok(ractor::rpc::CallResult::Success(st)) => Response::SchedulerStats(st),
                                _ => refused(ErrorKind::Unavailable, "the scheduler did not answer"),
                            }
                        }
                        None => refused(ErrorKind::Unavailable, "no scheduler runs here"),
                    };
                    answer(reply, r);
                });
            }
            Request::Wait { run, timeout_ms } => {
                tokio::spawn(async move {
                    let limit = Duration::from_millis(u64::from(timeout_ms.min(WAIT_MS_MAX)));
                    answer(reply, wait_for_end(&p, run, limit).await);
                });
            }
            request @ (Request::PutAutomations(_)
            | Request::Automations
            | Request::Automation { .. }
            | Request::PutBlock { .. }
            | Request::Blocks
            | Request::Block { .. }
            | Request::ResolveBlocks { .. }
            | Request::StoreBlock(_)) => self.settings_request(request, reply),
            other => {
                let results = self.results.clone();
                let voter = self.replication.clone();
                tokio::spawn(async move {
                    // Replicated: the leader confirms it still leads (a quorum answers its
                    // heartbeat) and has applied that far before it reads: a linearizable read.
                    if let Some(v) = voter {
                        let confirmed = tokio::time::timeout(
                            crate::replication::machine::QUORUM_LOST_AFTER,
                            v.raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex),
                        )
                        .await;
                        let why = match confirmed {
                            Ok(Ok(_)) => None,
                            Ok(Err(e)) => Some(e.to_string()),
                            Err(_) => Some("no quorum answered in time".to_owned()),
                        };
                        if let Some(why) = why {
                            return answer(
                                reply,
                                refused(
                                    ErrorKind::Unavailable,
                                    format!("this node cannot confirm it leads the control state: {why}"),
                                ),
                            );
                        }
                    }
                    let r = read_request(&p, &results, other).await;
                    answer(reply, r);
                });
            }
        }
    }
}

/// Tells the scheduler a deployment changed.
fn tell_scheduler(id: flotilla_runtime::DeploymentId) {
    if let Some(cell) = ractor::registry::where_is(crate::node::scheduler::SCHEDULER_NAME) {
        let sched: ActorRef<crate::node::scheduler::SchedulerMsg> = cell.into();
        let _ = sched.cast(crate::node::scheduler::SchedulerMsg::Changed(id));
    }
}

/// Creates or replaces a deployment by name.
async fn put_deployment(
    p: &PersistenceHandle,
    spec: flotilla_runtime::DeploymentSpec,
    id: flotilla_runtime::DeploymentId,
) -> Response {
    if let Err(e) = spec.check() {
        return refused(ErrorKind::Refused, e);
    }
    let old = match p.deployment_by_name(&spec.name).await {
        Ok(old) => old,
        Err(e) => return persist_err(e),
    };
    if let Some(o) = &old
        && o.spec() == spec
    {
        return Response::Deployment(Box::new(o.clone()));
    }
    let d = spec.into_deployment(id, old.as_ref(), now());
    match p.submit(Command::PutDeployment(d.clone())).await {
        Ok(Ok(_)) => {
            tell_scheduler(d.id);
            Response::Deployment(Box::new(d))
        }
        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

fn not_found_or(refusal: flotilla_runtime::Refusal) -> Response {
    match refusal {
        flotilla_runtime::Refusal::FlowRunNotFound(id) => {
            refused(ErrorKind::NotFound, format!("no flow run {id}"))
        }
        other => refused(ErrorKind::Refused, other.to_string()),
    }
}

/// Tells a node's agent something (it is looked up afresh: remote ids change on reconnect).
/// Work queues with their figures, by priority then name; the default queue is listed even
/// when it was never created.
fn queue_infos(
    settings: Vec<flotilla_runtime::Setting>,
    loads: &std::collections::HashMap<String, flotilla_runtime::control::QueueLoad>,
) -> Vec<QueueInfo> {
    let mut queues: Vec<flotilla_runtime::WorkQueue> = settings
        .into_iter()
        .filter_map(|s| match s {
            flotilla_runtime::Setting::WorkQueue(q) => Some(q),
            _ => None,
        })
        .collect();
    if !queues.iter().any(|q| q.name == flotilla_runtime::DEFAULT_QUEUE) {
        queues.push(default_queue(flotilla_runtime::DEFAULT_QUEUE, None));
    }
    // Queues runs name without anyone creating them.
    for name in loads.keys() {
        if !queues.iter().any(|q| q.name == *name) {
            queues.push(default_queue(name, None));
        }
    }
    queues.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    queues
        .into_iter()
        .map(|q| {
            let l = loads.get(&q.name).cloned().unwrap_or_default();
            QueueInfo {
                queue: q,
                waiting: l.waiting,
                active: l.active,
            }
        })
        .collect()
}

/// A queue as runs find it when nobody created it: priority 1, no limit, not paused. Its id is
/// nil until it is created.
fn default_queue(name: &str, id: Option<flotilla_runtime::WorkQueueId>) -> flotilla_runtime::WorkQueue {
    flotilla_runtime::WorkQueue {
        id: id.unwrap_or_else(|| flotilla_runtime::WorkQueueId::from_uuid(uuid::Uuid::nil())),
        name: name.to_owned(),
        priority: 1,
        concurrency_limit: None,
        paused: false,
    }
}

async fn queue_change(
    p: &PersistenceHandle,
    name: String,
    change: QueueChange,
    id: flotilla_runtime::WorkQueueId,
    loads: &std::collections::HashMap<String, flotilla_runtime::control::QueueLoad>,
) -> Response {
    let info = |q: flotilla_runtime::WorkQueue| {
        let l = loads.get(&q.name).cloned().unwrap_or_default();
        Response::WorkQueues(vec![QueueInfo {
            queue: q,
            waiting: l.waiting,
            active: l.active,
        }])
    };
    let key = flotilla_runtime::work_queue::queue_key(&name);
    // Each change is one command on one field, applied to the queue as it is then: two
    // changes sent at once never overwrite each other.
    let edit = match change {
        QueueChange::Inspect => {
            let settings = match p.settings().await {
                Ok(s) => s,
                Err(e) => return persist_err(e),
            };
            let stored = settings.into_iter().find_map(|s| match s {
                flotilla_runtime::Setting::WorkQueue(q) if q.name == name => Some(q),
                _ => None,
            });
            // The default queue exists before anyone creates it.
            return match stored
                .or_else(|| (name == flotilla_runtime::DEFAULT_QUEUE).then(|| default_queue(&name, None)))
            {
                Some(q) => info(q),
                None => refused(ErrorKind::NotFound, format!("no work queue named {name:?}")),
            };
        }
        QueueChange::Delete => return delete_setting(p, key, format!("no work queue named {name:?}")).await,
        QueueChange::Edit(edit) => edit,
    };
    let cmd = Command::EditWorkQueue {
        name,
        id,
        edit,
        at: now(),
    };
    match p.submit(cmd).await {
        Ok(Ok(Reply::WorkQueueEdited { queue })) => {
            if let Some(me) = local_control() {
                reload_settings(p, &me).await;
            }
            info(queue)
        }
        Ok(Ok(other)) => refused(ErrorKind::Unavailable, format!("an unexpected reply: {other:?}")),
        Ok(Err(refusal @ flotilla_runtime::Refusal::WorkQueueNotFound(_))) => {
            refused(ErrorKind::NotFound, refusal.to_string())
        }
        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

/// Stores a setting and has the control actor read the settings again.
async fn put_setting(p: &PersistenceHandle, setting: flotilla_runtime::Setting) -> Response {
    match p.submit(Command::PutSetting { setting, at: now() }).await {
        Ok(Ok(_)) => {
            if let Some(me) = local_control() {
                reload_settings(p, &me).await;
            }
            Response::Done
        }
        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

/// Deletes a setting and has the control actor read the settings again.
async fn delete_setting(p: &PersistenceHandle, key: String, missing: String) -> Response {
    match p.submit(Command::DeleteSetting { key, at: now() }).await {
        Ok(Ok(Reply::SettingDeleted { existed: false })) => refused(ErrorKind::NotFound, missing),
        Ok(Ok(_)) => {
            if let Some(me) = local_control() {
                reload_settings(p, &me).await;
            }
            Response::Done
        }
        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

/// The run once it ended (a run that resumes after a crash has not ended when Crashed), or as
/// it is after `limit`.
async fn wait_for_end(p: &PersistenceHandle, id: FlowRunId, limit: Duration) -> Response {
    let deadline = tokio::time::Instant::now() + limit;
    let resource = format!("flotilla.flow-run.{id}");
    // Subscribe before reading, so an end between the two is not missed.
    let mut events = p.subscribe();
    loop {
        let run = match p.flow_run(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return refused(ErrorKind::NotFound, format!("no flow run {id}")),
            Err(e) => return persist_err(e),
        };
        let Some(for_at_most) = run.still_going(now()) else {
            return Response::FlowRun(Box::new(run));
        };
        let until = deadline.min(tokio::time::Instant::now() + for_at_most.min(limit));
        loop {
            match tokio::time::timeout_at(until, events.recv()).await {
                Err(_) if until >= deadline => return Response::FlowRun(Box::new(run)),
                Err(_) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return refused(ErrorKind::Unavailable, "the store stopped".to_owned());
                }
                Ok(Ok(e)) => {
                    if e.resource.id() == Some(resource.as_str()) && e.state().is_some() {
                        break;
                    }
                }
            }
        }
    }
}

/// Answers a read from `p`, the control state as this node holds it.
pub(crate) async fn read_request(p: &PersistenceHandle, results: &ResultStore, request: Request) -> Response {
    let missing = |id: FlowRunId| refused(ErrorKind::NotFound, format!("no flow run {id}"));
    match request {
        Request::FlowRun(id) => match p.flow_run(id).await {
            Ok(Some(r)) => Response::FlowRun(Box::new(r)),
            Ok(None) => missing(id),
            Err(e) => persist_err(e),
        },
        Request::FlowRuns {
            state,
            after,
            limit,
            deployment,
        } => {
            let filter = match deployment {
                Some(d) => RunFilter::Deployment(d),
                None => state.map_or(RunFilter::All, RunFilter::State),
            };
            match p.flow_runs(filter, after, (limit as usize).min(PAGE_MAX)).await {
                Ok(runs) => Response::FlowRuns(runs),
                Err(e) => persist_err(e),
            }
        }
        Request::TaskRuns(id) => {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                match p.task_runs(id, after, PAGE_MAX).await {
                    Ok(page) if page.is_empty() => break,
                    Ok(page) => {
                        after = page.last().map(|t| t.id);
                        all.extend(page);
                    }
                    Err(e) => return persist_err(e),
                }
            }
            Response::TaskRuns(all)
        }
        Request::TaskRunsPage { run, after, limit } => {
            match p.task_runs(run, after, (limit as usize).clamp(1, PAGE_MAX)).await {
                Ok(page) => Response::TaskRuns(page),
                Err(e) => persist_err(e),
            }
        }
        Request::HistoryPage { run, offset, limit } => {
            match p
                .flow_run_history(run, offset as usize, (limit as usize).clamp(1, PAGE_MAX))
                .await
            {
                Ok(Some(page)) => Response::History(page),
                Ok(None) => missing(run),
                Err(e) => persist_err(e),
            }
        }
        Request::History(id) => {
            let mut all = Vec::new();
            loop {
                match p.flow_run_history(id, all.len(), PAGE_MAX).await {
                    Ok(Some(page)) if page.is_empty() => break,
                    Ok(Some(page)) => all.extend(page),
                    Ok(None) => return missing(id),
                    Err(e) => return persist_err(e),
                }
            }
            Response::History(all)
        }
        Request::Logs { run, after, limit } => match p
            .read(Read::Logs {
                flow_run: run,
                after,
                limit: limit as usize,
            })
            .await
        {
            Ok(ReadReply::Logs { lines, next }) => Response::Logs { lines, next },
            Ok(other) => refused(ErrorKind::Unavailable, format!("unexpected answer {other:?}")),
            Err(e) => persist_err(e),
        },
        Request::Result(id) => match p.flow_run(id).await {
            Ok(Some(r)) => match (&r.lifecycle.state.kind, &r.lifecycle.state.result) {
                (StateType::Completed, Some(flotilla_runtime::ResultRef::Inline(b))) => {
                    Response::Result(b.clone())
                }
                (StateType::Completed, Some(stored)) => {
                    let (results, stored) = (results.clone(), stored.clone());
                    match tokio::task::spawn_blocking(move || results.load(&stored)).await {
                        Ok(Ok(bytes)) if bytes.len() + 64 <= flotilla_cluster::frame::FRAME_BYTES_MAX => {
                            Response::Result(bytes)
                        }
                        Ok(Ok(bytes)) => refused(
                            ErrorKind::Refused,
                            format!(
                                "the result is {} bytes, more than one answer carries",
                                bytes.len()
                            ),
                        ),
                        Ok(Err(e)) => refused(ErrorKind::Unavailable, e.to_string()),
                        Err(e) => refused(ErrorKind::Unavailable, format!("cannot read the result: {e}")),
                    }
                }
                _ => refused(
                    ErrorKind::Refused,
                    format!("flow run {id} is {}; it has no result", r.lifecycle.state),
                ),
            },
            Ok(None) => missing(id),
            Err(e) => persist_err(e),
        },
        other => refused(ErrorKind::Protocol, format!("{other:?} is not served here")),
    }
}
