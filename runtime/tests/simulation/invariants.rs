//! What the control machine simulation checks: after every step (slots and leases within
//! their limits, runs under way within their queue's and deployment's limits, never two nodes
//! running one run under its epoch) and once quiet (every run ended, none that resumes left
//! Crashed, no slot held).

use super::*;

impl Sim {
    pub(super) fn check(&self) -> Result<(), String> {
        for (tag, limit, _) in LIMITS {
            let believers: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.up)
                .flat_map(|n| n.runs.values())
                .filter(|(_, t)| {
                    t.tags.iter().any(|x| x == tag)
                        && matches!(t.phase, Phase::Holding { deadline, .. } if deadline > self.now)
                })
                .map(|(_, t)| short_task(t.id))
                .collect();
            if believers.len() as u32 > limit {
                return Err(format!(
                    "{} task runs believe they hold a {tag} slot (limit {limit}): {believers:?}",
                    believers.len()
                ));
            }
        }
        // Never two nodes running one run under its epoch (a copy of an earlier epoch, or of a
        // run that ended, is a zombie whose proposals are refused).
        let mut copies: BTreeMap<FlowRunId, Vec<String>> = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.up) {
            for (run, (epoch, _)) in &n.runs {
                let live = self
                    .state
                    .hot()
                    .flow_run(run)
                    .is_some_and(|r| r.epoch == *epoch && !r.lifecycle.state.is_terminal());
                if live {
                    copies.entry(*run).or_default().push(n.name.to_string());
                }
            }
        }
        if let Some((run, nodes)) = copies.iter().find(|(_, nodes)| nodes.len() > 1) {
            return Err(format!("{} runs on {nodes:?} under one epoch", short(*run)));
        }
        for l in self.coord.limits() {
            if l.leases.len() as u32 > l.limit {
                return Err(format!(
                    "{} leases of {} (limit {})",
                    l.leases.len(),
                    l.tag,
                    l.limit
                ));
            }
        }
        let mut per_queue: BTreeMap<String, u32> = BTreeMap::new();
        let mut per_deployment: BTreeMap<DeploymentId, u32> = BTreeMap::new();
        for r in self.state.hot().flow_runs() {
            if matches!(r.lifecycle.state.kind, StateType::Pending | StateType::Running) {
                *per_queue
                    .entry(r.work_queue.clone().unwrap_or_default())
                    .or_default() += 1;
                if let Some(d) = r.deployment_id {
                    *per_deployment.entry(d).or_default() += 1;
                }
            }
        }
        for (name, _, limit) in QUEUES {
            let n = per_queue.get(name).copied().unwrap_or(0);
            if limit.is_some_and(|l| n > l) {
                return Err(format!("{n} runs under way in queue {name} (limit {limit:?})"));
            }
        }
        for (key, limit, _) in DEPLOYMENTS {
            let n = per_deployment.get(&deployment(key)).copied().unwrap_or(0);
            if n > limit {
                let runs: Vec<String> = self
                    .state
                    .hot()
                    .flow_runs()
                    .filter(|r| {
                        r.deployment_id == Some(deployment(key))
                            && matches!(r.lifecycle.state.kind, StateType::Pending | StateType::Running)
                    })
                    .map(|r| format!("{} on {:?}", short(r.id), r.owner))
                    .collect();
                return Err(format!(
                    "{n} runs under way of deployment {key} (limit {limit}): {runs:?}"
                ));
            }
        }
        Ok(())
    }

    /// Once quiet: every run ended, no slot held.
    pub(super) fn settled(&self) -> Result<(), String> {
        let open: Vec<String> = self
            .state
            .hot()
            .flow_runs()
            .filter(|r| !r.lifecycle.state.is_terminal())
            .map(|r| format!("{} {}", short(r.id), r.lifecycle.state.name))
            .collect();
        // A run that resumes after a crash ends Completed once quiet (or Cancelled by its
        // deployment's cancel-new), never left Crashed.
        let crashed: Vec<String> = self
            .state
            .hot()
            .flow_runs()
            .filter(|r| r.resume && r.lifecycle.state.kind == StateType::Crashed)
            .map(|r| short(r.id))
            .collect();
        if !crashed.is_empty() && open.is_empty() {
            return Err(format!("runs that resume were left Crashed: {crashed:?}"));
        }
        if !open.is_empty() {
            let nodes: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    let runs: Vec<String> = n
                        .runs
                        .iter()
                        .map(|(r, (_, t))| format!("{} {:?}", short(*r), t.phase))
                        .collect();
                    format!(
                        "{} up {} slots {} queues {:?} runs {runs:?}",
                        n.name, n.up, n.slots, n.queues
                    )
                })
                .collect();
            let placed: Vec<String> = self
                .state
                .hot()
                .flow_runs()
                .filter_map(|r| match self.coord.whereabouts(&r.id) {
                    flotilla_runtime::control::Whereabouts::Placed(n) => Some(format!(
                        "{} {} on {n:?} (owner {:?})",
                        short(r.id),
                        r.lifecycle.state.name,
                        r.owner
                    )),
                    _ => None,
                })
                .collect();
            return Err(format!(
                "runs never ended: {open:?}\nplaced: {placed:?}\nnodes: {nodes:#?}\nmachine: {:?} members {:?}",
                self.coord,
                self.coord.members()
            ));
        }
        let held: Vec<String> = self
            .coord
            .limits()
            .iter()
            .flat_map(|l| {
                l.leases
                    .iter()
                    .map(move |x| format!("{} {}", l.tag, short_task(x.holder)))
            })
            .collect();
        if !held.is_empty() {
            return Err(format!("slots still held once quiet: {held:?}"));
        }
        self.clients_settled()
    }
}
