//! The test lab as the migration benchmarks use it: the hosts' link shaped to a rate, and
//! measured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::bail;
use tern_testkit::{run_in_netns, Member, NetLab};

/// A new lab whose hosts' link is shaped to `mbit`; the rate one TCP stream gets on it
/// (printed), bytes per second.
pub fn shaped(mbit: u64) -> anyhow::Result<(NetLab, f64)> {
    let lab = NetLab::new()?;
    shape(&lab, mbit)?;
    let link_bps = measure_link(&lab)?;
    println!(
        "link host1 -> host2: shaped to {mbit} Mbit/s, measured {:.0} Mbit/s",
        link_bps * 8.0 / 1e6
    );
    Ok((lab, link_bps))
}

/// A token bucket of `mbit` megabits per second on each host's uplink: both directions of every host-to-host path.
pub fn shape(lab: &NetLab, mbit: u64) -> anyhow::Result<()> {
    for m in Member::HOSTS {
        let rate = format!("{mbit}mbit");
        let out = lab.exec(
            m,
            "tc",
            &[
                "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", &rate, "burst", "256kb",
                "latency", "50ms",
            ],
        )?;
        if !out.status.success() {
            bail!("tc: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// Bytes per second one TCP stream gets from host1 to host2.
pub fn measure_link(lab: &NetLab) -> anyhow::Result<f64> {
    const BYTES: usize = 128 << 20;
    let addr = SocketAddr::from((Member::Host2.ip(), 5001));
    let listener = run_in_netns(lab.ns(Member::Host2), || TcpListener::bind(addr))??;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    });
    let mut conn = lab.tcp_connect(Member::Host1, addr, Duration::from_secs(5))?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..BYTES >> 20 {
        conn.write_all(&chunk)?;
    }
    drop(conn);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    Ok(got as f64 / secs)
}

/// Removes the shaping of [`shape`].
pub fn unshape(lab: &NetLab) -> anyhow::Result<()> {
    for m in Member::HOSTS {
        let out = lab.exec(m, "tc", &["qdisc", "del", "dev", "eth0", "root"])?;
        if !out.status.success() {
            bail!("tc: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}
