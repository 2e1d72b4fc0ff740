//! Creating, storing and loading the CA; issuing worker and server certificates.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::PkiError;

const CA_CERT_FILE: &str = "worker-ca.pem";
const CA_KEY_FILE: &str = "worker-ca.key";
/// How long a worker certificate is valid.
pub const WORKER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Tolerated clock skew between control and workers when a certificate starts being valid.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// A fresh worker key (PKCS#8 PEM) and a CSR for it (PEM), to send at registration. The CSR's
/// subject does not matter: control writes its own.
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(vec!["roost-worker".to_owned()])?
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// The SAN URI that names worker `id` in its certificate.
pub fn worker_uri(id: &str) -> String {
    format!("urn:roost:worker:{id}")
}

/// A certificate control issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: CertificateDer<'static>,
    /// SHA-256 (hex) of the DER encoding: how control recognises the certificate later.
    pub sha256: String,
    /// When it expires, Unix seconds.
    pub not_after_unix: i64,
}

impl IssuedCert {
    fn from(cert: &Certificate, not_after: OffsetDateTime) -> Self {
        Self {
            pem: cert.pem(),
            der: cert.der().clone(),
            sha256: fingerprint(cert.der()),
            not_after_unix: not_after.unix_timestamp(),
        }
    }
}

/// SHA-256 (hex) of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The control plane's worker CA.
pub struct ControlCa {
    /// The CA certificate as stored and as handed to workers.
    pem: String,
    der: CertificateDer<'static>,
    /// The CA certificate re-materialised from its parameters, as `rcgen` needs to sign.
    issuer: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for ControlCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlCa")
            .field("sha256", &fingerprint(&self.der))
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

impl ControlCa {
    /// A new CA held only in memory (tests, and the first step of [`Self::load_or_create`]).
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Roost control worker CA");
        dn.push(DnType::OrganizationName, "Roost");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, Duration::from_secs(20 * 365 * 24 * 60 * 60));
        let issuer = params.self_signed(&key)?;
        Ok(Self {
            pem: issuer.pem(),
            der: issuer.der().clone(),
            issuer,
            key,
        })
    }

    /// Loads the CA from `dir`, creating it there on first use (key file mode 0600).
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ca = Self::generate()?;
        // Key first, created 0600 from the start (never briefly world-readable), then the
        // certificate; a crash in between leaves a key without a certificate, which `load`
        // reports rather than silently replacing the key.
        let mut key_file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io_err(&key_path))?;
        key_file
            .write_all(ca.key.serialize_pem().as_bytes())
            .and_then(|()| key_file.sync_all())
            .map_err(io_err(&key_path))?;
        fs::write(&cert_path, &ca.pem).map_err(io_err(&cert_path))?;
        tracing::info!(dir = %dir.display(), "created worker CA");
        Ok(ca)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let mode = fs::metadata(key_path)
            .map_err(io_err(key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyFileMode {
                path: key_path.display().to_string(),
                mode: mode & 0o777,
            });
        }
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        Self::from_pems(pem, &key_pem)
    }

    /// A second handle on the same CA (same certificate and key), for another task that
    /// signs (the worker channel renews certificates while the API registers workers).
    pub fn try_clone(&self) -> Result<Self, PkiError> {
        Self::from_pems(self.pem.clone(), &self.key.serialize_pem())
    }

    fn from_pems(pem: String, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(&pem)?;
        // Same subject and key as the stored certificate, so what it signs chains to it.
        let issuer = params.self_signed(&key)?;
        let der = rustls_pemfile_der(&pem)?;
        Ok(Self {
            pem,
            der,
            issuer,
            key,
        })
    }

    /// The CA certificate (PEM) that workers trust for control's server certificate.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// Signs a client certificate for worker `worker_id` with the public key of `csr_pem`.
    pub fn issue_worker(&self, csr_pem: &str, worker_id: &str) -> Result<IssuedCert, PkiError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, worker_id);
        dn.push(DnType::OrganizationName, "Roost workers");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(worker_uri(worker_id).try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, WORKER_CERT_VALIDITY);
        let not_after = params.not_after;
        csr.params = params;
        let cert = csr.signed_by(&self.issuer, &self.key)?;
        Ok(IssuedCert::from(&cert, not_after))
    }

    /// A fresh key and server certificate for control's QUIC endpoint named `server_name`.
    pub fn issue_server(&self, server_name: &str) -> Result<(IssuedCert, KeyPair), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![server_name.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, server_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, WORKER_CERT_VALIDITY);
        let not_after = params.not_after;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok((IssuedCert::from(&cert, not_after), key))
    }
}

/// The DER bytes of the first certificate in `pem`.
fn rustls_pemfile_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Pem("certificate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> String {
        let key = KeyPair::generate().unwrap();
        CertificateParams::new(vec!["ignored.example".into()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn created_ca_is_reloaded_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = ControlCa::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ControlCa::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem());
        assert_eq!(first.cert_der(), again.cert_der());
        // The reloaded CA still signs certificates that name it as issuer.
        let issued = again.issue_worker(&csr(), "wrk_1").unwrap();
        assert_ne!(issued.sha256, fingerprint(first.cert_der()));
    }

    #[test]
    fn a_group_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        ControlCa::load_or_create(dir.path()).unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            ControlCa::load_or_create(dir.path()),
            Err(PkiError::KeyFileMode { mode: 0o640, .. })
        ));
    }

    #[test]
    fn worker_certificates_carry_the_worker_id_not_the_csr_subject() {
        let ca = ControlCa::generate().unwrap();
        let issued = ca.issue_worker(&csr(), "wrk_abc").unwrap();
        let parsed = CertificateParams::from_ca_cert_der(&issued.der).unwrap();
        let cn = parsed
            .distinguished_name
            .get(&DnType::CommonName)
            .cloned()
            .unwrap();
        assert_eq!(cn, rcgen::DnValue::Utf8String("wrk_abc".into()));
        assert_eq!(
            parsed.subject_alt_names,
            vec![SanType::URI(worker_uri("wrk_abc").try_into().unwrap())]
        );
    }

    #[test]
    fn garbage_csr_is_a_typed_error() {
        let ca = ControlCa::generate().unwrap();
        assert!(matches!(
            ca.issue_worker(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "w"
            ),
            Err(PkiError::BadCsr(_))
        ));
        assert!(matches!(ca.issue_worker("", "w"), Err(PkiError::BadCsr(_))));
    }
}
