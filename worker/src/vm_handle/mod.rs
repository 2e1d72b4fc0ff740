//! The worker's handle on one microVM: boot it with `roost vm run` as a child process, wait
//! for the in-guest agent to announce itself, run commands and forward ports through the
//! agent (`roost-agent-client`), and shut it down — freeing everything it held (VMM process,
//! waiter thread, sockets, runtime directory) on every path: a clean shutdown, a guest panic, an
//! agent that stops answering, a VMM killed from outside, or the handle simply dropped.
//!
//! A VM can also be restored from a snapshot ([`VmHandle::restore`], `roost vm run --restore`):
//! the restored agent does not announce itself again (its vsock connections were reset), so the
//! handle connects to it, retrying until it answers, and hands it its identity (hostname,
//! entropy, clock, environment, token) before anything else runs. With the VMM's control API
//! ([`VmHandleConfig::control_api`], always on for restored VMs) the handle pauses, resumes and
//! snapshots the VM ([`vmm_api`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use roost_worker::vm_handle::{VmHandle, VmHandleConfig};
//! use roost_agent_client::exec_argv;
//! use std::time::Duration;
//!
//! let config = VmHandleConfig::new("/cache/vmlinux", "/cache/rootfs.ext4", "/run/roost/vm1");
//! let vm = VmHandle::boot(config).await?;
//! let output = vm.run(exec_argv(["echo", "hi"])).await?;
//! assert_eq!(output.stdout, b"hi\n");
//! vm.shutdown(Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

mod config;
mod pager;
mod restore;
mod runtime_dir;
pub mod vmm_api;
mod vmm_process;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use roost_agent_client::{
    AgentClient, Connector, Exec, ExecRequest, Output, ReadyError, ReadyListener, exec_argv,
};
use roost_net::SandboxNet;
use roost_proto::agent::{Hello, IdentityRequest};
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinHandle;
use vmm_api::ApiRequest;

pub use config::{
    ConfigError, NetAttachment, PagerOptions, RestoreConfig, RestoreMemory, RootfsMode,
    SNAPSHOT_STATE_FILE, SeccompMode, VmHandleConfig, default_vmm_binary,
};
pub use restore::IdentityError;
pub use runtime_dir::{
    RuntimeDir, RuntimeDirError, default_runtime_root, ensure_runtime_root, tail,
};
pub use vmm_api::{ApiError, RunState, SnapshotInfo, SnapshotKind};
pub use vmm_process::{VmmExit, VmmProcess};

/// How much of the serial log and the VMM's stderr an error carries.
const TAIL_BYTES: u64 = 2048;
/// How long the power-off request may take to be delivered before the grace period counts
/// only the wait for the VMM.
const POWEROFF_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long pause, resume and status may take through the VMM's API.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot may take (a full one writes all of guest memory).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A booted microVM whose agent has said hello. Dropping it kills and reaps the VMM and
/// removes its runtime directory.
#[derive(Debug)]
pub struct VmHandle {
    // Field order is drop order: the VMM is reaped before its page server and directory go.
    vmm: VmmProcess,
    /// The `roost-pager serve` process of a userfaultfd restore.
    pager: Option<VmmProcess>,
    runtime_dir: RuntimeDir,
    agent: AgentClient,
    hello: Hello,
    boot_to_ready: Duration,
    /// The VMM's control API, when it serves one.
    api_socket: Option<PathBuf>,
    /// The sandbox network the VMM runs in, removed after the VMM is reaped (last field).
    network: Option<SandboxNet>,
}

impl VmHandle {
    /// Validates `config`, creates the runtime directory, binds the ready listener, spawns the
    /// VMM and waits for the agent's hello. Whatever fails, nothing is left behind.
    pub async fn boot(config: VmHandleConfig) -> Result<Self, BootError> {
        config.validate()?;
        let runtime_dir = RuntimeDir::create(&config.runtime_dir)?;
        let rootfs = match config.rootfs_mode {
            RootfsMode::ReadOnly | RootfsMode::Overlay | RootfsMode::Device => {
                config.rootfs.clone()
            }
            RootfsMode::WritableCopy => {
                let copy = runtime_dir.rootfs_copy();
                let (from, to) = (config.rootfs.clone(), copy.clone());
                tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(|source| BootError::CopyRootfs {
                        from: config.rootfs.clone(),
                        source,
                    })?;
                copy
            }
        };
        // Bound before the VMM starts, so the agent's announcement cannot be missed.
        let ready = ReadyListener::for_vm(runtime_dir.vsock_socket()).map_err(BootError::Ready)?;
        let command = vmm_command(&config, &runtime_dir, &rootfs)?;
        let started = Instant::now();
        let vmm = VmmProcess::spawn(command, runtime_dir.path().to_owned()).map_err(|source| {
            BootError::Spawn {
                binary: config.vmm_binary.clone(),
                source,
            }
        })?;
        tracing::debug!(pid = vmm.pid(), dir = %runtime_dir.path().display(), "VMM started");

        let hello = tokio::select! {
            hello = ready.accept_hello(config.ready_timeout) => hello,
            exit = vmm.exited() => {
                return Err(BootError::VmmExited { exit, log: logs(&runtime_dir) });
            }
        };
        drop(ready);
        let hello = match hello {
            Ok(hello) => hello,
            Err(ReadyError::Timeout(timeout)) => {
                let mut vmm = vmm;
                vmm.kill_and_reap();
                return Err(BootError::ReadyTimeout {
                    timeout,
                    log: logs(&runtime_dir),
                });
            }
            // The VMM and the directory are freed on return (drop order: VMM first).
            Err(e) => return Err(BootError::Ready(e)),
        };
        let boot_to_ready = started.elapsed();
        tracing::info!(
            ms = boot_to_ready.as_millis(),
            hostname = %hello.hostname,
            "the agent is ready"
        );
        Ok(Self {
            agent: AgentClient::new(Connector::vm(runtime_dir.vsock_socket())),
            api_socket: config.control_api.then(|| runtime_dir.api_socket()),
            vmm,
            pager: None,
            runtime_dir,
            hello,
            boot_to_ready,
            network: None,
        })
    }

    /// Restores a VM from `config.snapshot_dir` and hands its agent `identity` (retrying until
    /// the agent answers, bounded by `config.ready_timeout`). The returned handle is ready and
    /// serves the control API. Whatever fails, nothing is left behind; an agent that did not
    /// apply every machine-wide part of the identity (entropy above all: clones must never
    /// share random state) fails the restore.
    pub async fn restore(
        config: RestoreConfig,
        identity: &IdentityRequest,
    ) -> Result<Self, BootError> {
        Self::restore_then(config, async |agent, deadline| {
            restore::hand_identity(agent, identity, deadline).await
        })
        .await
    }

    /// Restores a VM and waits until its agent answers, without giving it an identity: a
    /// pre-warmed clone for a pool. It still carries the template's identity (hostname,
    /// random state) until [`VmHandle::take_identity`]; it must not run anything before.
    pub async fn restore_warm(config: RestoreConfig) -> Result<Self, BootError> {
        Self::restore_then(config, async |agent, deadline| {
            restore::await_hello(agent, deadline).await
        })
        .await
    }

    /// Hands a warm clone ([`VmHandle::restore_warm`]) its identity, within `timeout`, in one
    /// exchange with its agent (this is on a create's clock).
    pub async fn take_identity(
        &mut self,
        identity: &IdentityRequest,
        timeout: Duration,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        let applied = tokio::select! {
            applied = restore::apply_identity(&self.agent, identity, deadline) => applied,
            exit = self.vmm.exited() => {
                return Err(VmError::VmmExited { exit, log: self.logs() });
            }
        };
        applied.map_err(VmError::Identity)?;
        // The same agent answered the warm clone's hello: only its hostname changed (applying
        // it was checked), so no second exchange is needed to learn it.
        self.hello.hostname.clone_from(&identity.hostname);
        Ok(())
    }

    /// Spawns the page server (for a userfaultfd restore) and the restoring VMM, then runs
    /// `until_ready` against its agent (bounded by `config.ready_timeout`).
    async fn restore_then(
        config: RestoreConfig,
        until_ready: impl AsyncFnOnce(&AgentClient, Instant) -> Result<Hello, IdentityError>,
    ) -> Result<Self, BootError> {
        config.validate()?;
        let runtime_dir = RuntimeDir::create(&config.runtime_dir)?;
        let started = Instant::now();
        let pager = match &config.memory {
            RestoreMemory::Map => None,
            RestoreMemory::Uffd(options) => {
                Some(pager::start(options, &config.snapshot_dir, &runtime_dir).await?)
            }
        };
        let command = restore_command(&config, &runtime_dir)?;
        let vmm = VmmProcess::spawn(command, runtime_dir.path().to_owned()).map_err(|source| {
            BootError::Spawn {
                binary: config.vmm_binary.clone(),
                source,
            }
        })?;
        tracing::debug!(pid = vmm.pid(), dir = %runtime_dir.path().display(), "VMM restoring");
        let agent = AgentClient::new(Connector::vm(runtime_dir.vsock_socket()));
        let deadline = Instant::now() + config.ready_timeout;
        let ready = tokio::select! {
            ready = until_ready(&agent, deadline) => ready,
            exit = vmm.exited() => {
                return Err(BootError::VmmExited { exit, log: logs(&runtime_dir) });
            }
        };
        let hello = match ready {
            Ok(hello) => hello,
            Err(source) => {
                let mut vmm = vmm;
                vmm.kill_and_reap();
                return Err(BootError::Identity {
                    source,
                    log: logs(&runtime_dir),
                });
            }
        };
        let boot_to_ready = started.elapsed();
        tracing::info!(
            ms = boot_to_ready.as_millis(),
            hostname = %hello.hostname,
            "the restored agent is ready"
        );
        Ok(Self {
            agent,
            api_socket: Some(runtime_dir.api_socket()),
            vmm,
            pager,
            runtime_dir,
            hello,
            boot_to_ready,
            network: None,
        })
    }

    /// Makes `network` (the namespace the VMM was started in, [`RestoreConfig::netns`]) part of
    /// this VM: it is removed with it.
    pub fn attach_network(&mut self, network: SandboxNet) {
        self.network = Some(network);
    }

    /// The sandbox network the VMM runs in, if one was attached.
    pub fn network(&self) -> Option<&SandboxNet> {
        self.network.as_ref()
    }

    /// The same, to give it its policy ([`roost_net::NetManager::activate`]).
    pub fn network_mut(&mut self) -> Option<&mut SandboxNet> {
        self.network.as_mut()
    }

    /// The agent's hello (versions, hostname).
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// From spawning the VMM to the agent's hello (after a restore: to its identity applied).
    pub fn boot_to_ready(&self) -> Duration {
        self.boot_to_ready
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vmm.pid()
    }

    pub fn runtime_dir(&self) -> &Path {
        self.runtime_dir.path()
    }

    /// The client for operations this handle does not wrap (files, health).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The VMM's exit, if it has exited (the guest shut down or panicked, or it was killed).
    pub fn exit(&self) -> Option<VmmExit> {
        self.vmm.try_exit()
    }

    /// Resolves when the VMM exits, for whatever reason.
    pub async fn exited(&self) -> VmmExit {
        self.vmm.exited().await
    }

    /// The tail of the serial console and the VMM's stderr (for error reports).
    pub fn logs(&self) -> String {
        logs(&self.runtime_dir)
    }

    /// Starts a process in the guest.
    pub async fn exec(&self, request: ExecRequest) -> Result<Exec, VmError> {
        self.ensure_running()?;
        let result = self.agent.exec(request).await;
        result.map_err(|e| self.agent_error(e))
    }

    /// Runs a process to its end and collects its output (bounded output only).
    pub async fn run(&self, request: ExecRequest) -> Result<Output, VmError> {
        self.ensure_running()?;
        let result = self.agent.run(request).await;
        result.map_err(|e| self.agent_error(e))
    }

    /// A byte stream to `127.0.0.1:port` inside the guest.
    pub async fn forward_port(&self, port: u16) -> Result<UnixStream, VmError> {
        self.ensure_running()?;
        let result = self.agent.forward_port(port).await;
        result.map_err(|e| self.agent_error(e))
    }

    /// Forwards every connection accepted on `listener` to guest `port` until the returned
    /// task is aborted (or the VM is gone: connections then fail and are closed).
    pub fn serve_forward(&self, listener: TcpListener, port: u16) -> JoinHandle<()> {
        self.agent.serve_forward(listener, port)
    }

    /// Parks the VM's vCPUs and devices (through the VMM's control API).
    pub async fn pause(&self) -> Result<(), VmError> {
        self.api(&ApiRequest::Pause, API_TIMEOUT).await.map(drop)
    }

    /// Lets a paused VM run again.
    pub async fn resume(&self) -> Result<(), VmError> {
        self.api(&ApiRequest::Resume, API_TIMEOUT).await.map(drop)
    }

    /// Whether the VM runs or is paused.
    pub async fn run_state(&self) -> Result<RunState, VmError> {
        let reply = self.api(&ApiRequest::Status, API_TIMEOUT).await?;
        reply
            .state
            .ok_or_else(|| VmError::Api(ApiError::BadReply("status without a state".into())))
    }

    /// Writes a snapshot of the VM into `dir` (absolute; created by the VMM, its parent must
    /// exist). A diff snapshot needs `parent`. The VM stays paused afterwards unless `resume`.
    pub async fn snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        parent: Option<&Path>,
        resume: bool,
    ) -> Result<SnapshotInfo, VmError> {
        let request = ApiRequest::Snapshot {
            dir: dir.to_owned(),
            kind,
            parent: parent.map(Path::to_owned),
            resume,
        };
        let reply = self.api(&request, SNAPSHOT_TIMEOUT).await?;
        reply
            .snapshot
            .ok_or_else(|| VmError::Api(ApiError::BadReply("snapshot reply without info".into())))
    }

    async fn api(
        &self,
        request: &ApiRequest,
        timeout: Duration,
    ) -> Result<vmm_api::ApiReply, VmError> {
        self.ensure_running()?;
        let socket = self.api_socket.as_deref().ok_or(VmError::NoControlApi)?;
        match vmm_api::call(socket, request, timeout).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(match self.vmm.try_exit() {
                Some(exit) => VmError::VmmExited {
                    exit,
                    log: self.logs(),
                },
                None => VmError::Api(e),
            }),
        }
    }

    /// Asks the guest to power off (`roost-agent poweroff` through the agent), waits up to
    /// `grace` for the VMM to exit, then SIGKILLs it. Returns how the VMM ended; the runtime
    /// directory is gone afterwards.
    pub async fn shutdown(mut self, grace: Duration) -> VmmExit {
        if let Some(exit) = self.vmm.try_exit() {
            return self.finish(exit);
        }
        let deadline = Instant::now() + grace;
        let request = self.agent.run(exec_argv(["roost-agent", "poweroff"]));
        let requested = tokio::select! {
            result = tokio::time::timeout(POWEROFF_REQUEST_TIMEOUT.min(grace), request) => {
                result.map_err(|_| "no answer".to_owned()).and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()))
            }
            exit = self.vmm.exited() => return self.finish(exit),
        };
        if let Err(e) = requested {
            // The power-off may end the VM before the agent answers; only the wait decides.
            tracing::debug!("power-off request: {e}");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(exit) = self.vmm.exited_within(left).await {
            return self.finish(exit);
        }
        tracing::warn!(
            pid = self.vmm.pid(),
            ?grace,
            "the guest did not power off; killing the VMM"
        );
        let exit = self.vmm.kill_and_reap().unwrap_or(VmmExit::Signal(9));
        self.finish(exit)
    }

    /// SIGKILLs the VMM, reaps it and removes the runtime directory.
    pub fn kill(mut self) -> VmmExit {
        let exit = self.vmm.kill_and_reap().unwrap_or(VmmExit::Signal(9));
        self.finish(exit)
    }

    /// Asks the page server of a userfaultfd restore with a `record` file to write the pages
    /// touched so far as the working set (call when the first command has finished). False
    /// when there is no page server or it is gone.
    pub fn record_working_set(&self) -> bool {
        self.pager
            .as_ref()
            .is_some_and(|pager| pager.signal(Signal::SIGUSR1))
    }

    /// Sends SIGTERM to the VMM (it stops its vCPUs and exits with status 5).
    pub fn terminate(&self) -> bool {
        self.vmm.signal(Signal::SIGTERM)
    }

    fn finish(mut self, exit: VmmExit) -> VmmExit {
        self.vmm.kill_and_reap();
        drop(self);
        exit
    }

    fn ensure_running(&self) -> Result<(), VmError> {
        match self.vmm.try_exit() {
            Some(exit) => Err(VmError::VmmExited {
                exit,
                log: self.logs(),
            }),
            None => Ok(()),
        }
    }

    /// An agent failure, explained by the VMM's exit when the VM is gone.
    fn agent_error(&self, source: roost_agent_client::Error) -> VmError {
        match self.vmm.try_exit() {
            Some(exit) => VmError::VmmExited {
                exit,
                log: self.logs(),
            },
            None => VmError::Agent(source),
        }
    }
}

/// `roost vm run` for `config`, logging into `dir`.
fn vmm_command(
    config: &VmHandleConfig,
    dir: &RuntimeDir,
    rootfs: &Path,
) -> Result<Command, BootError> {
    let stderr = std::fs::File::create(dir.vmm_stderr()).map_err(|source| BootError::Io {
        path: dir.vmm_stderr(),
        source,
    })?;
    let mut command = Command::new(&config.vmm_binary);
    command
        .args(["vm", "run", "--kernel"])
        .arg(&config.kernel)
        .arg("--rootfs")
        .arg(rootfs)
        .args(["--cpus", &config.cpus.to_string()])
        .args(["--mem", &config.mem_mib.to_string()])
        .arg("--vsock-uds")
        .arg(dir.vsock_socket())
        .arg("--serial-log")
        .arg(dir.serial_log())
        .args(["--seccomp", config.seccomp.as_arg()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    match config.rootfs_mode {
        RootfsMode::ReadOnly => {
            command.arg("--rootfs-ro");
        }
        RootfsMode::Overlay => {
            command.arg("--rootfs-overlay").arg(dir.rootfs_overlay());
        }
        RootfsMode::WritableCopy | RootfsMode::Device => {}
    }
    if let Some(extra) = &config.cmdline_extra {
        command.arg("--append").arg(extra);
    }
    if config.control_api {
        command.arg("--api-socket").arg(dir.api_socket());
    }
    if let Some(net) = &config.net {
        command.arg("--net-tap").arg(&net.tap);
        enter_netns(&mut command, &net.netns)?;
    }
    Ok(command)
}

/// Makes `command` start in the network namespace `name`.
fn enter_netns(command: &mut Command, name: &str) -> Result<(), BootError> {
    roost_net::netns::command_in(name, command).map_err(|source| BootError::Netns {
        netns: name.to_owned(),
        source,
    })
}

/// `roost vm run --restore` for `config`, logging into `dir`, with the control API on.
fn restore_command(config: &RestoreConfig, dir: &RuntimeDir) -> Result<Command, BootError> {
    let stderr = std::fs::File::create(dir.vmm_stderr()).map_err(|source| BootError::Io {
        path: dir.vmm_stderr(),
        source,
    })?;
    let mut command = Command::new(&config.vmm_binary);
    command
        .args(["vm", "run", "--restore"])
        .arg(&config.snapshot_dir)
        .arg("--vsock-uds")
        .arg(dir.vsock_socket())
        .arg("--serial-log")
        .arg(dir.serial_log())
        .arg("--api-socket")
        .arg(dir.api_socket())
        // Used only when the snapshot's disk had an overlay: the clone's own copy-on-write
        // disk, recreated from the snapshot's layers.
        .arg("--rootfs-overlay")
        .arg(dir.rootfs_overlay())
        .args(["--seccomp", config.seccomp.as_arg()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if let RestoreMemory::Uffd(_) = config.memory {
        command
            .args(["--memory-backend", "uffd", "--pager-socket"])
            .arg(dir.pager_socket());
    }
    if let Some(netns) = &config.netns {
        enter_netns(&mut command, netns)?;
    }
    Ok(command)
}

/// The last lines of the VMM's stderr and the serial console.
fn logs(dir: &RuntimeDir) -> String {
    let stderr = tail(&dir.vmm_stderr(), TAIL_BYTES);
    let serial = tail(&dir.serial_log(), TAIL_BYTES);
    let pager = tail(&dir.pager_stderr(), TAIL_BYTES);
    let mut out = String::new();
    if !pager.is_empty() {
        out.push_str("page server stderr:\n");
        out.push_str(&pager);
        out.push('\n');
    }
    if !stderr.is_empty() {
        out.push_str("VMM stderr:\n");
        out.push_str(&stderr);
        out.push('\n');
    }
    if !serial.is_empty() {
        out.push_str("serial console (tail):\n");
        out.push_str(&serial);
    }
    if out.is_empty() {
        out.push_str("(no VMM output, empty serial console)");
    }
    out
}

/// Booting a VM failed; the VMM, if it started, is reaped and the runtime directory removed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("cannot copy root filesystem {} into the runtime directory", from.display())]
    CopyRootfs {
        from: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VMM {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the agent failed")]
    Ready(#[source] ReadyError),
    #[error("the VMM exited before the agent was ready: {exit}\n{log}")]
    VmmExited { exit: VmmExit, log: String },
    #[error("the agent did not announce itself within {timeout:?}; the VMM was killed\n{log}")]
    ReadyTimeout { timeout: Duration, log: String },
    #[error("cannot start the VMM in network namespace {netns}")]
    Netns {
        netns: String,
        #[source]
        source: roost_net::netns::NetnsError,
    },
    #[error("the page server did not start listening on {}: {detail}", socket.display())]
    PagerStart { socket: PathBuf, detail: String },
    #[error("the restored agent did not take its identity; the VMM was killed\n{log}")]
    Identity {
        #[source]
        source: IdentityError,
        log: String,
    },
}

/// An operation on a booted VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("the VM is gone: {exit}\n{log}")]
    VmmExited { exit: VmmExit, log: String },
    #[error("the agent did not answer")]
    Agent(#[source] roost_agent_client::Error),
    #[error("the VMM's control API failed")]
    Api(#[source] ApiError),
    #[error("this VM was booted without the VMM's control API (VmHandleConfig::control_api)")]
    NoControlApi,
    #[error("the agent did not take its identity")]
    Identity(#[source] IdentityError),
}

#[cfg(test)]
mod tests;
