//! `tern-testnet up|down|status`: the lab of `tern-testkit`'s `NetLab` under fixed names
//! (`tern-host1..3`, `tern-client`, `tern-storage`, `tern-etcd1..3`, `tern-switch`), for manual use
//! and the README demo. `scripts/testnet` runs this; tests build their own labs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tern_testkit::{find_program, EtcdCluster, Member, NetLab, FIXED_PREFIX, GUEST_BRIDGE};

const USAGE: &str = "usage: tern-testnet up|down|status [--prefix NAME]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, prefix) = match args.as_slice() {
        [cmd] => (cmd.as_str(), FIXED_PREFIX),
        [cmd, flag, prefix] if flag == "--prefix" => (cmd.as_str(), prefix.as_str()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd {
        "up" => up(prefix),
        "down" => NetLab::down_persistent(prefix).map(|()| {
            let _ = std::fs::remove_dir_all(etcd_dir(prefix));
            println!("lab {prefix} is down");
            true
        }),
        "status" => status(prefix),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where the lab's etcd keeps its data, certificates and logs.
fn etcd_dir(prefix: &str) -> PathBuf {
    PathBuf::from("/run/tern-testnet").join(format!("{prefix}-etcd"))
}

fn up(prefix: &str) -> anyhow::Result<bool> {
    let lab = NetLab::up_persistent(prefix)?;
    println!("lab {prefix} is up: one layer-2 segment 10.77.0.0/24; guests 10.77.0.10 and up");
    print!("{}", lab.describe());
    println!(
        "hosts' guests join bridge {GUEST_BRIDGE} in their namespace; run things with \
         `ip netns exec {} …`",
        lab.ns(Member::Client)
    );
    let etcd = EtcdCluster::in_lab_kept(&lab, &etcd_dir(prefix))?;
    println!(
        "etcd (3 members, TLS with client certificates) at {}; a host joins pool \"lab\" with:",
        etcd.endpoints().join(", ")
    );
    print!(
        "{}",
        etcd.pool_toml("lab", "host1", &format!("{}:8002", Member::Host1.ip()), "")
    );
    Ok(true)
}

fn status(prefix: &str) -> anyhow::Result<bool> {
    let lab = match NetLab::open_persistent(prefix) {
        Ok(lab) => lab,
        Err(e) => {
            println!("{e:#}");
            return Ok(false);
        }
    };
    print!("{}", lab.describe());
    if find_program("ping").is_none() {
        println!("(ping is not installed: reachability not checked)");
        return Ok(true);
    }
    let etcd = EtcdCluster::in_lab_kept_if_up(&lab, &etcd_dir(prefix));
    let mut all = etcd.as_ref().is_some_and(EtcdCluster::answers);
    println!(
        "etcd            {}",
        if all { "answering" } else { "NOT ANSWERING" }
    );
    for to in [Member::Host1, Member::Host2, Member::Host3, Member::Storage] {
        let ok = lab
            .ping(Member::Client, to.ip(), 1, Duration::from_millis(200))
            .is_ok_and(|r| r.received == 1);
        all &= ok;
        println!(
            "client -> {:<8} {}",
            to.name(),
            if ok { "reachable" } else { "UNREACHABLE" }
        );
    }
    Ok(all)
}
