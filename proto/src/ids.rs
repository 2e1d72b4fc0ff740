//! Sandbox identifiers: `cl-` followed by lowercase base36.
//!
//! Ids appear in host names (`<port>-<id>.<domain>`), so they are restricted to characters
//! that are valid in a DNS label and contain exactly one `-`: the gateway splits the label at
//! the first `-` to get the port, and the E2B SDKs split the same way. Lowercase only, because
//! host names are case-insensitive and a case-folded id must still name the same sandbox.

use std::fmt;
use std::str::FromStr;

/// Prefix of every sandbox id ("capsule").
pub const SANDBOX_ID_PREFIX: &str = "cl-";

/// Number of base36 digits in a generated id: 20 digits carry ~103 bits of randomness.
pub const GENERATED_ID_DIGITS: usize = 20;

/// Longest accepted body, so that `<port>-cl-<body>` stays well inside a 63-byte DNS label.
pub const MAX_ID_DIGITS: usize = 40;

const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Why a string is not a sandbox id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("sandbox id must start with `{SANDBOX_ID_PREFIX}`")]
    MissingPrefix,
    #[error("sandbox id has no characters after `{SANDBOX_ID_PREFIX}`")]
    Empty,
    #[error("sandbox id is longer than {MAX_ID_DIGITS} characters after the prefix")]
    TooLong,
    #[error(
        "sandbox id may only contain lowercase letters and digits after the prefix, found {0:?}"
    )]
    InvalidCharacter(char),
    #[error("the operating system's random source failed")]
    Entropy(#[source] getrandom::Error),
}

/// A validated sandbox id such as `cl-3k9x0q...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// Makes a fresh random id from the operating system's random source.
    pub fn generate() -> Result<Self, IdError> {
        let mut id = String::with_capacity(SANDBOX_ID_PREFIX.len() + GENERATED_ID_DIGITS);
        id.push_str(SANDBOX_ID_PREFIX);
        let mut random = [0u8; GENERATED_ID_DIGITS];
        getrandom::fill(&mut random).map_err(IdError::Entropy)?;
        // 252 is the largest multiple of 36 below 256; rejecting bytes above it keeps every
        // digit uniformly distributed.
        let mut digits = 0;
        while digits < GENERATED_ID_DIGITS {
            for byte in random {
                if digits == GENERATED_ID_DIGITS {
                    break;
                }
                if byte < 252 {
                    id.push(char::from(BASE36[usize::from(byte % 36)]));
                    digits += 1;
                }
            }
            getrandom::fill(&mut random).map_err(IdError::Entropy)?;
        }
        Ok(Self(id))
    }

    /// The id as it appears on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SandboxId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s
            .strip_prefix(SANDBOX_ID_PREFIX)
            .ok_or(IdError::MissingPrefix)?;
        if body.is_empty() {
            return Err(IdError::Empty);
        }
        if body.len() > MAX_ID_DIGITS {
            return Err(IdError::TooLong);
        }
        if let Some(bad) = body
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        {
            return Err(IdError::InvalidCharacter(bad));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_ids_parse_back_and_differ() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let id = SandboxId::generate().unwrap();
            assert_eq!(
                id.as_str().len(),
                SANDBOX_ID_PREFIX.len() + GENERATED_ID_DIGITS
            );
            assert_eq!(id.as_str().parse::<SandboxId>().unwrap(), id);
            assert!(seen.insert(id), "duplicate id generated");
        }
    }

    #[test]
    fn generated_ids_contain_one_dash() {
        let id = SandboxId::generate().unwrap();
        assert_eq!(id.as_str().matches('-').count(), 1);
    }

    #[test]
    fn parse_rejects_malformed_ids() {
        assert_eq!("abc".parse::<SandboxId>(), Err(IdError::MissingPrefix));
        assert_eq!("cl-".parse::<SandboxId>(), Err(IdError::Empty));
        assert_eq!(
            "cl-ABC".parse::<SandboxId>(),
            Err(IdError::InvalidCharacter('A'))
        );
        assert_eq!(
            "cl-a-b".parse::<SandboxId>(),
            Err(IdError::InvalidCharacter('-'))
        );
        assert_eq!(
            "cl-a.b".parse::<SandboxId>(),
            Err(IdError::InvalidCharacter('.'))
        );
        let long = format!("cl-{}", "a".repeat(MAX_ID_DIGITS + 1));
        assert_eq!(long.parse::<SandboxId>(), Err(IdError::TooLong));
    }
}
