//! Where submitted commands wait for the persistence actor. Submitters push into a shared queue
//! and wake the actor only when the queue was empty; the actor takes the whole queue at once.
//! One actor message per batch instead of one per command.

use std::sync::{Mutex, MutexGuard};

use flotilla_runtime::Command;
use tokio::sync::oneshot;

use super::{PersistError, SubmitResult};

/// Where a command's answer goes.
pub type Ack = oneshot::Sender<SubmitResult>;

#[derive(Default)]
struct Inner {
    queue: Vec<(Command, Ack)>,
    closed: Option<PersistError>,
}

/// The queue of submitted commands.
#[derive(Default)]
pub(crate) struct Inbox {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a command. `Ok(true)`: the queue was empty, wake the actor. `Err`: the inbox is
    /// closed (the actor stopped or failed), with the reason and the answer channel back.
    pub(crate) fn push(&self, command: Command, ack: Ack) -> Result<bool, (PersistError, Ack)> {
        let mut inner = self.inner();
        if let Some(err) = &inner.closed {
            return Err((err.clone(), ack));
        }
        inner.queue.push((command, ack));
        Ok(inner.queue.len() == 1)
    }

    /// Takes everything queued.
    pub(crate) fn take(&self) -> Vec<(Command, Ack)> {
        std::mem::take(&mut self.inner().queue)
    }

    /// Closes the inbox and answers everything queued with `err`.
    pub(crate) fn close(&self, err: PersistError) {
        let queued = {
            let mut inner = self.inner();
            inner.closed.get_or_insert(err.clone());
            std::mem::take(&mut inner.queue)
        };
        for (_, ack) in queued {
            let _ = ack.send(Err(err.clone()));
        }
    }
}
