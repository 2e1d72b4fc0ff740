//! argon2id password hashes in PHC string form (`$argon2id$v=19$m=...`).
//!
//! The cost parameters are configurable so that tests can use cheap ones; verification reads
//! the parameters from the stored hash, so changing them never locks anyone out.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl HashCost {
    /// OWASP's recommended argon2id setting (19 MiB, 2 iterations, 1 lane).
    pub const RECOMMENDED: Self = Self {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    /// The cheapest valid setting; for tests only.
    pub const TESTING: Self = Self {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("invalid argon2 parameters")]
    Params(#[source] argon2::Error),
    #[error("cannot hash password")]
    Hash(#[source] argon2::password_hash::Error),
    #[error("stored password hash is malformed")]
    StoredHash(#[source] argon2::password_hash::Error),
    #[error("the operating system's random source failed")]
    Entropy(#[source] getrandom::Error),
}

/// Hashes `password` with a fresh random salt.
pub fn hash(password: &str, cost: HashCost) -> Result<String, PasswordError> {
    let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
        .map_err(PasswordError::Params)?;
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(PasswordError::Entropy)?;
    let salt = SaltString::encode_b64(&salt).map_err(PasswordError::Hash)?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(PasswordError::Hash)
}

/// Whether `password` matches the stored `hash`.
pub fn verify(password: &str, hash: &str) -> Result<bool, PasswordError> {
    let parsed = PasswordHash::new(hash).map_err(PasswordError::StoredHash)?;
    match Argon2::default().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::Password) => Ok(false),
        Err(e) => Err(PasswordError::StoredHash(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_salted_and_verify() {
        let a = hash("correct horse", HashCost::TESTING).unwrap();
        let b = hash("correct horse", HashCost::TESTING).unwrap();
        assert!(a.starts_with("$argon2id$v=19$"));
        assert_ne!(a, b, "salts must differ");
        assert!(verify("correct horse", &a).unwrap());
        assert!(!verify("wrong horse", &a).unwrap());
    }

    #[test]
    fn malformed_stored_hash_is_an_error_not_a_mismatch() {
        assert!(matches!(
            verify("x", "not-a-hash"),
            Err(PasswordError::StoredHash(_))
        ));
    }
}
