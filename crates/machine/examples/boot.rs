//! Boots a kernel with the console on stdout: `cargo run --example boot -- KERNEL MIB VCPUS SECS CMDLINE`.
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = tern_machine::MachineConfig {
        kernel: args[1].clone().into(),
        mem_mib: args[2].parse().unwrap(),
        vcpus: args[3].parse().unwrap(),
        initrd: None,
        cmdline: args.get(5).cloned().unwrap_or_default(),
        hidden_cpu_features: Vec::new(),
    };
    let secs: u64 = args[4].parse().unwrap();
    let t = Instant::now();
    let mut m =
        tern_machine::Machine::new(&config, Box::new(std::io::stdout()), Vec::new()).unwrap();
    eprintln!("built in {:?}", t.elapsed());
    m.start(false).unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if let Some(e) = m.next_event(Duration::from_millis(100)) {
            eprintln!("event: {e:?}");
            break;
        }
    }
    eprintln!("cpu time {} ms", m.cpu_time_ns() / 1_000_000);
}
