//! The test guest kernel, built from `guest/` by this crate's build script.
//!
//! Tests, benchmarks and the demo boot it with `kernel = path()`. Its command-line parameters:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `heartbeat_ms` | period of the `hb seq=…` console line | 100 |
//! | `wss_mib` | working set stamped by the memory writer, MiB | 0 |
//! | `write_mibps` | write rate over all vCPUs, MiB/s, or `max` | 0 |
//! | `verify_ms` | period of one full verification pass | 2000 |
//! | `write_passes` | stop writing after this many passes over the working set (0: never) | 0 |
//! | `prefill` | `1`: write the whole working set once at full speed first | 0 |
//! | `ip` | `A.B.C.D/NN`: the guest's address and prefix length; without it the network is off | none |
//! | `gw` | `A.B.C.D`: default gateway | none |
//! | `http_port` | TCP port of the download server (`GET /download/<n>`; 0: none) | 80 |
//! | `echo_port` | TCP port of the echo server (0: none) | 7 |
//! | `disk_mib` | disk area the disk workload uses, MiB (0: none) | whole disk, at most 64 |
//! | `disk_kibps` | disk write rate, KiB/s | 1024 |
//! | `disk_verify_ms` | period of one full read-back pass over the written blocks | 2000 |
//! | `virtio_mmio.device` | `<size>@<base>:<irq>` (Linux syntax, several allowed); without any, tern's fixed layout is probed | |
//!
//! The guest drives the first virtio-net and the first virtio-blk device it finds (virtio-mmio,
//! modern). See `docs/test-guest.md` for the network services, the disk block format and the
//! console lines.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Serialises tests that run guests: the build machine has two cores, and timing-sensitive
/// tests must not starve each other. Held across threads and test binaries (a file lock).
pub struct KvmLock(#[allow(dead_code)] File);

impl KvmLock {
    /// Blocks until no other guest-running test holds the lock.
    pub fn acquire() -> KvmLock {
        let path = std::env::temp_dir().join("tern-kvm-tests.lock");
        let file = File::create(&path).expect("cannot create the KVM test lock file");
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "cannot take the KVM test lock");
        KvmLock(file)
    }
}

/// Path of the built test guest ELF (PVH entry).
pub fn path() -> &'static Path {
    Path::new(env!("TERN_TEST_GUEST_ELF"))
}

/// One heartbeat line of the test guest, as printed on its console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    /// Guest time (kvmclock) in microseconds.
    pub t_us: u64,
    pub cpus: u64,
    pub written: u64,
    pub verified: u64,
    pub passes: u64,
    pub mem_errors: u64,
    pub reg_checks: u64,
    /// Frames received and sent by the guest's virtio-net driver.
    pub net_rx: u64,
    pub net_tx: u64,
    /// Open TCP connections (HTTP and echo).
    pub tcp_conns: u64,
    /// HTTP responses completed.
    pub http_reqs: u64,
    /// Disk blocks (4 KiB) written, read back and found intact, and disk failures (mismatches
    /// and I/O errors).
    pub disk_written: u64,
    pub disk_verified: u64,
    pub disk_errors: u64,
    pub reg_errors: u64,
}

impl Heartbeat {
    /// Parses a console line (with or without a host timestamp prefix); None if it is not a
    /// complete heartbeat. A line cut short (a guest paused in the middle of printing it) lacks
    /// its last field and is refused rather than misread.
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let rest = &line[line.find("tern-guest: hb ")? + "tern-guest: hb ".len()..];
        if !rest.contains(" reg_errors=") {
            return None;
        }
        let mut hb = Heartbeat::default();
        for field in rest.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            if key == "t" {
                let (s, us) = value.split_once('.')?;
                hb.t_us = s.parse::<u64>().ok()? * 1_000_000 + us.parse::<u64>().ok()?;
                continue;
            }
            let v: u64 = value.parse().ok()?;
            match key {
                "seq" => hb.seq = v,
                "cpus" => hb.cpus = v,
                "written" => hb.written = v,
                "verified" => hb.verified = v,
                "passes" => hb.passes = v,
                "mem_errors" => hb.mem_errors = v,
                "reg_checks" => hb.reg_checks = v,
                "net_rx" => hb.net_rx = v,
                "net_tx" => hb.net_tx = v,
                "tcp_conns" => hb.tcp_conns = v,
                "http_reqs" => hb.http_reqs = v,
                "disk_written" => hb.disk_written = v,
                "disk_verified" => hb.disk_verified = v,
                "disk_errors" => hb.disk_errors = v,
                "reg_errors" => hb.reg_errors = v,
                _ => {}
            }
        }
        Some(hb)
    }
}

/// The complete lines of console output (a last line without its newline is still being
/// written, or was cut by a pause, and is left out).
pub fn complete_lines(output: &str) -> std::str::Lines<'_> {
    let complete = match output.rfind('\n') {
        Some(i) => &output[..i],
        None => "",
    };
    complete.lines()
}

/// True for a console line in which the guest reports a failed check or a fault.
pub fn is_failure_line(line: &str) -> bool {
    [
        "MEMORY MISMATCH",
        "REGISTER MISMATCH",
        "DISK MISMATCH",
        "DISK IO ERROR",
        "VIRTIO ERROR",
        "EXCEPTION",
        "PANIC",
    ]
    .iter()
    .any(|m| line.contains(&format!("tern-guest: {m}")))
}

const DOWNLOAD_K: u64 = 0x9E37_79B9_7F4A_7C15;

/// Byte `i` (0-based offset) of every body the guest's HTTP server sends for
/// `GET /download/<n>`.
pub fn download_byte(i: u64) -> u8 {
    (i.wrapping_mul(DOWNLOAD_K) >> 56) as u8
}

/// Checks a downloaded body from offset 0: `Err` carries the first offset whose byte is wrong.
/// (The length is the caller's to check against the `n` it asked for.)
pub fn verify_download(data: &[u8]) -> Result<(), usize> {
    verify_download_from(0, data).map_err(|off| off as usize)
}

/// Checks a piece of a download that starts at body offset `start` (a range request, a stream
/// checked as it arrives): `Err` carries the first wrong body offset.
pub fn verify_download_from(start: u64, data: &[u8]) -> Result<(), u64> {
    let mut x = start.wrapping_mul(DOWNLOAD_K);
    for (k, &b) in data.iter().enumerate() {
        if b != (x >> 56) as u8 {
            return Err(start + k as u64);
        }
        x = x.wrapping_add(DOWNLOAD_K);
    }
    Ok(())
}

/// Size of one block of the guest's disk workload.
pub const DISK_BLOCK: usize = 4096;
/// Magic at the start of every block the disk workload wrote.
pub const DISK_MAGIC: &[u8; 8] = b"TERNBLK1";

fn disk_payload_word(block: u64, gen: u64, j: u64) -> u64 {
    let seed = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (gen << 20) ^ 0xd15c_b10c;
    (seed ^ (j + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9)).wrapping_mul(0x94d0_49bb_1331_11eb)
}

/// CRC-32 (IEEE 802.3, as zlib's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The 4 KiB the guest's disk workload writes for `block` at generation `gen` (>= 1): see
/// `docs/test-guest.md`.
pub fn disk_block(block: u64, gen: u32) -> Vec<u8> {
    let mut out = vec![0u8; DISK_BLOCK];
    for (j, w) in out[32..].chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&disk_payload_word(block, u64::from(gen), j as u64).to_le_bytes());
    }
    let crc = crc32(&out[32..]);
    out[0..8].copy_from_slice(DISK_MAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&u64::from(gen).to_le_bytes());
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks one block of a disk the guest wrote (e.g. its image after the guest is gone): the
/// generation it holds if it is an intact block `block`, else why not. `Ok(None)` for a block
/// without the magic (never written).
pub fn check_disk_block(data: &[u8], block: u64) -> Result<Option<u32>, String> {
    if data.len() != DISK_BLOCK {
        return Err(format!("a block is {DISK_BLOCK} bytes, not {}", data.len()));
    }
    if &data[0..8] != DISK_MAGIC {
        return Ok(None);
    }
    let word = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
    let (found_block, gen) = (word(8), word(16));
    if found_block != block {
        return Err(format!("block {block} holds block {found_block}"));
    }
    let gen = u32::try_from(gen).map_err(|_| format!("block {block}: generation {gen}"))?;
    if gen == 0 {
        return Err(format!("block {block}: generation 0"));
    }
    if data != disk_block(block, gen).as_slice() {
        return Err(format!("block {block} gen {gen}: content differs"));
    }
    Ok(Some(gen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_was_built() {
        let data = std::fs::read(path()).unwrap();
        assert_eq!(&data[..4], b"\x7fELF");
    }

    #[test]
    fn parses_heartbeats() {
        let line = "1763721234.123456 tern-guest: hb seq=12 t=3.000120 cpus=2 written=5 verified=6 passes=1 mem_errors=0 reg_checks=9 reg_errors=0";
        let hb = Heartbeat::parse(line).unwrap();
        assert_eq!(hb.seq, 12);
        assert_eq!(hb.t_us, 3_000_120);
        assert_eq!(hb.cpus, 2);
        assert_eq!(hb.reg_checks, 9);
        assert!(Heartbeat::parse("tern-guest: ready cpus=1/1").is_none());
        assert!(Heartbeat::parse("tern-guest: hb seq=13").is_none());
        assert!(is_failure_line("tern-guest: MEMORY MISMATCH cpu=0 page=1"));
        assert!(is_failure_line("tern-guest: DISK MISMATCH block=3 gen=1"));
        assert!(!is_failure_line(line));
        // Fields the line lacks (an older guest, no devices) read as 0.
        assert_eq!(hb.net_rx, 0);
        assert_eq!(hb.disk_errors, 0);
    }

    #[test]
    fn parses_device_counters() {
        let line = "tern-guest: hb seq=4 t=3.097634 cpus=2 written=0 verified=0 passes=0 mem_errors=0 reg_checks=1608 net_rx=7 net_tx=2 tcp_conns=1 http_reqs=3 disk_written=768 disk_verified=523 disk_errors=0 reg_errors=0";
        let hb = Heartbeat::parse(line).unwrap();
        assert_eq!(
            (hb.net_rx, hb.net_tx, hb.tcp_conns, hb.http_reqs),
            (7, 2, 1, 3)
        );
        assert_eq!(
            (hb.disk_written, hb.disk_verified, hb.disk_errors),
            (768, 523, 0)
        );
        let cut = &line[..line.find(" reg_errors").unwrap()];
        assert!(Heartbeat::parse(cut).is_none());
    }

    #[test]
    fn download_bytes() {
        let expected: Vec<u8> = (0..1000u64).map(download_byte).collect();
        assert_eq!(&expected[..4], &[0x00, 0x9e, 0x3c, 0xda]);
        assert_eq!(verify_download(&expected), Ok(()));
        assert_eq!(verify_download_from(10, &expected[10..]), Ok(()));
        let mut bad = expected.clone();
        bad[517] ^= 1;
        assert_eq!(verify_download(&bad), Err(517));
        assert_eq!(verify_download_from(500, &bad[500..]), Err(517));
    }

    #[test]
    fn disk_blocks() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let b = disk_block(7, 3);
        assert_eq!(check_disk_block(&b, 7), Ok(Some(3)));
        assert!(check_disk_block(&b, 8).is_err());
        let mut bad = b.clone();
        bad[4000] ^= 0x10;
        assert!(check_disk_block(&bad, 7).is_err());
        assert_eq!(check_disk_block(&[0u8; DISK_BLOCK], 7), Ok(None));
    }
}
