//! Who is calling, and on behalf of which team.
//!
//! [`Caller`] authenticates: `X-API-KEY: e2b_...` (the E2B SDKs' header), or
//! `Authorization: Bearer <token>` carrying either an API key or a session JWT. [`TeamScope`]
//! then fixes the team every query of the request is scoped to: an API key's own team, or for a
//! user the team in `X-Team-Id` (default: their personal team), after checking membership in
//! the database. Both spend the rate-limit budgets.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::auth::api_key;
use crate::store::audit::Actor;
use crate::store::teams::{self, Role};
use crate::store::{api_keys, now_ms, users};

/// An authenticated credential.
#[derive(Debug, Clone)]
pub enum Caller {
    ApiKey { key_id: String, team_id: String },
    User { user_id: String },
}

impl Caller {
    pub fn actor(&self) -> Actor {
        match self {
            Self::ApiKey { key_id, .. } => Actor::ApiKey(key_id.clone()),
            Self::User { user_id } => Actor::User(user_id.clone()),
        }
    }

    /// The user behind a session; team administration is not open to API keys.
    pub fn user_id(&self) -> Result<&str, ApiError> {
        match self {
            Self::User { user_id } => Ok(user_id),
            Self::ApiKey { .. } => Err(ApiError::forbidden(
                "this route needs a user session, not an API key",
            )),
        }
    }

    /// Requires the user to hold at least `min` in `team_id`. A team they are not in is
    /// reported as not found, so team ids cannot be probed.
    pub async fn require_role(
        &self,
        state: &AppState,
        team_id: &str,
        min: Role,
    ) -> Result<Role, ApiError> {
        let user_id = self.user_id()?;
        let role = teams::role_of(state.db(), team_id, user_id)
            .await?
            .ok_or_else(|| ApiError::not_found("team not found"))?;
        if role < min {
            return Err(ApiError::forbidden(format!(
                "this needs the {min} role in the team"
            )));
        }
        state.limits.check_team(team_id).await?;
        Ok(role)
    }
}

fn header<'a>(parts: &'a Parts, name: &str) -> Result<Option<&'a str>, ApiError> {
    parts
        .headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::unauthorized(format!("{name} is not valid text")))
        })
        .transpose()
}

async fn api_key_caller(state: &AppState, secret: &str) -> Result<Caller, ApiError> {
    if !api_key::looks_valid(secret) {
        return Err(ApiError::unauthorized("invalid API key"));
    }
    let key = api_keys::active_by_hash(state.db(), &api_key::digest(secret))
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid API key"))?;
    state.limits.check(&key.id, Some(&key.team_id)).await?;
    api_keys::touch(state.db(), &key.id, now_ms()).await?;
    Ok(Caller::ApiKey {
        key_id: key.id,
        team_id: key.team_id,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(key) = header(parts, "x-api-key")? {
            return api_key_caller(state, key.trim()).await;
        }
        let Some(auth) = header(parts, "authorization")? else {
            return Err(ApiError::unauthorized(
                "missing credentials: send X-API-KEY or Authorization: Bearer",
            ));
        };
        let token = auth
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("Authorization must use the Bearer scheme"))?
            .trim();
        if token.starts_with(api_key::PREFIX) {
            return api_key_caller(state, token).await;
        }
        let claims = state
            .sessions
            .verify(token)
            .map_err(|_| ApiError::unauthorized("session token is invalid or expired"))?;
        // The user may have been deleted since the token was issued.
        if users::by_id(state.db(), &claims.sub).await?.is_none() {
            return Err(ApiError::unauthorized(
                "session token is invalid or expired",
            ));
        }
        state.limits.check(&claims.sub, None).await?;
        Ok(Caller::User {
            user_id: claims.sub,
        })
    }
}

/// A caller together with the team the request acts in.
#[derive(Debug, Clone)]
pub struct TeamScope {
    pub caller: Caller,
    pub team_id: String,
}

impl TeamScope {
    pub fn actor(&self) -> Actor {
        self.caller.actor()
    }
}

impl FromRequestParts<AppState> for TeamScope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let requested = header(parts, "x-team-id")?.map(str::to_owned);
        let team_id = match &caller {
            Caller::ApiKey { team_id, .. } => {
                if requested.as_ref().is_some_and(|r| r != team_id) {
                    return Err(ApiError::forbidden("an API key acts only in its own team"));
                }
                team_id.clone()
            }
            Caller::User { user_id } => {
                let team_id = match requested {
                    Some(t) => t,
                    None => {
                        users::by_id(state.db(), user_id)
                            .await?
                            .ok_or_else(|| {
                                ApiError::unauthorized("session token is invalid or expired")
                            })?
                            .default_team_id
                    }
                };
                if teams::role_of(state.db(), &team_id, user_id)
                    .await?
                    .is_none()
                {
                    return Err(ApiError::forbidden("not a member of this team"));
                }
                state.limits.check_team(&team_id).await?;
                team_id
            }
        };
        Ok(Self { caller, team_id })
    }
}
