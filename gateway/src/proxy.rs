//! The Pingora `ProxyHttp` implementation: request phases in order.
//!
//! 1. `request_filter`: rate limits, target from host/headers, then for a sandbox: route
//!    (cache → control → auto-resume) and access check. Every refusal is written here as JSON
//!    and ends the request.
//! 2. `upstream_peer`: control's address, or the sandbox port through the tunnel bridge
//!    (`upstream::bridge`: a pooled connection for that target, or a new tunnel stream).
//! 3. `upstream_request_filter`: forwarding headers for control.
//! 4. Pingora streams bodies both ways (and WebSocket upgrades) without buffering.
//! 5. `fail_to_proxy` turns the worker's refusal (no such sandbox, port not open) into the
//!    contract's 502 JSON, any other failure into a JSON 502; `logging` writes the access log
//!    line and the metrics.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::header;
use pingora::protocols::l4::socket::SocketAddr as L4Addr;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::{HttpPeer, PeerOptions, Scheme};
use pingora::{Error, ErrorType};
use roost_proto::ids::SandboxId;

use crate::access;
use crate::metrics::Metrics;
use crate::ratelimit::{self, RateLimits};
use crate::reply::Reply;
use crate::routes::resolver::{ResolveError, Resolver};
use crate::target::{Router, SandboxTarget, Target};
use crate::upstream::DialError;
use crate::upstream::bridge::BridgeConnector;

/// Longest path written to an access log line (paths are client-controlled).
const LOGGED_PATH_MAX: usize = 200;

/// Typed per-request state, filled phase by phase.
#[derive(Debug)]
pub struct RequestCtx {
    started: Instant,
    counted: bool,
    target: Option<Target>,
    team: Option<String>,
    worker: Option<String>,
    connector: Option<Arc<BridgeConnector>>,
}

impl RequestCtx {
    fn target_label(&self) -> &'static str {
        match self.target {
            Some(Target::Control) => "control",
            Some(Target::Sandbox(_)) => "sandbox",
            None => "none",
        }
    }

    fn sandbox(&self) -> Option<&SandboxTarget> {
        match &self.target {
            Some(Target::Sandbox(target)) => Some(target),
            _ => None,
        }
    }
}

/// The gateway's proxy logic; services and listeners are assembled in [`crate::server`].
pub struct GatewayProxy {
    pub(crate) router: Router,
    pub(crate) control_addr: SocketAddr,
    pub(crate) resolver: Arc<Resolver>,
    /// Unix socket of the tunnel bridge.
    pub(crate) bridge: PathBuf,
    pub(crate) limits: Arc<RateLimits>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) dial_timeout: Duration,
    /// How long an idle pooled connection to a sandbox port is kept.
    pub(crate) upstream_idle: Duration,
}

impl std::fmt::Debug for GatewayProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayProxy")
            .field("domain", &self.router.domain())
            .finish_non_exhaustive()
    }
}

impl GatewayProxy {
    /// Everything from target to open tunnel; `Err` is the reply to send instead.
    async fn prepare(&self, session: &Session, ctx: &mut RequestCtx) -> Result<(), Reply> {
        let request = session.req_header();
        let client_ip = client_ip(session);
        if let Err(limited) = self
            .limits
            .check(client_ip, ratelimit::api_key(&request.headers))
        {
            self.metrics
                .rate_limited
                .with_label_values(&[limited.scope()])
                .inc();
            return Err(Reply::rate_limited(limited.scope(), limited.wait()));
        }
        let target = self
            .router
            .route(authority(session), &request.headers)
            .map_err(|e| Reply::error(e.status(), e.to_string()))?;
        ctx.target = Some(target.clone());
        let Target::Sandbox(target) = target else {
            return Ok(());
        };
        let route = self
            .resolver
            .resolve(&target.sandbox)
            .await
            .map_err(|e| resolve_reply(&target.sandbox, e))?;
        ctx.team = Some(route.team_id.clone());
        let worker = route.worker_id.clone().unwrap_or_default();
        ctx.worker = Some(worker.clone());
        access::check(
            &route,
            target.port,
            &request.method,
            request.uri.path(),
            request.uri.query(),
            &request.headers,
        )
        .map_err(|denied| Reply::error(denied.status(), denied.to_string()))?;
        ctx.connector = Some(Arc::new(BridgeConnector::new(
            &self.bridge,
            &worker,
            &target.sandbox,
            target.port,
        )));
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            counted: false,
            target: None,
            team: None,
            worker: None,
            connector: None,
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.started = Instant::now();
        ctx.counted = true;
        self.metrics.in_flight.inc();
        match self.prepare(session, ctx).await {
            Ok(()) => Ok(false),
            Err(reply) => {
                reply.send(session).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        match (&ctx.target, &ctx.connector) {
            (Some(Target::Control), _) => Ok(Box::new(HttpPeer::new(
                self.control_addr,
                false,
                String::new(),
            ))),
            (Some(Target::Sandbox(target)), Some(connector)) => {
                let mut options = PeerOptions::new();
                options.custom_l4 = Some(connector.clone());
                options.idle_timeout = Some(self.upstream_idle);
                // Custom connectors ignore `connection_timeout`.
                options.total_connection_timeout = Some(self.dial_timeout);
                let address = L4Addr::Unix(
                    std::os::unix::net::SocketAddr::from_pathname(&self.bridge)
                        .or_else(|e| Error::e_explain(ErrorType::InternalError, e.to_string()))?,
                );
                // Pooled connections are per target: one tunnel stream serves one port of
                // one sandbox on one worker.
                let mut key = std::collections::hash_map::DefaultHasher::new();
                (ctx.worker.as_deref(), target.sandbox.as_str(), target.port).hash(&mut key);
                Ok(Box::new(HttpPeer {
                    _address: address,
                    scheme: Scheme::HTTP,
                    sni: String::new(),
                    proxy: None,
                    client_cert_key: None,
                    group_key: key.finish(),
                    options,
                }))
            }
            _ => Error::e_explain(
                ErrorType::InternalError,
                "request reached upstream_peer without a target",
            ),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if matches!(ctx.target, Some(Target::Control)) {
            if let Some(ip) = client_ip(session) {
                let forwarded = match upstream
                    .headers
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
                {
                    Some(previous) => format!("{previous}, {ip}"),
                    None => ip.to_string(),
                };
                upstream.insert_header("x-forwarded-for", forwarded)?;
            }
            let proto = if session
                .digest()
                .and_then(|d| d.ssl_digest.as_ref())
                .is_some()
            {
                "https"
            } else {
                "http"
            };
            upstream.insert_header("x-forwarded-proto", proto)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match error.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match error.esource() {
                pingora::ErrorSource::Upstream => 502,
                pingora::ErrorSource::Downstream => match error.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                pingora::ErrorSource::Internal | pingora::ErrorSource::Unset => 500,
            },
        };
        let refusal = ctx.connector.as_ref().and_then(|c| c.take_failure());
        if let (Some(failure), Some(target)) = (refusal, ctx.sandbox()) {
            self.metrics
                .dial_failures
                .with_label_values(&[failure.reason()])
                .inc();
            if session.response_written().is_none() {
                let reply = dial_reply(target, &failure);
                if let Err(e) = reply.send(session).await {
                    tracing::debug!(error = %e, "could not send the error reply");
                }
                return FailToProxy {
                    error_code: reply.status,
                    can_reuse_downstream: false,
                };
            }
        }
        if code > 0 && session.response_written().is_none() {
            let message = match (code, ctx.sandbox()) {
                (502, Some(_)) if matches!(error.etype(), ErrorType::ConnectTimedout) => {
                    "the sandbox's worker did not answer in time"
                }
                (502, Some(_)) => "the connection to the sandbox port failed",
                (502, None) => "control is unreachable",
                _ => "the request could not be proxied",
            };
            if let Err(e) = Reply::error(code, message).send(session).await {
                tracing::debug!(error = %e, "could not send the error reply");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        if !ctx.counted {
            return;
        }
        self.metrics.in_flight.dec();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.metrics
            .requests
            .with_label_values(&[ctx.target_label(), class])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[ctx.target_label()])
            .observe(elapsed.as_secs_f64());
        let request = session.req_header();
        let path: String = request.uri.path().chars().take(LOGGED_PATH_MAX).collect();
        let sandbox = ctx.sandbox();
        tracing::info!(
            target: "roost_gateway::access",
            client = ?client_ip(session),
            method = %request.method,
            path,
            status,
            target = ctx.target_label(),
            sandbox = sandbox.map(|t| t.sandbox.as_str()),
            port = sandbox.map(|t| t.port),
            team = ctx.team.as_deref(),
            worker = ctx.worker.as_deref(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            error = error.map(|e| e.to_string()),
        );
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// `Host` (HTTP/1.1) or `:authority` (h2).
fn authority(session: &Session) -> Option<&str> {
    let request = session.req_header();
    request
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri.authority().map(|a| a.as_str()))
}

fn resolve_reply(sandbox: &SandboxId, error: ResolveError) -> Reply {
    match error {
        ResolveError::NotFound | ResolveError::Paused | ResolveError::ResumeRefused(409) => {
            Reply::sandbox_not_found(sandbox)
        }
        ResolveError::ResumeRefused(_) => Reply::error(
            503,
            "the sandbox is paused and could not be resumed now; retry later",
        ),
        ResolveError::Control(error) => {
            tracing::warn!(sandbox = %sandbox, error = %error, "route look-up failed");
            Reply::error(
                503,
                "the sandbox's route could not be looked up; retry later",
            )
        }
    }
}

fn dial_reply(target: &SandboxTarget, error: &DialError) -> Reply {
    match error {
        DialError::NoWorker(_) | DialError::SandboxNotFound => {
            Reply::sandbox_not_found(&target.sandbox)
        }
        DialError::PortClosed => Reply::port_not_open(&target.sandbox, target.port),
        DialError::Broken(reason) => {
            tracing::warn!(sandbox = %target.sandbox, port = target.port, reason, "tunnel dial failed");
            Reply::error(502, "the tunnel to the sandbox's worker failed")
        }
    }
}
