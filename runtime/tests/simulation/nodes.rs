//! The simulated worker nodes of the control machine simulation: what a node does when told to
//! start a run, when its slot requests are answered, and at every step (heartbeats, renewals,
//! resends, tasks that end, a restart).

use super::*;

impl Sim {
    /// A node is told to start a run: it claims it (refused if the control node declared it
    /// dead, or another holds the run) and runs it with one task.
    /// A node's proposal of `state` at `at` for a run it holds under `epoch`, its transition id
    /// derived from the run, the state, the epoch, the node and the time.
    pub(super) fn proposal(
        &self,
        run: FlowRunId,
        epoch: flotilla_runtime::Epoch,
        node: &NodeId,
        state: StateName,
        at: Timestamp,
    ) -> Command {
        // A node's transition ids are its own (a worker draws them at random): two nodes
        // ending one run at the same instant propose two changes, not one.
        let key = format!("{state}/{run}/{epoch}/{node}/{}", at.as_micros());
        Command::ProposeFlowRunState {
            run,
            proposal: Proposal::from_worker(
                State::named(state, at),
                TransitionId::from_uuid(derived_id(&key)),
                epoch,
                node.clone(),
            ),
        }
    }

    fn start_on(&mut self, i: usize, run: FlowRunId) {
        let node = self.nodes[i].name.clone();
        if self.nodes[i].runs.contains_key(&run) {
            return;
        }
        let Some(epoch) = self.state.hot().flow_run(&run).map(|r| r.epoch) else {
            return;
        };
        let claim = self.proposal(run, epoch, &node, StateName::Pending, self.now);
        if let Err(refusal) = self.coord.admit(&claim) {
            self.note(format!("{node} claim of {} refused: {refusal}", short(run)));
            return;
        }
        if !accepted(&self.log(claim)) {
            return;
        }
        let running = self.proposal(run, epoch, &node, StateName::Running, self.now);
        if !accepted(&self.log(running)) {
            return;
        }
        let tags: Vec<String> = TAG_SETS[self.rng.below(4) as usize]
            .iter()
            .map(|t| (*t).to_owned())
            .collect();
        let ttl = tags
            .iter()
            .filter_map(|t| LIMITS.iter().find(|(l, ..)| l == t).map(|(_, _, ttl)| ms(*ttl)))
            .min()
            .unwrap_or(ms(1_000));
        let task = Task {
            id: TaskRunId::from_uuid(derived_id(&format!("task/{run}/{}", self.now.as_micros()))),
            tags: tags.clone(),
            ttl,
            phase: Phase::Acquiring(self.now),
        };
        self.note(format!("{node} runs {}, task tags {tags:?}", short(run)));
        let ask = task.ask(&node, self.now, false);
        self.nodes[i].runs.insert(run, (epoch, task));
        self.send_to_control(i, ask);
    }

    fn send_to_control(&mut self, i: usize, msg: Msg) {
        if self.nodes[i].cut_off_until > self.now {
            return;
        }
        self.send_faulty(msg);
    }

    /// A message arrives.
    pub(super) fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Start(node, inc, run) => {
                if let Some(i) = self.live_node(&node, inc) {
                    self.start_on(i, run);
                }
            }
            Msg::Slots(node, inc, token, answer) => {
                if let Some(i) = self.live_node(&node, inc) {
                    self.slot_answer(i, token, answer);
                }
            }
            Msg::Beat(status) => self.send_control(Some(status.name.clone()), Input::Heartbeat(status)),
            Msg::Acquire(node, reply, tags) => self.send_control(
                Some(node.clone()),
                Input::Acquire {
                    holder: reply.task,
                    node,
                    tags,
                    reply,
                },
            ),
            Msg::Renew(node, reply, tags) => self.send_control(
                Some(node.clone()),
                Input::Renew {
                    holder: reply.task,
                    node,
                    tags,
                    reply,
                },
            ),
            Msg::Release(task) => self.send_control(self.node_of(task), Input::Release(vec![task])),
            Msg::Recheck(run) => {
                if let Some(p) = self.waiting_placement(run) {
                    // Now and then the store is slow to answer.
                    let delay = if self.rng.chance(100) {
                        self.rng.ms(100, 400)
                    } else {
                        self.rng.ms(0, 30)
                    };
                    self.send(delay, Msg::TakeBack(p));
                }
            }
            Msg::TakeBack(p) => self.drive(Input::TakeBack(p)),
            Msg::Create(new) => self.control_creates(*new),
            Msg::Created(asked, run) => self.client_told(asked, run),
            Msg::Late(node, held, late) => self.late_arrives(node, held, late),
        }
    }

    fn live_node(&self, node: &NodeId, inc: u64) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == *node && n.up && n.incarnation == inc && n.cut_off_until <= self.now)
    }

    fn slot_answer(&mut self, i: usize, token: Token, answer: SlotAnswer) {
        let now = self.now;
        let node = self.nodes[i].name.clone();
        let Some((_, task)) = self.nodes[i].runs.values_mut().find(|(_, t)| t.id == token.task) else {
            return;
        };
        let work = ms(100 + (token.sent_at.as_micros() as u64 / 1000) % 1_400);
        match (&mut task.phase, answer) {
            (Phase::Acquiring(_), SlotAnswer::Grant(grant)) => {
                let ttl = match grant {
                    SlotGrant::Held { ttl } => ttl,
                    SlotGrant::Unlimited => ms(3_600_000),
                };
                task.ttl = ttl;
                task.phase = Phase::Holding {
                    // It counts its lease from when it asked, and stops at 80% of it unless
                    // a renewal is acknowledged.
                    deadline: token.sent_at + ttl.mul_f64(0.8),
                    renewing: None,
                    work_left: work,
                };
            }
            (
                Phase::Holding {
                    deadline, renewing, ..
                },
                SlotAnswer::Renewed(true),
            ) if *renewing == Some(token.sent_at) => {
                *deadline = (*deadline).max(token.sent_at + task.ttl.mul_f64(0.8));
                *renewing = None;
            }
            (Phase::Holding { .. }, SlotAnswer::Renewed(false)) => {
                // Lost its slots: stops, and asks again.
                task.phase = Phase::Acquiring(now);
                let (ask, id) = (task.ask(&node, now, false), task.id);
                self.note(format!("{node} task {} lost its lease", short_task(id)));
                self.send_to_control(i, ask);
            }
            _ => {}
        }
    }

    /// What each node does at `now`: heartbeats, renewals, resends, tasks that end.
    pub(super) fn nodes_act(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                if self.nodes[i].down_until <= self.now {
                    let n = &mut self.nodes[i];
                    n.up = true;
                    n.incarnation += 1;
                    n.next_beat = self.now;
                    let (name, inc) = (n.name.clone(), n.incarnation);
                    self.note(format!("{name} restarts"));
                    // What its previous life ran crashed with it (the worker's recover).
                    let crash = Command::MarkNodeCrashed {
                        node: name.clone(),
                        message: "its node restarted".into(),
                        key: format!("crash/{name}/restart/{inc}"),
                    };
                    // ... and what resumes, it hands to the control plane to place.
                    if let Ok(Reply::NodeCrashed { crashed, .. }) = self.log(crash) {
                        self.resume_crashed(&name, crashed);
                    }
                    self.late_proposals(i);
                }
                continue;
            }
            if self.nodes[i].next_beat <= self.now {
                self.nodes[i].next_beat = self.now + BEAT_EVERY;
                let n = &self.nodes[i];
                let status = MemberStatus {
                    name: n.name.clone(),
                    addr: String::new(),
                    role: "worker".into(),
                    reachable: true,
                    slots_used: n.runs.len() as u32,
                    slots_total: n.slots,
                    flows: vec!["f".into()],
                    queues: n.queues.clone(),
                    last_heartbeat: None,
                    incarnation: n.incarnation,
                    holds: n.runs.keys().copied().collect(),
                    flow_options: Default::default(),
                };
                self.send_to_control(i, Msg::Beat(status));
            }
            let runs: Vec<FlowRunId> = self.nodes[i].runs.keys().copied().collect();
            for run in runs {
                self.task_acts(i, run);
            }
            if self.nodes[i].cut_off_until <= self.now {
                let node = self.nodes[i].name.clone();
                for (run, epoch, at) in std::mem::take(&mut self.nodes[i].finishing) {
                    let end = self.proposal(run, epoch, &node, StateName::Completed, at);
                    let reply = self.log(end);
                    let how = if accepted(&reply) { "ok" } else { "refused" };
                    self.note(format!("{node} ends {}: {how}", short(run)));
                }
            }
        }
    }

    fn task_acts(&mut self, i: usize, run: FlowRunId) {
        let now = self.now;
        let node = self.nodes[i].name.clone();
        let Some((epoch, task)) = self.nodes[i].runs.get_mut(&run) else {
            return;
        };
        let epoch = *epoch;
        let mut send = None;
        let mut done = false;
        match &mut task.phase {
            Phase::Acquiring(since) => {
                if now.saturating_since(*since) >= RESEND_AFTER {
                    *since = now;
                    send = Some(task.ask(&node, now, false));
                }
            }
            Phase::Holding {
                deadline,
                renewing,
                work_left,
            } => {
                if now >= *deadline {
                    // No renewal acknowledged in time: it stops (LeaseLost) and waits again.
                    task.phase = Phase::Acquiring(now);
                    send = Some(task.ask(&node, now, false));
                } else {
                    *work_left = work_left.saturating_sub(TICK_EVERY);
                    if work_left.is_zero() {
                        done = true;
                    } else if renewing.is_none_or(|r| now.saturating_since(r) >= task.ttl / 4)
                        && now + task.ttl / 2 >= *deadline
                    {
                        *renewing = Some(now);
                        send = Some(task.ask(&node, now, true));
                    }
                }
            }
        }
        if done {
            let Some((_, task)) = self.nodes[i].runs.remove(&run) else {
                return;
            };
            self.send_to_control(i, Msg::Release(task.id));
            self.nodes[i].finishing.push((run, epoch, now));
        } else if let Some(msg) = send {
            self.send_to_control(i, msg);
        }
    }
}
