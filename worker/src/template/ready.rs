//! A template's ready check: what must answer before the snapshot is taken, so that every
//! clone starts with its services already up.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::TemplateError;
use crate::vm_handle::VmHandle;

/// Pause between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// Longest answer read.
const MAX_ANSWER: u64 = 64 * 1024;

/// What must answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReadyCheck {
    /// `GET path` on guest `127.0.0.1:port` (through the agent's port forward) answers 2xx.
    HttpGet { port: u16, path: String },
}

impl ReadyCheck {
    /// Retries until the check passes or `deadline`; the error carries the last failure.
    pub async fn wait(&self, vm: &VmHandle, deadline: Instant) -> Result<(), TemplateError> {
        let mut last = String::from("never attempted");
        while Instant::now() < deadline {
            match self.attempt(vm).await {
                Ok(()) => return Ok(()),
                Err(reason) => last = reason,
            }
            if let Some(exit) = vm.exit() {
                return Err(TemplateError::NotReady(format!("the VM stopped: {exit}")));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
        Err(TemplateError::NotReady(format!("{self:?}: {last}")))
    }

    async fn attempt(&self, vm: &VmHandle) -> Result<(), String> {
        match self {
            Self::HttpGet { port, path } => {
                let mut stream = vm.forward_port(*port).await.map_err(|e| e.to_string())?;
                let request =
                    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut answer = Vec::new();
                let mut limited = (&mut stream).take(MAX_ANSWER);
                tokio::time::timeout(Duration::from_secs(10), limited.read_to_end(&mut answer))
                    .await
                    .map_err(|_| "no answer within 10 s".to_owned())?
                    .map_err(|e| e.to_string())?;
                check_status(&answer)
            }
        }
    }
}

/// Ok for an HTTP/1.x 2xx status line.
fn check_status(answer: &[u8]) -> Result<(), String> {
    let line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let status = line.split_whitespace().nth(1).unwrap_or_default();
    if line.starts_with("HTTP/1.") && status.len() == 3 && status.starts_with('2') {
        Ok(())
    } else {
        Err(format!("answered {:?}", line.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_2xx_status_passes() {
        assert!(check_status(b"HTTP/1.1 200 OK\r\n\r\n\"OK\"").is_ok());
        assert!(check_status(b"HTTP/1.0 204 No Content\r\n\r\n").is_ok());
        for bad in [
            &b"HTTP/1.1 503 Service Unavailable\r\n\r\n"[..],
            b"",
            b"SSH-2.0\r\n",
            b"HTTP/1.1 2000 x\r\n",
        ] {
            assert!(check_status(bad).is_err(), "{bad:?}");
        }
    }
}
