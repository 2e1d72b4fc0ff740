//! `roost certs`: a development PKI made with rcgen, so a whole Roost (gateway TLS, worker
//! tunnels, internal clients) runs with real TLS on a laptop or a test host.
//!
//! - `roost certs init --domain D [--out DIR]` makes a CA (`ca.pem`, `ca.key`) and the
//!   gateway's certificate (`gateway.pem`, `gateway.key`) for `D`, `*.D` (every
//!   `<port>-<id>.D`), `api.D`, `localhost` and `127.0.0.1`.
//! - `roost certs issue --kind worker|client --name N [--out DIR]` signs a client certificate
//!   with that CA: a worker's carries the worker id like control's (CN and SAN
//!   `urn:roost:worker:N`), so the gateway's tunnel endpoint accepts it when given this CA as
//!   its worker CA.
//!
//! Private keys are created with mode 0600 (never briefly readable by others); nothing is
//! overwritten without `--force`. Production certificates come from elsewhere: see
//! `certs/README.md`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Development CAs live long; leaf certificates one year (re-issue with `--force`).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Tolerated clock skew between the machines that will check the certificates.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Longest worker or client name (the gateway accepts worker ids up to this length).
const MAX_NAME_LEN: usize = 128;

#[derive(clap::Subcommand, Debug)]
pub enum CertsCommand {
    /// Make a development CA and the gateway's wildcard certificate for a domain.
    Init(InitArgs),
    /// Sign a worker or client certificate with the CA made by `roost certs init`.
    Issue(IssueArgs),
}

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The gateway's domain: sandboxes are reached at `<port>-<id>.<domain>`, the API at
    /// `api.<domain>`.
    #[arg(long)]
    pub domain: String,
    /// Directory to write into (created if missing).
    #[arg(long, default_value = "roost-certs")]
    pub out: PathBuf,
    /// Replace existing files (a new CA invalidates every certificate the old one signed).
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A worker's tunnel certificate (CN and SAN `urn:roost:worker:<name>`).
    Worker,
    /// A client certificate for mutual TLS (CN = name).
    Client,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Client => "client",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct IssueArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The worker id or client name: letters, digits, '-', '_' and '.', at most 128.
    #[arg(long)]
    pub name: String,
    /// The directory `roost certs init` wrote; the certificate is written there too, as
    /// `<kind>-<name>.pem` and `.key`.
    #[arg(long, default_value = "roost-certs")]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
}

pub fn run(command: CertsCommand) -> anyhow::Result<i32> {
    match command {
        CertsCommand::Init(args) => init(&args),
        CertsCommand::Issue(args) => issue(&args),
    }
}

fn init(args: &InitArgs) -> anyhow::Result<i32> {
    check_domain(&args.domain)?;
    let files = [CA_CERT, CA_KEY, "gateway.pem", "gateway.key"].map(|f| args.out.join(f));
    refuse_overwrite(&files, args.force)?;
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let ca_key = KeyPair::generate()?;
    let ca = ca_params(&args.domain).self_signed(&ca_key)?;

    let gateway_key = KeyPair::generate()?;
    let domain = &args.domain;
    let mut params = CertificateParams::new(vec![
        domain.clone(),
        format!("*.{domain}"),
        format!("api.{domain}"),
        "localhost".to_owned(),
    ])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, domain);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_VALIDITY);
    let gateway = params.signed_by(&gateway_key, &ca, &ca_key)?;

    let [ca_cert, ca_key_path, gateway_cert, gateway_key_path] = &files;
    write_key(ca_key_path, &ca_key)?;
    write_public(ca_cert, &ca.pem())?;
    write_key(gateway_key_path, &gateway_key)?;
    write_public(gateway_cert, &gateway.pem())?;

    println!("development CA:      {}", ca_cert.display());
    println!(
        "gateway certificate: {} (key {})",
        gateway_cert.display(),
        gateway_key_path.display()
    );
    println!("  names: {domain}, *.{domain}, api.{domain}, localhost, 127.0.0.1");
    println!("SDK clients trust it with SSL_CERT_FILE (see certs/README.md for a bundle):");
    println!("  export SSL_CERT_FILE={}", ca_cert.display());
    println!(
        "worker certificates: roost certs issue --kind worker --name <id> --out {}",
        args.out.display()
    );
    Ok(0)
}

fn issue(args: &IssueArgs) -> anyhow::Result<i32> {
    check_name(&args.name)?;
    let (ca, ca_key) = load_ca(&args.out)?;
    let stem = format!("{}-{}", args.kind.prefix(), args.name);
    let cert_path = args.out.join(format!("{stem}.pem"));
    let key_path = args.out.join(format!("{stem}.key"));
    refuse_overwrite(&[cert_path.clone(), key_path.clone()], args.force)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, &args.name);
    if args.kind == Kind::Worker {
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Roost workers");
        params.subject_alt_names = vec![SanType::URI(
            format!("urn:roost:worker:{}", args.name).try_into()?,
        )];
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_VALIDITY);
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write_key(&key_path, &key)?;
    write_public(&cert_path, &cert.pem())?;
    println!(
        "{} certificate: {} (key {})",
        args.kind.prefix(),
        cert_path.display(),
        key_path.display()
    );
    Ok(0)
}

fn ca_params(domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("Roost development CA ({domain})"),
    );
    dn.push(DnType::OrganizationName, "Roost");
    params.distinguished_name = dn;
    // Signs leaf certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_VALIDITY);
    params
}

/// Loads the CA from `dir` as rcgen needs it to sign: the same subject and key, so what it
/// signs chains to the stored certificate.
fn load_ca(dir: &Path) -> anyhow::Result<(Certificate, KeyPair)> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !key_path.exists() {
        bail!(
            "no CA in {} (missing {CA_KEY}); run `roost certs init --domain <domain> --out {}` first",
            dir.display(),
            dir.display()
        );
    }
    let mode = fs::metadata(&key_path)?.permissions().mode() & 0o777;
    ensure!(
        mode & 0o077 == 0,
        "{} is readable by group or others (mode {mode:o}); chmod 600 it",
        key_path.display()
    );
    let key_pem = fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let cert_pem = fs::read_to_string(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} holds no usable private key", key_path.display()))?;
    let params = CertificateParams::from_ca_cert_pem(&cert_pem)
        .with_context(|| format!("{} holds no usable CA certificate", cert_path.display()))?;
    let ca = params.self_signed(&key)?;
    Ok((ca, key))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime.max(DAY);
}

fn refuse_overwrite(files: &[PathBuf], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        bail!(
            "{} already exists; pass --force to replace it",
            existing.display()
        );
    }
    Ok(())
}

/// Writes a private key, created with mode 0600 from the start.
fn write_key(path: &Path, key: &KeyPair) -> anyhow::Result<()> {
    remove_if_present(path)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(key.serialize_pem().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_public(path: &Path, pem: &str) -> anyhow::Result<()> {
    remove_if_present(path)?;
    fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))
}

/// With `--force`: a fresh file gets a fresh mode (an old key file might be too open).
fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot replace {}", path.display())),
    }
}

/// A DNS name of lowercase labels: what a wildcard certificate and host-name routing need.
fn check_domain(domain: &str) -> anyhow::Result<()> {
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    ensure!(
        domain.len() <= 253 && domain.split('.').all(valid_label),
        "--domain {domain:?} is not a DNS name of lowercase letters, digits and '-' \
         (e.g. sandbox.example.com)"
    );
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
        "--name {name:?} must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_must_be_lowercase_dns_names() {
        for good in ["example.com", "sandbox.example.com", "localhost", "a-1.b2"] {
            assert!(check_domain(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Example.com",
            "a..b",
            ".a",
            "a.",
            "-a.b",
            "a_b.c",
            "*.a",
            "a b",
        ] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_cannot_leave_the_directory() {
        assert!(check_name("wrk_1").is_ok());
        assert!(check_name("worker-a.b").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
