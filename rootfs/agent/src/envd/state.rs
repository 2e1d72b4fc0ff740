//! What the agent knows about its sandbox (set by `POST /init`) and the shared server state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::filesystem::watch::Watchers;
use super::process::registry::Registry;

/// The default user of a sandbox, as in E2B's templates.
pub const DEFAULT_USER: &str = "user";

/// Identity and defaults of the sandbox, replaced piecewise by `POST /init`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    pub sandbox_id: Option<String>,
    /// When set, every request (except `/health`, and `/files` with a valid signature) must
    /// carry it in `X-Access-Token`.
    pub access_token: Option<String>,
    pub default_user: String,
    /// Where processes start and relative paths resolve; the user's home when `None`.
    pub default_workdir: Option<PathBuf>,
    /// Environment given to every process (and shown by `GET /envs`).
    pub env_vars: HashMap<String, String>,
}

/// Shared by every request handler.
#[derive(Debug)]
pub struct Envd {
    config: RwLock<SandboxConfig>,
    pub processes: Registry,
    pub watchers: Watchers,
}

impl Envd {
    pub fn new(config: SandboxConfig) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(config),
            processes: Registry::default(),
            watchers: Watchers::default(),
        })
    }

    /// A snapshot of the configuration.
    pub fn config(&self) -> SandboxConfig {
        self.config
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn update_config(&self, change: impl FnOnce(&mut SandboxConfig)) {
        let mut config = self
            .config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut config);
    }
}
