//! The tunnel end to end on loopback: a real [`TunnelHub`] and a real worker
//! [`roost_worker::tunnel::TunnelClient`] with mutual TLS, splicing into real HTTP, WebSocket
//! and TCP servers; refusals, status errors, load, a slow reader, a vanishing worker and a
//! gateway restart.

mod tunnel_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use quinn::rustls;
use roost_gateway::tunnel::{BrokenReason, TunnelError, TunnelHub};
use roost_proto::SandboxId;
use roost_proto::tunnel::{Status, StreamHeader};
use roost_worker::tunnel::TunnelClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tunnel_support::*;

/// An HTTP/1.1 server: `/big` answers 8 MiB, anything else "<method> <path> <body length>".
async fn http_server() -> u16 {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let line = format!("{} {}", req.method(), req.uri().path());
                    if req.uri().path() == "/big" {
                        let big = Bytes::from(vec![b'b'; 8 << 20]);
                        return Ok::<_, hyper::Error>(Response::new(Full::new(big)));
                    }
                    let body = req.into_body().collect().await?.to_bytes();
                    let answer = format!("{line} {}", body.len());
                    Ok(Response::new(Full::new(Bytes::from(answer))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    port
}

/// A WebSocket server echoing text and binary messages.
async fn websocket_server() -> u16 {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        ws.send(message).await.unwrap();
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_and_streamed_bodies_cross_the_tunnel() {
    let pair = Pair::new().await;
    let port = http_server().await;
    let stream = pair.hub.open(WORKER, &pair.sandbox, port).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);

    // An upload larger than every flow-control window, then a download, on one kept-alive
    // connection (one tunnel stream).
    let upload = Bytes::from(vec![b'u'; 3 << 20]);
    let request = Request::post("/upload")
        .header("host", "sandbox")
        .body(Full::new(upload))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "POST /upload 3145728");

    let request = Request::get("/big")
        .header("host", "sandbox")
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 8 << 20);
    assert!(body.iter().all(|&b| b == b'b'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_cross_the_tunnel() {
    let pair = Pair::new().await;
    let port = websocket_server().await;
    let stream = pair.hub.open(WORKER, &pair.sandbox, port).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://sandbox/echo", stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hello through the tunnel"))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello through the tunnel")
    );
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_reaches_the_sandbox_and_the_answer_still_comes_back() {
    let pair = Pair::new().await;
    let port = count_server().await;
    let mut stream = pair.hub.open(WORKER, &pair.sandbox, port).await.unwrap();
    stream.write_all(&[1u8; 100_000]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 100000 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_workers_sandboxes_and_closed_ports_are_told_apart() {
    let pair = Pair::new().await;
    let port = echo_server().await;
    assert!(matches!(
        pair.hub.open("wrk_other", &pair.sandbox, port).await,
        Err(TunnelError::NoWorker(id)) if id == "wrk_other"
    ));
    let elsewhere: SandboxId = "cl-elsewhere".parse().unwrap();
    assert!(matches!(
        pair.hub.open(WORKER, &elsewhere, port).await,
        Err(TunnelError::SandboxNotFound { sandbox_id, .. }) if sandbox_id == elsewhere
    ));
    assert!(matches!(
        pair.hub.open(WORKER, &pair.sandbox, closed_port()).await,
        Err(TunnelError::PortClosed { .. })
    ));
    // The worker's table is the authority: once the sandbox is gone there, it is not found.
    pair.splicer.remove(&pair.sandbox);
    assert!(matches!(
        pair.hub.open(WORKER, &pair.sandbox, port).await,
        Err(TunnelError::SandboxNotFound { .. })
    ));
    // The tunnel itself is still fine.
    assert_eq!(pair.hub.workers(), vec![WORKER.to_owned()]);
}

/// Dials the hub at `addr` as a bare QUIC client trusting `pki`'s gateway CA, presenting
/// `cert` if given; returns how the connection ended (it must end: the hub refuses it).
async fn refused_connection(
    pki: &Pki,
    addr: std::net::SocketAddr,
    cert: Option<&Issued>,
) -> quinn::ConnectionError {
    let roots = roost_proto::tls::roots_from_pem(&pki.gateway_ca.pem(), "CA").unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(roost_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match cert {
        Some(cert) => builder
            .with_client_auth_cert(
                roost_proto::tls::certs_from_pem(&cert.cert_pem, "cert").unwrap(),
                roost_proto::tls::key_from_pem(&cert.key_pem).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![roost_proto::tunnel::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let attempt = endpoint.connect(addr, "localhost").unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        match attempt.await {
            Err(e) => e,
            // TLS 1.3 lets the client finish first; the server's refusal closes it right after.
            Ok(connection) => connection.closed().await,
        }
    })
    .await;
    outcome.expect("the hub did not refuse the connection within 5 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_a_certificate_from_the_worker_ca_are_refused() {
    let pki = Pki::new();
    let hub = TunnelHub::bind(pki.hub_config(loopback(), [1; 32])).unwrap();
    let addr = hub.local_addr().unwrap();

    let none = refused_connection(&pki, addr, None).await;
    assert!(
        matches!(
            none,
            quinn::ConnectionError::ConnectionClosed(_) | quinn::ConnectionError::TransportError(_)
        ),
        "{none:?}"
    );
    let rogue = Ca::new("rogue CA");
    let wrong_ca = refused_connection(&pki, addr, Some(&rogue.worker(WORKER))).await;
    assert!(
        matches!(
            wrong_ca,
            quinn::ConnectionError::ConnectionClosed(_) | quinn::ConnectionError::TransportError(_)
        ),
        "{wrong_ca:?}"
    );
    // A server certificate from the right CA family is no worker certificate either.
    let server_cert = refused_connection(&pki, addr, Some(&pki.gateway)).await;
    assert!(
        matches!(
            server_cert,
            quinn::ConnectionError::ConnectionClosed(_) | quinn::ConnectionError::TransportError(_)
        ),
        "{server_cert:?}"
    );

    // The real worker client with a rogue certificate never gets registered either.
    let splicer = Arc::new(roost_worker::tunnel::TcpSplicer::new());
    let client = TunnelClient::start(
        pki.worker_config(addr, &rogue.worker(WORKER)),
        splicer.clone(),
    )
    .unwrap();
    assert!(!hub.wait_for_worker(WORKER, Duration::from_secs(2)).await);
    drop(client);

    // And a worker that does not trust the gateway's CA refuses the gateway.
    let mut config = pki.worker_config(addr, &pki.worker_ca.worker(WORKER));
    config.gateway_ca_pem = rogue.pem();
    let client = TunnelClient::start(config, splicer).unwrap();
    assert!(!hub.wait_for_worker(WORKER, Duration::from_secs(2)).await);
    assert!(client.connected().is_empty());
    assert!(hub.workers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_answers_a_malformed_header_with_an_error_status() {
    // Play the gateway by hand: accept the worker's connection and write garbage on a stream.
    let pki = Pki::new();
    let server = roost_proto::tls::server_config(
        &pki.gateway.cert_pem,
        &pki.gateway.key_pem,
        &pki.worker_ca.pem(),
        roost_proto::tunnel::ALPN,
    )
    .unwrap();
    let endpoint = quinn::Endpoint::server(server, loopback()).unwrap();
    let splicer = Arc::new(roost_worker::tunnel::TcpSplicer::new());
    let _client = TunnelClient::start(
        pki.worker_config(
            endpoint.local_addr().unwrap(),
            &pki.worker_ca.worker(WORKER),
        ),
        splicer,
    )
    .unwrap();
    let connection = endpoint.accept().await.unwrap().await.unwrap();

    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&[9, 9, 9, 9]).await.unwrap();
    let status = Status::read(&mut recv).await.unwrap();
    let Status::Error(message) = status else {
        panic!("expected an error status, got {status:?}")
    };
    assert!(message.contains("version 9"), "{message}");

    // A well-formed header for a sandbox the worker does not hold.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let header = StreamHeader::new("cl-nothere".parse().unwrap(), 80);
    send.write_all(&header.encode()).await.unwrap();
    assert_eq!(
        Status::read(&mut recv).await.unwrap(),
        Status::SandboxNotFound
    );
    // Nothing follows a refusal: the worker finished the stream.
    assert_eq!(recv.read_to_end(16).await.unwrap(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_are_open_at_once() {
    const STREAMS: usize = 1000;
    let pair = Pair::new().await;
    let port = echo_server().await;
    let all_open = Arc::new(tokio::sync::Barrier::new(STREAMS));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let hub = pair.hub.clone();
            let sandbox = pair.sandbox.clone();
            let all_open = all_open.clone();
            tokio::spawn(async move {
                let mut stream = hub.open(WORKER, &sandbox, port).await.unwrap();
                // Nobody sends until all 1,000 streams are open at the same time.
                all_open.wait().await;
                let message = format!("stream {i};").repeat(50);
                stream.write_all(message.as_bytes()).await.unwrap();
                stream.shutdown().await.unwrap();
                let mut back = Vec::new();
                stream.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, message.as_bytes());
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(120), async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await
    .expect("1,000 streams did not finish within 120 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_does_not_stall_other_streams() {
    let pair = Pair::new().await;
    let firehose = firehose_server(64 * 1024).await;
    let echo = echo_server().await;

    // Several streams whose readers never read: each fills its own window and stops there.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut stream = pair
            .hub
            .open(WORKER, &pair.sandbox, firehose)
            .await
            .unwrap();
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.unwrap();
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Meanwhile other streams on the same connection keep working: round trips, a bulk
    // transfer, and new streams.
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut chatty = pair.hub.open(WORKER, &pair.sandbox, echo).await.unwrap();
        for i in 0..200u32 {
            chatty.write_all(&i.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            chatty.read_exact(&mut back).await.unwrap();
            assert_eq!(u32::from_be_bytes(back), i);
        }
        let mut bulk = pair.hub.open(WORKER, &pair.sandbox, echo).await.unwrap();
        let data = vec![7u8; 16 << 20];
        let (mut reader, mut writer) = tokio::io::split(&mut bulk);
        let (written, read) = tokio::join!(
            async {
                writer.write_all(&data).await.unwrap();
                writer.shutdown().await.unwrap();
            },
            async {
                let mut back = Vec::new();
                reader.read_to_end(&mut back).await.unwrap();
                back.len()
            }
        );
        let () = written;
        assert_eq!(read, 16 << 20);
    })
    .await
    .expect("other streams stalled behind the readers that stopped");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_mid_stream_fails_the_stream_at_once() {
    let pair = Pair::new().await;
    let firehose = firehose_server(16 * 1024).await;
    let mut stream = pair
        .hub
        .open(WORKER, &pair.sandbox, firehose)
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    stream.read_exact(&mut buf).await.unwrap();

    let left = Instant::now();
    // shutdown() returns after its linger; the stream must fail while it runs.
    let shutdown = tokio::spawn(pair.worker.shutdown());
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stream did not fail within 5 s of the worker leaving");
    // An error, never a clean end-of-file: the response was cut, not complete.
    assert!(outcome.is_err(), "the stream ended cleanly");
    eprintln!("stream failed {:?} after the worker left", left.elapsed());
    shutdown.await.unwrap();
    assert!(!pair.hub.is_connected(WORKER));
    assert!(matches!(
        pair.hub.open(WORKER, &pair.sandbox, firehose).await,
        Err(TunnelError::NoWorker(_)
            | TunnelError::Broken {
                reason: BrokenReason::Connection(_),
                ..
            })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_vanishes_silently_fails_its_streams_at_the_idle_timeout() {
    let pki = Pki::new();
    let hub = TunnelHub::bind(pki.hub_config(loopback(), [2; 32])).unwrap();
    let firehose = firehose_server(16 * 1024).await;
    let splicer = Arc::new(roost_worker::tunnel::TcpSplicer::new());
    let sandbox: SandboxId = "cl-silent".parse().unwrap();
    splicer.insert(sandbox.clone(), [127, 0, 0, 1].into());
    let mut config = pki.worker_config(hub.local_addr().unwrap(), &pki.worker_ca.worker(WORKER));
    config.keep_alive = Duration::from_millis(200);
    config.idle_timeout = Duration::from_secs(1);
    // The worker runs on a runtime of its own, so it can die without sending anything.
    let worker_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = {
        let _inside = worker_runtime.enter();
        TunnelClient::start(config, splicer).unwrap()
    };
    assert!(hub.wait_for_worker(WORKER, Duration::from_secs(10)).await);
    let mut stream = hub.open(WORKER, &sandbox, firehose).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    stream.read_exact(&mut buf).await.unwrap();

    let vanished = Instant::now();
    worker_runtime.shutdown_background();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stream did not fail within 5 s of the worker vanishing");
    assert!(outcome.is_err(), "the stream ended cleanly");
    eprintln!(
        "stream failed {:?} after the worker vanished",
        vanished.elapsed()
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_reconnect_within_seconds_after_a_gateway_restart() {
    let pki = Pki::new();
    let secret = [3u8; 32];
    // The first gateway runs on a runtime of its own, so it can "crash": stop without telling
    // anyone.
    let gateway_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let first = {
        let _inside = gateway_runtime.enter();
        TunnelHub::bind(pki.hub_config(loopback(), secret)).unwrap()
    };
    let addr = first.local_addr().unwrap();
    let splicer = Arc::new(roost_worker::tunnel::TcpSplicer::new());
    let sandbox: SandboxId = "cl-restart".parse().unwrap();
    splicer.insert(sandbox.clone(), [127, 0, 0, 1].into());
    let client = TunnelClient::start(
        pki.worker_config(addr, &pki.worker_ca.worker(WORKER)),
        splicer,
    )
    .unwrap();
    assert!(first.wait_for_worker(WORKER, Duration::from_secs(10)).await);

    gateway_runtime.shutdown_background();
    drop(first);
    let restarted = Instant::now();
    // The old runtime frees its socket in the background: retry the bind briefly.
    let second = loop {
        match TunnelHub::bind(pki.hub_config(addr, secret)) {
            Ok(hub) => break hub,
            Err(e) if restarted.elapsed() < Duration::from_secs(2) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind the restarted gateway: {e}"),
        }
    };
    // The idle timeout is 10 s: reconnecting well before it shows the stateless reset worked.
    assert!(
        second.wait_for_worker(WORKER, Duration::from_secs(6)).await,
        "the worker did not reconnect within 6 s of the restart"
    );
    eprintln!(
        "worker reconnected {:?} after the gateway restart",
        restarted.elapsed()
    );
    let echo = echo_server().await;
    let mut stream = second.open(WORKER, &sandbox, echo).await.unwrap();
    stream.write_all(b"after restart").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"after restart");
    assert_eq!(client.connected().len(), 1);
}
