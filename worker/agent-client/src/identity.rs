//! The identity operation (protocol version 3): hand a restored sandbox its id, hostname,
//! environment, access token, fresh entropy and the host's clock in one request.

use roost_proto::agent::{AgentMessage, IdentityApplied, IdentityRequest, Operation};

use crate::{AgentClient, Error, expect, unexpected};

impl AgentClient {
    /// Sends `request` and returns what the agent changed. A refusal (a bad hostname, too
    /// little entropy, envd not answering) is [`Error::Agent`]; an agent older than protocol
    /// version 3 refuses with [`roost_proto::agent::ErrorKind::UnsupportedVersion`].
    pub async fn set_identity(&self, request: &IdentityRequest) -> Result<IdentityApplied, Error> {
        let mut conn = self.open(Operation::Identity(request.clone())).await?;
        match expect(&mut conn, "identity_applied").await? {
            AgentMessage::IdentityApplied(applied) => Ok(applied),
            other => Err(unexpected("identity_applied", &other)),
        }
    }
}
