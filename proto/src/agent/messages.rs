//! Control messages (JSON in tag-0 frames) and the frame sequence of each operation.
//!
//! | operation | client sends | agent answers |
//! |---|---|---|
//! | hello | `Request{op: hello}` | `Hello` |
//! | health | `Request{op: health}` | `Health` |
//! | exec | `Request{op: exec}`, then stdin data, `CloseStdin`, `Signal` in any order | `Started{pid}`, stdout/stderr data, then `Exited` last |
//! | read_file | `Request{op: read_file}` | `FileInfo`, file data, then `Done{bytes}` |
//! | write_file | `Request{op: write_file}`, waits for `Accepted`, file data, `End` | `Accepted`, then `Done{bytes}` after `End` |
//! | forward | `Request{op: forward, port}` or `{op: forward, target: envd_init}` (v2) | `Connected`, then both sides send raw bytes (no frames) |
//! | identity (v3) | `Request{op: identity}` | `IdentityApplied` |
//!
//! Any step may instead get an `Error` from the agent, after which it closes the connection.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::identity::{IdentityApplied, IdentityRequest};

/// The first frame of every connection from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The protocol version the client speaks.
    pub version: u32,
    #[serde(flatten)]
    pub op: Operation,
}

impl Request {
    /// A request for `op`, carrying the oldest protocol version that has it: an older agent
    /// still serves the operations it knows, and refuses newer ones with
    /// [`ErrorKind::UnsupportedVersion`] instead of misreading them.
    pub fn new(op: Operation) -> Self {
        Self {
            version: op.required_version(),
            op,
        }
    }
}

impl Operation {
    /// The oldest protocol version that has this operation.
    pub fn required_version(&self) -> u32 {
        match self {
            Self::Forward(forward) => forward.required_version(),
            Self::Identity(_) => 3,
            Self::Hello | Self::Health | Self::Exec(_) | Self::ReadFile(_) | Self::WriteFile(_) => {
                1
            }
        }
    }
}

/// What a connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    /// Ask for the agent's [`Hello`] (versions) again, e.g. after a snapshot restore.
    Hello,
    /// Ask for [`Health`].
    Health,
    Exec(ExecRequest),
    ReadFile(ReadFileRequest),
    WriteFile(WriteFileRequest),
    Forward(ForwardRequest),
    /// Hand a (restored) sandbox its id, hostname, environment, token, entropy and clock.
    Identity(IdentityRequest),
}

/// Run a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub program: Program,
    /// Variables added to (or replacing those of) the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Start from an empty environment instead of the agent's (plus `HOME`, `USER` and a
    /// default `PATH` when [`ExecRequest::user`] is set).
    #[serde(default)]
    pub clear_env: bool,
    /// Absolute working directory; the agent's own (or the user's home) if absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this user instead of the agent's.
    #[serde(default)]
    pub user: Option<UserSpec>,
    /// Connect the process's stdin to the connection; otherwise it reads `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

/// The program of an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    /// `argv[0]` is looked up in `PATH`.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`.
    Shell(String),
}

/// A numeric user and group. When the uid has an `/etc/passwd` entry the agent also sets
/// `HOME`, `USER` and `LOGNAME` and adds the user's supplementary groups from `/etc/group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
}

/// Stream a file out of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    /// Absolute path.
    pub path: String,
}

/// Stream a file into the guest: created, or truncated and overwritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute path.
    pub path: String,
    /// Permission bits of a newly created file (default `0o644`); an existing file's mode is
    /// changed to this when given.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Create missing parent directories (mode `0o755`).
    #[serde(default)]
    pub create_dirs: bool,
    /// Owner of the file and of directories created for it.
    #[serde(default)]
    pub owner: Option<UserSpec>,
}

/// What a forward connects to inside the guest; bytes are then spliced both ways.
///
/// On the wire the fields sit next to `op`: `{"op":"forward","port":8080}` (version 1) or
/// `{"op":"forward","target":"envd_init"}` (version 2). The envd init socket is named, never a
/// path: the client cannot point the agent at an arbitrary socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ForwardWire", into = "ForwardWire")]
pub enum ForwardRequest {
    /// `127.0.0.1:port`.
    Tcp { port: u16 },
    /// The envd API's private Unix socket that serves `POST /init` (the path the agent was
    /// configured with).
    EnvdInit,
}

impl ForwardRequest {
    /// The oldest protocol version that has this target.
    pub fn required_version(self) -> u32 {
        match self {
            Self::Tcp { .. } => 1,
            Self::EnvdInit => 2,
        }
    }
}

/// The wire form of [`ForwardRequest`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct ForwardWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// Absent means a TCP port (version 1 requests have no target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<ForwardTargetName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ForwardTargetName {
    Tcp,
    EnvdInit,
}

impl TryFrom<ForwardWire> for ForwardRequest {
    type Error = String;

    fn try_from(wire: ForwardWire) -> Result<Self, String> {
        match (wire.target, wire.port) {
            (None | Some(ForwardTargetName::Tcp), Some(port)) => Ok(Self::Tcp { port }),
            (None | Some(ForwardTargetName::Tcp), None) => {
                Err("a tcp forward needs a `port`".into())
            }
            (Some(ForwardTargetName::EnvdInit), None) => Ok(Self::EnvdInit),
            (Some(ForwardTargetName::EnvdInit), Some(_)) => {
                Err("an envd_init forward takes no `port`".into())
            }
        }
    }
}

impl From<ForwardRequest> for ForwardWire {
    fn from(request: ForwardRequest) -> Self {
        match request {
            // No `target`: a version 1 agent reads this request as it always did.
            ForwardRequest::Tcp { port } => Self {
                port: Some(port),
                target: None,
            },
            ForwardRequest::EnvdInit => Self {
                port: None,
                target: Some(ForwardTargetName::EnvdInit),
            },
        }
    }
}

/// Messages from the client after its [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Exec: close the process's stdin.
    CloseStdin,
    /// Exec: send this signal number to the process group.
    Signal { signal: i32 },
    /// Write file: all content has been sent.
    End,
}

/// Messages from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The agent's announcement on [`super::READY_PORT`], and the answer to `hello`.
    Hello(Hello),
    Health(Health),
    /// Exec: the process runs.
    Started {
        pid: u32,
    },
    /// Exec: the process ended; the last message of an exec.
    Exited(ExitStatus),
    /// Read file: size and mode, before the content.
    FileInfo {
        size: u64,
        mode: u32,
    },
    /// Write file: the file is open, send the content.
    Accepted,
    /// A file operation finished; `bytes` were transferred.
    Done {
        bytes: u64,
    },
    /// Forward: connected; raw bytes follow in both directions.
    Connected,
    /// Identity: applied; what changed.
    IdentityApplied(IdentityApplied),
    /// The operation failed; the agent closes the connection after it.
    Error(ErrorReply),
}

/// Who the agent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub min_protocol_version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    pub hostname: String,
}

/// How the guest is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Seconds since the guest booted (`/proc/uptime`).
    pub uptime_secs: f64,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub memory: MemoryInfo,
    /// Processes and threads in the guest.
    #[serde(default)]
    pub tasks: u32,
}

/// From `/proc/meminfo`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub total_kib: u64,
    pub available_kib: u64,
}

/// How a process ended: exactly one of the two is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => write!(f, "killed by signal {signal}"),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    /// For people: what failed and why.
    pub message: String,
}

impl ErrorReply {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

/// Error classes a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Unparseable frame, unknown operation, a message out of sequence, bad argument.
    BadRequest,
    /// A frame longer than [`super::MAX_FRAME_LEN`].
    FrameTooLarge,
    UnsupportedVersion,
    NotFound,
    PermissionDenied,
    IsADirectory,
    NotADirectory,
    /// Forward: nothing listens on the port.
    ConnectionRefused,
    /// Exec: the program could not be started.
    SpawnFailed,
    /// Any other I/O failure inside the guest.
    Io,
    /// A kind this build does not know (sent by a newer peer).
    #[serde(other)]
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad request",
            Self::FrameTooLarge => "frame too large",
            Self::UnsupportedVersion => "unsupported protocol version",
            Self::NotFound => "not found",
            Self::PermissionDenied => "permission denied",
            Self::IsADirectory => "is a directory",
            Self::NotADirectory => "not a directory",
            Self::ConnectionRefused => "connection refused",
            Self::SpawnFailed => "spawn failed",
            Self::Io => "I/O error",
            Self::Other => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_is_flat_and_round_trips() {
        let request = Request::new(Operation::Exec(ExecRequest {
            program: Program::Argv(vec!["echo".into(), "hi".into()]),
            env: BTreeMap::from([("A".into(), "1".into())]),
            clear_env: false,
            cwd: Some("/tmp".into()),
            user: Some(UserSpec {
                uid: 1000,
                gid: 1000,
            }),
            stdin: true,
        }));
        let json = serde_json::to_string(&request).unwrap();
        assert!(
            json.starts_with(r#"{"version":1,"op":"exec","program":{"argv":["#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);
    }

    #[test]
    fn optional_fields_may_be_omitted_and_unknown_ones_are_ignored() {
        let json = r#"{"version":1,"op":"exec","program":{"shell":"true"},"future":42}"#;
        let request: Request = serde_json::from_str(json).unwrap();
        let Operation::Exec(exec) = request.op else {
            panic!("{request:?}")
        };
        assert_eq!(exec.program, Program::Shell("true".into()));
        assert!(exec.env.is_empty() && !exec.stdin && exec.user.is_none());
    }

    #[test]
    fn unknown_error_kinds_from_a_newer_agent_decode_as_other() {
        let json = r#"{"type":"error","kind":"quota_exceeded","message":"m"}"#;
        let message: AgentMessage = serde_json::from_str(json).unwrap();
        assert_eq!(
            message,
            AgentMessage::Error(ErrorReply::new(ErrorKind::Other, "m"))
        );
    }

    #[test]
    fn unknown_operations_are_rejected() {
        let json = r#"{"version":1,"op":"format_disk"}"#;
        assert!(serde_json::from_str::<Request>(json).is_err());
    }

    #[test]
    fn forward_targets_on_the_wire() {
        let tcp = Request::new(Operation::Forward(ForwardRequest::Tcp { port: 8080 }));
        let json = serde_json::to_string(&tcp).unwrap();
        assert_eq!(json, r#"{"version":1,"op":"forward","port":8080}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), tcp);

        let init = Request::new(Operation::Forward(ForwardRequest::EnvdInit));
        let json = serde_json::to_string(&init).unwrap();
        assert_eq!(json, r#"{"version":2,"op":"forward","target":"envd_init"}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), init);

        let explicit_tcp = r#"{"version":2,"op":"forward","target":"tcp","port":1}"#;
        assert_eq!(
            serde_json::from_str::<Request>(explicit_tcp).unwrap().op,
            Operation::Forward(ForwardRequest::Tcp { port: 1 })
        );
    }

    #[test]
    fn bad_forward_targets_are_rejected_with_a_reason() {
        for (json, reason) in [
            (
                r#"{"version":2,"op":"forward","target":"/run/x.sock"}"#,
                "unknown variant",
            ),
            (r#"{"version":2,"op":"forward"}"#, "needs a `port`"),
            (
                r#"{"version":2,"op":"forward","target":"envd_init","port":1}"#,
                "takes no `port`",
            ),
        ] {
            let error = serde_json::from_str::<Request>(json)
                .unwrap_err()
                .to_string();
            assert!(error.contains(reason), "{json}: {error}");
        }
    }

    #[test]
    fn identity_is_a_version_3_operation() {
        let mut identity = IdentityRequest::new("sb1", "host1").unwrap();
        identity.entropy = vec![0; 3];
        let request = Request::new(Operation::Identity(identity));
        let json = serde_json::to_string(&request).unwrap();
        assert!(
            json.starts_with(r#"{"version":3,"op":"identity","sandbox_id":"sb1","hostname":"host1","env_vars":{},"entropy":"AAAA","#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);
        let applied = AgentMessage::IdentityApplied(IdentityApplied {
            hostname: true,
            entropy: true,
            clock: false,
            clock_step_ns: 0,
            envd: true,
            interpreter: false,
        });
        let json = serde_json::to_string(&applied).unwrap();
        assert!(
            json.starts_with(r#"{"type":"identity_applied","hostname":true"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<AgentMessage>(&json).unwrap(),
            applied
        );
    }

    #[test]
    fn exit_status_display() {
        let exited = ExitStatus {
            code: Some(3),
            signal: None,
        };
        let killed = ExitStatus {
            code: None,
            signal: Some(9),
        };
        assert_eq!(exited.to_string(), "exit code 3");
        assert_eq!(killed.to_string(), "killed by signal 9");
        assert!(!exited.success() && !killed.success());
    }
}
