//! The command log: segment files of checksummed frames, one frame per batch of commands.
//!
//! A batch is appended with one write and made durable with one `fdatasync` before anyone is
//! told; a new segment's directory entry is made durable before its first batch is
//! acknowledged. On open, a torn last frame (a write cut short by a crash: never acknowledged)
//! is cut off; damage anywhere else is an error that names the file.

use flotilla_runtime::codec::{self, DecodeError};
use flotilla_runtime::frame::{self, FrameEnd};
use flotilla_runtime::{Command, LogIndex, Timestamp};
use serde::{Deserialize, Serialize};

use super::error::OpenError;
use super::log_io::{LogFile, LogIo};

/// One command as logged: its index, the time it was applied at, and the command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the log.
    pub index: LogIndex,
    /// The control plane's time for it.
    pub now: Timestamp,
    /// The command.
    pub command: Command,
}

/// A borrowed entry, to encode without cloning the command.
#[derive(Debug, Serialize)]
pub struct LogEntryRef<'a> {
    /// Position in the log.
    pub index: LogIndex,
    /// The control plane's time for it.
    pub now: Timestamp,
    /// The command.
    pub command: &'a Command,
}

/// Encodes a batch of entries as one frame's payload.
pub fn encode_batch(entries: &[LogEntryRef<'_>]) -> Result<Vec<u8>, codec::EncodeError> {
    codec::encode(entries)
}

fn decode_batch(payload: &[u8]) -> Result<Vec<LogEntry>, DecodeError> {
    codec::decode(payload)
}

#[derive(Debug, Clone)]
struct Segment {
    name: String,
    first: LogIndex,
    /// The last index it holds (`first - 1` when empty).
    last: LogIndex,
    bytes: u64,
}

fn segment_name(first: LogIndex) -> String {
    format!("{:020}.log", first.get())
}

fn parse_segment_name(name: &str) -> Option<LogIndex> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(LogIndex::new)
}

/// The command log.
pub struct CommandLog {
    io: Box<dyn LogIo>,
    segments: Vec<Segment>,
    current: Option<Box<dyn LogFile>>,
    segment_bytes_max: u64,
}

impl std::fmt::Debug for CommandLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandLog")
            .field("segments", &self.segments)
            .finish_non_exhaustive()
    }
}

impl CommandLog {
    /// Opens the log, cuts a torn tail, and returns every entry after `after`, in order.
    pub fn open(
        io: Box<dyn LogIo>,
        segment_bytes_max: u64,
        after: LogIndex,
    ) -> Result<(CommandLog, Vec<LogEntry>), OpenError> {
        let names = io.list().map_err(|e| OpenError::io(io.describe(""), e))?;
        let mut found: Vec<(LogIndex, String)> = names
            .into_iter()
            .filter_map(|n| parse_segment_name(&n).map(|i| (i, n)))
            .collect();
        found.sort();
        let mut segments = Vec::with_capacity(found.len());
        let mut entries = Vec::new();
        let mut expect: Option<LogIndex> = None;
        let count = found.len();
        for (k, (first, name)) in found.into_iter().enumerate() {
            let is_last = k + 1 == count;
            let path = io.describe(&name);
            if let Some(e) = expect
                && e != first
            {
                return Err(OpenError::corrupt(
                    path,
                    format!("segment starts at {first} but the previous one ended before {e}"),
                ));
            }
            let bytes = io.read(&name).map_err(|e| OpenError::io(path.clone(), e))?;
            let (frames, end) = frame::decode_frames(&bytes);
            let mut len = bytes.len();
            match end {
                FrameEnd::Clean => {}
                FrameEnd::Torn { offset } if is_last => {
                    tracing::warn!(file = %path, offset, "cutting a torn last write off the command log");
                    io.truncate(&name, offset as u64)
                        .map_err(|e| OpenError::io(path.clone(), e))?;
                    len = offset;
                }
                FrameEnd::Torn { offset } => {
                    return Err(OpenError::corrupt(
                        path,
                        format!("incomplete frame at byte {offset} of a segment that is not the last"),
                    ));
                }
                FrameEnd::Corrupt { offset, reason } => {
                    return Err(OpenError::corrupt(
                        path,
                        format!("frame at byte {offset}: {reason}"),
                    ));
                }
            }
            let mut next = first;
            for payload in frames {
                let batch = decode_batch(payload)
                    .map_err(|e| OpenError::corrupt(path.clone(), format!("undecodable batch: {e}")))?;
                for entry in batch {
                    if entry.index != next {
                        return Err(OpenError::corrupt(
                            path,
                            format!("entry {} where {next} was expected", entry.index),
                        ));
                    }
                    next = next.next();
                    if entry.index > after {
                        entries.push(entry);
                    }
                }
            }
            expect = Some(next);
            segments.push(Segment {
                name,
                first,
                last: LogIndex::new(next.get() - 1),
                bytes: len as u64,
            });
        }
        if let Some(first) = segments.first()
            && first.first.get() > after.get() + 1
        {
            return Err(OpenError::corrupt(
                io.describe(&first.name),
                format!(
                    "the log starts at {} but the store has applied only up to {after}: commands in between are missing",
                    first.first
                ),
            ));
        }
        let mut log = CommandLog {
            io,
            segments,
            current: None,
            segment_bytes_max,
        };
        if let Some(last) = log.segments.last() {
            let name = last.name.clone();
            let file = log
                .io
                .open_append(&name)
                .map_err(|e| OpenError::io(log.io.describe(&name), e))?;
            log.current = Some(file);
        }
        Ok((log, entries))
    }

    /// The index of the last entry in the log (`ZERO` when empty).
    pub fn last_index(&self) -> LogIndex {
        self.segments.last().map(|s| s.last).unwrap_or(LogIndex::ZERO)
    }

    /// Appends one batch (entries `first..=last`, encoded by [`encode_batch`]) as one frame
    /// and makes it durable.
    pub fn append(&mut self, payload: &[u8], first: LogIndex, last: LogIndex) -> std::io::Result<()> {
        let mut framed = Vec::with_capacity(payload.len() + frame::FRAME_HEADER_BYTES);
        frame::encode_frame(payload, &mut framed);
        let rotate = match self.segments.last() {
            None => true,
            Some(s) => s.bytes > 0 && s.bytes + framed.len() as u64 > self.segment_bytes_max,
        };
        if rotate {
            let name = segment_name(first);
            let file = self.io.open_append(&name)?;
            self.io.sync_dir()?;
            self.segments.push(Segment {
                name,
                first,
                last: LogIndex::new(first.get() - 1),
                bytes: 0,
            });
            self.current = Some(file);
        }
        let (Some(file), Some(seg)) = (self.current.as_mut(), self.segments.last_mut()) else {
            return Err(std::io::Error::other("no open segment"));
        };
        file.append(&framed)?;
        file.sync_data()?;
        seg.bytes += framed.len() as u64;
        seg.last = last;
        Ok(())
    }

    /// Removes the segments whose every entry is at or before `upto` (never the one being
    /// written). Returns how many were removed.
    pub fn truncate_through(&mut self, upto: LogIndex) -> std::io::Result<usize> {
        let removable = self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
            .take_while(|s| s.last <= upto)
            .count();
        for s in self.segments.drain(..removable) {
            self.io.remove(&s.name)?;
        }
        if removable > 0 {
            self.io.sync_dir()?;
        }
        Ok(removable)
    }

    /// How many segment files there are.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}
