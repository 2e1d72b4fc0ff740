//! Teams, members and roles. Owners manage owners; admins manage members; a team always
//! keeps at least one owner. Every check reads the caller's role from the database.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::caller::Caller;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{Json, Path};
use crate::api::time::rfc3339;
use crate::store::audit::{self, Actor};
use crate::store::teams::{self, Role};
use crate::store::users;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Team {
    pub id: String,
    pub name: String,
    /// The caller's role in the team.
    pub role: Role,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    pub email: String,
    pub role: Role,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    pub role: Role,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub user_id: String,
    pub email: String,
    pub role: Role,
    pub joined_at: String,
}

async fn record(
    state: &AppState,
    caller: &Caller,
    team_id: &str,
    action: &str,
    target: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: Some(team_id),
            actor: &caller.actor(),
            action,
            target_kind: "user",
            target_id: Some(target),
            details,
        },
    )
    .await?;
    Ok(())
}

/// Creates a team owned by the caller.
#[utoipa::path(post, path = "/v1/teams", tag = "teams", request_body = NewTeam,
    security(("bearer" = [])), responses((status = 201, body = Team), (status = 400, body = ErrorBody)))]
pub async fn create_team(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<NewTeam>,
) -> Result<(StatusCode, axum::Json<Team>), ApiError> {
    let user_id = caller.user_id()?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::bad_request(
            "team name must be 1 to 128 characters",
        ));
    }
    let id = teams::create(state.db(), user_id, name).await?;
    audit::record(
        state.db().pool(),
        audit::Event {
            team_id: Some(&id),
            actor: &Actor::User(user_id.to_owned()),
            action: "team.create",
            target_kind: "team",
            target_id: Some(&id),
            details: serde_json::json!({ "name": name }),
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(Team {
            id,
            name: name.to_owned(),
            role: Role::Owner,
        }),
    ))
}

/// The teams the caller belongs to.
#[utoipa::path(get, path = "/v1/teams", tag = "teams", security(("bearer" = [])), responses((status = 200, body = Vec<Team>)))]
pub async fn list_teams(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Team>>, ApiError> {
    let teams = teams::for_user(state.db(), caller.user_id()?).await?;
    Ok(axum::Json(
        teams
            .into_iter()
            .map(|t| Team {
                id: t.team_id,
                name: t.name,
                role: t.role,
            })
            .collect(),
    ))
}

/// The members of a team (any member may list them).
#[utoipa::path(get, path = "/v1/teams/{team_id}/members", tag = "teams", security(("bearer" = [])),
    params(("team_id" = String, Path)), responses((status = 200, body = Vec<Member>), (status = 404, body = ErrorBody)))]
pub async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(team_id): Path<String>,
) -> Result<axum::Json<Vec<Member>>, ApiError> {
    caller.require_role(&state, &team_id, Role::Member).await?;
    let members = teams::members(state.db(), &team_id).await?;
    Ok(axum::Json(
        members
            .into_iter()
            .map(|m| Member {
                user_id: m.user_id,
                email: m.email,
                role: m.role,
                joined_at: rfc3339(m.created_at),
            })
            .collect(),
    ))
}

/// Adds a registered user to the team. Admins add members and admins; only owners add owners.
#[utoipa::path(post, path = "/v1/teams/{team_id}/members", tag = "teams", security(("bearer" = [])),
    params(("team_id" = String, Path)), request_body = NewMember,
    responses((status = 201, body = Member), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(team_id): Path<String>,
    Json(req): Json<NewMember>,
) -> Result<(StatusCode, axum::Json<Member>), ApiError> {
    let my_role = caller.require_role(&state, &team_id, Role::Admin).await?;
    if req.role == Role::Owner && my_role != Role::Owner {
        return Err(ApiError::forbidden("only owners can add owners"));
    }
    let email = req.email.trim().to_lowercase();
    let user = users::by_email(state.db(), &email)
        .await?
        .ok_or_else(|| ApiError::not_found("no account with this email"))?;
    if !teams::add_member(state.db(), &team_id, &user.id, req.role).await? {
        return Err(ApiError::conflict("already a member of this team"));
    }
    record(
        &state,
        &caller,
        &team_id,
        "member.add",
        &user.id,
        serde_json::json!({ "role": req.role }),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(Member {
            user_id: user.id,
            email: user.email,
            role: req.role,
            joined_at: rfc3339(crate::store::now_ms()),
        }),
    ))
}

async fn guard_owner_change(
    state: &AppState,
    team_id: &str,
    my_role: Role,
    target_role: Role,
    new_role: Option<Role>,
) -> Result<(), ApiError> {
    let touches_owner = target_role == Role::Owner || new_role == Some(Role::Owner);
    if touches_owner && my_role != Role::Owner {
        return Err(ApiError::forbidden("only owners can change owners"));
    }
    if target_role == Role::Owner
        && new_role != Some(Role::Owner)
        && teams::owner_count(state.db(), team_id).await? <= 1
    {
        return Err(ApiError::conflict("a team must keep at least one owner"));
    }
    Ok(())
}

/// Changes a member's role.
#[utoipa::path(patch, path = "/v1/teams/{team_id}/members/{user_id}", tag = "teams", security(("bearer" = [])),
    params(("team_id" = String, Path), ("user_id" = String, Path)), request_body = RoleChange,
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn set_member_role(
    State(state): State<AppState>,
    caller: Caller,
    Path((team_id, user_id)): Path<(String, String)>,
    Json(req): Json<RoleChange>,
) -> Result<StatusCode, ApiError> {
    let my_role = caller.require_role(&state, &team_id, Role::Admin).await?;
    let target = teams::role_of(state.db(), &team_id, &user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("member not found"))?;
    guard_owner_change(&state, &team_id, my_role, target, Some(req.role)).await?;
    if !teams::set_role(state.db(), &team_id, &user_id, req.role).await? {
        return Err(ApiError::not_found("member not found"));
    }
    record(
        &state,
        &caller,
        &team_id,
        "member.role",
        &user_id,
        serde_json::json!({ "from": target, "to": req.role }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a member. Admins remove others; anyone may leave.
#[utoipa::path(delete, path = "/v1/teams/{team_id}/members/{user_id}", tag = "teams", security(("bearer" = [])),
    params(("team_id" = String, Path), ("user_id" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((team_id, user_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let leaving = caller.user_id()? == user_id;
    let min = if leaving { Role::Member } else { Role::Admin };
    let my_role = caller.require_role(&state, &team_id, min).await?;
    let target = teams::role_of(state.db(), &team_id, &user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("member not found"))?;
    // When leaving, `my_role` is the target's own role, so owners may leave unless last.
    guard_owner_change(&state, &team_id, my_role, target, None).await?;
    if !teams::remove_member(state.db(), &team_id, &user_id).await? {
        return Err(ApiError::not_found("member not found"));
    }
    record(
        &state,
        &caller,
        &team_id,
        "member.remove",
        &user_id,
        serde_json::json!({}),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
