//! [`TunnelClient`]: keeps one QUIC connection to every configured gateway, re-dialling with
//! backoff whenever one breaks, and serves the streams the gateways open on them.

use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost_proto::quic_stream::QuicStream;
use roost_proto::tls::TlsError;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Splicer, stream};

/// One gateway to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTarget {
    /// Its tunnel endpoint (UDP).
    pub addr: SocketAddr,
    /// The name its certificate must carry (e.g. the gateway's domain, or `localhost`).
    pub server_name: String,
}

/// Configuration of a [`TunnelClient`].
#[derive(Clone)]
pub struct TunnelClientConfig {
    pub gateways: Vec<GatewayTarget>,
    /// CA certificates (PEM) that sign the gateways' certificates.
    pub gateway_ca_pem: String,
    /// The worker's certificate (PEM, from control's registration) and its key.
    pub cert_pem: String,
    pub key_pem: String,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    /// Longest wait for a stream's header once the gateway opened it.
    pub header_timeout: Duration,
    /// Most proxied connections one gateway may hold open through this worker at once.
    pub max_streams: u32,
    /// Per-stream receive window in bytes.
    pub stream_window: u32,
    /// First and longest wait between dial attempts (doubling, with jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long [`TunnelClient::shutdown`] keeps answering stray packets after closing.
    pub close_linger: Duration,
}

impl std::fmt::Debug for TunnelClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClientConfig")
            .field("gateways", &self.gateways)
            .field("max_streams", &self.max_streams)
            .finish_non_exhaustive()
    }
}

impl TunnelClientConfig {
    /// Defaults: keep-alive 2 s, idle timeout 10 s, header timeout 10 s, 4096 streams, 1 MiB
    /// stream window, backoff 100 ms → 5 s, close linger 3 s (just over the gateway's
    /// default 2 s keep-alive).
    pub fn new(
        gateways: Vec<GatewayTarget>,
        gateway_ca_pem: String,
        cert_pem: String,
        key_pem: String,
    ) -> Self {
        Self {
            gateways,
            gateway_ca_pem,
            cert_pem,
            key_pem,
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_streams: 4096,
            stream_window: 1024 * 1024,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            close_linger: Duration::from_secs(3),
        }
    }
}

/// Why the tunnel client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid tunnel credentials")]
    Tls(#[from] TlsError),
    #[error("invalid tunnel transport setting")]
    Transport(#[from] quinn::VarIntBoundsExceeded),
    #[error("cannot open a UDP socket")]
    Socket(#[source] std::io::Error),
}

/// The worker's tunnels. Dropping it closes them all.
#[derive(Debug)]
pub struct TunnelClient {
    links: Vec<Link>,
    close_linger: Duration,
}

#[derive(Debug)]
struct Link {
    target: GatewayTarget,
    endpoint: quinn::Endpoint,
    task: JoinHandle<()>,
    /// The live connection, if any.
    state: watch::Receiver<Option<quinn::Connection>>,
}

impl TunnelClient {
    /// Starts dialling every gateway. Must be called inside a tokio runtime.
    pub fn start<S: Splicer>(
        config: TunnelClientConfig,
        splicer: Arc<S>,
    ) -> Result<Self, ClientError> {
        let mut client = roost_proto::tls::client_config(
            &config.gateway_ca_pem,
            &config.cert_pem,
            &config.key_pem,
            roost_proto::tunnel::ALPN,
        )?;
        client.transport_config(Arc::new(transport(&config)?));
        let config = Arc::new(config);
        let mut links = Vec::with_capacity(config.gateways.len());
        for target in &config.gateways {
            let bind: SocketAddr = if target.addr.is_ipv6() {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Socket)?;
            endpoint.set_default_client_config(client.clone());
            let (publish, state) = watch::channel(None);
            let task = tokio::spawn(dial_loop(
                endpoint.clone(),
                target.clone(),
                config.clone(),
                splicer.clone(),
                publish,
            ));
            links.push(Link {
                target: target.clone(),
                endpoint,
                task,
                state,
            });
        }
        Ok(Self {
            links,
            close_linger: config.close_linger,
        })
    }

    /// The gateways connected now.
    pub fn connected(&self) -> Vec<GatewayTarget> {
        self.links
            .iter()
            .filter(|link| link.state.borrow().is_some())
            .map(|link| link.target.clone())
            .collect()
    }

    /// Waits up to `timeout` until every gateway is connected; `false` if not by then.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let all = async {
            for link in &self.links {
                let mut state = link.state.clone();
                if state.wait_for(Option::is_some).await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }

    /// Closes every tunnel (their streams fail at once on both sides) and stops re-dialling.
    ///
    /// The close is one packet and can be lost (a busy receiver's socket buffer overflows), so
    /// the endpoint then lingers for `close_linger`: a gateway that missed the close and sends
    /// anything (a keep-alive, at the latest) gets a stateless reset, instead of waiting out its
    /// idle timeout with streams hanging.
    pub async fn shutdown(self) {
        for link in &self.links {
            link.task.abort();
            link.endpoint
                .close(quinn::VarInt::from_u32(0), b"worker shutting down");
        }
        for link in &self.links {
            link.endpoint.wait_idle().await;
        }
        tokio::time::sleep(self.close_linger).await;
    }
}

impl Drop for TunnelClient {
    fn drop(&mut self) {
        for link in &self.links {
            link.task.abort();
            link.endpoint
                .close(quinn::VarInt::from_u32(0), b"worker shutting down");
        }
    }
}

fn transport(config: &TunnelClientConfig) -> Result<quinn::TransportConfig, ClientError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(config.keep_alive))
        .max_idle_timeout(Some(config.idle_timeout.try_into()?))
        // The gateway opens one bi-stream per proxied connection; quinn's default of 100 would
        // cap concurrent connections per gateway far too low.
        .max_concurrent_bidi_streams(config.max_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(config.stream_window.into())
        .datagram_receive_buffer_size(None);
    Ok(transport)
}

async fn dial_loop<S: Splicer>(
    endpoint: quinn::Endpoint,
    target: GatewayTarget,
    config: Arc<TunnelClientConfig>,
    splicer: Arc<S>,
    publish: watch::Sender<Option<quinn::Connection>>,
) {
    let mut backoff = config.backoff_min;
    loop {
        let attempt = match endpoint.connect(target.addr, &target.server_name) {
            Ok(connecting) => connecting.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            Ok(connection) => {
                tracing::info!(gateway = %target.addr, "tunnel to gateway up");
                let since = Instant::now();
                publish.send_replace(Some(connection.clone()));
                let reason = serve_connection(&connection, &config, &splicer).await;
                publish.send_replace(None);
                tracing::warn!(gateway = %target.addr, %reason, "tunnel to gateway down");
                // A connection that lived a while resets the backoff: re-dial at once (a
                // restarted gateway is back within a round trip). One that died young keeps
                // backing off, so a gateway refusing us is not hammered.
                if since.elapsed() >= config.backoff_max {
                    backoff = config.backoff_min;
                }
            }
            Err(e) => tracing::warn!(gateway = %target.addr, error = %e, "cannot dial gateway"),
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

/// Accepts streams until the connection ends; returns why it ended.
async fn serve_connection<S: Splicer>(
    connection: &quinn::Connection,
    config: &TunnelClientConfig,
    splicer: &Arc<S>,
) -> quinn::ConnectionError {
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(stream::serve(
                    splicer.clone(),
                    QuicStream::new(send, recv),
                    config.header_timeout,
                ));
            }
            Err(e) => return e,
        }
    }
}

/// `base` scaled by a factor in [0.75, 1.25), so that many workers cut off by the same event
/// do not all re-dial in lockstep.
fn jitter(base: Duration) -> Duration {
    // RandomState is randomly keyed per process (and varies per instance): plenty for
    // spreading retries, without a random-number crate.
    let random = RandomState::new().hash_one(Instant::now());
    let per_mille = 750 + u32::try_from(random % 500).unwrap_or(0);
    base * per_mille / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_quarter_of_the_base() {
        let base = Duration::from_millis(1000);
        for _ in 0..1000 {
            let d = jitter(base);
            assert!(
                d >= Duration::from_millis(750) && d < Duration::from_millis(1250),
                "{d:?}"
            );
        }
    }
}
