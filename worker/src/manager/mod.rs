//! The sandbox manager: which sandboxes this worker holds and in which state, and the one
//! place that turns control's operations into VM actions and files.
//!
//! - **create** restores a clone of a template snapshot (a built-in template such as `base`,
//!   or a snapshot this worker took) and hands it its identity: the sandbox id (also its
//!   hostname), env vars, envd access token, fresh entropy and the clock.
//! - **pause** writes a snapshot of memory and device state into the data directory (a diff
//!   against the snapshot the VM was restored from, by default), then tears the VM down and
//!   frees every host resource; **resume** restores from that snapshot, repeatably — each
//!   pause writes a new generation; older generations stay while its disk chain reads layers
//!   from them (chains merge at depth 4, then they are removed).
//! - **snapshot** saves a running sandbox as a template later creates can use (the VM keeps
//!   running); **delete template** removes one.
//! - **kill** stops the VMM and removes everything of the sandbox: runtime directory (sockets,
//!   logs), paused snapshots, cgroup, tunnel route.
//! - **metrics** samples the sandbox's cgroup, or its VMM's `/proc` entry.
//!
//! Operations on one sandbox are serialised by a busy marker: while one runs, others on the
//! same sandbox are refused with [`ManagerError::Busy`] (control does not issue concurrent
//! operations on one sandbox; the refusal guards against a retry racing the original).
//!
//! Each VM writes to its own copy-on-write overlay of the template's disk (in its runtime
//! directory); snapshots save it as disk layers. Every restore carries the sandbox's egress
//! policy (`allow_internet`, `allow_out`, `deny_out`, refused up front when malformed); a
//! backend with networking ([`HandleBackend::net`]) runs the VMM in a network slot of its own
//! that enforces it. Seams for what is not wired yet: the VMM is not jailed (the jailer plugs in
//! at [`VmBackend`]); cgroups are optional ([`SandboxManager::with_cgroups`]) and the VMM joins
//! its group right after it starts.

mod backend;
mod metrics;
mod pooled;
mod splice;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use roost_net::{EgressPolicy, PolicyError};
use roost_proto::SandboxId;
use roost_proto::agent::IdentityRequest;
use roost_proto::control::{
    Capacity, CreateSandbox, ErrorKind, MetricSample, SandboxReport, Usage, WorkerError,
    WorkerSandboxState,
};

pub use backend::{HandleBackend, Routes, SandboxVm, VmBackend, VmFailure};
pub use metrics::{Reading, parse_stat_cpu_ticks, read_proc};
pub use pooled::{PoolPlan, PooledBackend};
pub use splice::SandboxSplicer;
pub use store::{PausedRecord, SnapshotRecord};

use crate::cgroup::{CgroupError, CgroupTree, CpuSampler, Limits, SandboxCgroup};
use crate::vm_handle::{SNAPSHOT_STATE_FILE, SnapshotKind};

/// How long [`SandboxManager::shutdown`] waits for operations in flight.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);

/// What a manager is set up with.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Persistent: paused sandboxes and snapshot templates.
    pub data_dir: PathBuf,
    /// One runtime directory per running VM; emptied at start-up.
    pub runtime_root: PathBuf,
    /// Built-in templates offered, by the id control uses, with their snapshot directories.
    pub templates: BTreeMap<String, PathBuf>,
    /// What this host offers; `max_sandboxes` and `memory_mib` are enforced (0 = no limit).
    pub capacity: Capacity,
    /// How a pause saves memory: a diff against the snapshot the VM came from (the default),
    /// or everything.
    pub pause_snapshot: SnapshotKind,
}

impl ManagerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, runtime_root: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            runtime_root: runtime_root.into(),
            templates: BTreeMap::new(),
            capacity: Capacity::default(),
            pause_snapshot: SnapshotKind::Diff,
        }
    }
}

/// Why an operation failed; [`ManagerError::kind`] maps it onto the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("invalid sandbox id {0:?}")]
    InvalidId(String),
    #[error("invalid snapshot id {0:?}: use 1-64 letters, digits, '-' and '_'")]
    InvalidSnapshotId(String),
    #[error("no sandbox {0} on this worker")]
    UnknownSandbox(String),
    #[error("template {0} is not on this worker")]
    UnknownTemplate(String),
    #[error("sandbox {0} already exists on this worker")]
    AlreadyExists(String),
    #[error("a template {0} already exists on this worker")]
    TemplateExists(String),
    #[error("template {0} is built in and cannot be deleted")]
    BuiltInTemplate(String),
    #[error("sandbox {id} is {state}; cannot {op} it")]
    WrongState {
        id: String,
        state: &'static str,
        op: &'static str,
    },
    #[error("sandbox {id} is busy ({doing}); cannot {op} it now")]
    Busy {
        id: String,
        doing: &'static str,
        op: &'static str,
    },
    #[error("this worker is full: {0}")]
    NoCapacity(String),
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("cannot make the sandbox's identity: {0}")]
    Identity(String),
    #[error("cannot {op} sandbox {id}")]
    Vm {
        id: String,
        op: &'static str,
        #[source]
        source: VmFailure,
    },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("invalid egress policy")]
    Egress(#[from] PolicyError),
}

impl ManagerError {
    /// The protocol's kind for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidId(_)
            | Self::InvalidSnapshotId(_)
            | Self::BuiltInTemplate(_)
            | Self::Egress(_) => ErrorKind::InvalidRequest,
            Self::UnknownSandbox(_) => ErrorKind::UnknownSandbox,
            Self::UnknownTemplate(_) => ErrorKind::UnknownTemplate,
            Self::AlreadyExists(_)
            | Self::TemplateExists(_)
            | Self::WrongState { .. }
            | Self::Busy { .. }
            | Self::ShuttingDown => ErrorKind::InvalidState,
            Self::NoCapacity(_) => ErrorKind::NoCapacity,
            Self::Identity(_) | Self::Vm { .. } | Self::Io { .. } | Self::Cgroup(_) => {
                ErrorKind::Internal
            }
        }
    }
}

impl From<ManagerError> for WorkerError {
    fn from(error: ManagerError) -> Self {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        WorkerError {
            kind: error.kind(),
            message,
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ManagerError {
    let path = path.to_owned();
    move |source| ManagerError::Io {
        action,
        path,
        source,
    }
}

/// The egress policy control asked for (`allow_internet_access`, `allowOut`, `denyOut`).
fn egress_policy(spec: &CreateSandbox) -> Result<EgressPolicy, PolicyError> {
    EgressPolicy::parse(spec.allow_internet, &spec.allow_out, &spec.deny_out)
}

/// The sandbox's size as control asked for it (the VM's own shape is its template's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    team_id: String,
    template_id: String,
    vcpus: u32,
    memory_mib: u64,
    disk_mib: u64,
}

impl Shape {
    fn of(spec: &CreateSandbox) -> Self {
        Self {
            team_id: spec.team_id.clone(),
            template_id: spec.template_id.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
        }
    }

    fn record(&self, sandbox_id: &str, generation: u64, paused: bool) -> PausedRecord {
        PausedRecord {
            sandbox_id: sandbox_id.to_owned(),
            team_id: self.team_id.clone(),
            template_id: self.template_id.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            generation: store::generation_name(generation),
            paused,
        }
    }
}

struct Running<V> {
    vm: Arc<V>,
    /// The snapshot directory the VM was restored from: the parent of a diff pause.
    origin: PathBuf,
    cgroup: Option<SandboxCgroup>,
    sampler: CpuSampler,
}

enum State<V> {
    /// An operation is under way; `report` is what heartbeats say meanwhile.
    Busy {
        doing: &'static str,
        report: WorkerSandboxState,
    },
    Running(Running<V>),
    /// Snapshotted into generation `gen-<n>` of its paused directory.
    Paused {
        generation: u64,
    },
}

impl<V> State<V> {
    fn name(&self) -> &'static str {
        match self {
            Self::Busy { .. } => "busy",
            Self::Running(_) => "running",
            Self::Paused { .. } => "paused",
        }
    }
}

struct Entry<V> {
    shape: Shape,
    state: State<V>,
    /// The highest generation number used so far.
    last_generation: u64,
}

struct Inner<V> {
    sandboxes: BTreeMap<String, Entry<V>>,
    snapshots: BTreeMap<String, SnapshotRecord>,
    /// Snapshot ids being written, not offered yet.
    snapshots_in_progress: Vec<String>,
    /// Deleted snapshot templates whose files stay until no held sandbox came from them.
    deleted_snapshots: Vec<String>,
    shutting_down: bool,
}

/// The sandboxes of one worker.
pub struct SandboxManager<B: VmBackend> {
    config: ManagerConfig,
    backend: B,
    inner: Mutex<Inner<B::Vm>>,
    routes: Option<Arc<dyn Routes<B::Vm>>>,
    cgroups: Option<CgroupTree>,
}

impl<B: VmBackend> std::fmt::Debug for SandboxManager<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<B: VmBackend> SandboxManager<B> {
    /// Prepares the directories, removes what a previous run left in the runtime root, and
    /// takes over the paused sandboxes and snapshot templates in the data directory.
    pub fn open(config: ManagerConfig, backend: B) -> Result<Self, ManagerError> {
        crate::vm_handle::ensure_runtime_root(&config.runtime_root).map_err(|e| {
            ManagerError::Io {
                action: "create",
                path: config.runtime_root.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        for stale in store::clear_runtime_root(&config.runtime_root)
            .map_err(io_error("clear", &config.runtime_root))?
        {
            tracing::info!(path = %stale.display(), "removed a previous run's runtime directory");
        }
        let recovered =
            store::recover(&config.data_dir).map_err(io_error("read", &config.data_dir))?;
        for path in &recovered.removed {
            tracing::info!(path = %path.display(), "removed an incomplete snapshot");
        }
        let sandboxes = recovered
            .paused
            .into_iter()
            .filter_map(|(id, record)| {
                let generation = store::generation_number(&record.generation)?;
                let shape = Shape {
                    team_id: record.team_id,
                    template_id: record.template_id,
                    vcpus: record.vcpus,
                    memory_mib: record.memory_mib,
                    disk_mib: record.disk_mib,
                };
                let entry = Entry {
                    shape,
                    state: State::Paused { generation },
                    last_generation: generation,
                };
                Some((id, entry))
            })
            .collect();
        Ok(Self {
            config,
            backend,
            inner: Mutex::new(Inner {
                sandboxes,
                snapshots: recovered.snapshots,
                snapshots_in_progress: Vec::new(),
                deleted_snapshots: Vec::new(),
                shutting_down: false,
            }),
            routes: None,
            cgroups: None,
        })
    }

    /// Tells `routes` (the gateway tunnel's splicer) where running sandboxes are.
    pub fn with_routes(mut self, routes: Arc<dyn Routes<B::Vm>>) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Puts every VMM into its own group under `tree` (limits from the sandbox's size) and
    /// removes groups a previous run left.
    pub fn with_cgroups(mut self, tree: CgroupTree) -> Result<Self, ManagerError> {
        let removed = tree.remove_stale(&std::collections::HashSet::new())?;
        for name in removed {
            tracing::info!(cgroup = name, "removed a previous run's sandbox cgroup");
        }
        self.cgroups = Some(tree);
        Ok(self)
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner<B::Vm>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn runtime_dir(&self, id: &str) -> PathBuf {
        self.config.runtime_root.join(id)
    }

    /// The snapshot directory a create from `template_id` restores.
    fn template_snapshot(&self, inner: &Inner<B::Vm>, template_id: &str) -> Option<PathBuf> {
        if let Some(dir) = self.config.templates.get(template_id) {
            return Some(dir.clone());
        }
        inner.snapshots.get(template_id).map(|_| {
            store::snapshot_entry(&self.config.data_dir, template_id).join(store::SNAPSHOT_SUBDIR)
        })
    }

    /// Templates this worker can start sandboxes from.
    pub fn templates(&self) -> Vec<String> {
        let inner = self.lock();
        let mut all: Vec<String> = self.config.templates.keys().cloned().collect();
        all.extend(inner.snapshots.keys().cloned());
        all
    }

    /// Every sandbox held, with its state.
    pub fn reports(&self) -> Vec<SandboxReport> {
        self.lock()
            .sandboxes
            .iter()
            .map(|(id, entry)| SandboxReport {
                sandbox_id: id.clone(),
                state: match &entry.state {
                    State::Busy { report, .. } => *report,
                    State::Running(_) => WorkerSandboxState::Running,
                    State::Paused { .. } => WorkerSandboxState::Paused,
                },
            })
            .collect()
    }

    /// What running and paused sandboxes take of the capacity.
    pub fn usage(&self) -> Usage {
        let inner = self.lock();
        let mut usage = Usage::default();
        for entry in inner.sandboxes.values() {
            usage.sandboxes += 1;
            usage.vcpus = usage.vcpus.saturating_add(entry.shape.vcpus);
            usage.memory_mib = usage.memory_mib.saturating_add(entry.shape.memory_mib);
            usage.disk_mib = usage.disk_mib.saturating_add(entry.shape.disk_mib);
        }
        usage
    }

    /// Marks `id` busy with `doing` if it is in a state `accept` takes (returning what it
    /// takes out), else says why not.
    fn begin<T>(
        &self,
        id: &str,
        op: &'static str,
        doing: &'static str,
        report: WorkerSandboxState,
        accept: impl FnOnce(State<B::Vm>) -> Result<T, State<B::Vm>>,
    ) -> Result<(T, Shape), ManagerError> {
        let mut inner = self.lock();
        if inner.shutting_down {
            return Err(ManagerError::ShuttingDown);
        }
        let entry = inner
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| ManagerError::UnknownSandbox(id.to_owned()))?;
        if let State::Busy { doing: other, .. } = &entry.state {
            return Err(ManagerError::Busy {
                id: id.to_owned(),
                doing: other,
                op,
            });
        }
        let state = std::mem::replace(&mut entry.state, State::Busy { doing, report });
        match accept(state) {
            Ok(taken) => Ok((taken, entry.shape.clone())),
            Err(state) => {
                let name = state.name();
                entry.state = state;
                Err(ManagerError::WrongState {
                    id: id.to_owned(),
                    state: name,
                    op,
                })
            }
        }
    }

    /// Ends an operation on `id` with `state`.
    fn settle(&self, id: &str, state: State<B::Vm>) {
        if let Some(entry) = self.lock().sandboxes.get_mut(id) {
            entry.state = state;
        }
    }

    fn identity(spec: &CreateSandbox) -> Result<IdentityRequest, ManagerError> {
        clone_identity(
            &spec.sandbox_id,
            &spec.sandbox_id,
            spec.env_vars.clone(),
            spec.envd_access_token.clone(),
        )
    }

    /// Restores `snapshot` as sandbox `spec.sandbox_id` and joins it to its cgroup and route.
    async fn start_vm(
        &self,
        spec: &CreateSandbox,
        snapshot: &Path,
        op: &'static str,
    ) -> Result<Running<B::Vm>, ManagerError> {
        let id = spec.sandbox_id.as_str();
        let identity = Self::identity(spec)?;
        let egress = egress_policy(spec)?;
        let runtime_dir = self.runtime_dir(id);
        let restored = self
            .backend
            .restore(snapshot, &runtime_dir, &identity, &egress)
            .await;
        let vm = match restored {
            Ok(vm) => Arc::new(vm),
            Err(source) => {
                // The backend frees what it made; a directory it could not is stale.
                let _ = store::remove_all(&runtime_dir);
                return Err(ManagerError::Vm {
                    id: id.to_owned(),
                    op,
                    source,
                });
            }
        };
        let cgroup = match self.join_cgroup(id, spec, vm.pid()) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                vm.destroy().await;
                let _ = store::remove_all(&runtime_dir);
                return Err(e);
            }
        };
        if let Some(routes) = &self.routes {
            routes.up(id, vm.clone());
        }
        tracing::info!(
            sandbox = id,
            runtime_dir = %vm.runtime_dir().display(),
            pid = vm.pid(),
            "sandbox VM running"
        );
        Ok(Running {
            vm,
            origin: snapshot.to_owned(),
            cgroup,
            sampler: CpuSampler::new(spec.vcpus),
        })
    }

    fn join_cgroup(
        &self,
        id: &str,
        spec: &CreateSandbox,
        pid: u32,
    ) -> Result<Option<SandboxCgroup>, ManagerError> {
        let Some(tree) = &self.cgroups else {
            return Ok(None);
        };
        let vcpus = u8::try_from(spec.vcpus.max(1)).unwrap_or(u8::MAX);
        let group = tree.create(id, &Limits::for_vm(vcpus, spec.memory_mib.max(64)))?;
        if let Err(e) = group.add_pid(pid) {
            let _ = group.remove();
            return Err(e.into());
        }
        Ok(Some(group))
    }

    /// Stops a running VM and frees its host resources (route, VMM, cgroup, runtime dir).
    async fn stop_vm(&self, id: &str, running: Running<B::Vm>) {
        if let Some(routes) = &self.routes {
            routes.down(id);
        }
        running.vm.destroy().await;
        if let Some(group) = running.cgroup
            && let Err(e) = group.remove()
        {
            tracing::warn!(sandbox = id, "cannot remove the sandbox's cgroup: {e}");
        }
        if let Err(e) = store::remove_all(&self.runtime_dir(id)) {
            tracing::warn!(sandbox = id, "cannot remove the runtime directory: {e}");
        }
    }

    /// Starts sandbox `spec.sandbox_id` from template `spec.template_id`.
    pub async fn create(&self, spec: &CreateSandbox) -> Result<(), ManagerError> {
        let id = spec.sandbox_id.as_str();
        if id.parse::<SandboxId>().is_err() || !store::valid_id(id) {
            return Err(ManagerError::InvalidId(id.to_owned()));
        }
        let snapshot = {
            let mut inner = self.lock();
            if inner.shutting_down {
                return Err(ManagerError::ShuttingDown);
            }
            let snapshot = self
                .template_snapshot(&inner, &spec.template_id)
                .ok_or_else(|| ManagerError::UnknownTemplate(spec.template_id.clone()))?;
            if inner.sandboxes.contains_key(id) {
                return Err(ManagerError::AlreadyExists(id.to_owned()));
            }
            self.check_capacity(&inner, spec)?;
            inner.sandboxes.insert(
                id.to_owned(),
                Entry {
                    shape: Shape::of(spec),
                    state: State::Busy {
                        doing: "creating",
                        report: WorkerSandboxState::Starting,
                    },
                    last_generation: 0,
                },
            );
            snapshot
        };
        match self.start_vm(spec, &snapshot, "create").await {
            Ok(running) => {
                self.settle(id, State::Running(running));
                tracing::info!(sandbox = id, template = %spec.template_id, "sandbox created");
                Ok(())
            }
            Err(e) => {
                self.lock().sandboxes.remove(id);
                Err(e)
            }
        }
    }

    fn check_capacity(
        &self,
        inner: &Inner<B::Vm>,
        spec: &CreateSandbox,
    ) -> Result<(), ManagerError> {
        let capacity = self.config.capacity;
        let held = u32::try_from(inner.sandboxes.len()).unwrap_or(u32::MAX);
        if capacity.max_sandboxes > 0 && held >= capacity.max_sandboxes {
            return Err(ManagerError::NoCapacity(format!(
                "{held} of {} sandboxes",
                capacity.max_sandboxes
            )));
        }
        let memory: u64 = inner.sandboxes.values().map(|e| e.shape.memory_mib).sum();
        if capacity.memory_mib > 0 && memory.saturating_add(spec.memory_mib) > capacity.memory_mib {
            return Err(ManagerError::NoCapacity(format!(
                "{memory} of {} MiB of memory handed out, {} more asked",
                capacity.memory_mib, spec.memory_mib
            )));
        }
        Ok(())
    }

    /// Stops the sandbox and removes everything it had on this host.
    pub async fn kill(&self, id: &str) -> Result<(), ManagerError> {
        let (running, _) = self.begin(
            id,
            "kill",
            "killing",
            WorkerSandboxState::Running,
            |state| match state {
                State::Running(running) => Ok(Some(running)),
                State::Paused { .. } => Ok(None),
                busy @ State::Busy { .. } => Err(busy),
            },
        )?;
        if let Some(running) = running {
            self.stop_vm(id, running).await;
        }
        let paused = store::paused_dir(&self.config.data_dir, id);
        let removed = store::remove_all(&paused);
        self.lock().sandboxes.remove(id);
        removed.map_err(io_error("remove", &paused))?;
        self.collect_deleted_snapshots()?;
        tracing::info!(sandbox = id, "sandbox killed");
        Ok(())
    }

    /// What a snapshot of `running` is taken against: a diff needs the snapshot it came from.
    fn snapshot_kind<'a>(
        &self,
        running: &'a Running<B::Vm>,
        wanted: SnapshotKind,
    ) -> (SnapshotKind, Option<&'a Path>) {
        let parent_ok = running.origin.join(SNAPSHOT_STATE_FILE).is_file();
        match wanted {
            SnapshotKind::Diff if parent_ok => (SnapshotKind::Diff, Some(&running.origin)),
            _ => (SnapshotKind::Full, None),
        }
    }

    /// Snapshots the sandbox into its paused directory and frees the VM.
    pub async fn pause(&self, id: &str) -> Result<(), ManagerError> {
        let (running, shape) = self.begin(
            id,
            "pause",
            "pausing",
            WorkerSandboxState::Running,
            |state| match state {
                State::Running(running) => Ok(running),
                other => Err(other),
            },
        )?;
        // The entry stays while it is busy (a kill waits its turn).
        let generation = self.lock().sandboxes.get_mut(id).map_or(1, |entry| {
            entry.last_generation += 1;
            entry.last_generation
        });
        let dir = store::paused_dir(&self.config.data_dir, id);
        let target = dir.join(store::generation_name(generation));
        let result = async {
            std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
            let (kind, parent) = self.snapshot_kind(&running, self.config.pause_snapshot);
            let started = Instant::now();
            let info = running
                .vm
                .snapshot(&target, kind, parent, false)
                .await
                .map_err(|source| ManagerError::Vm {
                    id: id.to_owned(),
                    op: "pause",
                    source,
                })?;
            let record = shape.record(id, generation, true);
            store::write_json(&dir.join(store::RECORD_FILE), &record)
                .map_err(io_error("write", &dir.join(store::RECORD_FILE)))?;
            tracing::info!(
                sandbox = id,
                ?kind,
                pages = info.memory_pages_written,
                ms = started.elapsed().as_millis(),
                "sandbox snapshotted for pause"
            );
            Ok(info)
        }
        .await;
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                let _ = store::remove_all(&target);
                // The snapshot leaves the VM paused; let it run again as it was.
                if let Err(resume) = running.vm.resume().await {
                    tracing::warn!(sandbox = id, "cannot resume after a failed pause: {resume}");
                }
                self.settle(id, State::Running(running));
                return Err(e);
            }
        };
        self.stop_vm(id, running).await;
        remove_newer_generations(&dir, generation);
        remove_unneeded_generations(&dir, generation, info.disk_chain.as_deref());
        self.settle(id, State::Paused { generation });
        tracing::info!(sandbox = id, generation, "sandbox paused");
        Ok(())
    }

    /// Restores a paused sandbox with the identity in `spec`.
    pub async fn resume(&self, spec: &CreateSandbox) -> Result<(), ManagerError> {
        let id = spec.sandbox_id.as_str();
        let (generation, shape) = self.begin(
            id,
            "resume",
            "resuming",
            WorkerSandboxState::Starting,
            |state| match state {
                State::Paused { generation } => Ok(generation),
                other => Err(other),
            },
        )?;
        let dir = store::paused_dir(&self.config.data_dir, id);
        let snapshot = dir.join(store::generation_name(generation));
        match self.start_vm(spec, &snapshot, "resume").await {
            Ok(running) => {
                // A crash from here on must not bring back this older state.
                let record = shape.record(id, generation, false);
                if let Err(e) = store::write_json(&dir.join(store::RECORD_FILE), &record) {
                    tracing::warn!(sandbox = id, "cannot mark the sandbox running: {e}");
                }
                self.settle(id, State::Running(running));
                tracing::info!(sandbox = id, generation, "sandbox resumed");
                Ok(())
            }
            Err(e) => {
                self.settle(id, State::Paused { generation });
                Err(e)
            }
        }
    }

    /// Saves running sandbox `id` as template `snapshot_id`; returns its size on disk.
    pub async fn snapshot(&self, id: &str, snapshot_id: &str) -> Result<u64, ManagerError> {
        if !store::valid_id(snapshot_id) {
            return Err(ManagerError::InvalidSnapshotId(snapshot_id.to_owned()));
        }
        {
            let mut inner = self.lock();
            if self.template_snapshot(&inner, snapshot_id).is_some()
                || inner.snapshots_in_progress.iter().any(|s| s == snapshot_id)
            {
                return Err(ManagerError::TemplateExists(snapshot_id.to_owned()));
            }
            inner.snapshots_in_progress.push(snapshot_id.to_owned());
        }
        let result = self.snapshot_running(id, snapshot_id).await;
        let mut inner = self.lock();
        inner.snapshots_in_progress.retain(|s| s != snapshot_id);
        let record = result?;
        let size = record.size_bytes;
        inner.snapshots.insert(snapshot_id.to_owned(), record);
        Ok(size)
    }

    async fn snapshot_running(
        &self,
        id: &str,
        snapshot_id: &str,
    ) -> Result<SnapshotRecord, ManagerError> {
        let (running, shape) = self.begin(
            id,
            "snapshot",
            "snapshotting",
            WorkerSandboxState::Running,
            |state| match state {
                State::Running(running) => Ok(running),
                other => Err(other),
            },
        )?;
        let entry = store::snapshot_entry(&self.config.data_dir, snapshot_id);
        let result = async {
            std::fs::create_dir_all(&entry).map_err(io_error("create", &entry))?;
            // Full: a template must not depend on the sandbox's own snapshots (its disk layers
            // would be read from them), which go when the sandbox is killed.
            let dir = entry.join(store::SNAPSHOT_SUBDIR);
            let (kind, parent) = (SnapshotKind::Full, None);
            running
                .vm
                .snapshot(&dir, kind, parent, true)
                .await
                .map_err(|source| ManagerError::Vm {
                    id: id.to_owned(),
                    op: "snapshot",
                    source,
                })?;
            let record = SnapshotRecord {
                snapshot_id: snapshot_id.to_owned(),
                sandbox_id: id.to_owned(),
                template_id: shape.template_id.clone(),
                size_bytes: crate::template::allocated_bytes(&dir),
            };
            let path = entry.join(store::TEMPLATE_RECORD_FILE);
            store::write_json(&path, &record).map_err(io_error("write", &path))?;
            Ok(record)
        }
        .await;
        if result.is_err() {
            let _ = store::remove_all(&entry);
            if let Err(e) = running.vm.resume().await {
                tracing::debug!(sandbox = id, "resume after a failed snapshot: {e}");
            }
        }
        self.settle(id, State::Running(running));
        result
    }

    /// Removes snapshot template `template_id`: it is no longer offered, and its files go
    /// once no sandbox held here came from it (their memory mappings and disk chains read
    /// them; a running clone's next pause is then a full snapshot).
    pub fn delete_template(&self, template_id: &str) -> Result<(), ManagerError> {
        if self.config.templates.contains_key(template_id) {
            return Err(ManagerError::BuiltInTemplate(template_id.to_owned()));
        }
        {
            let mut inner = self.lock();
            if inner.snapshots.remove(template_id).is_none() {
                return Err(ManagerError::UnknownTemplate(template_id.to_owned()));
            }
            inner.deleted_snapshots.push(template_id.to_owned());
        }
        tracing::info!(template = template_id, "snapshot template deleted");
        self.collect_deleted_snapshots()
    }

    /// Removes the files of deleted snapshot templates no held sandbox came from.
    fn collect_deleted_snapshots(&self) -> Result<(), ManagerError> {
        let unused: Vec<String> = {
            let mut inner = self.lock();
            let Inner {
                sandboxes,
                deleted_snapshots,
                ..
            } = &mut *inner;
            let (unused, used): (Vec<String>, Vec<String>) = std::mem::take(deleted_snapshots)
                .into_iter()
                .partition(|t| !sandboxes.values().any(|e| &e.shape.template_id == t));
            *deleted_snapshots = used;
            unused
        };
        for template_id in unused {
            let entry = store::snapshot_entry(&self.config.data_dir, &template_id);
            store::remove_all(&entry).map_err(io_error("remove", &entry))?;
            tracing::info!(template = template_id, "snapshot template files removed");
        }
        Ok(())
    }

    /// One resource sample of a running sandbox; none for a paused or busy one.
    pub fn metrics(&self, id: &str) -> Result<Vec<MetricSample>, ManagerError> {
        let mut inner = self.lock();
        let entry = inner
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| ManagerError::UnknownSandbox(id.to_owned()))?;
        let State::Running(running) = &mut entry.state else {
            return Ok(Vec::new());
        };
        // The VMM joins its cgroup after it started, so the group is not charged for what
        // it mapped before: memory is the larger of the group's charge and the VMM's RSS.
        let process = metrics::read_proc(Path::new("/proc"), running.vm.pid());
        let reading = match &running.cgroup {
            Some(group) => metrics::read_cgroup(group)
                .map(|r| Reading {
                    cpu_usage_us: r.cpu_usage_us,
                    memory_bytes: r.memory_bytes.max(process.map_or(0, |p| p.memory_bytes)),
                })
                .or(process),
            None => process,
        };
        Ok(reading
            .map(|r| {
                metrics::sample(
                    r,
                    &mut running.sampler,
                    entry.shape.vcpus,
                    entry.shape.memory_mib,
                    entry.shape.disk_mib,
                )
            })
            .into_iter()
            .collect())
    }

    /// Refuses new operations, waits (bounded) for those under way, and stops every running
    /// VM. Paused sandboxes stay in the data directory and are reported again at the next
    /// start; nothing is left in the runtime root.
    pub async fn shutdown(&self) {
        self.lock().shutting_down = true;
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        loop {
            let busy = self
                .lock()
                .sandboxes
                .values()
                .any(|e| matches!(e.state, State::Busy { .. }));
            if !busy {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!("operations still under way at shutdown; stopping anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let running: Vec<(String, Running<B::Vm>)> = {
            let mut inner = self.lock();
            let ids: Vec<String> = inner
                .sandboxes
                .iter()
                .filter(|(_, e)| matches!(e.state, State::Running(_)))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| {
                    let entry = inner.sandboxes.remove(&id)?;
                    match entry.state {
                        State::Running(running) => Some((id, running)),
                        _ => None,
                    }
                })
                .collect()
        };
        for (id, running) in running {
            self.stop_vm(&id, running).await;
            // Its paused directory (after a resume) is older than what the user saw.
            let _ = store::remove_all(&store::paused_dir(&self.config.data_dir, &id));
            tracing::info!(sandbox = id, "sandbox stopped at shutdown");
        }
        if let Err(e) = store::clear_runtime_root(&self.config.runtime_root) {
            tracing::warn!("cannot empty the runtime root: {e}");
        }
    }
}

/// The identity a restored clone gets (also `roost sandbox run --template`): its id and
/// hostname, env vars, envd access token, fresh entropy from the host and the wall clock.
pub fn clone_identity(
    sandbox_id: &str,
    hostname: &str,
    env_vars: BTreeMap<String, String>,
    access_token: Option<String>,
) -> Result<IdentityRequest, ManagerError> {
    let mut identity = IdentityRequest::new(sandbox_id, hostname)
        .map_err(|e| ManagerError::Identity(e.to_string()))?;
    identity.env_vars = env_vars;
    identity.access_token = access_token;
    Ok(identity)
}

/// The `gen-<n>` entries of paused directory `dir`, with their numbers.
fn generations(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let n = entry
                .file_name()
                .to_str()
                .and_then(store::generation_number)?;
            Some((n, entry.path()))
        })
        .collect()
}

/// Removes one generation directory, logging (not failing) when it cannot.
fn remove_generation(path: &Path, why: &str) {
    match store::remove_all(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed a generation: {why}"),
        Err(e) => tracing::warn!(path = %path.display(), "cannot remove a generation ({why}): {e}"),
    }
}

/// Removes the generations in a paused directory newer than `keep` (left by a pause that
/// failed). Older ones are [`remove_unneeded_generations`]' business.
fn remove_newer_generations(dir: &Path, keep: u64) {
    for (_, path) in generations(dir).into_iter().filter(|(n, _)| *n > keep) {
        remove_generation(&path, "left by a failed pause");
    }
}

/// Removes the generations in paused directory `dir` older than `newest` that the newest
/// snapshot no longer reads. Its memory generations are hard-linked into its own directory;
/// its disk may still read layers from its parents' directories (`disk_chain`, as the VMM
/// reported it) until the chain merges (at depth 4), after which the older generations go.
/// Without a reported chain, or when a layer cannot be resolved, every generation stays: a
/// needed one must never be removed.
fn remove_unneeded_generations(dir: &Path, newest: u64, disk_chain: Option<&[PathBuf]>) {
    let Some(chain) = disk_chain else {
        return;
    };
    let Ok(layers) = chain
        .iter()
        .map(std::fs::canonicalize)
        .collect::<Result<Vec<_>, _>>()
    else {
        tracing::warn!(dir = %dir.display(), "a disk layer of the new snapshot cannot be resolved; keeping every older generation");
        return;
    };
    for (_, path) in generations(dir).into_iter().filter(|(n, _)| *n < newest) {
        let needed = std::fs::canonicalize(&path).map_or(true, |real| {
            layers.iter().any(|layer| layer.starts_with(&real))
        });
        if !needed {
            remove_generation(&path, "the newest snapshot no longer reads it");
        }
    }
}

#[cfg(test)]
mod tests;
