//! `tern console`: dumping a domain's console log, or proxying a live console stream between
//! the client and the guest process.

use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use anyhow::Context;
use tern_api::vmm::VmmRequest;
use tern_api::{write_message, Reply};
use tern_vmm::record::DomainDir;

use crate::guest_process::Control;

/// Sends the whole console log: an `Ok` with its length, then the bytes.
pub fn dump(client: &mut UnixStream, dir: &DomainDir, timestamps: bool) -> anyhow::Result<()> {
    let log = tern_vmm::console_log::read_log(dir.path(), timestamps)
        .context("cannot read the console log")?;
    write_message(
        client,
        &Reply::ok(&serde_json::json!({ "bytes": log.len() })),
    )?;
    client.write_all(&log)?;
    Ok(())
}

/// Connects the client to the live console until the guest leaves or the client goes.
pub fn attach(
    client: UnixStream,
    client_input: BufReader<UnixStream>,
    dir: &DomainDir,
) -> anyhow::Result<()> {
    let mut control = Control::connect(dir)?;
    control.expect_ok(&VmmRequest::Console)?;
    let (guest_out, guest_in) = control.into_parts();
    guest_out.get_ref().set_read_timeout(None)?;
    guest_in.set_write_timeout(None)?;
    let mut client_out = client;
    write_message(&mut client_out, &Reply::ok(&serde_json::Value::Null))?;

    // Guest output to the client; when the guest leaves, the client's stream ends too.
    let to_client = client_out.try_clone()?;
    let out_thread = std::thread::spawn(move || {
        let mut src = guest_out;
        let mut dst = to_client;
        let _ = copy(&mut src, &mut dst);
        let _ = dst.shutdown(Shutdown::Both);
    });
    // Client input to the guest; at its end only our writing side closes, output goes on.
    let mut src = client_input;
    let mut dst = guest_in;
    let _ = copy(&mut src, &mut dst);
    let _ = dst.shutdown(Shutdown::Write);
    let _ = out_thread.join();
    let _ = dst.shutdown(Shutdown::Both);
    Ok(())
}

fn copy(src: &mut impl Read, dst: &mut impl Write) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all(&buf[..n])?;
        dst.flush()?;
    }
}
