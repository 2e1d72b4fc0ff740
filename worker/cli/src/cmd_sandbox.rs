//! `roost sandbox run`: boot a microVM from the artefact index through the worker's
//! [`VmHandle`] — or restore it from a template snapshot (`--template base --id ID`, which
//! hands the clone its own identity: id, hostname, env, token, entropy, clock) — run one
//! command in it through the agent (stdout/stderr streamed), shut the VM down and exit with the
//! command's status. For manual use and for testing the worker's VM life cycle inside the host
//! VM.
//!
//! Exit status: the command's (128+N when a signal N ended it); **1** when the sandbox failed
//! (boot, VMM gone mid-command, agent unreachable; the reason and the console tail are printed).
//! Stderr gets one `roost: sandbox ready in N ms` line and, at the end, how the VM stopped.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use roost_agent_client::IdentityRequest;
use roost_agent_client::{ExecEvent, exec_argv};
use roost_images::{ArtefactIndex, Cache};
use roost_worker::template::{self, TemplateName};
use roost_worker::vm_handle::{
    RestoreConfig, RootfsMode, SeccompMode, VmHandle, VmHandleConfig, VmmExit,
    default_runtime_root, ensure_runtime_root,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT, forwarded to the command on the first Ctrl-C.
const SIGINT: i32 = 2;

/// A stop request to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

/// SIGINT and SIGTERM, caught from before the VM boots so that neither can end this process
/// without freeing the VM (a signal during boot abandons the boot, which frees everything).
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
        })
    }

    async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
        }
    }
}

/// Boot a sandbox microVM, run CMD in it, shut it down, exit with CMD's status.
#[derive(clap::Args, Debug)]
pub struct SandboxRunArgs {
    /// Guest image from the artefact index (`rootfs-<IMAGE>`).
    #[arg(long, default_value = "base")]
    pub image: String,
    /// Restore from this template snapshot (`roost templates build`) instead of booting.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["rootfs", "kernel", "writable", "disk", "append"])]
    pub template: Option<TemplateName>,
    /// The restored sandbox's id (with --template) [default: sb-<pid>].
    #[arg(long, value_name = "ID", requires = "template")]
    pub id: Option<String>,
    /// The restored sandbox's hostname (with --template) [default: its id].
    #[arg(long, value_name = "NAME", requires = "template")]
    pub hostname: Option<String>,
    /// Environment variable for the restored sandbox's processes (with --template; repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env, requires = "template")]
    pub env: Vec<(String, String)>,
    /// Access token envd and the code interpreter require afterwards (with --template); read
    /// from the environment so that it stays out of `ps`.
    #[arg(
        long,
        env = "ROOST_SANDBOX_ACCESS_TOKEN",
        hide_env_values = true,
        requires = "template"
    )]
    pub access_token: Option<String>,
    /// Root filesystem image file instead of --image.
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Guest kernel [default: `kernel` from the artefact index].
    #[arg(long, value_name = "VMLINUX")]
    pub kernel: Option<PathBuf>,
    /// Boot from a private writable copy of the image instead of the shared read-only one
    /// (the same as `--disk copy`).
    #[arg(long, conflicts_with = "disk")]
    pub writable: bool,
    /// A writable root disk for this sandbox over the shared read-only image: `overlay` (the
    /// VMM's copy-on-write overlay file), `dm` (a device-mapper snapshot over loop devices;
    /// root and the dm_snapshot module), or `copy` (a full private copy). Default: read-only.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub disk: Option<DiskArg>,
    /// Number of vCPUs (1–16).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB (64–32768).
    #[arg(long, default_value_t = 256, value_name = "MiB")]
    pub mem: u64,
    /// Extra kernel parameters.
    #[arg(long, visible_alias = "cmdline-extra", value_name = "PARAMS")]
    pub append: Option<String>,
    /// Directory for the VM's runtime directory [default: $ROOST_RUNTIME_DIR, else
    /// $XDG_RUNTIME_DIR/roost, else /tmp/roost-<uid>].
    #[arg(long, value_name = "DIR")]
    pub runtime_root: Option<PathBuf>,
    /// Seconds the agent may take to announce itself.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub ready_timeout: u64,
    /// Seconds the guest gets to power off before the VMM is killed.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub grace: u64,
    /// The VMM's seccomp mode.
    #[arg(long, value_enum, default_value_t = SeccompArg::Enforce)]
    pub seccomp: SeccompArg,
    /// Forward host 127.0.0.1:HOSTPORT to guest 127.0.0.1:GUESTPORT; the VM then stays up
    /// after CMD exits until Ctrl-C.
    #[arg(long, value_name = "HOSTPORT:GUESTPORT", value_parser = parse_forward)]
    pub forward: Vec<(u16, u16)>,
    /// The command to run in the guest.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskArg {
    Overlay,
    Dm,
    Copy,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum SeccompArg {
    Enforce,
    Log,
    Off,
}

impl SeccompArg {
    pub fn mode(self) -> SeccompMode {
        match self {
            Self::Enforce => SeccompMode::Enforce,
            Self::Log => SeccompMode::Log,
            Self::Off => SeccompMode::Off,
        }
    }
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

fn parse_forward(text: &str) -> Result<(u16, u16), String> {
    let (host, guest) = text
        .split_once(':')
        .ok_or_else(|| format!("expected HOSTPORT:GUESTPORT, got {text:?}"))?;
    let port = |p: &str| p.parse::<u16>().map_err(|e| format!("bad port {p:?}: {e}"));
    Ok((port(host)?, port(guest)?))
}

/// How the sandbox comes up.
enum Start {
    Boot(VmHandleConfig),
    Restore(RestoreConfig, Box<IdentityRequest>),
}

pub fn run(args: SandboxRunArgs) -> anyhow::Result<i32> {
    // Held until the sandbox is gone: its drop removes the dm device and its loop devices.
    let mut dm_disk = None;
    let start = match args.template {
        Some(name) => restore_from(&args, name)?,
        None => {
            let mut config = config_from(&args)?;
            if args.disk == Some(DiskArg::Dm) {
                let disk = DmDisk::create(&config.rootfs, &config.runtime_dir)?;
                config.rootfs = disk.device.clone();
                config.rootfs_mode = RootfsMode::Device;
                dm_disk = Some(disk);
            }
            Start::Boot(config)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(run_sandbox(args, start));
    drop(dm_disk);
    outcome
}

/// A sandbox's device-mapper root disk and its COW file (beside the runtime directory, which
/// must not exist before the boot); both removed on drop.
struct DmDisk {
    snapshot: Option<roost_worker::disk::DmSnapshot>,
    device: PathBuf,
    cow: PathBuf,
}

impl DmDisk {
    fn create(image: &std::path::Path, runtime_dir: &std::path::Path) -> anyhow::Result<Self> {
        let name = format!("sandbox-{}", std::process::id());
        let cow = runtime_dir.with_extension("dm-cow");
        let snapshot = roost_worker::disk::DmSnapshot::create(&name, image, &cow)
            .with_context(|| format!("cannot make a dm-snapshot disk over {}", image.display()))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&cow);
            })?;
        Ok(Self {
            device: snapshot.device().to_owned(),
            snapshot: Some(snapshot),
            cow,
        })
    }
}

impl Drop for DmDisk {
    fn drop(&mut self) {
        // The device and its loop devices first, then the COW file they used.
        if let Some(snapshot) = self.snapshot.take()
            && let Err(e) = snapshot.remove()
        {
            tracing::warn!(device = %self.device.display(), error = %e, "cannot remove the dm disk");
        }
        if let Err(e) = std::fs::remove_file(&self.cow)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.cow.display(), error = %e, "cannot remove the dm COW file");
        }
    }
}

/// The template's snapshot and the clone's identity.
fn restore_from(args: &SandboxRunArgs, name: TemplateName) -> anyhow::Result<Start> {
    let cache = Cache::from_env().context("no artefact cache")?;
    let template =
        template::lookup(&ArtefactIndex::new(&cache), name, false).with_context(|| {
            format!("no `{name}` template: run `roost templates build --image {name}`")
        })?;
    let root = args
        .runtime_root
        .clone()
        .unwrap_or_else(default_runtime_root);
    ensure_runtime_root(&root)?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("sb-{}", std::process::id()));
    let hostname = args.hostname.clone().unwrap_or_else(|| id.clone());
    let identity = roost_worker::manager::clone_identity(
        &id,
        &hostname,
        args.env.iter().cloned().collect(),
        args.access_token.clone(),
    )?;
    let mut config = RestoreConfig::new(
        template.snapshot_dir,
        root.join(format!("sandbox-{}", std::process::id())),
    );
    config.ready_timeout = Duration::from_secs(args.ready_timeout);
    config.seccomp = args.seccomp.mode();
    config.validate().context("invalid sandbox configuration")?;
    Ok(Start::Restore(config, Box::new(identity)))
}

fn config_from(args: &SandboxRunArgs) -> anyhow::Result<VmHandleConfig> {
    let index = || -> anyhow::Result<ArtefactIndex> {
        let cache = Cache::from_env().context("no artefact cache")?;
        Ok(ArtefactIndex::new(&cache))
    };
    let kernel = match &args.kernel {
        Some(path) => path.clone(),
        None => index()?.lookup("kernel").context("no guest kernel")?.path,
    };
    let rootfs = match &args.rootfs {
        Some(path) => path.clone(),
        None => {
            let name = format!("rootfs-{}", args.image);
            index()?
                .lookup(&name)
                .with_context(|| format!("no image `{}`", args.image))?
                .path
        }
    };
    let root = args
        .runtime_root
        .clone()
        .unwrap_or_else(default_runtime_root);
    ensure_runtime_root(&root)?;
    let runtime_dir = root.join(format!("sandbox-{}", std::process::id()));
    let mut config = VmHandleConfig::new(kernel, rootfs, runtime_dir);
    config.rootfs_mode = match (args.writable, args.disk) {
        (true, _) | (_, Some(DiskArg::Copy)) => RootfsMode::WritableCopy,
        (_, Some(DiskArg::Overlay)) => RootfsMode::Overlay,
        // `run` puts the dm device in place once the configuration is checked.
        (_, Some(DiskArg::Dm)) | (false, None) => RootfsMode::ReadOnly,
    };
    config.cpus = args.cpus;
    config.mem_mib = args.mem;
    config.cmdline_extra = args.append.clone();
    config.ready_timeout = Duration::from_secs(args.ready_timeout);
    config.seccomp = args.seccomp.mode();
    config.validate().context("invalid sandbox configuration")?;
    Ok(config)
}

async fn run_sandbox(args: SandboxRunArgs, start: Start) -> anyhow::Result<i32> {
    let mut stops = StopSignals::install()?;
    let vm = match start {
        Start::Boot(config) => tokio::select! {
            vm = VmHandle::boot(config) => vm.context("the sandbox did not boot")?,
            stop = stops.next() => bail!("stopped by {stop:?} while the sandbox booted"),
        },
        Start::Restore(config, identity) => tokio::select! {
            vm = VmHandle::restore(config, &identity) => vm.context("the sandbox did not restore")?,
            stop = stops.next() => bail!("stopped by {stop:?} while the sandbox restored"),
        },
    };
    eprintln!(
        "roost: sandbox ready in {} ms (agent {} on {})",
        vm.boot_to_ready().as_millis(),
        vm.hello().agent_version,
        vm.hello().hostname
    );
    let mut forwards = Vec::new();
    for &(host_port, guest_port) in &args.forward {
        let listener = match TcpListener::bind(("127.0.0.1", host_port)).await {
            Ok(listener) => listener,
            Err(e) => {
                vm.kill();
                return Err(e).context(format!("cannot listen on 127.0.0.1:{host_port}"));
            }
        };
        eprintln!("roost: forwarding 127.0.0.1:{host_port} to guest port {guest_port}");
        forwards.push(vm.serve_forward(listener, guest_port));
    }

    let status = run_command(&vm, &args.command, &mut stops).await;
    if status.is_ok() && !forwards.is_empty() {
        eprintln!("roost: the command ended; serving forwards until Ctrl-C");
        tokio::select! {
            _ = stops.next() => {}
            exit = vm.exited() => eprintln!("roost: the VM stopped: {exit}"),
        }
    }
    for forward in forwards {
        forward.abort();
    }
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            // Gone or unreachable: nothing to shut down gracefully.
            let exit = vm.kill();
            eprintln!("roost: the VM stopped: {exit}");
            return Err(e);
        }
    };
    let exit = vm.shutdown(Duration::from_secs(args.grace)).await;
    eprintln!("roost: the VM stopped: {exit}");
    if !matches!(exit, VmmExit::GuestShutdown) {
        tracing::warn!("the guest did not shut down cleanly: {exit}");
    }
    Ok(status)
}

/// Runs `command` to its end, streaming its output; its exit code (128+N for signal N).
/// The first Ctrl-C is passed on to the command as SIGINT; a second one, or SIGTERM, kills the
/// command's process group (the VM is then shut down as usual).
async fn run_command(
    vm: &VmHandle,
    command: &[String],
    stops: &mut StopSignals,
) -> anyhow::Result<i32> {
    let mut exec = vm
        .exec(exec_argv(command.iter().cloned()))
        .await
        .context("cannot start the command in the sandbox")?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut interrupted = false;
    loop {
        let event = tokio::select! {
            event = exec.next_event() => event,
            exit = vm.exited() => {
                bail!("the VM stopped while the command ran: {exit}\n{}", vm.logs());
            }
            stop = stops.next() => {
                if stop == Stop::Interrupt && !interrupted {
                    interrupted = true;
                    eprintln!("roost: interrupting the command (Ctrl-C again kills it)");
                    exec.signal(SIGINT).await.context("cannot signal the command")?;
                } else {
                    eprintln!("roost: killing the command ({stop:?})");
                    exec.kill().await.context("cannot kill the command")?;
                }
                continue;
            }
        };
        match event {
            Ok(Some(ExecEvent::Stdout(bytes))) => {
                stdout.write_all(&bytes).await?;
                stdout.flush().await?;
            }
            Ok(Some(ExecEvent::Stderr(bytes))) => {
                stderr.write_all(&bytes).await?;
                stderr.flush().await?;
            }
            Ok(Some(ExecEvent::Exited(status))) => {
                return Ok(match (status.code, status.signal) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => 1,
                });
            }
            Ok(None) => bail!("the agent ended the command without an exit status"),
            Err(e) => {
                // The VM going away closes the connection first: give the waiter a moment to
                // tell why.
                if let Ok(exit) = tokio::time::timeout(Duration::from_secs(2), vm.exited()).await {
                    bail!(
                        "the VM stopped while the command ran: {exit}\n{}",
                        vm.logs()
                    );
                }
                return Err(e).context("lost the command's connection to the agent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_specs_parse() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("A").is_err());
    }

    #[test]
    fn forward_specs_parse() {
        assert_eq!(parse_forward("9000:8000"), Ok((9000, 8000)));
        assert!(parse_forward("9000").is_err());
        assert!(parse_forward("9000:http").is_err());
        assert!(parse_forward("70000:80").is_err());
    }
}
