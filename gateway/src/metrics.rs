//! Prometheus metrics and the `/metrics` endpoint, served on a listener of its own so that it
//! is never reachable through the public one.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the gateway exports, registered in its own registry.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Finished requests by target (`control`, `sandbox`, `none`) and status class.
    pub requests: IntCounterVec,
    /// Request duration (until the response ended) by target.
    pub request_seconds: HistogramVec,
    /// Requests being proxied right now.
    pub in_flight: IntGauge,
    /// Route look-ups by result (`hit`, `miss`).
    pub route_lookups: IntCounterVec,
    /// Auto-resumes by outcome.
    pub resumes: IntCounterVec,
    /// Route change events applied.
    pub route_events: IntCounter,
    /// 1 while the route event stream is connected.
    pub route_stream_up: IntGauge,
    /// Requests refused with 429, by scope (`ip`, `api_key`).
    pub rate_limited: IntCounterVec,
    /// Failed tunnel dials by reason.
    pub dial_failures: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("roost_gateway".into()), None)
            .expect("static registry options are valid");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Finished requests"),
            &["target", "status"],
        )
        .expect("valid metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Request duration").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                60.0,
            ]),
            &["target"],
        )
        .expect("valid metric");
        let in_flight =
            IntGauge::new("in_flight_requests", "Requests in progress").expect("valid metric");
        let route_lookups = IntCounterVec::new(
            Opts::new("route_lookups_total", "Route look-ups by cache result"),
            &["result"],
        )
        .expect("valid metric");
        let resumes = IntCounterVec::new(
            Opts::new("auto_resumes_total", "Auto-resumes of paused sandboxes"),
            &["outcome"],
        )
        .expect("valid metric");
        let route_events = IntCounter::new("route_events_total", "Route change events applied")
            .expect("valid metric");
        let route_stream_up = IntGauge::new(
            "route_stream_up",
            "1 while control's route event stream is connected",
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new("rate_limited_total", "Requests refused by a rate limit"),
            &["scope"],
        )
        .expect("valid metric");
        let dial_failures = IntCounterVec::new(
            Opts::new("tunnel_dial_failures_total", "Failed tunnel dials"),
            &["reason"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(in_flight.clone()),
            Box::new(route_lookups.clone()),
            Box::new(resumes.clone()),
            Box::new(route_events.clone()),
            Box::new(route_stream_up.clone()),
            Box::new(rate_limited.clone()),
            Box::new(dial_failures.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            request_seconds,
            in_flight,
            route_lookups,
            resumes,
            route_events,
            route_stream_up,
            rate_limited,
            dial_failures,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("writing to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `/metrics` HTTP app.
#[derive(Debug)]
pub struct MetricsApp(pub Arc<Metrics>);

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let (status, content_type, body) = if session.req_header().uri.path() == "/metrics" {
            (200, "text/plain; version=0.0.4", self.0.render())
        } else {
            (
                404,
                "application/json",
                br#"{"code":404,"message":"only /metrics is served here"}"#.to_vec(),
            )
        };
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .expect("static response parts are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::new();
        m.requests.with_label_values(&["sandbox", "2xx"]).inc();
        m.rate_limited.with_label_values(&["ip"]).inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("roost_gateway_requests_total{status=\"2xx\",target=\"sandbox\"} 1"),
            "{text}"
        );
        assert!(text.contains("roost_gateway_rate_limited_total{scope=\"ip\"} 1"));
    }
}
