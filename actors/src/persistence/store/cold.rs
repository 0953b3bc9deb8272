//! The cold side of the control state, read off the persistence actor.

use super::*;

/// The cold side of the state: the key-value store, and what was applied but is not in it yet
/// (records and recent events, behind locks). Cheap to clone: cold reads run on blocking
/// threads, off the persistence actor, while it goes on applying.
#[derive(Clone)]
pub struct Cold {
    kv: Arc<dyn KvStore>,
    pub(super) overlay: Arc<RwLock<Overlay>>,
    pub(super) events: Arc<RwLock<RecentEvents>>,
}

impl std::fmt::Debug for Cold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cold").finish_non_exhaustive()
    }
}

pub(super) fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Cold {
    pub(super) fn new(kv: Arc<dyn KvStore>) -> Self {
        Cold {
            kv,
            overlay: Arc::default(),
            events: Arc::default(),
        }
    }

    /// An event by id: the recent ones first, then the store (in that order, so that one moving
    /// from the first to the second meanwhile is seen in the second).
    pub(super) fn find_event(&self, id: &EventId) -> Result<Option<Arc<Event>>, PersistError> {
        if let Some(e) = read_lock(&self.events).get(id) {
            return Ok(Some(e.clone()));
        }
        let Some((_, block)) = self
            .kv
            .floor(Tree::Events, id.as_bytes())
            .map_err(|e| read_err("store", e))?
        else {
            return Ok(None);
        };
        let block = EventBlock::from_stored(&block)?;
        match block.find(id) {
            Some(bytes) => Ok(Some(Arc::new(
                codec::decode(bytes).map_err(|e| read_err(&format!("event {id}"), e))?,
            ))),
            None => Ok(None),
        }
    }

    pub(super) fn exists(&self, tree: Tree, key: &[u8]) -> bool {
        if read_lock(&self.overlay).get(tree, key).is_some() {
            return true;
        }
        match self.kv.get(tree, key) {
            Ok(v) => v.is_some(),
            Err(e) => {
                tracing::error!(error = %e, "store read failed during apply; treating the record as absent");
                false
            }
        }
    }

    pub(super) fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, PersistError> {
        if let Some(v) = read_lock(&self.overlay).get(tree, key) {
            return Ok(Some(v.clone()));
        }
        self.kv.get(tree, key).map_err(|e| read_err("store", e))
    }

    /// The overlay first, then the store (see [`Cold::find_event`]).
    pub(super) fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<crate::persistence::kv::Entry>, PersistError> {
        let b = read_lock(&self.overlay).scan(tree, prefix, start, limit);
        let mut a = self
            .kv
            .scan(tree, prefix, start, limit)
            .map_err(|e| read_err("store", e))?;
        if !b.is_empty() {
            a.extend(b);
            a.sort_by(|x, y| x.0.cmp(&y.0));
            a.dedup_by(|x, y| x.0 == y.0);
            a.truncate(limit);
        }
        Ok(a)
    }

    /// A page of a run's state history: its archived blocks, then its recent window.
    pub(super) fn history(
        &self,
        run: RunId,
        archived_blocks: u32,
        window: &[EventId],
        offset: usize,
        limit: usize,
    ) -> Result<Vec<State>, PersistError> {
        let mut ids = Vec::new();
        for block in 0..archived_blocks {
            let bytes = self
                .get(Tree::History, &history_key(run, block))?
                .ok_or_else(|| PersistError::Read(format!("history block {block} of {run} is missing")))?;
            let part: Vec<EventId> = codec::decode(&bytes).map_err(|e| read_err("history block", e))?;
            ids.extend(part);
        }
        ids.extend_from_slice(window);
        let mut out = Vec::new();
        for id in ids.iter().skip(offset).take(limit.min(PAGE_MAX)) {
            let event = self
                .find_event(id)?
                .ok_or_else(|| PersistError::Read(format!("history event {id} is missing")))?;
            if let Some(s) = event.state() {
                out.push(s.clone());
            }
        }
        Ok(out)
    }

    /// Up to `limit` events after `after`, in id order: blocks from the store merged with the
    /// overlay.
    pub(super) fn events_after(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<Event>, PersistError> {
        // The recent ones first (see `find_event`).
        let recent: Vec<Arc<Event>> = read_lock(&self.events).after(after, limit).cloned().collect();
        let mut found: Vec<Event> = Vec::new();
        let mut start = match after {
            Some(a) => self
                .kv
                .floor(Tree::Events, a.as_bytes())
                .map_err(|e| read_err("store", e))?
                .map(|(k, _)| k),
            None => None,
        };
        let mut inclusive = true;
        'blocks: loop {
            let bound = match &start {
                Some(k) if inclusive => Bound::Included(k.as_slice()),
                Some(k) => Bound::Excluded(k.as_slice()),
                None => Bound::Unbounded,
            };
            let page = self
                .kv
                .scan(Tree::Events, b"", bound, 16)
                .map_err(|e| read_err("store", e))?;
            if page.is_empty() {
                break;
            }
            for (k, v) in &page {
                let block = EventBlock::from_stored(v)?;
                for (id, bytes) in block.ids.into_iter().zip(block.events) {
                    if after.is_none_or(|a| id > a) {
                        found.push(codec::decode(&bytes).map_err(|e| read_err(&format!("event {id}"), e))?);
                        if found.len() >= limit {
                            break 'blocks;
                        }
                    }
                }
                start = Some(k.clone());
            }
            inclusive = false;
        }
        found.extend(recent.iter().map(|e| (**e).clone()));
        found.sort_by_key(|e| e.id);
        found.dedup_by(|a, b| a.id == b.id);
        found.truncate(limit);
        Ok(found)
    }

    pub(super) fn logs(
        &self,
        flow_run: FlowRunId,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<ReadReply, PersistError> {
        let limit = limit.clamp(1, PAGE_MAX);
        let prefix = flow_run.as_bytes().to_vec();
        let mut lines: Vec<LogLine> = Vec::new();
        let mut cursor = after;
        let mut start_key = after.map(|c| log_key(&flow_run, &c.batch));
        let mut first_page = true;
        loop {
            let start = match (&start_key, first_page) {
                (Some(k), true) => Bound::Included(k.as_slice()),
                (Some(k), false) => Bound::Excluded(k.as_slice()),
                (None, _) => Bound::Unbounded,
            };
            let batches = self.scan(Tree::Logs, &prefix, start, 64)?;
            if batches.is_empty() {
                return Ok(ReadReply::Logs { lines, next: cursor });
            }
            for (k, v) in &batches {
                let batch =
                    LogBatchId::from_bytes(k[16..32].try_into().map_err(|_| read_err("log key", "short"))?);
                let batch_lines: Vec<LogLine> = codec::decode(v).map_err(|e| read_err("log batch", e))?;
                let skip = match cursor {
                    Some(c) if c.batch == batch => c.line as usize,
                    _ => 0,
                };
                for (i, line) in batch_lines.into_iter().enumerate().skip(skip) {
                    if lines.len() >= limit {
                        return Ok(ReadReply::Logs { lines, next: cursor });
                    }
                    lines.push(line);
                    cursor = Some(LogCursor {
                        batch,
                        line: u32::try_from(i + 1).unwrap_or(u32::MAX),
                    });
                }
            }
            start_key = batches.last().map(|(k, _)| k.clone());
            first_page = false;
        }
    }
}
