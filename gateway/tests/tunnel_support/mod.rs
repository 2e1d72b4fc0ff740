//! Shared pieces of the tunnel end-to-end tests: a private PKI shaped like Roost's (a gateway
//! CA for server certificates, a worker CA issuing control-style worker certificates), a hub and
//! a worker wired together on loopback, and small real servers to splice into.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use roost_gateway::tunnel::{TunnelHub, TunnelHubConfig};
use roost_proto::SandboxId;
use roost_worker::tunnel::{GatewayTarget, TcpSplicer, TunnelClient, TunnelClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA that can issue server and worker certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// A certificate chain and its key, as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            cert: params.self_signed(&key).unwrap(),
            key,
        }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` (what `roost certs init` gives the gateway).
    pub fn server(&self) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A worker certificate as control issues it: CN = id, SAN URI, client auth only.
    pub fn worker(&self, id: &str) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, id);
        params.subject_alt_names = vec![SanType::URI(
            format!("urn:roost:worker:{id}").try_into().unwrap(),
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }
}

/// Both CAs and the gateway's certificate.
pub struct Pki {
    pub gateway_ca: Ca,
    pub worker_ca: Ca,
    pub gateway: Issued,
}

impl Pki {
    pub fn new() -> Self {
        let gateway_ca = Ca::new("test gateway CA");
        let gateway = gateway_ca.server();
        Self {
            gateway_ca,
            worker_ca: Ca::new("test worker CA"),
            gateway,
        }
    }

    pub fn hub_config(&self, listen: SocketAddr, secret: [u8; 32]) -> TunnelHubConfig {
        TunnelHubConfig::new(
            listen,
            self.gateway.cert_pem.clone(),
            self.gateway.key_pem.clone(),
            self.worker_ca.pem(),
            secret,
        )
    }

    pub fn worker_config(&self, gateway: SocketAddr, worker: &Issued) -> TunnelClientConfig {
        TunnelClientConfig::new(
            vec![GatewayTarget {
                addr: gateway,
                server_name: "localhost".into(),
            }],
            self.gateway_ca.pem(),
            worker.cert_pem.clone(),
            worker.key_pem.clone(),
        )
    }
}

pub const WORKER: &str = "wrk_test1";

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A hub and one connected worker whose sandbox `sandbox` is at 127.0.0.1.
pub struct Pair {
    pub pki: Pki,
    pub hub: TunnelHub,
    pub worker: TunnelClient,
    pub splicer: Arc<TcpSplicer>,
    pub sandbox: SandboxId,
}

impl Pair {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// Like [`Pair::new`], with the worker's configuration adjusted by `tweak`.
    pub async fn with(tweak: impl FnOnce(&mut TunnelClientConfig)) -> Self {
        let pki = Pki::new();
        let hub = TunnelHub::bind(pki.hub_config(loopback(), [7; 32])).unwrap();
        let splicer = Arc::new(TcpSplicer::new());
        let sandbox: SandboxId = "cl-tunneltest".parse().unwrap();
        splicer.insert(sandbox.clone(), IpAddr::from([127, 0, 0, 1]));
        let mut config =
            pki.worker_config(hub.local_addr().unwrap(), &pki.worker_ca.worker(WORKER));
        tweak(&mut config);
        let worker = TunnelClient::start(config, splicer.clone()).unwrap();
        assert!(
            hub.wait_for_worker(WORKER, Duration::from_secs(10)).await,
            "the worker did not connect"
        );
        Self {
            pki,
            hub,
            worker,
            splicer,
            sandbox,
        }
    }
}

/// A TCP server that echoes every byte until the client finishes, then finishes too.
pub async fn echo_server() -> u16 {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// A TCP server that writes `chunk` forever to every client (until it goes away).
pub async fn firehose_server(chunk: usize) -> u16 {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let data = vec![b'x'; chunk];
                while tcp.write_all(&data).await.is_ok() {}
            });
        }
    });
    port
}

/// A TCP server that reads everything until the client's end-of-file, then answers how many
/// bytes it got: only works if half-close crosses the tunnel.
pub async fn count_server() -> u16 {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut all = Vec::new();
                tcp.read_to_end(&mut all).await.unwrap();
                tcp.write_all(format!("got {} bytes", all.len()).as_bytes())
                    .await
                    .unwrap();
            });
        }
    });
    port
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
