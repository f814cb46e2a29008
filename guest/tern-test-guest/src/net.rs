//! The guest's network: smoltcp (no allocator: every socket and buffer is a static) over the
//! virtio-net device, polled on CPU 0 from its main loop. smoltcp answers ARP and ICMP echo
//! itself; the guest serves HTTP downloads (`http.rs`) and a TCP echo port.

use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU64, Ordering};

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

use crate::http;
use crate::netdev::{self, VirtioNet};
use crate::virtio::Transport;

/// Concurrent HTTP connections (one listening socket each).
const HTTP_CONNS: usize = 16;
/// Concurrent echo connections.
const ECHO_CONNS: usize = 4;
/// Receive buffers of HTTP sockets: requests are small.
const HTTP_RX: usize = 4096;
/// Transmit buffers of HTTP sockets: the most unacknowledged data in flight per download.
const HTTP_TX: usize = 128 * 1024;
const ECHO_RX: usize = 64 * 1024;
const ECHO_TX: usize = 64 * 1024;

/// Most egress rounds per poll (each sends at most one segment per socket).
const EGRESS_ROUNDS: usize = 128;
/// Keep polling without sleeping this long after the last frame moved: the next ACK or
/// request of a busy connection is usually closer than a trip through the sleep path.
const SPIN_NS: u64 = 1_000_000;

static mut SOCKETS: [SocketStorage<'static>; HTTP_CONNS + ECHO_CONNS] =
    [const { SocketStorage::EMPTY }; HTTP_CONNS + ECHO_CONNS];
#[repr(C, align(4096))]
struct HttpBuffers {
    rx: [[u8; HTTP_RX]; HTTP_CONNS],
    tx: [[u8; HTTP_TX]; HTTP_CONNS],
}
static mut HTTP_BUFS: HttpBuffers = HttpBuffers {
    rx: [[0; HTTP_RX]; HTTP_CONNS],
    tx: [[0; HTTP_TX]; HTTP_CONNS],
};
#[repr(C, align(4096))]
struct EchoBuffers {
    rx: [[u8; ECHO_RX]; ECHO_CONNS],
    tx: [[u8; ECHO_TX]; ECHO_CONNS],
}
static mut ECHO_BUFS: EchoBuffers = EchoBuffers {
    rx: [[0; ECHO_RX]; ECHO_CONNS],
    tx: [[0; ECHO_TX]; ECHO_CONNS],
};
static mut HTTP_STATE: [http::Conn; HTTP_CONNS] = [const { http::Conn::NEW }; HTTP_CONNS];

/// Open TCP connections (not listening, closed or in TIME-WAIT), as of the last poll.
pub static TCP_CONNS: AtomicU64 = AtomicU64::new(0);

/// The network configuration from the command line.
#[derive(Clone, Copy)]
pub struct Settings {
    pub ip: [u8; 4],
    pub prefix: u8,
    pub gw: Option<[u8; 4]>,
    pub http_port: u16,
    pub echo_port: u16,
}

/// What one poll found.
pub struct Activity {
    /// Frames are moving (or smoltcp wants to run again at once): do not sleep.
    pub busy: bool,
    /// Nanoseconds until smoltcp next needs a poll (a retransmission, a delayed ACK), if ever.
    pub due_in: Option<u64>,
}

pub struct Net {
    dev: VirtioNet,
    iface: Interface,
    sockets: SocketSet<'static>,
    http: [Option<SocketHandle>; HTTP_CONNS],
    conns: &'static mut [http::Conn; HTTP_CONNS],
    echo: [Option<SocketHandle>; ECHO_CONNS],
    http_port: u16,
    echo_port: u16,
    last_activity: u64,
    frames_seen: u64,
    /// The device's interrupt reaches CPU 0 (else the guest only polls).
    irq: bool,
}

/// Whether `ip` can be the interface's own address (smoltcp refuses others).
pub fn usable_address(ip: [u8; 4]) -> bool {
    let a = Ipv4Address::from(ip);
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
}

fn new_socket(rx: &'static mut [u8], tx: &'static mut [u8]) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    // Small writes (echo, response heads) go out at once.
    s.set_nagle_enabled(false);
    s
}

impl Net {
    /// Brings up the device behind `t` and the stack on it (once: the buffers are statics).
    pub fn new(t: Transport, s: &Settings, now_ns: u64) -> Result<Net, &'static str> {
        if !usable_address(s.ip) {
            return Err("ip= is not a unicast address");
        }
        let mut dev = VirtioNet::new(t)?;
        let mut config = Config::new(EthernetAddress(dev.mac).into());
        config.random_seed = crate::hw::rdtsc()
            ^ u64::from_le_bytes([
                dev.mac[0], dev.mac[1], dev.mac[2], dev.mac[3], dev.mac[4], dev.mac[5], 0, 0,
            ]);
        let mut iface = Interface::new(config, &mut dev, instant(now_ns));
        let cidr = IpCidr::new(IpAddress::from(Ipv4Address::from(s.ip)), s.prefix);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(cidr);
        });
        if let Some(gw) = s.gw {
            if iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::from(gw))
                .is_err()
            {
                crate::println!("net: cannot add the default route");
            }
        }
        // SAFETY: Net::new runs once (VirtioNet::new fails the second time, above), so these
        // are the only references to the statics.
        let (storage, hb, eb, conns) = unsafe {
            (
                &mut *addr_of_mut!(SOCKETS),
                &mut *addr_of_mut!(HTTP_BUFS),
                &mut *addr_of_mut!(ECHO_BUFS),
                &mut *addr_of_mut!(HTTP_STATE),
            )
        };
        let mut sockets = SocketSet::new(&mut storage[..]);
        let mut http = [None; HTTP_CONNS];
        if s.http_port != 0 {
            for ((h, rx), tx) in http.iter_mut().zip(hb.rx.iter_mut()).zip(hb.tx.iter_mut()) {
                let mut sock = new_socket(rx, tx);
                let _ = sock.listen(s.http_port);
                *h = Some(sockets.add(sock));
            }
        }
        let mut echo = [None; ECHO_CONNS];
        if s.echo_port != 0 {
            for ((h, rx), tx) in echo.iter_mut().zip(eb.rx.iter_mut()).zip(eb.tx.iter_mut()) {
                let mut sock = new_socket(rx, tx);
                let _ = sock.listen(s.echo_port);
                *h = Some(sockets.add(sock));
            }
        }
        Ok(Net {
            dev,
            iface,
            sockets,
            http,
            conns,
            echo,
            http_port: s.http_port,
            echo_port: s.echo_port,
            last_activity: now_ns,
            frames_seen: 0,
            irq: false,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.dev.mac
    }

    pub fn queue_sizes(&self) -> (u16, u16) {
        self.dev.queue_sizes()
    }

    /// Receives and answers what arrived, sends what the servers have queued, and says whether
    /// to keep polling.
    pub fn poll(&mut self, now_ns: u64) -> Activity {
        let ts = instant(now_ns);
        self.iface.poll(ts, &mut self.dev, &mut self.sockets);
        self.serve();
        for _ in 0..EGRESS_ROUNDS {
            if self.iface.poll_egress(ts, &mut self.dev, &mut self.sockets) == PollResult::None {
                break;
            }
        }
        self.dev.flush();
        let frames =
            netdev::RX_PACKETS.load(Ordering::Relaxed) + netdev::TX_PACKETS.load(Ordering::Relaxed);
        if frames != self.frames_seen {
            self.frames_seen = frames;
            self.last_activity = now_ns;
        }
        let due_in = self
            .iface
            .poll_delay(ts, &self.sockets)
            .map(|d| d.total_micros().saturating_mul(1000));
        if self.dev.is_broken() {
            // Sockets may want to send for ever: nothing will move again.
            return Activity {
                busy: false,
                due_in: None,
            };
        }
        Activity {
            busy: now_ns.saturating_sub(self.last_activity) < SPIN_NS || due_in == Some(0),
            due_in,
        }
    }

    /// Runs the HTTP and echo servers over their sockets.
    fn serve(&mut self) {
        let mut open = 0;
        for (h, c) in self.http.iter().zip(self.conns.iter_mut()) {
            if let Some(h) = *h {
                let sock = self.sockets.get_mut::<tcp::Socket>(h);
                http::step(sock, c, self.http_port);
                open += u64::from(is_open(sock.state()));
            }
        }
        for h in self.echo.iter().flatten() {
            let sock = self.sockets.get_mut::<tcp::Socket>(*h);
            echo_step(sock, self.echo_port);
            open += u64::from(is_open(sock.state()));
        }
        TCP_CONNS.store(open, Ordering::Relaxed);
    }

    /// Records whether the device's interrupt was routed to CPU 0.
    pub fn set_irq(&mut self, irq: bool) {
        self.irq = irq;
    }

    pub fn has_irq(&self) -> bool {
        self.irq
    }

    /// Prepares to sleep until the next frame (see `VirtioNet::arm`); false: do not sleep.
    pub fn arm(&mut self) -> bool {
        !self.irq || self.dev.arm()
    }

    pub fn disarm(&mut self) {
        if self.irq {
            self.dev.disarm()
        }
    }
}

fn instant(now_ns: u64) -> Instant {
    Instant::from_micros((now_ns / 1000) as i64)
}

fn is_open(s: State) -> bool {
    !matches!(s, State::Listen | State::Closed | State::TimeWait)
}

/// Echoes what one connection received, as far as its transmit buffer takes it; closes once
/// the client has closed and everything was echoed.
fn echo_step(sock: &mut tcp::Socket, port: u16) {
    if !http::recycle(sock, port) {
        return;
    }
    let mut tmp = [0u8; 2048];
    loop {
        let space = sock.send_capacity() - sock.send_queue();
        if space == 0 || !sock.can_recv() {
            break;
        }
        let want = space.min(tmp.len());
        let n = sock.recv_slice(&mut tmp[..want]).unwrap_or(0);
        if n == 0 {
            break;
        }
        let _ = sock.send_slice(&tmp[..n]);
    }
    if sock.state() == State::CloseWait && sock.recv_queue() == 0 {
        sock.close();
    }
}
