//! The simulated worker nodes: starting, ticking (heartbeats, lease renewals, local deadlines,
//! progress of the runs they hold) and taking the machine's messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

impl Sim {
    pub(super) fn node_up(&mut self, i: usize, restart: bool) {
        let now = self.now;
        let n = &mut self.nodes[i];
        n.up = true;
        if restart {
            n.inc = n.inc.next();
        }
        n.seq = 0;
        n.tick_gen += 1;
        let (tick, msg) = (n.tick_gen, join(n));
        let _ = now;
        self.note(format!("node {i} up {}", self.nodes[i].inc));
        self.send(Dest::Control, Payload::FromNode(i, msg));
        self.at(NODE_TICK, Event::NodeTick(i, tick));
    }

    pub(super) fn propose(&mut self, i: usize, run: FlowRunId, epoch: Epoch, name: StateName) {
        let n = &self.nodes[i];
        let msg = NodeMsg::StateProposal {
            incarnation: n.inc,
            run,
            epoch: Some(epoch),
            state: State::named(name, self.now),
            transition: tid(run, epoch, name),
        };
        self.send(Dest::Control, Payload::FromNode(i, msg));
    }

    pub(super) fn node_tick(&mut self, i: usize) {
        let now = self.now;
        self.nodes[i].ticks += 1;
        if self.nodes[i].ticks.is_multiple_of(2) {
            let n = &mut self.nodes[i];
            n.seq += 1;
            let running = n.copies.iter().map(|(r, c)| (*r, c.epoch)).collect();
            let msg = NodeMsg::Heartbeat {
                incarnation: n.inc,
                seq: n.seq,
                running,
            };
            self.send(Dest::Control, Payload::FromNode(i, msg));
        }
        let mut proposals = Vec::new();
        for (run, c) in self.nodes[i].copies.iter_mut() {
            if c.running_acked && c.ending.is_none() && now >= c.finish_at {
                c.ending = Some(StateName::Completed);
                c.last_sent = now;
                proposals.push((*run, c.epoch, StateName::Completed));
            } else if (c.ending.is_some() || !c.running_acked)
                && now.saturating_since(c.last_sent) >= RESEND_AFTER
            {
                c.last_sent = now;
                proposals.push((*run, c.epoch, c.ending.unwrap_or(StateName::Running)));
            }
        }
        for (run, epoch, name) in proposals {
            self.propose(i, run, epoch, name);
        }
        let inc = self.nodes[i].inc;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (holder, t) in self.nodes[i].tasks.iter_mut() {
            let tags = t.tags.clone();
            if !t.held {
                if now.saturating_since(t.last_sent) >= RESEND_AFTER {
                    t.last_sent = now;
                    out.push(NodeMsg::Acquire {
                        incarnation: inc,
                        holder: *holder,
                        tags,
                        sent_at: now,
                    });
                }
            } else if t.deadline.is_some_and(|d| now >= d) || now >= t.until {
                // Its renewal was not acknowledged in time (it stops itself), or it is done.
                gone.push(*holder);
            } else if let Some(ttl) = t.ttl
                && now.saturating_since(t.last_sent) >= ttl / 4
            {
                t.last_sent = now;
                out.push(NodeMsg::Renew {
                    incarnation: inc,
                    holder: *holder,
                    tags,
                    sent_at: now,
                });
            }
        }
        for h in &gone {
            self.nodes[i].tasks.remove(h);
        }
        if !gone.is_empty() {
            out.push(NodeMsg::Release {
                incarnation: inc,
                holders: gone,
            });
        }
        if self.faults && self.nodes[i].tasks.len() < 3 && self.rng.chance(60) {
            let n = &mut self.nodes[i];
            n.holders_made += 1;
            let holder = TaskRunId::from_uuid(derived_id(&format!("{}/{}/{}", n.id, n.inc, n.holders_made)));
            let tags: Vec<String> = TAG_SETS[self.rng.below(4) as usize]
                .iter()
                .map(|t| t.to_string())
                .collect();
            let hold = self.rng.ms(50, 1500);
            let task = Task {
                tags: tags.clone(),
                held: false,
                deadline: None,
                ttl: None,
                hold,
                until: now,
                last_sent: now,
            };
            self.nodes[i].tasks.insert(holder, task);
            out.push(NodeMsg::Acquire {
                incarnation: inc,
                holder,
                tags,
                sent_at: now,
            });
        }
        for m in out {
            self.send(Dest::Control, Payload::FromNode(i, m));
        }
        let tick = self.nodes[i].tick_gen;
        self.at(NODE_TICK, Event::NodeTick(i, tick));
    }

    pub(super) fn node_msg(&mut self, i: usize, msg: ToNodeMsg) {
        let now = self.now;
        let inc = self.nodes[i].inc;
        match msg {
            ToNodeMsg::StartRun { run, epoch } => {
                let n = &mut self.nodes[i];
                match n.copies.get(&run) {
                    Some(c) if c.epoch >= epoch => return,
                    Some(_) => {
                        n.copies.remove(&run);
                    }
                    None if n.copies.len() as u32 >= n.slots => return, // no room: never started
                    None => {}
                }
                let copy = Copy {
                    epoch,
                    length: self.rng.ms(100, 1500),
                    finish_at: now,
                    running_acked: false,
                    ending: None,
                    last_sent: now,
                };
                self.nodes[i].copies.insert(run, copy);
                self.propose(i, run, epoch, StateName::Running);
            }
            ToNodeMsg::CancelRun { run, epoch } => {
                if let Some(c) = self.nodes[i].copies.get_mut(&run)
                    && c.epoch == epoch
                    && c.ending != Some(StateName::Cancelled)
                {
                    c.ending = Some(StateName::Cancelled);
                    c.last_sent = now;
                    self.propose(i, run, epoch, StateName::Cancelled);
                }
            }
            ToNodeMsg::StopRun { run, epoch } => {
                let n = &mut self.nodes[i];
                if n.copies
                    .get(&run)
                    .is_some_and(|c| epoch.is_none_or(|e| e == c.epoch))
                {
                    n.copies.remove(&run);
                }
            }
            ToNodeMsg::Decided {
                run,
                epoch,
                transition,
                state,
            } => {
                let n = &mut self.nodes[i];
                if let Some(c) = n.copies.get_mut(&run)
                    && c.epoch == epoch
                {
                    if state.is_terminal() {
                        n.copies.remove(&run);
                    } else if state == StateType::Running
                        && transition == tid(run, epoch, StateName::Running)
                        && !c.running_acked
                    {
                        // It runs from here (its Running state is durable).
                        c.running_acked = true;
                        c.finish_at = now + c.length;
                    }
                }
            }
            ToNodeMsg::LeaseGranted { holder, ttl, sent_at } => {
                let n = &mut self.nodes[i];
                let Some(t) = n.tasks.get_mut(&holder) else {
                    let msg = NodeMsg::Release {
                        incarnation: inc,
                        holders: vec![holder],
                    };
                    return self.send(Dest::Control, Payload::FromNode(i, msg));
                };
                let deadline = ttl.map(|ttl| sent_at + ttl * 8 / 10);
                if deadline.is_some_and(|d| d <= now) {
                    if !t.held {
                        // Granted too late to use: give it back under this id, wait under a new one.
                        let task = n.tasks.remove(&holder).unwrap();
                        n.holders_made += 1;
                        let fresh = TaskRunId::from_uuid(derived_id(&format!(
                            "{}/{}/{}",
                            n.id, n.inc, n.holders_made
                        )));
                        n.tasks.insert(
                            fresh,
                            Task {
                                last_sent: Timestamp::EPOCH,
                                ..task
                            },
                        );
                        let msg = NodeMsg::Release {
                            incarnation: inc,
                            holders: vec![holder],
                        };
                        self.send(Dest::Control, Payload::FromNode(i, msg));
                    }
                    return;
                }
                if !t.held {
                    t.held = true;
                    t.until = now + t.hold;
                    t.last_sent = sent_at;
                }
                t.ttl = ttl;
                t.deadline = match (t.deadline, deadline) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => b.or(a),
                };
            }
            ToNodeMsg::LeaseLost { holder } => {
                self.nodes[i].tasks.remove(&holder);
            }
            ToNodeMsg::Rejoin => {
                let msg = join(&self.nodes[i]);
                self.send(Dest::Control, Payload::FromNode(i, msg));
            }
            ToNodeMsg::Dead => {
                let n = &mut self.nodes[i];
                n.copies.clear();
                n.tasks.clear();
                self.node_up(i, true);
            }
        }
    }
}
