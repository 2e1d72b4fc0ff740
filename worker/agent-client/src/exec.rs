//! Exec: a running process in the guest, as a stream of output events and an input handle.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use roost_proto::agent::{
    AgentMessage, ClientMessage, ExecRequest, ExitStatus, Frame, MAX_CHUNK_LEN, Operation, Program,
    StreamKind,
};

use crate::{AgentClient, Conn, Error, expect, unexpected};

/// SIGKILL.
const SIGKILL: i32 = 9;

/// An exec of `argv` with the agent's environment, no stdin.
pub fn exec_argv<I, S>(argv: I) -> ExecRequest
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    request(Program::Argv(argv.into_iter().map(Into::into).collect()))
}

/// An exec of a `/bin/sh -c` script with the agent's environment, no stdin.
pub fn exec_shell(script: impl Into<String>) -> ExecRequest {
    request(Program::Shell(script.into()))
}

fn request(program: Program) -> ExecRequest {
    ExecRequest {
        program,
        env: BTreeMap::new(),
        clear_env: false,
        cwd: None,
        user: None,
        stdin: false,
    }
}

/// What a finished exec produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Something the process did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last event.
    Exited(ExitStatus),
}

/// A running process. Dropping it (or both halves of [`Exec::split`]) before it exits kills
/// its process group.
#[derive(Debug)]
pub struct Exec {
    pid: u32,
    input: ExecInput,
    output: ExecOutput,
}

/// Sends stdin and signals.
#[derive(Debug)]
pub struct ExecInput {
    sink: SplitSink<Conn, Frame<ClientMessage>>,
}

/// Receives output and the exit status.
#[derive(Debug)]
pub struct ExecOutput {
    stream: SplitStream<Conn>,
    exited: bool,
}

impl AgentClient {
    /// Starts a process; returns once it runs.
    pub async fn exec(&self, request: ExecRequest) -> Result<Exec, Error> {
        let mut conn = self.open(Operation::Exec(request)).await?;
        let pid = match expect(&mut conn, "started").await? {
            AgentMessage::Started { pid } => pid,
            other => return Err(unexpected("started", &other)),
        };
        let (sink, stream) = conn.split();
        Ok(Exec {
            pid,
            input: ExecInput { sink },
            output: ExecOutput {
                stream,
                exited: false,
            },
        })
    }

    /// Runs a process to its end and collects its output (in memory: for bounded output).
    pub async fn run(&self, request: ExecRequest) -> Result<Output, Error> {
        self.exec(request).await?.output().await
    }
}

impl Exec {
    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event; `None` after [`ExecEvent::Exited`].
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, Error> {
        self.output.next_event().await
    }

    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), Error> {
        self.input.write_stdin(data).await
    }

    pub async fn close_stdin(&mut self) -> Result<(), Error> {
        self.input.close_stdin().await
    }

    pub async fn signal(&mut self, signal: i32) -> Result<(), Error> {
        self.input.signal(signal).await
    }

    /// SIGKILL to the process group.
    pub async fn kill(&mut self) -> Result<(), Error> {
        self.input.signal(SIGKILL).await
    }

    /// Separate halves, to feed stdin and read output from different tasks.
    pub fn split(self) -> (ExecInput, ExecOutput) {
        (self.input, self.output)
    }

    /// Collects the remaining output until the process exits (keep writing stdin from another
    /// task via [`Exec::split`] if the process needs it).
    pub async fn output(self) -> Result<Output, Error> {
        let (_input, output) = self.split();
        output.collect().await
    }
}

impl ExecInput {
    /// Sends `data` to the process's stdin (in chunks of at most the protocol's chunk size).
    /// Waits while the agent applies backpressure.
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), Error> {
        for chunk in data.chunks(MAX_CHUNK_LEN) {
            self.sink
                .feed(Frame::Data(
                    StreamKind::Stdin,
                    Bytes::copy_from_slice(chunk),
                ))
                .await?;
        }
        self.sink.flush().await?;
        Ok(())
    }

    pub async fn close_stdin(&mut self) -> Result<(), Error> {
        self.sink
            .send(Frame::Message(ClientMessage::CloseStdin))
            .await?;
        Ok(())
    }

    /// Sends a signal number to the process group.
    pub async fn signal(&mut self, signal: i32) -> Result<(), Error> {
        self.sink
            .send(Frame::Message(ClientMessage::Signal { signal }))
            .await?;
        Ok(())
    }
}

impl ExecOutput {
    /// The next event; `None` after [`ExecEvent::Exited`].
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, Error> {
        if self.exited {
            return Ok(None);
        }
        let event = match self.stream.next().await {
            None => return Err(Error::Closed("the process exited")),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Frame::Data(StreamKind::Stdout, bytes))) => ExecEvent::Stdout(bytes),
            Some(Ok(Frame::Data(StreamKind::Stderr, bytes))) => ExecEvent::Stderr(bytes),
            Some(Ok(Frame::Message(AgentMessage::Exited(status)))) => {
                self.exited = true;
                ExecEvent::Exited(status)
            }
            Some(Ok(Frame::Message(AgentMessage::Error(reply)))) => {
                return Err(Error::Agent(reply));
            }
            Some(Ok(Frame::Message(other))) => return Err(unexpected("exec output", &other)),
            Some(Ok(Frame::Data(kind, _))) => {
                return Err(Error::Unexpected {
                    expected: "exec output",
                    got: format!("{kind:?} data"),
                });
            }
        };
        Ok(Some(event))
    }

    /// Collects everything until the exit.
    pub async fn collect(mut self) -> Result<Output, Error> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match self.next_event().await? {
                Some(ExecEvent::Stdout(bytes)) => stdout.extend_from_slice(&bytes),
                Some(ExecEvent::Stderr(bytes)) => stderr.extend_from_slice(&bytes),
                Some(ExecEvent::Exited(status)) => {
                    return Ok(Output {
                        status,
                        stdout,
                        stderr,
                    });
                }
                None => return Err(Error::Closed("the process exited")),
            }
        }
    }
}
