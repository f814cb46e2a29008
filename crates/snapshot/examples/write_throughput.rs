//! Measures how fast `SnapshotWriter::pages` writes guest memory to a file, and how fast
//! `verify_all` reads it back.
//!
//! `cargo run --release -p tern-snapshot --example write_throughput [MiB] [dir]`
//! (default: 256 MiB in /tmp). The file goes to the page cache; no fsync is timed. Each number
//! is the best of three runs.

use std::fs::{self, File};
use std::io::Write;
use std::time::Instant;

use tern_snapshot::{verify_all, PageRun, SnapshotIndex, SnapshotWriter, PAGE_SIZE};

/// Each measurement is the best of this many runs (the machine is shared and noisy).
const REPEAT: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(256);
    let dir = args.next().unwrap_or_else(|| "/tmp".into());
    let path = format!("{dir}/tern-snapshot-throughput-{}.tern", std::process::id());
    let memory = guest_memory(mib << 20);
    let pages = (memory.len() / PAGE_SIZE) as u32;
    println!("{mib} MiB of non-zero guest memory, written to {path}");
    write_once(&path, &memory, pages, 256)?; // warm-up: page cache, file system
    let crc = time(|| {
        std::hint::black_box(crc32c::crc32c(&memory));
    });
    let mut plain = f64::MAX;
    for _ in 0..REPEAT {
        let mut f = fresh_file(&path)?;
        plain = plain.min(time(|| f.write_all(&memory).expect("write")));
    }
    println!(
        "baseline: CRC32C alone {:.2} GB/s, plain write_all of the same bytes {:.2} GB/s",
        memory.len() as f64 / crc / 1e9,
        memory.len() as f64 / plain / 1e9
    );
    for (label, run_pages) in [
        ("one run", pages),
        ("runs of 64 pages", 64),
        ("runs of 1 page", 1),
    ] {
        for block_pages in [1, 64, 256, 1024] {
            let (mut secs, mut verify) = (f64::MAX, f64::MAX);
            for _ in 0..REPEAT {
                secs = secs.min(write_once(&path, &memory, run_pages, block_pages)?);
                verify = verify.min(verify_once(&path)?);
            }
            println!(
                "{label:>18}, blocks of {block_pages:>4} pages: write {:>6.2} GB/s, verify {:>6.2} GB/s",
                memory.len() as f64 / secs / 1e9,
                memory.len() as f64 / verify / 1e9,
            );
        }
    }
    fs::remove_file(&path)?;
    Ok(())
}

/// Writes the whole memory as one PAGES record made of runs of `run_pages` pages (every other
/// run skipped would change the amount, so runs are adjacent); returns the seconds it took.
fn write_once(
    path: &str,
    memory: &[u8],
    run_pages: u32,
    block_pages: u32,
) -> Result<f64, Box<dyn std::error::Error>> {
    let run_bytes = run_pages as usize * PAGE_SIZE;
    let runs: Vec<PageRun> = (0..memory.len() / run_bytes)
        .map(|i| PageRun {
            first_pfn: (i * run_pages as usize) as u64,
            pages: run_pages,
        })
        .collect();
    let data: Vec<&[u8]> = memory.chunks(run_bytes).collect();
    let file = fresh_file(path)?;
    let start = Instant::now();
    let mut w = SnapshotWriter::new(file, true)?;
    w.pages(&runs, &data, block_pages)?;
    let mut file = w.finish()?;
    file.flush()?;
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    Ok(secs)
}

/// A new, empty file at `path`. Removing the old one instead of truncating it keeps ext4's
/// flush-on-close of truncated files (auto_da_alloc) out of the numbers.
fn fresh_file(path: &str) -> std::io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    File::create(path)
}

fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn verify_once(path: &str) -> Result<f64, Box<dyn std::error::Error>> {
    let file = File::open(path)?;
    let start = Instant::now();
    let index = SnapshotIndex::open(&file)?;
    verify_all(&file, &index)?;
    Ok(start.elapsed().as_secs_f64())
}

/// `len` bytes of varied, non-zero contents, touched so that they are really allocated.
fn guest_memory(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&(x | 1).to_le_bytes());
    }
    v
}
