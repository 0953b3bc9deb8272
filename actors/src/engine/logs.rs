//! Logs of flows and tasks: `tracing` events emitted while a flow or task body runs are captured
//! with the run ids and written in batches (`AppendLogs`), to be read back per run.
//!
//! Bodies are polled under the node's own dispatcher (a registry with a capture layer, and a
//! layer printing to stderr), inside a `flotilla.run` span that carries the run ids; no global
//! subscriber is needed or touched.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use flotilla_runtime::{Command, FlowRunId, LogBatchId, LogLevel, LogLine, TaskRunId, Timestamp};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::{mpsc, oneshot};
use tracing::field::{Field, Visit};
use tracing::instrument::WithSubscriber;
use tracing::{Dispatch, Instrument, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::node::plane::ControlPlane;

#[derive(Clone, Copy, Debug)]
struct RunIds {
    flow_run: FlowRunId,
    task_run: Option<TaskRunId>,
}

#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

enum ShipMsg {
    Line(LogLine),
    Flush(FlowRunId, oneshot::Sender<()>),
}

struct CaptureLayer {
    tx: mpsc::UnboundedSender<ShipMsg>,
}

impl<S> Layer<S> for CaptureLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let Some(ids) = scope
            .from_root()
            .find_map(|span| span.extensions().get::<RunIds>().copied())
        else {
            return;
        };
        let mut v = MessageVisitor::default();
        event.record(&mut v);
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::TRACE => LogLevel::Trace,
            tracing::Level::DEBUG => LogLevel::Debug,
            tracing::Level::INFO => LogLevel::Info,
            tracing::Level::WARN => LogLevel::Warn,
            tracing::Level::ERROR => LogLevel::Error,
        };
        v.message.push_str(&v.fields);
        let line = LogLine {
            flow_run: ids.flow_run,
            task_run: ids.task_run,
            timestamp: Timestamp::from(chrono::Utc::now()),
            level,
            target: meta.target().to_owned(),
            message: v.message,
        };
        let _ = self.tx.send(ShipMsg::Line(line.bounded()));
    }
}

/// The node's log capture: instruments bodies and ships their lines.
#[derive(Clone)]
pub struct LogCapture {
    dispatch: Dispatch,
    tx: mpsc::UnboundedSender<ShipMsg>,
}

impl std::fmt::Debug for LogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCapture").finish_non_exhaustive()
    }
}

fn filter(var: &str, default: &str) -> EnvFilter {
    EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(default))
}

impl LogCapture {
    /// Starts shipping captured lines to `persistence` in batches of at most `batch_max` lines
    /// or every `interval`. Must be called inside a tokio runtime.
    pub fn start(persistence: ControlPlane, batch_max: usize, interval: Duration, to_stderr: bool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let capture = CaptureLayer { tx: tx.clone() }.with_filter(filter("FLOTILLA_RUN_LOG", "info"));
        let stderr = to_stderr.then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false)
                .with_filter(filter("FLOTILLA_LOG", "info"))
        });
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(capture).with(stderr));
        tokio::spawn(ship(rx, persistence, batch_max.max(1), interval));
        LogCapture { dispatch, tx }
    }

    /// `fut`, polled under the node's dispatcher inside a span carrying the run ids.
    pub fn instrument<F: Future>(
        &self,
        fut: F,
        flow_run: FlowRunId,
        task_run: Option<TaskRunId>,
        name: &str,
    ) -> impl Future<Output = F::Output> + use<F> {
        let span = tracing::dispatcher::with_default(&self.dispatch, || match task_run {
            Some(_) => tracing::info_span!("task", name),
            None => tracing::info_span!("flow", name),
        });
        // The run ids ride in the span's extensions, where the capture layer finds them.
        tracing::Span::with_subscriber(&span, |(id, dispatch)| {
            if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
                && let Some(data) = registry.span(id)
            {
                data.extensions_mut().insert(RunIds { flow_run, task_run });
            }
        });
        fut.instrument(span).with_subscriber(self.dispatch.clone())
    }

    /// Hands the lines of `flow_run` captured so far to the persistence actor (so that a
    /// command sent after this one is ordered after them).
    pub async fn flush(&self, flow_run: FlowRunId) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(ShipMsg::Flush(flow_run, tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The most bytes (about) of log lines in one command.
pub const LOG_BATCH_BYTES_MAX: usize = 256 * 1024;

/// Waits for a log batch's acknowledgement; sends it again (with backoff, up to 2 s apart)
/// until the control plane takes it or refuses it for good.
async fn acknowledged(
    persistence: ControlPlane,
    cmd: Command,
    mut answer: oneshot::Receiver<crate::persistence::SubmitResult>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match answer.await {
            Ok(Ok(_)) => return,
            // The persistence actor stopped (the node is going down), or the batch can never
            // be sent.
            Err(_)
            | Ok(Err(
                crate::persistence::PersistError::Stopped | crate::persistence::PersistError::Encode(_),
            )) => {
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "a log batch was not acknowledged; sending it again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                answer = persistence.enqueue(cmd.clone());
            }
        }
    }
}

async fn ship(
    mut rx: mpsc::UnboundedReceiver<ShipMsg>,
    persistence: ControlPlane,
    batch_max: usize,
    interval: Duration,
) {
    // Per run: the lines waiting and about how many bytes they take.
    let mut pending: HashMap<FlowRunId, (Vec<LogLine>, usize)> = HashMap::new();
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let send = |run: FlowRunId, (lines, _): (Vec<LogLine>, usize), rng: &mut SmallRng| {
        let now = Timestamp::from(chrono::Utc::now());
        let cmd = Command::AppendLogs {
            batch: LogBatchId::new(now, rng),
            flow_run: run,
            lines,
        };
        // Written behind, and sent again until it is acknowledged (a resent batch keeps its id,
        // so it is stored once and in its place): no captured line is lost to a lost message.
        match &persistence {
            // In-process, the store's own failure is the node's: nothing to resend to.
            ControlPlane::Local(_) => drop(persistence.enqueue(cmd)),
            ControlPlane::Remote(_) => {
                let answer = persistence.enqueue(cmd.clone());
                tokio::spawn(acknowledged(persistence.clone(), cmd, answer));
            }
        }
    };
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(ShipMsg::Line(line)) => {
                    let run = line.flow_run;
                    let batch = pending.entry(run).or_default();
                    batch.1 += 64 + line.message.len() + line.target.len();
                    batch.0.push(line);
                    // Capped by lines and by bytes (fix 3: a run printing megabytes at once
                    // made one command over the cluster's frame limit).
                    if (batch.0.len() >= batch_max || batch.1 >= LOG_BATCH_BYTES_MAX)
                        && let Some(lines) = pending.remove(&run)
                    {
                        send(run, lines, &mut rng);
                    }
                }
                Some(ShipMsg::Flush(run, ack)) => {
                    if let Some(lines) = pending.remove(&run) {
                        send(run, lines, &mut rng);
                    }
                    let _ = ack.send(());
                }
                None => break,
            },
            _ = tick.tick() => {
                for (run, lines) in pending.drain() {
                    send(run, lines, &mut rng);
                }
            }
        }
    }
    for (run, lines) in pending.drain() {
        send(run, lines, &mut rng);
    }
}
