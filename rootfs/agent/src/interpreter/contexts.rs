//! The contexts: named, stateful kernels, and the default one.
//!
//! Each [`Context`] owns at most one [`Kernel`] behind an async mutex: holding the mutex is the
//! right to run code on it, so executions on one context run one after another (the kernel
//! would queue them anyway) while different contexts run side by side. A kernel that died is
//! started again by the next execution (its state is gone, as in Jupyter). The default Python
//! context, which the SDK's `run_code` uses when given no context, is created at start-up and
//! again on demand if it was deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::unistd::Pid;
use thiserror::Error;
use tokio::sync::OwnedMutexGuard;

use super::kernel::process::KernelCommand;
use super::kernel::{Kernel, StartError};
use super::wire::ContextInfo;

/// The one language served (E2B's template also has JavaScript, R, Java and Bash kernels).
pub const PYTHON: &str = "python";

#[derive(Debug, Error)]
pub enum ContextError {
    #[error("context {0} not found")]
    NotFound(String),
    #[error("language {0:?} is not supported here (only python)")]
    UnsupportedLanguage(String),
    #[error("working directory {0:?} is not an existing absolute directory")]
    BadCwd(String),
    #[error("cannot start the kernel")]
    Start(#[source] StartError),
}

/// Maps the SDK's language names to ours; `None` and `python3` mean Python.
pub fn normalize_language(language: Option<&str>) -> Result<&'static str, ContextError> {
    match language.map(|l| l.trim().to_ascii_lowercase()) {
        None => Ok(PYTHON),
        Some(l) if l.is_empty() || l == "python" || l == "python3" => Ok(PYTHON),
        Some(other) => Err(ContextError::UnsupportedLanguage(other)),
    }
}

/// A kernel the client can address by id.
#[derive(Debug)]
pub struct Context {
    pub id: String,
    pub language: &'static str,
    pub cwd: PathBuf,
    order: u64,
    kernel: Arc<tokio::sync::Mutex<Option<Kernel>>>,
    /// The current kernel's pid, to kill it without waiting for a running cell.
    pid: Mutex<Option<Pid>>,
    removed: AtomicBool,
}

/// The right to run code on a context: its kernel, started and alive.
pub type KernelGuard = OwnedMutexGuard<Option<Kernel>>;

impl Context {
    pub fn info(&self) -> ContextInfo {
        ContextInfo {
            id: self.id.clone(),
            language: self.language.to_owned(),
            cwd: self.cwd.display().to_string(),
        }
    }

    fn remember_pid(&self, pid: Option<Pid>) {
        if let Ok(mut slot) = self.pid.lock() {
            *slot = pid;
        }
    }

    /// SIGKILLs the current kernel's process group (a running cell then ends at once).
    fn kill_now(&self) {
        let pid = self.pid.lock().ok().and_then(|slot| *slot);
        if let Some(pid) = pid {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Every context, and how to start their kernels.
#[derive(Debug)]
pub struct Contexts {
    command: KernelCommand,
    default_cwd: PathBuf,
    start_timeout: Duration,
    by_id: Mutex<HashMap<String, Arc<Context>>>,
    /// The default context's id; locked while the default context is being created.
    default_id: tokio::sync::Mutex<Option<String>>,
    next_order: AtomicU64,
}

impl Contexts {
    pub fn new(command: KernelCommand, default_cwd: PathBuf, start_timeout: Duration) -> Self {
        Self {
            command,
            default_cwd,
            start_timeout,
            by_id: Mutex::default(),
            default_id: tokio::sync::Mutex::default(),
            next_order: AtomicU64::new(0),
        }
    }

    /// Creates a context and starts its kernel.
    pub async fn create(
        &self,
        language: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<Arc<Context>, ContextError> {
        let language = normalize_language(language)?;
        let cwd = match cwd.map(str::trim).filter(|c| !c.is_empty()) {
            None => self.default_cwd.clone(),
            Some(cwd) if Path::new(cwd).is_absolute() && Path::new(cwd).is_dir() => cwd.into(),
            Some(cwd) => return Err(ContextError::BadCwd(cwd.to_owned())),
        };
        let context = Arc::new(Context {
            id: uuid::Uuid::new_v4().to_string(),
            language,
            cwd,
            order: self.next_order.fetch_add(1, Ordering::Relaxed),
            kernel: Arc::default(),
            pid: Mutex::default(),
            removed: AtomicBool::new(false),
        });
        drop(self.kernel_of(&context).await?);
        if let Ok(mut by_id) = self.by_id.lock() {
            by_id.insert(context.id.clone(), Arc::clone(&context));
        }
        Ok(context)
    }

    /// The default Python context, created if there is none (yet, or any more).
    pub async fn default_context(&self) -> Result<Arc<Context>, ContextError> {
        let mut default_id = self.default_id.lock().await;
        if let Some(id) = default_id.as_deref()
            && let Some(context) = self.get(id)
        {
            return Ok(context);
        }
        let context = self.create(None, None).await?;
        *default_id = Some(context.id.clone());
        Ok(context)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.by_id.lock().ok()?.get(id).cloned()
    }

    /// Every context, oldest first.
    pub fn list(&self) -> Vec<ContextInfo> {
        let mut contexts: Vec<Arc<Context>> = self
            .by_id
            .lock()
            .map(|by_id| by_id.values().cloned().collect())
            .unwrap_or_default();
        contexts.sort_by_key(|c| c.order);
        contexts.iter().map(|c| c.info()).collect()
    }

    /// Waits for the right to run code on `context`, starting its kernel if it has none or
    /// its kernel died.
    pub async fn kernel_of(&self, context: &Arc<Context>) -> Result<KernelGuard, ContextError> {
        let mut guard = Arc::clone(&context.kernel).lock_owned().await;
        if context.removed.load(Ordering::Acquire) {
            return Err(ContextError::NotFound(context.id.clone()));
        }
        if let Some(kernel) = guard.as_ref()
            && let Some(status) = kernel.exit_status()
        {
            tracing::warn!(context = %context.id, %status, "the kernel had exited; starting a new one");
            *guard = None;
        }
        if guard.is_none() {
            let kernel =
                Kernel::start(&self.command, &context.id, &context.cwd, self.start_timeout)
                    .await
                    .map_err(ContextError::Start)?;
            context.remember_pid(Some(kernel.pid()));
            *guard = Some(kernel);
        }
        Ok(guard)
    }

    /// Deletes a context: its kernel is killed, a running cell ends.
    pub async fn remove(&self, id: &str) -> Result<(), ContextError> {
        let context = self
            .by_id
            .lock()
            .ok()
            .and_then(|mut by_id| by_id.remove(id))
            .ok_or_else(|| ContextError::NotFound(id.to_owned()))?;
        context.removed.store(true, Ordering::Release);
        context.kill_now();
        let mut guard = Arc::clone(&context.kernel).lock_owned().await;
        if let Some(kernel) = guard.take() {
            kernel.shut_down().await;
        }
        context.remember_pid(None);
        Ok(())
    }

    /// Replaces a context's kernel by a fresh one (all state lost); a running cell ends.
    pub async fn restart(&self, id: &str) -> Result<(), ContextError> {
        let context = self
            .get(id)
            .ok_or_else(|| ContextError::NotFound(id.to_owned()))?;
        context.kill_now();
        {
            let mut guard = Arc::clone(&context.kernel).lock_owned().await;
            if let Some(kernel) = guard.take() {
                kernel.shut_down().await;
            }
            context.remember_pid(None);
        }
        drop(self.kernel_of(&context).await?);
        Ok(())
    }

    /// Kills every kernel (the server is stopping).
    pub async fn shut_down_all(&self) {
        let contexts: Vec<Arc<Context>> = self
            .by_id
            .lock()
            .map(|mut by_id| by_id.drain().map(|(_, c)| c).collect())
            .unwrap_or_default();
        for context in contexts {
            context.removed.store(true, Ordering::Release);
            context.kill_now();
            if let Some(kernel) = context.kernel.lock().await.take() {
                kernel.shut_down().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_is_the_only_language_and_the_default() {
        assert_eq!(normalize_language(None).unwrap(), PYTHON);
        assert_eq!(normalize_language(Some(" Python ")).unwrap(), PYTHON);
        assert_eq!(normalize_language(Some("python3")).unwrap(), PYTHON);
        assert!(matches!(
            normalize_language(Some("javascript")),
            Err(ContextError::UnsupportedLanguage(l)) if l == "javascript"
        ));
    }
}
