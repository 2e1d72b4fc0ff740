//! Which worker a tunnel connection belongs to, read from its verified client certificate.
//!
//! Control issues worker certificates with CN = worker id and SAN URI
//! `urn:roost:worker:<id>` (`control/src/pki/ca.rs`). The SAN is preferred because it is typed
//! (a CN is free text in other PKIs); the CN is the fallback for certificates made elsewhere,
//! e.g. `roost certs issue --kind worker`, which writes both.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// URI prefix naming a worker in its certificate.
pub const WORKER_URI_PREFIX: &str = "urn:roost:worker:";
/// Longest worker id accepted.
const MAX_WORKER_ID_LEN: usize = 128;

/// Why no worker id could be read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the certificate cannot be parsed")]
    Unparseable,
    #[error("the certificate names no worker (no urn:roost:worker: URI and no common name)")]
    NoWorkerName,
    #[error("worker id {0:?} is not 1..=128 letters, digits, '-', '_' or '.'")]
    InvalidId(String),
}

/// The worker id that certificate `der` names.
pub fn worker_id_from_cert(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparseable)?;
    let from_uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => uri.strip_prefix(WORKER_URI_PREFIX),
                _ => None,
            })
        });
    let id = match from_uri {
        Some(id) => id.to_owned(),
        None => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(IdentityError::NoWorkerName)?
            .to_owned(),
    };
    let valid = !id.is_empty()
        && id.len() <= MAX_WORKER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(IdentityError::InvalidId(id));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    use super::*;

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_worker_uri_wins_over_the_common_name() {
        let der = cert(
            Some("something-else"),
            vec![SanType::URI("urn:roost:worker:wrk_7".try_into().unwrap())],
        );
        assert_eq!(worker_id_from_cert(&der).unwrap(), "wrk_7");
    }

    #[test]
    fn the_common_name_is_the_fallback() {
        let der = cert(Some("wrk_8"), vec![]);
        assert_eq!(worker_id_from_cert(&der).unwrap(), "wrk_8");
    }

    #[test]
    fn unusable_names_are_refused() {
        assert_eq!(
            worker_id_from_cert(&cert(None, vec![])),
            Err(IdentityError::NoWorkerName)
        );
        assert_eq!(
            worker_id_from_cert(&cert(Some("a b/../c"), vec![])),
            Err(IdentityError::InvalidId("a b/../c".into()))
        );
        assert_eq!(
            worker_id_from_cert(b"not a certificate"),
            Err(IdentityError::Unparseable)
        );
    }
}
