//! Telling the network where a guest now is, after a restore or an incoming migration.
//!
//! Switches (the host bridges included) learn which port a MAC address is behind from the
//! frames they see. A guest that resumes on another host is silent until it next sends, so
//! traffic for it keeps going to its old port. Like QEMU's self-announce, tern sends, as if
//! from the guest, broadcast RARP "reverse request" frames with the guest's MAC as source and
//! as sender and target hardware address: every switch on the segment learns the new port and
//! no host's ARP cache is disturbed. When the guest's IPv4 address is known, a gratuitous ARP
//! can follow each RARP to refresh peers' ARP caches too. The series is repeated with growing
//! gaps in case the first frames are lost while links and bridges settle.

use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tern_sandbox::ThreadKind;

use crate::{NetError, Tap};

/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// Ethertype of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// Length of an announcement frame: the Ethernet minimum without the FCS, as QEMU sends.
pub const ANNOUNCE_FRAME_LEN: usize = 60;

const BROADCAST: [u8; 6] = [0xff; 6];
const ARP_HTYPE_ETHERNET: u16 = 1;
const ETH_P_IP: u16 = 0x0800;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REVERSE_REQUEST: u16 = 3;

/// An Ethernet broadcast carrying an ARP-format packet (RARP or ARP), zero-padded to 60 bytes.
fn arp_format_frame(
    ethertype: u16,
    op: u16,
    mac: [u8; 6],
    sender_ip: [u8; 4],
    target_mac: [u8; 6],
    target_ip: [u8; 4],
) -> [u8; ANNOUNCE_FRAME_LEN] {
    let mut f = [0u8; ANNOUNCE_FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f[14..16].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&sender_ip);
    f[32..38].copy_from_slice(&target_mac);
    f[38..42].copy_from_slice(&target_ip);
    f
}

/// QEMU's self-announce frame for `mac`: a broadcast RARP reverse request (opcode 3) whose
/// sender and target hardware addresses are `mac` and whose protocol addresses are zero.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; ANNOUNCE_FRAME_LEN] {
    arp_format_frame(ETH_P_RARP, ARP_OP_REVERSE_REQUEST, mac, [0; 4], mac, [0; 4])
}

/// A gratuitous ARP for `ip` at `mac`: a broadcast ARP request whose sender and target
/// protocol address are both `ip` (target hardware address zero), as Linux sends one.
pub fn gratuitous_arp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; ANNOUNCE_FRAME_LEN] {
    let ip = ip.octets();
    arp_format_frame(ETH_P_ARP, ARP_OP_REQUEST, mac, ip, [0; 6], ip)
}

/// When announcements are sent: `rounds` rounds, the first at once, then gaps of `initial`,
/// `initial + step`, `initial + 2·step`, … each capped at `max` (QEMU's `announce-*`
/// parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceSchedule {
    pub rounds: u32,
    pub initial: Duration,
    pub step: Duration,
    pub max: Duration,
}

impl AnnounceSchedule {
    /// QEMU's defaults: 5 rounds, gaps of 50, 150, 250 and 350 ms.
    pub const QEMU: AnnounceSchedule = AnnounceSchedule {
        rounds: 5,
        initial: Duration::from_millis(50),
        step: Duration::from_millis(100),
        max: Duration::from_millis(550),
    };

    /// QEMU's timing with another number of rounds.
    pub fn with_rounds(rounds: u32) -> AnnounceSchedule {
        AnnounceSchedule {
            rounds,
            ..AnnounceSchedule::QEMU
        }
    }

    /// The gap after round `i` (0-based), before round `i + 1`.
    pub fn gap_after(&self, i: u32) -> Duration {
        self.step
            .checked_mul(i)
            .and_then(|s| self.initial.checked_add(s))
            .map_or(self.max, |g| g.min(self.max))
    }

    /// The time from the first round to the last.
    pub fn total(&self) -> Duration {
        (0..self.rounds.saturating_sub(1))
            .map(|i| self.gap_after(i))
            .sum()
    }
}

impl Default for AnnounceSchedule {
    fn default() -> AnnounceSchedule {
        AnnounceSchedule::QEMU
    }
}

/// What to announce for one NIC and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address on this NIC, if known: adds a gratuitous ARP to each round.
    pub ip: Option<Ipv4Addr>,
    pub schedule: AnnounceSchedule,
}

impl Announcement {
    /// RARP only, on QEMU's schedule.
    pub fn new(mac: [u8; 6]) -> Announcement {
        Announcement {
            mac,
            ip: None,
            schedule: AnnounceSchedule::QEMU,
        }
    }

    /// The frames of one round, in sending order.
    pub fn frames(&self) -> Vec<[u8; ANNOUNCE_FRAME_LEN]> {
        let mut frames = vec![rarp_frame(self.mac)];
        if let Some(ip) = self.ip {
            frames.push(gratuitous_arp_frame(self.mac, ip));
        }
        frames
    }
}

/// A flag a waiting sender can be woken by.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn set(&self) {
        let mut s = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        *s = true;
        self.wake.notify_all();
    }

    /// Waits up to `d`; true if stopped.
    fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut s = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        while !*s {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = match self.wake.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

fn check_mac(tap: &Tap, mac: [u8; 6]) -> io::Result<()> {
    let reason = if mac[0] & 1 != 0 {
        "it is a multicast address"
    } else if mac == [0; 6] {
        "it is all zero"
    } else {
        return Ok(());
    };
    Err(NetError::os(
        tap.name(),
        "announce",
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot announce MAC {}: {reason}", fmt_mac(mac)),
        ),
    )
    .into())
}

/// `aa:bb:cc:dd:ee:ff`.
fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn run(tap: &Tap, a: &Announcement, stop: &Stop) -> io::Result<u32> {
    let frames = a.frames();
    let mut sent = 0;
    for round in 0..a.schedule.rounds {
        for frame in &frames {
            tap.write_frame(frame)?;
        }
        sent += 1;
        if round + 1 == a.schedule.rounds || stop.wait(a.schedule.gap_after(round)) {
            break;
        }
    }
    Ok(sent)
}

/// Sends the whole series on the calling thread, writing into `tap` as if the guest sent the
/// frames; returns the number of rounds sent.
pub fn send_announcements(tap: &Tap, announcement: &Announcement) -> io::Result<u32> {
    check_mac(tap, announcement.mac)?;
    run(tap, announcement, &Stop::default())
}

/// Announces `mac` on `tap` in `rounds` rounds on QEMU's schedule, from a background thread.
pub fn announce(tap: &Tap, mac: [u8; 6], rounds: u32) -> io::Result<AnnounceHandle> {
    announce_with(
        tap,
        Announcement {
            schedule: AnnounceSchedule::with_rounds(rounds),
            ..Announcement::new(mac)
        },
    )
}

/// Sends `announcement` from a background thread so that a restore need not wait for it.
///
/// The thread writes through its own descriptor for the TAP, which keeps the device alive
/// until the series ends (under a second with QEMU's schedule); call
/// [`AnnounceHandle::cancel`] before destroying a guest's NIC to end it at once. Dropping the
/// handle lets the series run to its end; a failure is then logged.
pub fn announce_with(tap: &Tap, announcement: Announcement) -> io::Result<AnnounceHandle> {
    check_mac(tap, announcement.mac)?;
    let tap = tap.try_clone()?;
    let stop = Arc::new(Stop::default());
    let thread_stop = Arc::clone(&stop);
    let name = format!("announce-{}", tap.name());
    let thread = tern_sandbox::thread::spawn(ThreadKind::Device, name, move || {
        let result = run(&tap, &announcement, &thread_stop);
        if let Err(e) = &result {
            log::warn!(
                "announcing {} on {}: {e}",
                fmt_mac(announcement.mac),
                tap.name()
            );
        }
        result
    })
    .map_err(|e| NetError::os("announce", "spawn thread", e))?;
    Ok(AnnounceHandle {
        thread: Some(thread),
        stop,
    })
}

/// A series of announcements being sent in the background.
pub struct AnnounceHandle {
    thread: Option<JoinHandle<io::Result<u32>>>,
    stop: Arc<Stop>,
}

impl AnnounceHandle {
    /// True once the series has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the series to end; the number of rounds sent.
    pub fn join(mut self) -> io::Result<u32> {
        self.wait()
    }

    /// Stops after the round in progress and waits; the number of rounds sent.
    pub fn cancel(mut self) -> io::Result<u32> {
        self.stop.set();
        self.wait()
    }

    fn wait(&mut self) -> io::Result<u32> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the announce thread panicked"))),
            None => Ok(0),
        }
    }
}

impl std::fmt::Debug for AnnounceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnnounceHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rarp_frame_matches_qemu_byte_for_byte() {
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,       // destination: broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,       // source: the guest
            0x80, 0x35,                               // ethertype RARP
            0x00, 0x01,                               // hardware type Ethernet
            0x08, 0x00,                               // protocol type IPv4
            6, 4,                                     // address lengths
            0x00, 0x03,                               // reverse request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,       // sender hardware address
            0, 0, 0, 0,                               // sender protocol address
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,       // target hardware address
            0, 0, 0, 0,                               // target protocol address
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding to 60
        ];
        assert_eq!(rarp_frame(MAC), expected);
    }

    #[test]
    fn gratuitous_arp_frame_is_a_broadcast_request_for_its_own_address() {
        let f = gratuitous_arp_frame(MAC, Ipv4Addr::new(10, 77, 0, 10));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[10, 77, 0, 10]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 77, 0, 10]);
        assert!(f[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn qemu_schedule_gaps_grow_by_100ms() {
        let s = AnnounceSchedule::QEMU;
        let gaps: Vec<u64> = (0..4).map(|i| s.gap_after(i).as_millis() as u64).collect();
        assert_eq!(gaps, [50, 150, 250, 350]);
        assert_eq!(s.total(), Duration::from_millis(800));
        // Capped at max, and no overflow on absurd inputs.
        assert_eq!(s.gap_after(10), Duration::from_millis(550));
        assert_eq!(s.gap_after(u32::MAX), Duration::from_millis(550));
        assert_eq!(AnnounceSchedule::with_rounds(0).total(), Duration::ZERO);
        assert_eq!(AnnounceSchedule::with_rounds(1).total(), Duration::ZERO);
    }

    #[test]
    fn announcement_frames_rarp_then_garp() {
        let mut a = Announcement::new(MAC);
        assert_eq!(a.frames(), vec![rarp_frame(MAC)]);
        a.ip = Some(Ipv4Addr::new(10, 77, 0, 11));
        let frames = a.frames();
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[1][12..14], &[0x08, 0x06]);
    }

    #[test]
    fn stop_wakes_a_waiting_sender() {
        let stop = Arc::new(Stop::default());
        let s2 = Arc::clone(&stop);
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            (s2.wait(Duration::from_secs(30)), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(20));
        stop.set();
        let (stopped, took) = t.join().unwrap();
        assert!(stopped);
        assert!(took < Duration::from_secs(5));
        assert!(!Stop::default().wait(Duration::from_millis(1)));
    }

    #[test]
    fn macs_are_formatted_like_ip_link() {
        assert_eq!(fmt_mac(MAC), "52:54:00:12:34:56");
    }
}
