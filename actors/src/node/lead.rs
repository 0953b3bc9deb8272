//! The control node's singletons on a replicated cluster: started on the voter that leads and
//! stopped when it no longer does; and the links every node keeps with the voters, learned by
//! greeting the seeds and the voters again and again.

use super::*;

/// The control node's singletons: the control actor and the scheduler.
pub(super) struct Singletons {
    control: (ActorRef<ControlMsg>, ractor::concurrency::JoinHandle<()>),
    scheduler: (
        ActorRef<scheduler::SchedulerMsg>,
        ractor::concurrency::JoinHandle<()>,
    ),
    automations: (
        ActorRef<automations::AutomationsMsg>,
        ractor::concurrency::JoinHandle<()>,
    ),
}

impl Singletons {
    /// Starts the control actor and the scheduler over `p`.
    pub(super) async fn start(
        p: &PersistenceHandle,
        config: &NodeConfig,
        flows: &[Arc<dyn FlowFn>],
        catalog: &crate::engine::FlowCatalog,
        replication: Option<Voter>,
    ) -> Result<Singletons, NodeError> {
        let secrets = Arc::new(
            flotilla_cluster::secrets::SecretsKey::load(&config.certs_dir)
                .map_err(|e| NodeError::Spawn(e.to_string()))?,
        );
        let settings = MembershipSettings {
            unreachable_after: config.unreachable_after,
            late_after: config.late_after,
            ..MembershipSettings::default()
        };
        let control = Actor::spawn(
            Some(control::CONTROL_NAME.to_owned()),
            Control,
            ControlArgs {
                persistence: p.clone(),
                settings,
                flows: flows.to_vec(),
                results: {
                    let store = ResultStore::new(config.data_dir.join("results"), usize::MAX)
                        .with_blocks(crate::engine::object_results::block_stores());
                    match &config.result_store {
                        Some(url) => store.with_shipper(crate::engine::object_results::for_node(url.clone())),
                        None => store,
                    }
                },
                catalog: catalog.clone(),
                answers: config.answers,
                replication,
                secrets: Some(secrets.clone()),
            },
        )
        .await
        .map_err(|e| NodeError::Spawn(e.to_string()))?;
        let scheduler = match Actor::spawn(
            Some(scheduler::SCHEDULER_NAME.to_owned()),
            scheduler::Scheduler,
            scheduler::SchedulerArgs {
                persistence: p.clone(),
                settings: config.schedule,
                flows: catalog.clone(),
            },
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                control.0.stop(None);
                let _ = control.1.await;
                return Err(NodeError::Spawn(e.to_string()));
            }
        };
        let automations = match Actor::spawn(
            Some(automations::AUTOMATIONS_NAME.to_owned()),
            automations::Automations,
            automations::AutomationsArgs {
                persistence: p.clone(),
                secrets,
                control: control.0.clone(),
            },
        )
        .await
        {
            Ok(a) => a,
            Err(e) => {
                scheduler.0.stop(None);
                control.0.stop(None);
                let _ = scheduler.1.await;
                let _ = control.1.await;
                return Err(NodeError::Spawn(e.to_string()));
            }
        };
        Ok(Singletons {
            control,
            scheduler,
            automations,
        })
    }

    /// Stops them, and waits until they have stopped (their names are free again).
    async fn stop(self) {
        self.automations.0.stop(None);
        self.scheduler.0.stop(None);
        self.control.0.stop(None);
        let _ = self.automations.1.await;
        let _ = self.scheduler.1.await;
        let _ = self.control.1.await;
    }
}

/// On a voter: runs the control node's singletons while this node leads, from the moment it
/// has applied everything committed before it led, and stops them when it no longer does.
pub(super) async fn follow_leadership(
    voter: Voter,
    p: PersistenceHandle,
    config: NodeConfig,
    flows: Vec<Arc<dyn FlowFn>>,
    catalog: crate::engine::FlowCatalog,
) {
    use openraft::async_runtime::WatchReceiver as _;
    let me = voting::node_id(config.name.as_str());
    let mut metrics = voter.raft.metrics();
    let mut running: Option<Singletons> = None;
    loop {
        let leads = {
            let m = metrics.borrow_watched();
            m.current_leader == Some(me) && m.state.is_leader()
        };
        voter.peers.set_leader(voting::leader_of(&voter.raft));
        match (leads, running.is_some()) {
            (true, false) => {
                // Everything committed by earlier leaders applied first: the singletons start
                // from the whole state, as on a restart.
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    voter
                        .raft
                        .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        match Singletons::start(&p, &config, &flows, &catalog, Some(voter.clone())).await {
                            Ok(s) => {
                                tracing::info!(node = %config.name, "leading the control state");
                                running = Some(s);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start the control node's singletons")
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "leading, but not yet able to read"),
                    Err(_) => tracing::warn!("leading, but the log was not applied within 5 s"),
                }
                if running.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
            (false, true) => {
                if let Some(s) = running.take() {
                    tracing::info!(node = %config.name, "no longer leading the control state");
                    s.stop().await;
                }
            }
            _ => {}
        }
        if metrics.changed().await.is_err() {
            if let Some(s) = running.take() {
                s.stop().await;
            }
            return;
        }
    }
}

/// Keeps a cluster session with the voter `name`, wherever the book says it listens: dials
/// it (with backoff), carries a session over a QUIC stream until the connection drops, then
/// dials again.
pub(super) async fn keep_voter_link(
    endpoint: QuicEndpoint,
    name: String,
    book: crate::replication::book::AddressBook,
    server: ActorRef<NodeServerMessage>,
    local: String,
) {
    loop {
        match book.get(&name).and_then(|a| a.parse::<SocketAddr>().ok()) {
            Some(addr) => {
                let seed = Seed {
                    addr,
                    host: name.clone(),
                };
                // Until the address changes (a voter started again elsewhere).
                let watch = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if book.get(&name).as_deref() != Some(addr.to_string().as_str()) {
                            return;
                        }
                    }
                };
                tokio::select! {
                    () = keep_link(endpoint.clone(), seed, server.clone(), local.clone()) => {}
                    () = watch => {}
                }
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Greets the seeds and the voters again and again, keeping the book and the leader's name up
/// to date, and keeps a cluster session with every voter (as the voters say they are: they
/// change at run time). Between two nodes that hold replicas, the one named first dials. A voter
/// greeting with its log says so (so that a wipe is noticed later).
#[allow(clippy::too_many_arguments)] // the node's parts a greeter and its links need
pub(super) async fn keep_greeting(
    endpoint: QuicEndpoint,
    me: crate::replication::Member,
    seeds: Vec<Greet>,
    voters: Vec<String>,
    peers: crate::replication::book::Peers,
    voter: Option<Voter>,
    server: ActorRef<NodeServerMessage>,
    local: String,
) {
    use openraft::async_runtime::WatchReceiver as _;
    let mut linked = std::collections::HashSet::new();
    loop {
        let mut known = peers.book.voters();
        for v in &voters {
            if !known.contains(v) {
                known.push(v.clone());
            }
        }
        for v in &known {
            if *v != me.name && (voter.is_none() || *v > me.name) && linked.insert(v.clone()) {
                tokio::spawn(keep_voter_link(
                    endpoint.clone(),
                    v.clone(),
                    peers.book.clone(),
                    server.clone(),
                    local.clone(),
                ));
            }
        }
        let has_log = voter
            .as_ref()
            .is_some_and(|v| v.raft.metrics().borrow_watched().last_log_index.is_some());
        match voting::greet_all(&endpoint, &me, has_log, &seeds, &known, &peers).await {
            Ok((_, leader)) if voter.is_none() => peers.set_leader(leader),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "refused by a voter"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps a link to a seed: dials it (with backoff) and, once connected, carries a ractor_cluster
/// session over a QUIC stream until the connection drops; then dials again.
pub(super) async fn keep_link(
    endpoint: QuicEndpoint,
    Seed { addr: seed, host }: Seed,
    server: ActorRef<NodeServerMessage>,
    local: String,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match endpoint.connect(seed, &host, ALPN_NODE).await {
            Ok(conn) => {
                backoff = Duration::from_millis(50);
                match conn.open_bi().await {
                    Ok((send, recv)) => {
                        let (stream, ended) = QuicBidi::new(send, recv, seed.to_string(), local.clone());
                        if let Err(e) =
                            ractor_cluster::client_connect_external(&server, Box::new(stream)).await
                        {
                            tracing::warn!(%seed, error = %e, "cannot open a cluster session");
                        } else {
                            tracing::info!(%seed, "joined");
                        }
                        // The link is lost when the connection closes or the session on it ends.
                        let reason = tokio::select! {
                            r = conn.closed() => r.to_string(),
                            _ = ended => {
                                conn.close(0u32.into(), b"the cluster session ended");
                                "the cluster session ended".to_owned()
                            }
                        };
                        tracing::warn!(%seed, %reason, "lost the link to the seed; dialling again");
                    }
                    Err(e) => tracing::warn!(%seed, error = %e, "cannot open a stream to the seed"),
                }
            }
            Err(e) => tracing::debug!(%seed, error = %e, "seed not reachable yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
