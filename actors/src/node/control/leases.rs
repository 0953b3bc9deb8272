//! The control actor's tag-limit slots: the decisions are [`Slots`]'; this records every
//! holding in the log before its holder hears of it, and every release, loss and lapse after.

use super::*;

impl ControlState {
    /// Answers waiters that got their slots. A holding is recorded (durably) before its holder
    /// hears of it, so that a restart of this node knows every holder that may run; a holding
    /// not recorded, or a waiter gone (its call timed out), gives the slots back.
    pub(super) fn grant(&mut self, served: Vec<(SlotWaiter, SlotGrant)>) {
        for ((holder, reply), grant) in served {
            let holding = self
                .slots
                .holding(holder)
                .filter(|_| grant != SlotGrant::Unlimited);
            let Some((node, tags)) = holding else {
                let _ = reply.send(encode(&grant));
                continue;
            };
            self.record_hold(holder, node, tags, reply, encode(&grant));
        }
    }

    /// After a start with no complete record of holdings, once every lease of before has been
    /// renewed (and taken again) or has lapsed: the record becomes what this node holds, and is
    /// complete from now on.
    pub(super) fn complete_holds(&mut self) {
        if self.restored && !self.holds_known && !self.slots.waiting_after_restart(Instant::now()) {
            self.holds_known = true;
            let holds = self.slots.holdings();
            drop(
                self.persistence
                    .enqueue(Command::Slots(SlotChange::Complete { holds })),
            );
        }
    }

    /// Records that these holders hold no slot (of `tag` only, when given).
    pub(super) fn free(&self, holders: Vec<TaskRunId>, tag: Option<String>) {
        if !holders.is_empty() {
            drop(
                self.persistence
                    .enqueue(Command::Slots(SlotChange::Free { holders, tag })),
            );
        }
    }

    /// Records that `holder` holds these slots, then sends it `answer`; a holding not recorded,
    /// or a holder gone, gives the slots back.
    fn record_hold(
        &self,
        holder: TaskRunId,
        node: NodeId,
        tags: Vec<String>,
        reply: RpcReplyPort<Vec<u8>>,
        answer: Vec<u8>,
    ) {
        let recorded = self
            .persistence
            .enqueue(Command::Slots(SlotChange::Hold { holder, node, tags }));
        tokio::spawn(async move {
            let ok = matches!(recorded.await, Ok(Ok(Ok(_))));
            if !ok || reply.send(answer).is_err() {
                give_back(vec![holder]);
            }
        });
    }

    /// Lets lapsed leases go (recorded by tag) and serves the waiters that fit now.
    pub(super) fn expire_slots(&mut self) {
        let now = Instant::now();
        let mut lapsed: BTreeMap<String, Vec<TaskRunId>> = BTreeMap::new();
        for (tag, holder) in self.slots.lapsed(now) {
            lapsed.entry(tag).or_default().push(holder);
        }
        for (tag, holders) in lapsed {
            self.free(holders, Some(tag));
        }
        let served = self.slots.expire(now);
        self.grant(served);
    }

    /// Takes back the holdings recorded before this start (None: no complete record).
    pub(super) fn restore_holds(&mut self, holds: Option<Vec<(String, TaskRunId, NodeId)>>) {
        self.holds_known = holds.is_some();
        self.slots.restore(&holds.unwrap_or_default(), Instant::now());
    }

    /// A task run asks for slots: answered when it holds them.
    pub(super) fn acquire_slots(
        &mut self,
        holder: TaskRunId,
        node: NodeId,
        tags: Vec<String>,
        reply: RpcReplyPort<Vec<u8>>,
    ) {
        if let Some(granted) = self
            .slots
            .acquire(holder, node, tags, Instant::now(), (holder, reply))
        {
            self.grant(vec![granted]);
        }
    }

    /// A holder renews its leases: answered whether it holds them (one taken again after it
    /// lapsed is recorded before the holder hears it).
    pub(super) fn renew_slots(
        &mut self,
        holder: TaskRunId,
        node: NodeId,
        tags: &[String],
        reply: RpcReplyPort<Vec<u8>>,
    ) {
        let had = self.slots.holds_all(holder, tags);
        let held = self.slots.renew(holder, node, tags, Instant::now());
        match self.slots.holding(holder).filter(|_| held && !had) {
            Some((node, tags)) => self.record_hold(holder, node, tags, reply, encode(&true)),
            None => {
                if !held {
                    self.free(vec![holder], None);
                }
                let _ = reply.send(encode(&held));
            }
        }
    }

    /// Holders give their slots back.
    pub(super) fn release_slots(&mut self, holders: Vec<TaskRunId>) {
        self.free(holders.clone(), None);
        let served = self.slots.release(&holders, Instant::now());
        self.grant(served);
    }
}

/// Gives slots back through the control actor (a grant that could not be delivered).
fn give_back(holders: Vec<TaskRunId>) {
    if let Some(cell) = ractor::registry::where_is(CONTROL_NAME) {
        let _ = ActorRef::<ControlMsg>::from(cell)
            .cast(ControlMsg::Slots(encode(&SlotRequest::Release(holders))));
    }
}
