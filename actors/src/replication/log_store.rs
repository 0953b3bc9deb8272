//! The Raft log on disk: segment files of checksummed frames, each one record made durable with
//! one `fdatasync` (a batch of appended entries, or a cut: every entry after an index is gone),
//! and a meta file of frames holding the vote and the last purged log id (the last whole frame
//! wins).
//!
//! openraft's contract (`RaftLogStorage`): the vote is on disk before `save_vote` returns;
//! appended entries are readable when `append` returns and its callback fires only once they
//! are on disk; truncating and purging leave no hole. A cut is a record, never a rewrite, so a
//! crash while truncating cannot lose an entry kept. Segments are numbered in the order they
//! were begun and replayed in that order; purging removes whole segments from the front once
//! every entry in them is purged. The latest entries (at most [`MEMORY_ENTRIES`]) are also
//! kept in memory, shared with the readers: replication and apply read them there; an older
//! range (a follower far behind) is read back from the segments.

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
/// The most entries kept in memory (the latest).
pub const MEMORY_ENTRIES: usize = 65_536;

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.raft")
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

/// One segment: its file, its number, and the greatest index written to it.
#[derive(Debug)]
struct Segment {
    name: String,
    seq: u64,
    bytes: u64,
    max_index: Option<u64>,
}

/// One frame of a segment.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    /// Entries appended, in order.
    Entries(Vec<Entry>),
    /// Every entry after this index (all, when None) is gone.
    CutAfter(Option<u64>),
}

/// What readers share with the store: the latest entries, and the vote.
#[derive(Debug, Default)]
struct Shared {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    /// The most entries kept in `entries`.
    window: usize,
    /// The last index purged: never read back.
    purged: Option<u64>,
}

impl Shared {
    /// Forgets the oldest entries beyond the window (they stay on disk).
    fn trim(&mut self) {
        while self.entries.len() > self.window {
            self.entries.pop_first();
        }
    }
}

fn read_lock(s: &RwLock<Shared>) -> std::sync::RwLockReadGuard<'_, Shared> {
    s.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock(s: &RwLock<Shared>) -> std::sync::RwLockWriteGuard<'_, Shared> {
    s.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The files of the log, owned by its writer thread.
struct Disk {
    io: Arc<dyn LogIo>,
    segments: Vec<Segment>,
    current: Option<Box<dyn LogFile>>,
    /// Whether the current segment holds frames not synced yet.
    unsynced: bool,
    meta: Meta,
    meta_generation: u64,
    meta_file: Option<Box<dyn LogFile>>,
    meta_bytes: u64,
}

/// What the writer thread is asked to do, in order.
enum Op {
    /// Append a batch of entries; the callback fires once they are on disk (several appends
    /// queued together share one `fdatasync`).
    Append(Record, IOFlushed<Control>),
    /// Change the files (a vote, a cut, a purge) once every append before it is on disk, and
    /// answer.
    Change(Change, tokio::sync::oneshot::Sender<io::Result<()>>),
}

/// A change to the files, made on the writer thread.
type Change = Box<dyn FnOnce(&mut Disk) -> io::Result<()> + Send>;

/// The Raft log store: the writer thread's queue, and what the readers share.
pub struct RaftLogStore {
    writer: std::sync::mpsc::Sender<Op>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The vote and the purged id, as last written.
    meta: Meta,
    shared: Arc<RwLock<Shared>>,
    io: Arc<dyn LogIo>,
}

impl std::fmt::Debug for RaftLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLogStore")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// The writer thread: appends queued together are written and share one `fdatasync`, then
/// their callbacks fire; other changes wait for the appends before them. After a failure every
/// operation fails (the node must stop: its log may be incomplete).
fn write_loop(mut disk: Disk, ops: std::sync::mpsc::Receiver<Op>) {
    let mut failed: Option<String> = None;
    let fail = |why: &Option<String>| {
        io::Error::other(format!(
            "the Raft log failed earlier: {}",
            why.as_deref().unwrap_or("")
        ))
    };
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        while batch.len() < 4096
            && let Ok(op) = ops.try_recv()
        {
            batch.push(op);
        }
        let mut flushed: Vec<IOFlushed<Control>> = Vec::new();
        let sync = |disk: &mut Disk, flushed: &mut Vec<IOFlushed<Control>>, failed: &mut Option<String>| {
            if flushed.is_empty() {
                return;
            }
            let r = if failed.is_some() {
                Err(fail(failed))
            } else {
                disk.sync()
            };
            if let Err(e) = &r {
                failed.get_or_insert_with(|| e.to_string());
            }
            for cb in flushed.drain(..) {
                cb.io_completed(match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
        };
        for op in batch {
            match op {
                Op::Append(record, cb) => {
                    if failed.is_none()
                        && let Err(e) = disk.write_record(&record)
                    {
                        failed = Some(e.to_string());
                    }
                    flushed.push(cb);
                }
                Op::Change(change, done) => {
                    sync(&mut disk, &mut flushed, &mut failed);
                    let r = match &failed {
                        Some(_) => Err(fail(&failed)),
                        None => change(&mut disk),
                    };
                    if let Err(e) = &r {
                        failed.get_or_insert_with(|| e.to_string());
                    }
                    let _ = done.send(r);
                }
            }
        }
        sync(&mut disk, &mut flushed, &mut failed);
    }
}

/// A reader of the log (one per replication task): what the store shares.
#[derive(Debug, Clone)]
pub struct Reader {
    shared: Arc<RwLock<Shared>>,
    io: Arc<dyn LogIo>,
}

impl std::fmt::Debug for dyn LogIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe(""))
    }
}

/// Reads the entries from `from` to `to` (inclusive) back from the segments, replaying their
/// records in order (cuts included); a torn frame at the end of a segment being written is
/// ignored.
fn read_range(io: &dyn LogIo, from: u64, to: u64) -> io::Result<Vec<Entry>> {
    let mut found: Vec<(u64, String)> = io
        .list()?
        .iter()
        .filter_map(|n| parse_segment_name(n).map(|seq| (seq, n.clone())))
        .collect();
    found.sort();
    let mut kept: BTreeMap<u64, Entry> = BTreeMap::new();
    for (_, name) in found {
        let bytes = match io.read(&name) {
            Ok(b) => b,
            // Purged meanwhile: its entries are not asked for.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let (payloads, end) = frame::decode_frames(&bytes);
        if let FrameEnd::Corrupt { offset, reason } = end {
            return Err(corrupt(format!(
                "{}: frame at byte {offset}: {reason}",
                io.describe(&name)
            )));
        }
        for payload in payloads {
            let record: Record = codec::decode(payload)
                .map_err(|e| corrupt(format!("{}: undecodable record: {e}", io.describe(&name))))?;
            match record {
                Record::Entries(batch) => {
                    for entry in batch {
                        if (from..=to).contains(&entry.index()) {
                            kept.insert(entry.index(), entry);
                        }
                    }
                }
                Record::CutAfter(None) => kept.clear(),
                Record::CutAfter(Some(l)) => {
                    kept.split_off(&(l + 1));
                }
            }
        }
    }
    Ok(kept.into_values().collect())
}

impl RaftLogStore {
    /// Opens the log in `io`'s directory: the latest meta, every segment's entries after the
    /// purged ones; a torn last frame of the last segment is cut off, any other damage is an
    /// error naming the file.
    pub fn open(io: Box<dyn LogIo>) -> io::Result<RaftLogStore> {
        Self::open_keeping(io, MEMORY_ENTRIES)
    }

    /// As [`RaftLogStore::open`], keeping at most `window` entries in memory.
    pub fn open_keeping(io: Box<dyn LogIo>, window: usize) -> io::Result<RaftLogStore> {
        let io: Arc<dyn LogIo> = Arc::from(io);
        let window = window.max(1);
        let names = io.list()?;
        let (meta, meta_generation, meta_bytes) = read_meta(io.as_ref(), &names)?;
        let mut found: Vec<(u64, String)> = names
            .iter()
            .filter_map(|n| parse_segment_name(n).map(|seq| (seq, n.clone())))
            .collect();
        found.sort();
        let purged = meta.purged.map(|l| l.index);
        let mut shared = Shared {
            vote: meta.vote,
            entries: BTreeMap::new(),
            window,
            purged,
        };
        // The first and last entries on disk (after cuts), whatever memory keeps of them.
        let mut first: Option<u64> = None;
        let mut last: Option<u64> = None;
        let mut segments = Vec::with_capacity(found.len());
        let count = found.len();
        for (k, (seq, name)) in found.into_iter().enumerate() {
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
                seq,
                bytes: len as u64,
                max_index: None,
            };
            for payload in payloads {
                let record: Record = codec::decode(payload)
                    .map_err(|e| corrupt(format!("{path}: undecodable record: {e}")))?;
                match record {
                    Record::Entries(batch) => {
                        for entry in batch {
                            let i = entry.index();
                            segment.max_index = segment.max_index.max(Some(i));
                            if purged.is_some_and(|p| i <= p) {
                                continue;
                            }
                            let expect = last.map(|k| k + 1).or(purged.map(|p| p + 1));
                            if let Some(e) = expect
                                && i != e
                            {
                                return Err(corrupt(format!("{path}: entry {i} where {e} was expected")));
                            }
                            shared.entries.insert(i, entry);
                            first = first.or(Some(i));
                            last = Some(i);
                        }
                        if shared.entries.len() > 2 * window {
                            shared.trim();
                        }
                    }
                    Record::CutAfter(None) => {
                        shared.entries.clear();
                        (first, last) = (None, None);
                    }
                    Record::CutAfter(Some(l)) => {
                        shared.entries.split_off(&(l + 1));
                        last = last.map(|k| k.min(l));
                        if first.is_some_and(|f| f > l) {
                            (first, last) = (None, None);
                        }
                    }
                }
            }
            segments.push(segment);
        }
        shared.trim();
        // A cut below what memory kept: the latest entries are read back.
        if let Some(l) = last
            && shared.entries.last_key_value().map(|(k, _)| *k) != Some(l)
        {
            let from = first.unwrap_or(0).max(l.saturating_sub(window as u64 - 1));
            for e in read_range(io.as_ref(), from, l)? {
                shared.entries.insert(e.index(), e);
            }
        }
        if let (Some(p), Some(first)) = (purged, first)
            && first > p + 1
        {
            return Err(corrupt(format!(
                "{}: the log resumes at {first} after entries purged up to {p}: a hole",
                io.describe(""),
            )));
        }
        let current = match segments.last() {
            Some(s) => Some(io.open_append(&s.name)?),
            None => None,
        };
        let meta_file = Some(io.open_append(&meta_name(meta_generation))?);
        if !names.contains(&meta_name(meta_generation)) {
            // A new meta file: its directory entry durable before a vote is written to it.
            io.sync_dir()?;
        }
        let disk = Disk {
            io: io.clone(),
            segments,
            current,
            unsynced: false,
            meta: meta.clone(),
            meta_generation,
            meta_file,
            meta_bytes,
        };
        let (writer, ops) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("flotilla-raft-log".into())
            .spawn(move || write_loop(disk, ops))?;
        Ok(RaftLogStore {
            writer,
            thread: Some(thread),
            meta,
            shared: Arc::new(RwLock::new(shared)),
            io,
        })
    }

    /// Whether the log holds nothing: no vote, no entry, nothing purged (a voter that never
    /// took part, or whose data directory was wiped).
    pub fn is_empty(&self) -> bool {
        let shared = self
            .shared
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.meta.vote.is_none() && self.meta.purged.is_none() && shared.entries.is_empty()
    }

    /// Closes the log once everything queued is written (its callbacks fired).
    pub fn close(mut self) {
        let thread = self.thread.take();
        drop(self);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Has the writer thread change the files (after every append queued before), and waits.
    async fn change(&self, f: impl FnOnce(&mut Disk) -> io::Result<()> + Send + 'static) -> io::Result<()> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(Op::Change(Box::new(f), done))
            .map_err(|_| io::Error::other("the Raft log's writer is gone"))?;
        answer
            .await
            .map_err(|_| io::Error::other("the Raft log's writer is gone"))?
    }

    fn last_log_id(&self) -> Option<LogId> {
        read_lock(&self.shared)
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id())
            .or(self.meta.purged)
    }
}

impl Disk {
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

    /// Makes the frames written to the current segment durable.
    fn sync(&mut self) -> io::Result<()> {
        if self.unsynced
            && let Some(file) = self.current.as_mut()
        {
            file.sync_data()?;
        }
        self.unsynced = false;
        Ok(())
    }

    /// Removes the segments whose every entry is at or before `index`, from the front (never
    /// the one being written).
    fn remove_purged(&mut self, index: u64) -> io::Result<()> {
        let removable = self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
            .take_while(|s| s.max_index.is_none_or(|m| m <= index))
            .count();
        for s in self.segments.drain(..removable) {
            self.io.remove(&s.name)?;
        }
        if removable > 0 {
            self.io.sync_dir()?;
        }
        Ok(())
    }

    /// Appends a record as one frame (made durable by [`Disk::sync`]).
    fn write_record(&mut self, record: &Record) -> io::Result<()> {
        let payload = codec::encode(record).map_err(io::Error::other)?;
        let mut framed = Vec::with_capacity(payload.len() + frame::FRAME_HEADER_BYTES);
        frame::encode_frame(&payload, &mut framed);
        let rotate = self
            .segments
            .last()
            .is_none_or(|s| s.bytes > 0 && s.bytes + framed.len() as u64 > SEGMENT_BYTES_MAX);
        if rotate {
            self.sync()?;
            let seq = self.segments.last().map_or(0, |s| s.seq + 1);
            let name = segment_name(seq);
            let file = self.io.open_append(&name)?;
            self.io.sync_dir()?;
            self.segments.push(Segment {
                name,
                seq,
                bytes: 0,
                max_index: None,
            });
            self.current = Some(file);
        }
        let (Some(file), Some(seg)) = (self.current.as_mut(), self.segments.last_mut()) else {
            return Err(io::Error::other("no open segment"));
        };
        file.append(&framed)?;
        self.unsynced = true;
        seg.bytes += framed.len() as u64;
        if let Record::Entries(entries) = record {
            seg.max_index = seg.max_index.max(entries.last().map(|e| e.index()));
        }
        Ok(())
    }
}

/// The first and last index within the bounds (none when they are empty or inverted).
fn bounds(start: Bound<u64>, end: Bound<u64>) -> Option<(u64, u64)> {
    let from = match start {
        Bound::Included(s) => s,
        Bound::Excluded(s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let to = match end {
        Bound::Included(e) => e,
        Bound::Excluded(0) => return None,
        Bound::Excluded(e) => e - 1,
        Bound::Unbounded => u64::MAX,
    };
    (from <= to).then_some((from, to))
}

/// The entries within the bounds that memory keeps.
fn entries_in(entries: &BTreeMap<u64, Entry>, start: Bound<u64>, end: Bound<u64>) -> Vec<Entry> {
    match bounds(start, end) {
        Some((from, to)) => entries.range(from..=to).map(|(_, e)| e.clone()).collect(),
        None => Vec::new(),
    }
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
        let (from, to) = match bounds(start, end) {
            Some(b) => b,
            None => return Ok(Vec::new()),
        };
        let (in_memory, first_kept, purged) = {
            let shared = read_lock(&self.shared);
            (
                entries_in(&shared.entries, start, end),
                shared.entries.first_key_value().map(|(k, _)| *k),
                shared.purged,
            )
        };
        let from = purged.map_or(from, |p| from.max(p + 1));
        // Older than memory keeps: read back from the segments (a follower far behind).
        match first_kept {
            Some(k) if from < k => {
                let io = self.io.clone();
                let older = tokio::task::spawn_blocking(move || read_range(io.as_ref(), from, to.min(k - 1)))
                    .await
                    .map_err(io::Error::other)??;
                Ok(older.into_iter().chain(in_memory).collect())
            }
            _ => Ok(in_memory),
        }
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
            io: self.io.clone(),
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
        let written = meta.clone();
        self.change(move |disk| disk.write_meta(written)).await?;
        self.meta = meta;
        write_lock(&self.shared).vote = Some(*vote);
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Control>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        // Readable at once (openraft's contract), durable when the callback fires.
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut shared = write_lock(&self.shared);
            for e in &entries {
                shared.entries.insert(e.index(), e.clone());
            }
            shared.trim();
        }
        self.writer
            .send(Op::Append(Record::Entries(entries), callback))
            .map_err(|_| io::Error::other("the Raft log's writer is gone"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let last = last_log_id.map(|l| l.index);
        let after = last.map_or(0, |l| l + 1);
        if read_lock(&self.shared).entries.range(after..).next().is_none() {
            return Ok(());
        }
        self.change(move |disk| {
            disk.write_record(&Record::CutAfter(last))?;
            disk.sync()
        })
        .await?;
        let emptied = {
            let mut shared = write_lock(&self.shared);
            match last {
                Some(l) => {
                    shared.entries.split_off(&(l + 1));
                }
                None => shared.entries.clear(),
            }
            shared.entries.is_empty()
        };
        // Cut below what memory kept: the latest entries kept are read back.
        if emptied && let Some(l) = last {
            let from = self
                .meta
                .purged
                .map_or(0, |p| p.index + 1)
                .max(l.saturating_sub(read_lock(&self.shared).window as u64 - 1));
            let io = self.io.clone();
            let back = tokio::task::spawn_blocking(move || read_range(io.as_ref(), from, l))
                .await
                .map_err(io::Error::other)??;
            let mut shared = write_lock(&self.shared);
            for e in back {
                shared.entries.insert(e.index(), e);
            }
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
        let written = meta.clone();
        self.change(move |disk| {
            disk.write_meta(written)?;
            disk.remove_purged(log_id.index)
        })
        .await?;
        self.meta = meta;
        let mut shared = write_lock(&self.shared);
        let rest = shared.entries.split_off(&(log_id.index + 1));
        shared.entries = rest;
        shared.purged = Some(log_id.index);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
