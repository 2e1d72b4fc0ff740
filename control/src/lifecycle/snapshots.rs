//! Snapshots: saving a running sandbox as a team template, and deleting team templates.
//!
//! A snapshot is taken by the sandbox's worker (`Placement::snapshot`), which from then on
//! offers it as a template; the catalog row records that host, and creating a sandbox from the
//! snapshot is placed there by the ordinary template-aware placement. The sandbox keeps
//! running. Only after the worker has saved it is the template recorded, so the catalog never
//! lists a snapshot that does not exist.

use roost_proto::SandboxId;

use super::service::{LifecycleError, Sandboxes};
use super::state::SandboxState;
use crate::placement::PlacementError;
use crate::store::audit::{self, Actor};
use crate::store::templates::{self, Template};
use crate::store::{self, now_ms};

/// Longest snapshot name.
pub const MAX_NAME: usize = 128;

/// A snapshot name: printable, no spaces or wildcards (it is matched like a template id).
fn check_name(name: &str) -> Result<(), LifecycleError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
    if ok {
        Ok(())
    } else {
        Err(LifecycleError::Invalid(format!(
            "snapshot name must be 1 to {MAX_NAME} characters of letters, digits and -_./:"
        )))
    }
}

impl Sandboxes {
    /// Saves `team_id`'s running sandbox `id` as a new snapshot template, optionally named.
    pub async fn snapshot(
        &self,
        actor: &Actor,
        team_id: &str,
        id: &str,
        name: Option<&str>,
    ) -> Result<Template, LifecycleError> {
        if let Some(name) = name {
            check_name(name)?;
        }
        let sandbox = self.get_live(team_id, id).await?;
        if sandbox.state != SandboxState::Running {
            return Err(LifecycleError::Conflict {
                state: sandbox.state,
                action: "snapshot",
            });
        }
        let sid: SandboxId = id.parse().map_err(|_| LifecycleError::NotFound)?;
        let host = sandbox.host_id.clone().unwrap_or_default();
        let snapshot_id = store::random_id("snap_", 10)?;
        let size = self
            .placement()
            .snapshot(&host, &sid, &snapshot_id)
            .await
            .map_err(|source| LifecycleError::Worker {
                action: "snapshot",
                source,
            })?;
        let template = Template {
            id: snapshot_id,
            team_id: Some(team_id.to_owned()),
            alias: None,
            cpu_count: sandbox.cpu_count,
            memory_mb: sandbox.memory_mb,
            disk_size_mb: sandbox.disk_size_mb,
            envd_version: sandbox.envd_version.clone(),
            created_at: now_ms(),
            kind: templates::KIND_SNAPSHOT.to_owned(),
            name: name.map(str::to_owned),
            source_sandbox_id: Some(sandbox.id.clone()),
            host_id: Some(host.clone()),
            size_bytes: Some(i64::try_from(size).unwrap_or(i64::MAX)),
        };
        templates::insert_snapshot(self.db(), &template).await?;
        audit::record(
            self.db().pool(),
            audit::Event {
                team_id: Some(team_id),
                actor,
                action: "snapshot.create",
                target_kind: "template",
                target_id: Some(&template.id),
                details: serde_json::json!({
                    "sandbox": sandbox.id,
                    "name": template.name,
                    "size_bytes": size,
                }),
            },
        )
        .await?;
        tracing::info!(sandbox = id, snapshot = %template.id, team = team_id, "snapshot taken");
        Ok(template)
    }

    /// Deletes `team_id`'s own template (or snapshot) `id_or_name`, and its files on the host
    /// holding it. Public templates cannot be deleted by a team.
    pub async fn delete_template(
        &self,
        actor: &Actor,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<(), LifecycleError> {
        let Some(template) = templates::owned(self.db(), team_id, id_or_name).await? else {
            return match templates::visible(self.db(), team_id, id_or_name).await? {
                Some(_) => Err(LifecycleError::Forbidden(
                    "public templates cannot be deleted".into(),
                )),
                None => Err(LifecycleError::TemplateNotFound(id_or_name.to_owned())),
            };
        };
        // The row goes first: once it is gone no new sandbox can be created from it, and a
        // worker that is unreachable now keeps only unused files.
        if !templates::delete(self.db(), team_id, &template.id).await? {
            return Err(LifecycleError::TemplateNotFound(id_or_name.to_owned()));
        }
        if let Some(host) = &template.host_id {
            match self.placement().delete_template(host, &template.id).await {
                Ok(()) => {}
                Err(
                    e @ (PlacementError::HostUnavailable { .. }
                    | PlacementError::Timeout { .. }
                    | PlacementError::NoTemplateHost { .. }),
                ) => {
                    tracing::warn!(template = %template.id, host, error = %e,
                        "template deleted; its host could not remove the files now");
                }
                Err(e) => {
                    tracing::warn!(template = %template.id, host, error = %e,
                        "template deleted; its host refused to remove the files");
                }
            }
        }
        audit::record(
            self.db().pool(),
            audit::Event {
                team_id: Some(team_id),
                actor,
                action: "template.delete",
                target_kind: "template",
                target_id: Some(&template.id),
                details: serde_json::json!({ "kind": template.kind, "name": template.name }),
            },
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_are_checked() {
        assert!(check_name("team/my-snap:v2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("%_").is_err());
        assert!(check_name(&"x".repeat(MAX_NAME + 1)).is_err());
    }
}
