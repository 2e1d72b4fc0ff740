//! The host side of virtio-vsock as the VMM exposes it (the Firecracker convention): each VM
//! has a Unix socket; a host client connects to it, writes `CONNECT <port>\n` and reads
//! `OK <host_port>\n`, after which the socket is a byte stream to the guest's listener on
//! `<port>`. Guest-initiated connections to host port P arrive at a Unix listener at
//! `<uds_path>_<P>`.
//!
//! Only the text of the handshake lives here (no I/O), so the VMM and the worker share it.

use std::path::{Path, PathBuf};

/// Longest reply line accepted, newline included; real replies are below 20 bytes.
pub const MAX_REPLY_LEN: usize = 64;

/// The line a host client writes to reach guest `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// Parses the muxer's reply line (with or without its `\n`); returns the host-side port.
pub fn parse_ok_line(line: &str) -> Result<u32, HandshakeError> {
    let trimmed = line.strip_suffix('\n').unwrap_or(line);
    let Some(port) = trimmed.strip_prefix("OK ") else {
        return Err(HandshakeError::Refused(
            trimmed.chars().take(MAX_REPLY_LEN).collect(),
        ));
    };
    port.trim()
        .parse()
        .map_err(|_| HandshakeError::Malformed(trimmed.to_owned()))
}

/// The listener path where guest connections to host `port` arrive.
pub fn host_listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// The muxer did not answer `OK <port>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("the vsock muxer refused the connection: {0:?}")]
    Refused(String),
    #[error("malformed vsock muxer reply {0:?}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_and_ok_lines() {
        assert_eq!(connect_line(1025), "CONNECT 1025\n");
        assert_eq!(parse_ok_line("OK 1073741824\n"), Ok(1_073_741_824));
        assert_eq!(parse_ok_line("OK 5"), Ok(5));
        assert!(matches!(
            parse_ok_line("OK x\n"),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            parse_ok_line("OK \n"),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            parse_ok_line("\n"),
            Err(HandshakeError::Refused(_))
        ));
        assert!(matches!(
            parse_ok_line("ERR no listener\n"),
            Err(HandshakeError::Refused(r)) if r == "ERR no listener"
        ));
    }

    #[test]
    fn host_listener_path_appends_the_port() {
        assert_eq!(
            host_listener_path(Path::new("/run/roost/vm1/vsock.sock"), 1024),
            Path::new("/run/roost/vm1/vsock.sock_1024")
        );
    }
}
