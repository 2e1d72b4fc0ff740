//! Per-sandbox cgroup v2 groups: CPU quota, memory ceiling, pids and I/O weight for each VMM
//! process, usage readings for the metrics routes, and removal that never leaves one behind.
//!
//! Layout: one parent group (default `<cgroup2 mount>/roost`) with the cpu, memory, pids and io
//! controllers enabled for its children, and one child per sandbox named after its id. The
//! parent never holds a process itself (cgroup v2's "no internal processes" rule), so the
//! worker process stays where it is and only VMMs are moved, at spawn time, through
//! [`SandboxCgroup::place_on_spawn`]: the child writes itself into `cgroup.procs` between
//! fork and exec, so the VMM never runs a single instruction outside its limits.
//!
//! Removal kills what is left (`cgroup.kill`), waits for the group to empty and removes the
//! directory; [`CgroupTree::remove_stale`] does the same for groups of sandboxes the worker no
//! longer knows (after a crash). The interface is the file system only, so tests run against
//! the real hierarchy inside the host VM and against plain directories for the parsing.

mod limits;
mod usage;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use limits::{
    CPU_PERIOD_US, DEFAULT_IO_WEIGHT, DEFAULT_PIDS_MAX, DEFAULT_VMM_OVERHEAD_BYTES, Limits,
    LimitsError, cpu_quota_us,
};
pub use usage::{CpuSampler, Usage};

/// The controllers a sandbox group needs; `io` is optional (not every hierarchy offers it).
const REQUIRED_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
const OPTIONAL_CONTROLLERS: [&str; 1] = ["io"];
/// How long removal waits for killed processes to leave the group.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{0} is not a cgroup v2 mount (no cgroup.controllers there)")]
    NotCgroup2(PathBuf),
    #[error("the cgroup v2 hierarchy at {mount} lacks the {missing} controller(s)")]
    MissingControllers { mount: PathBuf, missing: String },
    #[error("invalid sandbox cgroup name {0:?}: use letters, digits, '-' and '_'")]
    InvalidName(String),
    #[error("invalid limits")]
    Limits(#[from] LimitsError),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("processes are still in {0} after {EMPTY_TIMEOUT:?}")]
    NotEmpty(PathBuf),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io {
        action,
        path,
        source,
    }
}

/// The parent group under which every sandbox gets its own.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    path: PathBuf,
    with_io: bool,
}

impl CgroupTree {
    /// Opens (creating if needed) `<mount>/<name>` and enables the controllers sandboxes need
    /// in the mount's and its own `cgroup.subtree_control`.
    pub fn open(mount: &Path, name: &str) -> Result<Self, CgroupError> {
        validate_name(name)?;
        let available = read_controllers(mount)?;
        let missing: Vec<&str> = REQUIRED_CONTROLLERS
            .into_iter()
            .filter(|c| !available.iter().any(|a| a == c))
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::MissingControllers {
                mount: mount.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        let with_io = OPTIONAL_CONTROLLERS
            .iter()
            .all(|c| available.iter().any(|a| a == c));
        let enabled: Vec<&str> = REQUIRED_CONTROLLERS
            .into_iter()
            .chain(OPTIONAL_CONTROLLERS.into_iter().filter(|_| with_io))
            .collect();
        enable_controllers(mount, &enabled)?;
        let path = mount.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &path)(e)),
        }
        enable_controllers(&path, &enabled)?;
        Ok(Self { path, with_io })
    }

    /// The parent group's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether sandboxes get an I/O weight (the io controller is available).
    pub fn has_io(&self) -> bool {
        self.with_io
    }

    /// Creates the group of sandbox `name` with `limits` (an existing empty group of that name,
    /// left by a crash, is reused).
    pub fn create(&self, name: &str, limits: &Limits) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        limits.validate(host_cpus())?;
        let path = self.path.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &path)(e)),
        }
        let group = SandboxCgroup { path };
        for (file, value) in limits.files(self.with_io) {
            if let Err(e) = group.write(file, &value) {
                // Half-configured groups are not left behind.
                let _ = group.remove();
                return Err(e);
            }
        }
        tracing::debug!(group = %group.path.display(), ?limits, "sandbox cgroup created");
        Ok(group)
    }

    /// Removes every sandbox group whose name is not in `keep` (processes in them are
    /// killed). Returns the names removed.
    pub fn remove_stale(&self, keep: &HashSet<String>) -> Result<Vec<String>, CgroupError> {
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&self.path).map_err(io_err("list", &self.path))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.path))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || keep.contains(&name) {
                continue;
            }
            SandboxCgroup { path: entry.path() }.remove()?;
            tracing::info!(%name, "removed a stale sandbox cgroup");
            removed.push(name);
        }
        Ok(removed)
    }
}

/// One sandbox's group. Dropping it does not remove it: call [`SandboxCgroup::remove`] when
/// the sandbox ends (the worker's stale sweep covers crashes).
#[derive(Debug)]
pub struct SandboxCgroup {
    path: PathBuf,
}

impl SandboxCgroup {
    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `command`'s child join this group between fork and exec.
    pub fn place_on_spawn(&self, command: &mut Command) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        let file = OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(io_err("open", &procs))?;
        // SAFETY: the closure runs in the forked child before exec and only calls write(2) on
        // an fd that the closure keeps open (it owns `file`), with a static buffer: no
        // allocation, no locks, async-signal-safe. "0" means "the writing process".
        unsafe {
            command.pre_exec(move || match nix::unistd::write(&file, b"0") {
                Ok(1) => Ok(()),
                Ok(_) => Err(std::io::Error::other("short write to cgroup.procs")),
                Err(errno) => Err(std::io::Error::from(errno)),
            });
        }
        Ok(())
    }

    /// Moves an existing process into the group.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The processes in the group now.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let path = self.path.join("cgroup.procs");
        let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Reads the group's counters.
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        let cpu = self.read_required("cpu.stat")?;
        let memory = self.read_required("memory.current")?;
        let events = self.read_optional("memory.events").unwrap_or_default();
        let io = self.read_optional("io.stat").unwrap_or_default();
        Ok(Usage {
            cpu_usage_us: usage::flat_keyed(&cpu, "usage_usec"),
            cpu_throttled_periods: usage::flat_keyed(&cpu, "nr_throttled"),
            cpu_throttled_us: usage::flat_keyed(&cpu, "throttled_usec"),
            memory_bytes: usage::single_value(Some(&memory)),
            memory_peak_bytes: usage::single_value(self.read_optional("memory.peak").as_deref()),
            oom_kills: usage::flat_keyed(&events, "oom_kill"),
            io_read_bytes: usage::io_stat_sum(&io, "rbytes"),
            io_write_bytes: usage::io_stat_sum(&io, "wbytes"),
            pids: usage::single_value(self.read_optional("pids.current").as_deref()),
        })
    }

    /// Kills every process in the group, waits for it to empty and removes it. Idempotent.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        self.kill_all()?;
        let deadline = Instant::now() + EMPTY_TIMEOUT;
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                // EBUSY while exiting processes are still charged to the group.
                Err(e)
                    if Instant::now() < deadline
                        && e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
                    return Err(CgroupError::NotEmpty(self.path.clone()));
                }
                Err(e) => return Err(io_err("remove", &self.path)(e)),
            }
        }
    }

    /// SIGKILLs everything in the group: `cgroup.kill` where the kernel has it (5.14+),
    /// otherwise each listed process.
    fn kill_all(&self) -> Result<(), CgroupError> {
        if self.path.join("cgroup.kill").exists() {
            return self.write("cgroup.kill", "1");
        }
        for pid in self.pids()? {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(())
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        let mut f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        f.write_all(value.as_bytes())
            .map_err(io_err("write", &path))
    }

    fn read_required(&self, file: &str) -> Result<String, CgroupError> {
        let path = self.path.join(file);
        std::fs::read_to_string(&path).map_err(io_err("read", &path))
    }

    fn read_optional(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.path.join(file)).ok()
    }
}

/// Group names end up as directory names: no separators, no dot names, bounded length.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_string()))
    }
}

fn read_controllers(group: &Path) -> Result<Vec<String>, CgroupError> {
    let path = group.join("cgroup.controllers");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CgroupError::NotCgroup2(group.to_path_buf()),
        _ => io_err("read", &path)(e),
    })?;
    Ok(text.split_whitespace().map(str::to_string).collect())
}

/// Enables `controllers` for `group`'s children (already enabled ones are kept).
fn enable_controllers(group: &Path, controllers: &[&str]) -> Result<(), CgroupError> {
    let path = group.join("cgroup.subtree_control");
    let current = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
    let wanted: Vec<String> = controllers
        .iter()
        .filter(|c| !current.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let mut file: File = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    file.write_all(wanted.join(" ").as_bytes())
        .map_err(io_err("enable controllers in", &path))
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_parent_are_refused() {
        for bad in ["", "..", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        validate_name("cl-abc123").unwrap();
        validate_name("pool_7").unwrap();
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = CgroupTree::open(dir.path(), "roost").unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2(_)), "{err}");
    }

    #[test]
    fn missing_controllers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        let err = CgroupTree::open(dir.path(), "roost").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the cgroup v2 hierarchy at {} lacks the memory, pids controller(s)",
                dir.path().display()
            )
        );
    }
}
