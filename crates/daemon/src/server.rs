//! The daemon's API on its Unix socket: one request per connection.

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use tern_api::vmm::VmmRequest;
use tern_api::{read_message, write_message, Reply, Request};
use tern_config::DomainConfig;

use crate::console;
use crate::guest_process;
use crate::registry::Registry;

/// Accepts clients forever, one thread each.
pub fn serve(listener: UnixListener, registry: Arc<Registry>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let registry = registry.clone();
                let _ = std::thread::Builder::new()
                    .name("client".into())
                    .spawn(move || handle_client(stream, &registry));
            }
            Err(e) => log::warn!("accept failed: {e}"),
        }
    }
}

fn handle_client(stream: UnixStream, registry: &Arc<Registry>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let request: Request = match read_message(&mut reader) {
        Ok(r) => r,
        Err(e) => {
            let _ = write_message(&mut writer, &Reply::error(format!("bad request: {e}")));
            return;
        }
    };
    let result = match request {
        Request::Console {
            domain,
            dump,
            timestamps,
        } => console_request(&mut writer, reader, registry, &domain, dump, timestamps),
        other => handle(registry, other, &mut writer).map(|data| {
            let _ = write_message(&mut writer, &Reply::Ok { data });
        }),
    };
    if let Err(e) = result {
        let _ = write_message(&mut writer, &Reply::error(format!("{e:#}")));
    }
}

fn console_request(
    writer: &mut UnixStream,
    reader: BufReader<UnixStream>,
    registry: &Arc<Registry>,
    domain: &str,
    dump: bool,
    timestamps: bool,
) -> anyhow::Result<()> {
    if dump {
        let dir = registry.dir_of(domain)?;
        return console::dump(writer, &dir, timestamps);
    }
    let (_, dir) = registry.find_live(domain)?;
    console::attach(writer.try_clone()?, reader, &dir)
}

/// Paths come from the CLI already made absolute; refuse anything else rather than guess a
/// working directory.
fn absolute(path: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = std::path::PathBuf::from(path);
    if !p.is_absolute() {
        anyhow::bail!("path '{path}' is not absolute");
    }
    Ok(p)
}

/// This host's pool, or why there is none.
fn in_pool(registry: &Registry) -> anyhow::Result<&Arc<crate::pool::PoolLink>> {
    registry
        .pool()
        .ok_or_else(|| anyhow::anyhow!("this host is not in a pool ([pool] in its daemon config)"))
}

fn handle(
    registry: &Arc<Registry>,
    request: Request,
    client: &mut UnixStream,
) -> anyhow::Result<serde_json::Value> {
    Ok(match request {
        Request::List => serde_json::to_value(registry.list())?,
        Request::Create { config, paused } => {
            let config: DomainConfig = serde_json::from_value(config)
                .map_err(|e| anyhow::anyhow!("malformed guest config: {e}"))?;
            let name = config.name.clone();
            let (id, uuid) = registry.create(config, paused)?;
            serde_json::json!({ "id": id, "name": name, "uuid": uuid })
        }
        Request::Pause { domain } => {
            let (_, dir) = registry.find_live(&domain)?;
            guest_process::request(&dir, &VmmRequest::Pause)?;
            serde_json::Value::Null
        }
        Request::Unpause { domain, force } => {
            let (_, dir) = registry.find_live(&domain)?;
            if let Some(message) =
                guest_process::request_warned(&dir, &VmmRequest::Unpause { force })?
            {
                log::warn!("{message}");
                let _ = write_message(client, &Reply::Warning { message });
            }
            serde_json::Value::Null
        }
        Request::Shutdown { domain, wait } => {
            registry.shutdown(&domain, wait)?;
            serde_json::Value::Null
        }
        Request::Destroy { domain } => {
            registry.destroy(&domain)?;
            serde_json::Value::Null
        }
        Request::Save {
            domain,
            path,
            keep_running,
        } => {
            let path = absolute(&path)?;
            let summary = registry.save(&domain, &path, keep_running, |p| {
                let data = serde_json::to_value(p).unwrap_or_default();
                let _ = write_message(client, &Reply::Progress { data });
            })?;
            serde_json::to_value(summary)?
        }
        Request::Restore { path, paused, copy } => {
            let path = absolute(&path)?;
            serde_json::to_value(registry.restore(&path, paused, copy)?)?
        }
        Request::Migrate {
            domain,
            destination,
            options,
        } => {
            let summary = registry.migrate(&domain, &destination, &options, |p| {
                let data = serde_json::to_value(p).unwrap_or_default();
                let _ = write_message(client, &Reply::Progress { data });
            })?;
            serde_json::to_value(summary)?
        }
        Request::CancelMigration { domain } => {
            serde_json::to_value(registry.cancel_migration(&domain)?)?
        }
        Request::Fingerprint => serde_json::json!({
            "fingerprint": registry.trust().fingerprint().to_string()
        }),
        Request::TrustAdd { fingerprint, name } => {
            let added = registry.trust().add(&fingerprint, name)?;
            serde_json::json!({ "fingerprint": added.to_string() })
        }
        Request::TrustList => serde_json::to_value(registry.trust().list())?,
        Request::TrustRemove { host } => {
            let removed = registry.trust().remove(&host)?;
            serde_json::to_value(removed)?
        }
        Request::PoolHosts => serde_json::to_value(in_pool(registry)?.hosts()?)?,
        Request::PoolGuests => serde_json::to_value(in_pool(registry)?.guests()?)?,
        Request::ResumeHost { host } => {
            in_pool(registry)?.set_maintenance_of(&host, false)?;
            serde_json::Value::Null
        }
        Request::Evacuate {
            host,
            live,
            parallel,
            dry_run,
        } => {
            let options = crate::evacuation::EvacuateOptions {
                live,
                parallel,
                dry_run,
            };
            let summary = crate::evacuation::evacuate(registry, &host, options, |event| {
                let data = serde_json::to_value(event).unwrap_or_default();
                let _ = write_message(client, &Reply::Progress { data });
            })?;
            serde_json::to_value(summary)?
        }
        Request::Console { .. } => anyhow::bail!("console requests are handled separately"),
    })
}
