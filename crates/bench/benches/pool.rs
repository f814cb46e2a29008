//! The pool's scale benchmark (issue 13): a real three-member etcd on loopback holding 1,000
//! hosts (each on its own lease, as daemons keep them) and 50,000 guest ownership records
//! (50 a host, 100 on the host to evacuate), with a real tern daemon joined to the pool.
//! Times, each the median of several runs: `tern host list --json` and `tern list --pool
//! --json` (the CLI through the daemon, which reads etcd), and planning the evacuation of the
//! host with 100 guests (reading its guests and every host, then the plan: what the daemon's
//! `tern host evacuate` does before moving anything). Records benchmarks/pool.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use tern_bench::machine_info::MachineInfo;
use tern_pool::etcd::{Op, Txn};
use tern_pool::{plan_evacuation, Admits, Etcd, GuestRecord, HostRecord, Keys, PoolView};
use tern_testkit::{EtcdCluster, TernHost};

const POOL: &str = "bench";
const HOSTS: usize = 1_000;
const GUESTS: usize = 50_000;
/// The host to evacuate, and how many guests it has.
const EVACUATED: &str = "host0000";
const EVACUATED_GUESTS: usize = 100;
const RUNS: usize = 5;
/// etcd refuses transactions of more than 128 operations; each guest is two puts.
const GUESTS_PER_TXN: usize = 64;

fn main() -> ExitCode {
    tern_bench::exit_code(run())
}

struct Figures {
    register_hosts_s: f64,
    register_guests_s: f64,
    host_list_ms: Vec<f64>,
    pool_list_ms: Vec<f64>,
    plan_ms: Vec<f64>,
    listed_hosts: usize,
    listed_guests: usize,
    planned_moves: usize,
}

fn run() -> anyhow::Result<()> {
    let tern = tern_testkit::find_tern()?;
    let etcd_cluster = EtcdCluster::local(3)?;
    let etcd = etcd_cluster.client()?;
    let keys = Keys::new(POOL);
    let t = Instant::now();
    register_hosts(&etcd, &keys)?;
    let register_hosts_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    register_guests(&etcd, &keys)?;
    let register_guests_s = t.elapsed().as_secs_f64();

    let pool_toml = etcd_cluster.pool_toml(POOL, "tern-bench-host", "127.0.0.1:8002", "");
    let host = TernHost::start_with(&tern, &std::env::temp_dir(), None, &pool_toml)?;
    let mut figures = Figures {
        register_hosts_s,
        register_guests_s,
        host_list_ms: Vec::new(),
        pool_list_ms: Vec::new(),
        plan_ms: Vec::new(),
        listed_hosts: 0,
        listed_guests: 0,
        planned_moves: 0,
    };
    for _ in 0..RUNS {
        let (ms, n) = timed_list(&host, &["host", "list", "--json"])?;
        figures.host_list_ms.push(ms);
        figures.listed_hosts = n;
        let (ms, n) = timed_list(&host, &["list", "--pool", "--json"])?;
        figures.pool_list_ms.push(ms);
        figures.listed_guests = n;
        let t = Instant::now();
        let view = PoolView {
            etcd: &etcd,
            keys: &keys,
        };
        let guests = view.guests_on(EVACUATED)?;
        let hosts = view.hosts()?;
        let plan = plan_evacuation(EVACUATED, &hosts, &guests)?;
        figures.plan_ms.push(t.elapsed().as_secs_f64() * 1e3);
        figures.planned_moves = plan.moves.len();
    }
    ensure!(
        figures.listed_hosts == HOSTS + 1,
        "listed {} hosts",
        figures.listed_hosts
    );
    ensure!(
        figures.listed_guests == GUESTS,
        "listed {} guests",
        figures.listed_guests
    );
    ensure!(
        figures.planned_moves == EVACUATED_GUESTS,
        "planned {} moves",
        figures.planned_moves
    );
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let report = report(&figures, &MachineInfo::collect(&repo));
    println!("{report}");
    std::fs::write(repo.join("benchmarks/pool.md"), &report)?;
    println!("Recorded in benchmarks/pool.md");
    Ok(())
}

fn host_name(i: usize) -> String {
    format!("host{i:04}")
}

/// Every host as its daemon would register: a lease, its record, its liveness key.
fn register_hosts(etcd: &Etcd, keys: &Keys) -> anyhow::Result<()> {
    for i in 0..HOSTS {
        let name = host_name(i);
        let record = HostRecord {
            name: name.clone(),
            address: format!("10.{}.{}.{}:8002", i / 65536, (i / 256) % 256, i % 256),
            fingerprint: Some(format!("sha256:{i:064x}")),
            memory_total_mib: 262_144,
            memory_free_mib: 262_144 - 50 * 2048,
            cpu_features: vec!["sse2".into(), "avx2".into(), "rdrand".into()],
            guests: 50,
            admits: Admits {
                incoming: true,
                storage: vec!["/srv/guests".into()],
                nbd_servers: vec![],
                bridges: Some(vec!["br0".into()]),
            },
            version: "bench".into(),
        };
        let lease = etcd.grant(600)?;
        let txn = Txn {
            when: vec![],
            then: vec![
                put(keys.host(&name), serde_json::to_vec(&record)?, 0),
                put(keys.alive(&name), Vec::new(), lease),
            ],
            otherwise: vec![],
        };
        etcd.txn(&txn)?;
    }
    Ok(())
}

/// 50,000 ownership records and their index entries, in transactions of 64 guests.
fn register_guests(etcd: &Etcd, keys: &Keys) -> anyhow::Result<()> {
    let owner = |g: usize| {
        if g < EVACUATED_GUESTS {
            0
        } else {
            1 + (g - EVACUATED_GUESTS) % (HOSTS - 1)
        }
    };
    let mut ops = Vec::new();
    for g in 0..GUESTS {
        let host = host_name(owner(g));
        let record = GuestRecord {
            uuid: format!("{g:08x}-0000-4000-8000-{g:012x}"),
            name: format!("guest{g:05}"),
            host: host.clone(),
            memory_mib: 2048,
            vcpus: 2,
            cpu_features: vec!["sse2".into(), "avx2".into()],
            needs: tern_pool::Needs {
                files: vec![format!("/srv/guests/guest{g:05}.img")],
                nbd_servers: vec![],
                bridges: vec!["br0".into()],
            },
            handover: None,
        };
        let value = serde_json::to_vec(&record)?;
        ops.push(put(keys.guest(&record.uuid), value.clone(), 0));
        ops.push(put(keys.on(&host, &record.uuid), value, 0));
        if ops.len() == 2 * GUESTS_PER_TXN || g + 1 == GUESTS {
            let txn = Txn {
                when: vec![],
                then: std::mem::take(&mut ops),
                otherwise: vec![],
            };
            etcd.txn(&txn)?;
        }
    }
    Ok(())
}

fn put(key: String, value: Vec<u8>, lease: i64) -> Op {
    Op::Put { key, value, lease }
}

/// Runs a listing command; its time (ms) and how many entries it listed.
fn timed_list(host: &TernHost, args: &[&str]) -> anyhow::Result<(f64, usize)> {
    let t = Instant::now();
    let out = host.output(args)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "tern {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let list: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("a JSON list")?;
    Ok((ms, list.len()))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn report(f: &Figures, info: &MachineInfo) -> String {
    let row = |what: &str, v: &[f64], n: String| {
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("| {what} | {n} | {:.0} ms | {max:.0} ms |\n", median(v))
    };
    let mut s = String::from("# Pool scale benchmark\n\n");
    s += "`cargo bench -p tern-bench --bench pool`: a three-member etcd (Debian's etcd 3.4, on \
          loopback, data on tmpfs) holding 1,000 hosts, each on its own lease, and 50,000 guest \
          ownership records with their per-host index (50 guests a host, 100 on the host \
          evacuated). The listings go through the real CLI and a tern daemon joined to the pool; \
          planning is what `tern host evacuate` does before moving anything.\n\n";
    s += &format!(
        "Registering: 1,000 hosts (a lease and two keys each) in {:.1} s, 50,000 guests (in \
         transactions of {GUESTS_PER_TXN}) in {:.1} s.\n\n",
        f.register_hosts_s, f.register_guests_s
    );
    s += &format!("| operation | listed | median of {RUNS} | slowest |\n|---|---|---|---|\n");
    s += &row(
        "`tern host list --json`",
        &f.host_list_ms,
        format!("{} hosts", f.listed_hosts),
    );
    s += &row(
        "`tern list --pool --json`",
        &f.pool_list_ms,
        format!("{} guests", f.listed_guests),
    );
    s += &row(
        "planning the evacuation of a host with 100 guests",
        &f.plan_ms,
        format!("{} moves", f.planned_moves),
    );
    s += &format!("\n{}\n", info.markdown());
    s
}
