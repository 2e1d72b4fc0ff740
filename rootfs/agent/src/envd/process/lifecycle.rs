//! A started process's life in the agent: pump its output to subscribers, wait for its exit,
//! drain what is left, announce the end, forget it.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use tokio::sync::watch;

use super::fd_io::AsyncDescriptor;
use super::registry::ProcessHandle;
use crate::envd::proto::process::process_event::{DataEvent, EndEvent, data_event};
use crate::envd::state::Envd;

/// After the process exits, output still arriving is forwarded until the pipes close or stay
/// quiet this long (a background grandchild may keep them open forever).
const DRAIN_IDLE: Duration = Duration::from_millis(250);
const READ_CHUNK: usize = 32 * 1024;

/// Which output an event carries.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
    Pty,
}

impl Stream {
    fn event(self, bytes: Vec<u8>) -> DataEvent {
        let output = match self {
            Stream::Stdout => data_event::Output::Stdout(bytes),
            Stream::Stderr => data_event::Output::Stderr(bytes),
            Stream::Pty => data_event::Output::Pty(bytes),
        };
        DataEvent {
            output: Some(output),
        }
    }
}

/// Runs the process to its end in background tasks.
pub fn supervise(
    envd: Arc<Envd>,
    handle: Arc<ProcessHandle>,
    outputs: Vec<(Stream, Arc<AsyncDescriptor>)>,
    exit: crate::children::Exit,
) {
    let (exited_tx, exited_rx) = watch::channel(false);
    let pumps: Vec<_> = outputs
        .into_iter()
        .map(|(stream, fd)| tokio::spawn(pump(stream, fd, handle.clone(), exited_rx.clone())))
        .collect();
    tokio::spawn(async move {
        let status = exit.await;
        let _ = exited_tx.send(true);
        for pump in pumps {
            let _ = pump.await;
        }
        let end = match status {
            Ok(status) => end_event(status),
            Err(_) => EndEvent {
                exit_code: -1,
                exited: false,
                status: "unknown".into(),
                error: Some("the exit status was lost (reaped elsewhere)".into()),
            },
        };
        envd.processes.remove(handle.pid);
        handle.finish(end).await;
    });
}

async fn pump(
    stream: Stream,
    fd: Arc<AsyncDescriptor>,
    handle: Arc<ProcessHandle>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_IDLE, fd.read(&mut buffer)).await {
                Ok(read) => read,
                Err(_idle) => break,
            }
        } else {
            tokio::select! {
                read = fd.read(&mut buffer) => read,
                _ = exited.changed() => continue,
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => handle.publish(stream.event(buffer[..n].to_vec())).await,
            Err(e) => {
                tracing::debug!(pid = handle.pid, "reading {stream:?}: {e}");
                break;
            }
        }
    }
}

/// The end event for a wait status, worded like Go's `ProcessState.String()` as envd does.
pub fn end_event(status: WaitStatus) -> EndEvent {
    match status {
        WaitStatus::Exited(_, code) => EndEvent {
            exit_code: code,
            exited: true,
            status: format!("exit status {code}"),
            error: None,
        },
        WaitStatus::Signaled(_, signal, _) => EndEvent {
            exit_code: -1,
            exited: false,
            status: format!("signal: {}", signal_description(signal)),
            error: None,
        },
        other => EndEvent {
            exit_code: -1,
            exited: false,
            status: format!("{other:?}"),
            error: None,
        },
    }
}

fn signal_description(signal: Signal) -> &'static str {
    match signal {
        Signal::SIGKILL => "killed",
        Signal::SIGTERM => "terminated",
        Signal::SIGINT => "interrupt",
        Signal::SIGHUP => "hangup",
        Signal::SIGPIPE => "broken pipe",
        Signal::SIGSEGV => "segmentation fault",
        Signal::SIGABRT => "aborted",
        other => other.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn end_events_like_envd() {
        let pid = Pid::from_raw(5);
        let end = end_event(WaitStatus::Exited(pid, 2));
        assert_eq!(
            (end.exit_code, end.exited, end.status.as_str()),
            (2, true, "exit status 2")
        );
        let end = end_event(WaitStatus::Signaled(pid, Signal::SIGKILL, false));
        assert_eq!(
            (end.exit_code, end.exited, end.status.as_str()),
            (-1, false, "signal: killed")
        );
    }
}
