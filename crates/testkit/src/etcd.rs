//! A real etcd cluster for pool tests and benchmarks: Debian's `etcd` binary, members on
//! loopback ([`EtcdCluster::local`]) or in the lab's `etcd1..3` namespaces with TLS and client
//! certificates ([`EtcdCluster::in_lab`]). Data lives on tmpfs (`/dev/shm`): etcd syncs every
//! write, and the tests measure tern, not the disk. Dropping the cluster kills its members.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cmd::ensure_program;
use crate::netlab::{Member, NetLab};
use crate::netns::enter_netns;

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// How long a new cluster may take to elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct EtcdMember {
    name: String,
    ip: String,
    client_port: u16,
    peer_port: u16,
    netns: Option<String>,
    child: Option<Child>,
}

/// Certificates of a TLS cluster: a CA, each member's server certificate, one client
/// certificate the hosts share.
pub struct EtcdCerts {
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Where a cluster keeps its data, certificates and logs.
enum DataDir {
    /// Removed with the cluster.
    Scratch(tempfile::TempDir),
    /// Kept, with the members running, after this value is gone (`scripts/testnet`'s lab).
    Kept(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Scratch(d) => d.path(),
            DataDir::Kept(p) => p,
        }
    }
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    dir: DataDir,
    certs: Option<EtcdCerts>,
    token: String,
    /// Where clients reach the members from (a lab's client namespace), if not from here.
    client_ns: Option<String>,
}

impl EtcdCluster {
    /// `n` members on 127.0.0.1 at free ports, plaintext.
    pub fn local(n: usize) -> anyhow::Result<EtcdCluster> {
        let mut members = Vec::new();
        for i in 1..=n {
            members.push(EtcdMember {
                name: format!("etcd{i}"),
                ip: "127.0.0.1".into(),
                client_port: free_port()?,
                peer_port: free_port()?,
                netns: None,
                child: None,
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("tern-etcd-")
            .tempdir_in(shm())
            .context("cannot create a directory for etcd")?;
        EtcdCluster::start(members, DataDir::Scratch(dir), false, None)
    }

    /// Three members in the lab's `etcd1..3` namespaces, clients with TLS and certificates.
    pub fn in_lab(lab: &NetLab) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("tern-etcd-")
            .tempdir_in(shm())
            .context("cannot create a directory for etcd")?;
        EtcdCluster::start(
            lab_members(lab),
            DataDir::Scratch(dir),
            true,
            Some(lab.ns(Member::Client).to_string()),
        )
    }

    /// The lab's cluster kept in `dir` that outlives this value (for `scripts/testnet`): the
    /// running one if it answers, else started (again) with its data there.
    pub fn in_lab_kept(lab: &NetLab, dir: &Path) -> anyhow::Result<EtcdCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some(cluster) = EtcdCluster::in_lab_kept_if_up(lab, dir) {
            if cluster.answers() {
                return Ok(cluster);
            }
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir)?;
        }
        EtcdCluster::start(
            lab_members(lab),
            DataDir::Kept(dir.to_path_buf()),
            true,
            Some(lab.ns(Member::Client).to_string()),
        )
    }

    /// The lab's kept cluster in `dir`, if it was started (whether it answers or not).
    pub fn in_lab_kept_if_up(lab: &NetLab, dir: &Path) -> Option<EtcdCluster> {
        dir.join("ca.pem").exists().then(|| EtcdCluster {
            members: lab_members(lab),
            dir: DataDir::Kept(dir.to_path_buf()),
            certs: Some(certs_in(dir)),
            token: KEPT_TOKEN.into(),
            client_ns: Some(lab.ns(Member::Client).to_string()),
        })
    }

    /// Whether the cluster answers a read now.
    pub fn answers(&self) -> bool {
        self.run_client(|c| c.get("/tern-ready").is_ok())
            .unwrap_or(false)
    }
}

/// The token of a kept cluster.
const KEPT_TOKEN: &str = "tern-lab";

/// The certificates [`make_certs`] wrote in `dir`.
fn certs_in(dir: &Path) -> EtcdCerts {
    EtcdCerts {
        ca_file: dir.join("ca.pem"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

/// The lab's three members.
fn lab_members(lab: &NetLab) -> Vec<EtcdMember> {
    Member::ETCD
        .iter()
        .map(|m| EtcdMember {
            name: m.name().to_string(),
            ip: m.ip().to_string(),
            client_port: CLIENT_PORT,
            peer_port: PEER_PORT,
            netns: Some(lab.ns(*m).to_string()),
            child: None,
        })
        .collect()
}

impl EtcdCluster {
    fn start(
        members: Vec<EtcdMember>,
        dir: DataDir,
        tls: bool,
        client_ns: Option<String>,
    ) -> anyhow::Result<EtcdCluster> {
        ensure_program("etcd", "etcd-server")?;
        let certs = if tls {
            let ips: Vec<String> = members.iter().map(|m| m.ip.clone()).collect();
            Some(make_certs(dir.path(), &ips)?)
        } else {
            None
        };
        let token = match dir {
            DataDir::Kept(_) => KEPT_TOKEN.to_string(),
            DataDir::Scratch(_) => format!("tern-test-{}", std::process::id()),
        };
        let mut cluster = EtcdCluster {
            members,
            dir,
            certs,
            token,
            client_ns,
        };
        for i in 0..cluster.members.len() {
            cluster.start_member(i)?;
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// The client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| self.client_url(m)).collect()
    }

    /// TLS material, for a TLS cluster.
    pub fn certs(&self) -> Option<&EtcdCerts> {
        self.certs.as_ref()
    }

    /// A daemon config's `[pool]` table joining pool `pool` as host `host`, whose relocation
    /// server others reach at `address`; `lines` are added.
    pub fn pool_toml(&self, pool: &str, host: &str, address: &str, lines: &str) -> String {
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let mut table = format!(
            "[pool]\nname = \"{pool}\"\nhost = \"{host}\"\naddress = \"{address}\"\n\
             endpoints = [{}]\n",
            endpoints.join(", ")
        );
        if let Some(c) = &self.certs {
            table += &format!(
                "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                c.ca_file.display(),
                c.client_cert.display(),
                c.client_key.display()
            );
        }
        table + lines + "\n"
    }

    /// Kills member `i` (0-based) at once.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members.get_mut(i).and_then(|m| m.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again (after [`EtcdCluster::kill`]), with its data.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.start_member(i)
    }

    /// A client of this cluster (for a lab's, to be used in its namespaces: see
    /// [`EtcdCluster::run_client`]).
    pub fn client(&self) -> anyhow::Result<tern_pool::Etcd> {
        let tls = match &self.certs {
            Some(c) => Some(tern_pool::EtcdTls {
                ca_pem: std::fs::read(&c.ca_file)?,
                client: Some((
                    std::fs::read(&c.client_cert)?,
                    std::fs::read(&c.client_key)?,
                )),
            }),
            None => None,
        };
        Ok(tern_pool::Etcd::new(
            &self.endpoints(),
            tls.as_ref(),
            Duration::from_secs(5),
        )?)
    }

    /// Runs `f` with a client where the members can be reached (a lab's client namespace).
    pub fn run_client<T: Send>(
        &self,
        f: impl FnOnce(&tern_pool::Etcd) -> T + Send,
    ) -> anyhow::Result<T> {
        let client = self.client()?;
        match &self.client_ns {
            Some(ns) => crate::netns::run_in_netns(ns, || f(&client)),
            None => Ok(f(&client)),
        }
    }

    fn client_url(&self, m: &EtcdMember) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}:{}", m.ip, m.client_port)
    }

    fn peer_url(m: &EtcdMember) -> String {
        format!("http://{}:{}", m.ip, m.peer_port)
    }

    fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, Self::peer_url(m)))
            .collect();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))?;
        let client = self.client_url(m);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &Self::peer_url(m)])
            .args(["--initial-advertise-peer-urls", &Self::peer_url(m)])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(c) = &self.certs {
            cmd.arg("--cert-file")
                .arg(self.dir.path().join(format!("{}.crt", m.name)))
                .arg("--key-file")
                .arg(self.dir.path().join(format!("{}.key", m.name)))
                .arg("--trusted-ca-file")
                .arg(&c.ca_file)
                .arg("--client-cert-auth");
        }
        if let Some(ns) = &m.netns {
            enter_netns(&mut cmd, ns)?;
        }
        if let DataDir::Kept(_) = self.dir {
            // Out of the terminal's job control: it outlives the command that started it.
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd.spawn().context("cannot start etcd")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until the cluster answers a read (it has a leader).
    fn wait_ready(&self) -> anyhow::Result<()> {
        let ok = crate::wait_for(READY_TIMEOUT, || {
            self.run_client(|c| c.get("/tern-ready").is_ok())
                .unwrap_or(false)
        });
        if !ok {
            let logs: Vec<String> = self
                .members
                .iter()
                .map(|m| {
                    let log =
                        std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                            .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    format!("{}: {}", m.name, tail.join(" | "))
                })
                .collect();
            bail!(
                "etcd did not come up within {READY_TIMEOUT:?}: {}",
                logs.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if let DataDir::Kept(_) = self.dir {
            // Reaped by nobody: the lab's teardown kills whatever runs in its namespaces.
            for m in &mut self.members {
                m.child.take();
            }
            return;
        }
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// tmpfs, where there is one.
fn shm() -> &'static Path {
    if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A CA, a server certificate for each member address (`etcdN.crt`), a client certificate.
fn make_certs(dir: &Path, ips: &[String]) -> anyhow::Result<EtcdCerts> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tern test etcd CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    let issue = |label: &str, names: Vec<String>| -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, label);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        let (c, k) = (
            dir.join(format!("{label}.crt")),
            dir.join(format!("{label}.key")),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    };
    for (i, ip) in ips.iter().enumerate() {
        issue(&format!("etcd{}", i + 1), vec![ip.clone()])?;
    }
    let (client_cert, client_key) = issue("client", vec!["tern-host".into()])?;
    Ok(EtcdCerts {
        ca_file,
        client_cert,
        client_key,
    })
}
