//! One `/execute`: env vars in, the cell, env vars out, with output streamed as it comes.
//!
//! The cell's output goes to `out`, the channel feeding the HTTP response. A keepalive line is
//! sent every [`KEEPALIVE`] so that proxies and the SDK see a live stream during long cells.
//! When the client goes away (the response body is dropped, closing `out`) the kernel is
//! interrupted — the SDK's execution timeout is exactly that — and the rest of the cell's
//! messages are drained, so the context is idle and usable for the next request. The same
//! interrupt is repeated every [`KEEPALIVE`] until the kernel is idle.

use std::collections::BTreeMap;
use std::time::Duration;

use jupyter_zmq_client::ExecuteRequest;
use tokio::sync::mpsc;

use super::env_vars;
use super::kernel::{Kernel, Submission};
use super::translate::{Translated, translate};
use super::wire::OutputLine;

/// Interval of `keepalive` lines (E2B's).
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel went idle after the cell.
    Finished,
    /// The client left; the kernel was interrupted and is idle again.
    Interrupted,
    /// The kernel process exited during the cell.
    KernelExited(String),
}

/// Runs `code` on `kernel`, streaming lines to `out`. Ends with `end_of_execution` unless the
/// client has gone.
pub async fn run(
    kernel: &mut Kernel,
    code: String,
    env_vars: Option<&BTreeMap<String, String>>,
    out: &mpsc::Sender<OutputLine>,
) -> Outcome {
    let env_vars = env_vars.filter(|vars| !vars.is_empty());
    if let Some(vars) = env_vars
        && let Err(outcome) = run_quietly(kernel, env_vars::set_code(vars), "set env vars").await
    {
        return finish(out, outcome).await;
    }
    let outcome = match kernel.execute(cell_request(code)).await {
        Ok(submission) => stream_cell(kernel, submission, out).await,
        Err(e) => Outcome::KernelExited(e.to_string()),
    };
    if env_vars.is_some()
        && !matches!(outcome, Outcome::KernelExited(_))
        && let Err(restore) =
            run_quietly(kernel, env_vars::restore_code(), "restore env vars").await
    {
        tracing::warn!("could not restore env vars: {restore:?}");
    }
    finish(out, outcome).await
}

async fn finish(out: &mpsc::Sender<OutputLine>, outcome: Outcome) -> Outcome {
    if let Outcome::KernelExited(status) = &outcome {
        let _ = out
            .send(OutputLine::Error {
                name: "KernelDied".into(),
                value: format!("The kernel exited ({status}); its state is lost and it will be restarted on the next execution"),
                traceback: String::new(),
            })
            .await;
    }
    let _ = out.send(OutputLine::EndOfExecution).await;
    outcome
}

/// Sets the sandbox's own env vars in a kernel that has not got them yet (see
/// [`super::sandbox_env`]); `vars` is `None` when envd could not be asked (try next time).
pub async fn apply_sandbox_env(kernel: &mut Kernel, vars: Option<BTreeMap<String, String>>) {
    let Some(vars) = vars else {
        return;
    };
    if !vars.is_empty() && env_vars::validate(&vars).is_ok() {
        let code = env_vars::set_permanently_code(&vars);
        if let Err(outcome) = run_quietly(kernel, code, "set sandbox env vars").await {
            tracing::warn!("could not set the sandbox env vars: {outcome:?}");
            return;
        }
    }
    kernel.mark_sandbox_env_set();
}

fn cell_request(code: String) -> ExecuteRequest {
    ExecuteRequest {
        code,
        silent: false,
        store_history: true,
        user_expressions: None,
        allow_stdin: false,
        stop_on_error: true,
    }
}

/// Streams one cell's messages until the kernel is idle after it.
async fn stream_cell(
    kernel: &Kernel,
    mut submission: Submission,
    out: &mpsc::Sender<OutputLine>,
) -> Outcome {
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let mut busy = false;
    let mut errored = false;
    let mut client_gone = false;
    loop {
        tokio::select! {
            message = submission.next() => {
                let Some(message) = message else {
                    let status = submission.kernel_exit().unwrap_or_else(|| "unknown".into());
                    return Outcome::KernelExited(status);
                };
                let line = match translate(&message) {
                    Translated::Output(line) => line,
                    Translated::InputAccepted(line) => line,
                    Translated::Busy => {
                        busy = true;
                        continue;
                    }
                    // IOPub is ordered: idle after busy for this request means it is done
                    // (also when the kernel aborted it without running it).
                    Translated::Idle if busy => {
                        return if client_gone { Outcome::Interrupted } else { Outcome::Finished };
                    }
                    Translated::Idle | Translated::Nothing => continue,
                };
                if let OutputLine::Error { .. } = line {
                    // IPython reports an error once on IOPub; stay safe if a kernel repeats it.
                    if errored {
                        continue;
                    }
                    errored = true;
                }
                if !client_gone && out.send(line).await.is_err() {
                    client_gone = true;
                    interrupt(kernel);
                }
            }
            _ = keepalive.tick() => {
                if client_gone {
                    interrupt(kernel);
                } else if out.send(OutputLine::Keepalive).await.is_err() {
                    client_gone = true;
                    interrupt(kernel);
                }
            }
            _ = out.closed(), if !client_gone => {
                client_gone = true;
                interrupt(kernel);
            }
        }
    }
}

fn interrupt(kernel: &Kernel) {
    tracing::info!(
        pid = kernel.pid().as_raw(),
        "client left during execution; interrupting the kernel"
    );
    kernel.interrupt();
}

/// Runs helper code silently and waits until the kernel is idle again; its error, if any, is
/// returned (and logged), never shown to the client.
async fn run_quietly(kernel: &mut Kernel, code: String, what: &str) -> Result<(), Outcome> {
    let request = ExecuteRequest {
        code,
        silent: true,
        store_history: false,
        user_expressions: None,
        allow_stdin: false,
        stop_on_error: false,
    };
    let mut submission = kernel
        .execute(request)
        .await
        .map_err(|e| Outcome::KernelExited(e.to_string()))?;
    let mut busy = false;
    loop {
        let Some(message) = submission.next().await else {
            let status = submission.kernel_exit().unwrap_or_else(|| "unknown".into());
            return Err(Outcome::KernelExited(status));
        };
        match translate(&message) {
            Translated::Busy => busy = true,
            Translated::Idle if busy => return Ok(()),
            Translated::Output(OutputLine::Error { name, value, .. }) => {
                tracing::warn!("{what}: {name}: {value}");
            }
            _ => {}
        }
    }
}
