//! What the manager needs from a VM, as two small traits: [`VmBackend`] restores a VM from a
//! snapshot directory with an identity and an egress policy, [`SandboxVm`] snapshots and
//! destroys it. The real implementation is [`HandleBackend`] over [`VmHandle`] (a
//! `roost vm run --restore` child process), which with sandbox networking
//! ([`HandleBackend::net`]) starts each VMM in a network slot of its own that carries the
//! sandbox's policy and goes away with the VM; the manager's unit tests use an in-memory one,
//! so the bookkeeping (states, directories, errors) is tested without KVM.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use roost_net::{EgressPolicy, NetManager};
use roost_proto::agent::IdentityRequest;

use crate::vm_handle::{RestoreConfig, SeccompMode, SnapshotInfo, SnapshotKind, VmHandle};

/// A VM operation failed; the message carries the VMM's log tail when there is one.
pub type VmFailure = Box<dyn std::error::Error + Send + Sync>;

/// How long a destroyed VM's VMM gets to exit after SIGTERM when the handle is still shared
/// (a tunnel stream being opened) before the manager stops waiting for it.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);

/// Restores VMs.
pub trait VmBackend: Send + Sync + 'static {
    type Vm: SandboxVm;

    /// Restores the snapshot in `snapshot_dir` with its runtime directory at `runtime_dir`
    /// (which must not exist; its parent does) and hands the guest `identity`; its traffic
    /// follows `egress` (a backend without networking gives the VM none at all). On failure
    /// nothing may be left in `runtime_dir`.
    fn restore(
        &self,
        snapshot_dir: &Path,
        runtime_dir: &Path,
        identity: &IdentityRequest,
        egress: &EgressPolicy,
    ) -> impl Future<Output = Result<Self::Vm, VmFailure>> + Send;
}

/// One running VM.
pub trait SandboxVm: Send + Sync + 'static {
    /// Writes a snapshot into `dir` (created by the VMM; its parent exists). A diff needs the
    /// snapshot the VM was restored from as `parent`. The VM stays paused unless `resume`.
    fn snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        parent: Option<&Path>,
        resume: bool,
    ) -> impl Future<Output = Result<SnapshotInfo, VmFailure>> + Send;

    /// Lets a VM paused by a failed snapshot run again.
    fn resume(&self) -> impl Future<Output = Result<(), VmFailure>> + Send;

    /// The VMM's process id (for cgroups and `/proc` readings).
    fn pid(&self) -> u32;

    /// Its runtime directory (sockets, logs): `<runtime root>/<sandbox id>`, or a warm
    /// clone's `pool-…` directory.
    fn runtime_dir(&self) -> &Path;

    /// Stops the VMM and frees what it held on the host (process, sockets, runtime
    /// directory). `self` may still be shared by someone who opened a stream into it.
    fn destroy(self: Arc<Self>) -> impl Future<Output = ()> + Send;
}

/// Where a running sandbox's ports are reachable (the gateway tunnel's splicer,
/// [`super::SandboxSplicer`]).
pub trait Routes<V>: Send + Sync + 'static {
    /// `sandbox_id` now runs in `vm`.
    fn up(&self, sandbox_id: &str, vm: Arc<V>);
    /// `sandbox_id` no longer runs here.
    fn down(&self, sandbox_id: &str);
}

/// [`VmBackend`] over [`VmHandle::restore`].
#[derive(Debug, Clone)]
pub struct HandleBackend {
    /// The `roost` binary whose `vm run --restore` is the VMM.
    pub vmm_binary: PathBuf,
    /// How long a restored agent may take to take its identity.
    pub ready_timeout: Duration,
    pub seccomp: SeccompMode,
    /// Sandbox networking: each VMM starts in a slot of its own with the sandbox's policy.
    /// Without it VMs have no network namespace of their own and their snapshots must have no
    /// network device.
    pub net: Option<NetManager>,
}

impl HandleBackend {
    /// The `roost` next to this executable, a 120 s ready timeout, enforced seccomp, no
    /// networking.
    pub fn new() -> Self {
        let defaults = RestoreConfig::new("/", "/");
        Self {
            vmm_binary: defaults.vmm_binary,
            ready_timeout: Duration::from_secs(120),
            seccomp: SeccompMode::Enforce,
            net: None,
        }
    }

    /// The restore settings for one VM (its network namespace is set per VM).
    pub fn restore_config(&self, snapshot_dir: &Path, runtime_dir: &Path) -> RestoreConfig {
        let mut config = RestoreConfig::new(snapshot_dir, runtime_dir);
        config.vmm_binary = self.vmm_binary.clone();
        config.ready_timeout = self.ready_timeout;
        config.seccomp = self.seccomp;
        config
    }

    /// Gives a VM restored in reserved networking (a warm clone's) its sandbox's policy.
    pub async fn activate_network(
        &self,
        vm: &mut VmHandle,
        egress: &EgressPolicy,
    ) -> Result<(), VmFailure> {
        if let (Some(net), Some(network)) = (&self.net, vm.network_mut())
            && !network.is_active()
        {
            net.activate(network, egress.clone()).await?;
        }
        Ok(())
    }
}

impl Default for HandleBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl VmBackend for HandleBackend {
    type Vm = VmHandle;

    async fn restore(
        &self,
        snapshot_dir: &Path,
        runtime_dir: &Path,
        identity: &IdentityRequest,
        egress: &EgressPolicy,
    ) -> Result<VmHandle, VmFailure> {
        let mut config = self.restore_config(snapshot_dir, runtime_dir);
        let Some(net) = &self.net else {
            return Ok(VmHandle::restore(config, identity).await?);
        };
        // The policy is in force before the guest runs; a failed restore drops (removes) it.
        let network = net.acquire(egress.clone()).await?;
        config.netns = Some(network.netns().to_owned());
        let mut vm = VmHandle::restore(config, identity).await?;
        vm.attach_network(network);
        Ok(vm)
    }
}

impl SandboxVm for VmHandle {
    async fn snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        parent: Option<&Path>,
        resume: bool,
    ) -> Result<SnapshotInfo, VmFailure> {
        Ok(VmHandle::snapshot(self, dir, kind, parent, resume).await?)
    }

    async fn resume(&self) -> Result<(), VmFailure> {
        Ok(VmHandle::resume(self).await?)
    }

    fn pid(&self) -> u32 {
        self.vmm_pid()
    }

    fn runtime_dir(&self) -> &Path {
        VmHandle::runtime_dir(self)
    }

    async fn destroy(self: Arc<Self>) {
        match Arc::try_unwrap(self) {
            Ok(vm) => {
                let exit = vm.kill();
                tracing::debug!(%exit, "sandbox VM destroyed");
            }
            Err(shared) => {
                // Someone is opening a stream into it: stop the VMM now; the runtime directory
                // goes with the last handle, moments later.
                shared.terminate();
                if tokio::time::timeout(TERMINATE_WAIT, shared.exited())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        pid = shared.vmm_pid(),
                        "the VMM did not exit after SIGTERM; it is killed with its last handle"
                    );
                }
            }
        }
    }
}
