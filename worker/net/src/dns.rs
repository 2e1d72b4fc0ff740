//! The sandbox's DNS server: a small UDP forwarder bound to the guest's gateway (port 53)
//! inside the sandbox's namespace, forwarding from the host's namespace to an upstream
//! resolver.
//!
//! It is where host-name rules take effect: each query name gets the policy's
//! [`NameVerdict`]; a refused name is answered `REFUSED` without asking upstream (with the
//! internet off, DNS is otherwise a way out), and the IPv4 answers for an `allowOut` host name
//! are added to the namespace's `dns_allow` set — for their TTL, bounded — *before* the answer
//! reaches the guest, so the connection that follows is admitted.
//!
//! Bounded: at most [`MAX_IN_FLIGHT`] queries per sandbox are forwarded at once (more are
//! dropped, as a busy resolver would), each waits at most [`UPSTREAM_TIMEOUT`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;
use nlink::netlink::{Connection, Nftables};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::policy::{EgressPolicy, NameVerdict};
use crate::rules;

/// Queries forwarded at once per sandbox.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long to wait for the upstream resolver.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest and longest time an admitted address stays admitted.
pub const ADMIT_MIN: Duration = Duration::from_secs(60);
pub const ADMIT_MAX: Duration = Duration::from_secs(3600);
/// Largest DNS message handled (EDNS0 sizes; plain DNS over UDP is 512).
const MAX_MESSAGE: usize = 4096;

/// A running forwarder; stops when dropped.
#[derive(Debug)]
pub struct DnsForwarder {
    task: JoinHandle<()>,
}

impl Drop for DnsForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsForwarder {
    /// Serves `socket` (bound inside the sandbox's namespace) with `policy`, forwarding to
    /// `upstream`; admissions go into the namespace table through `nft`.
    pub fn spawn(
        socket: std::net::UdpSocket,
        policy: Arc<EgressPolicy>,
        upstream: SocketAddr,
        nft: Connection<Nftables>,
    ) -> std::io::Result<Self> {
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let nft = Arc::new(nft);
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let (len, client) = match socket.recv_from(&mut buf).await {
                    Ok(got) => got,
                    Err(err) => {
                        tracing::warn!(%err, "DNS forwarder: receive failed; stopping");
                        return;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::debug!("DNS forwarder: too many queries in flight; one dropped");
                    continue;
                };
                let query = buf[..len].to_vec();
                let (socket, policy, nft) = (socket.clone(), policy.clone(), nft.clone());
                tokio::spawn(async move {
                    if let Some(reply) = answer(&query, &policy, upstream, &nft).await
                        && let Err(err) = socket.send_to(&reply, client).await
                    {
                        tracing::debug!(%err, "DNS forwarder: cannot reply to the guest");
                    }
                    drop(permit);
                });
            }
        });
        Ok(Self { task })
    }
}

/// The reply to one query, or `None` to stay silent (unparsable query, upstream silent).
async fn answer(
    query: &[u8],
    policy: &EgressPolicy,
    upstream: SocketAddr,
    nft: &Connection<Nftables>,
) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let name = request.queries.first()?.name().to_ascii();
    match policy.name_verdict(&name) {
        NameVerdict::Refuse => refused(&request),
        verdict => {
            let reply = forward(query, upstream).await?;
            if verdict == NameVerdict::ResolveAndAdmit
                && let Ok(message) = Message::from_vec(&reply)
            {
                let (addrs, ttl) = ipv4_answers(&message);
                if !addrs.is_empty()
                    && let Err(err) = rules::admit_addresses(nft.transaction(), &addrs, ttl)
                        .commit(nft)
                        .await
                {
                    tracing::warn!(%err, %name, "DNS forwarder: cannot admit resolved addresses");
                    return refused(&request);
                }
            }
            Some(reply)
        }
    }
}

/// A `REFUSED` answer echoing the question.
fn refused(request: &Message) -> Option<Vec<u8>> {
    let mut reply = Message::error_msg(
        request.metadata.id,
        request.metadata.op_code,
        ResponseCode::Refused,
    );
    reply.add_queries(request.queries.clone());
    reply.to_vec().ok()
}

/// Sends `query` upstream from the host's namespace and waits for the matching reply.
async fn forward(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.connect(upstream).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let len = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        // Only the reply to this query (same id) counts; a connected socket filters peers.
        if len >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(len);
            return Some(buf);
        }
    }
}

/// The A records of an answer and how long to admit them (the smallest TTL, bounded).
pub fn ipv4_answers(message: &Message) -> (Vec<Ipv4Addr>, Duration) {
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for record in &message.answers {
        if let RData::A(a) = &record.data {
            addrs.push(a.0);
            ttl = ttl.min(record.ttl);
        }
    }
    let ttl = Duration::from_secs(u64::from(ttl)).clamp(ADMIT_MIN, ADMIT_MAX);
    (addrs, ttl)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, Record, RecordType};

    use super::*;

    fn query(name: &str) -> Message {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        m
    }

    #[test]
    fn refusals_echo_the_id_and_question() {
        let reply = refused(&query("evil.test.")).unwrap();
        let parsed = Message::from_vec(&reply).unwrap();
        assert_eq!(parsed.metadata.id, 0x1234);
        assert_eq!(parsed.metadata.response_code, ResponseCode::Refused);
        assert_eq!(parsed.queries.len(), 1);
        assert_eq!(parsed.queries[0].name().to_ascii(), "evil.test.");
    }

    #[test]
    fn answers_give_their_a_records_and_a_bounded_ttl() {
        let mut m = query("a.test.");
        let name = Name::from_str("a.test.").unwrap();
        m.add_answer(Record::from_rdata(
            name.clone(),
            30,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m.add_answer(Record::from_rdata(
            name,
            7200,
            RData::A(A::new(192, 0, 2, 2)),
        ));
        let (addrs, ttl) = ipv4_answers(&m);
        assert_eq!(
            addrs,
            [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
        );
        assert_eq!(ttl, ADMIT_MIN, "30 s raised to the minimum");
        let (none, _) = ipv4_answers(&query("b.test."));
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn forwarding_returns_only_the_matching_reply() {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = upstream.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (len, peer) = upstream.recv_from(&mut buf).unwrap();
            // A wrong id first, then the right reply.
            let mut wrong = buf[..len].to_vec();
            wrong[0] ^= 0xff;
            upstream.send_to(&wrong, peer).unwrap();
            let mut reply = Message::from_vec(&buf[..len]).unwrap();
            reply.metadata.message_type = hickory_proto::op::MessageType::Response;
            upstream.send_to(&reply.to_vec().unwrap(), peer).unwrap();
        });
        let q = query("a.test.").to_vec().unwrap();
        let reply = forward(&q, addr).await.expect("the matching reply");
        let parsed = Message::from_vec(&reply).unwrap();
        assert_eq!(
            parsed.metadata.id, 0x1234,
            "the reply with another id was skipped"
        );
        server.join().unwrap();
    }
}
