//! `tern`: the command-line tool (the role of `xm`), the daemon (`tern daemon`) and the guest
//! process (`tern vmm`, started by the daemon) in one executable.

mod checkpoint;
mod client;
mod console;
mod migrate;
mod pool;
mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern_api::{DomainInfo, MigrateOptions, Request, DEFAULT_MAX_DOWNTIME_MS};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Run, save, restore and migrate KVM guests"
)]
struct Cli {
    /// The daemon's socket.
    #[arg(
        long,
        global = true,
        env = "TERN_SOCKET",
        default_value = "/run/tern/ternd.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon that owns this host's guests.
    Daemon {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create and start a guest from an xl-style config file.
    Create {
        file: PathBuf,
        /// Leave the guest paused.
        #[arg(short, long)]
        paused: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the guests of this host (with --pool: every guest of its pool and its host).
    List {
        #[arg(long)]
        pool: bool,
        #[arg(long)]
        json: bool,
    },
    /// The hosts of this host's pool.
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Attach to a guest's serial console (Ctrl-] detaches).
    Console {
        domain: String,
        /// Print everything the guest wrote on this host so far, then exit.
        #[arg(long)]
        dump: bool,
        /// Prefix each line with the host time (Unix seconds) at which it arrived.
        #[arg(long)]
        timestamps: bool,
    },
    /// Stop a guest's vCPUs.
    Pause { domain: String },
    /// Let a paused guest run again.
    Unpause {
        domain: String,
        /// Run it here even if its last migration's outcome is unresolved (the destination
        /// may have it running): the guest may then run on two hosts if the destination also
        /// runs it. Stops asking the destination. Also runs the copy a post-copy migration
        /// left here when the destination lost the guest (its disks may have moved on).
        #[arg(long)]
        force: bool,
    },
    /// Ask a guest to power off (ACPI power button).
    Shutdown {
        domain: String,
        /// Wait until it has shut down.
        #[arg(short, long)]
        wait: bool,
    },
    /// Stop a guest at once and forget it.
    Destroy { domain: String },
    /// Write a running guest's whole state to FILE; the guest stops afterwards.
    Save {
        domain: String,
        file: PathBuf,
        /// Leave the guest running after the checkpoint (like `xl save -c`).
        #[arg(short = 'c', long)]
        keep_running: bool,
        #[arg(long)]
        json: bool,
    },
    /// Bring a guest back from a checkpoint FILE.
    Restore {
        file: PathBuf,
        /// Restore without starting it.
        #[arg(short, long)]
        paused: bool,
        /// Load all memory before the guest runs, instead of on demand.
        #[arg(long)]
        copy: bool,
        #[arg(long)]
        json: bool,
    },
    /// Move a running guest to the daemon whose relocation server listens at HOST[:PORT]
    /// (Ctrl-C cancels it until the handover); or, with --cancel, cancel its migration.
    Migrate {
        domain: String,
        /// HOST or HOST:PORT (port 8002 unless given).
        #[arg(required_unless_present = "cancel")]
        destination: Option<String>,
        /// Cancel the guest's migration under way (from any terminal): before the handover the
        /// guest stays here as it was and the destination removes what it built.
        #[arg(long, conflicts_with_all = ["destination", "live", "resource", "max_downtime", "force", "postcopy", "copy_storage", "remove_source_images"])]
        cancel: bool,
        /// Copy memory while the guest runs; pause it only for the last pages.
        #[arg(short, long)]
        live: bool,
        /// Cap the transfer rate, in megabits per second.
        #[arg(short, long, value_name = "MBIT", value_parser = clap::value_parser!(u64).range(1..))]
        resource: Option<u64>,
        /// Longest pause of a live migration, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = DEFAULT_MAX_DOWNTIME_MS)]
        max_downtime: u64,
        /// Migrate it even if its last migration's outcome is unresolved (the earlier
        /// destination may have it running): the guest may then run on two hosts if the
        /// destination also runs it. It arrives paused.
        #[arg(long)]
        force: bool,
        /// Post-copy: after a short pre-copy, run the guest on the destination at once and
        /// bring the rest of its memory after it (on demand first). Never slows the guest
        /// down; if the destination dies before every page arrived, the guest's state since
        /// the handover is lost (its last whole copy stays paused here).
        #[arg(long, requires = "live")]
        postcopy: bool,
        /// Copy the guest's file: disks too, for hosts that share no storage: the destination
        /// places them in its storage directory; this host's images stay where they are.
        #[arg(long, conflicts_with = "postcopy")]
        copy_storage: bool,
        /// With --copy-storage: once the guest runs on the destination, remove its images here.
        #[arg(long, requires = "copy_storage")]
        remove_source_images: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print this host's relocation key fingerprint, for `tern trust add` on other hosts.
    Fingerprint {
        #[arg(long)]
        json: bool,
    },
    /// Manage the hosts this host trusts to migrate guests to and from it.
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// The process of one guest (started by the daemon).
    #[command(hide = true)]
    Vmm {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum HostCommand {
    /// List the pool's hosts: state, memory, guests.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Move every guest of HOST (from any host of the pool: HOST's daemon does it) to the
    /// pool's other hosts, as planned
    /// from their free memory, CPU features and what they let in; HOST stays in maintenance
    /// (no guest is placed on it) until `tern host resume`. Refused, moving nothing, if the
    /// other hosts cannot take every guest. Run again after an interruption, it moves what is
    /// left.
    Evacuate {
        host: String,
        /// Migrate live (the guests keep running while their memory is copied).
        #[arg(short, long)]
        live: bool,
        /// How many guests move at a time.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        parallel: u32,
        /// Print the plan; move nothing, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// End HOST's maintenance: guests may be placed on it again.
    Resume { host: String },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Trust the host with this key fingerprint (`sha256:…`, from `tern fingerprint` there).
    Add {
        fingerprint: String,
        /// A name to list it under and remove it by.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the trusted hosts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting a host, by fingerprint or name.
    Remove { host: String },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("Error: {}", first.trim_start_matches("error: "));
            eprintln!("(see `tern --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli.socket.as_path();
    if !matches!(cli.command, Command::Daemon { .. } | Command::Vmm { .. }) {
        stop_quietly_on_closed_output();
    }
    match cli.command {
        Command::Daemon { config } => {
            let config = tern_config::load_daemon_config(&config)?;
            tern_daemon::run(config)?;
        }
        Command::Vmm { dir } => return Ok(ExitCode::from(tern_vmm::run(&dir) as u8)),
        Command::Create { file, paused, json } => create(socket, &file, paused, json)?,
        Command::List { pool: true, json } => pool::pool_list(socket, json)?,
        Command::List { pool: false, json } => list(socket, json)?,
        Command::Host { command } => match command {
            HostCommand::List { json } => pool::host_list(socket, json)?,
            HostCommand::Resume { host } => pool::resume(socket, &host)?,
            HostCommand::Evacuate {
                host,
                live,
                parallel,
                dry_run,
                json,
            } => {
                if !pool::evacuate(socket, &host, live, parallel, dry_run, json)? {
                    return Ok(ExitCode::FAILURE);
                }
            }
        },
        Command::Console {
            domain,
            dump,
            timestamps,
        } => {
            if dump {
                console::dump(socket, &domain, timestamps)?;
            } else {
                console::attach(socket, &domain, timestamps)?;
            }
        }
        Command::Pause { domain } => {
            client::call(socket, &Request::Pause { domain })?;
        }
        Command::Unpause { domain, force } => {
            client::call(socket, &Request::Unpause { domain, force })?;
        }
        Command::Shutdown { domain, wait } => {
            client::call(socket, &Request::Shutdown { domain, wait })?;
        }
        Command::Destroy { domain } => {
            client::call(socket, &Request::Destroy { domain })?;
        }
        Command::Save {
            domain,
            file,
            keep_running,
            json,
        } => checkpoint::save(socket, &domain, &file, keep_running, json)?,
        Command::Restore {
            file,
            paused,
            copy,
            json,
        } => checkpoint::restore(socket, &file, paused, copy, json)?,
        Command::Migrate {
            domain,
            destination,
            cancel,
            live,
            resource,
            max_downtime,
            force,
            postcopy,
            copy_storage,
            remove_source_images,
            json,
        } => match destination {
            _ if cancel => migrate::cancel(socket, &domain, json)?,
            Some(destination) => {
                let options = MigrateOptions {
                    live,
                    resource_mbit: resource,
                    max_downtime_ms: max_downtime,
                    force,
                    postcopy,
                    copy_storage,
                    remove_source_images,
                };
                migrate::migrate(socket, &domain, &destination, options, json)?
            }
            None => anyhow::bail!("tern migrate needs a destination (or --cancel)"),
        },
        Command::Fingerprint { json } => {
            let data = client::call(socket, &Request::Fingerprint)?;
            if json {
                println!("{data}");
            } else {
                println!("{}", data["fingerprint"].as_str().unwrap_or(""));
            }
        }
        Command::Trust { command } => trust(socket, command)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn trust(socket: &Path, command: TrustCommand) -> anyhow::Result<()> {
    match command {
        TrustCommand::Add { fingerprint, name } => {
            let data = client::call(socket, &Request::TrustAdd { fingerprint, name })?;
            println!("Trusting {}", data["fingerprint"].as_str().unwrap_or(""));
        }
        TrustCommand::Remove { host } => {
            let data = client::call(socket, &Request::TrustRemove { host })?;
            println!(
                "No longer trusting {}",
                data["fingerprint"].as_str().unwrap_or("")
            );
        }
        TrustCommand::List { json } => {
            let data = client::call(socket, &Request::TrustList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
                return Ok(());
            }
            println!("{:<72} {:<20} Source", "Fingerprint", "Name");
            for entry in data.as_array().into_iter().flatten() {
                let row = format!(
                    "{:<72} {:<20} {}",
                    entry["fingerprint"].as_str().unwrap_or(""),
                    entry["name"].as_str().unwrap_or(""),
                    entry["source"].as_str().unwrap_or("")
                );
                println!("{}", row.trim_end());
            }
        }
    }
    Ok(())
}

/// A command whose output is cut short (`tern list | head -1`) ends there, as Unix tools do,
/// instead of failing on the write. Not for the daemon and the guest process: for them a
/// closed socket is an error to handle, not a reason to die.
fn stop_quietly_on_closed_output() {
    // SAFETY: restoring the default disposition of SIGPIPE has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn create(socket: &Path, file: &Path, paused: bool, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read config file {}", file.display()))?;
    let base = file
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let parsed = tern_config::parse_domain_config(&text, base.as_deref())
        .with_context(|| format!("{}", file.display()))?;
    for w in &parsed.warnings {
        eprintln!("Warning: {}: {w}", file.display());
    }
    let request = Request::Create {
        config: serde_json::to_value(&parsed.config)?,
        paused,
    };
    let data = client::call(socket, &request)?;
    if json {
        println!("{data}");
    } else {
        let id = data.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
        println!("Started domain {} (id={id})", parsed.config.name);
    }
    Ok(())
}

fn list(socket: &Path, json: bool) -> anyhow::Result<()> {
    let data = client::call(socket, &Request::List)?;
    let domains: Vec<DomainInfo> =
        serde_json::from_value(data).context("the daemon sent a malformed list")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&domains)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>5} {:>8} {:>5} {:<9} {:>9}  Note",
        "Name", "ID", "Mem(MiB)", "VCPUs", "State", "Time(s)"
    );
    for d in domains {
        let row = format!(
            "{:<32} {:>5} {:>8} {:>5} {:<9} {:>9.1}  {}",
            d.name,
            d.id,
            d.memory_mib,
            d.vcpus,
            d.state.as_str(),
            d.cpu_time_s,
            d.note.as_deref().unwrap_or("")
        );
        println!("{}", row.trim_end());
    }
    Ok(())
}
