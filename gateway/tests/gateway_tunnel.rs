//! The whole path on loopback: client → gateway (Pingora) → QUIC tunnel (a real `TunnelHub`
//! and a real worker `TunnelClient` with mutual TLS) → real HTTP and WebSocket servers.

mod common;
mod tunnel_support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;

/// A gateway whose dialer is the pair's hub; control knows the pair's sandbox on its worker.
async fn gateway_over(pair: &tunnel_support::Pair) -> (Gateway, Arc<FakeControl>) {
    let control = Arc::new(FakeControl::default());
    control.set_route(running_route(pair.sandbox.as_str(), tunnel_support::WORKER));
    let config = base_config(control_http_backend().await);
    let gw = Gateway::start(config, Arc::new(pair.hub.clone()), control.clone()).await;
    gw.wait_for_route_stream().await;
    (gw, control)
}

fn host(pair: &tunnel_support::Pair, port: u16) -> String {
    format!("{port}-{}.{DOMAIN}", pair.sandbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_and_streams_through_gateway_and_tunnel() {
    let pair = tunnel_support::Pair::new().await;
    let backend = http_backend().await.port();
    let (gw, _control) = gateway_over(&pair).await;
    let client = client();
    let reply = get(&client, gw.http_addr(), &host(&pair, backend), "/hello").await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "hello from the sandbox")
    );
    // Header routing reaches the same port.
    let port = backend.to_string();
    let reply = request(
        &client,
        gw.http_addr(),
        "GET",
        "127.0.0.1",
        "/hello",
        &[
            ("E2b-Sandbox-Id", pair.sandbox.as_str()),
            ("E2b-Sandbox-Port", &port),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 200);
    // 8 MiB up and back, and a server stream.
    let payload = Bytes::from((0..8 << 20).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let reply = request(
        &client,
        gw.http_addr(),
        "POST",
        &host(&pair, backend),
        "/echo",
        &[],
        payload.clone(),
    )
    .await;
    assert!(
        reply.status == 200 && reply.body == payload,
        "echo through the tunnel differs"
    );
    let reply = get(
        &client,
        gw.http_addr(),
        &host(&pair, backend),
        "/stream?n=5",
    )
    .await;
    assert_eq!(
        reply.text(),
        "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_through_gateway_and_tunnel() {
    let pair = tunnel_support::Pair::new().await;
    let ws_port = websocket_backend().await.port();
    let (gw, _control) = gateway_over(&pair).await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/",
            gw.http_addr()
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("host", host(&pair, ws_port).parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(gw.http_addr())
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..50 {
        let text = format!("tunnelled {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
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
            text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workers_answers_become_the_contract_errors() {
    let pair = tunnel_support::Pair::new().await;
    let (gw, control) = gateway_over(&pair).await;
    let client = client();
    let closed = tunnel_support::closed_port();
    let reply = get(&client, gw.http_addr(), &host(&pair, closed), "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.json()["message"],
        "The sandbox is running but port is not open"
    );
    assert_eq!(reply.json()["port"], closed);
    // Control believes the worker hosts a sandbox the worker does not have.
    control.set_route(running_route("cl-notthere", tunnel_support::WORKER));
    let reply = get(
        &client,
        gw.http_addr(),
        &format!("80-cl-notthere.{DOMAIN}"),
        "/",
    )
    .await;
    assert_eq!(
        reply.json(),
        serde_json::json!({"sandboxId": "cl-notthere", "message": "The sandbox was not found", "code": 502})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_streams_through_the_tunnel() {
    let pair = tunnel_support::Pair::new().await;
    let backend = http_backend().await.port();
    let (gw, _control) = gateway_over(&pair).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1000)
        .build_http::<Body>();
    let addr = gw.http_addr();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let client = client.clone();
        let host = host(&pair, backend);
        tasks.push(tokio::spawn(async move {
            get(&client, addr, &host, "/stream?n=5").await
        }));
    }
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(reply.text().ends_with("chunk 4\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_disconnecting_mid_stream() {
    let pair = tunnel_support::Pair::new().await;
    let backend = http_backend().await.port();
    let (gw, _control) = gateway_over(&pair).await;
    let client = client();
    let request = hyper::Request::builder()
        .uri(format!("http://{}/stream?n=500", gw.http_addr()))
        .header("host", host(&pair, backend))
        .body(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    let tunnel_support::Pair {
        worker,
        hub,
        sandbox,
        ..
    } = pair;
    worker.shutdown().await;
    let frames = tokio::time::timeout(Duration::from_secs(10), async {
        let mut frames = 0;
        while let Some(Ok(_)) = body.frame().await {
            frames += 1;
        }
        frames
    })
    .await
    .expect("the stream ends when its worker goes away");
    assert!(frames < 499);
    // With the worker gone, its sandboxes are "not found" (until it dials back).
    let reply = get(
        &client,
        gw.http_addr(),
        &format!("{backend}-{sandbox}.{DOMAIN}"),
        "/hello",
    )
    .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["message"], "The sandbox was not found");
    drop(hub);
}
