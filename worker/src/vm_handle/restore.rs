//! Handing a restored agent its identity. The agent in a restored VM listens again on its
//! port once the guest has processed the vsock transport reset, which takes an unknown moment
//! after the VMM starts: until then connections fail (refused, handshake closed or reset) and
//! are retried every few milliseconds. An answer that is a refusal ends the attempt at once.

use std::time::{Duration, Instant};

use roost_agent_client::{AgentClient, Error};
use roost_proto::agent::{Hello, IdentityApplied, IdentityRequest};

/// Pause between connection attempts.
const RETRY_EVERY: Duration = Duration::from_millis(10);

/// The restored agent did not take its identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no answer from the agent within the ready timeout")]
    Timeout {
        #[source]
        last: Option<Error>,
    },
    #[error("the agent refused the identity")]
    Refused(#[source] Error),
    #[error(
        "the agent left machine-wide parts of its identity unapplied ({0:?}); clones could \
         share state"
    )]
    Incomplete(IdentityApplied),
}

/// Sends `identity` until the agent answers (or `deadline` passes), checks that everything
/// was applied, and returns the agent's hello (with its new hostname).
pub async fn hand_identity(
    agent: &AgentClient,
    identity: &IdentityRequest,
    deadline: Instant,
) -> Result<Hello, IdentityError> {
    apply_identity(agent, identity, deadline).await?;
    retry_until(deadline, || agent.hello()).await
}

/// Hands `identity` to the agent, retrying until it answers (or `deadline` passes), in one
/// exchange; fails unless every machine-wide part was applied.
pub async fn apply_identity(
    agent: &AgentClient,
    identity: &IdentityRequest,
    deadline: Instant,
) -> Result<IdentityApplied, IdentityError> {
    let applied = retry_until(deadline, || agent.set_identity(identity)).await?;
    if !(applied.entropy && applied.hostname && applied.clock && applied.envd) {
        return Err(IdentityError::Incomplete(applied));
    }
    Ok(applied)
}

/// Waits until the restored agent answers (or `deadline` passes) and returns its hello.
pub async fn await_hello(agent: &AgentClient, deadline: Instant) -> Result<Hello, IdentityError> {
    retry_until(deadline, || agent.hello()).await
}

async fn retry_until<T, F: Future<Output = Result<T, Error>>>(
    deadline: Instant,
    mut attempt: impl FnMut() -> F,
) -> Result<T, IdentityError> {
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(IdentityError::Timeout { last });
        }
        match tokio::time::timeout(left, attempt()).await {
            Err(_) => return Err(IdentityError::Timeout { last }),
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if not_listening_yet(&e) => {
                tracing::trace!("agent not answering yet: {e}");
                last = Some(e);
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Ok(Err(e)) => return Err(IdentityError::Refused(e)),
        }
    }
}

/// Failures that mean "nobody answered yet", as opposed to an answer.
fn not_listening_yet(error: &Error) -> bool {
    matches!(
        error,
        Error::Connect { .. }
            | Error::Handshake { .. }
            | Error::HandshakeTimeout { .. }
            | Error::Io(_)
            | Error::Frame(_)
            | Error::Closed(_)
    )
}
