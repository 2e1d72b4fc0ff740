//! The control plane's certificate authority for worker mutual TLS.
//!
//! Control keeps one CA (`worker-ca.pem` and `worker-ca.key`, mode 0600, in its data
//! directory; created on first start). It signs:
//! - each worker's client certificate, from a CSR the worker sends at registration, so the
//!   worker's private key never leaves its host. Control ignores the CSR's subject and writes
//!   its own: CN = the worker id, SAN = URI `urn:roost:worker:<id>`, extended key usage client
//!   auth only.
//! - the server certificate of control's QUIC endpoint (SAN = the configured server name).
//!
//! The QUIC endpoint trusts only this CA for client certificates, and maps a connection to its
//! host by the SHA-256 of the certificate it presented (stored at registration), so a
//! certificate is bound to exactly one host row and re-registering a host issues a new one.
//! `rcgen` issues, `rustls` (ring provider) verifies.

mod ca;
mod tls;

pub use ca::{
    ControlCa, IssuedCert, WORKER_CERT_VALIDITY, fingerprint, new_key_and_csr, worker_uri,
};
pub use tls::{client_config, server_config};

/// Why a certificate could not be issued, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read or write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CA key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyFileMode { path: String, mode: u32 },
    #[error("certificate operation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate signing request is not valid")]
    BadCsr(#[source] rcgen::Error),
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier cannot be built")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration is not usable for QUIC")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("PEM data holds no {0}")]
    Pem(&'static str),
}
