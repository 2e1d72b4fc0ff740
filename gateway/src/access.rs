//! Who may reach a sandbox port.
//!
//! envd (port 49983) needs the sandbox's `X-Access-Token` when the sandbox has one, except
//! `GET /health` and `/files` requests carrying a signature (envd checks the signature itself;
//! the gateway cannot, it only knows the token's hash). Other ports are open when the sandbox
//! is public, else they need `E2b-Traffic-Access-Token`. Tokens are compared by SHA-256 with
//! the hash control gave, in constant time.

use http::{HeaderMap, Method};
use sha2::{Digest, Sha256};

use crate::routes::Route;

/// envd's port inside every sandbox.
pub const ENVD_PORT: u16 = 49983;
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Why a request may not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing header {0}")]
    MissingToken(&'static str),
    #[error("invalid {0}")]
    WrongToken(&'static str),
    /// Not public and no traffic token configured: nobody may reach the port.
    #[error("the sandbox's ports are private and it has no traffic access token")]
    Private,
}

impl Denied {
    pub fn status(&self) -> u16 {
        match self {
            Denied::MissingToken(_) => 401,
            Denied::WrongToken(_) | Denied::Private => 403,
        }
    }
}

/// Decides whether the request (method, path and query, headers) may reach `port` of the
/// sandbox described by `route`.
pub fn check(
    route: &Route,
    port: u16,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), Denied> {
    if port == ENVD_PORT {
        let Some(expected) = route.envd_access_token_sha256.as_deref() else {
            return Ok(());
        };
        if envd_exempt(method, path, query) {
            return Ok(());
        }
        return token_matches(headers, ACCESS_TOKEN_HEADER, expected);
    }
    if route.public {
        return Ok(());
    }
    let expected = route
        .traffic_access_token_sha256
        .as_deref()
        .ok_or(Denied::Private)?;
    token_matches(headers, TRAFFIC_TOKEN_HEADER, expected)
}

/// envd requests E2B lets through without the access token.
fn envd_exempt(method: &Method, path: &str, query: Option<&str>) -> bool {
    if path == "/health" && method == Method::GET {
        return true;
    }
    path == "/files"
        && query.is_some_and(|q| {
            q.split('&')
                .any(|pair| pair.starts_with("signature=") && pair.len() > "signature=".len())
        })
}

fn token_matches(
    headers: &HeaderMap,
    header: &'static str,
    expected_hex: &str,
) -> Result<(), Denied> {
    let token = headers.get(header).ok_or(Denied::MissingToken(header))?;
    let digest = Sha256::digest(token.as_bytes());
    let mut expected = [0u8; 32];
    if hex::decode_to_slice(expected_hex.trim(), &mut expected).is_err() {
        // Control gave a malformed hash: nothing can match it.
        return Err(Denied::WrongToken(header));
    }
    let difference = digest
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if difference == 0 {
        Ok(())
    } else {
        Err(Denied::WrongToken(header))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RouteState;

    fn sha(s: &str) -> String {
        hex::encode(Sha256::digest(s.as_bytes()))
    }

    fn route(envd: Option<&str>, public: bool, traffic: Option<&str>) -> Route {
        Route {
            sandbox_id: "cl-a".into(),
            team_id: "t".into(),
            state: RouteState::Running,
            worker_id: Some("w".into()),
            envd_access_token_sha256: envd.map(sha),
            public,
            traffic_access_token_sha256: traffic.map(sha),
        }
    }

    fn with(header: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header, value.parse().unwrap());
        h
    }

    #[test]
    fn envd_needs_the_access_token() {
        let r = route(Some("secret"), true, None);
        let none = HeaderMap::new();
        assert_eq!(
            check(
                &r,
                ENVD_PORT,
                &Method::POST,
                "/process.Process/Start",
                None,
                &none
            ),
            Err(Denied::MissingToken(ACCESS_TOKEN_HEADER))
        );
        assert_eq!(
            check(
                &r,
                ENVD_PORT,
                &Method::POST,
                "/x",
                None,
                &with(ACCESS_TOKEN_HEADER, "wrong")
            ),
            Err(Denied::WrongToken(ACCESS_TOKEN_HEADER))
        );
        assert_eq!(
            check(
                &r,
                ENVD_PORT,
                &Method::POST,
                "/x",
                None,
                &with(ACCESS_TOKEN_HEADER, "secret")
            ),
            Ok(())
        );
        // No token configured: open.
        assert_eq!(
            check(
                &route(None, true, None),
                ENVD_PORT,
                &Method::GET,
                "/envs",
                None,
                &none
            ),
            Ok(())
        );
    }

    #[test]
    fn envd_exemptions() {
        let r = route(Some("secret"), false, None);
        let none = HeaderMap::new();
        assert_eq!(
            check(&r, ENVD_PORT, &Method::GET, "/health", None, &none),
            Ok(())
        );
        assert!(check(&r, ENVD_PORT, &Method::POST, "/health", None, &none).is_err());
        assert_eq!(
            check(
                &r,
                ENVD_PORT,
                &Method::GET,
                "/files",
                Some("path=/a&signature=v1_abc"),
                &none
            ),
            Ok(())
        );
        assert!(
            check(
                &r,
                ENVD_PORT,
                &Method::GET,
                "/files",
                Some("path=/a&signature="),
                &none
            )
            .is_err()
        );
        assert!(
            check(
                &r,
                ENVD_PORT,
                &Method::GET,
                "/files",
                Some("path=/a"),
                &none
            )
            .is_err()
        );
        assert!(
            check(
                &r,
                ENVD_PORT,
                &Method::GET,
                "/filesx",
                Some("signature=v1_a"),
                &none
            )
            .is_err()
        );
    }

    #[test]
    fn other_ports_follow_public_and_traffic_token() {
        let none = HeaderMap::new();
        assert_eq!(
            check(
                &route(Some("s"), true, None),
                8080,
                &Method::GET,
                "/",
                None,
                &none
            ),
            Ok(())
        );
        let private = route(None, false, Some("traffic"));
        assert_eq!(
            check(&private, 8080, &Method::GET, "/", None, &none),
            Err(Denied::MissingToken(TRAFFIC_TOKEN_HEADER))
        );
        assert_eq!(
            check(
                &private,
                8080,
                &Method::GET,
                "/",
                None,
                &with(TRAFFIC_TOKEN_HEADER, "traffic")
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &private,
                8080,
                &Method::GET,
                "/",
                None,
                &with(TRAFFIC_TOKEN_HEADER, "nope")
            )
            .map_err(|d| d.status()),
            Err(403)
        );
        assert_eq!(
            check(
                &route(None, false, None),
                8080,
                &Method::GET,
                "/",
                None,
                &none
            ),
            Err(Denied::Private)
        );
        // The envd token does not open other ports.
        assert!(
            check(
                &private,
                8080,
                &Method::GET,
                "/",
                None,
                &with(ACCESS_TOKEN_HEADER, "traffic")
            )
            .is_err()
        );
    }
}
