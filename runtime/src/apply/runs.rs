//! The flow-run and task-run commands of `apply`: creation, proposals, retries, and a node's
//! runs marked when it crashed.

use super::*;

impl Tx {
    pub(super) fn create_flow_run(mut self, view: &mut impl StateView, new: NewFlowRun) -> Outcome {
        let key = new.idempotency_key.clone().unwrap_or_else(|| new.id.to_string());
        let existing = view
            .hot()
            .flow_run_by_key(&key)
            .or_else(|| view.hot().flow_run(&new.id).map(|r| r.id));
        if let Some(run) = existing.and_then(|id| view.hot().flow_run(&id)) {
            return Outcome::replied(
                Reply::FlowRunCreated {
                    run: Box::new(run.clone()),
                    created: false,
                },
                Vec::new(),
            );
        }
        if let Err(r) = check_name("a flow name", &new.flow_name)
            .and_then(|()| check_tags(&new.tags))
            .and_then(|()| {
                new.retry_policy
                    .validate()
                    .map_err(|e| Refusal::Invalid(e.to_string()))
            })
        {
            return Outcome::refused(r);
        }
        let mut run = FlowRun::scheduled(new, self.now());
        let state = run.lifecycle.state.clone();
        let ev = self.first_state_event(self.flow_subject(&run), "flow-run", &state, run.epoch);
        let _ = run.lifecycle.record(ev);
        self.writes.insert(0, Write::FlowRun(run.id));
        view.hot_mut().put_flow_run(run.clone());
        self.done(Reply::FlowRunCreated {
            run: Box::new(run),
            created: true,
        })
    }

    pub(super) fn propose_flow(
        mut self,
        view: &mut impl StateView,
        id: FlowRunId,
        proposal: Proposal,
    ) -> Outcome {
        let Some(run) = view.hot().flow_run(&id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(id));
        };
        if let Err(r) = check_state(&proposal.state) {
            return Outcome::refused(r);
        }
        let ctx = RuleContext {
            kind: RunKind::Flow,
            now: self.now(),
            epoch: run.epoch,
            owner: run.owner.as_ref(),
            retry_policy: &run.retry_policy,
            flow_run_state: None,
            cached: None,
            jitter_seed: jitter_seed(&proposal),
        };
        let decision = rules::propose(&run.lifecycle, &proposal, &ctx);
        let Some(next) = decision.state().filter(|s| **s != run.lifecycle.state).cloned() else {
            return self.done(Reply::FlowRunTransition {
                decision,
                epoch: run.epoch,
                run_count: run.lifecycle.run_count,
            });
        };
        let past = if decision.is_accept() {
            PastDecision::Accepted
        } else {
            PastDecision::Rejected
        };
        self.writes.push(Write::FlowRun(id));
        let reply = view.hot_mut().update_flow_run(&id, |run| {
            let from = run.lifecycle.state.kind;
            if next.kind == StateType::Pending && from == StateType::Scheduled {
                run.owner = proposal.node.clone();
            } else if next.kind == StateType::Scheduled && from == StateType::Pending {
                // Given back: the next claim is a new assignment, under a new epoch.
                run.owner = None;
                run.epoch = run.epoch.next();
            }
            let resource = self.flow_subject(run);
            let epoch = run.epoch;
            self.enter(RunId::Flow(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle.remember(proposal.transition_id, past);
            Reply::FlowRunTransition {
                decision,
                epoch: run.epoch,
                run_count: run.lifecycle.run_count,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::FlowRunNotFound(id)),
        }
    }

    pub(super) fn create_task_run(mut self, view: &mut impl StateView, new: NewTaskRun) -> Outcome {
        if let Some(run) = view
            .hot()
            .task_run_by_key(&new.key)
            .and_then(|id| view.hot().task_run(&id))
        {
            return Outcome::replied(
                Reply::TaskRunCreated {
                    run: Box::new(run.clone()),
                    created: false,
                },
                Vec::new(),
            );
        }
        let flow_id = new.key.flow_run;
        let Some(flow) = view.hot().flow_run(&flow_id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(flow_id));
        };
        if new.epoch != flow.epoch {
            return Outcome::refused(Refusal::StaleEpoch {
                run: flow_id,
                proposed: new.epoch,
                current: flow.epoch,
            });
        }
        if flow.lifecycle.state.kind != StateType::Running {
            return Outcome::refused(Refusal::FlowRunNotRunning {
                run: flow_id,
                state: flow.lifecycle.state.kind,
            });
        }
        if let Err(r) = check_name("a task key", &new.key.task_key)
            .and_then(|()| check_tags(&new.tags))
            .and_then(|()| {
                new.retry_policy
                    .validate()
                    .map_err(|e| Refusal::Invalid(e.to_string()))
            })
        {
            return Outcome::refused(r);
        }
        if view.hot().task_run(&new.id).is_some() {
            return Outcome::refused(Refusal::Invalid(format!("task run id {} is taken", new.id)));
        }
        let at = new.called.map_or(self.now(), |c| c.min(self.now()));
        let state = State::of(StateType::Pending, at);
        let mut run = TaskRun {
            id: new.id,
            key: new.key,
            retry_policy: new.retry_policy,
            cache_key: new.cache_key,
            cache_expiration: new.cache_expiration,
            refresh_cache: new.refresh_cache,
            tags: new.tags,
            created: self.now(),
            flow_epoch: new.epoch,
            lifecycle: Lifecycle::new(state.clone()),
        };
        let ev = self.first_state_event(self.task_subject(&run), "task-run", &state, new.epoch);
        let _ = run.lifecycle.record(ev);
        self.writes.insert(0, Write::TaskRun(run.id));
        view.hot_mut().put_task_run(run.clone());
        self.done(Reply::TaskRunCreated {
            run: Box::new(run),
            created: true,
        })
    }

    pub(super) fn propose_task(
        mut self,
        view: &mut impl StateView,
        id: TaskRunId,
        proposal: Proposal,
    ) -> Outcome {
        let Some(run) = view.hot().task_run(&id) else {
            return Outcome::refused(Refusal::TaskRunNotFound(id));
        };
        if let Err(r) = check_state(&proposal.state) {
            return Outcome::refused(r);
        }
        let Some(flow) = view.hot().flow_run(&run.key.flow_run) else {
            return Outcome::refused(Refusal::FlowRunNotFound(run.key.flow_run));
        };
        let now = self.now();
        let cached = match (&run.cache_key, proposal.state.kind) {
            (Some(k), StateType::Running) if !run.refresh_cache => view.hot().cached(k, now),
            _ => None,
        };
        let ctx = RuleContext {
            kind: RunKind::Task,
            now,
            epoch: flow.epoch,
            owner: flow.owner.as_ref(),
            retry_policy: &run.retry_policy,
            flow_run_state: Some(flow.lifecycle.state.kind),
            cached,
            jitter_seed: jitter_seed(&proposal),
        };
        let decision = rules::propose(&run.lifecycle, &proposal, &ctx);
        let epoch = flow.epoch;
        let Some(mut next) = decision.state().filter(|s| **s != run.lifecycle.state).cloned() else {
            return self.done(Reply::TaskRunTransition {
                decision,
                run_count: run.lifecycle.run_count,
            });
        };
        if next.name == crate::state::StateName::Completed
            && let Some(k) = &run.cache_key
        {
            next.details.cache_key = Some(k.clone());
            next.details.cache_expiration = run.cache_expiration.map(|d| now + d);
        }
        let past = if decision.is_accept() {
            PastDecision::Accepted
        } else {
            PastDecision::Rejected
        };
        self.writes.push(Write::TaskRun(id));
        let reply = view.hot_mut().update_task_run(&id, |run| {
            let resource = self.task_subject(run);
            self.enter(RunId::Task(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle.remember(proposal.transition_id, past);
            let decision = match decision {
                Decision::Accept(_) => Decision::Accept(run.lifecycle.state.clone()),
                Decision::Reject(_) => Decision::Reject(run.lifecycle.state.clone()),
                other => other,
            };
            Reply::TaskRunTransition {
                decision,
                run_count: run.lifecycle.run_count,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::TaskRunNotFound(id)),
        }
    }

    pub(super) fn retry_flow(
        mut self,
        view: &mut impl StateView,
        id: FlowRunId,
        request: RetryRequest,
    ) -> Outcome {
        let Some(run) = view.hot().flow_run(&id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(id));
        };
        let l = &run.lifecycle;
        if l.state.transition_id() == Some(request.transition_id) || l.past(request.transition_id).is_some() {
            return self.done(Reply::Retried {
                state: l.state.clone(),
                epoch: run.epoch,
            });
        }
        let next = match rules::retry(l, request.resume, request.force, self.now()) {
            Ok(s) => s,
            Err(r) => return Outcome::refused(r.into()),
        };
        let mut next = next.with_transition(request.transition_id);
        next.message = request.message;
        self.writes.push(Write::FlowRun(id));
        let reply = view.hot_mut().update_flow_run(&id, |run| {
            run.epoch = run.epoch.next();
            run.owner = None;
            let resource = self.flow_subject(run);
            let epoch = run.epoch;
            self.enter(RunId::Flow(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle
                .remember(request.transition_id, PastDecision::Accepted);
            Reply::Retried {
                state: run.lifecycle.state.clone(),
                epoch,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::FlowRunNotFound(id)),
        }
    }

    pub(super) fn retry_task(
        mut self,
        view: &mut impl StateView,
        id: TaskRunId,
        request: RetryRequest,
        epoch: Epoch,
    ) -> Outcome {
        let Some(run) = view.hot().task_run(&id) else {
            return Outcome::refused(Refusal::TaskRunNotFound(id));
        };
        let flow_id = run.key.flow_run;
        let Some(flow) = view.hot().flow_run(&flow_id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(flow_id));
        };
        let l = &run.lifecycle;
        if l.state.transition_id() == Some(request.transition_id) || l.past(request.transition_id).is_some() {
            return self.done(Reply::Retried {
                state: l.state.clone(),
                epoch: flow.epoch,
            });
        }
        if epoch != flow.epoch {
            return Outcome::refused(Refusal::StaleEpoch {
                run: flow_id,
                proposed: epoch,
                current: flow.epoch,
            });
        }
        if flow.lifecycle.state.kind != StateType::Running {
            return Outcome::refused(Refusal::FlowRunNotRunning {
                run: flow_id,
                state: flow.lifecycle.state.kind,
            });
        }
        let next = match rules::retry(l, request.resume, request.force, self.now()) {
            Ok(s) => s,
            Err(r) => return Outcome::refused(r.into()),
        };
        let mut next = next.with_transition(request.transition_id);
        next.message = request.message;
        self.writes.push(Write::TaskRun(id));
        let reply = view.hot_mut().update_task_run(&id, |run| {
            run.flow_epoch = epoch;
            let resource = self.task_subject(run);
            self.enter(RunId::Task(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle
                .remember(request.transition_id, PastDecision::Accepted);
            Reply::Retried {
                state: run.lifecycle.state.clone(),
                epoch,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::TaskRunNotFound(id)),
        }
    }

    pub(super) fn node_crashed(mut self, view: &mut impl StateView, node: &NodeId, message: &str) -> Outcome {
        let mut crashed = Vec::new();
        let mut cancelled = Vec::new();
        let now = self.now();
        for id in view.hot().active_flow_runs_of(node) {
            let Some(run) = view.hot().flow_run(&id) else {
                continue;
            };
            let Some(next) = rules::owner_died(&run.lifecycle.state, now, message) else {
                continue;
            };
            if next.kind == StateType::Cancelled {
                cancelled.push(id);
            } else {
                crashed.push(id);
            }
            let epoch = run.epoch;
            let tasks: Vec<TaskRunId> = view
                .hot()
                .task_runs_of(id, None, usize::MAX)
                .into_iter()
                .filter(|t| !t.lifecycle.state.is_terminal())
                .map(|t| t.id)
                .collect();
            for task in tasks {
                self.writes.push(Write::TaskRun(task));
                view.hot_mut().update_task_run(&task, |t| {
                    if let Some(tnext) = rules::owner_died(&t.lifecycle.state, now, message) {
                        let resource = self.task_subject(t);
                        self.enter(RunId::Task(t.id), &mut t.lifecycle, resource, tnext, epoch);
                    }
                });
            }
            self.writes.push(Write::FlowRun(id));
            view.hot_mut().update_flow_run(&id, |run| {
                let resource = self.flow_subject(run);
                self.enter(RunId::Flow(run.id), &mut run.lifecycle, resource, next, epoch);
            });
        }
        self.done(Reply::NodeCrashed { crashed, cancelled })
    }
}
