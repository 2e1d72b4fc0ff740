//! The readiness signal: connect to the host's ready port and send one hello frame, so the
//! worker learns the guest is up without polling.

use std::time::Duration;

use futures::SinkExt;
use roost_proto::agent::{AgentMessage, Frame, FrameCodec};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;

use super::status;
use super::transport::Announce;
use crate::say;

/// The worker listens before it boots the VM; retries cover a listener that is a little late.
const ATTEMPTS: u32 = 50;
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Sends the hello, retrying for a few seconds. Reports (once) if nobody listens.
pub async fn hello(to: Announce) {
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        match send(&to).await {
            Ok(()) => return,
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(RETRY_DELAY).await;
    }
    if let Some(e) = last_error {
        say!("cannot announce readiness to {to}: {e}");
    }
}

async fn send(to: &Announce) -> std::io::Result<()> {
    let io = to.connect().await?;
    let mut framed = Framed::new(io, FrameCodec::<AgentMessage>::new());
    framed
        .send(Frame::Message(AgentMessage::Hello(status::hello())))
        .await
        .map_err(std::io::Error::other)?;
    framed.into_inner().shutdown().await
}
