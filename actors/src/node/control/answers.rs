//! Taking commands from nodes (each admitted by the control machine, answered once durable),
//! and answering a mutating client request once, its answer remembered in the log.

use super::*;

impl ControlState {
    /// Commands from a node, queued in order at once and answered when durable, without
    /// holding the actor. A claim counts only if the control machine admits it (its node alive,
    /// the run placed there).
    pub(super) fn submit(
        &mut self,
        commands: Wire<Vec<Command>>,
        reply: RpcReplyPort<Wire<Vec<SubmitResult>>>,
    ) {
        let p = self.persistence.clone();
        let answers: Result<Vec<_>, _> = commands.get().map(|cmds| {
            cmds.into_iter()
                .map(|c| match self.machine.admit(&c) {
                    Err(refusal) => Err(refusal),
                    Ok(()) => Ok(p.enqueue(c)),
                })
                .collect()
        });
        tokio::spawn(async move {
            let results: Vec<SubmitResult> = match answers {
                Ok(answers) => {
                    let mut out = Vec::with_capacity(answers.len());
                    for a in answers {
                        out.push(match a {
                            Ok(a) => a.await.unwrap_or(Err(PersistError::Stopped)),
                            Err(refusal) => Ok(Err(refusal)),
                        });
                    }
                    out
                }
                Err(e) => vec![Err(PersistError::Encode(format!("an undecodable batch: {e}")))],
            };
            let _ = reply.send(Wire::new(results));
        });
    }

    /// A mutating request with the client's id for it: a try that arrives while the first is
    /// being answered waits for its answer rather than act again.
    pub(super) fn asked(
        &mut self,
        asked: Wire<(RequestId, Request)>,
        reply: RpcReplyPort<Wire<Response>>,
        me: &ActorRef<ControlMsg>,
    ) {
        match asked.get() {
            Ok((id, request)) => match self.asking.entry(id) {
                std::collections::hash_map::Entry::Occupied(mut tries) => tries.get_mut().push(reply),
                std::collections::hash_map::Entry::Vacant(first) => {
                    first.insert(vec![reply]);
                    answer_once(self.persistence.clone(), me.clone(), self.answers, (id, request));
                }
            },
            Err(e) => undecodable(reply, e),
        }
    }

    /// The answer to an asked request, handed to every try waiting for it.
    pub(super) fn answered(&mut self, answer: Wire<(RequestId, Response)>) {
        if let Some((id, answer)) = got(answer, "an answer") {
            for reply in self.asking.remove(&id).unwrap_or_default() {
                let _ = reply.send(Wire::new(answer.clone()));
            }
        }
    }
}

/// Answers a mutating request once: an answer remembered for its id is given again; otherwise
/// the request is handled, and its answer remembered (durably) before it goes out. A transient
/// failure (`unavailable`) is not remembered: the request sent again is tried again. The answer
/// goes back to the actor as [`ControlMsg::Answered`], which hands it to every try waiting.
fn answer_once(
    p: PersistenceHandle,
    me: ActorRef<ControlMsg>,
    bounds: crate::node::replies::AnswerBounds,
    (id, request): (RequestId, Request),
) {
    tokio::spawn(async move {
        let answer = answer(&p, &me, bounds, id, request).await;
        let _ = me.cast(ControlMsg::Answered(Wire::new((id, answer))));
    });
}

async fn answer(
    p: &PersistenceHandle,
    me: &ActorRef<ControlMsg>,
    bounds: crate::node::replies::AnswerBounds,
    id: RequestId,
    request: Request,
) -> Response {
    match p.answer_to(id).await {
        Ok(Some(first)) => {
            return codec::decode::<Response>(&first).unwrap_or_else(|e| {
                // Not worth sending again: the same answer would be read.
                refused(
                    ErrorKind::Protocol,
                    format!("the remembered answer could not be read: {e}"),
                )
            });
        }
        Ok(None) => {}
        Err(e) => return persist_err(e),
    }
    let answer = match me
        .call(
            |port| ControlMsg::Request(Wire::new(request), port),
            Some(crate::node::plane::CALL_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(a)) => a
            .get()
            .unwrap_or_else(|e| refused(ErrorKind::Unavailable, format!("an undecodable answer: {e}"))),
        _ => refused(ErrorKind::Unavailable, "the control node did not answer"),
    };
    let transient = matches!(&answer, Response::Error(e) if e.kind == ErrorKind::Unavailable);
    if !transient {
        let remember = Command::Remember(flotilla_runtime::RememberedOutcome {
            request_id: id,
            answer: encode(&answer),
            max: u32::try_from(bounds.max).unwrap_or(u32::MAX),
            keep: bounds.keep,
        });
        if let Err(e) = p.submit(remember).await {
            tracing::warn!(error = %e, %id, "an answer could not be remembered");
        }
    }
    answer
}
