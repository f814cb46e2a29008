//! Workload parameters from the kernel command line (`key=value` words; others are ignored).

pub struct Params {
    /// Heartbeat period.
    pub heartbeat_ms: u64,
    /// Working set of the memory writer, MiB (0: no memory workload).
    pub wss_mib: u64,
    /// Write rate, MiB/s over all CPUs (`u64::MAX`: as fast as possible).
    pub write_mibps: u64,
    /// Period of one full verification pass over the working set.
    pub verify_ms: u64,
    /// Stop writing after this many passes over the working set (0: never stop).
    pub write_passes: u64,
}

impl Params {
    pub const DEFAULT: Params = Params {
        heartbeat_ms: 100,
        wss_mib: 0,
        write_mibps: 0,
        verify_ms: 2000,
        write_passes: 0,
    };
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in v {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// Parses the NUL-terminated command line at `addr` (0: none).
pub fn parse(addr: u64) -> (Params, &'static [u8]) {
    let mut p = Params::DEFAULT;
    if addr == 0 {
        return (p, b"");
    }
    let line = unsafe {
        let start = addr as *const u8;
        let mut len = 0;
        while len < 4096 && *start.add(len) != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(start, len)
    };
    for word in line.split(|&c| c == b' ') {
        let mut kv = word.splitn(2, |&c| c == b'=');
        let (Some(key), Some(value)) = (kv.next(), kv.next()) else {
            continue;
        };
        match key {
            b"heartbeat_ms" => p.heartbeat_ms = parse_u64(value).unwrap_or(p.heartbeat_ms).max(1),
            b"wss_mib" => p.wss_mib = parse_u64(value).unwrap_or(0),
            b"write_mibps" if value == b"max" => p.write_mibps = u64::MAX,
            b"write_mibps" => p.write_mibps = parse_u64(value).unwrap_or(0),
            b"verify_ms" => p.verify_ms = parse_u64(value).unwrap_or(p.verify_ms).max(10),
            b"write_passes" => p.write_passes = parse_u64(value).unwrap_or(0),
            _ => {}
        }
    }
    (p, line)
}
