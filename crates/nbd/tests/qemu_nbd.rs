//! tern-nbd against a real `qemu-nbd` (qemu-utils) serving a temporary raw image on 127.0.0.1.
//!
//! qemu-nbd cannot listen on port 0 and report the port, so each server gets a port that was
//! free a moment ago, and a start that loses the race for it is retried on another. Servers are
//! started directly (not with `--fork`) so each is this process's child, killed and reaped by
//! PID when its test ends.
//! Without qemu-nbd these tests fail (not skip): CI is meant to have it.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_nbd::{ConnectOptions, NbdClient, NbdDisk, NbdError};

const MIB: usize = 1024 * 1024;

/// The byte at `pos` of the test pattern: varies within and across sectors.
fn pattern(pos: u64) -> u8 {
    (pos.wrapping_mul(31) ^ (pos >> 9)) as u8
}

fn pattern_buf(start: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(start + i)).collect()
}

fn qemu_nbd() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("qemu-nbd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "qemu-nbd not found on PATH: the NBD integration tests need it \
             (Debian package qemu-utils: apt-get install qemu-utils)"
        )
    })
}

/// A port that nothing listened on a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A scratch directory with a raw image file.
struct Image {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Image {
    /// An image of `size` bytes whose first `patterned` bytes hold the test pattern.
    fn new(size: u64, patterned: usize) -> Image {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        let f = File::create(&path).expect("create image");
        f.set_len(size).expect("size image");
        f.write_all_at(&pattern_buf(0, patterned), 0)
            .expect("write pattern");
        Image { dir, path }
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        File::open(&self.path)
            .and_then(|f| f.read_exact_at(&mut b, offset))
            .expect("read image");
        b
    }
}

/// A running `qemu-nbd`, killed (by its PID) when dropped.
struct Server {
    child: Child,
    addr: String,
    stopped: bool,
    reaped: bool,
}

impl Server {
    fn start(image: &Image, extra: &[&str]) -> Server {
        let bin = qemu_nbd();
        for attempt in 0..10 {
            let port = free_port();
            let log_path = image.dir.path().join(format!("qemu-nbd-{port}.log"));
            // qemu-nbd writes its PID file only once it listens (not at all when the port is
            // taken): the file, not a probe connection (which another process holding the
            // port could answer), says this server is ready.
            let pid_path = image.dir.path().join(format!("qemu-nbd-{port}.pid"));
            let log = File::create(&log_path).expect("create log");
            let mut child = Command::new(&bin)
                .args(["-f", "raw", "-b", "127.0.0.1", "-p", &port.to_string()])
                .arg(format!("--pid-file={}", pid_path.display()))
                // Keep serving after a client leaves, and let tests hold several
                // connections at once.
                .args(["--persistent", "--shared=8"])
                .args(extra)
                .arg(&image.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("Address already in use") && attempt < 9 {
                        break; // lost the port to someone else: try another
                    }
                    panic!("qemu-nbd exited with {status} on start: {log}");
                }
                let pid = std::fs::read_to_string(&pid_path).unwrap_or_default();
                if pid.trim() == child.id().to_string() {
                    return Server {
                        child,
                        addr: format!("127.0.0.1:{port}"),
                        stopped: false,
                        reaped: false,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("qemu-nbd did not start listening on port {port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        unreachable!("the last attempt panics instead of retrying");
    }

    /// SIGKILL (by PID, through `Child`) and reap.
    fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    /// Freezes (`true`) or thaws the server with SIGSTOP/SIGCONT, sent to its PID.
    fn freeze(&mut self, frozen: bool) {
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
        self.stopped = frozen;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.stopped && !self.reaped {
            self.freeze(false);
        }
        self.kill();
    }
}

fn options() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    }
}

fn connect(server: &Server, export: &str) -> NbdClient {
    NbdClient::connect(&server.addr, export, &options())
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.addr))
}

#[test]
fn size_flags_and_known_content() {
    let img = Image::new(8 * MIB as u64, 2 * MIB);
    let server = Server::start(&img, &[]);
    let mut c = connect(&server, "");
    eprintln!("qemu-nbd export: {:?}", c.info());
    assert_eq!(c.size(), 8 * MIB as u64);
    assert!(c.info().negotiated_with_go, "qemu-nbd knows NBD_OPT_GO");
    assert!(!c.read_only());
    assert!(c.flags().can_flush() && c.flags().can_fua());
    let bs = c.block_size().expect("qemu-nbd sends NBD_INFO_BLOCK_SIZE");
    assert!(bs.minimum <= 512 && bs.maximum >= 1 << 20, "{bs:?}");

    let mut buf = vec![0u8; 4096];
    c.read(0, &mut buf).expect("read sector 0");
    assert_eq!(buf, pattern_buf(0, 4096));
    c.read(12345 - 12345 % c.alignment() as u64, &mut buf[..512])
        .expect("read");
    // A read spanning the end of the pattern (and into the sparse rest).
    let mut buf = vec![0xffu8; 8192];
    c.read(2 * MIB as u64 - 4096, &mut buf).expect("read");
    assert_eq!(&buf[..4096], &pattern_buf(2 * MIB as u64 - 4096, 4096)[..]);
    assert!(buf[4096..].iter().all(|&b| b == 0));
    // The whole export in one call: split into requests of at most 32 MiB / the server max.
    let mut all = vec![0u8; 8 * MIB];
    c.read(0, &mut all).expect("read all");
    assert_eq!(&all[..2 * MIB], &pattern_buf(0, 2 * MIB)[..]);
    c.disconnect().expect("disconnect");
}

#[test]
fn write_fua_flush_and_read_back() {
    let img = Image::new(4 * MIB as u64, 0);
    let server = Server::start(&img, &[]);
    let mut c = connect(&server, "");
    let data = pattern_buf(7, 64 * 1024);
    c.write(4096, &data).expect("write");
    let mut back = vec![0u8; data.len()];
    c.read(4096, &mut back).expect("read back");
    assert_eq!(back, data);

    let fua = pattern_buf(99, 8192);
    c.write_fua(MIB as u64, &fua).expect("FUA write");
    c.flush().expect("flush");
    // After a flush (and a FUA write) the data is in the image file itself.
    assert_eq!(img.read(4096, data.len()), data);
    assert_eq!(img.read(MIB as u64, fua.len()), fua);

    // Writes and reads of the last sector.
    let last = c.size() - 512;
    c.write(last, &[0xab; 512]).expect("write last sector");
    let mut b = [0u8; 512];
    c.read(last, &mut b).expect("read last sector");
    assert_eq!(b, [0xab; 512]);
    assert!(c.is_usable());
}

#[test]
fn requests_are_split_at_the_request_limit() {
    let img = Image::new(40 * MIB as u64, 0);
    let server = Server::start(&img, &[]);
    // More than the 32 MiB qemu-nbd takes in one request.
    let mut c = connect(&server, "");
    let big = pattern_buf(3, 36 * MIB);
    c.write(MIB as u64, &big).expect("36 MiB write");
    let mut back = vec![0u8; big.len()];
    c.read(MIB as u64, &mut back).expect("36 MiB read");
    assert!(back == big, "36 MiB read back differs");
    drop(c);

    // A small configured limit: many requests per call, same bytes.
    let small = ConnectOptions {
        max_request: 64 * 1024 + 100, // rounded down to the alignment
        ..options()
    };
    let mut c = NbdClient::connect(&server.addr, "", &small).expect("connect");
    assert!(c.max_request() <= 64 * 1024 + 100 && c.max_request() >= 64 * 1024 - 4096);
    let mut back = vec![0u8; 3 * MIB];
    c.read(MIB as u64, &mut back).expect("split read");
    assert!(back[..] == big[..3 * MIB]);
}

#[test]
fn trim_if_advertised() {
    let img = Image::new(4 * MIB as u64, 4 * MIB);
    let server = Server::start(&img, &["--discard=unmap"]);
    let mut c = connect(&server, "");
    assert!(
        c.flags().can_trim(),
        "qemu-nbd advertises trim on a writable export"
    );
    c.trim(MIB as u64, MIB as u64).expect("trim");
    c.flush().expect("flush");
    // Content after a trim is undefined by the protocol; qemu-nbd with --discard=unmap
    // punches a hole in the raw file, which reads as zeroes.
    let mut b = vec![0xffu8; MIB];
    c.read(MIB as u64, &mut b).expect("read trimmed range");
    assert!(b.iter().all(|&x| x == 0), "trimmed range reads as zeroes");
    // Outside the range, untouched.
    let mut b = vec![0u8; 4096];
    c.read(2 * MIB as u64, &mut b).expect("read");
    assert_eq!(b, pattern_buf(2 * MIB as u64, 4096));
    // Beyond the end: refused locally.
    let e = c.trim(3 * MIB as u64, 2 * MIB as u64).unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
}

#[test]
fn requests_beyond_the_end_are_refused() {
    let img = Image::new(MIB as u64, MIB);
    let server = Server::start(&img, &[]);
    let mut c = connect(&server, "");
    let mut b = vec![0u8; 1024];
    let e = c.read(MIB as u64 - 512, &mut b).unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    assert!(e.to_string().contains("beyond the end"), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidInput);
    let e = c.read(u64::MAX - 10, &mut b).unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    let e = c.write(MIB as u64, &b).unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    // Nothing was sent: the connection is fine.
    assert!(c.is_usable());
    c.read(MIB as u64 - 1024, &mut b)
        .expect("read the last KiB");
    assert_eq!(b, pattern_buf(MIB as u64 - 1024, 1024));
}

#[test]
fn read_only_export_refuses_writes() {
    let img = Image::new(MIB as u64, 4096);
    let server = Server::start(&img, &["--read-only"]);
    let mut c = connect(&server, "");
    assert!(c.read_only());
    let e = c.write(0, &[1; 512]).unwrap_err();
    assert!(matches!(e, NbdError::ReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);
    let e = c.trim(0, 512).unwrap_err();
    assert!(matches!(e, NbdError::ReadOnly { .. }), "{e}");
    let mut b = [0u8; 512];
    c.read(0, &mut b).expect("reads still work");
    assert_eq!(&b[..], &pattern_buf(0, 512)[..]);
    assert_eq!(img.read(0, 512), pattern_buf(0, 512));
}

#[test]
fn named_export_and_wrong_name() {
    let img = Image::new(MIB as u64, 4096);
    let server = Server::start(
        &img,
        &["--export-name=disk0", "--description=tern test disk"],
    );
    let mut c = connect(&server, "disk0");
    eprintln!("named export: {:?}", c.info());
    let mut b = [0u8; 512];
    c.read(0, &mut b).expect("read");
    assert_eq!(&b[..], &pattern_buf(0, 512)[..]);

    let e = NbdClient::connect(&server.addr, "nosuchdisk", &options()).unwrap_err();
    let msg = e.to_string();
    eprintln!("wrong export name: {msg}");
    assert!(matches!(e, NbdError::Refused { .. }), "{msg}");
    assert!(
        msg.contains("'nosuchdisk'") && msg.contains(&server.addr),
        "{msg}"
    );
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
    // The refused attempt did not disturb the server.
    let mut c2 = connect(&server, "disk0");
    c2.read(0, &mut b).expect("read after refusal");
}

#[test]
fn killed_server_gives_a_prompt_error() {
    let img = Image::new(4 * MIB as u64, 4096);
    let mut server = Server::start(&img, &[]);
    let mut c = connect(&server, "");
    let mut b = vec![0u8; MIB];
    c.read(0, &mut b).expect("read before the kill");
    server.kill();
    let start = Instant::now();
    let e = c.read(0, &mut b).unwrap_err();
    eprintln!("after kill: {e} ({:?})", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(5), "no hang");
    assert!(
        matches!(e, NbdError::ConnectionLost { .. }),
        "expected a lost connection, got {e}"
    );
    assert!(e.to_string().contains(&server.addr), "{e}");
    // A write (bigger than the socket buffer) fails the same way, or as Broken.
    let e = c.write(0, &b).unwrap_err();
    assert!(matches!(e, NbdError::Broken { .. }), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotConnected);
    assert!(!c.is_usable());
}

#[test]
fn stopped_server_times_out() {
    let img = Image::new(MIB as u64, 4096);
    let mut server = Server::start(&img, &[]);
    let short = ConnectOptions {
        io_timeout: Duration::from_millis(700),
        ..options()
    };
    let mut c = NbdClient::connect(&server.addr, "", &short).expect("connect");
    server.freeze(true);
    let start = Instant::now();
    let mut b = [0u8; 512];
    let e = c.read(0, &mut b).unwrap_err();
    let took = start.elapsed();
    eprintln!("stopped server: {e} after {took:?}");
    assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
    // The late reply must not be taken for the next request's: the client refuses to go on.
    server.freeze(false);
    let e = c.read(0, &mut b).unwrap_err();
    assert!(matches!(e, NbdError::Broken { .. }), "{e}");
    // A new connection works.
    let mut c = NbdClient::connect(&server.addr, "", &short).expect("reconnect");
    c.read(0, &mut b).expect("read after reconnect");
}

#[test]
fn connection_refused_names_the_address() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let e = NbdClient::connect(&addr, "", &options()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&addr), "{msg}");
    assert_eq!(
        io::Error::from(e).kind(),
        io::ErrorKind::ConnectionRefused,
        "{msg}"
    );
}

#[test]
fn nbd_disk_wrapper() {
    let img = Image::new(2 * MIB as u64, 4096);
    let server = Server::start(&img, &["--discard=unmap"]);
    let disk = NbdDisk::connect(&server.addr, "", &options()).expect("connect");
    assert_eq!(disk.size(), 2 * MIB as u64);
    assert!(!disk.read_only() && disk.can_flush() && disk.can_discard());
    let mut b = [0u8; 512];
    disk.read_at(&mut b, 0).expect("read_at");
    assert_eq!(&b[..], &pattern_buf(0, 512)[..]);
    disk.write_at(&[5; 1024], 512).expect("write_at");
    disk.write_at_fua(&[6; 512], 4096).expect("write_at_fua");
    disk.flush().expect("flush");
    disk.discard(MIB as u64, 4096).expect("discard");
    assert_eq!(img.read(512, 1024), vec![5; 1024]);
    let e = disk.read_at(&mut b, 2 * MIB as u64).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("beyond the end"), "{e}");
    // Shared by reference across threads, as a device back-end would.
    std::thread::scope(|s| {
        for t in 0..2u8 {
            let disk = &disk;
            s.spawn(move || {
                let off = u64::from(t) * 65536 + 65536;
                disk.write_at(&[t + 1; 4096], off).expect("write");
                let mut b = [0u8; 4096];
                disk.read_at(&mut b, off).expect("read");
                assert_eq!(b, [t + 1; 4096]);
            });
        }
    });
    assert!(disk.is_usable());
    disk.into_client()
        .expect("client")
        .disconnect()
        .expect("disconnect");
}

/// Sequential 1 MiB reads and writes over loopback; the figures are printed (run with
/// `--nocapture` to see them) rather than asserted, as CI machines vary.
#[test]
fn throughput_1mib_sequential() {
    const TOTAL: usize = 256 * MIB;
    let img = Image::new(TOTAL as u64, 0);
    let server = Server::start(&img, &[]);
    let mut c = connect(&server, "");
    let chunk = pattern_buf(0, MIB);
    // The first pass also allocates the sparse image's blocks; the second overwrites them.
    let mut write_passes = Vec::new();
    for _pass in 0..2 {
        let start = Instant::now();
        for i in 0..TOTAL / MIB {
            c.write((i * MIB) as u64, &chunk).expect("write");
        }
        c.flush().expect("flush");
        write_passes.push(start.elapsed());
    }
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    for i in 0..TOTAL / MIB {
        c.read((i * MIB) as u64, &mut buf).expect("read");
    }
    let read = start.elapsed();
    assert_eq!(buf, chunk);
    let rate = |d: Duration| TOTAL as f64 / MIB as f64 / d.as_secs_f64();
    eprintln!(
        "tern-nbd vs qemu-nbd over loopback, 1 MiB sequential requests, {} MiB: \
         write+flush {:.0} MiB/s (fresh image), {:.0} MiB/s (overwrite), read {:.0} MiB/s",
        TOTAL / MIB,
        rate(write_passes[0]),
        rate(write_passes[1]),
        rate(read)
    );
}
