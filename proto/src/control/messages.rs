//! The messages of the control channel (see the module documentation of [`super`] for which
//! stream carries which). Sandbox ids travel as strings (`cl-...`); each side validates them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a worker's host can hold in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub max_sandboxes: u32,
}

/// How much of its [`Capacity`] a worker has handed out (running and paused sandboxes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub sandboxes: u32,
}

/// A sandbox's state as the worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerSandboxState {
    /// Being created or resumed; control does not act on it yet.
    Starting,
    Running,
    /// Snapshotted on this host, not running.
    Paused,
}

/// One sandbox a worker holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    pub sandbox_id: String,
    pub state: WorkerSandboxState,
}

/// The first message on the session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// The id control assigned at registration (also in the client certificate).
    pub worker_id: String,
    /// The worker build, for display and support.
    pub worker_version: String,
    pub capacity: Capacity,
    /// Templates this host can start sandboxes from.
    pub templates: Vec<String>,
    pub usage: Usage,
    /// Every sandbox the worker holds right now, for reconciliation.
    pub sandboxes: Vec<SandboxReport>,
}

/// Sent every `heartbeat_interval_ms` on the session stream after the welcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increases by one per heartbeat of a connection, starting at 1.
    pub seq: u64,
    pub usage: Usage,
    /// Templates may appear (an image finished building) or vanish.
    pub templates: Vec<String>,
    pub sandboxes: Vec<SandboxReport>,
}

/// Worker → control on the session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Hello(Hello),
    Heartbeat(Heartbeat),
}

/// Control → worker on the session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// The worker is accepted; heartbeats are due every `heartbeat_interval_ms`.
    Welcome {
        protocol_version: u32,
        heartbeat_interval_ms: u64,
    },
    /// The worker is refused; control closes the connection after sending this.
    Rejected { reason: String },
}

/// What a worker needs to start (or restore) a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSandbox {
    pub sandbox_id: String,
    pub team_id: String,
    pub template_id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// Environment variables for the guest (values are secrets: never log them).
    pub env_vars: BTreeMap<String, String>,
    pub envd_access_token: Option<String>,
    pub allow_internet: bool,
    /// E2B `network.allowOut`, as the user wrote it (control checked it with
    /// [`crate::egress::parse_list`]); absent from an older control: empty.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// E2B `network.denyOut`, like `allow_out`.
    #[serde(default)]
    pub deny_out: Vec<String>,
}

/// What control asks a worker to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    Create(CreateSandbox),
    Kill {
        sandbox_id: String,
    },
    Pause {
        sandbox_id: String,
    },
    /// Restores a paused sandbox held by this worker.
    Resume(CreateSandbox),
    /// Saves a running sandbox as a reusable snapshot named `snapshot_id`.
    Snapshot {
        sandbox_id: String,
        snapshot_id: String,
    },
    Metrics {
        sandbox_id: String,
    },
    /// Removes a template (a snapshot) this worker holds; it is no longer offered.
    DeleteTemplate {
        template_id: String,
    },
}

/// A request, alone on its own stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub protocol_version: u32,
    /// Unique per control instance and connection; echoed in the response.
    pub request_id: u64,
    #[serde(flatten)]
    pub operation: Operation,
}

/// One resource-usage sample of a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    pub timestamp_ms: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// What a request achieved, one variant per [`Operation`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Created,
    Killed,
    Paused,
    Resumed,
    Snapshotted { size_bytes: u64 },
    Metrics { samples: Vec<MetricSample> },
    TemplateDeleted,
}

/// Why a worker could not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The host is full; control may try another host.
    NoCapacity,
    /// This host cannot start the template; control may try another host.
    UnknownTemplate,
    UnknownSandbox,
    /// The sandbox is not in a state the operation applies to.
    InvalidState,
    UnsupportedVersion,
    /// The request itself is malformed (e.g. a certificate request that does not parse).
    InvalidRequest,
    Internal,
    /// A kind added by a newer peer.
    #[serde(other)]
    Other,
}

/// A typed failure with a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct WorkerError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The worker's answer, alone on the request's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub request_id: u64,
    pub result: Result<Outcome, WorkerError>,
}

/// What a worker asks control, on a bidirectional stream the worker opens after the welcome
/// (one stream per request, like control's requests the other way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WorkerOperation {
    /// A new client certificate for the key behind `csr_pem` (PEM PKCS#10), before the
    /// current one expires. The current certificate stays valid until its own expiry.
    RenewCertificate { csr_pem: String },
}

/// A worker's request, alone on its own stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRequest {
    pub protocol_version: u32,
    /// Unique per worker connection; echoed in the reply.
    pub request_id: u64,
    #[serde(flatten)]
    pub operation: WorkerOperation,
}

/// What control did for a [`WorkerRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WorkerOutcome {
    Certificate {
        certificate_pem: String,
        /// Expiry of the new certificate, Unix seconds.
        not_after_unix: i64,
    },
}

/// Control's answer to a [`WorkerRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReply {
    pub request_id: u64,
    pub result: Result<WorkerOutcome, WorkerError>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_form_is_flat_and_tagged() {
        let req = Request {
            protocol_version: 1,
            request_id: 7,
            operation: Operation::Kill {
                sandbox_id: "cl-abc".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"protocol_version": 1, "request_id": 7, "op": "kill", "sandbox_id": "cl-abc"})
        );
        let back: Request = serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn responses_carry_typed_results_and_errors() {
        let ok = Response {
            request_id: 1,
            result: Ok(Outcome::Snapshotted { size_bytes: 42 }),
        };
        let err = Response {
            request_id: 2,
            result: Err(WorkerError {
                kind: ErrorKind::NoCapacity,
                message: "full".into(),
            }),
        };
        for r in [ok, err] {
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        }
    }

    #[test]
    fn unknown_error_kinds_and_fields_are_tolerated() {
        let text =
            r#"{"request_id":3,"result":{"Err":{"kind":"disk_on_fire","message":"m","extra":1}}}"#;
        let r: Response = serde_json::from_str(text).unwrap();
        assert_eq!(r.result.unwrap_err().kind, ErrorKind::Other);
    }

    #[test]
    fn worker_requests_round_trip_flat() {
        let req = WorkerRequest {
            protocol_version: 1,
            request_id: 2,
            operation: WorkerOperation::RenewCertificate {
                csr_pem: "PEM".into(),
            },
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            json!({"protocol_version": 1, "request_id": 2, "op": "renew_certificate", "csr_pem": "PEM"})
        );
        assert_eq!(serde_json::from_value::<WorkerRequest>(v).unwrap(), req);
        let reply = WorkerReply {
            request_id: 2,
            result: Ok(WorkerOutcome::Certificate {
                certificate_pem: "C".into(),
                not_after_unix: 9,
            }),
        };
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(serde_json::from_str::<WorkerReply>(&text).unwrap(), reply);
    }

    #[test]
    fn create_carries_egress_lists_and_an_older_control_omits_them() {
        let v = json!({
            "protocol_version": 1, "request_id": 4, "op": "create", "sandbox_id": "cl-1",
            "team_id": "t", "template_id": "base", "vcpus": 1, "memory_mib": 512, "disk_mib": 1024,
            "env_vars": {}, "envd_access_token": null, "allow_internet": true
        });
        let old: Request = serde_json::from_value(v.clone()).unwrap();
        let Operation::Create(mut spec) = old.operation else {
            panic!("create expected");
        };
        assert!(spec.allow_out.is_empty() && spec.deny_out.is_empty());

        spec.allow_out = vec!["10.0.0.0/8".into(), "*.pypi.org".into()];
        spec.deny_out = vec!["0.0.0.0/0".into()];
        let req = Request {
            protocol_version: 1,
            request_id: 5,
            operation: Operation::Resume(spec),
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["op"], "resume");
        assert_eq!(v["allow_out"], json!(["10.0.0.0/8", "*.pypi.org"]));
        assert_eq!(v["deny_out"], json!(["0.0.0.0/0"]));
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), req);
    }

    #[test]
    fn worker_messages_are_tagged_by_type() {
        let hb = WorkerMessage::Heartbeat(Heartbeat {
            seq: 1,
            usage: Usage::default(),
            templates: vec!["base".into()],
            sandboxes: vec![SandboxReport {
                sandbox_id: "cl-1".into(),
                state: WorkerSandboxState::Running,
            }],
        });
        let v = serde_json::to_value(&hb).unwrap();
        assert_eq!(v["type"], "heartbeat");
        assert_eq!(v["sandboxes"][0]["state"], "running");
        assert_eq!(serde_json::from_value::<WorkerMessage>(v).unwrap(), hb);
    }
}
