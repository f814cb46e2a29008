//! Talking to the daemon.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};
use tern_api::{read_message_within, write_message, Reply, Request, MAX_REPLY};

/// A connection carrying one request.
pub struct Connection {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
}

/// Connects to the daemon at `socket` and sends `request`.
pub fn send(socket: &Path, request: &Request) -> anyhow::Result<Connection> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the tern daemon at {} (is `tern daemon` running?)",
            socket.display()
        )
    })?;
    let mut writer = stream.try_clone()?;
    write_message(&mut writer, request).context("cannot send the request")?;
    Ok(Connection {
        reader: BufReader::new(stream),
        writer,
    })
}

/// Reads replies until the final one: warnings go to stderr, `progress` is called for
/// progress reports; returns the data of `Ok`.
pub fn finish(
    conn: &mut Connection,
    mut progress: impl FnMut(&serde_json::Value),
) -> anyhow::Result<serde_json::Value> {
    loop {
        let reply: Reply = read_message_within(&mut conn.reader, MAX_REPLY)
            .context("the daemon did not answer")?;
        match reply {
            Reply::Ok { data } => return Ok(data),
            Reply::Error { message } => bail!(message),
            Reply::Warning { message } => eprintln!("Warning: {message}"),
            Reply::Progress { data } => progress(&data),
        }
    }
}

/// Sends a request and waits for its result.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let mut conn = send(socket, request)?;
    finish(&mut conn, |_| {})
}
