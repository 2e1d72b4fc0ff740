//! Session tokens: HS256 JWTs that name only the user and expire.
//!
//! A token proves *who* the caller is; it carries no roles or teams, which are read from the
//! database on every request so that a demotion takes effect at once.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims of a session token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot sign session token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("session token is invalid or expired")]
    Invalid(#[source] jsonwebtoken::errors::Error),
}

/// Signs and checks session tokens with one shared secret.
pub struct SessionKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl,
        }
    }

    /// A token for `user_id` issued at `now_secs`; returns it with its expiry (Unix seconds).
    pub fn issue(&self, user_id: &str, now_secs: i64) -> Result<(String, i64), TokenError> {
        let exp = now_secs.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX));
        let claims = Claims {
            sub: user_id.to_owned(),
            iat: now_secs,
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(TokenError::Sign)?;
        Ok((token, exp))
    }

    /// The claims of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(TokenError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> i64 {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap()
    }

    #[test]
    fn issued_token_verifies_and_names_the_user() {
        let keys = SessionKeys::new(b"secret", Duration::from_secs(60));
        let (token, exp) = keys.issue("usr_1", now()).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, "usr_1");
        assert_eq!(claims.exp, exp);
    }

    #[test]
    fn expired_token_is_rejected() {
        let keys = SessionKeys::new(b"secret", Duration::from_secs(60));
        let (token, _) = keys.issue("usr_1", now() - 3600).unwrap();
        assert!(keys.verify(&token).is_err());
    }

    #[test]
    fn token_signed_with_another_secret_is_rejected() {
        let other = SessionKeys::new(b"other", Duration::from_secs(60));
        let (token, _) = other.issue("usr_1", now()).unwrap();
        let keys = SessionKeys::new(b"secret", Duration::from_secs(60));
        assert!(keys.verify(&token).is_err());
    }
}
