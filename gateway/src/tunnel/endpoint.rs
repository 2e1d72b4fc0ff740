//! The QUIC endpoint workers dial: TLS, transport limits and restart-stable keys.

use std::sync::Arc;

use quinn_proto::HashedConnectionIdGenerator;
use ring::hmac;

use super::{HubError, TunnelHubConfig};

/// Binds the endpoint described by `config`. Must run inside a tokio runtime, which then
/// drives the endpoint for as long as it lives.
pub fn bind(config: &TunnelHubConfig) -> Result<quinn::Endpoint, HubError> {
    let mut server = roost_proto::tls::server_config(
        &config.cert_pem,
        &config.key_pem,
        &config.worker_ca_pem,
        roost_proto::tunnel::ALPN,
    )?;
    server.transport_config(Arc::new(transport(config)?));
    let socket =
        std::net::UdpSocket::bind(config.listen).map_err(|e| HubError::Bind(config.listen, e))?;
    quinn::Endpoint::new(
        endpoint_config(&config.secret),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| HubError::Bind(config.listen, e))
}

/// Stateless resets and connection ids keyed from `secret`. A restarted gateway with the same
/// secret answers a packet for a connection it no longer knows with a reset the worker can
/// verify, so the worker re-dials within a round trip rather than at its idle timeout.
fn endpoint_config(secret: &[u8]) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), label);
    let reset_key = hmac::Key::new(hmac::HMAC_SHA256, derive(b"roost-tunnel reset").as_ref());
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive(b"roost-tunnel cid").as_ref()[..8]);
    let cid_key = u64::from_be_bytes(cid_key);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    endpoint
}

/// Transport settings for the gateway's side of every tunnel connection.
fn transport(config: &TunnelHubConfig) -> Result<quinn::TransportConfig, HubError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(config.keep_alive))
        .max_idle_timeout(Some(config.idle_timeout.try_into()?))
        // A slow reader fills its own stream's window only. The connection-level window stays
        // unlimited (quinn's default) so that many slow readers together cannot stall the
        // rest; memory stays bounded by streams × window, and the stream count by the
        // worker's max_concurrent_bidi_streams.
        .stream_receive_window(config.stream_window.into())
        // Only the gateway opens streams.
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None);
    Ok(transport)
}
