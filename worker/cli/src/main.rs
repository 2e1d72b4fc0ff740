//! The `roost` command: one binary for operators and developers.
//!
//! Each subcommand lives in its own `cmd_*` module and returns the process exit code; only
//! this file maps errors to exit codes.

mod cmd_doctor;

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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => cmd_doctor::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
        Err(error) => {
            eprintln!("roost: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
