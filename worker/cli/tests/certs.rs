//! `roost certs init` and `roost certs issue` with the real binary: the files, their modes,
//! refusing to overwrite, and chains that rustls' webpki verifiers accept for exactly the
//! names they should.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

const DOMAIN: &str = "sandbox.example.test";

fn roost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let output = roost(args);
    assert!(
        output.status.success(),
        "roost {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let output = roost(args);
    assert!(!output.status.success(), "roost {args:?} succeeded");
    String::from_utf8(output.stderr).unwrap()
}

fn cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

fn roots(dir: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(cert(&dir.join("ca.pem"))).unwrap();
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_makes_a_ca_and_a_gateway_certificate_valid_for_every_gateway_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let out = dir.to_str().unwrap();
    let stdout = ok(&["certs", "init", "--domain", DOMAIN, "--out", out]);
    assert!(stdout.contains("SSL_CERT_FILE"), "{stdout}");
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("gateway.key")), 0o600);

    let verifier = WebPkiServerVerifier::builder_with_provider(roots(&dir), provider())
        .build()
        .unwrap();
    let leaf = cert(&dir.join("gateway.pem"));
    let verify = |name: &str| {
        verifier.verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
    };
    for name in [
        DOMAIN.to_owned(),
        format!("api.{DOMAIN}"),
        format!("49983-cl-abc123.{DOMAIN}"),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ] {
        assert!(verify(&name).is_ok(), "{name}: {:?}", verify(&name));
    }
    // The wildcard covers one label only, and nothing outside the domain.
    for name in [
        format!("a.b.{DOMAIN}"),
        "example.test".to_owned(),
        "10.0.0.1".to_owned(),
    ] {
        assert!(verify(&name).is_err(), "{name} should not verify");
    }
    // A certificate the gateway presents is no client certificate.
    let clients = WebPkiClientVerifier::builder_with_provider(roots(&dir), provider())
        .build()
        .unwrap();
    assert!(
        clients
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .is_err()
    );
}

#[test]
fn issue_signs_worker_and_client_certificates_with_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.to_str().unwrap();
    ok(&["certs", "init", "--domain", DOMAIN, "--out", out]);
    ok(&[
        "certs", "issue", "--kind", "worker", "--name", "wrk_1", "--out", out,
    ]);
    ok(&[
        "certs", "issue", "--kind", "client", "--name", "ops", "--out", out,
    ]);
    assert_eq!(mode(&dir.join("worker-wrk_1.key")), 0o600);
    assert_eq!(mode(&dir.join("client-ops.key")), 0o600);

    let clients = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
        .build()
        .unwrap();
    for file in ["worker-wrk_1.pem", "client-ops.pem"] {
        let leaf = cert(&dir.join(file));
        assert!(
            clients
                .verify_client_cert(&leaf, &[], UnixTime::now())
                .is_ok(),
            "{file}"
        );
    }
    // The worker certificate names the worker the way control's do.
    let pem = std::fs::read_to_string(dir.join("worker-wrk_1.pem")).unwrap();
    let der = cert(&dir.join("worker-wrk_1.pem"));
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let uri = b"urn:roost:worker:wrk_1";
    assert!(der.windows(uri.len()).any(|w| w == uri));

    // Certificates from another CA do not verify against this one.
    let other = tempfile::tempdir().unwrap();
    let other_out = other.path().to_str().unwrap();
    ok(&["certs", "init", "--domain", DOMAIN, "--out", other_out]);
    ok(&[
        "certs", "issue", "--kind", "worker", "--name", "wrk_1", "--out", other_out,
    ]);
    let foreign = cert(&other.path().join("worker-wrk_1.pem"));
    assert!(
        clients
            .verify_client_cert(&foreign, &[], UnixTime::now())
            .is_err()
    );
}

#[test]
fn nothing_is_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.to_str().unwrap();
    ok(&["certs", "init", "--domain", DOMAIN, "--out", out]);
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let err = fails(&["certs", "init", "--domain", DOMAIN, "--out", out]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);

    ok(&[
        "certs", "issue", "--kind", "worker", "--name", "w1", "--out", out,
    ]);
    let err = fails(&[
        "certs", "issue", "--kind", "worker", "--name", "w1", "--out", out,
    ]);
    assert!(err.contains("worker-w1"), "{err}");
    ok(&[
        "certs", "issue", "--kind", "worker", "--name", "w1", "--out", out, "--force",
    ]);

    // --force on init makes a new CA, with a private key file again.
    std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    ok(&["certs", "init", "--domain", DOMAIN, "--out", out, "--force"]);
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
}

#[test]
fn bad_input_is_refused_with_a_message_saying_what_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    let err = fails(&["certs", "init", "--domain", "Bad_Domain", "--out", out]);
    assert!(err.contains("--domain"), "{err}");
    let err = fails(&[
        "certs", "issue", "--kind", "worker", "--name", "w1", "--out", out,
    ]);
    assert!(err.contains("roost certs init"), "{err}");
    ok(&["certs", "init", "--domain", DOMAIN, "--out", out]);
    let err = fails(&[
        "certs", "issue", "--kind", "worker", "--name", "../x", "--out", out,
    ]);
    assert!(err.contains("--name"), "{err}");
    std::fs::set_permissions(
        tmp.path().join("ca.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let err = fails(&[
        "certs", "issue", "--kind", "client", "--name", "c", "--out", out,
    ]);
    assert!(err.contains("chmod 600"), "{err}");
}
