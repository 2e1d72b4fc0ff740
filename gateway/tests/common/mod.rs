//! Test rig: a real gateway (Pingora server on loopback ports, in its own thread), a fake
//! control plane, a loopback dialer standing in for the tunnel, and real HTTP/WebSocket
//! backends.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use roost_gateway::ratelimit::Limit;
use roost_gateway::routes::{
    ControlApi, ControlError, EventStream, ResumeOutcome, Route, RouteEvent, RouteEventKind,
    RouteState,
};
use roost_gateway::server::{GatewayConfig, GatewayParts, TlsListener};
use roost_gateway::upstream::{DialError, SandboxDialer, UpstreamIo};
use roost_proto::ids::SandboxId;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub const DOMAIN: &str = "roost.test";

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub fn running_route(id: &str, worker: &str) -> Route {
    Route {
        sandbox_id: id.into(),
        team_id: "team-1".into(),
        state: RouteState::Running,
        worker_id: Some(worker.into()),
        envd_access_token_sha256: None,
        public: true,
        traffic_access_token_sha256: None,
    }
}

// ---------------------------------------------------------------- fake control

/// Control's internal route API, in process.
#[derive(Default)]
pub struct FakeControl {
    routes: Mutex<HashMap<String, Route>>,
    subscribers: Mutex<Vec<mpsc::Sender<RouteEvent>>>,
    pub route_fetches: AtomicUsize,
    pub resumes: AtomicUsize,
    pub resume_delay: Mutex<Duration>,
}

impl FakeControl {
    pub fn set_route(&self, route: Route) {
        let id = route.sandbox_id.clone();
        self.routes.lock().unwrap().insert(id.clone(), route);
        self.publish(id, RouteEventKind::Changed);
    }

    pub fn remove(&self, id: &str) {
        self.routes.lock().unwrap().remove(id);
        self.publish(id.into(), RouteEventKind::Removed);
    }

    fn publish(&self, sandbox_id: String, kind: RouteEventKind) {
        let subscribers = self.subscribers.lock().unwrap().clone();
        for tx in subscribers {
            let _ = tx.try_send(RouteEvent {
                sandbox_id: Some(sandbox_id.clone()),
                kind,
            });
        }
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap()
            .iter()
            .filter(|tx| !tx.is_closed())
            .count()
    }
}

#[async_trait]
impl ControlApi for FakeControl {
    async fn route(&self, sandbox: &SandboxId) -> Result<Option<Route>, ControlError> {
        self.route_fetches.fetch_add(1, Ordering::SeqCst);
        Ok(self.routes.lock().unwrap().get(sandbox.as_str()).cloned())
    }

    async fn resume(
        &self,
        sandbox: &SandboxId,
        _timeout: Duration,
    ) -> Result<ResumeOutcome, ControlError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        let delay = *self.resume_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let route = {
            let mut routes = self.routes.lock().unwrap();
            let Some(route) = routes.get_mut(sandbox.as_str()) else {
                return Ok(ResumeOutcome::NotFound);
            };
            route.state = RouteState::Running;
            route.clone()
        };
        self.set_route(route);
        Ok(ResumeOutcome::Resumed)
    }

    async fn events(&self) -> Result<EventStream, ControlError> {
        let (tx, rx) = mpsc::channel(1024);
        self.subscribers.lock().unwrap().push(tx);
        Ok(rx)
    }
}

// ---------------------------------------------------------------- loopback dialer

/// Stands in for the tunnel hub: `(sandbox, port)` → a local TCP address, spliced through a
/// task that [`LoopbackDialer::disconnect_all`] can kill (a worker vanishing mid-stream).
/// `(sandbox id, port)` → backend address, per worker id.
type WorkerPorts = HashMap<String, HashMap<(String, u16), SocketAddr>>;

#[derive(Default)]
pub struct LoopbackDialer {
    pub workers: Mutex<WorkerPorts>,
    splices: Mutex<Vec<JoinHandle<()>>>,
    pub dials: AtomicUsize,
}

impl LoopbackDialer {
    pub fn expose(&self, worker: &str, sandbox: &str, port: u16, addr: SocketAddr) {
        self.workers
            .lock()
            .unwrap()
            .entry(worker.into())
            .or_default()
            .insert((sandbox.into(), port), addr);
    }

    pub fn add_sandbox_without_ports(&self, worker: &str, sandbox: &str) {
        // Port 0 is never dialled: it only marks the sandbox as hosted.
        self.expose(worker, sandbox, 0, "127.0.0.1:9".parse().unwrap());
    }

    pub fn disconnect_all(&self) {
        for splice in self.splices.lock().unwrap().drain(..) {
            splice.abort();
        }
    }
}

#[async_trait]
impl SandboxDialer for LoopbackDialer {
    async fn dial(
        &self,
        worker_id: &str,
        sandbox: &SandboxId,
        port: u16,
    ) -> Result<Box<dyn UpstreamIo>, DialError> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let addr = {
            let workers = self.workers.lock().unwrap();
            let ports = workers
                .get(worker_id)
                .ok_or_else(|| DialError::NoWorker(worker_id.into()))?;
            if !ports.keys().any(|(s, _)| s == sandbox.as_str()) {
                return Err(DialError::SandboxNotFound);
            }
            *ports
                .get(&(sandbox.to_string(), port))
                .ok_or(DialError::PortClosed)?
        };
        let mut backend = TcpStream::connect(addr)
            .await
            .map_err(|_| DialError::PortClosed)?;
        backend.set_nodelay(true).ok();
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let splice = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut theirs, &mut backend).await;
        });
        self.splices.lock().unwrap().push(splice);
        Ok(Box::new(ours))
    }
}

// ---------------------------------------------------------------- backends

pub type Body = BoxBody<Bytes, hyper::Error>;

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// HTTP/1.1 backend: `/hello`, `/echo` (streams the request body back), `/stream?n=N`
/// (N chunks 20 ms apart), `/big?mb=N` (N MiB), `/headers` (the request headers as JSON).
pub async fn http_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            stream.set_nodelay(true).ok();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper::service::service_fn(backend_handler),
                    )
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn query_number(req: &Request<Incoming>, key: &str) -> usize {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

async fn backend_handler(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = match req.uri().path() {
        "/hello" => Response::new(full("hello from the sandbox")),
        "/health" => Response::builder().status(204).body(full("")).unwrap(),
        "/echo" => Response::new(req.into_body().boxed()),
        "/headers" => {
            let map: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            Response::new(full(serde_json::to_vec(&map).unwrap()))
        }
        "/stream" => {
            let n = query_number(&req, "n");
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
            tokio::spawn(async move {
                for i in 0..n {
                    if tx
                        .send(Ok(Frame::data(Bytes::from(format!("chunk {i}\n")))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            let stream = tokio_stream_from(rx);
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/big" => {
            let mib = query_number(&req, "mb");
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
                for _ in 0..mib {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .header("content-length", (mib * 1024 * 1024).to_string())
                .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
                .unwrap()
        }
        _ => Response::builder()
            .status(404)
            .body(full("no such backend path"))
            .unwrap(),
    };
    Ok(response)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// WebSocket echo backend.
pub async fn websocket_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() {
                        break;
                    }
                    if ws.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Stands in for control's public HTTP API: answers every request with what it saw.
pub async fn control_http_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = serde_json::json!({
                        "service": "control",
                        "path": req.uri().path(),
                        "host": req.headers().get("host").and_then(|v| v.to_str().ok()),
                        "x_forwarded_for": req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()),
                    });
                    Ok::<_, Infallible>(Response::new(full(body.to_string())))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- the gateway

pub fn base_config(control_addr: SocketAddr) -> GatewayConfig {
    GatewayConfig {
        domain: DOMAIN.into(),
        tls: None,
        listen_http: Some(free_port()),
        listen_metrics: Some(free_port()),
        control_addr,
        threads: 2,
        grace_period: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(1),
        per_ip_limit: None,
        per_key_limit: None,
        auto_resume: true,
        resume_timeout: Duration::from_secs(5),
        route_ttl: Duration::from_secs(60),
        dial_timeout: Duration::from_secs(30),
        redis_route_events: None,
    }
}

pub fn tls_listener(cert: std::path::PathBuf, key: std::path::PathBuf) -> TlsListener {
    TlsListener {
        addr: free_port(),
        cert,
        key,
    }
}

/// A gateway running in its own thread; stopped on drop.
pub struct Gateway {
    pub config: GatewayConfig,
    pub parts: GatewayParts,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    pub async fn start(
        config: GatewayConfig,
        dialer: Arc<dyn SandboxDialer>,
        control: Arc<dyn ControlApi>,
    ) -> Gateway {
        let (stop, stop_rx) = watch::channel(false);
        let (parts_tx, parts_rx) = std::sync::mpsc::channel();
        let thread_config = config.clone();
        let thread = std::thread::spawn(move || {
            let (server, parts) = roost_gateway::server::build(&thread_config, dialer, control)
                .expect("gateway builds");
            parts_tx.send(parts).unwrap();
            server.run_until_stopped(stop_rx);
        });
        let parts = tokio::task::spawn_blocking(move || parts_rx.recv().unwrap())
            .await
            .unwrap();
        let probe = config
            .listen_http
            .or(config.tls.as_ref().map(|t| t.addr))
            .unwrap();
        for _ in 0..500 {
            if TcpStream::connect(probe).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Gateway {
            config,
            parts,
            stop,
            thread: Some(thread),
        }
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.config.listen_http.unwrap()
    }

    /// Waits until the route event stream is connected (the cache is then trusted).
    pub async fn wait_for_route_stream(&self) {
        for _ in 0..500 {
            if self.parts.metrics.route_stream_up.get() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the route event stream never connected");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn limit(per_second: u32, burst: u32) -> Limit {
    Limit {
        per_second: std::num::NonZeroU32::new(per_second).unwrap(),
        burst: std::num::NonZeroU32::new(burst).unwrap(),
    }
}

// ---------------------------------------------------------------- client helpers

pub type Client =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request to the gateway's plain-HTTP listener with the given Host and headers.
pub async fn request(
    client: &Client,
    gw: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{gw}{path}"))
        .header("host", host);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = client
        .request(builder.body(full(body)).unwrap())
        .await
        .expect("request reaches the gateway");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body reads")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn get(client: &Client, gw: SocketAddr, host: &str, path: &str) -> Reply {
    request(client, gw, "GET", host, path, &[], Bytes::new()).await
}
