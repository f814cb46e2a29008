//! Tests that need a network namespace of their own (and root): each runs on a thread that
//! has unshared its network namespace, so the TAPs and bridges it makes are invisible to, and
//! cannot disturb, the host's interfaces; the namespace and everything in it go away when the
//! thread and its descriptors do.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::*;

/// Runs `f` on a new thread in a new, empty network namespace; re-raises its panic.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(2) only changes the calling thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) failed (these tests need root): {}",
            io::Error::last_os_error()
        );
        f()
    });
    match thread.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Reads frames from `tap` until one satisfies `want` or `timeout` passes; the frame
/// (virtio-net header included) and when it arrived.
fn read_until(
    tap: &Tap,
    timeout: Duration,
    mut want: impl FnMut(&[u8]) -> bool,
) -> Option<(Vec<u8>, Instant)> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65550];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
        if rc <= 0 {
            continue;
        }
        let n = tap.read(&mut buf).expect("read from TAP");
        if want(&buf[..n]) {
            return Some((buf[..n].to_vec(), Instant::now()));
        }
    }
}

/// The ethertype of a frame read from a TAP (after the virtio-net header).
fn ethertype(frame: &[u8]) -> Option<u16> {
    let b = frame.get(VNET_HDR_LEN + 12..VNET_HDR_LEN + 14)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];
const OTHER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x02];
/// IEEE local experimental ethertype: nothing in the kernel sends it.
const TEST_ETHERTYPE: u16 = 0x88b5;

fn test_frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f[14..19].copy_from_slice(b"tern!");
    f
}

#[test]
fn tap_comes_up_with_a_vnet_header_and_vanishes_with_its_descriptors() {
    in_private_netns(|| {
        assert!(!interface_exists("tern1.0"));
        let tap = Tap::create("tern1.0").expect("create TAP");
        assert_eq!(tap.name(), "tern1.0");
        assert!(tap.as_raw_fd() >= 0);
        assert!(interface_exists("tern1.0"));
        assert!(tap.is_up().unwrap());
        assert_eq!(tap.vnet_hdr_len().unwrap(), VNET_HDR_LEN);
        let flags = tap.tun_flags().unwrap();
        let want = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        assert_eq!(flags & want, want, "flags {flags:#x}");
        assert!(tap.ifindex().unwrap() > 0);
        // SAFETY: F_GETFD on a descriptor we own.
        let fd_flags = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            fd_flags & libc::FD_CLOEXEC,
            0,
            "the TAP fd must be close-on-exec"
        );

        let clone = tap.try_clone().unwrap();
        drop(tap);
        assert!(interface_exists("tern1.0"), "the clone keeps it alive");
        drop(clone);
        assert!(!interface_exists("tern1.0"), "not persistent");
        // The name is free again.
        drop(Tap::create("tern1.0").expect("re-create TAP"));
    });
}

#[test]
fn bad_and_taken_names_are_refused_with_the_name_in_the_message() {
    in_private_netns(|| {
        let err = Tap::create("a-name-far-too-long").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("a-name-far-too-long"), "{err}");
        assert!(err.to_string().contains("15 bytes"), "{err}");
        assert!(matches!(
            NetError::of(&err),
            Some(NetError::InvalidName { .. })
        ));
        assert!(Tap::create("tap%d").is_err());

        let _tap = Tap::create("vif-web").unwrap();
        let err = Tap::create("vif-web").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("vif-web"), "{err}");
        // The loopback device is not ours to take either.
        assert!(Tap::create("lo").is_err());
    });
}

#[test]
fn bridges_are_recognised_without_sysfs() {
    in_private_netns(|| {
        create_bridge("br-t").expect("create bridge");
        let tap = Tap::create("tap-t").unwrap();
        assert!(bridge_exists("br-t"));
        assert!(interface_exists("br-t"));
        assert!(!bridge_exists("tap-t"), "a TAP is not a bridge");
        assert!(interface_exists("tap-t"));
        assert!(!bridge_exists("br-missing"));
        assert!(!interface_exists("br-missing"));
        assert!(!bridge_exists("bad/name"));
        assert!(!interface_exists(""));
        // /sys still shows the namespace that mounted it, not this thread's: why the queries
        // use ioctls.
        assert!(!std::path::Path::new("/sys/class/net/br-t").exists());

        drop(tap);
        delete_bridge("br-t").expect("delete bridge");
        assert!(!interface_exists("br-t"));
        assert!(delete_bridge("br-t").is_err());
    });
}

#[test]
fn attaching_to_a_missing_or_non_bridge_fails_clearly() {
    in_private_netns(|| {
        let tap = Tap::create("tern2.0").unwrap();
        let other = Tap::create("tern2.1").unwrap();

        let err = tap.attach_to_bridge("xenbr0").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let msg = err.to_string();
        assert!(msg.contains("tern2.0") && msg.contains("xenbr0"), "{msg}");

        let err = tap.attach_to_bridge("tern2.1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("not a bridge"), "{err}");

        let err = tap.attach_to_bridge("no/such").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

        create_bridge("br0").unwrap();
        tap.attach_to_bridge("br0").expect("attach");
        let err = tap.attach_to_bridge("br0").unwrap_err();
        assert!(
            matches!(NetError::of(&err), Some(NetError::AttachFailed { .. })),
            "{err}"
        );
        drop(other);
    });
}

#[test]
fn frames_cross_the_bridge_one_per_read_and_write() {
    in_private_netns(|| {
        create_bridge("br0").unwrap();
        let a = Tap::create("tap-a").unwrap();
        let b = Tap::create("tap-b").unwrap();
        a.attach_to_bridge("br0").unwrap();
        b.attach_to_bridge("br0").unwrap();

        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        // Drain whatever the kernel sent (IPv6 neighbour discovery and the like).
        while b.read(&mut buf).is_ok() {}
        assert_eq!(
            b.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        // A frame with its header, written in one piece, arrives whole on the other port.
        let mut framed = vec![0u8; VNET_HDR_LEN];
        framed.extend(test_frame([0xff; 6], GUEST_MAC));
        assert_eq!(a.write(&framed).unwrap(), framed.len());
        let (got, _) = read_until(&b, Duration::from_secs(5), |f| {
            ethertype(f) == Some(TEST_ETHERTYPE)
        })
        .expect("frame seen on the other port");
        assert_eq!(got.len(), framed.len());
        // The kernel writes the first 10 header bytes (virtio_net_hdr); num_buffers is the
        // device's to fill.
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(&got[VNET_HDR_LEN..], &framed[VNET_HDR_LEN..]);

        // Gathered writes and scattered reads keep frame boundaries too.
        let hdr = [0u8; VNET_HDR_LEN];
        let body = test_frame([0xff; 6], OTHER_MAC);
        a.write_vectored(&[io::IoSlice::new(&hdr), io::IoSlice::new(&body)])
            .unwrap();
        let start = Instant::now();
        let (mut h, mut rest) = ([0u8; VNET_HDR_LEN], [0u8; 2048]);
        let n = loop {
            let mut bufs = [io::IoSliceMut::new(&mut h), io::IoSliceMut::new(&mut rest)];
            match b.read_vectored(&mut bufs) {
                Ok(n)
                    if ethertype(&[&h[..], &rest[..n.saturating_sub(VNET_HDR_LEN)]].concat())
                        == Some(TEST_ETHERTYPE) =>
                {
                    break n
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < Duration::from_secs(5), "no frame");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(n, VNET_HDR_LEN + body.len());
        assert_eq!(&rest[..body.len()], &body[..]);
    });
}

#[test]
fn announcements_reach_other_ports_on_schedule_and_teach_the_bridge() {
    in_private_netns(|| {
        create_bridge("br0").unwrap();
        let guest = Tap::create("tap-guest").unwrap();
        let peer = Tap::create("tap-peer").unwrap();
        let bystander = Tap::create("tap-by").unwrap();
        for t in [&guest, &peer, &bystander] {
            t.attach_to_bridge("br0").unwrap();
        }
        let is_test = |f: &[u8]| ethertype(f) == Some(TEST_ETHERTYPE);

        // Before the announcement the bridge does not know GUEST_MAC: a frame to it floods.
        peer.write_frame(&test_frame(GUEST_MAC, OTHER_MAC)).unwrap();
        assert!(read_until(&bystander, Duration::from_secs(5), is_test).is_some());
        assert!(read_until(&guest, Duration::from_secs(5), is_test).is_some());

        let handle = announce(&guest, GUEST_MAC, 5).expect("start announcing");
        let mut arrivals = Vec::new();
        for _ in 0..5 {
            let (frame, at) = read_until(&peer, Duration::from_secs(10), |f| {
                ethertype(f) == Some(ETH_P_RARP)
            })
            .expect("RARP on the peer port");
            assert_eq!(&frame[..10], &[0u8; 10]);
            assert_eq!(&frame[VNET_HDR_LEN..], &rarp_frame(GUEST_MAC)[..]);
            arrivals.push(at);
        }
        assert_eq!(handle.join().unwrap(), 5);
        assert!(
            read_until(&peer, Duration::from_millis(300), |f| ethertype(f)
                == Some(ETH_P_RARP))
            .is_none(),
            "exactly five rounds"
        );
        let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, want_ms) in gaps.iter().zip([50u64, 150, 250, 350]) {
            // Lower bounds are firm (the sender sleeps at least that long); upper bounds
            // allow a loaded CI machine.
            assert!(
                *gap >= Duration::from_millis(want_ms * 8 / 10)
                    && *gap < Duration::from_millis(want_ms + 1000),
                "gaps {gaps:?}"
            );
        }

        // Now the bridge knows which port GUEST_MAC is behind: unicast goes only there.
        peer.write_frame(&test_frame(GUEST_MAC, OTHER_MAC)).unwrap();
        assert!(read_until(&guest, Duration::from_secs(5), is_test).is_some());
        assert!(read_until(&bystander, Duration::from_millis(300), is_test).is_none());
    });
}

#[test]
fn blocking_series_with_an_address_sends_rarp_then_gratuitous_arp() {
    in_private_netns(|| {
        create_bridge("br0").unwrap();
        let guest = Tap::create("tap-g").unwrap();
        let peer = Tap::create("tap-p").unwrap();
        guest.attach_to_bridge("br0").unwrap();
        peer.attach_to_bridge("br0").unwrap();
        let ip = std::net::Ipv4Addr::new(10, 77, 0, 10);
        let a = Announcement {
            mac: GUEST_MAC,
            ip: Some(ip),
            schedule: AnnounceSchedule {
                rounds: 2,
                initial: Duration::from_millis(1),
                step: Duration::ZERO,
                max: Duration::from_millis(1),
            },
        };
        assert_eq!(send_announcements(&guest, &a).unwrap(), 2);
        let mut seen = Vec::new();
        while let Some((f, _)) = read_until(&peer, Duration::from_millis(500), |f| {
            matches!(ethertype(f), Some(ETH_P_RARP | ETH_P_ARP))
        }) {
            seen.push(f[VNET_HDR_LEN..].to_vec());
        }
        let rarp = rarp_frame(GUEST_MAC).to_vec();
        let garp = gratuitous_arp_frame(GUEST_MAC, ip).to_vec();
        assert_eq!(seen, vec![rarp.clone(), garp.clone(), rarp, garp]);
    });
}

#[test]
fn a_cancelled_series_stops_at_once_and_releases_the_tap() {
    in_private_netns(|| {
        let tap = Tap::create("tap-c").unwrap();
        let handle = announce(&tap, GUEST_MAC, 1000).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!handle.is_finished());
        let start = Instant::now();
        let rounds = handle.cancel().unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!((1..1000).contains(&rounds), "{rounds}");
        drop(tap);
        assert!(
            !interface_exists("tap-c"),
            "the announcer's descriptor is closed"
        );

        // Nothing is sent for a multicast or zero MAC, and zero rounds send nothing.
        let tap = Tap::create("tap-c").unwrap();
        let err = announce(&tap, [0x01, 0, 0x5e, 0, 0, 1], 5).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("tap-c"), "{err}");
        assert!(announce(&tap, [0; 6], 5).is_err());
        assert_eq!(announce(&tap, GUEST_MAC, 0).unwrap().join().unwrap(), 0);
    });
}

#[test]
fn writing_to_a_tap_that_is_down_reports_the_interface() {
    in_private_netns(|| {
        let tap = Tap::create("tap-d").unwrap();
        crate::sys::CtlSocket::new("tap-d")
            .unwrap()
            .set_up("tap-d", false)
            .unwrap();
        let err = tap
            .write_frame(&test_frame([0xff; 6], GUEST_MAC))
            .unwrap_err();
        assert!(err.to_string().starts_with("tap-d: "), "{err}");
    });
}
