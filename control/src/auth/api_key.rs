//! API keys: `e2b_` + 40 lowercase hex characters (the form the E2B SDKs expect).
//!
//! The secret is shown once, at creation. The database keeps its SHA-256 (a fast hash is
//! right here: the secret has 160 random bits, so there is nothing to brute-force) and a short
//! prefix that lets people tell their keys apart.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "e2b_";
const SECRET_BYTES: usize = 20;
/// Characters of the key shown in listings (`e2b_` and the first 6 hex digits).
const DISPLAY_LEN: usize = PREFIX.len() + 6;

/// A freshly generated key.
#[derive(Debug)]
pub struct NewKey {
    pub secret: String,
    pub sha256: String,
    pub display_prefix: String,
}

pub fn generate() -> Result<NewKey, getrandom::Error> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes)?;
    let secret = format!("{PREFIX}{}", hex::encode(bytes));
    Ok(NewKey {
        sha256: digest(&secret),
        display_prefix: secret[..DISPLAY_LEN].to_owned(),
        secret,
    })
}

/// Whether `candidate` has the shape of a key (checked before any database lookup).
pub fn looks_valid(candidate: &str) -> bool {
    candidate.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == SECRET_BYTES * 2
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The stored form of a key.
pub fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_e2b_shape_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert!(looks_valid(&a.secret), "{}", a.secret);
        assert_eq!(a.secret.len(), 44);
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(&a.display_prefix));
        assert_eq!(a.sha256, digest(&a.secret));
        assert_ne!(a.sha256, a.secret);
    }

    #[test]
    fn malformed_keys_are_refused_early() {
        assert!(!looks_valid("e2b_"));
        assert!(!looks_valid(&format!("e2b_{}", "A".repeat(40))));
        assert!(!looks_valid(&format!("xyz_{}", "a".repeat(40))));
        assert!(!looks_valid(&format!("e2b_{}", "a".repeat(41))));
    }
}
