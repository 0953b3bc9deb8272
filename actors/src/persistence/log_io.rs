//! The command log's file IO, behind a small trait so that a test can cut the power.
//!
//! [`DirIo`] is the real thing (a directory of segment files, `fdatasync` on sync). [`SimIo`]
//! keeps files in memory and remembers which bytes a completed sync covered; its
//! [`SimIo::power_cut`] drops every write not yet covered, and may tear the last one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng, RngExt};

/// A segment file open for appending.
pub trait LogFile: Send + Sync {
    /// Appends bytes (not yet durable).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes every appended byte durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
}

/// A directory of segment files.
pub trait LogIo: Send + Sync {
    /// The names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Reads a whole file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Opens a file for appending, creating it when missing.
    fn open_append(&self, name: &str) -> io::Result<Box<dyn LogFile>>;
    /// Cuts a file to `len` bytes and makes that durable.
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes the directory's entries (creations, removals) durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Where the files are, for error messages.
    fn describe(&self, name: &str) -> String;
}

/// Segment files in a directory of the file system.
#[derive(Debug, Clone)]
pub struct DirIo {
    dir: PathBuf,
}

impl DirIo {
    /// The IO of `dir` (created when missing).
    pub fn new(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(DirIo {
            dir: dir.to_path_buf(),
        })
    }
}

struct DirFile(File);

impl LogFile for DirFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl LogIo for DirIo {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Some(name) = entry.file_name().to_str()
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        File::open(self.dir.join(name))?.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(DirFile(f)))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(self.dir.join(name))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

#[derive(Debug, Default, Clone)]
struct SimFile {
    /// Bytes a completed sync covered.
    durable: Vec<u8>,
    /// Bytes appended since.
    pending: Vec<u8>,
    /// Whether the file's creation is durable (the directory was synced after it).
    entry_durable: bool,
}

#[derive(Debug, Default)]
struct SimDisk {
    files: BTreeMap<String, SimFile>,
    /// Removals not yet made durable by a directory sync.
    removed: BTreeMap<String, SimFile>,
    syncs: u64,
    /// IO operations left before the power goes (None: it never does).
    ops_left: Option<u64>,
    /// The power is out: every operation fails until [`SimIo::power_cut`].
    down: bool,
}

impl SimDisk {
    /// Counts one IO operation; fails once the power is out.
    fn op(&mut self) -> io::Result<()> {
        if let Some(n) = self.ops_left.as_mut() {
            if *n == 0 {
                self.down = true;
            } else {
                *n -= 1;
            }
        }
        if self.down {
            return Err(io::Error::other("power cut"));
        }
        Ok(())
    }
}

/// An in-memory disk that can lose power.
#[derive(Debug, Clone, Default)]
pub struct SimIo {
    disk: Arc<Mutex<SimDisk>>,
}

impl SimIo {
    /// An empty disk.
    pub fn new() -> Self {
        SimIo::default()
    }

    fn disk(&self) -> MutexGuard<'_, SimDisk> {
        // A poisoned lock only means a test thread panicked; the data is still usable.
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many data syncs completed.
    pub fn syncs(&self) -> u64 {
        self.disk().syncs
    }

    /// Lets `n` more IO operations (appends, syncs, removals, truncations) through; the next
    /// one fails, as does every one after it, until [`SimIo::power_cut`].
    pub fn fail_after(&self, n: u64) {
        self.disk().ops_left = Some(n);
    }

    /// Cuts the power: every byte not covered by a completed sync is lost, except that a prefix
    /// of the unsynced bytes of one file may survive, possibly with damaged bytes (a torn
    /// write); files whose creation was not made durable vanish, removals not made durable are
    /// undone.
    pub fn power_cut(&self, rng: &mut impl Rng) {
        let mut disk = self.disk();
        disk.ops_left = None;
        disk.down = false;
        let removed = std::mem::take(&mut disk.removed);
        for (name, f) in removed {
            disk.files.entry(name).or_insert(f);
        }
        disk.files.retain(|_, f| f.entry_durable);
        let names: Vec<String> = disk.files.keys().cloned().collect();
        let torn = if names.is_empty() || rng.random_bool(0.5) {
            None
        } else {
            Some(names[rng.random_range(0..names.len())].clone())
        };
        for (name, f) in disk.files.iter_mut() {
            let mut pending = std::mem::take(&mut f.pending);
            if torn.as_ref() == Some(name) && !pending.is_empty() {
                let keep = rng.random_range(0..=pending.len());
                pending.truncate(keep);
                if !pending.is_empty() && rng.random_bool(0.5) {
                    let i = rng.random_range(0..pending.len());
                    pending[i] ^= 1 << rng.random_range(0..8u32);
                }
                f.durable.extend_from_slice(&pending);
            }
        }
    }
}

struct SimHandle {
    io: SimIo,
    name: String,
}

impl LogFile for SimHandle {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut disk = self.io.disk();
        disk.op()?;
        let f = disk
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "file removed"))?;
        f.pending.extend_from_slice(bytes);
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut disk = self.io.disk();
        disk.op()?;
        disk.syncs += 1;
        let f = disk
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "file removed"))?;
        let pending = std::mem::take(&mut f.pending);
        f.durable.extend_from_slice(&pending);
        Ok(())
    }
}

impl LogIo for SimIo {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.disk().files.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let disk = self.disk();
        let f = disk
            .files
            .get(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        let mut all = f.durable.clone();
        all.extend_from_slice(&f.pending);
        Ok(all)
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn LogFile>> {
        let mut disk = self.disk();
        disk.op()?;
        disk.files.entry(name.to_owned()).or_default();
        drop(disk);
        Ok(Box::new(SimHandle {
            io: self.clone(),
            name: name.to_owned(),
        }))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let mut disk = self.disk();
        disk.op()?;
        let f = disk
            .files
            .get_mut(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        let mut all = std::mem::take(&mut f.durable);
        all.extend(std::mem::take(&mut f.pending));
        all.truncate(usize::try_from(len).unwrap_or(usize::MAX));
        f.durable = all;
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut disk = self.disk();
        disk.op()?;
        let f = disk
            .files
            .remove(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        if f.entry_durable {
            disk.removed.insert(name.to_owned(), f);
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut disk = self.disk();
        disk.op()?;
        disk.removed.clear();
        for f in disk.files.values_mut() {
            f.entry_durable = true;
        }
        Ok(())
    }

    fn describe(&self, name: &str) -> String {
        format!("sim:{name}")
    }
}
