//! `roost-bench agent`: the in-guest agent's overhead against doing the same thing directly.
//!
//! Starts `roost-agent serve` (on loopback, acting as root, in a scratch directory) and
//! measures, interleaved with their baselines so machine noise hits both alike:
//! - the latency of an SDK-style `commands.run("true")` (a Connect `process.Process/Start`
//!   stream running `/bin/bash -l -c true`, read to its end) vs spawning `bash -lc true`;
//! - the time to write and to read a 50 MiB file through `/files` (octet-stream upload,
//!   plain download) vs `cp` of the same file.
//!
//! The agent is driven over plain HTTP/1.1 from a small blocking client (the wire format is
//! simple and this keeps the benchmark free of an async stack).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// What to measure.
#[derive(Debug, Clone)]
pub struct AgentBench {
    /// The `roost-agent` binary.
    pub agent: PathBuf,
    /// Samples of each latency measurement.
    pub runs: usize,
    /// Samples of each file transfer.
    pub file_runs: usize,
    /// Bytes per file transfer.
    pub file_bytes: usize,
}

/// Medians in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentReport {
    pub run_true_agent_ms: f64,
    pub run_true_direct_ms: f64,
    pub run_true_ratio: f64,
    /// The same without the login shell (`/bin/true` itself): the agent's own overhead.
    pub exec_true_agent_ms: f64,
    pub exec_true_direct_ms: f64,
    pub exec_true_ratio: f64,
    pub file_mib: f64,
    pub write_agent_ms: f64,
    pub read_agent_ms: f64,
    pub cp_ms: f64,
    pub write_agent_mib_s: f64,
    pub read_agent_mib_s: f64,
    pub cp_mib_s: f64,
    pub write_ratio: f64,
    pub read_ratio: f64,
}

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentBench {
    /// `roost-agent` next to this executable (target/{debug,release}).
    pub fn default_agent() -> anyhow::Result<PathBuf> {
        let me = std::env::current_exe().context("locating roost-bench")?;
        let agent = me.with_file_name("roost-agent");
        ensure!(
            agent.exists(),
            "{} not found: build it (cargo build --release -p roost-agent) or pass --agent",
            agent.display()
        );
        Ok(agent)
    }

    pub fn run(&self) -> anyhow::Result<AgentReport> {
        let scratch =
            std::env::temp_dir().join(format!("roost-bench-agent-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).context("creating the scratch directory")?;
        let result = self.run_in(&scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    fn run_in(&self, scratch: &Path) -> anyhow::Result<AgentReport> {
        let agent = self.start_agent(scratch)?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;

        let (mut via_agent, mut direct) = (Vec::new(), Vec::new());
        let (mut exec_agent, mut exec_direct) = (Vec::new(), Vec::new());
        for run in 0..self.runs + 1 {
            let a = start_via_agent(agent.addr, LOGIN_TRUE)?;
            let d = run_directly(LOGIN_TRUE)?;
            let ea = start_via_agent(agent.addr, PLAIN_TRUE)?;
            let ed = run_directly(PLAIN_TRUE)?;
            if run > 0 {
                // The first round warms caches (bash, the agent's first connection).
                via_agent.push(ms(a));
                direct.push(ms(d));
                exec_agent.push(ms(ea));
                exec_direct.push(ms(ed));
            }
        }

        let source = scratch.join("source.bin");
        write_random_file(&source, self.file_bytes)?;
        let (mut writes, mut reads, mut copies) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..self.file_runs {
            let target = scratch.join(format!("uploaded-{run}.bin"));
            writes.push(ms(upload(agent.addr, &source, &target)?));
            reads.push(ms(download(agent.addr, &target, self.file_bytes)?));
            let copy = scratch.join(format!("copied-{run}.bin"));
            copies.push(ms(copy_with_cp(&source, &copy)?));
            std::fs::remove_file(&target).ok();
            std::fs::remove_file(&copy).ok();
        }

        let median = |v: &[f64]| crate::stats::median(v).context("no samples");
        let (run_agent, run_direct) = (median(&via_agent)?, median(&direct)?);
        let (exec_agent, exec_direct) = (median(&exec_agent)?, median(&exec_direct)?);
        let (write, read, cp) = (median(&writes)?, median(&reads)?, median(&copies)?);
        let mib = self.file_bytes as f64 / (1024.0 * 1024.0);
        let rate = |ms: f64| mib / (ms / 1000.0);
        Ok(AgentReport {
            run_true_agent_ms: run_agent,
            run_true_direct_ms: run_direct,
            run_true_ratio: run_agent / run_direct,
            exec_true_agent_ms: exec_agent,
            exec_true_direct_ms: exec_direct,
            exec_true_ratio: exec_agent / exec_direct,
            file_mib: mib,
            write_agent_ms: write,
            read_agent_ms: read,
            cp_ms: cp,
            write_agent_mib_s: rate(write),
            read_agent_mib_s: rate(read),
            cp_mib_s: rate(cp),
            write_ratio: write / cp,
            read_ratio: read / cp,
        })
    }

    fn start_agent(&self, scratch: &Path) -> anyhow::Result<Agent> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&self.agent)
            .args([
                "serve",
                "--listen",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--user",
                "root",
            ])
            .arg("--root")
            .arg(scratch)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.agent.display()))?;
        let agent = Agent {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(agent.addr).is_err() {
            ensure!(
                Instant::now() < deadline,
                "the agent never listened on {}",
                agent.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }
}

/// One Connect envelope.
fn envelope(json: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(json);
    out
}

/// Sends a request with a body; returns the connection positioned after the reply headers.
fn request(
    addr: SocketAddr,
    head: &str,
    body_len: usize,
    write_body: impl FnOnce(&mut TcpStream) -> anyhow::Result<()>,
) -> anyhow::Result<BufReader<TcpStream>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        stream,
        "{head}\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {body_len}\r\n\r\n"
    )?;
    write_body(&mut stream)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    ensure!(line.starts_with("HTTP/1.1 200"), "agent replied {line:?}");
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim_end().is_empty() {
            return Ok(reader);
        }
    }
}

/// What the SDK's `commands.run("true")` starts.
const LOGIN_TRUE: (&str, &[&str]) = ("/bin/bash", &["-l", "-c", "true"]);
/// No shell at all.
const PLAIN_TRUE: (&str, &[&str]) = ("/bin/true", &[]);

fn start_via_agent(addr: SocketAddr, (cmd, args): (&str, &[&str])) -> anyhow::Result<Duration> {
    let start = serde_json::json!({"process": {"cmd": cmd, "args": args}, "stdin": false});
    let message = envelope(start.to_string().as_bytes());
    let started = Instant::now();
    let mut reply = request(
        addr,
        "POST /process.Process/Start HTTP/1.1\r\nContent-Type: application/connect+json",
        message.len(),
        |s| Ok(s.write_all(&message)?),
    )?;
    let mut body = Vec::new();
    reply.read_to_end(&mut body)?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&body);
    ensure!(
        text.contains(r#""status":"exit status 0""#),
        "`{cmd}` did not end with status 0: {text}"
    );
    Ok(elapsed)
}

fn run_directly((cmd, args): (&str, &[&str])) -> anyhow::Result<Duration> {
    let started = Instant::now();
    // Like the agent: no stdin, output captured.
    let output = Command::new(cmd).args(args).stdin(Stdio::null()).output()?;
    let elapsed = started.elapsed();
    ensure!(output.status.success(), "{cmd}: {}", output.status);
    Ok(elapsed)
}

fn write_random_file(path: &Path, bytes: usize) -> anyhow::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            // xorshift: incompressible enough, and cheap.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len());
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.sync_all()?;
    Ok(())
}

fn upload(addr: SocketAddr, source: &Path, target: &Path) -> anyhow::Result<Duration> {
    let length = usize::try_from(std::fs::metadata(source)?.len())?;
    let started = Instant::now();
    let mut reply = request(
        addr,
        &format!(
            "POST /files?path={} HTTP/1.1\r\nContent-Type: application/octet-stream",
            target.display()
        ),
        length,
        |stream| {
            std::io::copy(&mut std::fs::File::open(source)?, stream)?;
            Ok(())
        },
    )?;
    let mut body = String::new();
    reply.read_to_string(&mut body)?;
    let elapsed = started.elapsed();
    ensure!(body.contains(r#""type":"file""#), "upload reply {body}");
    Ok(elapsed)
}

fn download(addr: SocketAddr, path: &Path, expected: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut reply = request(
        addr,
        &format!("GET /files?path={} HTTP/1.1", path.display()),
        0,
        |_| Ok(()),
    )?;
    let received = std::io::copy(&mut reply, &mut std::io::sink())?;
    let elapsed = started.elapsed();
    if usize::try_from(received)? != expected {
        bail!("downloaded {received} bytes, expected {expected}");
    }
    Ok(elapsed)
}

fn copy_with_cp(source: &Path, target: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new("cp").arg(source).arg(target).status()?;
    let elapsed = started.elapsed();
    ensure!(status.success(), "cp: {status}");
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_carry_a_big_endian_length() {
        assert_eq!(envelope(b"{}"), vec![0, 0, 0, 0, 2, b'{', b'}']);
    }

    #[test]
    fn random_files_have_the_requested_size() {
        let path = std::env::temp_dir().join(format!("roost-bench-rand-{}", std::process::id()));
        write_random_file(&path, 3 * (1 << 20) + 5).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * (1 << 20) + 5);
        std::fs::remove_file(&path).unwrap();
    }
}
