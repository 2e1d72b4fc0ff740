//! Sandbox operations shared by the native and the E2B routes.
//!
//! Each operation reads the sandbox *scoped by team*, asks the state machine whether the
//! action applies, has the worker do it, then records the new state with a compare-and-set.
//! The worker is told first so that the database never claims a state the worker refused.

use std::collections::BTreeMap;
use std::sync::Arc;

use roost_proto::SandboxId;
use roost_proto::egress::{self, PolicyError};
use sha2::{Digest, Sha256};

use super::state::{Event, SandboxState, transition};
use crate::placement::{MetricSample, Placement, PlacementError, SandboxSpec};
use crate::store::audit::{self, Actor};
use crate::store::idempotency::{self, Claim};
use crate::store::sandboxes::{self, Changes, Sandbox};
use crate::store::{self, Db, StoreError, now_ms, templates};

/// Longest timeout a sandbox may have, in seconds (one day).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 60 * 60;
pub const MAX_METADATA_PAIRS: usize = 64;
pub const MAX_METADATA_KEY: usize = 128;
pub const MAX_METADATA_VALUE: usize = 1024;
pub const MAX_ENV_VARS: usize = 256;
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// A request to create a sandbox, after the route has parsed its own wire format.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreateRequest {
    pub template: String,
    pub timeout_secs: u64,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub auto_pause: bool,
    pub allow_internet: bool,
    /// Whether the guest daemon requires an access token (the E2B SDK's `secure`).
    pub secure: bool,
    /// Whether ports other than envd's are open to anyone; if not, requests need the
    /// sandbox's traffic access token (generated here).
    pub allow_public_traffic: bool,
    /// E2B `network.allowOut`: destinations reachable whatever `allow_internet` and `deny_out`
    /// say (IPv4 addresses, CIDRs, host names, `*.domain`). Kept as written; checked here.
    /// Left out of the fingerprint when empty, so requests without lists keep theirs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// E2B `network.denyOut`: destinations refused unless `allow_out` names them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

impl CreateRequest {
    /// A digest identifying the request, to tell a retry from a different request reusing an
    /// idempotency key. Env var values are included: a changed secret is a different request.
    fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(canonical))
    }

    fn validate(&self) -> Result<(), LifecycleError> {
        let invalid = |m: String| Err(LifecycleError::Invalid(m));
        if self.timeout_secs == 0 || self.timeout_secs > MAX_TIMEOUT_SECS {
            return invalid(format!(
                "timeout must be between 1 and {MAX_TIMEOUT_SECS} seconds"
            ));
        }
        if self.template.is_empty() || self.template.len() > 128 {
            return invalid("templateID must be 1 to 128 characters".into());
        }
        if self.metadata.len() > MAX_METADATA_PAIRS {
            return invalid(format!(
                "at most {MAX_METADATA_PAIRS} metadata entries are allowed"
            ));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE {
                return invalid(format!(
                    "metadata keys must be 1 to {MAX_METADATA_KEY} bytes and values at most \
                     {MAX_METADATA_VALUE} bytes"
                ));
            }
        }
        if self.env_vars.len() > MAX_ENV_VARS {
            return invalid(format!(
                "at most {MAX_ENV_VARS} environment variables are allowed"
            ));
        }
        for name in self.env_vars.keys() {
            let ok = !name.is_empty()
                && name.len() <= 256
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return invalid(format!("invalid environment variable name {name:?}"));
            }
        }
        egress_list("allowOut", &self.allow_out)?;
        egress_list("denyOut", &self.deny_out)?;
        Ok(())
    }
}

/// Checks one egress list with the syntax the worker will parse it with.
fn egress_list(list: &'static str, entries: &[String]) -> Result<(), LifecycleError> {
    egress::parse_list(list, entries)
        .map(|_| ())
        .map_err(|e| match e {
            PolicyError::BadEntry(_) => LifecycleError::Invalid(format!("{list}: {e}")),
            PolicyError::TooMany { .. } => LifecycleError::Invalid(e.to_string()),
        })
}

/// Why a sandbox operation failed; the REST layer maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{0}")]
    Invalid(String),
    #[error("sandbox not found")]
    NotFound,
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("sandbox is {state}; cannot {action}")]
    Conflict {
        state: SandboxState,
        action: &'static str,
    },
    #[error("Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInProgress,
    #[error("worker could not {action} the sandbox")]
    Worker {
        action: &'static str,
        #[source]
        source: PlacementError,
    },
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("cannot generate a sandbox id")]
    Id(#[source] roost_proto::IdError),
}

/// The result of `connect`/`resume`.
#[derive(Debug)]
pub enum Connected {
    AlreadyRunning(Sandbox),
    Resumed(Sandbox),
}

/// Sandbox operations over a store and a placement.
#[derive(Debug, Clone)]
pub struct Sandboxes {
    db: Db,
    placement: Arc<dyn Placement>,
}

fn parse_id(id: &str) -> Result<SandboxId, LifecycleError> {
    id.parse().map_err(|_| LifecycleError::NotFound)
}

fn deadline(now: i64, timeout_secs: u64) -> i64 {
    now.saturating_add(i64::try_from(timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX))
}

impl Sandboxes {
    pub fn new(db: Db, placement: Arc<dyn Placement>) -> Self {
        Self { db, placement }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// A live (not killed) sandbox of `team_id`.
    pub async fn get_live(&self, team_id: &str, id: &str) -> Result<Sandbox, LifecycleError> {
        match sandboxes::get(&self.db, team_id, id).await? {
            Some(s) if s.state != SandboxState::Killed => Ok(s),
            _ => Err(LifecycleError::NotFound),
        }
    }

    /// Creates a sandbox, honouring `idempotency_key` (scoped to the team).
    pub async fn create(
        &self,
        actor: &Actor,
        team_id: &str,
        req: &CreateRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Sandbox, LifecycleError> {
        req.validate()?;
        let Some(key) = idempotency_key else {
            return self.create_fresh(actor, team_id, req).await;
        };
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(LifecycleError::Invalid(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )));
        }
        match idempotency::claim(&self.db, team_id, key, &req.fingerprint()).await? {
            Claim::Fresh => {}
            Claim::Replay { sandbox_id } => {
                tracing::debug!(%sandbox_id, "idempotent create replayed");
                return sandboxes::get(&self.db, team_id, &sandbox_id)
                    .await?
                    .ok_or(LifecycleError::NotFound);
            }
            Claim::InProgress => return Err(LifecycleError::IdempotencyInProgress),
            Claim::Mismatch => return Err(LifecycleError::IdempotencyMismatch),
        }
        let result = self.create_fresh(actor, team_id, req).await;
        match &result {
            Ok(s) => idempotency::complete(&self.db, team_id, key, &s.id).await?,
            Err(_) => idempotency::release(&self.db, team_id, key).await?,
        }
        result
    }

    async fn create_fresh(
        &self,
        actor: &Actor,
        team_id: &str,
        req: &CreateRequest,
    ) -> Result<Sandbox, LifecycleError> {
        let template = templates::visible(&self.db, team_id, &req.template)
            .await?
            .ok_or_else(|| LifecycleError::TemplateNotFound(req.template.clone()))?;
        let id = SandboxId::generate().map_err(LifecycleError::Id)?;
        let token = if req.secure {
            Some(store::random_id("", 32)?)
        } else {
            None
        };
        let traffic_token = if req.allow_public_traffic {
            None
        } else {
            Some(store::random_id("", 32)?)
        };
        let now = now_ms();
        let mut sandbox = Sandbox {
            id: id.as_str().to_owned(),
            team_id: team_id.to_owned(),
            template_id: template.id.clone(),
            state: SandboxState::Creating,
            metadata: req.metadata.clone(),
            env_var_names: req.env_vars.keys().cloned().collect(),
            host_id: None,
            cpu_count: template.cpu_count,
            memory_mb: template.memory_mb,
            disk_size_mb: template.disk_size_mb,
            envd_version: template.envd_version.clone(),
            envd_access_token: token,
            auto_pause: req.auto_pause,
            allow_internet: req.allow_internet,
            created_at: now,
            started_at: now,
            updated_at: now,
            end_at: deadline(now, req.timeout_secs),
            ended_at: None,
            allow_public_traffic: req.allow_public_traffic,
            traffic_access_token: traffic_token,
            allow_out: req.allow_out.clone(),
            deny_out: req.deny_out.clone(),
        };
        sandboxes::insert(&self.db, &sandbox).await?;
        audit::record(
            self.db.pool(),
            audit::Event {
                team_id: Some(team_id),
                actor,
                action: "sandbox.create",
                target_kind: "sandbox",
                target_id: Some(&sandbox.id),
                details: serde_json::json!({ "template": template.id, "timeout": req.timeout_secs }),
            },
        )
        .await?;

        let spec = spec_of(&sandbox, &id, req.env_vars.clone());
        let placed = match self.placement.create(&spec).await {
            Ok(placed) => placed,
            Err(source) => {
                tracing::warn!(sandbox = %id.as_str(), error = %source, "placement failed");
                let to = transition(SandboxState::Creating, Event::PlacementFailed)
                    .unwrap_or(SandboxState::Killed);
                sandboxes::compare_and_set(
                    &self.db,
                    Some(team_id),
                    &sandbox.id,
                    SandboxState::Creating,
                    to,
                    Changes::default(),
                )
                .await?;
                return Err(LifecycleError::Worker {
                    action: "create",
                    source,
                });
            }
        };
        let started = now_ms();
        let changes = Changes {
            host_id: Some(placed.host_id.clone()),
            started_at: Some(started),
            end_at: Some(deadline(started, req.timeout_secs)),
        };
        let running =
            transition(SandboxState::Creating, Event::Placed).unwrap_or(SandboxState::Running);
        if !sandboxes::compare_and_set(
            &self.db,
            Some(team_id),
            &sandbox.id,
            SandboxState::Creating,
            running,
            changes,
        )
        .await?
        {
            // Killed while the worker was starting it: do not leave it running there.
            if let Err(e) = self.placement.kill(&placed.host_id, &id).await {
                tracing::warn!(sandbox = %id.as_str(), error = %e, "cannot kill sandbox after lost race");
            }
            return Err(LifecycleError::Conflict {
                state: SandboxState::Killed,
                action: "start",
            });
        }
        sandbox.state = running;
        sandbox.host_id = Some(placed.host_id);
        sandbox.started_at = started;
        sandbox.end_at = deadline(started, req.timeout_secs);
        tracing::info!(sandbox = %sandbox.id, team = team_id, "sandbox created");
        Ok(sandbox)
    }

    /// Kills a sandbox. Killing a killed (or unknown) sandbox is `NotFound`.
    pub async fn kill(&self, actor: &Actor, team_id: &str, id: &str) -> Result<(), LifecycleError> {
        let sandbox = self.get_live(team_id, id).await?;
        let sid = parse_id(&sandbox.id)?;
        let to = transition(sandbox.state, Event::Kill).map_err(|_| LifecycleError::Conflict {
            state: sandbox.state,
            action: "kill",
        })?;
        if let (Some(host), false) = (&sandbox.host_id, sandbox.state == SandboxState::Lost) {
            match self.placement.kill(host, &sid).await {
                Ok(()) | Err(PlacementError::UnknownSandbox { .. }) => {}
                // The worker's next report of it draws a kill order (reconciliation), so the
                // user's kill need not wait for an unreachable or slow host.
                Err(
                    e @ (PlacementError::HostUnavailable { .. } | PlacementError::Timeout { .. }),
                ) => {
                    tracing::warn!(sandbox = id, error = %e, "killing sandbox on unreachable host");
                }
                Err(source) => {
                    return Err(LifecycleError::Worker {
                        action: "kill",
                        source,
                    });
                }
            }
        }
        if !sandboxes::compare_and_set(
            &self.db,
            Some(team_id),
            id,
            sandbox.state,
            to,
            Changes::default(),
        )
        .await?
        {
            return Err(LifecycleError::NotFound);
        }
        self.audit(actor, team_id, "sandbox.kill", id).await
    }

    /// Pauses a running sandbox.
    pub async fn pause(
        &self,
        actor: &Actor,
        team_id: &str,
        id: &str,
    ) -> Result<(), LifecycleError> {
        let sandbox = self.get_live(team_id, id).await?;
        let to = transition(sandbox.state, Event::Pause).map_err(|_| LifecycleError::Conflict {
            state: sandbox.state,
            action: "pause",
        })?;
        let host = sandbox.host_id.as_deref().unwrap_or_default();
        self.placement
            .pause(host, &parse_id(id)?)
            .await
            .map_err(|source| LifecycleError::Worker {
                action: "pause",
                source,
            })?;
        if !sandboxes::compare_and_set(
            &self.db,
            Some(team_id),
            id,
            sandbox.state,
            to,
            Changes::default(),
        )
        .await?
        {
            return Err(LifecycleError::Conflict {
                state: sandbox.state,
                action: "pause",
            });
        }
        self.audit(actor, team_id, "sandbox.pause", id).await
    }

    /// Resumes a paused sandbox, or only extends the timeout of a running one.
    pub async fn connect(
        &self,
        actor: &Actor,
        team_id: &str,
        id: &str,
        timeout_secs: u64,
    ) -> Result<Connected, LifecycleError> {
        if timeout_secs == 0 || timeout_secs > MAX_TIMEOUT_SECS {
            return Err(LifecycleError::Invalid(format!(
                "timeout must be between 1 and {MAX_TIMEOUT_SECS} seconds"
            )));
        }
        let sandbox = self.get_live(team_id, id).await?;
        let now = now_ms();
        match sandbox.state {
            SandboxState::Running => {
                let end_at = sandbox.end_at.max(deadline(now, timeout_secs));
                sandboxes::set_end_at(&self.db, team_id, id, end_at, SandboxState::Running).await?;
                let refreshed = self.get_live(team_id, id).await?;
                Ok(Connected::AlreadyRunning(refreshed))
            }
            SandboxState::Paused => {
                let to = transition(sandbox.state, Event::Resume).map_err(|_| {
                    LifecycleError::Conflict {
                        state: sandbox.state,
                        action: "resume",
                    }
                })?;
                let sid = parse_id(id)?;
                let spec = spec_of(&sandbox, &sid, BTreeMap::new());
                let host = sandbox.host_id.clone().unwrap_or_default();
                let placed = self
                    .placement
                    .resume(&host, &spec)
                    .await
                    .map_err(|source| LifecycleError::Worker {
                        action: "resume",
                        source,
                    })?;
                let changes = Changes {
                    host_id: Some(placed.host_id),
                    started_at: None,
                    end_at: Some(deadline(now, timeout_secs)),
                };
                if !sandboxes::compare_and_set(
                    &self.db,
                    Some(team_id),
                    id,
                    sandbox.state,
                    to,
                    changes,
                )
                .await?
                {
                    return Err(LifecycleError::Conflict {
                        state: sandbox.state,
                        action: "resume",
                    });
                }
                self.audit(actor, team_id, "sandbox.resume", id).await?;
                Ok(Connected::Resumed(self.get_live(team_id, id).await?))
            }
            state => Err(LifecycleError::Conflict {
                state,
                action: "connect",
            }),
        }
    }

    /// Sets a running sandbox to time out `timeout_secs` from now.
    pub async fn set_timeout(
        &self,
        actor: &Actor,
        team_id: &str,
        id: &str,
        timeout_secs: u64,
    ) -> Result<(), LifecycleError> {
        if timeout_secs > MAX_TIMEOUT_SECS {
            return Err(LifecycleError::Invalid(format!(
                "timeout must be at most {MAX_TIMEOUT_SECS} seconds"
            )));
        }
        let sandbox = self.get_live(team_id, id).await?;
        if sandbox.state != SandboxState::Running
            || !sandboxes::set_end_at(
                &self.db,
                team_id,
                id,
                deadline(now_ms(), timeout_secs),
                SandboxState::Running,
            )
            .await?
        {
            return Err(LifecycleError::Conflict {
                state: sandbox.state,
                action: "set the timeout of",
            });
        }
        self.audit(actor, team_id, "sandbox.timeout", id).await
    }

    /// Resource samples of a sandbox; empty while it is not running.
    pub async fn metrics(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Vec<MetricSample>, LifecycleError> {
        let sandbox = self.get_live(team_id, id).await?;
        if sandbox.state != SandboxState::Running {
            return Ok(Vec::new());
        }
        let host = sandbox.host_id.as_deref().unwrap_or_default();
        self.placement
            .metrics(host, &parse_id(id)?)
            .await
            .map_err(|source| LifecycleError::Worker {
                action: "read metrics of",
                source,
            })
    }

    pub(crate) fn placement(&self) -> &dyn Placement {
        self.placement.as_ref()
    }

    async fn audit(
        &self,
        actor: &Actor,
        team_id: &str,
        action: &str,
        id: &str,
    ) -> Result<(), LifecycleError> {
        audit::record(
            self.db.pool(),
            audit::Event {
                team_id: Some(team_id),
                actor,
                action,
                target_kind: "sandbox",
                target_id: Some(id),
                details: serde_json::Value::Object(serde_json::Map::new()),
            },
        )
        .await?;
        Ok(())
    }
}

pub(crate) fn spec_of(
    s: &Sandbox,
    id: &SandboxId,
    env_vars: BTreeMap<String, String>,
) -> SandboxSpec {
    SandboxSpec {
        id: id.clone(),
        team_id: s.team_id.clone(),
        template_id: s.template_id.clone(),
        cpu_count: s.cpu_count,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        env_vars,
        envd_access_token: s.envd_access_token.clone(),
        allow_internet: s.allow_internet,
        allow_out: s.allow_out.clone(),
        deny_out: s.deny_out.clone(),
    }
}
