//! Answering a mutating client request once, its answer remembered in the log.

use super::*;

/// Answers a mutating request once: an answer remembered for its id is given again; otherwise
/// the request is handled, and its answer remembered (durably) before it goes out. A transient
/// failure (`unavailable`) is not remembered: the request sent again is tried again. The answer
/// goes back to the actor as [`ControlMsg::Answered`], which hands it to every try waiting.
pub(super) fn answer_once(
    p: PersistenceHandle,
    me: ActorRef<ControlMsg>,
    bounds: crate::node::replies::AnswerBounds,
    (id, request): (flotilla_runtime::control::RequestId, Request),
) {
    tokio::spawn(async move {
        let answer = answer(&p, &me, bounds, id, request).await;
        match codec::encode(&(id, answer)) {
            Ok(bytes) => {
                let _ = me.cast(ControlMsg::Answered(bytes));
            }
            Err(e) => tracing::error!(error = %e, %id, "an answer could not be encoded"),
        }
    });
}

async fn answer(
    p: &PersistenceHandle,
    me: &ActorRef<ControlMsg>,
    bounds: crate::node::replies::AnswerBounds,
    id: flotilla_runtime::control::RequestId,
    request: Request,
) -> Vec<u8> {
    match p.answer_to(id).await {
        Ok(Some(first)) => return first,
        Ok(None) => {}
        Err(e) => return encode(&persist_err(e)),
    }
    let answer = match me
        .call(
            |port| ControlMsg::Request(encode(&request), port),
            Some(crate::node::plane::CALL_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(a)) => a,
        _ => encode(&refused(
            ErrorKind::Unavailable,
            "the control node did not answer",
        )),
    };
    let transient = matches!(
        codec::decode::<Response>(&answer),
        Ok(Response::Error(e)) if e.kind == ErrorKind::Unavailable
    );
    if !transient {
        let remember = Command::Remember(flotilla_runtime::RememberedOutcome {
            request_id: id,
            answer: answer.clone(),
            max: u32::try_from(bounds.max).unwrap_or(u32::MAX),
            keep: bounds.keep,
        });
        if let Err(e) = p.submit(remember).await {
            tracing::warn!(error = %e, %id, "an answer could not be remembered");
        }
    }
    answer
}
