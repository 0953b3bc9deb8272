//! The cost of one `fdatasync` on the disk of a directory, as the yardstick for durable writes.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// The median time (ms) of appending 4 KiB and calling `fdatasync`, over `rounds` rounds.
pub fn fdatasync_p50_ms(dir: &Path, rounds: usize) -> anyhow::Result<f64> {
    let path = dir.join("fdatasync-probe");
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    let block = vec![0x5au8; 4096];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    times.sort_by(f64::total_cmp);
    Ok(times.get(times.len() / 2).copied().unwrap_or(0.0))
}
