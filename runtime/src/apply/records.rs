//! The record commands of `apply`: log batches, deployments and events.

use super::*;

impl Tx {
    pub(super) fn append_logs(
        self,
        view: &mut impl StateView,
        flow_run: FlowRunId,
        batch: LogBatchId,
        lines: Vec<LogLine>,
    ) -> Outcome {
        let count = lines.len();
        if view.hot().flow_run(&flow_run).is_none() {
            return Outcome::refused(Refusal::FlowRunNotFound(flow_run));
        }
        if view.log_batch_exists(&flow_run, &batch) {
            return self.done(Reply::LogsAppended { count });
        }
        if count > crate::command::LOG_LINES_PER_COMMAND_MAX {
            return Outcome::refused(Refusal::Invalid(format!(
                "at most {} log lines per batch, not {count}",
                crate::command::LOG_LINES_PER_COMMAND_MAX
            )));
        }
        if let Some(l) = lines.iter().find(|l| l.flow_run != flow_run) {
            return Outcome::refused(Refusal::Invalid(format!(
                "a log line of flow run {} in a batch of flow run {flow_run}",
                l.flow_run
            )));
        }
        let lines = lines.into_iter().map(LogLine::bounded).collect();
        Outcome::replied(
            Reply::LogsAppended { count },
            vec![Write::Logs {
                flow_run,
                batch,
                lines,
            }],
        )
    }

    pub(super) fn put_deployment(mut self, view: &mut impl StateView, d: Deployment) -> Outcome {
        if let Err(r) = check_name("a deployment name", &d.name)
            .and_then(|()| check_name("a flow name", &d.flow_name))
            .and_then(|()| check_tags(&d.tags))
            .and_then(|()| {
                d.schedules.iter().try_for_each(|s| {
                    s.kind
                        .compile()
                        .map(|_| ())
                        .map_err(|e| Refusal::Invalid(e.to_string()))
                })
            })
        {
            return Outcome::refused(r);
        }
        if let Some(storage) = &d.result_storage {
            let missing = crate::block::check_result_storage(storage).err().or_else(|| {
                let name = storage.strip_prefix("s3/").unwrap_or(storage);
                let key = crate::block::block_key(crate::block::BlockType::S3, name);
                view.hot()
                    .setting(&key)
                    .is_none()
                    .then(|| format!("result_storage {storage:?}: no s3 block named {name:?}"))
            });
            if let Some(why) = missing {
                return Outcome::refused(Refusal::Invalid(why));
            }
        }
        if let Some(other) = view.hot().deployment_by_name(&d.name)
            && other.id != d.id
        {
            return Outcome::refused(Refusal::DeploymentNameTaken {
                name: d.name,
                id: other.id,
            });
        }
        let old = view.hot().deployment(&d.id);
        if old == Some(&d) {
            return self.done(Reply::DeploymentPut { created: false });
        }
        let created = old.is_none();
        let id = self.next_event_id();
        self.writes.push(Write::Deployment(d.id));
        self.writes.push(Write::Event(Event {
            id,
            occurred: self.now(),
            event: format!(
                "flotilla.deployment.{}",
                if created { "created" } else { "updated" }
            ),
            resource: Resource::new(format!("flotilla.deployment.{}", d.id), Some(&d.name)),
            related: Vec::new(),
            payload: EventPayload::Data(serde_json::json!({ "paused": d.paused, "flow": d.flow_name })),
        }));
        view.hot_mut().put_deployment(d);
        self.done(Reply::DeploymentPut { created })
    }

    /// One change to one work queue, made to the queue as it is now.
    pub(super) fn edit_work_queue(
        self,
        view: &mut impl StateView,
        name: &str,
        id: crate::ids::WorkQueueId,
        edit: crate::work_queue::QueueEdit,
    ) -> Outcome {
        let current = match view.hot().setting(&crate::work_queue::queue_key(name)) {
            Some(Setting::WorkQueue(q)) => Some(q.clone()),
            _ => None,
        };
        let Some(queue) = edit.edit(current.as_ref(), name, id) else {
            return Outcome::refused(match current {
                Some(_) => Refusal::WorkQueueExists(name.to_owned()),
                None => Refusal::WorkQueueNotFound(name.to_owned()),
            });
        };
        let out = self.put_setting(view, Setting::WorkQueue(queue.clone()));
        match out.reply {
            Ok(_) => Outcome {
                reply: Ok(Reply::WorkQueueEdited { queue }),
                ..out
            },
            Err(_) => out,
        }
    }

    pub(super) fn put_setting(mut self, view: &mut impl StateView, setting: Setting) -> Outcome {
        let checked =
            check_name(&format!("a {} name", setting.kind()), setting.name()).and_then(|()| match &setting {
                Setting::WorkQueue(q) if q.priority == 0 => Err(Refusal::Invalid(
                    "a work queue's priority is 1 (the highest) or more, not 0".into(),
                )),
                Setting::WorkQueue(q) if q.concurrency_limit == Some(0) => Err(Refusal::Invalid(
                    "a work queue's concurrency limit is at least 1 (pause the queue to stop it)".into(),
                )),
                Setting::ConcurrencyLimit(l)
                    if l.lease_ttl.is_zero() || l.lease_ttl > crate::work_queue::LEASE_TTL_MAX =>
                {
                    Err(Refusal::Invalid(format!(
                        "a lease lasts more than 0 s and at most {} s",
                        crate::work_queue::LEASE_TTL_MAX.as_secs()
                    )))
                }
                _ => Ok(()),
            });
        if let Err(r) = checked {
            return Outcome::refused(r);
        }
        let mut setting = setting;
        if let Setting::ConcurrencyLimit(l) = &mut setting {
            l.leases.clear();
        }
        let key = setting.key();
        let old = view.hot().setting(&key);
        if old == Some(&setting) {
            return self.done(Reply::SettingPut { created: false });
        }
        let created = old.is_none();
        let id = self.next_event_id();
        // A block's event shows its masked fields, never its sealed ones; an automation's, its
        // declaration.
        let payload = match &setting {
            Setting::Block(b) => serde_json::json!({ "type": b.kind, "fields": b.masked() }),
            Setting::Automation(a) => serde_json::to_value(&a.spec).unwrap_or(serde_json::Value::Null),
            other => serde_json::to_value(other).unwrap_or(serde_json::Value::Null),
        };
        self.writes.push(Write::Setting(key.clone()));
        self.writes.push(Write::Event(Event {
            id,
            occurred: self.now(),
            event: format!(
                "flotilla.{}.{}",
                setting.kind(),
                if created { "created" } else { "updated" }
            ),
            resource: Resource::new(
                format!("flotilla.{}.{}", setting.kind(), setting.name()),
                Some(setting.name()),
            ),
            related: Vec::new(),
            payload: EventPayload::Data(payload),
        }));
        view.hot_mut().put_setting(setting);
        self.done(Reply::SettingPut { created })
    }

    pub(super) fn delete_setting(mut self, view: &mut impl StateView, key: String) -> Outcome {
        let Some(old) = view.hot().setting(&key) else {
            return self.done(Reply::SettingDeleted { existed: false });
        };
        let (kind, name) = (old.kind(), old.name().to_owned());
        let eid = self.next_event_id();
        self.writes.push(Write::SettingDeleted(key.clone()));
        self.writes.push(Write::Event(Event {
            id: eid,
            occurred: self.now(),
            event: format!("flotilla.{kind}.deleted"),
            resource: Resource::new(format!("flotilla.{kind}.{name}"), Some(&name)),
            related: Vec::new(),
            payload: EventPayload::Data(serde_json::Value::Null),
        }));
        view.hot_mut().delete_setting(&key);
        self.done(Reply::SettingDeleted { existed: true })
    }

    pub(super) fn delete_deployment(mut self, view: &mut impl StateView, id: DeploymentId) -> Outcome {
        let Some(d) = view.hot().deployment(&id) else {
            return self.done(Reply::DeploymentDeleted { existed: false });
        };
        let resource = Resource::new(format!("flotilla.deployment.{id}"), Some(&d.name));
        let eid = self.next_event_id();
        self.writes.push(Write::DeploymentDeleted(id));
        self.writes.push(Write::Event(Event {
            id: eid,
            occurred: self.now(),
            event: "flotilla.deployment.deleted".to_owned(),
            resource,
            related: Vec::new(),
            payload: EventPayload::Data(serde_json::Value::Null),
        }));
        view.hot_mut().delete_deployment(&id);
        self.done(Reply::DeploymentDeleted { existed: true })
    }

    /// Records an event. One whose id is nil is given the next id in log order (a user's
    /// event emitted through the client protocol: it sorts after every event before it, so a
    /// reader following the log never misses it). One with an id of its own is recorded once:
    /// sent again, it is acknowledged and not recorded twice.
    pub(super) fn append_event(mut self, view: &mut impl StateView, mut e: Event) -> Outcome {
        if e.id.as_uuid().is_nil() {
            // An id of this command's own (its log index is in it): no event can have it yet,
            // so the store is not searched for one.
            e.id = self.next_event_id();
        } else if view.event_exists(&e.id) {
            return self.done(Reply::EventAppended { id: e.id });
        }
        let id = e.id;
        if e.event.is_empty() || e.event.len() > crate::event::EVENT_NAME_LEN_MAX {
            return Outcome::refused(Refusal::Invalid(format!(
                "an event name must be 1 to {} bytes long",
                crate::event::EVENT_NAME_LEN_MAX
            )));
        }
        if e.resource.id().is_none() {
            return Outcome::refused(Refusal::Invalid(format!(
                "an event's resource needs a {:?} label",
                crate::event::RESOURCE_ID
            )));
        }
        if e.related.len() > crate::event::RELATED_MAX
            || std::iter::once(&e.resource)
                .chain(&e.related)
                .any(|r| r.0.len() > crate::event::RESOURCE_LABELS_MAX)
        {
            return Outcome::refused(Refusal::Invalid(format!(
                "at most {} related resources of at most {} labels each",
                crate::event::RELATED_MAX,
                crate::event::RESOURCE_LABELS_MAX
            )));
        }
        Outcome::replied(Reply::EventAppended { id }, vec![Write::Event(e)])
    }

    /// Forgets terminal flow runs that ended before the cut-off (their task runs, histories and
    /// logs with them), expired cache entries, and old events and logs (by the stores).
    pub(super) fn prune(mut self, view: &mut impl StateView, p: crate::command::Prune) -> Outcome {
        let max = p.runs_max as usize;
        // One more than asked: whether more are due.
        let mut due = view.hot().ended_before(p.runs_before, max + 1);
        let more = due.len() > max;
        due.truncate(max);
        let mut task_runs = 0u32;
        for id in &due {
            let hot = view.hot_mut();
            let Some(run) = hot.remove_flow_run(id) else {
                continue;
            };
            let mut pruned = PrunedRun {
                flow_run: *id,
                task_runs: Vec::new(),
                archived: vec![(RunId::Flow(*id), run.lifecycle.archived_blocks)],
                events: run.lifecycle.history.clone(),
            };
            for t in hot.remove_task_runs_of(id) {
                pruned.task_runs.push(t.id);
                pruned
                    .archived
                    .push((RunId::Task(t.id), t.lifecycle.archived_blocks));
                pruned.events.extend_from_slice(&t.lifecycle.history);
            }
            task_runs = task_runs.saturating_add(u32::try_from(pruned.task_runs.len()).unwrap_or(u32::MAX));
            self.writes.push(Write::Pruned(pruned));
        }
        view.hot_mut().prune_cache(self.now());
        view.hot_mut().shrink_spare();
        self.writes.push(Write::PrunedBefore {
            events: p.events_before,
            logs: p.logs_before,
        });
        self.done(Reply::Pruned {
            flow_runs: u32::try_from(due.len()).unwrap_or(u32::MAX),
            task_runs,
            more,
        })
    }
}
