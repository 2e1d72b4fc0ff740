//! The `roost` command: one binary for operators and developers.
//!
//! Each subcommand lives in its own `cmd_*` module and returns the process exit code; only
//! this file maps errors to exit codes.

mod cmd_certs;
mod cmd_disk;
mod cmd_doctor;
mod cmd_gateway;
mod cmd_hostvm;
mod cmd_images;
mod cmd_jail;
mod cmd_net;
mod cmd_sandbox;
mod cmd_serve;
mod cmd_templates;
mod cmd_vm;
mod cmd_vm_api;
mod cmd_worker;
mod worker_net;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "roost",
    version,
    about = "Roost: microVM sandboxes for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check what this host can do for Roost (KVM, userfaultfd, tun, device-mapper, cgroups, disk).
    Doctor(cmd_doctor::DoctorArgs),
    /// Build and list the guest kernel and root filesystem images (cached by content hash).
    #[command(subcommand)]
    Images(cmd_images::ImagesCommand),
    /// Run commands inside the host VM, a QEMU TCG machine with a real /dev/kvm.
    #[command(subcommand)]
    Hostvm(HostvmCommand),
    /// Run microVMs with Roost's own VMM.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Run a Roost service in the foreground until SIGINT/SIGTERM.
    #[command(subcommand)]
    Serve(cmd_serve::ServeCommand),
    /// Operator actions on the control service's database (e.g. the first platform admin).
    #[command(subcommand)]
    Control(cmd_serve::ControlCommand),
    /// Sandbox egress networking by hand: run a command in a sandbox's network namespace,
    /// remove stale namespaces, list what is there.
    #[command(subcommand)]
    Net(cmd_net::NetCommand),
    /// Development certificates: a CA, the gateway's wildcard certificate, worker and client
    /// certificates.
    #[command(subcommand)]
    Certs(cmd_certs::CertsCommand),
    /// Run a program (the VMM) jailed: new namespaces, a directory holding only what it needs,
    /// an unprivileged uid/gid; or clean up jails left by a crash.
    #[command(subcommand)]
    Jail(cmd_jail::JailCommand),
    /// Run commands in a sandbox microVM through the worker's VM handle and the in-guest agent.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Build and list template snapshots (booted, agent-ready VMs that sandboxes restore from).
    #[command(subcommand)]
    Templates(cmd_templates::TemplatesCommand),
    /// Copy-on-write disks by hand: device-mapper snapshots (create, remove, clean, list).
    #[command(subcommand)]
    Disk(cmd_disk::DiskCommand),
}

#[derive(Subcommand, Debug)]
enum SandboxCommand {
    /// Boot a microVM from the artefact index, run CMD in it (output streamed), shut it down
    /// and exit with CMD's status (1 when the sandbox itself failed).
    Run(cmd_sandbox::SandboxRunArgs),
}

#[derive(Subcommand, Debug)]
enum HostvmCommand {
    /// Boot the host VM, run CMD inside it, stream its output and exit with its status.
    Run(cmd_hostvm::HostvmRunArgs),
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Boot a microVM in the foreground; this process is its VMM. Exit status: 0 shut down,
    /// 1 could not start, 3 guest kernel panic, 4 VM failure, 5 stopped by a signal.
    Run(Box<cmd_vm::VmRunArgs>),
    /// Send one request to a running VMM's API socket (--api-socket) and print the reply.
    Api(cmd_vm_api::VmApiArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => cmd_doctor::run(args),
        Command::Certs(command) => cmd_certs::run(command),
        Command::Images(command) => cmd_images::run(command),
        Command::Hostvm(HostvmCommand::Run(args)) => cmd_hostvm::run(args),
        Command::Vm(VmCommand::Run(args)) => cmd_vm::run(*args),
        Command::Vm(VmCommand::Api(args)) => cmd_vm_api::run(args),
        Command::Sandbox(SandboxCommand::Run(args)) => cmd_sandbox::run(args),
        Command::Net(command) => cmd_net::run(command),
        Command::Templates(command) => cmd_templates::run(command),
        Command::Jail(command) => cmd_jail::run(command),
        Command::Disk(command) => cmd_disk::run(command),
        Command::Serve(command) => cmd_serve::run_serve(command),
        Command::Control(command) => cmd_serve::run_control(command),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
        Err(error) => {
            eprintln!("roost: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
