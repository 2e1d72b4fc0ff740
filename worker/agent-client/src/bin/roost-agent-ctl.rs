//! `roost-agent-ctl`: talk to a roost-agent by hand or from scripts (host-VM runs, debugging
//! a VM): wait for its hello, ask health, run a command, copy a file, forward a port.
//!
//! ```text
//! roost-agent-ctl wait-ready --vsock-uds /run/vm1/vsock.sock --timeout 30
//! roost-agent-ctl --vsock-uds /run/vm1/vsock.sock exec -- uname -a
//! roost-agent-ctl --unix /tmp/agent.sock write /tmp/f < local-file
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use roost_agent_client::{
    AgentClient, Connector, ExecEvent, ReadyListener, UserSpec, WriteFileRequest, exec_argv,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(version, about = "Talk to a roost-agent over vsock or a Unix socket")]
struct Args {
    /// The VM's vsock Unix socket (the VMM's host side).
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "unix")]
    vsock_uds: Option<PathBuf>,
    /// Guest vsock port of the agent.
    #[arg(long, global = true, default_value_t = roost_proto::agent::AGENT_PORT)]
    port: u32,
    /// A Unix socket the agent listens on itself (`roost-agent channel --listen-unix`).
    #[arg(long, global = true, value_name = "PATH")]
    unix: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Listen for the agent's hello (start before the VM) and print it as JSON.
    WaitReady {
        /// Listen on this path instead of `<vsock-uds>_1024`.
        #[arg(long, value_name = "PATH")]
        listen: Option<PathBuf>,
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Print the agent's hello as JSON.
    Hello,
    /// Print the guest's health as JSON.
    Health,
    /// Run a command; its output streams here and its exit code becomes ours (128+N when
    /// killed by signal N).
    Exec {
        /// Forward our stdin to the command.
        #[arg(long)]
        stdin: bool,
        #[arg(long, value_name = "DIR")]
        cwd: Option<String>,
        /// Run as this uid (with --gid).
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// Copy a guest file to stdout.
    Read { path: String },
    /// Copy stdin to a guest file.
    Write {
        path: String,
        /// Octal permission bits.
        #[arg(long)]
        mode: Option<String>,
        #[arg(long)]
        create_dirs: bool,
    },
    /// Accept TCP connections on LISTEN (e.g. 127.0.0.1:8080) and forward each to
    /// 127.0.0.1:GUEST_PORT in the guest, until interrupted.
    Forward { listen: String, guest_port: u16 },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("roost-agent-ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("roost-agent-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Cmd::WaitReady { listen, timeout } = &args.command {
        let listener = match (listen, &args.vsock_uds) {
            (Some(path), _) => ReadyListener::bind(path)?,
            (None, Some(uds)) => ReadyListener::for_vm(uds)?,
            (None, None) => bail!("wait-ready needs --vsock-uds or --listen"),
        };
        let hello = listener.accept_hello(Duration::from_secs(*timeout)).await?;
        println!("{}", serde_json::to_string(&hello)?);
        return Ok(ExitCode::SUCCESS);
    }
    let connector = match (&args.vsock_uds, &args.unix) {
        (Some(uds), _) => Connector::VsockMuxer {
            uds_path: uds.clone(),
            port: args.port,
        },
        (None, Some(path)) => Connector::Unix(path.clone()),
        (None, None) => bail!("say where the agent is: --vsock-uds PATH or --unix PATH"),
    };
    let client = AgentClient::new(connector);
    match args.command {
        Cmd::WaitReady { .. } => unreachable!("handled above"),
        Cmd::Hello => println!("{}", serde_json::to_string(&client.hello().await?)?),
        Cmd::Health => println!("{}", serde_json::to_string(&client.health().await?)?),
        Cmd::Exec {
            stdin,
            cwd,
            uid,
            gid,
            env,
            argv,
        } => {
            let mut request = exec_argv(argv);
            request.stdin = stdin;
            request.cwd = cwd;
            request.user = uid.zip(gid).map(|(uid, gid)| UserSpec { uid, gid });
            for pair in env {
                let (key, value) = pair
                    .split_once('=')
                    .with_context(|| format!("--env {pair}: expected KEY=VALUE"))?;
                request.env.insert(key.to_owned(), value.to_owned());
            }
            return exec(&client, request).await;
        }
        Cmd::Read { path } => {
            client
                .read_file_into(&path, &mut tokio::io::stdout())
                .await?;
        }
        Cmd::Write {
            path,
            mode,
            create_dirs,
        } => {
            let mode = mode
                .map(|m| u32::from_str_radix(&m, 8).with_context(|| format!("mode {m}")))
                .transpose()?;
            let request = WriteFileRequest {
                path,
                mode,
                create_dirs,
                owner: None,
            };
            client.write_file(request, &mut tokio::io::stdin()).await?;
        }
        Cmd::Forward { listen, guest_port } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let forwarder = client.serve_forward(listener, guest_port);
            tokio::signal::ctrl_c().await?;
            forwarder.abort();
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn exec(
    client: &AgentClient,
    request: roost_agent_client::ExecRequest,
) -> anyhow::Result<ExitCode> {
    let wants_stdin = request.stdin;
    let (mut input, mut output) = client.exec(request).await?.split();
    let feeder = wants_stdin.then(|| {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; roost_proto::agent::MAX_CHUNK_LEN];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write_stdin(&buf[..n]).await.is_err() {
                            return input;
                        }
                    }
                }
            }
            let _ = input.close_stdin().await;
            input
        })
    });
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let status = loop {
        match output.next_event().await? {
            Some(ExecEvent::Stdout(bytes)) => {
                stdout.write_all(&bytes).await?;
                stdout.flush().await?;
            }
            Some(ExecEvent::Stderr(bytes)) => {
                stderr.write_all(&bytes).await?;
                stderr.flush().await?;
            }
            Some(ExecEvent::Exited(status)) => break status,
            None => bail!("the agent ended the exec without an exit status"),
        }
    };
    if let Some(feeder) = feeder {
        feeder.abort();
    }
    let code = match (status.code, status.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 255,
    };
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(255)))
}
