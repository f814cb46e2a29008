//! What `ping` (iputils) reported, parsed from its output.

use std::time::Duration;

use anyhow::bail;

/// One echo reply.
#[derive(Clone, Debug, PartialEq)]
pub struct PingReply {
    pub seq: u32,
    pub ttl: Option<u32>,
    pub rtt: Duration,
    /// Unix time of the reply when ping ran with `-D`.
    pub timestamp: Option<f64>,
    /// Marked `(DUP!)` by ping.
    pub duplicate: bool,
}

/// A ping run: its summary and every reply line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PingReport {
    pub transmitted: u32,
    pub received: u32,
    /// ICMP errors (e.g. "Destination Host Unreachable").
    pub errors: u32,
    pub duplicates: u32,
    pub replies: Vec<PingReply>,
    /// Whether ping printed its statistics (it does not when killed with SIGKILL).
    pub complete: bool,
}

impl PingReport {
    /// Parses iputils `ping` output (with or without `-D` timestamps). Output without the
    /// statistics (a ping killed by SIGKILL) still parses if it has replies: `transmitted` is
    /// then the highest sequence number seen.
    pub fn parse(text: &str) -> anyhow::Result<PingReport> {
        let mut report = PingReport::default();
        for line in text.lines() {
            if let Some(reply) = parse_reply(line) {
                report.replies.push(reply);
            } else if line.contains(" packets transmitted, ") {
                parse_summary(line, &mut report);
            }
        }
        if !report.complete {
            if report.replies.is_empty() {
                bail!("not ping output: {}", text.trim());
            }
            report.transmitted = report.replies.iter().map(|r| r.seq).max().unwrap_or(0);
            report.received = report.replies.iter().filter(|r| !r.duplicate).count() as u32;
            report.duplicates = report.replies.iter().filter(|r| r.duplicate).count() as u32;
        }
        Ok(report)
    }

    /// Requests that got no reply.
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    /// Sequence numbers (1 to `transmitted`) with no reply, in order: where an outage was.
    pub fn missing_seqs(&self) -> Vec<u32> {
        let answered: std::collections::BTreeSet<u32> =
            self.replies.iter().map(|r| r.seq).collect();
        (1..=self.transmitted)
            .filter(|s| !answered.contains(s))
            .collect()
    }

    /// Round-trip times of the replies (duplicates excluded).
    pub fn rtts(&self) -> Vec<Duration> {
        self.replies
            .iter()
            .filter(|r| !r.duplicate)
            .map(|r| r.rtt)
            .collect()
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.rtts().into_iter().min()
    }

    pub fn max_rtt(&self) -> Option<Duration> {
        self.rtts().into_iter().max()
    }

    pub fn avg_rtt(&self) -> Option<Duration> {
        let rtts = self.rtts();
        let n = u32::try_from(rtts.len()).ok().filter(|&n| n > 0)?;
        Some(rtts.iter().sum::<Duration>() / n)
    }
}

/// `[1700000000.123456] 64 bytes from 10.77.0.2: icmp_seq=1 ttl=64 time=0.045 ms (DUP!)`
fn parse_reply(line: &str) -> Option<PingReply> {
    let (timestamp, rest) = match line.strip_prefix('[') {
        Some(r) => {
            let (ts, rest) = r.split_once(']')?;
            (Some(ts.parse().ok()?), rest.trim_start())
        }
        None => (None, line),
    };
    if !rest.contains(" bytes from ") {
        return None;
    }
    let field = |key: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    let seq = field("icmp_seq=")?.parse().ok()?;
    let ttl = field("ttl=").and_then(|t| t.parse().ok());
    let time_ms: f64 = field("time=")?.parse().ok()?;
    let unit_us = rest.contains(" usec") || rest.contains(" us");
    let rtt = if unit_us {
        Duration::from_secs_f64(time_ms / 1e6)
    } else {
        Duration::from_secs_f64(time_ms / 1e3)
    };
    Some(PingReply {
        seq,
        ttl,
        rtt,
        timestamp,
        duplicate: rest.contains("(DUP!)"),
    })
}

/// `3 packets transmitted, 2 received, +1 duplicates, +1 errors, 33.3333% packet loss, time 2003ms`
fn parse_summary(line: &str, report: &mut PingReport) {
    for part in line.split(',') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.trim_start_matches('+').parse::<u32>() else {
            continue;
        };
        match what {
            "packets" => report.transmitted = n,
            "received" => report.received = n,
            "errors" => report.errors = n,
            "duplicates" => report.duplicates = n,
            _ => {}
        }
    }
    report.complete = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_ANSWERED: &str = "PING 10.77.0.2 (10.77.0.2) 56(84) bytes of data.
64 bytes from 10.77.0.2: icmp_seq=1 ttl=64 time=0.045 ms
64 bytes from 10.77.0.2: icmp_seq=2 ttl=64 time=0.105 ms
64 bytes from 10.77.0.2: icmp_seq=3 ttl=64 time=1.20 ms

--- 10.77.0.2 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 2003ms
rtt min/avg/max/mdev = 0.045/0.450/1.200/0.500 ms
";

    #[test]
    fn parses_replies_and_summary() {
        let r = PingReport::parse(ALL_ANSWERED).unwrap();
        assert!(r.complete);
        assert_eq!((r.transmitted, r.received, r.lost()), (3, 3, 0));
        assert_eq!(r.replies.len(), 3);
        assert_eq!(r.replies[0].ttl, Some(64));
        assert_eq!(r.min_rtt(), Some(Duration::from_micros(45)));
        assert_eq!(r.max_rtt(), Some(Duration::from_micros(1200)));
        assert_eq!(r.avg_rtt(), Some(Duration::from_micros(450)));
        assert!(r.missing_seqs().is_empty());
    }

    #[test]
    fn parses_losses_errors_duplicates_and_timestamps() {
        let text = "PING 10.77.0.10 (10.77.0.10) 56(84) bytes of data.
[1700000000.100000] 64 bytes from 10.77.0.10: icmp_seq=1 ttl=64 time=0.5 ms
[1700000000.200000] 64 bytes from 10.77.0.10: icmp_seq=1 ttl=64 time=0.6 ms (DUP!)
[1700000000.300000] From 10.77.0.1 icmp_seq=2 Destination Host Unreachable
[1700000000.400000] 64 bytes from 10.77.0.10: icmp_seq=4 ttl=64 time=0.7 ms

--- 10.77.0.10 ping statistics ---
4 packets transmitted, 2 received, +1 duplicates, +1 errors, 50% packet loss, time 300ms
";
        let r = PingReport::parse(text).unwrap();
        assert_eq!((r.transmitted, r.received, r.lost()), (4, 2, 2));
        assert_eq!((r.errors, r.duplicates), (1, 1));
        assert_eq!(r.missing_seqs(), vec![2, 3]);
        assert_eq!(r.replies[0].timestamp, Some(1700000000.1));
        assert!(r.replies[1].duplicate);
        assert_eq!(r.rtts().len(), 2);
    }

    #[test]
    fn output_cut_short_still_parses_and_garbage_does_not() {
        let text = "PING 10.77.0.2 (10.77.0.2) 56(84) bytes of data.
64 bytes from 10.77.0.2: icmp_seq=1 ttl=64 time=0.045 ms
64 bytes from 10.77.0.2: icmp_seq=3 ttl=64 time=0.045 ms
";
        let r = PingReport::parse(text).unwrap();
        assert!(!r.complete);
        assert_eq!((r.transmitted, r.received), (3, 2));
        assert_eq!(r.missing_seqs(), vec![2]);

        let none = "PING 10.77.0.9 (10.77.0.9) 56(84) bytes of data.

--- 10.77.0.9 ping statistics ---
2 packets transmitted, 0 received, 100% packet loss, time 1010ms
";
        let r = PingReport::parse(none).unwrap();
        assert_eq!((r.transmitted, r.received), (2, 0));
        assert_eq!(r.avg_rtt(), None);
        assert!(PingReport::parse("ping: unknown host").is_err());
        assert!(PingReport::parse("").is_err());
    }
}
