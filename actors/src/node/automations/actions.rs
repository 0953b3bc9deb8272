//! A firing's actions, run in order (one's failure never stops the next), their outcomes
//! recorded on the automation, each an event (`flotilla.automation.action.executed` or
//! `.failed`).

use std::sync::Arc;
use std::time::Duration;

use flotilla_cluster::secrets::SecretsKey;
use flotilla_cluster::wire::{QueueChange, Request, Response};
use flotilla_runtime::automation::{Action, ActionOutcome, AutomationEdit, Firing};
use flotilla_runtime::block::{BlockType, WebhookBlock};
use flotilla_runtime::{Command, Event, EventPayload, FlowRunId, Setting, Timestamp};
use hmac::Mac;
use ractor::ActorRef;

use crate::node::control::ControlMsg;
use crate::node::typed::Wire;
use crate::persistence::PersistenceHandle;

/// How long a webhook's post may take, each try.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a webhook is tried.
const WEBHOOK_TRIES: u32 = 3;
/// The longest webhook body.
const WEBHOOK_BODY_MAX: usize = 256 * 1024;

/// What actions need.
#[derive(Clone, Debug)]
pub(super) struct Context {
    pub p: PersistenceHandle,
    pub secrets: Arc<SecretsKey>,
    /// This node's control actor (its singleton: a name looked up in the registry may be a
    /// deposed leader's, or none, while the lead moves).
    pub control: ActorRef<ControlMsg>,
}

/// Runs a firing's actions, then records their outcomes.
pub(super) async fn run(ctx: Context, actions: Vec<Action>, firing: Firing, event: Option<Event>) {
    let template = template_context(&firing, event.as_ref());
    let mut outcomes = Vec::with_capacity(actions.len());
    for (i, action) in actions.iter().enumerate() {
        let r = one(&ctx, action, i, &firing, event.as_ref(), &template).await;
        if let Err(e) = &r {
            tracing::warn!(automation = %firing.automation, key = %firing.key, action = action.kind(), reason = %e, "an automation's action failed");
        }
        outcomes.push(ActionOutcome {
            action: action.kind().to_owned(),
            ok: r.is_ok(),
            detail: r.unwrap_or_else(|e| e),
            at: Some(now()),
        });
    }
    let cmd = Command::EditAutomation {
        name: firing.automation.clone(),
        edit: AutomationEdit::Ran {
            key: firing.key.clone(),
            outcomes,
        },
        at: firing.at,
    };
    match ctx.p.submit(cmd).await {
        Ok(Ok(_)) => {}
        Ok(Err(r)) => {
            tracing::warn!(automation = %firing.automation, refusal = %r, "an automation's outcomes were not recorded")
        }
        Err(e) => {
            tracing::error!(automation = %firing.automation, error = %e, "an automation's outcomes could not be recorded")
        }
    }
}

/// What templates see: `event` (its `id`, `occurred`, `event`, `resource`, `related`,
/// `payload`), `automation` (its `name`) and `firing` (`key`, `bucket`, `window_start`).
fn template_context(firing: &Firing, event: Option<&Event>) -> serde_json::Value {
    let event = event.map_or(serde_json::Value::Null, |e| {
        serde_json::json!({
            "id": e.id.to_string(),
            "occurred": e.occurred,
            "event": e.event,
            "resource": e.resource,
            "related": e.related,
            "payload": match &e.payload {
                EventPayload::Data(d) => d.clone(),
                other => serde_json::to_value(other).unwrap_or_default(),
            },
        })
    });
    serde_json::json!({
        "event": event,
        "automation": { "name": firing.automation },
        "firing": { "key": firing.key, "bucket": firing.bucket, "window_start": firing.window_start },
    })
}

fn render(text: &str, ctx: &serde_json::Value) -> Result<String, String> {
    let env = minijinja::Environment::new();
    env.render_str(text, ctx)
        .map_err(|e| format!("the template: {e}"))
}

/// Every string in `v` rendered as a template.
fn render_value(v: &serde_json::Value, ctx: &serde_json::Value) -> Result<serde_json::Value, String> {
    Ok(match v {
        serde_json::Value::String(s) => serde_json::Value::String(render(s, ctx)?),
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.iter().map(|x| render_value(x, ctx)).collect::<Result<_, _>>()?)
        }
        serde_json::Value::Object(o) => serde_json::Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), render_value(x, ctx)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Asks the control actor, as a client would.
async fn ask(control: &ActorRef<ControlMsg>, request: Request) -> Result<Response, String> {
    match control
        .call(
            |port| ControlMsg::Request(Wire::new(request), port),
            Some(Duration::from_secs(30)),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(w)) => match w.get() {
            Ok(Response::Error(e)) => Err(e.message),
            Ok(r) => Ok(r),
            Err(e) => Err(e),
        },
        Ok(_) => Err("the control actor did not answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The flow run an action is about: its own, or the triggering event's (the resource, or the
/// related resource of role `flow-run`).
fn flow_run_of(given: Option<&String>, event: Option<&Event>) -> Result<FlowRunId, String> {
    if let Some(id) = given {
        return id.parse().map_err(|_| format!("{id:?} is not a flow run id"));
    }
    let e = event.ok_or("no flow run given and no triggering event")?;
    std::iter::once(&e.resource)
        .chain(&e.related)
        .filter_map(|r| r.id()?.strip_prefix("flotilla.flow-run."))
        .find_map(|id| id.parse().ok())
        .ok_or_else(|| format!("the triggering event {} is about no flow run", e.event))
}

async fn one(
    ctx: &Context,
    action: &Action,
    index: usize,
    firing: &Firing,
    event: Option<&Event>,
    template: &serde_json::Value,
) -> Result<String, String> {
    match action {
        Action::DoNothing => Ok("nothing".into()),
        Action::RunDeployment {
            deployment,
            parameters,
        } => {
            let params = render_value(&serde_json::to_value(parameters).unwrap_or_default(), template)?;
            match ask(
                &ctx.control,
                Request::RunDeployment {
                    name: deployment.clone(),
                    params,
                    id: None,
                    idempotency_key: Some(format!("automation/{}/{index}", firing.key)),
                },
            )
            .await?
            {
                Response::Ran(id) => Ok(format!("flow run {id} of {deployment}")),
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Action::PauseDeployment { deployment } | Action::ResumeDeployment { deployment } => {
            let pause = matches!(action, Action::PauseDeployment { .. });
            let Response::Deployment(d) = ask(&ctx.control, Request::Deployment(deployment.clone())).await?
            else {
                return Err("unexpected answer".into());
            };
            let mut spec = d.spec();
            spec.paused = pause;
            ask(&ctx.control, Request::PutDeployment(Box::new(spec))).await?;
            Ok(format!(
                "{} {deployment}",
                if pause { "paused" } else { "resumed" }
            ))
        }
        Action::PauseWorkQueue { work_queue } | Action::ResumeWorkQueue { work_queue } => {
            let pause = matches!(action, Action::PauseWorkQueue { .. });
            let edit = if pause {
                flotilla_runtime::QueueEdit::Pause
            } else {
                flotilla_runtime::QueueEdit::Resume
            };
            ask(
                &ctx.control,
                Request::WorkQueue {
                    name: work_queue.clone(),
                    change: QueueChange::Edit(edit),
                },
            )
            .await?;
            Ok(format!(
                "{} work queue {work_queue}",
                if pause { "paused" } else { "resumed" }
            ))
        }
        Action::PauseAutomation { automation } | Action::ResumeAutomation { automation } => {
            let pause = matches!(action, Action::PauseAutomation { .. });
            let name = automation.clone().unwrap_or_else(|| firing.automation.clone());
            let edit = if pause {
                AutomationEdit::Pause
            } else {
                AutomationEdit::Resume
            };
            match ctx
                .p
                .submit(Command::EditAutomation {
                    name: name.clone(),
                    edit,
                    at: firing.at,
                })
                .await
            {
                Ok(Ok(_)) => Ok(format!(
                    "{} automation {name}",
                    if pause { "paused" } else { "resumed" }
                )),
                Ok(Err(r)) => Err(r.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        Action::CancelFlowRun { flow_run } => {
            let id = flow_run_of(flow_run.as_ref(), event)?;
            ask(&ctx.control, Request::Cancel(id)).await?;
            Ok(format!("cancelled flow run {id}"))
        }
        Action::ChangeFlowRunState {
            state,
            message,
            flow_run,
        } => {
            let id = flow_run_of(flow_run.as_ref(), event)?;
            let kind: flotilla_runtime::StateType = state.parse().map_err(|e| format!("{e}"))?;
            let name = canonical(kind);
            let mut s = flotilla_runtime::State::named(name, now());
            s.message = message.clone();
            let tid = flotilla_runtime::TransitionId::new(now(), &mut rand::rng());
            let proposal = flotilla_runtime::Proposal::new(s, tid);
            match ctx
                .p
                .submit(Command::ProposeFlowRunState { run: id, proposal })
                .await
            {
                Ok(Ok(flotilla_runtime::Reply::FlowRunTransition {
                    decision: flotilla_runtime::Decision::Accept(s),
                    ..
                })) => Ok(format!("flow run {id} is {}", s.name)),
                Ok(Ok(flotilla_runtime::Reply::FlowRunTransition { decision, .. })) => {
                    Err(format!("flow run {id}: {decision:?}"))
                }
                Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
                Ok(Err(r)) => Err(r.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        Action::SendWebhook { block, body } => webhook(ctx, block, body, template).await,
    }
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

/// The usual state name of a state type.
fn canonical(kind: flotilla_runtime::StateType) -> flotilla_runtime::StateName {
    use flotilla_runtime::{StateName as N, StateType as T};
    match kind {
        T::Scheduled => N::Scheduled,
        T::Pending => N::Pending,
        T::Running => N::Running,
        T::Paused => N::Paused,
        T::Cancelling => N::Cancelling,
        T::Cancelled => N::Cancelled,
        T::Completed => N::Completed,
        T::Failed => N::Failed,
        T::Crashed => N::Crashed,
    }
}

/// Posts the rendered body to a webhook block's URL, signed with its secret; retried with
/// backoff on a failure to connect, a 429 or a 5xx.
async fn webhook(
    ctx: &Context,
    block: &str,
    body: &str,
    template: &serde_json::Value,
) -> Result<String, String> {
    let settings = ctx.p.settings().await.map_err(|e| e.to_string())?;
    let key = flotilla_runtime::block::block_key(BlockType::Webhook, block);
    let record = settings
        .into_iter()
        .find_map(|s| match s {
            Setting::Block(b) if flotilla_runtime::block::block_key(b.kind, &b.name) == key => Some(b),
            _ => None,
        })
        .ok_or_else(|| format!("no webhook block named {block:?}"))?;
    let fields = crate::node::control::unseal(&ctx.secrets, &record)?;
    let hook: WebhookBlock =
        serde_json::from_value(fields).map_err(|e| format!("webhook block {block}: {e}"))?;
    let body = render(body, template)?;
    if body.len() > WEBHOOK_BODY_MAX {
        return Err(format!("the body is over {WEBHOOK_BODY_MAX} bytes"));
    }
    serde_json::from_str::<serde_json::Value>(&body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let signature = match &hook.secret {
        Some(secret) => {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
                .map_err(|e| format!("the webhook's secret: {e}"))?;
            mac.update(body.as_bytes());
            Some(format!("sha256={}", hex::encode(mac.finalize().into_bytes())))
        }
        None => None,
    };
    let mut delay = Duration::from_millis(250);
    let mut last = String::new();
    for attempt in 1..=WEBHOOK_TRIES {
        let (url, headers, body, signature) = (
            hook.url.clone(),
            hook.headers.clone(),
            body.clone(),
            signature.clone(),
        );
        let sent =
            tokio::task::spawn_blocking(move || post(&url, &headers, body.as_bytes(), signature.as_deref()))
                .await
                .map_err(|e| e.to_string())?;
        match sent {
            Ok(status) if (200..300).contains(&status) => {
                return Ok(format!("posted to {} ({status})", hook.url));
            }
            Ok(status) if status == 429 || status >= 500 => last = format!("{} answered {status}", hook.url),
            Ok(status) => return Err(format!("{} answered {status}", hook.url)),
            Err(e) => last = e,
        }
        if attempt < WEBHOOK_TRIES {
            tokio::time::sleep(delay).await;
            delay *= 4;
        }
    }
    Err(format!("{last} (tried {WEBHOOK_TRIES} times)"))
}

fn post(
    url: &str,
    headers: &std::collections::BTreeMap<String, String>,
    body: &[u8],
    signature: Option<&str>,
) -> Result<u16, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(url).header("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if let Some(s) = signature {
        req = req.header("X-Flotilla-Signature", s);
    }
    req.send(body)
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("cannot post to {url}: {e}"))
}
