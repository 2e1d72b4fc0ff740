//! Templates: a booted, agent-ready VM snapshot per guest image, from which sandboxes are
//! restored instead of booted. Building one boots the image through [`VmHandle`] with the
//! VMM's control API on, waits for the agent, runs the image's optional start command and
//! ready check (the code interpreter's `/health` on :49999 through the agent's port forward),
//! then writes a full snapshot and kills the paused VM.
//!
//! Templates live in the artefact cache (`roost_images::Cache`, kind `template`) under a key of
//! every input — the kernel's and image's own cache keys, the VMM binary's SHA-256 (a
//! snapshot is only readable by the VMM that wrote its format) and the VM configuration — so
//! a build with unchanged inputs is a cache hit, and the index records the current one as
//! `template-<name>` for [`lookup`].

mod ready;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roost_agent_client::exec_argv;
use roost_images::{
    Artefact, ArtefactIndex, Built, Cache, CacheError, CacheKey, CacheKeyBuilder, IndexError,
};
use serde::{Deserialize, Serialize};

pub use ready::ReadyCheck;

use crate::vm_handle::{
    BootError, NetAttachment, RootfsMode, SeccompMode, SnapshotInfo, SnapshotKind, VmError,
    VmHandle, VmHandleConfig,
};

/// Cache kind of templates.
pub const CACHE_KIND: &str = "template";
/// The snapshot's directory inside a template's cache entry.
pub const SNAPSHOT_DIR: &str = "snapshot";
/// What the template was built from, beside the snapshot.
pub const META_FILE: &str = "template.json";
/// Bumped when the way templates are built changes.
const RECIPE_VERSION: u32 = 1;

/// The templates Roost builds: one per guest image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateName {
    Base,
    CodeInterpreter,
}

impl TemplateName {
    pub const ALL: [Self; 2] = [Self::Base, Self::CodeInterpreter];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::CodeInterpreter => "code-interpreter",
        }
    }

    /// The index name of the image it is built from.
    pub fn image_index_name(self) -> String {
        format!("rootfs-{}", self.as_str())
    }

    /// Its own index name.
    pub fn index_name(self) -> String {
        format!("template-{}", self.as_str())
    }

    /// The index name of its build with (`template-<name>-net`) or without a network device.
    pub fn index_name_for(self, network: bool) -> String {
        if network {
            format!("template-{}-net", self.as_str())
        } else {
            self.index_name()
        }
    }
}

impl std::str::FromStr for TemplateName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|n| n.as_str() == text)
            .ok_or_else(|| format!("unknown template `{text}` (base, code-interpreter)"))
    }
}

impl std::fmt::Display for TemplateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to build one template.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    pub name: TemplateName,
    pub kernel: Artefact,
    pub rootfs: Artefact,
    /// The `roost` binary that boots it (and must later restore it).
    pub vmm_binary: PathBuf,
    pub cpus: u32,
    pub mem_mib: u64,
    /// Run in the guest after the agent is ready; must exit 0.
    pub start_command: Option<Vec<String>>,
    /// Must pass before the snapshot is taken.
    pub ready_check: Option<ReadyCheck>,
    /// Boot plus start command plus ready check.
    pub ready_timeout: Duration,
    /// Where the build VM's runtime directory goes.
    pub runtime_root: PathBuf,
    pub seccomp: SeccompMode,
    /// Boot it with a virtio-net device (on a tap in a namespace of its own, which nothing
    /// leaves), so that sandboxes restored from it attach to their own slot's tap: the
    /// template a worker with sandbox networking (`roost serve worker --net`) offers.
    pub network: bool,
}

impl TemplateSpec {
    /// The defaults for `name`: the kernel and image from `index`; 1 vCPU; 256 MiB for `base`,
    /// 1 GiB and the interpreter's `/health` for `code-interpreter`.
    pub fn for_image(
        name: TemplateName,
        index: &ArtefactIndex,
        vmm_binary: PathBuf,
        runtime_root: PathBuf,
    ) -> Result<Self, TemplateError> {
        let (mem_mib, ready_check) = match name {
            TemplateName::Base => (256, None),
            TemplateName::CodeInterpreter => (
                1024,
                Some(ReadyCheck::HttpGet {
                    port: 49999,
                    path: "/health".into(),
                }),
            ),
        };
        Ok(Self {
            name,
            kernel: index.lookup("kernel")?,
            rootfs: index.lookup(&name.image_index_name())?,
            vmm_binary,
            cpus: 1,
            mem_mib,
            start_command: None,
            ready_check,
            ready_timeout: Duration::from_secs(300),
            runtime_root,
            seccomp: SeccompMode::Enforce,
            network: false,
        })
    }

    /// Its index name (see [`TemplateName::index_name_for`]).
    pub fn index_name(&self) -> String {
        self.name.index_name_for(self.network)
    }

    /// The key of every input that shapes the snapshot.
    pub fn cache_key(&self) -> Result<CacheKey, TemplateError> {
        let config = serde_json::json!({
            "recipe": RECIPE_VERSION,
            "cpus": self.cpus,
            "mem_mib": self.mem_mib,
            "start_command": self.start_command,
            "ready_check": self.ready_check,
            "network": self.network,
        });
        let mut key = CacheKeyBuilder::new(CACHE_KIND);
        key.add("name", self.name.as_str().as_bytes())
            .add("kernel", self.kernel.key.as_bytes())
            .add("rootfs", self.rootfs.key.as_bytes())
            .add("config", config.to_string().as_bytes());
        key.add_file("vmm", &self.vmm_binary)?;
        Ok(key.finish())
    }
}

/// What a template was built from (`template.json` beside the snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub name: TemplateName,
    pub kernel_key: String,
    pub rootfs_key: String,
    pub cpus: u32,
    pub mem_mib: u64,
    /// From spawning the VMM to the snapshot written.
    pub build_ms: u64,
    pub memory_pages_written: u64,
    pub snapshot_paused_ms: u64,
    /// Built with a network device ([`TemplateSpec::network`]).
    #[serde(default)]
    pub network: bool,
}

/// A built template.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: TemplateName,
    /// The snapshot directory to restore from.
    pub snapshot_dir: PathBuf,
    pub key: String,
    pub meta: Option<TemplateMeta>,
}

/// The current template called `name`, with or without a network device, from the index.
pub fn lookup(
    index: &ArtefactIndex,
    name: TemplateName,
    network: bool,
) -> Result<Template, TemplateError> {
    let artefact = index.lookup(&name.index_name_for(network))?;
    let meta = artefact
        .path
        .parent()
        .map(|entry| entry.join(META_FILE))
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    Ok(Template {
        name,
        snapshot_dir: artefact.path,
        key: artefact.key,
        meta,
    })
}

/// Builds the template of `spec` unless the cache holds it, and records it in the index.
pub async fn build(cache: &Cache, spec: &TemplateSpec) -> Result<Built, TemplateError> {
    let started = Instant::now();
    let key = spec.cache_key()?;
    let entry = cache.entry(CACHE_KIND, &key);
    let runtime = tokio::runtime::Handle::current();
    let job = spec.clone();
    // The cache's build lock and rename are blocking; the boot inside runs on this runtime.
    let (dir, origin) = tokio::task::spawn_blocking(move || {
        entry.get_or_build(|staging| runtime.block_on(boot_and_snapshot(&job, staging)))
    })
    .await
    .map_err(|e| TemplateError::Join(e.to_string()))??;
    let snapshot_dir = dir.join(SNAPSHOT_DIR);
    let artefact = Artefact {
        name: spec.index_name(),
        size_bytes: allocated_bytes(&snapshot_dir),
        path: snapshot_dir,
        key: key.as_str().to_owned(),
    };
    ArtefactIndex::new(cache).record(&artefact)?;
    Ok(Built {
        artefact,
        origin,
        duration: started.elapsed(),
    })
}

/// Boots, readies and snapshots into `staging`/[`SNAPSHOT_DIR`], then kills the paused VM.
async fn boot_and_snapshot(spec: &TemplateSpec, staging: &Path) -> Result<(), TemplateError> {
    let started = Instant::now();
    let deadline = started + spec.ready_timeout;
    let runtime_dir =
        spec.runtime_root
            .join(format!("template-{}-{}", spec.name, std::process::id()));
    // Dropped (removed) after the VM: declared first.
    let isolated = if spec.network {
        Some(
            roost_net::IsolatedTap::create()
                .await
                .map_err(TemplateError::Network)?,
        )
    } else {
        None
    };
    let mut config = VmHandleConfig::new(&spec.kernel.path, &spec.rootfs.path, runtime_dir);
    config.vmm_binary = spec.vmm_binary.clone();
    config.cpus = spec.cpus;
    config.mem_mib = spec.mem_mib;
    config.ready_timeout = spec.ready_timeout;
    config.seccomp = spec.seccomp;
    config.control_api = true;
    // Clones get their own writable disk from the template's overlay layer.
    config.rootfs_mode = RootfsMode::Overlay;
    config.net = isolated.as_ref().map(|ns| NetAttachment {
        netns: ns.netns().to_owned(),
        tap: ns.tap_name().to_owned(),
    });
    let vm = VmHandle::boot(config).await?;
    tracing::info!(template = %spec.name, ms = vm.boot_to_ready().as_millis(), "template VM ready");
    if let Some(command) = &spec.start_command {
        let output = vm.run(exec_argv(command.iter().cloned())).await?;
        if !output.status.success() {
            return Err(TemplateError::StartCommand {
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
    }
    if let Some(check) = &spec.ready_check {
        check.wait(&vm, deadline).await?;
    }
    let info: SnapshotInfo = vm
        .snapshot(&staging.join(SNAPSHOT_DIR), SnapshotKind::Full, None, false)
        .await?;
    let meta = TemplateMeta {
        name: spec.name,
        kernel_key: spec.kernel.key.clone(),
        rootfs_key: spec.rootfs.key.clone(),
        cpus: spec.cpus,
        mem_mib: spec.mem_mib,
        build_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        memory_pages_written: info.memory_pages_written,
        snapshot_paused_ms: info.paused_ms,
        network: spec.network,
    };
    let meta_path = staging.join(META_FILE);
    let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    std::fs::write(&meta_path, json).map_err(|source| TemplateError::Io {
        path: meta_path,
        source,
    })?;
    // Paused after the snapshot: nothing to shut down gracefully.
    vm.kill();
    Ok(())
}

/// Bytes allocated under `dir` (memory files are sparse).
pub(crate) fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Building or finding a template failed. A failed build leaves nothing in the cache and no
/// VM behind.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("artefact cache")]
    Cache(#[from] CacheError),
    #[error("the template VM did not boot")]
    Boot(#[from] BootError),
    #[error("the template VM failed")]
    Vm(#[from] VmError),
    #[error("the start command failed ({status}): {stderr}")]
    StartCommand { status: String, stderr: String },
    #[error("the ready check did not pass: {0}")]
    NotReady(String),
    #[error("cannot write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the build task failed: {0}")]
    Join(String),
    #[error("cannot make the template VM's network namespace (this needs root)")]
    Network(#[source] roost_net::slot::SlotError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> TemplateSpec {
        let artefact = |name: &str, key: &str| {
            let path = dir.join(name);
            std::fs::write(&path, name).unwrap();
            Artefact {
                name: name.into(),
                path,
                key: key.into(),
                size_bytes: 1,
            }
        };
        std::fs::write(dir.join("roost"), b"vmm v1").unwrap();
        TemplateSpec {
            name: TemplateName::Base,
            kernel: artefact("kernel", "k1"),
            rootfs: artefact("rootfs-base", "r1"),
            vmm_binary: dir.join("roost"),
            cpus: 1,
            mem_mib: 256,
            start_command: None,
            ready_check: None,
            ready_timeout: Duration::from_secs(10),
            runtime_root: dir.to_owned(),
            seccomp: SeccompMode::Enforce,
            network: false,
        }
    }

    #[test]
    fn the_key_covers_kernel_image_vmm_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let base = spec(dir.path());
        let key = base.cache_key().unwrap();
        assert_eq!(key, spec(dir.path()).cache_key().unwrap(), "stable");
        let mut changed = Vec::new();
        let mut s = spec(dir.path());
        s.kernel.key = "k2".into();
        changed.push(s);
        let mut s = spec(dir.path());
        s.rootfs.key = "r2".into();
        changed.push(s);
        let mut s = spec(dir.path());
        s.mem_mib = 512;
        changed.push(s);
        let mut s = spec(dir.path());
        s.start_command = Some(vec!["true".into()]);
        changed.push(s);
        let mut s = spec(dir.path());
        s.name = TemplateName::CodeInterpreter;
        changed.push(s);
        let mut s = spec(dir.path());
        s.network = true;
        changed.push(s);
        for s in changed {
            assert_ne!(s.cache_key().unwrap(), key, "{s:?}");
        }
        // Where things are does not matter, only what they are.
        let mut moved = base.clone();
        moved.runtime_root = "/elsewhere".into();
        moved.ready_timeout = Duration::from_secs(1);
        assert_eq!(moved.cache_key().unwrap(), key);
        let new_vmm = spec(dir.path());
        std::fs::write(dir.path().join("roost"), b"vmm v2").unwrap();
        assert_ne!(new_vmm.cache_key().unwrap(), key, "a new VMM binary");
    }

    #[test]
    fn names_parse_and_index_names() {
        assert_eq!(
            "code-interpreter".parse::<TemplateName>(),
            Ok(TemplateName::CodeInterpreter)
        );
        assert!("nope".parse::<TemplateName>().unwrap_err().contains("base"));
        assert_eq!(TemplateName::Base.index_name(), "template-base");
        assert_eq!(TemplateName::Base.index_name_for(false), "template-base");
        assert_eq!(
            TemplateName::CodeInterpreter.index_name_for(true),
            "template-code-interpreter-net"
        );
        assert_eq!(TemplateName::Base.image_index_name(), "rootfs-base");
    }

    #[test]
    fn a_missing_image_says_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path()).unwrap();
        let error = TemplateSpec::for_image(
            TemplateName::Base,
            &ArtefactIndex::new(&cache),
            dir.path().join("roost"),
            dir.path().to_owned(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("roost images build"), "{error}");
        let error = lookup(&ArtefactIndex::new(&cache), TemplateName::Base, false).unwrap_err();
        assert!(error.to_string().contains("template-base"), "{error}");
        let error = lookup(&ArtefactIndex::new(&cache), TemplateName::Base, true).unwrap_err();
        assert!(error.to_string().contains("template-base-net"), "{error}");
    }
}
