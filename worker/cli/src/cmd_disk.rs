//! `roost disk dm`: the dm-snapshot disk backend (`roost_worker::disk`, `docs/disks.md`) by
//! hand, for operators and for the host-VM tests.
//!
//! - `roost disk dm create --name N --base IMAGE --cow FILE`: makes dm device `roost-N`, a
//!   copy-on-write snapshot of IMAGE whose writes go to FILE, and prints its device node; it
//!   outlives this command (give it to `roost vm run --rootfs`).
//! - `roost disk dm remove --name N`: removes it and frees its loop devices (the COW file
//!   stays: recreating over the same base and COW file gives the same disk back).
//! - `roost disk dm clean`: removes every `roost-` dm device and its loop devices (what is left
//!   after a crash); prints one line per device.
//! - `roost disk dm list`: one line per `roost-` device: name, node, loop devices, status.

use std::path::PathBuf;

use anyhow::Context;
use roost_worker::disk::{self, DmSnapshot};

/// `roost disk` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DiskCommand {
    /// Device-mapper snapshot disks (for hosts whose kernel has dm_mod and dm_snapshot).
    #[command(subcommand)]
    Dm(DmCommand),
}

/// `roost disk dm` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DmCommand {
    /// Create dm device roost-NAME, a snapshot of BASE writing to COW; print its device node.
    Create(DmCreateArgs),
    /// Remove dm device roost-NAME and free its loop devices (the COW file is kept).
    Remove {
        /// The name given to `create` (without the `roost-` prefix).
        #[arg(long)]
        name: String,
    },
    /// Remove every roost- dm device and its loop devices (left by a crash).
    Clean,
    /// List roost- dm devices: NAME DEVICE loops=LOOP,... status=STATUS.
    List,
}

/// Options of `roost disk dm create`.
#[derive(clap::Args, Debug)]
pub struct DmCreateArgs {
    /// The device becomes roost-NAME (1-64 of a-z, A-Z, 0-9, '-', '_').
    #[arg(long)]
    pub name: String,
    /// The read-only base image (a file or a block device); never written.
    #[arg(long, value_name = "IMAGE")]
    pub base: PathBuf,
    /// The copy-on-write store: created sparse if missing, reused (same disk) if present.
    #[arg(long, value_name = "FILE")]
    pub cow: PathBuf,
}

/// Runs a `roost disk` subcommand.
pub fn run(command: DiskCommand) -> anyhow::Result<i32> {
    let DiskCommand::Dm(command) = command;
    match command {
        DmCommand::Create(args) => {
            let snapshot = DmSnapshot::create(&args.name, &args.base, &args.cow)
                .with_context(|| format!("cannot create dm disk roost-{}", args.name))?;
            println!("{}", snapshot.keep().display());
        }
        DmCommand::Remove { name } => {
            let loops = DmSnapshot::remove_by_name(&name)
                .with_context(|| format!("cannot remove dm disk roost-{name}"))?;
            println!("removed roost-{name}{}", loops_suffix(&loops));
        }
        DmCommand::Clean => {
            let removed = disk::remove_stale().context("cannot remove stale dm disks")?;
            for (name, loops) in &removed {
                println!("removed {name}{}", loops_suffix(loops));
            }
        }
        DmCommand::List => {
            for device in disk::list().context("cannot list dm disks")? {
                println!(
                    "{} {}{} status={}",
                    device.name,
                    device.device.display(),
                    loops_suffix(&device.loops),
                    device.status.replace(' ', "_"),
                );
            }
        }
    }
    Ok(0)
}

/// ` loops=/dev/loop0,/dev/loop1`, or nothing.
fn loops_suffix(loops: &[PathBuf]) -> String {
    if loops.is_empty() {
        return String::new();
    }
    let names: Vec<String> = loops.iter().map(|l| l.display().to_string()).collect();
    format!(" loops={}", names.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_are_listed_comma_separated() {
        assert_eq!(loops_suffix(&[]), "");
        assert_eq!(
            loops_suffix(&[PathBuf::from("/dev/loop0"), PathBuf::from("/dev/loop3")]),
            " loops=/dev/loop0,/dev/loop3"
        );
    }
}
