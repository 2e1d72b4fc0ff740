//! roost-agent: PID 1 of every Roost microVM.
//!
//! As PID 1 it sets the guest up (mounts, console, hostname), prints the ready line, reaps
//! orphans and powers the VM off on request ([`init`]). Run by hand inside the guest it offers
//! a few subcommands ([`cli`]). Later the same binary serves the worker's vsock protocol and
//! the E2B-compatible API beside the init loop.

mod channel;
mod children;
mod cli;
mod envd;
mod identity;
mod init;
mod interpreter;
mod log;
mod poweroff;

use std::process::ExitCode;

use cli::Command;

fn main() -> ExitCode {
    let is_pid1 = std::process::id() == 1;
    match cli::parse(std::env::args_os(), is_pid1) {
        Command::Init(options) => init::run(&options),
        Command::Poweroff => match poweroff::request() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say!("poweroff: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Channel(endpoints) => match channel::run_standalone(&endpoints) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say!("channel on {}: {e}", endpoints.listen);
                ExitCode::FAILURE
            }
        },
        Command::Interpreter(options) => interpreter::run(&options),
        Command::Serve(options) => match envd::run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say!("serve: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("roost-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Help => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Command::Usage(problem) => {
            eprintln!("roost-agent: {problem}\n\n{}", cli::USAGE);
            ExitCode::from(2)
        }
    }
}
