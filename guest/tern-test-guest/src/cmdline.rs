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
    /// `prefill=1`: write the whole working set once at full speed before the paced writer
    /// starts (all of it in use, as in a guest that has been up a while).
    pub prefill: bool,
    /// `ip=A.B.C.D/NN`: the guest's IPv4 address and prefix length (None: network off).
    pub ip: Option<([u8; 4], u8)>,
    /// An `ip=` that did not parse (reported, and the network stays off).
    pub ip_invalid: bool,
    /// `gw=A.B.C.D`: default gateway.
    pub gw: Option<[u8; 4]>,
    /// TCP port of the HTTP download server (0: none).
    pub http_port: u16,
    /// TCP port of the echo server (0: none).
    pub echo_port: u16,
    /// Size of the disk area the disk workload uses, MiB (None: the whole disk, at most
    /// `DISK_DEFAULT_MAX_MIB`).
    pub disk_mib: Option<u64>,
    /// Disk write rate, KiB/s.
    pub disk_kibps: u64,
    /// Period of one full read-back pass over the disk area.
    pub disk_verify_ms: u64,
}

/// The disk area used when `disk_mib` is not given is the whole disk up to this size.
pub const DISK_DEFAULT_MAX_MIB: u64 = 64;

impl Params {
    pub const DEFAULT: Params = Params {
        heartbeat_ms: 100,
        wss_mib: 0,
        write_mibps: 0,
        verify_ms: 2000,
        write_passes: 0,
        prefill: false,
        ip: None,
        ip_invalid: false,
        gw: None,
        http_port: 80,
        echo_port: 7,
        disk_mib: None,
        disk_kibps: 1024,
        disk_verify_ms: 2000,
    };
}

/// `A.B.C.D`.
pub fn parse_ipv4(v: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = v.split(|&c| c == b'.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.len() > 3 {
            return None;
        }
        *o = u8::try_from(parse_u64(p)?).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// `A.B.C.D/NN`.
pub fn parse_cidr(v: &[u8]) -> Option<([u8; 4], u8)> {
    let slash = v.iter().position(|&c| c == b'/')?;
    let addr = parse_ipv4(&v[..slash])?;
    let prefix = parse_u64(&v[slash + 1..])?;
    if prefix > 32 {
        return None;
    }
    Some((addr, prefix as u8))
}

fn parse_port(v: &[u8], default: u16) -> u16 {
    parse_u64(v)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(default)
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
            b"prefill" => p.prefill = parse_u64(value).is_some_and(|v| v != 0),
            b"ip" => {
                p.ip = parse_cidr(value);
                p.ip_invalid = p.ip.is_none();
            }
            b"gw" => p.gw = parse_ipv4(value),
            b"http_port" => p.http_port = parse_port(value, p.http_port),
            b"echo_port" => p.echo_port = parse_port(value, p.echo_port),
            b"disk_mib" => p.disk_mib = parse_u64(value),
            b"disk_kibps" => p.disk_kibps = parse_u64(value).unwrap_or(p.disk_kibps),
            b"disk_verify_ms" => {
                p.disk_verify_ms = parse_u64(value).unwrap_or(p.disk_verify_ms).max(10)
            }
            _ => {}
        }
    }
    (p, line)
}
