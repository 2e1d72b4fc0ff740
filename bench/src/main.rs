//! `roost-bench`: Roost's benchmarks. Each scenario prints progress on stderr and, as its last
//! line on stdout, one JSON object with its figures.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use roost_bench::agent::AgentBench;
use roost_bench::control::{ControlBench, PlacementKind};
use roost_bench::guest_boot::{Accel, GuestImages, QemuMicrovm};
use roost_bench::hostvm::HostVmBench;
use roost_bench::net::NetBench;
use roost_bench::stats;
use roost_bench::vmm_boot::RoostVmm;

#[derive(Parser, Debug)]
#[command(name = "roost-bench", version, about = "Roost benchmarks")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Boot the guest kernel + a rootfs image N times to roost-agent's ready line (needs a
    /// usable KVM: run it inside the host VM with `roost hostvm run -- roost-bench guest-boot`).
    GuestBoot(GuestBootArgs),
    /// Boot the host VM N times, each running one nested guest boot: host-VM boot time and
    /// host-VM start → the nested guest's ready line (run on the machine itself, not inside).
    Hostvm(HostvmArgs),
    /// Boot the same kernel and image N times each under roost-vmm (`roost vm run`) and QEMU
    /// microvm, interleaved, to roost-agent's ready line; report medians, their ratio and the
    /// VMM's own RSS (run inside the host VM: `roost hostvm run -- roost-bench boot --json`).
    Boot(BootArgs),
    /// roost-agent's envd API vs doing the same directly: `commands.run("true")` latency vs
    /// `bash -lc true`, and 50 MiB `/files` write/read vs `cp` (runs on this machine).
    Agent(AgentArgs),
    /// The control plane alone over loopback HTTP, its workers answering at once (in-process,
    /// or over the QUIC channel): `POST /v2/sandboxes` latency and `GET /v2/sandboxes`
    /// requests/s, on SQLite and PostgreSQL.
    Control(ControlArgs),
    /// Sandbox networking (root; the throughput part needs KVM, so run it in the host VM):
    /// hand-out from the pool vs fresh, and guest → host TCP through tap + NAT vs loopback.
    Net(NetArgs),
    /// The same HTTP backend on loopback reached directly, through nginx as a reverse proxy and
    /// through the Roost gateway + QUIC tunnel: requests/s and p50/p99 latency of each.
    Gateway(GatewayArgs),
    /// Sandbox start from a template snapshot vs a cold boot, through the worker's own path
    /// (needs KVM: `roost hostvm run -- roost-bench restore --json`): restore with mapped
    /// memory, with the userfaultfd page server (with and without a recorded working set), a
    /// warm pool hit; host PSS per idle clone; full vs 5%-dirty diff snapshot times.
    Restore(RestoreArgs),
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// Rounds of each start-up variant (medians are reported; at least 5 for the issue).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Clones alive at once for the memory figure.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    clones: u32,
    /// Guest memory of the template in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=32768))]
    mem: u64,
    /// Root filesystem image (artefact index name) the template is made from.
    #[arg(long, default_value = "rootfs-base")]
    image: String,
    /// Scratch directory for runtime directories and snapshots (removed afterwards).
    #[arg(long, default_value = "/tmp/roost-bench-restore")]
    work_dir: std::path::PathBuf,
    /// Print only the JSON report on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct GatewayArgs {
    /// Concurrent keep-alive client connections.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    connections: u32,
    /// Seconds each target is loaded per round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    round_secs: u64,
    /// Interleaved rounds (direct, nginx, gateway each once per round).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Gateway worker threads and nginx worker processes.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Bytes in each response body.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=16_777_216))]
    body_bytes: u32,
    /// The nginx binary (Debian package `nginx`).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: std::path::PathBuf,
    /// Print only the JSON report on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ControlPlacement {
    Instant,
    Quic,
    Both,
}

#[derive(clap::Args, Debug)]
struct ControlArgs {
    /// Sequential creates per database (also how many sandboxes the list phase sees).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    creates: u32,
    /// Concurrent clients of the list phase.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// Seconds of the list phase per database.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    list_secs: u64,
    /// Sandboxes per list page.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    page: u32,
    /// PostgreSQL admin URL (role with CREATEDB); a scratch database is made and dropped.
    #[arg(
        long,
        env = "ROOST_TEST_POSTGRES_URL",
        default_value = "postgres://roost_test:roost_test@127.0.0.1:5432/roost_test"
    )]
    postgres_url: String,
    /// Only SQLite.
    #[arg(long)]
    no_postgres: bool,
    /// Placements to measure: the in-process instant worker, a worker over the QUIC channel,
    /// or both.
    #[arg(long, value_enum, default_value = "both")]
    placement: ControlPlacement,
    /// Print only the JSON report on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct NetArgs {
    /// Hand-outs of each kind (the medians are reported).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    runs: u32,
    /// MiB per throughput transfer.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    mib: u64,
    /// Throughput transfers each way (0 skips the part that boots a VM).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1000))]
    transfers: u32,
    /// The roost binary [default: next to roost-bench].
    #[arg(long)]
    roost: Option<std::path::PathBuf>,
    /// Print only the JSON report on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Latency samples of each side (the median is reported).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    runs: u32,
    /// File transfers of each kind.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    file_runs: u32,
    /// Size of the transferred file in MiB.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=4096))]
    file_mib: u32,
    /// The roost-agent binary (default: next to roost-bench).
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// Print only the JSON object (no human-readable summary).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct BootArgs {
    /// Boots per VMM (the medians are reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Root filesystem image, by its index name without the `rootfs-` prefix.
    #[arg(long, default_value = "base")]
    image: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
    /// Seconds to wait for each boot.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Print only the JSON report on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct HostvmArgs {
    /// Number of host-VM runs (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Root filesystem image of the nested guest, without the `rootfs-` prefix.
    #[arg(long, default_value = "base")]
    image: String,
    /// Virtual CPUs of the host VM.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Memory of the host VM in MiB.
    #[arg(long, default_value_t = 2048)]
    mem: u32,
    /// Seconds to allow each host-VM run.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Vmm {
    /// QEMU's `microvm` machine (the baseline).
    Qemu,
}

#[derive(clap::Args, Debug)]
struct GuestBootArgs {
    /// Which VMM boots the guest.
    #[arg(long, value_enum, default_value = "qemu")]
    vmm: Vmm,
    /// Number of boots (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Root filesystem image, by its index name without the `rootfs-` prefix.
    #[arg(long, default_value = "base")]
    image: String,
    /// Accelerator: kvm, or tcg to try images on a machine without a usable KVM.
    #[arg(long, value_enum, default_value = "kvm")]
    accel: Accel,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
    /// Seconds to wait for each boot.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Copy the first boot's console to stderr.
    #[arg(long)]
    console: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::GuestBoot(args) => guest_boot(args),
        Scenario::Hostvm(args) => hostvm(args),
        Scenario::Boot(args) => boot(args),
        Scenario::Agent(args) => agent(args),
        Scenario::Control(args) => control(args),
        Scenario::Net(args) => net(args),
        Scenario::Gateway(args) => gateway(args),
        Scenario::Restore(args) => restore(args),
    }
}

fn hostvm(args: HostvmArgs) -> anyhow::Result<()> {
    let bench = HostVmBench {
        cpus: args.cpus,
        mem_mib: args.mem,
        image: args.image.clone(),
        timeout: Duration::from_secs(args.timeout),
    };
    let (mut host_boot, mut to_ready, mut inside) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let sample = bench
            .run_once()
            .with_context(|| format!("host-VM run {} of {}", run + 1, args.runs))?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        eprintln!(
            "run {}/{}: host VM booted in {:.0} ms, nested guest ready at {:.0} ms",
            run + 1,
            args.runs,
            ms(sample.host_boot),
            ms(sample.start_to_guest_ready)
        );
        host_boot.push(ms(sample.host_boot));
        to_ready.push(ms(sample.start_to_guest_ready));
        inside.extend(sample.guest_boot_inside.map(ms));
    }
    let host = stats::summarise(&host_boot).context("no samples")?;
    let ready = stats::summarise(&to_ready).context("no samples")?;
    let report = serde_json::json!({
        "scenario": "hostvm",
        "image": args.image,
        "runs": host.runs,
        "hostvm_boot_ms_p50": host.p50_ms,
        "hostvm_start_to_guest_ready_ms_p50": ready.p50_ms,
        "guest_boot_inside_ms_p50": stats::median(&inside),
        "hostvm_boot_samples_ms": host_boot,
        "start_to_guest_ready_samples_ms": to_ready,
    });
    println!("{report}");
    Ok(())
}

fn guest_boot(args: GuestBootArgs) -> anyhow::Result<()> {
    let Vmm::Qemu = args.vmm;
    let images = GuestImages::from_index(&format!("rootfs-{}", args.image))
        .context("locating the kernel and image (build them with `roost images build`)")?;
    let vmm = QemuMicrovm {
        accel: args.accel,
        mem_mib: args.mem,
        timeout: Duration::from_secs(args.timeout),
        ..QemuMicrovm::default()
    };
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let mut stderr = std::io::stderr();
        let console: Option<&mut dyn std::io::Write> = if args.console && run == 0 {
            Some(&mut stderr)
        } else {
            None
        };
        let sample = vmm
            .boot_to_ready(&images, &format!("bench-{run}"), console)
            .with_context(|| format!("boot {} of {}", run + 1, args.runs))?;
        let ms = sample.ready_after.as_secs_f64() * 1000.0;
        eprintln!(
            "boot {}/{}: {ms:.0} ms  ({})",
            run + 1,
            args.runs,
            sample.ready_line
        );
        samples.push(ms);
    }
    let summary = stats::summarise(&samples).context("no samples")?;
    let report = serde_json::json!({
        "scenario": "guest-boot",
        "vmm": "qemu",
        "accel": format!("{:?}", args.accel).to_lowercase(),
        "image": args.image,
        "runs": summary.runs,
        "qemu_boot_ms_p50": summary.p50_ms,
        "qemu_boot_ms_p95": summary.p95_ms,
        "samples_ms": samples,
    });
    println!("{report}");
    Ok(())
}

fn boot(args: BootArgs) -> anyhow::Result<()> {
    let images = GuestImages::from_index(&format!("rootfs-{}", args.image))
        .context("locating the kernel and image (build them with `roost images build`)")?;
    let timeout = Duration::from_secs(args.timeout);
    let roost = RoostVmm {
        mem_mib: args.mem,
        timeout,
        ..RoostVmm::default()
    };
    let qemu = QemuMicrovm {
        accel: Accel::Kvm,
        mem_mib: args.mem,
        timeout,
        ..QemuMicrovm::default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mut roost_ms, mut qemu_ms, mut rss_kib) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let n = run + 1;
        let sample = roost
            .boot_to_ready(&images, &format!("bench-roost-{run}"))
            .with_context(|| format!("roost-vmm boot {n} of {}", args.runs))?;
        eprintln!(
            "roost-vmm {n}/{}: {:.0} ms, VMM RSS {} KiB  ({})",
            args.runs,
            ms(sample.ready_after),
            sample.vmm_rss_kib,
            sample.ready_line
        );
        roost_ms.push(ms(sample.ready_after));
        rss_kib.push(sample.vmm_rss_kib as f64);
        let sample = qemu
            .boot_to_ready(&images, &format!("bench-qemu-{run}"), None)
            .with_context(|| format!("QEMU boot {n} of {}", args.runs))?;
        eprintln!(
            "qemu      {n}/{}: {:.0} ms  ({})",
            args.runs,
            ms(sample.ready_after),
            sample.ready_line
        );
        qemu_ms.push(ms(sample.ready_after));
    }
    let roost_p50 = stats::median(&roost_ms).context("no samples")?;
    let qemu_p50 = stats::median(&qemu_ms).context("no samples")?;
    let report = serde_json::json!({
        "scenario": "boot",
        "image": args.image,
        "mem_mib": args.mem,
        "runs": args.runs,
        "roost_boot_ms_p50": roost_p50,
        "qemu_boot_ms_p50": qemu_p50,
        "ratio": roost_p50 / qemu_p50,
        "roost_vmm_rss_kib": stats::median(&rss_kib),
        "roost_samples_ms": roost_ms,
        "qemu_samples_ms": qemu_ms,
    });
    if !args.json {
        eprintln!(
            "roost-vmm p50 {roost_p50:.0} ms, QEMU microvm p50 {qemu_p50:.0} ms, ratio {:.2}",
            roost_p50 / qemu_p50
        );
    }
    println!("{report}");
    Ok(())
}

fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let bench = AgentBench {
        agent: match args.agent {
            Some(agent) => agent,
            None => AgentBench::default_agent()?,
        },
        runs: usize::try_from(args.runs)?,
        file_runs: usize::try_from(args.file_runs)?,
        file_bytes: usize::try_from(args.file_mib)? << 20,
    };
    let report = bench.run()?;
    if !args.json {
        println!(
            "commands.run(\"true\"): agent {:.2} ms vs bash -lc true {:.2} ms (x{:.2})",
            report.run_true_agent_ms, report.run_true_direct_ms, report.run_true_ratio
        );
        println!(
            "/bin/true: agent {:.2} ms vs direct {:.2} ms (x{:.2})",
            report.exec_true_agent_ms, report.exec_true_direct_ms, report.exec_true_ratio
        );
        println!(
            "{:.0} MiB write: agent {:.0} MiB/s, read: agent {:.0} MiB/s, cp {:.0} MiB/s \
             (x{:.2} / x{:.2} the time of cp)",
            report.file_mib,
            report.write_agent_mib_s,
            report.read_agent_mib_s,
            report.cp_mib_s,
            report.write_ratio,
            report.read_ratio
        );
    }
    let mut json = serde_json::to_value(&report)?;
    json["scenario"] = "agent".into();
    println!("{json}");
    Ok(())
}

fn net(args: NetArgs) -> anyhow::Result<()> {
    let bench = NetBench {
        runs: usize::try_from(args.runs)?,
        mib: args.mib,
        transfers: usize::try_from(args.transfers)?,
        roost: match args.roost {
            Some(path) => path,
            None => NetBench::default_roost()?,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(bench.run())?;
    if !args.json {
        eprintln!(
            "hand-out: pool {:.1} ms, fresh {:.1} ms (x{:.1}); throughput: tap+NAT {:?} MiB/s, loopback {:?} MiB/s",
            report.pool_ms_p50,
            report.fresh_ms_p50,
            report.fresh_over_pool,
            report.tap_nat_mib_s_p50,
            report.loopback_mib_s_p50
        );
    }
    let mut json = serde_json::to_value(&report)?;
    json["scenario"] = "net".into();
    println!("{json}");
    Ok(())
}

fn control(args: ControlArgs) -> anyhow::Result<()> {
    let placements = match args.placement {
        ControlPlacement::Instant => vec![PlacementKind::Instant],
        ControlPlacement::Quic => vec![PlacementKind::Quic],
        ControlPlacement::Both => vec![PlacementKind::Instant, PlacementKind::Quic],
    };
    let bench = ControlBench {
        placements,
        creates: args.creates,
        concurrency: args.concurrency,
        list_for: Duration::from_secs(args.list_secs),
        page: args.page,
        postgres_url: (!args.no_postgres).then_some(args.postgres_url),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let reports = runtime.block_on(bench.run())?;
    if !args.json {
        for r in &reports {
            eprintln!(
                "{:>8}/{:<7}: create p50 {:.2} ms (p95 {:.2}), list {:.0} req/s (p50 {:.2} ms, {} clients)",
                r.engine,
                r.placement,
                r.create_ms.p50_ms,
                r.create_ms.p95_ms,
                r.list_rps,
                r.list_ms.p50_ms,
                r.list_concurrency
            );
        }
    }
    let report = serde_json::json!({ "scenario": "control", "engines": reports });
    println!("{report}");
    Ok(())
}

fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let bench = roost_bench::gateway::GatewayBench {
        connections: usize::try_from(args.connections)?,
        round: Duration::from_secs(args.round_secs),
        rounds: args.rounds,
        threads: usize::try_from(args.threads)?,
        body_bytes: usize::try_from(args.body_bytes)?,
        nginx: args.nginx,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = runtime.block_on(bench.run())?;
    let rps_ratio = r.gateway.rps / r.nginx.rps;
    let p50_ratio = r.gateway.p50_ms / r.nginx.p50_ms;
    if !args.json {
        for (name, f) in [
            ("direct", &r.direct),
            ("nginx", &r.nginx),
            ("gateway", &r.gateway),
        ] {
            eprintln!(
                "{name:>8}: {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  ({} requests)",
                f.rps, f.p50_ms, f.p99_ms, f.requests
            );
        }
        eprintln!("gateway/nginx: {rps_ratio:.2}x requests/s, {p50_ratio:.2}x p50");
    }
    let report = serde_json::json!({
        "scenario": "gateway",
        "gateway_rps": r.gateway.rps,
        "gateway_p50_ms": r.gateway.p50_ms,
        "gateway_p99_ms": r.gateway.p99_ms,
        "nginx_rps": r.nginx.rps,
        "nginx_p50_ms": r.nginx.p50_ms,
        "nginx_p99_ms": r.nginx.p99_ms,
        "direct_rps": r.direct.rps,
        "direct_p50_ms": r.direct.p50_ms,
        "direct_p99_ms": r.direct.p99_ms,
        "gateway_over_nginx_rps": rps_ratio,
        "gateway_over_nginx_p50": p50_ratio,
        "connections": r.connections,
        "rounds": r.rounds,
        "round_secs": r.round_secs,
        "threads": r.threads,
        "body_bytes": r.body_bytes,
    });
    println!("{report}");
    Ok(())
}

fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let bench = roost_bench::restore::RestoreBench {
        image: args.image,
        runs: usize::try_from(args.runs)?,
        clones: usize::try_from(args.clones)?,
        mem_mib: args.mem,
        work_dir: args.work_dir,
    };
    if bench.work_dir.exists() {
        anyhow::bail!(
            "{} exists: remove it or pass another --work-dir",
            bench.work_dir.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(bench.run());
    let _ = std::fs::remove_dir_all(&bench.work_dir);
    let report = result?;
    if !args.json {
        eprintln!(
            "to first command: cold boot {:.0} ms, restore map {:.0} ms, uffd {:.0} ms, \
             uffd+prefetch {:.0} ms, pool hit {:.0} ms; restore/boot {:.3}, pool/restore {:.3}; \
             PSS per idle clone {:.1}% of guest memory; snapshot full {:.0} ms vs 5% diff {:.0} ms \
             ({:.3})",
            report.cold_boot_ms,
            report.restore_map_ms,
            report.restore_uffd_ms,
            report.restore_uffd_prefetch_ms,
            report.pool_hit_ms,
            report.restore_over_boot,
            report.pool_over_restore,
            report.pss_per_clone_pct,
            report.full_snapshot_ms,
            report.pause_5pct_ms,
            report.pause_over_full,
        );
    }
    let mut json = serde_json::to_value(&report)?;
    json["scenario"] = "restore".into();
    println!("{json}");
    Ok(())
}
