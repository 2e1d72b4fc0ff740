//! The wire types of the VMM process's control API (`roost vm run --api-socket PATH`): a Unix
//! stream socket speaking line-delimited JSON, one request per line and one reply per line.
//!
//! ```text
//! {"op":"status"}                                   → {"ok":true,"state":"running"}
//! {"op":"pause"} / {"op":"resume"}                  → {"ok":true,"state":"paused"|"running"}
//! {"op":"snapshot","dir":"/abs/dir","kind":"full"|"diff","parent":"/abs/p","resume":false}
//!                                                   → {"ok":true,"state":..,"snapshot":{..}}
//! {"op":"stop"}                                     → {"ok":true} and the VM stops (exit 5)
//! anything else or a failure                        → {"ok":false,"error":"..."}
//! ```
//!
//! Shared by the server (`roost_vmm::api`) and the worker's client (`roost_worker::vm_handle`),
//! which talks to the VMM as a separate process and does not link the KVM crates.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// Full or diff snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Every page of guest memory.
    Full,
    /// Only pages written since `parent` (needs dirty logging, on whenever the API is served).
    Diff,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Whether the VM runs or is paused.
    Status,
    /// Park every vCPU and the device thread.
    Pause,
    /// Let a paused VM run.
    Resume,
    /// Pause, write a snapshot into `dir` (created if missing), then resume if `resume`.
    Snapshot {
        dir: PathBuf,
        kind: SnapshotKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<PathBuf>,
        #[serde(default)]
        resume: bool,
    },
    /// Stop the VM (as SIGTERM does).
    Stop,
}

/// Run state in replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub kind: SnapshotKind,
    pub memory_pages_written: u64,
    pub memory_depth: u32,
    /// How long the VM was held paused for this snapshot.
    pub paused_ms: u64,
    pub state_bytes: u64,
    /// The files of the disk's layer chain, oldest first (absolute paths): the snapshot needs
    /// the directories holding them (empty for a disk without overlay; its memory generations
    /// are always in `dir`). `None` from a VMM that does not report it: then nothing can be
    /// assumed about which older snapshots it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_chain: Option<Vec<PathBuf>>,
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// Success with the VM's run state.
    pub fn ok(state: Option<RunState>) -> Self {
        Self {
            ok: true,
            state,
            snapshot: None,
            error: None,
        }
    }

    /// Failure, with the error and its causes in one line.
    pub fn error(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self {
            ok: false,
            state: None,
            snapshot: None,
            error: Some(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_documented() {
        let r: Request = serde_json::from_str(
            r#"{"op":"snapshot","dir":"/s/1","kind":"diff","parent":"/s/0","resume":true}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                dir: "/s/1".into(),
                kind: SnapshotKind::Diff,
                parent: Some("/s/0".into()),
                resume: true
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"snapshot","dir":"/s","kind":"full"}"#).unwrap();
        assert!(matches!(
            r,
            Request::Snapshot {
                resume: false,
                parent: None,
                ..
            }
        ));
        for (text, want) in [
            (r#"{"op":"pause"}"#, Request::Pause),
            (r#"{"op":"resume"}"#, Request::Resume),
            (r#"{"op":"stop"}"#, Request::Stop),
            (r#"{"op":"status"}"#, Request::Status),
        ] {
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), want);
        }
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        // Unknown fields are refused where a request has fields (serde's deny_unknown_fields does
        // not reach unit variants of an internally tagged enum, so `{"op":"pause","x":1}` is
        // read as a pause).
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"snapshot","dir":"/s","kind":"full","x":1}"#)
                .is_err()
        );
    }

    #[test]
    fn replies_omit_empty_fields_and_chain_causes() {
        let json = serde_json::to_string(&Reply::ok(Some(RunState::Paused))).unwrap();
        assert_eq!(json, r#"{"ok":true,"state":"paused"}"#);
        let io = std::io::Error::other("disk full");
        #[derive(Debug, thiserror::Error)]
        #[error("could not write")]
        struct Outer(#[source] std::io::Error);
        let reply = Reply::error(&Outer(io));
        assert_eq!(reply.error.as_deref(), Some("could not write: disk full"));
        assert!(!reply.ok);
    }
}
