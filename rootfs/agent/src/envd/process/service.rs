//! The `process.Process` Connect service.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::StreamExt;
use nix::sys::signal::{Signal as UnixSignal, kill, killpg};
use nix::unistd::Pid;

use super::fd_io::AsyncDescriptor;
use super::lifecycle::{self, Stream};
use super::registry::{Output, ProcessHandle};
use super::spawn::{self, SpawnRequest};
use crate::envd::auth;
use crate::envd::connect::{
    self, Code, ConnectError, EnvelopeReader, STREAM_CONTENT_TYPE, StreamSender,
};
use crate::envd::paths;
use crate::envd::proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessEvent, ProcessInput, SendInputRequest, SendInputResponse,
    SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse, StreamInputRequest,
    StreamInputResponse, UpdateRequest, UpdateResponse, process_event, process_input,
    stream_input_request,
};
use crate::envd::state::Envd;

/// Request header giving the keepalive interval (seconds) of a server stream.
const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";
/// Keepalive interval when the client names none: below common proxy idle timeouts.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get(KEEPALIVE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs)
}

pub async fn start(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    let request: StartRequest = match connect::stream_request(&headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    match start_process(&envd, &headers, request).await {
        Ok((handle, events)) => {
            let (sender, response) = connect::stream_reply();
            tokio::spawn(forward(
                sender,
                handle.pid,
                events,
                keepalive_interval(&headers),
                |event| StartResponse { event: Some(event) },
            ));
            response
        }
        Err(e) => connect::stream_error(e),
    }
}

async fn start_process(
    envd: &Arc<Envd>,
    headers: &HeaderMap,
    request: StartRequest,
) -> Result<(Arc<ProcessHandle>, tokio::sync::mpsc::Receiver<Output>), ConnectError> {
    let account = auth::request_account(envd, headers)?;
    let config = request
        .process
        .ok_or_else(|| ConnectError::invalid("`process` is required"))?;
    if config.cmd.is_empty() {
        return Err(ConnectError::invalid("`process.cmd` is empty"));
    }
    let sandbox = envd.config();
    let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(cwd) => paths::resolve(cwd, &account, sandbox.default_workdir.as_deref())?,
        None => sandbox
            .default_workdir
            .clone()
            .unwrap_or_else(|| account.home.clone()),
    };
    if !cwd.is_dir() {
        return Err(ConnectError::invalid(format!(
            "cwd '{}' does not exist or is not a directory",
            cwd.display()
        )));
    }
    let pty = request
        .pty
        .as_ref()
        .map(|pty| pty.size.unwrap_or_default())
        .map(|size| {
            let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
            (clamp(size.cols), clamp(size.rows))
        });
    let env = spawn::environment(
        &account,
        &cwd,
        pty.is_some(),
        &sandbox.env_vars,
        &config.envs,
    );
    let spawned = spawn::spawn(&SpawnRequest {
        cmd: &config.cmd,
        args: &config.args,
        env,
        cwd: &cwd,
        account: &account,
        stdin: request.stdin != Some(false),
        pty,
    })?;
    let register = |fd| {
        AsyncDescriptor::new(fd)
            .map(Arc::new)
            .map_err(|e| ConnectError::internal(format!("registering process I/O: {e}")))
    };
    let mut outputs = Vec::new();
    if let Some(fd) = spawned.stdout {
        outputs.push((Stream::Stdout, register(fd)?));
    }
    if let Some(fd) = spawned.stderr {
        outputs.push((Stream::Stderr, register(fd)?));
    }
    let pty_master = spawned.pty_master.map(register).transpose()?;
    if let Some(master) = &pty_master {
        outputs.push((Stream::Pty, master.clone()));
    }
    let stdin = spawned.stdin.map(register).transpose()?;
    let mut stored_config = config;
    stored_config.cwd = Some(cwd.to_string_lossy().into_owned());
    let handle = Arc::new(ProcessHandle::new(
        spawned.pid,
        stored_config,
        request.tag,
        stdin,
        pty_master,
    ));
    // Subscribe before any output is read, so the starter sees all of it.
    let events = handle.subscribe();
    envd.processes.insert(handle.clone());
    lifecycle::supervise(envd.clone(), handle.clone(), outputs, spawned.exit);
    tracing::debug!(pid = handle.pid, user = %account.name, cmd = %handle.config.cmd, "started process");
    Ok((handle, events))
}

/// Streams a process's events: `start{pid}` first, then output, keepalives and the end.
async fn forward<M: serde::Serialize>(
    sender: StreamSender,
    pid: u32,
    mut events: tokio::sync::mpsc::Receiver<Output>,
    keepalive: Duration,
    wrap: impl Fn(ProcessEvent) -> M,
) {
    let event = |e| wrap(ProcessEvent { event: Some(e) });
    if !sender
        .send(&event(process_event::Event::Start(
            process_event::StartEvent { pid },
        )))
        .await
    {
        return;
    }
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    loop {
        let message = tokio::select! {
            output = events.recv() => match output {
                Some(Output::Data(data)) => event(process_event::Event::Data(data)),
                Some(Output::End(end)) => {
                    if sender.send(&event(process_event::Event::End(end))).await {
                        sender.finish(Ok(())).await;
                    }
                    return;
                }
                None => break,
            },
            _ = ticker.tick() => event(process_event::Event::Keepalive(process_event::KeepAlive {})),
            () = sender.closed() => return,
        };
        if !sender.send(&message).await {
            return;
        }
    }
    sender
        .finish(Err(ConnectError::internal(
            "the process's event stream ended without an end event",
        )))
        .await;
}

pub async fn connect_process(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: ConnectRequest = match connect::stream_request(&headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    match envd.processes.find(request.process.as_ref()) {
        Ok(handle) => {
            let events = handle.subscribe();
            let (sender, response) = connect::stream_reply();
            tokio::spawn(forward(
                sender,
                handle.pid,
                events,
                keepalive_interval(&headers),
                |event| ConnectResponse { event: Some(event) },
            ));
            response
        }
        Err(e) => connect::stream_error(e),
    }
}

pub async fn list(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    connect::unary(&headers, &body, |_: ListRequest| async move {
        Ok(ListResponse {
            processes: envd.processes.list(),
        })
    })
    .await
}

async fn write_input(
    handle: &ProcessHandle,
    input: Option<ProcessInput>,
) -> Result<(), ConnectError> {
    let input = input
        .and_then(|i| i.input)
        .ok_or_else(|| ConnectError::invalid("`input` (stdin or pty) is required"))?;
    let (target, bytes) = match input {
        process_input::Input::Pty(bytes) => (
            handle
                .pty
                .clone()
                .ok_or_else(|| ConnectError::invalid("the process has no PTY"))?,
            bytes,
        ),
        process_input::Input::Stdin(bytes) => {
            let stdin = handle.stdin.lock().await.clone();
            let target = match (stdin, &handle.pty) {
                (Some(stdin), _) => stdin,
                // A PTY process reads its terminal.
                (None, Some(pty)) => pty.clone(),
                (None, None) => {
                    return Err(ConnectError::new(
                        Code::FailedPrecondition,
                        "the process's stdin is closed or was not requested (start it with stdin enabled)",
                    ));
                }
            };
            (target, bytes)
        }
    };
    target
        .write_all(&bytes)
        .await
        .map_err(|e| ConnectError::internal(format!("writing to process {}: {e}", handle.pid)))
}

pub async fn send_input(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    connect::unary(&headers, &body, |request: SendInputRequest| async move {
        let handle = envd.processes.find(request.process.as_ref())?;
        write_input(&handle, request.input).await?;
        Ok(SendInputResponse {})
    })
    .await
}

pub async fn send_signal(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    connect::unary(&headers, &body, |request: SendSignalRequest| async move {
        let handle = envd.processes.find(request.process.as_ref())?;
        let signal = match Signal::try_from(request.signal) {
            Ok(Signal::Sigkill) => UnixSignal::SIGKILL,
            Ok(Signal::Sigterm) => UnixSignal::SIGTERM,
            _ => {
                return Err(ConnectError::invalid(format!(
                    "unsupported signal {}",
                    request.signal
                )));
            }
        };
        let pid =
            i32::try_from(handle.pid).map_err(|_| ConnectError::internal("pid out of range"))?;
        // The process leads its own session and group: signal the whole group, so children
        // of a shell go too; fall back to the process alone.
        if killpg(Pid::from_raw(pid), signal).is_err() {
            kill(Pid::from_raw(pid), signal)
                .map_err(|e| ConnectError::internal(format!("kill {pid}: {e}")))?;
        }
        Ok(SendSignalResponse {})
    })
    .await
}

pub async fn close_stdin(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    connect::unary(&headers, &body, |request: CloseStdinRequest| async move {
        let handle = envd.processes.find(request.process.as_ref())?;
        // End of input on a terminal is ^D.
        if handle.stdin.lock().await.take().is_none()
            && let Some(pty) = &handle.pty
        {
            pty.write_all(&[4])
                .await
                .map_err(|e| ConnectError::internal(format!("writing ^D: {e}")))?;
        }
        Ok(CloseStdinResponse {})
    })
    .await
}

pub async fn update(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    connect::unary(&headers, &body, |request: UpdateRequest| async move {
        let handle = envd.processes.find(request.process.as_ref())?;
        if let Some(size) = request.pty.and_then(|p| p.size) {
            let pty = handle
                .pty
                .as_ref()
                .ok_or_else(|| ConnectError::invalid("the process has no PTY to resize"))?;
            let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
            spawn::resize(&pty.as_fd(), clamp(size.cols), clamp(size.rows))?;
        }
        Ok(UpdateResponse {})
    })
    .await
}

/// Client-streaming: a `start{process}` message, then `data{input}` and `keepalive` messages.
pub async fn stream_input(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(response) = connect::check_content_type(&headers, STREAM_CONTENT_TYPE) {
        return *response;
    }
    let result = consume_input(&envd, body).await;
    let (sender, response) = connect::stream_reply();
    tokio::spawn(async move {
        match result {
            Ok(()) => {
                if sender.send(&StreamInputResponse {}).await {
                    sender.finish(Ok(())).await;
                }
            }
            Err(e) => sender.finish(Err(e)).await,
        }
    });
    response
}

async fn consume_input(envd: &Envd, body: Body) -> Result<(), ConnectError> {
    let mut reader = EnvelopeReader::default();
    let mut chunks = body.into_data_stream();
    let mut target: Option<Arc<ProcessHandle>> = None;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk
            .map_err(|e| ConnectError::new(Code::Canceled, format!("reading the request: {e}")))?;
        reader.push(&chunk);
        while let Some((flags, payload)) = reader.next_envelope()? {
            if flags & connect::END_STREAM != 0 {
                return Err(ConnectError::invalid(
                    "a request envelope must not have the end-stream flag",
                ));
            }
            let message: StreamInputRequest = connect::decode_unary(&payload)?;
            match message.event {
                Some(stream_input_request::Event::Start(start)) => {
                    target = Some(envd.processes.find(start.process.as_ref())?);
                }
                Some(stream_input_request::Event::Data(data)) => {
                    let handle = target
                        .as_ref()
                        .ok_or_else(|| ConnectError::invalid("`data` before `start`"))?;
                    write_input(handle, data.input).await?;
                }
                Some(stream_input_request::Event::Keepalive(_)) | None => {}
            }
        }
    }
    if reader.has_partial() {
        return Err(ConnectError::invalid(
            "the request stream ended inside an envelope",
        ));
    }
    Ok(())
}
