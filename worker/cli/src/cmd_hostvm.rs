//! `roost hostvm run`: runs a command inside the host VM (QEMU TCG with emulated SVM, a real
//! /dev/kvm inside) and exits with the command's status.

use std::time::Duration;

use anyhow::Context;
use roost_hostvm::{Event, Forward, HostVm, HostVmError};
use roost_images::Progress;

/// Run a command inside a QEMU TCG host VM whose kvm_amd gives a real /dev/kvm.
///
/// CMD is executed as an argv (no shell parsing: use `sh -c '...'` for shell syntax) with
/// the project's binaries on PATH (/opt/roost/bin), ROOST_CACHE_DIR=/opt/roost/cache holding
/// index records for the built kernel and images (disks at /dev/roost/<name>). Its stdout and
/// stderr stream here; roost exits with its status. 10.0.2.2 inside reaches this machine's
/// loopback.
#[derive(clap::Args, Debug)]
pub struct HostvmRunArgs {
    /// Virtual CPUs of the host VM.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Memory of the host VM in MiB.
    #[arg(long, default_value_t = 4096)]
    pub mem: u32,
    /// Forward 127.0.0.1:HOST on this machine to port GUEST inside the host VM (repeatable).
    #[arg(long = "forward", value_name = "HOST:GUEST")]
    pub forwards: Vec<Forward>,
    /// Kill the host VM after this many seconds.
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    pub timeout: u64,
    /// Set an environment variable for CMD (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("`{value}` is not NAME=VALUE"))
}

pub fn run(args: HostvmRunArgs) -> anyhow::Result<i32> {
    let cancel = roost_hostvm::cancel_on_signals().context("cannot install signal handlers")?;
    let mut vm = HostVm::builder()
        .cpus(args.cpus)
        .mem_mib(args.mem)
        .timeout(Duration::from_secs(args.timeout))
        .progress(Progress::to_stderr())
        .cancel_flag(cancel)
        .on_event(|event| match event {
            Event::Booted(boot) => eprintln!(
                "roost hostvm: booted in {:.2} s (QEMU start → /init; kernel uptime at /init {:.2} s)",
                boot.qemu_to_init.as_secs_f64(),
                boot.kernel_uptime_at_init.as_secs_f64()
            ),
            Event::CommandStarted { since_start } => {
                tracing::info!("command started {:.2} s after QEMU", since_start.as_secs_f64());
            }
            Event::Stage { name, since_start } => {
                tracing::debug!("stage {name} at {:.2} s", since_start.as_secs_f64());
            }
        });
    for forward in args.forwards {
        vm = vm.forward(forward);
    }
    for (name, value) in args.env {
        vm = vm.env(name, value);
    }
    match vm.run(args.command) {
        Ok(outcome) => {
            tracing::info!(
                attached = ?outcome.attached,
                ready_after = ?outcome.ready_after,
                command_time = ?outcome.command_time,
                "host VM run finished"
            );
            Ok(outcome.exit_code)
        }
        Err(HostVmError::Cancelled) => {
            eprintln!("roost hostvm: interrupted; the host VM was stopped");
            Ok(130)
        }
        Err(error) => Err(error).context("host VM run failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: HostvmRunArgs,
    }

    #[test]
    fn parses_options_and_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "roost",
            "--cpus",
            "4",
            "--forward",
            "8080:80",
            "--forward",
            "2222:22",
            "--env",
            "RUST_LOG=debug",
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .unwrap();
        assert_eq!(cli.args.cpus, 4);
        assert_eq!(cli.args.mem, 4096);
        assert_eq!(
            cli.args.forwards,
            [
                Forward {
                    host: 8080,
                    guest: 80
                },
                Forward {
                    host: 2222,
                    guest: 22
                }
            ]
        );
        assert_eq!(cli.args.env, [("RUST_LOG".to_owned(), "debug".to_owned())]);
        assert_eq!(cli.args.command, ["sh", "-c", "exit 7"]);
    }

    #[test]
    fn refuses_bad_forwards_and_a_missing_command() {
        assert!(Cli::try_parse_from(["roost", "--forward", "80", "--", "true"]).is_err());
        assert!(Cli::try_parse_from(["roost"]).is_err());
        assert!(Cli::try_parse_from(["roost", "--env", "NOVALUE", "--", "true"]).is_err());
    }
}
