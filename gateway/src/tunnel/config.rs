//! What the tunnel endpoint needs: address, certificates, the restart secret and timings.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use super::HubError;

/// Bytes of the endpoint secret.
pub const SECRET_LEN: usize = 32;

/// Configuration of a [`super::TunnelHub`].
#[derive(Clone)]
pub struct TunnelHubConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The gateway's certificate chain (PEM, leaf first), shown to workers.
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// The CA that signs worker certificates (control's `worker-ca.pem`).
    pub worker_ca_pem: String,
    /// Keys the stateless resets and connection ids. Keeping it across restarts lets a worker
    /// learn within one round trip that a restarted gateway forgot its connection (instead of
    /// at the idle timeout), so it re-dials at once. See [`load_or_create_secret`].
    pub secret: [u8; SECRET_LEN],
    /// Keep-alive interval; a silent path is declared dead after [`Self::idle_timeout`].
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    /// Longest wait for a stream to open and the worker's status to arrive.
    pub open_timeout: Duration,
    /// Per-stream receive window in bytes: what one slow reader may leave buffered.
    pub stream_window: u32,
}

impl std::fmt::Debug for TunnelHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelHubConfig")
            .field("listen", &self.listen)
            .field("keep_alive", &self.keep_alive)
            .field("idle_timeout", &self.idle_timeout)
            .field("open_timeout", &self.open_timeout)
            .field("stream_window", &self.stream_window)
            .finish_non_exhaustive()
    }
}

impl TunnelHubConfig {
    /// Default timings: keep-alive 2 s, idle timeout 10 s, open timeout 10 s, 1 MiB stream window.
    pub fn new(
        listen: SocketAddr,
        cert_pem: String,
        key_pem: String,
        worker_ca_pem: String,
        secret: [u8; SECRET_LEN],
    ) -> Self {
        Self {
            listen,
            cert_pem,
            key_pem,
            worker_ca_pem,
            secret,
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(10),
            stream_window: 1024 * 1024,
        }
    }

    /// Reads the certificate, key and worker CA files, and the secret at `secret_file`
    /// (created on first use, mode 0600).
    pub fn from_files(
        listen: SocketAddr,
        cert: &Path,
        key: &Path,
        worker_ca: &Path,
        secret_file: &Path,
    ) -> Result<Self, HubError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| HubError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Self::new(
            listen,
            read(cert)?,
            read(key)?,
            read(worker_ca)?,
            load_or_create_secret(secret_file)?,
        ))
    }
}

/// Reads the endpoint secret (hex) from `path`, or creates it there with fresh random bytes
/// (mode 0600 from the start). A file readable by group or others is refused.
pub fn load_or_create_secret(path: &Path) -> Result<[u8; SECRET_LEN], HubError> {
    let shown = || path.display().to_string();
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(HubError::SecretMode {
                    path: shown(),
                    mode,
                });
            }
            let text = fs::read_to_string(path).map_err(|source| HubError::Read {
                path: shown(),
                source,
            })?;
            let bytes = hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; SECRET_LEN]>::try_from(b).ok())
                .ok_or_else(|| HubError::SecretFormat { path: shown() })?;
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; SECRET_LEN];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| HubError::Entropy)?;
            let write = |source| HubError::Write {
                path: shown(),
                source,
            };
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(write)?;
            file.write_all(format!("{}\n", hex::encode(secret)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(write)?;
            tracing::info!(path = %path.display(), "created tunnel endpoint secret");
            Ok(secret)
        }
        Err(source) => Err(HubError::Read {
            path: shown(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tunnel-secret");
        let first = load_or_create_secret(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_secret(&path).unwrap(), first);
        assert_ne!(first, [0u8; SECRET_LEN]);
    }

    #[test]
    fn a_readable_or_malformed_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tunnel-secret");
        fs::write(&path, "abcd\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create_secret(&path),
            Err(HubError::SecretFormat { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_secret(&path),
            Err(HubError::SecretMode { mode: 0o644, .. })
        ));
    }
}
