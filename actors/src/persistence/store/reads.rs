//! Reads of the control state: from the hot state at once, or off the actor from the store.

use super::*;

impl Store {
    /// Answers a read: from the hot state at once, or, for what lives in the store (histories,
    /// events, logs), as a job to run off the actor.
    pub fn read(&self, read: Read, stats: StoreStats) -> ReadAnswer {
        let hot = &self.hot;
        let cold = self.cold.clone();
        // Whether some runs live in the store alone (see `evict.rs`): reads of runs not in
        // memory, and listings, then look there too.
        let evicted = self.evicted > 0;
        let history = |run: RunId, offset: usize, limit: usize| {
            let lifecycle = match run {
                RunId::Flow(id) => hot.flow_run(&id).map(|r| &r.lifecycle),
                RunId::Task(id) => hot.task_run(&id).map(|r| &r.lifecycle),
            };
            match lifecycle {
                None if evicted => {
                    let cold = cold.clone();
                    ReadAnswer::cold(move || {
                        let lifecycle = match run {
                            RunId::Flow(id) => cold.evicted_run(&id)?.map(|r| r.lifecycle),
                            RunId::Task(id) => cold.evicted_task(&id)?.map(|r| r.lifecycle),
                        };
                        Ok(ReadReply::History(match lifecycle {
                            Some(l) => {
                                Some(cold.history(run, l.archived_blocks, &l.history, offset, limit)?)
                            }
                            None => None,
                        }))
                    })
                }
                None => ReadAnswer::Ready(Ok(ReadReply::History(None))),
                Some(l) => {
                    let (blocks, window) = (l.archived_blocks, l.history.clone());
                    let cold = cold.clone();
                    ReadAnswer::cold(move || {
                        Ok(ReadReply::History(Some(
                            cold.history(run, blocks, &window, offset, limit)?,
                        )))
                    })
                }
            }
        };
        ReadAnswer::Ready(Ok(match read {
            Read::FlowRun(id) => match hot.flow_run(&id) {
                None if evicted => {
                    return ReadAnswer::cold(move || {
                        Ok(ReadReply::FlowRun(cold.evicted_run(&id)?.map(Box::new)))
                    });
                }
                run => ReadReply::FlowRun(run.cloned().map(Box::new)),
            },
            Read::FlowRuns { filter, after, limit } => {
                let limit = limit.min(PAGE_MAX);
                let page: Vec<FlowRun> = match &filter {
                    RunFilter::All => hot.flow_runs_page(after, limit),
                    RunFilter::State(t) => hot.flow_runs_in_state(*t, after, limit),
                    RunFilter::Deployment(d) => hot.flow_runs_of_deployment(*d, after, limit),
                }
                .into_iter()
                .cloned()
                .collect();
                if evicted {
                    let prefix = evict::listing_prefix(&filter);
                    return ReadAnswer::cold(move || {
                        let stored = cold.evicted_page(&prefix, after, limit)?;
                        Ok(ReadReply::FlowRuns(evict::merge_pages(page, stored, limit)))
                    });
                }
                ReadReply::FlowRuns(page)
            }
            Read::TaskRun(id) => match hot.task_run(&id) {
                None if evicted => {
                    return ReadAnswer::cold(move || {
                        Ok(ReadReply::TaskRun(cold.evicted_task(&id)?.map(Box::new)))
                    });
                }
                run => ReadReply::TaskRun(run.cloned().map(Box::new)),
            },
            Read::TaskRuns {
                flow_run,
                after,
                limit,
            } => {
                let limit = limit.min(PAGE_MAX);
                if evicted && hot.flow_run(&flow_run).is_none() {
                    return ReadAnswer::cold(move || {
                        Ok(ReadReply::TaskRuns(cold.evicted_tasks(&flow_run, after, limit)?))
                    });
                }
                ReadReply::TaskRuns(
                    hot.task_runs_of(flow_run, after, limit)
                        .into_iter()
                        .cloned()
                        .collect(),
                )
            }
            Read::FlowRunHistory { run, offset, limit } => return history(RunId::Flow(run), offset, limit),
            Read::TaskRunHistory { run, offset, limit } => return history(RunId::Task(run), offset, limit),
            Read::Events { after, limit } => {
                return ReadAnswer::cold(move || {
                    Ok(ReadReply::Events(
                        cold.events_after(after, limit.clamp(1, PAGE_MAX))?,
                    ))
                });
            }
            Read::Logs {
                flow_run,
                after,
                limit,
            } => {
                if hot.flow_run(&flow_run).is_some() {
                    return ReadAnswer::cold(move || cold.logs(flow_run, after, limit));
                } else if evicted {
                    return ReadAnswer::cold(move || match cold.evicted_run(&flow_run)? {
                        Some(_) => cold.logs(flow_run, after, limit),
                        None => Ok(ReadReply::Logs {
                            lines: Vec::new(),
                            next: after,
                        }),
                    });
                } else {
                    // Unknown or pruned (its batches may not be deleted from the store yet).
                    ReadReply::Logs {
                        lines: Vec::new(),
                        next: after,
                    }
                }
            }
            Read::Deployment(id) => ReadReply::Deployment(hot.deployment(&id).cloned().map(Box::new)),
            Read::Settings => ReadReply::Settings(hot.settings().cloned().collect()),
            Read::Answer { request_id, now } => {
                ReadReply::Answer(hot.answer_to(&request_id, now).map(|a| a.answer.clone()))
            }
            Read::SlotHolds => {
                ReadReply::SlotHolds(self.hot.slot_holds_complete().then(|| self.slot_holds()))
            }
            Read::DeploymentByName(name) => {
                ReadReply::Deployment(hot.deployment_by_name(&name).cloned().map(Box::new))
            }
            Read::Deployments { after, limit } => {
                let mut all: Vec<&flotilla_runtime::Deployment> = hot
                    .deployments()
                    .filter(|d| after.as_ref().is_none_or(|a| d.name.as_str() > a.as_str()))
                    .collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                ReadReply::Deployments(all.into_iter().take(limit.clamp(1, PAGE_MAX)).cloned().collect())
            }
            Read::Cached { key, now } => ReadReply::Cached(hot.cached(&key, now).cloned()),
            Read::Stats => ReadReply::Stats(StoreStats {
                flow_runs: hot.flow_run_count() + self.evicted,
                resident_runs: hot.resident(),
                applied: self.applied,
                ..stats
            }),
        }))
    }
}
