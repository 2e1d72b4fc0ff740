//! TLS with a private CA: a certificate for `roost.test` and `*.roost.test`, HTTP/1.1 and h2
//! negotiated by ALPN, WebSocket over TLS, and a host the certificate does not cover refused.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

const SB: &str = "cl-tls1";

struct Pki {
    ca_der: Vec<u8>,
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn private_ca() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Roost test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params = CertificateParams::new(vec![DOMAIN.to_string(), format!("*.{DOMAIN}")]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("gateway.pem");
    let key_path = dir.path().join("gateway.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Pki {
        ca_der: ca.der().to_vec(),
        _dir: dir,
        cert: cert_path,
        key: key_path,
    }
}

fn connector(pki: &Pki, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(pki.ca_der.clone())).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn tls_stream(
    gw: std::net::SocketAddr,
    pki: &Pki,
    alpn: &[&[u8]],
    host: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(gw).await?;
    connector(pki, alpn)
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
}

async fn rig() -> (Gateway, Pki, Arc<FakeControl>) {
    let pki = private_ca();
    let backend = http_backend().await;
    let ws = websocket_backend().await;
    let control = Arc::new(FakeControl::default());
    control.set_route(running_route(SB, "w"));
    let dialer = Arc::new(LoopbackDialer::default());
    dialer.expose("w", SB, 8080, backend);
    dialer.expose("w", SB, 3000, ws);
    let mut config = base_config(control_http_backend().await);
    config.listen_http = None;
    config.tls = Some(tls_listener(pki.cert.clone(), pki.key.clone()));
    let gw = Gateway::start(config, dialer, control.clone()).await;
    gw.wait_for_route_stream().await;
    (gw, pki, control)
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_over_tls_to_a_sandbox_and_the_api() {
    let (gw, pki, _control) = rig().await;
    let addr = gw.config.tls.as_ref().unwrap().addr;
    let host = format!("8080-{SB}.{DOMAIN}");
    let tls = tls_stream(addr, &pki, &[b"h2", b"http/1.1"], &host)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let request = hyper::Request::builder()
            .uri(format!("https://{host}/hello"))
            .body(empty())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello from the sandbox");
    }
    // An upload streamed over h2 comes back whole.
    let payload = Bytes::from(vec![42u8; 4 * 1024 * 1024]);
    let request = hyper::Request::builder()
        .method("POST")
        .uri(format!("https://{host}/echo"))
        .body(Full::new(payload.clone()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        payload
    );

    let api = format!("api.{DOMAIN}");
    let tls = tls_stream(addr, &pki, &[b"h2"], &api).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::builder()
        .uri(format!("https://{api}/v2/sandboxes"))
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["service"], "control");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http1_over_tls_and_json_errors() {
    let (gw, pki, _control) = rig().await;
    let addr = gw.config.tls.as_ref().unwrap().addr;
    let host = format!("9-{SB}.{DOMAIN}");
    let tls = tls_stream(addr, &pki, &[b"http/1.1"], &host).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::builder()
        .uri("/")
        .header("host", &host)
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 502);
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        body["message"],
        "The sandbox is running but port is not open"
    );
    assert_eq!(body["port"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wss_through_the_gateway() {
    let (gw, pki, _control) = rig().await;
    let addr = gw.config.tls.as_ref().unwrap().addr;
    let host = format!("3000-{SB}.{DOMAIN}");
    let tls = tls_stream(addr, &pki, &[b"http/1.1"], &host).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("wss://{host}/socket"), tls)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("over tls"))
        .await
        .unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "over tls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_certificate_covers_only_the_domain() {
    let (gw, pki, _control) = rig().await;
    let addr = gw.config.tls.as_ref().unwrap().addr;
    assert!(tls_stream(addr, &pki, &[b"h2"], DOMAIN).await.is_ok());
    assert!(
        tls_stream(addr, &pki, &[b"h2"], "api.other.test")
            .await
            .is_err()
    );
    // Two labels below the domain are not covered by the wildcard.
    assert!(
        tls_stream(addr, &pki, &[b"h2"], &format!("a.b.{DOMAIN}"))
            .await
            .is_err()
    );
}
