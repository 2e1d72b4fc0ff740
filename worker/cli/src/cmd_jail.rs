//! `roost jail`: runs a program (normally `roost vm run`) in an empty room — new PID, mount,
//! IPC, UTS and network namespaces, a directory holding only what it needs, an unprivileged
//! uid/gid without capabilities — and removes that directory when it ends. The worker starts
//! VMMs through it; it is also usable by hand to inspect a jail. See `docs/threat-model.md`.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use roost_worker::jail::{self, JailMount, JailSpec};

#[derive(clap::Subcommand, Debug)]
pub enum JailCommand {
    /// Run PROGRAM (a path inside the jail) jailed; exits with its status.
    Run(JailRunArgs),
    /// Remove jail directories left under BASE by jailers that were killed.
    Clean {
        /// The directory holding jail directories (e.g. /srv/roost/jail).
        #[arg(long, value_name = "DIR")]
        base: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct JailRunArgs {
    /// The jail directory to create (must not exist); removed when the program ends.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Unprivileged uid the program runs as.
    #[arg(long)]
    uid: u32,
    /// Unprivileged gid the program runs as.
    #[arg(long)]
    gid: u32,
    /// Join this network namespace (e.g. /run/netns/roost-<id>); default: a new empty one.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Host name inside the jail.
    #[arg(long, default_value = "roost-vmm")]
    hostname: String,
    /// HOST[:INSIDE][:ro|:rw] bind mounts (read-only unless `:rw`), repeatable.
    #[arg(long = "mount", value_name = "SPEC")]
    mounts: Vec<String>,
    /// A host binary to make available at the same path, with its shared libraries
    /// (read-only), repeatable.
    #[arg(long = "binary", value_name = "PATH")]
    binaries: Vec<PathBuf>,
    /// Device nodes to recreate inside (e.g. /dev/kvm), owned by the uid, repeatable.
    #[arg(long = "device", value_name = "PATH")]
    devices: Vec<PathBuf>,
    /// Directories created inside, owned by the uid (sockets, logs), repeatable.
    #[arg(long = "writable-dir", value_name = "PATH")]
    writable_dirs: Vec<PathBuf>,
    /// KEY=VALUE for the program's environment (nothing else is passed), repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The program (a path inside the jail) and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<OsString>,
}

pub fn run(command: JailCommand) -> anyhow::Result<i32> {
    match command {
        JailCommand::Clean { base } => {
            let removed = jail::remove_stale(&base)
                .with_context(|| format!("cleaning jails under {}", base.display()))?;
            for path in removed {
                println!("removed {}", path.display());
            }
            Ok(0)
        }
        JailCommand::Run(args) => {
            let spec = spec_from(args)?;
            let code = jail::run(&spec).with_context(|| format!("jail {}", spec.root.display()))?;
            Ok(code)
        }
    }
}

fn spec_from(args: JailRunArgs) -> anyhow::Result<JailSpec> {
    let mut mounts = args
        .mounts
        .iter()
        .map(|m| JailMount::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    for binary in &args.binaries {
        let binary = binary
            .canonicalize()
            .with_context(|| format!("--binary {}", binary.display()))?;
        let libraries = roost_hostvm::ldd::shared_libraries(&binary)
            .with_context(|| format!("finding the shared libraries of {}", binary.display()))?;
        for path in std::iter::once(binary).chain(libraries) {
            if !mounts.iter().any(|m| m.inside == path) {
                mounts.push(JailMount {
                    host: path.clone(),
                    inside: path,
                    read_only: true,
                });
            }
        }
    }
    let env = args
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((OsString::from(k), OsString::from(v))),
            _ => bail!("--env {kv:?}: use KEY=VALUE"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut command = args.command.into_iter();
    let program = PathBuf::from(command.next().context("no program given after --")?);
    Ok(JailSpec {
        root: args.root,
        uid: args.uid,
        gid: args.gid,
        netns: args.netns,
        hostname: args.hostname,
        mounts,
        devices: args.devices,
        writable_dirs: args.writable_dirs,
        program,
        args: command.collect(),
        env,
    })
}
