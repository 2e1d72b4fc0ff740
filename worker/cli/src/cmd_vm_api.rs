//! `roost vm api SOCKET REQUEST`: sends one request line to a running VMM's API socket
//! (`roost vm run --api-socket`), prints the reply line, and exits 0 when the reply says
//! `"ok":true`, 1 otherwise — a shell-friendly client for scripts and tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use roost_vmm::api::{Reply, Request};

/// Send one request to a VMM's API socket and print the reply (exit 0 when it says ok).
#[derive(clap::Args, Debug)]
pub struct VmApiArgs {
    /// The VMM's API socket (`roost vm run --api-socket`).
    pub socket: PathBuf,
    /// The request as JSON, e.g. '{"op":"pause"}' or
    /// '{"op":"snapshot","dir":"/abs/dir","kind":"full","resume":true}'.
    pub request: String,
    /// Give up waiting for the reply after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub fn run(args: VmApiArgs) -> anyhow::Result<i32> {
    let request: Request = serde_json::from_str(&args.request)
        .context("the request is not a VMM API request (see `roost_vmm::api`)")?;
    let mut stream = UnixStream::connect(&args.socket)
        .with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(args.timeout.max(1))))?;
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    stream.write_all(&line).context("cannot send the request")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("no reply from the VMM")?;
    if reply.is_empty() {
        bail!("the VMM closed the API connection without replying");
    }
    print!("{reply}");
    let parsed: Reply = serde_json::from_str(reply.trim_end()).context("malformed reply")?;
    Ok(if parsed.ok { 0 } else { 1 })
}
