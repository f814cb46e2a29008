//! The virtio stack driven like a guest driver does it, without KVM: registers of the MMIO
//! transport, split rings in guest memory, a socket pair standing in for the TAP device and a
//! temporary file for the disk.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tern_devices::irq::IrqLine;
use tern_devices::virtio::block::{FileBackend, VirtioBlock};
use tern_devices::virtio::mmio::{
    MmioTransport, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use tern_devices::virtio::net::{NetBackend, VirtioNet};
use tern_devices::virtio::F_VERSION_1;
use tern_devices::{BusDevice, GuestMem, Pausable, SavedState, Snapshottable};
use vm_memory::{Address, Bytes, GuestAddress};

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;

fn memory() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory")
}

/// One end of a SOCK_SEQPACKET pair: one message per frame, like a TAP.
struct Seqpacket(OwnedFd);

fn seqpacket_pair() -> (Seqpacket, Seqpacket) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors.
    unsafe {
        (
            Seqpacket(OwnedFd::from_raw_fd(fds[0])),
            Seqpacket(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

impl Seqpacket {
    fn recv_blocking(&self, buf: &mut [u8]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // SAFETY: reading into our buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return n as usize;
            }
            assert!(Instant::now() < deadline, "nothing received");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl AsRawFd for Seqpacket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Seqpacket {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: sending our buffer.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// A minimal driver for one split queue at a fixed place in guest memory.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn at(base: u64) -> Self {
        DriverQueue {
            desc: base,
            avail: base + 16 * u64::from(QSIZE),
            used: base + 0x1000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Adds a chain of (address, length, device-writable) buffers; returns its head.
    fn add(&mut self, mem: &GuestMem, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.next_desc;
            let last = i + 1 == bufs.len();
            let flags: u16 = (if last { 0 } else { 1 }) | (if write { 2 } else { 0 });
            let at = GuestAddress(self.desc + 16 * u64::from(d));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj((d + 1) % QSIZE, at.unchecked_add(14))
                .unwrap();
            self.next_desc = (d + 1) % QSIZE;
        }
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE));
        mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Waits for the next used element: (head, length).
    fn wait_used(&mut self, mem: &GuestMem) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx != self.used_seen {
                let elem = GuestAddress(self.used + 4 + 8 * u64::from(self.used_seen % QSIZE));
                self.used_seen = self.used_seen.wrapping_add(1);
                return (
                    mem.read_obj(elem).unwrap(),
                    mem.read_obj(elem.unchecked_add(4)).unwrap(),
                );
            }
            assert!(Instant::now() < deadline, "device did not use the buffer");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn w32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Negotiates VERSION_1 plus `extra` features and sets up `queues`, like a driver.
fn bring_up(t: &mut MmioTransport, queues: &[&DriverQueue], extra: u64) {
    assert_eq!(r32(t, 0), 0x7472_6976);
    assert_eq!(r32(t, 4), 2);
    w32(t, 0x70, 1 | 2);
    let features = F_VERSION_1 | extra;
    w32(t, 0x24, 0);
    w32(t, 0x20, features as u32);
    w32(t, 0x24, 1);
    w32(t, 0x20, (features >> 32) as u32);
    w32(t, 0x70, 1 | 2 | STATUS_FEATURES_OK);
    assert_ne!(r32(t, 0x70) & STATUS_FEATURES_OK, 0);
    for (i, q) in queues.iter().enumerate() {
        w32(t, 0x30, i as u32);
        assert!(r32(t, 0x34) >= u32::from(QSIZE));
        w32(t, 0x38, u32::from(QSIZE));
        w32(t, 0x80, q.desc as u32);
        w32(t, 0x90, q.avail as u32);
        w32(t, 0xa0, q.used as u32);
        w32(t, 0x44, 1);
    }
    w32(t, 0x70, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_eq!(
        r32(t, 0x70) & STATUS_NEEDS_RESET,
        0,
        "device refused to start"
    );
}

fn net_transport(mem: &GuestMem, mac: [u8; 6]) -> (MmioTransport, Seqpacket) {
    let (ours, theirs) = seqpacket_pair();
    let net = VirtioNet::new("net0", mac, Box::new(ours), None);
    let t = MmioTransport::new(Box::new(net), mem.clone(), IrqLine::new(16).unwrap()).unwrap();
    (t, theirs)
}

const MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x12, 0x34, 0x56];

#[test]
fn net_sends_and_receives_frames() {
    let mem = memory();
    let (mut t, peer) = net_transport(&mem, MAC);
    let mut mac = [0u8; 6];
    t.read(0x100, &mut mac);
    assert_eq!(mac, MAC);
    let mut rx = DriverQueue::at(0x10000);
    let mut tx = DriverQueue::at(0x20000);
    bring_up(&mut t, &[&rx, &tx], 1 << 5);

    // Transmit: header + frame from two buffers.
    let frame: Vec<u8> = (0..100u8).collect();
    mem.write_slice(&[0u8; 12], GuestAddress(0x30000)).unwrap();
    mem.write_slice(&frame, GuestAddress(0x31000)).unwrap();
    tx.add(&mem, &[(0x30000, 12, false), (0x31000, 100, false)]);
    w32(&mut t, 0x50, 1);
    let mut got = [0u8; 256];
    let n = peer.recv_blocking(&mut got);
    assert_eq!(n, 112);
    assert_eq!(&got[12..112], &frame[..]);
    assert_eq!(tx.wait_used(&mem).1, 0);

    // Receive: the frame waits until a buffer is there.
    let incoming: Vec<u8> = (0..80u8).map(|b| b ^ 0x5a).collect();
    let mut msg = vec![0u8; 12];
    msg.extend_from_slice(&incoming);
    let mut peer_tx = peer;
    peer_tx.send(&msg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    rx.add(&mem, &[(0x40000, 2048, true)]);
    w32(&mut t, 0x50, 0);
    let (_, len) = rx.wait_used(&mem);
    assert_eq!(len, 92);
    let mut landed = vec![0u8; 80];
    mem.read_slice(&mut landed, GuestAddress(0x40000 + 12))
        .unwrap();
    assert_eq!(landed, incoming);
    assert_ne!(r32(&mut t, 0x60) & 1, 0, "no used-ring interrupt");
    w32(&mut t, 0x64, 1);
    assert_eq!(r32(&mut t, 0x60), 0);
}

#[test]
fn net_state_survives_a_snapshot_into_a_new_device() {
    let mem = memory();
    let (mut t, peer) = net_transport(&mem, MAC);
    let mut tx = DriverQueue::at(0x20000);
    let rx = DriverQueue::at(0x10000);
    bring_up(&mut t, &[&rx, &tx], 1 << 5);
    mem.write_slice(&[0u8; 112], GuestAddress(0x30000)).unwrap();
    for _ in 0..3 {
        tx.add(&mem, &[(0x30000, 112, false)]);
        w32(&mut t, 0x50, 1);
        tx.wait_used(&mem);
        let mut b = [0u8; 256];
        peer.recv_blocking(&mut b);
    }
    t.pause();
    let saved = t.snapshot().unwrap();
    drop(t);

    let (mut t2, peer2) = net_transport(&mem, MAC);
    t2.restore(SavedState::current(&saved)).unwrap();
    assert_ne!(r32(&mut t2, 0x70) & STATUS_DRIVER_OK, 0);
    t2.resume();
    tx.add(&mem, &[(0x30000, 112, false)]);
    w32(&mut t2, 0x50, 1);
    assert_eq!(tx.wait_used(&mem), (u32::from(3 % QSIZE), 0));
    let mut b = [0u8; 256];
    assert_eq!(peer2.recv_blocking(&mut b), 112);

    // A different MAC is a different card: refused.
    let (mut t3, _p) = net_transport(&mem, [2, 0, 0, 0, 0, 1]);
    assert!(t3.restore(SavedState::current(&saved)).is_err());
}

#[test]
fn a_driver_without_version_1_cannot_start() {
    let mem = memory();
    let (mut t, _peer) = net_transport(&mem, MAC);
    w32(&mut t, 0x70, 1 | 2);
    w32(&mut t, 0x24, 0);
    w32(&mut t, 0x20, 1 << 5);
    w32(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK);
    assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
}

#[test]
fn a_queue_outside_memory_is_refused_not_a_panic() {
    let mem = memory();
    let (mut t, _peer) = net_transport(&mem, MAC);
    let bad = DriverQueue::at(MEM as u64 * 4);
    let tx = DriverQueue::at(0x20000);
    w32(&mut t, 0x70, 1 | 2);
    w32(&mut t, 0x24, 1);
    w32(&mut t, 0x20, 1);
    w32(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK);
    for (i, q) in [&bad, &tx].iter().enumerate() {
        w32(&mut t, 0x30, i as u32);
        w32(&mut t, 0x38, u32::from(QSIZE));
        w32(&mut t, 0x80, q.desc as u32);
        w32(&mut t, 0x90, q.avail as u32);
        w32(&mut t, 0xa0, q.used as u32);
        w32(&mut t, 0x44, 1);
    }
    w32(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_ne!(r32(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    // Reset and the device is usable again.
    w32(&mut t, 0x70, 0);
    assert_eq!(r32(&mut t, 0x70), 0);
}

fn blk_request(
    mem: &GuestMem,
    q: &mut DriverQueue,
    t: &mut MmioTransport,
    kind: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
) -> u8 {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(0x50000)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x50100)).unwrap();
    let mut bufs = vec![(0x50000, 16, false)];
    bufs.extend(data);
    bufs.push((0x50100, 1, true));
    q.add(mem, &bufs);
    w32(t, 0x50, 0);
    q.wait_used(mem);
    mem.read_obj(GuestAddress(0x50100)).unwrap()
}

#[test]
fn blk_writes_reads_flushes_and_refuses_out_of_range() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let blk = VirtioBlock::new(
        "blk0",
        "tern-disk-0",
        Box::new(FileBackend::open(&image, false).unwrap()),
    );
    // The write log of a migration copying the disk: on, it sees every block written.
    let written = blk.write_log();
    written.start();
    let mut t = MmioTransport::new(Box::new(blk), mem.clone(), IrqLine::new(17).unwrap()).unwrap();
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    let mut q = DriverQueue::at(0x10000);
    bring_up(&mut t, &[&q], 1 << 9);

    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&data, GuestAddress(0x60000)).unwrap();
    assert_eq!(
        blk_request(&mem, &mut q, &mut t, 1, 8, Some((0x60000, 4096, false))),
        0
    );
    assert_eq!(blk_request(&mem, &mut q, &mut t, 4, 0, None), 0);
    assert_eq!(std::fs::read(&image).unwrap()[4096..8192], data[..]);
    // Sector 8 is the second 4 KiB block; reads and flushes mark nothing.
    assert_eq!(written.take()[0], 0b10);
    assert_eq!(
        blk_request(&mem, &mut q, &mut t, 0, 8, Some((0x70000, 4096, true))),
        0
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(0x70000)).unwrap();
    assert_eq!(back, data);
    // Past the end, and an unknown request type.
    assert_eq!(
        blk_request(&mem, &mut q, &mut t, 0, 2047, Some((0x70000, 4096, true))),
        1
    );
    assert_eq!(blk_request(&mem, &mut q, &mut t, 99, 0, None), 2);
    // GET_ID.
    assert_eq!(
        blk_request(&mem, &mut q, &mut t, 8, 0, Some((0x70000, 20, true))),
        0
    );
    let mut id = [0u8; 11];
    mem.read_slice(&mut id, GuestAddress(0x70000)).unwrap();
    assert_eq!(&id, b"tern-disk-0");
    assert!(written.take().iter().all(|&w| w == 0));
}
