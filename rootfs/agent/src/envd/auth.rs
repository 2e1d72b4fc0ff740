//! Who may call, and as which user: the `X-Access-Token` check and `Authorization: Basic`
//! user selection.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::connect::{Code, ConnectError};
use super::state::{Envd, SandboxConfig};
use super::users::Account;

pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// Whether the request's `X-Access-Token` satisfies the sandbox's token (if it has one).
pub fn token_ok(config: &SandboxConfig, headers: &HeaderMap) -> bool {
    let Some(expected) = &config.access_token else {
        return true;
    };
    headers
        .get(ACCESS_TOKEN_HEADER)
        .is_some_and(|got| constant_time_eq(got.as_bytes(), expected.as_bytes()))
}

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware for the routes that always need the token.
pub async fn require_token(
    State(envd): State<Arc<Envd>>,
    request: Request,
    next: Next,
) -> Response {
    if token_ok(&envd.config(), request.headers()) {
        next.run(request).await
    } else {
        ConnectError::new(
            Code::Unauthenticated,
            "missing or wrong access token (X-Access-Token)",
        )
        .into_response()
    }
}

/// The user named by `Authorization: Basic base64("<user>:")`, if any.
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, ConnectError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ConnectError::new(
            Code::Unauthenticated,
            format!("bad Authorization header: {why}"),
        )
    };
    let value = value.to_str().map_err(|_| bad("not ASCII"))?;
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return Err(bad("expected `Basic <base64>`"));
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad("only the Basic scheme is accepted"));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad("not base64"))?;
    let text = String::from_utf8(decoded).map_err(|_| bad("not UTF-8"))?;
    let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    Ok((!user.is_empty()).then(|| user.to_owned()))
}

/// The account a request acts as: the named user, else the sandbox's default user.
pub fn account_for(envd: &Envd, named: Option<String>) -> Result<Account, ConnectError> {
    let name = named.unwrap_or_else(|| envd.config().default_user);
    Account::lookup(&name)
}

/// [`account_for`] with the user from the `Authorization` header.
pub fn request_account(envd: &Envd, headers: &HeaderMap) -> Result<Account, ConnectError> {
    account_for(envd, basic_user(headers)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn basic_user_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_user(&headers).unwrap(), None);
        headers.insert("authorization", HeaderValue::from_static("Basic cm9vdDo=")); // root:
        assert_eq!(basic_user(&headers).unwrap().as_deref(), Some("root"));
        headers.insert("authorization", HeaderValue::from_static("basic dXNlcg==")); // user
        assert_eq!(basic_user(&headers).unwrap().as_deref(), Some("user"));
        headers.insert("authorization", HeaderValue::from_static("Basic Og==")); // :
        assert_eq!(basic_user(&headers).unwrap(), None);
        for bad in ["Bearer abc", "Basic !!!", "Basic"] {
            headers.insert("authorization", HeaderValue::from_static(bad));
            assert_eq!(
                basic_user(&headers).unwrap_err().code,
                Code::Unauthenticated,
                "{bad}"
            );
        }
    }

    #[test]
    fn token_check() {
        let mut config = SandboxConfig::default();
        let mut headers = HeaderMap::new();
        assert!(token_ok(&config, &headers), "no token configured: open");
        config.access_token = Some("secret".into());
        assert!(!token_ok(&config, &headers));
        headers.insert(ACCESS_TOKEN_HEADER, HeaderValue::from_static("secreT"));
        assert!(!token_ok(&config, &headers));
        headers.insert(ACCESS_TOKEN_HEADER, HeaderValue::from_static("secret"));
        assert!(token_ok(&config, &headers));
    }
}
