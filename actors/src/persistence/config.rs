//! Configuration of the persistence actor.

use std::path::PathBuf;
use std::time::Duration;

/// How the persistence actor batches, bounds and checkpoints.
#[derive(Clone, Debug)]
pub struct PersistenceConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The most commands in one log batch (one `fdatasync`).
    pub batch_commands_max: usize,
    /// The most bytes in one log batch.
    pub batch_bytes_max: usize,
    /// The largest single command, encoded.
    pub command_bytes_max: usize,
    /// How far (in log bytes) the store may lag behind the log before acknowledgements wait.
    pub store_lag_bytes_max: u64,
    /// The applied state is handed to the store thread after this many log bytes...
    pub store_write_bytes: u64,
    /// ...or this long after the last hand-over, whichever comes first (a run changed several
    /// times in between is written once).
    pub store_write_interval: Duration,
    /// A log segment is closed once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// The store is checkpointed (made durable, so the log can be truncated) after this many
    /// log bytes...
    pub checkpoint_bytes: u64,
    /// ...or this long after the last checkpoint, whichever comes first.
    pub checkpoint_interval: Duration,
    /// How many events a slow subscriber may fall behind before it misses some (it is told).
    pub event_channel_capacity: usize,
    /// How long events, logs and terminal runs are kept.
    pub retention: Retention,
    /// At most about this many flow and task runs are held in memory: runs that have not ended
    /// always are, terminal ones beyond it live in the store alone (oldest ended first).
    pub memory_runs: usize,
}

/// How long records are kept before a pruning (itself a logged command) forgets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Events (state changes stay as long as their run: they are its history).
    pub events: Duration,
    /// Log lines.
    pub logs: Duration,
    /// Terminal flow runs, with their task runs, histories and logs.
    pub runs: Duration,
}

impl Default for Retention {
    /// Events and logs 7 days, terminal runs 30 days.
    fn default() -> Self {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        Retention {
            events: DAY * 7,
            logs: DAY * 7,
            runs: DAY * 30,
        }
    }
}

impl Retention {
    /// How often to prune: every 10 minutes, or a quarter of the shortest window if shorter
    /// (at least every 100 ms).
    pub fn interval(&self) -> Duration {
        let shortest = self.events.min(self.logs).min(self.runs);
        (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(600))
    }

    /// The most flow runs one pruning command forgets (the next follows at once while more are
    /// due).
    pub const RUNS_PER_COMMAND: u32 = 256;
}

impl PersistenceConfig {
    /// Safe defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PersistenceConfig {
            data_dir: data_dir.into(),
            batch_commands_max: 4096,
            batch_bytes_max: 16 * 1024 * 1024,
            command_bytes_max: 4 * 1024 * 1024,
            store_lag_bytes_max: 64 * 1024 * 1024,
            store_write_bytes: 16 * 1024 * 1024,
            store_write_interval: Duration::from_millis(500),
            segment_bytes_max: 64 * 1024 * 1024,
            checkpoint_bytes: 64 * 1024 * 1024,
            checkpoint_interval: Duration::from_secs(30),
            event_channel_capacity: 65_536,
            retention: Retention::default(),
            memory_runs: super::store::MEMORY_RUNS_DEFAULT,
        }
    }

    /// Tiny limits, so that tests reach them: small batches, segments and lag.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        PersistenceConfig {
            batch_commands_max: 64,
            batch_bytes_max: 256 * 1024,
            command_bytes_max: 128 * 1024,
            store_lag_bytes_max: 256 * 1024,
            store_write_bytes: 32 * 1024,
            store_write_interval: Duration::from_millis(20),
            segment_bytes_max: 64 * 1024,
            checkpoint_bytes: 128 * 1024,
            checkpoint_interval: Duration::from_millis(200),
            event_channel_capacity: 1024,
            ..PersistenceConfig::new(data_dir)
        }
    }
}
