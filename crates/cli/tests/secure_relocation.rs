//! Secure relocation on the lab's two hosts: migrations over mutually authenticated TLS by
//! default, refusals of every peer that is not trusted or not of the same kind, a pool CA, an
//! incoming guest held to what the destination allows, and a flood of idle connections.
//! Every test asserts what happened on both hosts: the guest checks itself where it runs, and
//! nothing is left where it was refused.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tern_testkit::{Member, LAB_HOSTS_ALLOW};

/// A guest without network (so that only migration traffic crosses the link), writing
/// 8 MiB/s over 32 MiB and checking all of it every second: light enough to keep up (and so
/// to sleep, when it checks its registers) on a loaded machine.
const WORKLOAD: &str = "heartbeat_ms=100 wss_mib=32 write_mibps=8 verify_ms=1000 disk_mib=0";

fn host1() -> String {
    Member::Host1.ip().to_string()
}

fn host2() -> String {
    Member::Host2.ip().to_string()
}

fn create_guest(host: &Host, name: &str) {
    host.create_guest(name, 256, 1, WORKLOAD);
    host.wait_heartbeat(name, 3, Duration::from_secs(30));
}

/// Asserts `name` runs on `host`, carried on from `after` (no reboot), and checks itself clean.
fn assert_runs_clean(host: &Host, name: &str, after: u64) {
    let state = host.state(name).expect("listed");
    assert!(
        state == "running" || state == "blocked",
        "{name} is {state}"
    );
    let first = host.wait_heartbeat(name, after + 1, Duration::from_secs(15));
    host.assert_checks_clean(name, &first);
}

/// Moves `name` and checks it arrived whole.
fn move_guest(
    from: &Host,
    to: &Host,
    address: &str,
    name: &str,
    args: &[&str],
) -> serde_json::Value {
    let before = from.last_beat(name).seq;
    let summary = from.migrate(name, address, args);
    assert!(!from.has(name), "{name} is still listed on the source");
    assert_runs_clean(to, name, before);
    summary
}

/// Migrates `name` from h1 to h2 expecting a refusal that mentions every one of `source_says`
/// on the source's terminal and its log, and `destination_logs` in h2's log; then asserts the
/// guest still runs on h1 only and nothing was built on h2.
fn assert_refused(pair: &Pair, name: &str, source_says: &[&str], destination_logs: &str) -> String {
    let err = pair.h1.fails(&["migrate", name, &host2(), "--live"]);
    for s in source_says {
        assert!(err.contains(s), "expected {s:?} in {err:?}");
    }
    let logged = wait_for(Duration::from_secs(10), || {
        pair.h2.daemon_log().contains(destination_logs)
    });
    assert!(
        logged,
        "the destination did not log {destination_logs:?}:\n{}",
        pair.h2.daemon_log()
    );
    assert!(pair.h1.has(name));
    assert_runs_clean(&pair.h1, name, pair.h1.last_beat(name).seq);
    pair.h2.assert_empty(&pair.lab, Member::Host2);
    println!("refused: {}", err.trim());
    err
}

/// A packet capture of relocation traffic on `member`'s uplink.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(pair: &Pair, member: Member, file: std::path::PathBuf) -> Capture {
        let tcpdump = tern_testkit::find_program("tcpdump").expect("tcpdump");
        let mut cmd = std::process::Command::new(tcpdump);
        cmd.args(["-i", "eth0", "-U", "-s", "0", "-w"])
            .arg(&file)
            .args(["tcp", "port", "8002"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = pair.lab.spawn_in(member, cmd).expect("tcpdump");
        // tcpdump says "listening on …" once it captures.
        let mut stderr = child.stderr.take().expect("stderr");
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            match stderr.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => panic!("tcpdump: {}", String::from_utf8_lossy(&seen)),
            }
        }
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Capture { child, file }
    }

    /// Stops the capture; the TCP payloads it saw, per direction, in order.
    fn stop(mut self) -> Vec<Vec<u8>> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        tcp_payloads(&std::fs::read(&self.file).expect("capture file"))
    }
}

/// The TCP payloads of an Ethernet/IPv4 pcap file, concatenated per (source, destination).
fn tcp_payloads(pcap: &[u8]) -> Vec<Vec<u8>> {
    use std::collections::BTreeMap;
    let mut flows: BTreeMap<[u8; 12], Vec<u8>> = BTreeMap::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + len) else {
            break;
        };
        at += 16 + len;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        if ip[9] != 6 || total < ihl + 20 {
            continue;
        }
        let tcp = &ip[ihl..total];
        let data_offset = usize::from(tcp[12] >> 4) * 4;
        let mut key = [0u8; 12];
        key[..8].copy_from_slice(&ip[12..20]);
        key[8..].copy_from_slice(&tcp[..4]);
        if let Some(payload) = tcp.get(data_offset..) {
            flows.entry(key).or_default().extend_from_slice(payload);
        }
    }
    flows.into_values().collect()
}

/// Pieces of the test guest's kernel image that sit in its memory as they are in the file:
/// 32 bytes at each of its console strings.
fn guest_memory_patterns() -> Vec<Vec<u8>> {
    let image = std::fs::read(tern_testguest::path()).expect("test guest image");
    let needle = b"tern-guest";
    let mut patterns: Vec<Vec<u8>> = image
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| w == needle)
        .filter_map(|(i, _)| image.get(i..i + 32).map(<[u8]>::to_vec))
        .collect();
    patterns.dedup();
    assert!(!patterns.is_empty(), "no console strings in the test guest");
    patterns
}

/// How many of `patterns` occur in any of `flows`.
fn occurrences(flows: &[Vec<u8>], patterns: &[Vec<u8>]) -> usize {
    patterns
        .iter()
        .filter(|p| {
            flows
                .iter()
                .any(|f| f.windows(p.len()).any(|w| w == &p[..]))
        })
        .count()
}

#[test]
fn trusted_hosts_migrate_over_tls_and_the_wire_shows_no_guest_memory() {
    let mut pair = Pair::start();
    create_guest(&pair.h1, "s");
    let patterns = guest_memory_patterns();

    // TLS, the default: warm there, live back, while the link is captured.
    let capture = Capture::start(&pair, Member::Host2, pair.h2.dir.join("tls.pcap"));
    let there = move_guest(&pair.h1, &pair.h2, &host2(), "s", &[]);
    let back = move_guest(&pair.h2, &pair.h1, &host1(), "s", &["--live"]);
    let flows = capture.stop();
    let captured: usize = flows.iter().map(Vec::len).sum();
    assert!(captured > 4 << 20, "captured only {captured} bytes");
    assert_eq!(
        occurrences(&flows, &patterns),
        0,
        "guest memory on the wire"
    );
    for s in [&there, &back] {
        assert_eq!(s["insecure"], false, "{s}");
    }
    println!(
        "TLS: {captured} bytes captured, none of the guest's {} patterns",
        patterns.len()
    );

    // The same capture sees guest memory when both hosts run insecure: the probe works.
    pair.h1.reconfigure(Member::Host1, "", "insecure = true");
    pair.h2.reconfigure(Member::Host2, "", "insecure = true");
    // Logged as the relocation server starts, which a loaded machine may take a moment to.
    assert!(
        wait_for(Duration::from_secs(10), || pair
            .h2
            .daemon_log()
            .contains("neither authenticated nor encrypted")),
        "{}",
        pair.h2.daemon_log()
    );
    let capture = Capture::start(&pair, Member::Host2, pair.h2.dir.join("plain.pcap"));
    let out = pair
        .h1
        .tern(&["migrate", "s", &host2(), "--live", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Warning: this migration was neither authenticated nor encrypted"));
    let flows = capture.stop();
    let seen = occurrences(&flows, &patterns);
    assert!(
        seen > 0,
        "the plaintext capture shows no guest memory either"
    );
    println!(
        "plaintext: {seen} of {} patterns on the wire",
        patterns.len()
    );
    assert_runs_clean(&pair.h2, "s", 0);
}

#[test]
fn untrusted_impersonated_and_plaintext_peers_are_refused() {
    let mut pair = Pair::start();
    create_guest(&pair.h1, "u");
    let h1_key = pair.h1.fingerprint().expect("fingerprint");

    // The destination does not trust the source.
    pair.h2.ok(&["trust", "remove", "peer"]);
    assert_refused(&pair, "u", &["does not trust", &h1_key], "not trusted");
    pair.h2.ok(&["trust", "add", &h1_key, "--name", "peer"]);

    // A third daemon with a key of its own answers at host2's address (and would take the
    // guest): the source sends it nothing.
    pair.h2.kill_daemon();
    let impostor = pair
        .lab
        .start_host(
            &tern_bin(),
            Member::Host2,
            &tern_testkit::relocation_toml(Member::Host2, &[LAB_HOSTS_ALLOW]),
        )
        .expect("impostor daemon");
    impostor.run(&["trust", "add", &h1_key]).expect("trust");
    let impostor_key = impostor.fingerprint().expect("fingerprint");
    let err = pair.h1.fails(&["migrate", "u", &host2(), "--live"]);
    assert!(
        err.contains("not trusted") && err.contains(&impostor_key),
        "{err}"
    );
    let log = impostor.daemon_log();
    assert!(log.contains("refused in the TLS handshake"), "{log}");
    assert!(!log.contains("accepting"), "{log}");
    assert!(impostor.list().expect("list").is_empty());
    drop(impostor);
    pair.h2.start_daemon();
    assert_runs_clean(&pair.h1, "u", pair.h1.last_beat("u").seq);

    // Plaintext to a TLS host, then TLS to a plaintext host.
    pair.h1.reconfigure(Member::Host1, "", "insecure = true");
    assert_refused(
        &pair,
        "u",
        &["accepts only TLS", "insecure"],
        "accepts only TLS",
    );
    pair.h1.reconfigure(Member::Host1, "", "");
    pair.h2.reconfigure(Member::Host2, "", "insecure = true");
    assert_refused(
        &pair,
        "u",
        &["does not speak TLS", "insecure = true"],
        "does not speak TLS",
    );

    // Trusting each other again, they migrate.
    pair.h2.reconfigure(Member::Host2, "", "");
    move_guest(&pair.h1, &pair.h2, &host2(), "u", &["--live"]);
}

/// A pool CA and certificates it signs for the lab's hosts.
struct PoolCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: std::path::PathBuf,
}

impl PoolCa {
    fn new(dir: &Path) -> PoolCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tern test pool CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("write CA");
        PoolCa {
            issuer: rcgen::Issuer::new(params, key),
            dir: dir.to_path_buf(),
        }
    }

    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// A key and a certificate for `member`, valid from `days_from` to `days_to` days from
    /// now; the `[relocation]` lines that use them with this CA.
    fn host(&self, member: Member, label: &str, days_from: i64, days_to: i64) -> String {
        let key = rcgen::KeyPair::generate().expect("host key");
        let mut params =
            rcgen::CertificateParams::new(vec![member.ip().to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, member.name());
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86_400);
        let at = |days: i64| {
            let t = if days >= 0 {
                now + day * days as u32
            } else {
                now - day * (-days) as u32
            };
            rcgen::date_time_ymd(1970, 1, 1)
                + Duration::from_secs(
                    t.duration_since(std::time::UNIX_EPOCH)
                        .expect("time")
                        .as_secs(),
                )
        };
        params.not_before = at(days_from);
        params.not_after = at(days_to);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let cert_file = self.dir.join(format!("{label}.crt"));
        let key_file = self.dir.join(format!("{label}.key"));
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
            cert_file.display(),
            key_file.display(),
            self.ca_file().display()
        )
    }
}

#[test]
fn a_pool_ca_vouches_for_valid_certificates_only() {
    let mut pair = Pair::start();
    // No pinned keys: only the CA vouches.
    pair.h1.ok(&["trust", "remove", "peer"]);
    pair.h2.ok(&["trust", "remove", "peer"]);
    let ca = PoolCa::new(&pair.h1.dir);
    let h1_valid = ca.host(Member::Host1, "h1", -1, 365);
    let h2_valid = ca.host(Member::Host2, "h2", -1, 365);
    pair.h1.reconfigure(Member::Host1, "", &h1_valid);
    pair.h2.reconfigure(Member::Host2, "", &h2_valid);
    create_guest(&pair.h1, "p");
    move_guest(&pair.h1, &pair.h2, &host2(), "p", &["--live"]);
    move_guest(&pair.h2, &pair.h1, &host1(), "p", &[]);

    // The source's certificate has expired: the destination refuses it.
    pair.h1.reconfigure(
        Member::Host1,
        "",
        &ca.host(Member::Host1, "h1-old", -30, -1),
    );
    assert_refused(&pair, "p", &["expired"], "expired");
    pair.h1.reconfigure(Member::Host1, "", &h1_valid);

    // The destination's certificate is not valid yet: the source refuses it.
    pair.h2
        .reconfigure(Member::Host2, "", &ca.host(Member::Host2, "h2-new", 1, 365));
    let err = pair.h1.fails(&["migrate", "p", &host2(), "--live"]);
    assert!(err.contains("not valid yet"), "{err}");
    assert!(
        wait_for(Duration::from_secs(10), || pair
            .h2
            .daemon_log()
            .contains("refused in the TLS handshake")),
        "{}",
        pair.h2.daemon_log()
    );
    assert_runs_clean(&pair.h1, "p", pair.h1.last_beat("p").seq);
    pair.h2.assert_empty(&pair.lab, Member::Host2);
}

/// Adds `line` to guest config `cfg`.
fn append(cfg: &Path, line: &str) {
    let mut text = std::fs::read_to_string(cfg).expect("config");
    text.push_str(line);
    text.push('\n');
    std::fs::write(cfg, text).expect("config");
}

fn sized_file(path: &Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .expect("image");
}

/// A guest on h1 with `line` added to its config, waited for.
fn guest_with(pair: &Pair, name: &str, line: &str) {
    let cfg = pair.h1.guest_config(
        name,
        128,
        1,
        "heartbeat_ms=100 wss_mib=16 verify_ms=500 disk_mib=4",
    );
    append(&cfg, line);
    pair.h1.ok(&["create", cfg.to_str().expect("path")]);
    pair.h1.wait_heartbeat(name, 3, Duration::from_secs(30));
}

#[test]
fn an_incoming_guest_gets_only_what_the_destination_allows() {
    let mut pair = Pair::start();

    // A file outside the destination's storage; then inside it, and it moves.
    let image = pair.h1.dir.join("data.img");
    sized_file(&image, 8 << 20);
    guest_with(
        &pair,
        "f",
        &format!("disk = [ 'file:{},xvda,w' ]", image.display()),
    );
    let err = assert_refused(
        &pair,
        "f",
        &[image.to_str().expect("path"), "storage"],
        "storage",
    );
    assert!(err.contains("outside"), "{err}");
    let kernels = tern_testguest::path()
        .parent()
        .expect("dir")
        .display()
        .to_string();
    pair.h2.reconfigure(
        Member::Host2,
        "",
        &format!("storage = [\"{kernels}\", \"{}\"]", pair.h1.dir.display()),
    );
    move_guest(&pair.h1, &pair.h2, &host2(), "f", &["--live"]);
    pair.h2.ok(&["destroy", "f"]);

    // A block device the destination does not list (the same device is there: the host
    // shares it, but did not give it to incoming guests).
    let loop_image = pair.h1.dir.join("loop.img");
    sized_file(&loop_image, 8 << 20);
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&loop_image)
        .output()
        .expect("losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(device.clone());
    guest_with(&pair, "b", &format!("disk = [ 'phy:{device},xvda,w' ]"));
    assert_refused(&pair, "b", &[&device], &device);
    pair.h1.ok(&["destroy", "b"]);

    // An NBD server the destination does not list (the lab lists port 10809 only).
    let nbd_image = pair.h1.dir.join("nbd.img");
    sized_file(&nbd_image, 8 << 20);
    let nbd = tern_testkit::NbdExport::start(&pair.lab, &nbd_image, 10810).expect("NBD export");
    guest_with(
        &pair,
        "n",
        &format!(
            "disk = [ 'nbd:{}:{},xvda,w' ]",
            nbd.addr().ip(),
            nbd.addr().port()
        ),
    );
    assert_refused(&pair, "n", &["10.77.0.200:10810"], "10.77.0.200:10810");
    pair.h1.ok(&["destroy", "n"]);

    // A bridge the destination does not offer incoming guests.
    pair.h2
        .reconfigure(Member::Host2, "", "bridges = [\"br7\"]");
    guest_with(&pair, "v", "vif = [ 'mac=02:77:00:00:00:31, bridge=br0' ]");
    assert_refused(&pair, "v", &["br0"], "br0");
}

/// The daemon's thread count.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Lets this process hold `n` descriptors.
fn allow_descriptors(n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads one struct.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(r, 0, "cannot raise the descriptor limit");
}

#[test]
fn a_flood_of_idle_connections_stays_bounded() {
    const FLOOD: usize = 2000;
    allow_descriptors(4 * FLOOD as u64 + 1024);
    let pair = Pair::start();
    create_guest(&pair.h1, "d");
    let daemon = pair.h2.daemon_pid().expect("daemon pid");
    let log_lines = || pair.h2.daemon_log().lines().count();
    let lines_before = log_lines();

    // From host1, an allowed address: each connection gets as far as the TLS handshake slots.
    let addr = SocketAddr::from((Member::Host2.ip(), 8002));
    let started = Instant::now();
    let flood = pair
        .lab
        .run_in(Member::Host1, move || {
            (0..FLOOD)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()
                })
                .collect::<Vec<_>>()
        })
        .expect("flood");
    println!(
        "{} of {FLOOD} connections open in {:.1} s",
        flood.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        flood.len() > FLOOD / 2,
        "only {} connections opened",
        flood.len()
    );

    // Held open past the handshake timeout: the daemon stays small and answers.
    let mut most_threads = 0;
    while started.elapsed() < Duration::from_secs(8) {
        most_threads = most_threads.max(threads(daemon));
        let asked = Instant::now();
        pair.h2.ok(&["list"]);
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "tern list took {:?}",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(flood);
    let grew = log_lines() - lines_before;
    println!("daemon threads at most {most_threads}, log grew by {grew} lines");
    assert!(
        most_threads > 0 && most_threads < 100,
        "{most_threads} threads"
    );
    assert!(
        grew <= 300,
        "the log grew by {grew} lines:\n{}",
        pair.h2.daemon_log()
    );

    // Once the flood is over, a migration goes through.
    let before = pair.h1.last_beat("d").seq;
    pair.h1.migrate("d", &host2(), &["--live"]);
    assert_runs_clean(&pair.h2, "d", before);
}
