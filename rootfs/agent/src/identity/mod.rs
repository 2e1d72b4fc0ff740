//! A sandbox's identity after a snapshot restore (the channel's `identity` operation,
//! `roost_proto::agent::identity`): every clone of a template wakes up with the template's
//! hostname, random state, environment and token, and a clock that stopped when the snapshot
//! was taken. One request gives it its own.
//!
//! Order: the whole request is checked first, so bad input changes nothing. Then entropy
//! (credited to the pool and the CRNG reseeded, so that no two clones ever share random
//! state), the wall clock, the hostname, then envd's `POST /init` (the same code path as the
//! worker's own `/init`, through envd's private socket) and the code interpreter's token.
//!
//! Machine-wide settings are only touched where [`SystemEffects`] allow it: all of them as PID 1
//! of a VM, none (or what a test names, e.g. the hostname inside a UTS namespace) when the
//! agent runs as an ordinary process.

mod clock;
mod entropy;
mod http;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

use roost_proto::agent::{ErrorKind, ErrorReply, IdentityApplied, IdentityRequest, InitRequest};

pub use validate::validate;

/// Where the code interpreter takes its access token (`roost-agent interpreter --admin-socket`).
pub const DEFAULT_INTERPRETER_ADMIN_SOCKET: &str = "/run/roost/interpreter-admin.sock";
/// How long a started interpreter may take to open its admin socket.
const INTERPRETER_WAIT: Duration = Duration::from_secs(10);

/// Which machine-wide settings the identity operation may change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemEffects {
    pub hostname: bool,
    pub entropy: bool,
    pub clock: bool,
}

impl SystemEffects {
    /// Everything: the agent is PID 1 of a VM.
    pub const ALL: Self = Self {
        hostname: true,
        entropy: true,
        clock: true,
    };

    /// Parses `hostname,entropy,clock` (any subset; `none` for none).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut effects = Self::default();
        for item in list.split(',').filter(|i| !i.is_empty()) {
            match item {
                "hostname" => effects.hostname = true,
                "entropy" => effects.entropy = true,
                "clock" => effects.clock = true,
                "none" => {}
                other => {
                    return Err(format!(
                        "unknown identity effect `{other}` (hostname, entropy, clock, none)"
                    ));
                }
            }
        }
        Ok(effects)
    }
}

/// What the identity operation needs to know about the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    pub effects: SystemEffects,
    /// envd's private `/init` socket.
    pub envd_init_socket: PathBuf,
    /// The code interpreter's private admin socket; used when an interpreter runs.
    pub interpreter_admin_socket: PathBuf,
}

/// Checks `request`, then applies it. Errors say which part failed; a failure after the
/// checks leaves the parts before it applied (they are all safe to repeat).
pub async fn apply(
    request: IdentityRequest,
    config: &IdentityConfig,
) -> Result<IdentityApplied, ErrorReply> {
    validate(&request).map_err(|e| ErrorReply::new(ErrorKind::BadRequest, e.to_string()))?;
    let effects = config.effects;
    let mut applied = IdentityApplied {
        hostname: false,
        entropy: false,
        clock: false,
        clock_step_ns: 0,
        envd: false,
        interpreter: false,
    };
    if effects.entropy {
        entropy::add(&request.entropy).map_err(|e| io_reply("adding entropy", &e))?;
        applied.entropy = true;
    }
    if effects.clock {
        applied.clock_step_ns = clock::set_realtime(request.wall_clock_unix_ns)
            .map_err(|e| io_reply("setting the clock", &e))?;
        applied.clock = true;
    }
    if effects.hostname {
        nix::unistd::sethostname(&request.hostname)
            .map_err(|e| io_reply("sethostname", &std::io::Error::from(e)))?;
        applied.hostname = true;
    }
    let init = InitRequest {
        sandbox_id: Some(request.sandbox_id),
        env_vars: Some(request.env_vars),
        access_token: request.access_token.clone(),
        ..InitRequest::default()
    };
    http::post_init(&config.envd_init_socket, &init)
        .await
        .map_err(|e| e.reply("envd"))?;
    applied.envd = true;
    applied.interpreter = hand_token_to_interpreter(config, request.access_token).await?;
    tracing::info!(?applied, "identity applied");
    Ok(applied)
}

/// Gives the code interpreter the token, when one runs (this guest started it, or its socket
/// is there). True when it took it.
async fn hand_token_to_interpreter(
    config: &IdentityConfig,
    access_token: Option<String>,
) -> Result<bool, ErrorReply> {
    let Some(access_token) = access_token else {
        return Ok(false);
    };
    let socket = &config.interpreter_admin_socket;
    let started = crate::interpreter::guest::was_started();
    if !started && !socket.exists() {
        return Ok(false);
    }
    // Started by init a moment ago: its admin socket may not be bound yet.
    let deadline = tokio::time::Instant::now() + INTERPRETER_WAIT;
    while !socket.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let init = InitRequest {
        access_token: Some(access_token),
        ..InitRequest::default()
    };
    http::post_init(socket, &init)
        .await
        .map_err(|e| e.reply("the code interpreter"))?;
    Ok(true)
}

fn io_reply(what: &str, error: &std::io::Error) -> ErrorReply {
    let kind = match error.kind() {
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    };
    ErrorReply::new(kind, format!("{what}: {error}"))
}
