//! The Raft log on disk: segment files of checksummed frames (one frame per appended batch of
//! entries, made durable with one `fdatasync`), and a meta file of frames holding the vote and
//! the last purged log id (the last whole frame wins).
//!
//! openraft's contract (`RaftLogStorage`): the vote is on disk before `save_vote` returns;
//! appended entries are readable when `append` returns and its callback fires only once they
//! are on disk; truncating and purging leave no hole. Every entry not purged is also kept in
//! memory, shared with the readers, so reads never touch the disk (the log is purged behind
//! each snapshot, which bounds it).

use std::collections::BTreeMap;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};

use flotilla_runtime::codec;
use flotilla_runtime::frame::{self, FrameEnd};
use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use serde::{Deserialize, Serialize};

use super::Control;
use crate::persistence::log_io::{LogFile, LogIo};

type Entry = EntryOf<Control>;
type LogId = LogIdOf<Control>;
type Vote = VoteOf<Control>;

/// A new segment is begun once the current one holds this many bytes.
const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// The meta file is rewritten into a new one once it holds this many bytes.
const META_BYTES_MAX: u64 = 64 * 1024;

fn segment_name(first: u64) -> String {
    format!("{first:020}.raft")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".raft")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn meta_name(generation: u64) -> String {
    format!("meta-{generation:020}")
}

fn parse_meta_name(name: &str) -> Option<u64> {
    name.strip_prefix("meta-")?.parse().ok()
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// What the meta file records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote>,
    purged: Option<LogId>,
}

/// One segment: its file, the index of its first entry, and where each frame starts.
#[derive(Debug)]
struct Segment {
    name: String,
    first: u64,
    bytes: u64,
    /// Each frame: the indexes of its first and last entries, and its byte offset.
    frames: Vec<Frame>,
}

/// Where a frame is and which entries it holds.
#[derive(Clone, Copy, Debug)]
struct Frame {
    first: u64,
    last: u64,
    offset: u64,
}

/// What readers share with the store: every entry not purged, and the vote.
#[derive(Debug, Default)]
struct Shared {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
}

fn read_lock(s: &RwLock<Shared>) -> std::sync::RwLockReadGuard<'_, Shared> {
    s.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock(s: &RwLock<Shared>) -> std::sync::RwLockWriteGuard<'_, Shared> {
    s.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The Raft log store.
pub struct RaftLogStore {
    io: Box<dyn LogIo>,
    segments: Vec<Segment>,
    current: Option<Box<dyn LogFile>>,
    meta: Meta,
    meta_generation: u64,
    meta_file: Option<Box<dyn LogFile>>,
    meta_bytes: u64,
    shared: Arc<RwLock<Shared>>,
}

impl std::fmt::Debug for RaftLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLogStore")
            .field("segments", &self.segments.len())
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// A reader of the log (one per replication task): what the store shares.
#[derive(Debug, Clone)]
pub struct Reader {
    shared: Arc<RwLock<Shared>>,
}

impl RaftLogStore {
    /// Opens the log in `io`'s directory: the latest meta, every segment's entries after the
    /// purged ones; a torn last frame of the last segment is cut off, any other damage is an
    /// error naming the file.
    pub fn open(io: Box<dyn LogIo>) -> io::Result<RaftLogStore> {
        let names = io.list()?;
        let (meta, meta_generation, meta_bytes) = read_meta(io.as_ref(), &names)?;
        let mut found: Vec<(u64, String)> = names
            .iter()
            .filter_map(|n| parse_segment_name(n).map(|i| (i, n.clone())))
            .collect();
        found.sort();
        let purged = meta.purged.map_or(0, |l| l.index);
        let mut shared = Shared {
            vote: meta.vote,
            entries: BTreeMap::new(),
        };
        let mut segments = Vec::with_capacity(found.len());
        let count = found.len();
        // The index the next entry must have (entries may skip ahead only over purged ones).
        let mut next: Option<u64> = None;
        for (k, (first, name)) in found.into_iter().enumerate() {
            let path = io.describe(&name);
            let bytes = io.read(&name)?;
            let (payloads, end) = frame::decode_frames(&bytes);
            let len = match end {
                FrameEnd::Clean => bytes.len(),
                FrameEnd::Torn { offset } if k + 1 == count => {
                    tracing::warn!(file = %path, offset, "cutting a torn last write off the Raft log");
                    io.truncate(&name, offset as u64)?;
                    offset
                }
                FrameEnd::Torn { offset } => {
                    return Err(corrupt(format!("{path}: incomplete frame at byte {offset}")));
                }
                FrameEnd::Corrupt { offset, reason } => {
                    return Err(corrupt(format!("{path}: frame at byte {offset}: {reason}")));
                }
            };
            let mut segment = Segment {
                name,
                first,
                bytes: len as u64,
                frames: Vec::new(),
            };
            let mut offset = 0u64;
            for payload in payloads {
                let batch: Vec<Entry> =
                    codec::decode(payload).map_err(|e| corrupt(format!("{path}: undecodable batch: {e}")))?;
                let (Some(a), Some(b)) = (batch.first(), batch.last()) else {
                    return Err(corrupt(format!("{path}: an empty batch at byte {offset}")));
                };
                segment.frames.push(Frame {
                    first: a.index(),
                    last: b.index(),
                    offset,
                });
                offset += (payload.len() + frame::FRAME_HEADER_BYTES) as u64;
                for entry in batch {
                    let i = entry.index();
                    let skips_purged = meta.purged.is_some() && i <= purged + 1;
                    if let Some(n) = next
                        && i != n
                        && !(skips_purged && i > n)
                    {
                        return Err(corrupt(format!("{path}: entry {i} where {n} was expected")));
                    }
                    next = Some(i + 1);
                    if meta.purged.is_none() || i > purged {
                        shared.entries.insert(i, entry);
                    }
                }
            }
            segments.push(segment);
        }
        if let (Some(p), Some((&first, _))) = (meta.purged, shared.entries.first_key_value())
            && first > p.index + 1
        {
            return Err(corrupt(format!(
                "{}: the log resumes at {first} after entries purged up to {}: a hole",
                io.describe(""),
                p.index
            )));
        }
        let current = match segments.last() {
            Some(s) => Some(io.open_append(&s.name)?),
            None => None,
        };
        let meta_file = Some(io.open_append(&meta_name(meta_generation))?);
        Ok(RaftLogStore {
            io,
            segments,
            current,
            meta,
            meta_generation,
            meta_file,
            meta_bytes,
            shared: Arc::new(RwLock::new(shared)),
        })
    }

    /// Records the meta durably: one frame appended and synced, or, once the file is large, a
    /// new file holding it alone (synced, its directory entry synced) before the old one goes.
    fn write_meta(&mut self, meta: Meta) -> io::Result<()> {
        let payload = codec::encode(&meta).map_err(io::Error::other)?;
        let mut framed = Vec::with_capacity(payload.len() + frame::FRAME_HEADER_BYTES);
        frame::encode_frame(&payload, &mut framed);
        if self.meta_bytes + framed.len() as u64 > META_BYTES_MAX {
            let old = meta_name(self.meta_generation);
            let mut file = self.io.open_append(&meta_name(self.meta_generation + 1))?;
            file.append(&framed)?;
            file.sync_data()?;
            self.io.sync_dir()?;
            self.io.remove(&old)?;
            self.io.sync_dir()?;
            self.meta_generation += 1;
            self.meta_file = Some(file);
            self.meta_bytes = framed.len() as u64;
        } else {
            let file = self
                .meta_file
                .as_mut()
                .ok_or_else(|| io::Error::other("no meta file open"))?;
            file.append(&framed)?;
            file.sync_data()?;
            self.meta_bytes += framed.len() as u64;
        }
        self.meta = meta;
        Ok(())
    }

    fn last_log_id(&self) -> Option<LogId> {
        read_lock(&self.shared)
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id())
            .or(self.meta.purged)
    }

    /// Appends entries as one frame and makes it durable.
    fn write_entries(&mut self, entries: &[Entry]) -> io::Result<()> {
        let Some(first) = entries.first().map(|e| e.index()) else {
            return Ok(());
        };
        let payload = codec::encode(entries).map_err(io::Error::other)?;
        let mut framed = Vec::with_capacity(payload.len() + frame::FRAME_HEADER_BYTES);
        frame::encode_frame(&payload, &mut framed);
        let rotate = self
            .segments
            .last()
            .is_none_or(|s| s.bytes > 0 && s.bytes + framed.len() as u64 > SEGMENT_BYTES_MAX);
        if rotate {
            let name = segment_name(first);
            let file = self.io.open_append(&name)?;
            self.io.sync_dir()?;
            self.segments.push(Segment {
                name,
                first,
                bytes: 0,
                frames: Vec::new(),
            });
            self.current = Some(file);
        }
        let (Some(file), Some(seg)) = (self.current.as_mut(), self.segments.last_mut()) else {
            return Err(io::Error::other("no open segment"));
        };
        file.append(&framed)?;
        file.sync_data()?;
        seg.frames.push(Frame {
            first,
            last: entries.last().map_or(first, |e| e.index()),
            offset: seg.bytes,
        });
        seg.bytes += framed.len() as u64;
        Ok(())
    }

    /// Removes every entry after `last` (all when None) from the files: whole segments that
    /// begin after it, then the tail of the one that holds it from the first frame holding a
    /// removed entry (that frame's kept entries are written again, from memory).
    fn cut_after(&mut self, last: Option<u64>) -> io::Result<()> {
        let mut removed = false;
        while let Some(s) = self.segments.last() {
            if last.is_some_and(|l| s.first <= l) {
                break;
            }
            let name = s.name.clone();
            self.segments.pop();
            self.current = None;
            self.io.remove(&name)?;
            removed = true;
        }
        if removed {
            self.io.sync_dir()?;
        }
        let (Some(l), Some(seg)) = (last, self.segments.last_mut()) else {
            return Ok(());
        };
        let Some(at) = seg.frames.iter().position(|f| f.last > l) else {
            if self.current.is_none() {
                self.current = Some(self.io.open_append(&seg.name)?);
            }
            return Ok(());
        };
        let cut = seg.frames[at];
        seg.frames.truncate(at);
        self.io.truncate(&seg.name, cut.offset)?;
        seg.bytes = cut.offset;
        self.current = Some(self.io.open_append(&seg.name)?);
        let kept = entries_in(
            &read_lock(&self.shared).entries,
            Bound::Included(cut.first),
            Bound::Included(l),
        );
        self.write_entries(&kept)
    }
}

/// The entries within the bounds (none when they are empty or inverted).
fn entries_in(entries: &BTreeMap<u64, Entry>, start: Bound<u64>, end: Bound<u64>) -> Vec<Entry> {
    let from = match start {
        Bound::Included(s) => s,
        Bound::Excluded(s) => match s.checked_add(1) {
            Some(s) => s,
            None => return Vec::new(),
        },
        Bound::Unbounded => 0,
    };
    let to = match end {
        Bound::Included(e) => e,
        Bound::Excluded(0) => return Vec::new(),
        Bound::Excluded(e) => e - 1,
        Bound::Unbounded => u64::MAX,
    };
    if from > to {
        return Vec::new();
    }
    entries.range(from..=to).map(|(_, e)| e.clone()).collect()
}

/// Reads the meta file of the highest generation (an empty meta when there is none).
fn read_meta(io: &dyn LogIo, names: &[String]) -> io::Result<(Meta, u64, u64)> {
    let mut generations: Vec<u64> = names.iter().filter_map(|n| parse_meta_name(n)).collect();
    generations.sort_unstable();
    let Some(&generation) = generations.last() else {
        return Ok((Meta::default(), 0, 0));
    };
    let name = meta_name(generation);
    let bytes = io.read(&name)?;
    let (payloads, end) = frame::decode_frames(&bytes);
    let len = match end {
        FrameEnd::Clean => bytes.len(),
        FrameEnd::Torn { offset } => {
            io.truncate(&name, offset as u64)?;
            offset
        }
        FrameEnd::Corrupt { offset, reason } => {
            return Err(corrupt(format!(
                "{}: frame at byte {offset}: {reason}",
                io.describe(&name)
            )));
        }
    };
    let meta = match payloads.last() {
        Some(p) => {
            codec::decode(p).map_err(|e| corrupt(format!("{}: undecodable: {e}", io.describe(&name))))?
        }
        None => Meta::default(),
    };
    Ok((meta, generation, len as u64))
}

impl RaftLogReader<Control> for Reader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(entries_in(&read_lock(&self.shared).entries, start, end))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(read_lock(&self.shared).vote)
    }
}

impl RaftLogReader<Control> for RaftLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.reader().try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(read_lock(&self.shared).vote)
    }
}

impl RaftLogStore {
    fn reader(&self) -> Reader {
        Reader {
            shared: self.shared.clone(),
        }
    }
}

impl RaftLogStorage<Control> for RaftLogStore {
    type LogReader = Reader;

    async fn get_log_state(&mut self) -> Result<LogState<Control>, io::Error> {
        Ok(LogState {
            last_purged_log_id: self.meta.purged,
            last_log_id: self.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let meta = Meta {
            vote: Some(*vote),
            ..self.meta.clone()
        };
        self.write_meta(meta)?;
        write_lock(&self.shared).vote = Some(*vote);
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Control>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let written = self.write_entries(&entries);
        if written.is_ok() {
            let mut shared = write_lock(&self.shared);
            for e in entries {
                shared.entries.insert(e.index(), e);
            }
        }
        let failed = written
            .as_ref()
            .err()
            .map(|e| io::Error::new(e.kind(), e.to_string()));
        callback.io_completed(written);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let last = last_log_id.map(|l| l.index);
        self.cut_after(last)?;
        let mut shared = write_lock(&self.shared);
        match last {
            Some(l) => {
                shared.entries.split_off(&(l + 1));
            }
            None => shared.entries.clear(),
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The purged id first (a crash after it only leaves entries that are ignored), then the
        // segments wholly at or before it (never the one being written).
        let meta = Meta {
            purged: Some(log_id),
            ..self.meta.clone()
        };
        self.write_meta(meta)?;
        {
            let mut shared = write_lock(&self.shared);
            let rest = shared.entries.split_off(&(log_id.index + 1));
            shared.entries = rest;
        }
        let removable = self
            .segments
            .windows(2)
            .take_while(|w| w[1].first <= log_id.index + 1)
            .count();
        for s in self.segments.drain(..removable) {
            self.io.remove(&s.name)?;
        }
        if removable > 0 {
            self.io.sync_dir()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
