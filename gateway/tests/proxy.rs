//! The gateway end to end over plain HTTP on loopback: routing, the JSON error contract,
//! access tokens, streaming, WebSocket, slow clients, 1,000 concurrent streams, a worker
//! vanishing mid-stream, rate limits, auto-resume, route invalidation and metrics. The tunnel
//! is the loopback dialer from `common` (a real tunnel test is in `tunnel.rs`).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use roost_gateway::routes::RouteState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SB: &str = "cl-abc123";
const WORKER: &str = "worker-1";

struct Rig {
    gw: Gateway,
    control: Arc<FakeControl>,
    dialer: Arc<LoopbackDialer>,
    client: Client,
}

impl Rig {
    fn host(&self, port: u16) -> String {
        format!("{port}-{SB}.{DOMAIN}")
    }
}

async fn rig_with(configure: impl FnOnce(&mut roost_gateway::server::GatewayConfig)) -> Rig {
    let backend = http_backend().await;
    let ws = websocket_backend().await;
    let control_http = control_http_backend().await;
    let control = Arc::new(FakeControl::default());
    control.set_route(running_route(SB, WORKER));
    let dialer = Arc::new(LoopbackDialer::default());
    dialer.expose(WORKER, SB, 8080, backend);
    dialer.expose(WORKER, SB, 49983, backend);
    dialer.expose(WORKER, SB, 3000, ws);
    let mut config = base_config(control_http);
    configure(&mut config);
    let gw = Gateway::start(config, dialer.clone(), control.clone()).await;
    gw.wait_for_route_stream().await;
    Rig {
        gw,
        control,
        dialer,
        client: client(),
    }
}

async fn rig() -> Rig {
    rig_with(|_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_host_is_proxied_to_control() {
    let r = rig().await;
    let reply = get(
        &r.client,
        r.gw.http_addr(),
        &format!("api.{DOMAIN}"),
        "/v2/sandboxes",
    )
    .await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["service"], "control");
    assert_eq!(body["path"], "/v2/sandboxes");
    assert_eq!(body["host"], format!("api.{DOMAIN}"));
    assert_eq!(body["x_forwarded_for"], "127.0.0.1");
    // Plain mode: an IP host without sandbox headers is the API too.
    let reply = get(&r.client, r.gw.http_addr(), "127.0.0.1", "/health").await;
    assert_eq!(reply.json()["service"], "control");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sandbox_port_by_host_and_by_headers() {
    let r = rig().await;
    let reply = get(&r.client, r.gw.http_addr(), &r.host(8080), "/hello").await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "hello from the sandbox")
    );
    for host in ["localhost", "127.0.0.1:80", &format!("sandbox.{DOMAIN}")] {
        let reply = request(
            &r.client,
            r.gw.http_addr(),
            "GET",
            host,
            "/hello",
            &[("E2b-Sandbox-Id", SB), ("E2b-Sandbox-Port", "8080")],
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, 200, "{host}: {}", reply.text());
        assert_eq!(reply.text(), "hello from the sandbox");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_hosts_ports_and_headers_are_4xx_json() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    for (host, status) in [
        ("example.com", 404),
        (DOMAIN, 404),
        ("0-cl-abc123.roost.test", 400),
        ("65536-cl-abc123.roost.test", 400),
        ("80-nope.roost.test", 400),
        ("80-cl-a_b.roost.test", 400),
        ("8080.roost.test", 400),
        ("bad_host", 400),
    ] {
        let reply = get(&r.client, gw, host, "/").await;
        assert_eq!(reply.status, status, "{host}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["code"], status);
        assert!(body["message"].as_str().unwrap().len() > 5);
    }
    let reply = request(
        &r.client,
        gw,
        "GET",
        "localhost",
        "/",
        &[("E2b-Sandbox-Id", SB)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("e2b-sandbox-port")
    );
    let reply = request(
        &r.client,
        gw,
        "GET",
        "localhost",
        "/",
        &[("E2b-Sandbox-Id", SB), ("E2b-Sandbox-Port", "0")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_sandbox_and_closed_port_follow_the_contract() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    let reply = get(&r.client, gw, &format!("8080-cl-nosuch.{DOMAIN}"), "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.json(),
        serde_json::json!({"sandboxId": "cl-nosuch", "message": "The sandbox was not found", "code": 502})
    );
    let reply = get(&r.client, gw, &r.host(9999), "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.json(),
        serde_json::json!({"sandboxId": SB, "message": "The sandbox is running but port is not open", "port": 9999, "code": 502})
    );
    // The route names a worker the gateway has no tunnel to.
    r.control
        .set_route(running_route("cl-orphan", "worker-gone"));
    let reply = get(&r.client, gw, &format!("8080-cl-orphan.{DOMAIN}"), "/").await;
    assert_eq!(reply.json()["message"], "The sandbox was not found");
    // A killed sandbox disappears at once (the removal event drops the cached route).
    r.control.remove(SB);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = get(&r.client, gw, &r.host(8080), "/hello").await;
    assert_eq!(reply.json()["message"], "The sandbox was not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envd_port_needs_the_access_token() {
    let r = rig().await;
    let mut route = running_route(SB, WORKER);
    route.envd_access_token_sha256 = Some(sha256_hex("envd-secret"));
    route.public = false;
    route.traffic_access_token_sha256 = Some(sha256_hex("traffic-secret"));
    r.control.set_route(route);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gw = r.gw.http_addr();
    let envd = r.host(49983);
    let reply = get(&r.client, gw, &envd, "/hello").await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.json()["code"], 401);
    let reply = request(
        &r.client,
        gw,
        "GET",
        &envd,
        "/hello",
        &[("X-Access-Token", "wrong")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 403);
    let reply = request(
        &r.client,
        gw,
        "GET",
        &envd,
        "/hello",
        &[("X-Access-Token", "envd-secret")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(get(&r.client, gw, &envd, "/health").await.status, 204);
    // Other ports: private, so the traffic token.
    assert_eq!(
        get(&r.client, gw, &r.host(8080), "/hello").await.status,
        401
    );
    let reply = request(
        &r.client,
        gw,
        "GET",
        &r.host(8080),
        "/hello",
        &[("E2b-Traffic-Access-Token", "traffic-secret")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_stream_both_ways_without_buffering() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    // 16 MiB up and back.
    let payload = Bytes::from(
        (0..16 * 1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let reply = request(
        &r.client,
        gw,
        "POST",
        &r.host(8080),
        "/echo",
        &[],
        payload.clone(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body == payload, "echoed body differs");
    // A server stream: the first chunk arrives long before the last one is produced.
    let started = Instant::now();
    let request = hyper::Request::builder()
        .uri(format!("http://{gw}/stream?n=25"))
        .header("host", r.host(8080))
        .body(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = r.client.request(request).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = started.elapsed();
    assert_eq!(&first[..], b"chunk 0\n");
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            rest.extend_from_slice(&data);
        }
    }
    let total = started.elapsed();
    assert!(String::from_utf8(rest).unwrap().ends_with("chunk 24\n"));
    // 25 chunks 20 ms apart take ≥ 480 ms; a buffering proxy would deliver the first at the end.
    assert!(
        first_at * 2 < total,
        "first chunk after {first_at:?}, whole stream {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tunnel_streams_are_pooled_per_target() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    for _ in 0..20 {
        assert_eq!(
            get(&r.client, gw, &r.host(8080), "/hello").await.status,
            200
        );
    }
    let dials = r.dialer.dials.load(Ordering::SeqCst);
    assert!(
        dials <= 3,
        "20 sequential requests opened {dials} tunnel streams"
    );
    // Another port of the same sandbox gets a stream of its own.
    assert_eq!(
        get(&r.client, gw, &r.host(49983), "/hello").await.status,
        200
    );
    assert!(r.dialer.dials.load(Ordering::SeqCst) > dials);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_upgrade_passes_through() {
    let r = rig().await;
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", r.gw.http_addr()),
    )
    .map(|mut req| {
        req.headers_mut()
            .insert("host", r.host(3000).parse().unwrap());
        req
    })
    .unwrap();
    let stream = tokio::net::TcpStream::connect(r.gw.http_addr())
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade through the gateway");
    assert_eq!(response.status(), 101);
    for i in 0..20 {
        let text = format!("message {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let big = vec![7u8; 1024 * 1024];
    ws.send(tokio_tungstenite::tungstenite::Message::binary(big.clone()))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &big[..]
    );
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_client_does_not_stall_others() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    // A client asks for 256 MiB and never reads: the gateway's buffers fill and it must stop
    // reading from that upstream only.
    let mut slow = tokio::net::TcpStream::connect(gw).await.unwrap();
    slow.write_all(
        format!("GET /big?mb=256 HTTP/1.1\r\nHost: {}\r\n\r\n", r.host(8080)).as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    slow.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = r.client.clone();
        let host = r.host(8080);
        tasks.push(tokio::spawn(async move {
            get(&client, gw, &host, "/hello").await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "others took {:?}",
        started.elapsed()
    );
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_streams() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1000)
        .build_http::<Body>();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let client = client.clone();
        let host = format!("8080-{SB}.{DOMAIN}");
        tasks.push(tokio::spawn(async move {
            // Each request holds its stream open for ~200 ms so that all of them overlap.
            let reply = get(&client, gw, &host, "/stream?n=10").await;
            (i, reply.status, reply.text())
        }));
    }
    let mut ok = 0;
    for task in tasks {
        let (i, status, text) = task.await.unwrap();
        assert_eq!(status, 200, "stream {i}: {text}");
        assert!(text.ends_with("chunk 9\n"));
        ok += 1;
    }
    assert_eq!(ok, 1000);
    let dials = r.dialer.dials.load(Ordering::SeqCst);
    assert!((1..=1000).contains(&dials), "{dials} tunnel streams opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_vanishing_mid_stream_ends_that_stream_only() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    let request = hyper::Request::builder()
        .uri(format!("http://{gw}/stream?n=500"))
        .header("host", r.host(8080))
        .body(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = r.client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    r.dialer.disconnect_all();
    // The stream ends (error or early end) instead of hanging.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        let mut received = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(_) => received += 1,
                Err(_) => break,
            }
        }
        received
    })
    .await
    .expect("the broken stream ends");
    assert!(ended < 499, "the stream went on after the worker vanished");
    // The gateway keeps serving.
    assert_eq!(
        get(&r.client, gw, &r.host(8080), "/hello").await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_per_ip_and_per_api_key() {
    let r = rig_with(|c| {
        c.per_ip_limit = Some(limit(1, 5));
    })
    .await;
    let gw = r.gw.http_addr();
    for _ in 0..5 {
        assert_eq!(
            get(&r.client, gw, &r.host(8080), "/hello").await.status,
            200
        );
    }
    let reply = get(&r.client, gw, &r.host(8080), "/hello").await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["code"], 429);
    let retry_after: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after));
    drop(r);

    let r = rig_with(|c| {
        c.per_key_limit = Some(limit(1, 2));
    })
    .await;
    let api = format!("api.{DOMAIN}");
    let gw = r.gw.http_addr();
    let with_key = |key: &'static str| {
        let client = r.client.clone();
        let api = api.clone();
        async move {
            request(
                &client,
                gw,
                "GET",
                &api,
                "/sandboxes",
                &[("X-API-KEY", key)],
                Bytes::new(),
            )
            .await
            .status
        }
    };
    assert_eq!(with_key("e2b_one").await, 200);
    assert_eq!(with_key("e2b_one").await, 200);
    assert_eq!(with_key("e2b_one").await, 429);
    assert_eq!(with_key("e2b_two").await, 200);
    assert!(
        r.gw.parts
            .metrics
            .rate_limited
            .with_label_values(&["api_key"])
            .get()
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_sandbox_is_resumed_on_first_request() {
    let r = rig().await;
    *r.control.resume_delay.lock().unwrap() = Duration::from_millis(300);
    let mut paused = running_route(SB, WORKER);
    paused.state = RouteState::Paused;
    r.control.set_route(paused);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gw = r.gw.http_addr();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let client = r.client.clone();
        let host = r.host(8080);
        tasks.push(tokio::spawn(async move {
            get(&client, gw, &host, "/hello").await
        }));
    }
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        r.control.resumes.load(Ordering::SeqCst),
        1,
        "one resume for concurrent requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_resume_off_answers_not_found() {
    let r = rig_with(|c| c.auto_resume = false).await;
    let mut paused = running_route(SB, WORKER);
    paused.state = RouteState::Paused;
    r.control.set_route(paused);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = get(&r.client, r.gw.http_addr(), &r.host(8080), "/hello").await;
    assert_eq!(reply.json()["message"], "The sandbox was not found");
    assert_eq!(r.control.resumes.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_sandbox_is_followed_after_the_change_event() {
    let r = rig().await;
    let gw = r.gw.http_addr();
    assert_eq!(
        get(&r.client, gw, &r.host(8080), "/hello").await.status,
        200
    );
    assert_eq!(
        get(&r.client, gw, &r.host(8080), "/hello").await.status,
        200
    );
    let fetches = r.control.route_fetches.load(Ordering::SeqCst);
    assert_eq!(fetches, 1, "the second request used the cached route");
    // The sandbox moves to worker-2, which serves a different backend.
    let other = control_http_backend().await;
    r.dialer.expose("worker-2", SB, 8080, other);
    r.control.set_route(running_route(SB, "worker-2"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = get(&r.client, gw, &r.host(8080), "/hello").await;
    assert_eq!(
        reply.json()["service"],
        "control",
        "served by the new worker's backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_a_moved_sandbox_is_followed_after_the_published_change() {
    const REDIS: &str = "redis://127.0.0.1:6379";
    let channel = format!("roost-gw-test-{}:routes", std::process::id());
    let events = roost_gateway::routes::redis_events::RedisRouteEvents::new(REDIS, &channel)
        .expect("a Redis URL");
    let r = rig_with(|config| config.redis_route_events = Some(events)).await;
    let gw = r.gw.http_addr();
    for _ in 0..2 {
        assert_eq!(
            get(&r.client, gw, &r.host(8080), "/hello").await.status,
            200
        );
    }
    assert_eq!(r.control.route_fetches.load(Ordering::SeqCst), 1, "cached");
    // The sandbox moves; control's own stream is not followed, so only Redis can tell.
    let other = control_http_backend().await;
    r.dialer.expose("worker-2", SB, 8080, other);
    r.control.set_route(running_route(SB, "worker-2"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = get(&r.client, gw, &r.host(8080), "/hello").await;
    assert_eq!(
        reply.text(),
        "hello from the sandbox",
        "still the cached route before anything is published"
    );
    let client = redis::Client::open(REDIS).unwrap();
    let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(format!(r#"{{"sandbox_id":"{SB}","kind":"changed"}}"#))
        .query_async(&mut publisher)
        .await
        .unwrap();
    assert_eq!(receivers, 1, "the gateway is subscribed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = get(&r.client, gw, &r.host(8080), "/hello").await;
    assert_eq!(
        reply.json()["service"],
        "control",
        "served by the new worker's backend after the Redis event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_served_on_their_own_listener() {
    let r = rig().await;
    get(&r.client, r.gw.http_addr(), &r.host(8080), "/hello").await;
    get(&r.client, r.gw.http_addr(), "example.com", "/").await;
    let metrics = r.gw.config.listen_metrics.unwrap();
    // The access-log phase (which counts) runs just after the response went out: poll.
    let mut text = String::new();
    for _ in 0..100 {
        let reply = get(&r.client, metrics, "localhost", "/metrics").await;
        assert_eq!(reply.status, 200);
        text = reply.text();
        if text.contains(r#"target="none"} 1"#) && text.contains(r#"target="sandbox"} 1"#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        text.contains(r#"roost_gateway_requests_total{status="2xx",target="sandbox"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"roost_gateway_requests_total{status="4xx",target="none"} 1"#),
        "{text}"
    );
    assert!(text.contains("roost_gateway_route_stream_up 1"));
    // The public listener does not serve them.
    assert_eq!(
        get(&r.client, r.gw.http_addr(), "localhost", "/metrics")
            .await
            .json()["service"],
        "control"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bridge_socket_goes_when_the_gateway_stops() {
    let r = rig().await;
    assert_eq!(
        get(&r.client, r.gw.http_addr(), &r.host(8080), "/hello")
            .await
            .status,
        200
    );
    let socket = r.gw.parts.bridge_socket.clone();
    assert!(socket.exists());
    drop(r);
    assert!(!socket.exists(), "{} left behind", socket.display());
    assert!(!socket.parent().unwrap().exists());
}
