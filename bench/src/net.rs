//! `roost-bench net`: sandbox networking.
//!
//! 1. Hand-out time: giving a sandbox networking from the pool (policy batch + DNS forwarder on
//!    a ready namespace) vs making it fresh (namespace, veth, tap, addresses, routes, NAT
//!    table, then the same), `runs` of each, interleaved; medians and their ratio.
//! 2. Throughput: one sandbox VM (`roost net run -- roost sandbox run`) sends `mib` MiB over
//!    TCP `transfers` times to a sink behind the host (guest → virtio-net → tap → namespace
//!    NAT → host forwarding + masquerade → a namespace standing in for the internet), vs the
//!    same transfers over the host's loopback; MiB/s medians and their ratio. Needs KVM: run it
//!    inside the host VM (`roost hostvm run -- roost-bench net --json`).
//!
//! Needs root (namespaces, nftables).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_net::fixture::Internet;
use roost_net::netns::run_in;
use roost_net::{EgressPolicy, NetConfig, NetManager};
use serde::Serialize;

use crate::stats;

/// The internet stand-in's name and addresses (TEST-NET-2).
const INET_NS: &str = "rnb-inet";
const INET_HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const SINK_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SINK_PORT: u16 = 5001;
/// Bytes per write, on both sides.
const CHUNK: usize = 64 * 1024;

/// The guest-side sender: `python3 -c SENDER HOST PORT MIB TRANSFERS`.
const SENDER: &str = r#"
import socket, sys
host, port, mib, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
chunk = b"x" * 65536
for _ in range(n):
    s = socket.create_connection((host, port), timeout=60)
    for _ in range(mib * 16):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
"#;

/// What to run.
#[derive(Debug, Clone)]
pub struct NetBench {
    /// Hand-outs of each kind.
    pub runs: usize,
    /// MiB per transfer.
    pub mib: u64,
    /// Transfers each way (0: skip the throughput part).
    pub transfers: usize,
    /// The `roost` binary (for `roost net run -- roost sandbox run`).
    pub roost: PathBuf,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct NetReport {
    pub runs: usize,
    pub pool_ms_p50: f64,
    pub fresh_ms_p50: f64,
    /// fresh / pool: how much the pool saves.
    pub fresh_over_pool: f64,
    pub pool_samples_ms: Vec<f64>,
    pub fresh_samples_ms: Vec<f64>,
    pub transfer_mib: u64,
    pub tap_nat_mib_s_p50: Option<f64>,
    pub loopback_mib_s_p50: Option<f64>,
    /// tap+NAT / loopback.
    pub tap_over_loopback: Option<f64>,
    pub tap_nat_samples_mib_s: Vec<f64>,
    pub loopback_samples_mib_s: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl NetBench {
    /// `roost` next to this binary.
    pub fn default_roost() -> anyhow::Result<PathBuf> {
        let me = std::env::current_exe().context("cannot find roost-bench's own path")?;
        Ok(me.with_file_name("roost"))
    }

    /// Runs both parts.
    pub async fn run(&self) -> anyhow::Result<NetReport> {
        let (pool, fresh) = self.handouts().await?;
        let (tap, lo) = if self.transfers > 0 {
            self.throughput().await?
        } else {
            (Vec::new(), Vec::new())
        };
        let pool_p50 = stats::median(&pool).context("no samples")?;
        let fresh_p50 = stats::median(&fresh).context("no samples")?;
        let tap_p50 = stats::median(&tap);
        let lo_p50 = stats::median(&lo);
        Ok(NetReport {
            runs: self.runs,
            pool_ms_p50: pool_p50,
            fresh_ms_p50: fresh_p50,
            fresh_over_pool: fresh_p50 / pool_p50,
            pool_samples_ms: pool,
            fresh_samples_ms: fresh,
            transfer_mib: self.mib,
            tap_nat_mib_s_p50: tap_p50,
            loopback_mib_s_p50: lo_p50,
            tap_over_loopback: tap_p50.zip(lo_p50).map(|(t, l)| t / l),
            tap_nat_samples_mib_s: tap,
            loopback_samples_mib_s: lo,
        })
    }

    /// Pool hand-out vs fresh, interleaved.
    async fn handouts(&self) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let mut config = NetConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)));
        config.pool_size = 1;
        let manager = NetManager::start(config)
            .await
            .context("setting up sandbox networking (needs root)")?;
        let (mut pool, mut fresh) = (Vec::new(), Vec::new());
        let result = async {
            for run in 0..self.runs {
                manager.fill_pool().await?;
                let started = Instant::now();
                let net = manager.acquire(EgressPolicy::open()).await?;
                pool.push(ms(started.elapsed()));
                manager.release(net).await?;
                let started = Instant::now();
                let net = manager.acquire_fresh(EgressPolicy::open()).await?;
                fresh.push(ms(started.elapsed()));
                manager.release(net).await?;
                eprintln!(
                    "hand-out {}/{}: pool {:.1} ms, fresh {:.1} ms",
                    run + 1,
                    self.runs,
                    pool[run],
                    fresh[run]
                );
            }
            anyhow::Ok(())
        }
        .await;
        manager.shutdown().await?;
        result?;
        Ok((pool, fresh))
    }

    /// Guest → sink through tap + NAT, then the same over loopback.
    async fn throughput(&self) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let inet = Internet::create(INET_NS, INET_HOST_IP, &[SINK_IP]).await?;
        let result = self.throughput_with(&inet).await;
        inet.remove().await?;
        result
    }

    async fn throughput_with(&self, _inet: &Internet) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let sink = run_in(INET_NS, || TcpListener::bind((SINK_IP, SINK_PORT)))??;
        let rates = spawn_sink(sink, self.transfers);
        let mut command = tokio::process::Command::new(&self.roost);
        command
            .args([
                "net",
                "run",
                "--internet",
                "--upstream-dns",
                "127.0.0.1:53",
                "--",
            ])
            .arg(&self.roost)
            .args(["sandbox", "run", "--ready-timeout", "300", "--"])
            .args(["python3", "-c", SENDER])
            .arg(SINK_IP.to_string())
            .arg(SINK_PORT.to_string())
            .arg(self.mib.to_string())
            .arg(self.transfers.to_string())
            .kill_on_drop(true);
        let status = command
            .status()
            .await
            .with_context(|| format!("running {}", self.roost.display()))?;
        if !status.success() {
            bail!("the sandbox sender failed ({status})");
        }
        let mut tap = Vec::new();
        for _ in 0..self.transfers {
            let rate = rates
                .recv_timeout(Duration::from_secs(10))
                .context("the sink saw fewer transfers than sent")?;
            eprintln!("tap+NAT transfer: {rate:.1} MiB/s");
            tap.push(rate);
        }

        let sink = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = sink.local_addr()?;
        let rates = spawn_sink(sink, self.transfers);
        let mut lo = Vec::new();
        for _ in 0..self.transfers {
            send(addr, self.mib)?;
            let rate = rates.recv_timeout(Duration::from_secs(60))?;
            eprintln!("loopback transfer: {rate:.1} MiB/s");
            lo.push(rate);
        }
        Ok((tap, lo))
    }
}

/// Accepts `count` connections, reads each to its end and reports MiB/s (first byte to last).
fn spawn_sink(listener: TcpListener, count: usize) -> mpsc::Receiver<f64> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..count {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut total = 0u64;
            let mut first = None;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        first.get_or_insert_with(Instant::now);
                        total += n as u64;
                    }
                }
            }
            let _ = stream.write_all(b"k");
            let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
            if secs > 0.0 && tx.send(total as f64 / f64::from(1 << 20) / secs).is_err() {
                return;
            }
        }
    });
    rx
}

/// Sends `mib` MiB to `addr` in [`CHUNK`] writes, then waits for the sink's acknowledgement.
fn send(addr: SocketAddr, mib: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    let chunk = vec![b'x'; CHUNK];
    for _ in 0..mib * 16 {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack)?;
    Ok(())
}
