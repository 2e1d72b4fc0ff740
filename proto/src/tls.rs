//! Mutual-TLS configurations for Roost's QUIC links, built from PEM text (feature `tls`).
//!
//! Both ends of the tunnel (gateway and worker) need the same few steps: parse a certificate
//! chain, a private key and a CA bundle from PEM, pin TLS 1.3 and the ring provider (passed
//! explicitly, so no process-wide default provider is needed and only one crypto backend ends
//! up in a binary), require a client certificate signed by a given CA, and set the ALPN. They
//! live here, beside the protocols whose ALPN ids they carry, so neither end depends on the
//! other's crate.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("PEM data holds no readable {0}")]
    Pem(&'static str),
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier cannot be built")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration is not usable for QUIC")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The ring crypto provider every Roost TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in `pem` (at least one), in order: leaf first for a chain.
pub fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Pem(what))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(what));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in `pem`.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem("private key"))
}

/// A root store holding every certificate of `pem`.
pub fn roots_from_pem(pem: &str, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem, what)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A QUIC server that presents `chain_pem` + `key_pem` and accepts only clients whose
/// certificate chains to a CA in `client_ca_pem`, speaking `alpn`.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
    alpn: &[u8],
) -> Result<quinn::ServerConfig, TlsError> {
    let chain = certs_from_pem(chain_pem, "server certificate")?;
    let key = key_from_pem(key_pem)?;
    let roots = roots_from_pem(client_ca_pem, "client CA certificate")?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A QUIC client that trusts `ca_pem` for the server, authenticates with `cert_pem` (leaf
/// first) and `key_pem`, and speaks `alpn`.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let roots = roots_from_pem(ca_pem, "CA certificate")?;
    let chain = certs_from_pem(cert_pem, "client certificate")?;
    let key = key_from_pem(key_pem)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The leaf certificate the peer of `connection` presented, if any.
pub fn peer_leaf(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_garbage_pem_is_a_typed_error() {
        assert!(matches!(
            certs_from_pem("", "server certificate"),
            Err(TlsError::Pem("server certificate"))
        ));
        assert!(matches!(
            key_from_pem("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n"),
            Err(TlsError::Pem("private key"))
        ));
        assert!(matches!(
            client_config("", "", "", b"x"),
            Err(TlsError::Pem("CA certificate"))
        ));
    }
}
