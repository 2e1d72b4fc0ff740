//! Responses the gateway writes itself, all JSON `{code, message, ...}` as E2B's SDK expects.
//!
//! The two 502 messages are part of the contract: the SDK maps "The sandbox was not found" and
//! "The sandbox is running but port is not open" to its own exceptions, so they are spelled
//! exactly as E2B spells them.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use roost_proto::ids::SandboxId;
use serde_json::{Value, json};

/// A complete response: status, JSON body and optional extra headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

impl Reply {
    /// `{code, message}` with the given status.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "code": status, "message": message.into() }),
            retry_after: None,
        }
    }

    /// 502: the sandbox does not exist or is not running.
    pub fn sandbox_not_found(sandbox: &SandboxId) -> Self {
        Self {
            status: 502,
            body: json!({
                "sandboxId": sandbox.as_str(),
                "message": "The sandbox was not found",
                "code": 502,
            }),
            retry_after: None,
        }
    }

    /// 502: the sandbox runs but nothing listens on `port`.
    pub fn port_not_open(sandbox: &SandboxId, port: u16) -> Self {
        Self {
            status: 502,
            body: json!({
                "sandboxId": sandbox.as_str(),
                "message": "The sandbox is running but port is not open",
                "port": port,
                "code": 502,
            }),
            retry_after: None,
        }
    }

    /// 429 with `Retry-After` in whole seconds (at least 1).
    pub fn rate_limited(scope: &str, wait: Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Self {
            retry_after: Some(secs.max(1)),
            ..Self::error(429, format!("rate limit exceeded ({scope}); retry later"))
        }
    }

    /// Writes the reply to the client and ends the response.
    pub async fn send(&self, session: &mut Session) -> pingora::Result<()> {
        let body = Bytes::from(self.body.to_string());
        let mut header = ResponseHeader::build(self.status, Some(4))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", body.len().to_string())?;
        header.insert_header("cache-control", "no-store")?;
        if let Some(secs) = self.retry_after {
            header.insert_header("retry-after", secs.to_string())?;
        }
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_messages() {
        let id: SandboxId = "cl-abc".parse().unwrap();
        assert_eq!(
            Reply::sandbox_not_found(&id).body,
            json!({"sandboxId": "cl-abc", "message": "The sandbox was not found", "code": 502})
        );
        let port = Reply::port_not_open(&id, 8080);
        assert_eq!(port.status, 502);
        assert_eq!(port.body["port"], 8080);
        assert_eq!(
            port.body["message"],
            "The sandbox is running but port is not open"
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(
            Reply::rate_limited("ip", Duration::from_millis(1)).retry_after,
            Some(1)
        );
        assert_eq!(
            Reply::rate_limited("ip", Duration::from_millis(1500)).retry_after,
            Some(2)
        );
        assert_eq!(
            Reply::rate_limited("ip", Duration::ZERO).retry_after,
            Some(1)
        );
        assert_eq!(
            Reply::rate_limited("key", Duration::from_secs(3)).status,
            429
        );
    }
}
