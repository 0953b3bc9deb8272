//! Errors of the persistence layer: opening a data directory, and faults while running.

use std::io;

/// A data directory that cannot be opened. Every variant names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process holds the directory's lock.
    #[error("{path} is locked by another process (is another flotilla node using this data directory?)")]
    Locked {
        /// The lock file.
        path: String,
    },
    /// A file could not be read or written.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The contents are damaged.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Written by a newer version of Flotilla.
    #[error(
        "{path} was written in data format {found}, newer than this build reads ({supported}); upgrade flotilla"
    )]
    NewerFormat {
        /// The format file.
        path: String,
        /// The version found.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The embedded store refused to open.
    #[error("cannot open the store at {path}: {reason}")]
    Store {
        /// The store's directory.
        path: String,
        /// The store's error.
        reason: String,
    },
}

impl OpenError {
    pub(crate) fn io(path: impl Into<String>, source: io::Error) -> Self {
        OpenError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<String>, reason: impl Into<String>) -> Self {
        OpenError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// A fault of the persistence actor: the request was not carried out (or its fate is unknown)
/// and the store stops accepting writes. Distinct from a [`flotilla_runtime::Refusal`], which is
/// a request the rules turned down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum PersistError {
    /// Writing the command log failed; nothing after it is acknowledged.
    #[error("the command log could not be written: {0}")]
    LogWrite(String),
    /// Writing the store failed.
    #[error("the store could not be written: {0}")]
    StoreWrite(String),
    /// A stored record could not be read.
    #[error("a stored record could not be read: {0}")]
    Read(String),
    /// The command is larger than the limit.
    #[error("the command is {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The command could not be encoded.
    #[error("the command could not be encoded: {0}")]
    Encode(String),
    /// The persistence actor is not running.
    #[error("the persistence actor is not running")]
    Stopped,
    /// The control state is replicated and this node does not lead it (the command was not
    /// carried out: it may be sent again, to the leader).
    #[error("this node does not lead the control state{}", .leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader {
        /// The leader, when known.
        leader: Option<String>,
    },
}
