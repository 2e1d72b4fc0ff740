//! Command-line parsing.
//!
//! As PID 1 the kernel may pass stray boot parameters as arguments, so PID 1 always runs init
//! and only picks out the flags it knows. Otherwise a subcommand is required.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::channel::{Announce, Endpoints, Listen};
use crate::identity::SystemEffects;
use crate::init::InitOptions;

pub const USAGE: &str = "\
usage: roost-agent                 (as PID 1: initialise the guest and supervise it)
       roost-agent poweroff        ask PID 1 to stop every process and power the VM off
       roost-agent channel --listen-unix PATH | --listen-vsock PORT
                   [--announce-unix PATH | --announce-vsock CID:PORT]
                   [--envd-init-socket PATH] [--interpreter-admin-socket PATH]
                   [--apply-identity hostname,entropy,clock]
                                   serve the worker's channel (PID 1 does this on vsock)
       roost-agent interpreter [FLAGS]  serve the code interpreter on :49999 (see README)
       roost-agent serve [FLAGS]   serve the E2B envd API on :49983 (see README)
       roost-agent version         print the version
       roost-agent help            print this help

`poweroff`, `halt` and `reboot` are links to roost-agent that run `roost-agent poweroff`.
As PID 1 with --skip-system-setup (tests), the channel runs only with
--channel-listen-unix=PATH [--channel-announce-unix=PATH].
";

/// What the process was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Init(InitOptions),
    Poweroff,
    /// Serve the worker's channel as an ordinary process.
    Channel(Endpoints),
    /// Serve the code interpreter (Jupyter kernels) on :49999.
    Interpreter(crate::interpreter::InterpreterOptions),
    /// Serve the E2B-compatible envd API as an ordinary process.
    Serve(crate::envd::ServeOptions),
    Version,
    Help,
    /// The arguments make no sense; the message says why.
    Usage(String),
}

/// Flag that makes init skip everything that changes the machine (mounts, console, hostname,
/// remounting `/`), for tests that run the agent as PID 1 of a PID namespace.
const SKIP_SYSTEM_SETUP: &str = "--skip-system-setup";

/// Parses `args` (including argv\[0\]).
pub fn parse(args: impl IntoIterator<Item = OsString>, is_pid1: bool) -> Command {
    let mut args = args.into_iter().map(|a| a.to_string_lossy().into_owned());
    let argv0 = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    if is_pid1 {
        let skip_system_setup = rest.iter().any(|a| a == SKIP_SYSTEM_SETUP);
        let channel = pid1_channel(&rest, skip_system_setup);
        return Command::Init(InitOptions {
            skip_system_setup,
            channel,
        });
    }
    let invoked_as = Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if matches!(invoked_as, "poweroff" | "halt" | "reboot") {
        // Accept (and ignore) the usual flags such as `-f`.
        return Command::Poweroff;
    }
    let Some((first, tail)) = rest.split_first() else {
        return Command::Usage("not running as PID 1; give a subcommand".into());
    };
    let command = match first.as_str() {
        "poweroff" => Command::Poweroff,
        "channel" => return parse_channel(tail),
        "interpreter" => {
            return match crate::interpreter::InterpreterOptions::parse(tail) {
                Ok(options) => Command::Interpreter(options),
                Err(problem) => Command::Usage(problem),
            };
        }
        "serve" => {
            return match crate::envd::options::parse(tail) {
                Ok(options) => Command::Serve(options),
                Err(problem) => Command::Usage(problem),
            };
        }
        "version" | "--version" | "-V" => Command::Version,
        "help" | "--help" | "-h" => Command::Help,
        "init" => {
            return Command::Usage("`init` runs only as PID 1 (the kernel starts it)".into());
        }
        other => return Command::Usage(format!("unknown subcommand `{other}`")),
    };
    match tail.first() {
        Some(extra) => Command::Usage(format!("unexpected argument `{extra}` after `{first}`")),
        None => command,
    }
}

/// PID 1 serves the channel on vsock, except in tests (`--skip-system-setup`), which name a
/// Unix socket instead (`--channel-listen-unix=PATH`) or get no channel.
fn pid1_channel(args: &[String], skip_system_setup: bool) -> Option<Endpoints> {
    let value = |prefix: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(prefix))
            .map(PathBuf::from)
    };
    match value("--channel-listen-unix=") {
        Some(path) => Some(Endpoints {
            listen: Listen::Unix(path),
            announce: value("--channel-announce-unix=").map_or(Announce::Nowhere, Announce::Unix),
            // The machine is not ours: identity changes nothing machine-wide.
            identity_effects: SystemEffects::default(),
            ..Endpoints::default()
        }),
        None if skip_system_setup => None,
        None => Some(Endpoints::default()),
    }
}

/// `channel --listen-unix PATH | --listen-vsock PORT [--announce-unix PATH | --announce-vsock
/// CID:PORT] [--envd-init-socket PATH] [--interpreter-admin-socket PATH] [--apply-identity
/// LIST]`. As an ordinary process the identity operation changes nothing machine-wide unless
/// `--apply-identity` names it (tests give `hostname` inside a UTS namespace).
fn parse_channel(args: &[String]) -> Command {
    let mut listen = None;
    let mut announce = Announce::Nowhere;
    let mut envd_init_socket = PathBuf::from(crate::envd::DEFAULT_INIT_SOCKET);
    let mut interpreter_admin_socket =
        PathBuf::from(crate::identity::DEFAULT_INTERPRETER_ADMIN_SOCKET);
    let mut identity_effects = SystemEffects::default();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            return Command::Usage(format!("`{flag}` needs a value"));
        };
        match flag.as_str() {
            "--listen-unix" => listen = Some(Listen::Unix(value.into())),
            "--listen-vsock" => match value.parse() {
                Ok(port) => listen = Some(Listen::Vsock { port }),
                Err(_) => return Command::Usage(format!("bad vsock port `{value}`")),
            },
            "--announce-unix" => announce = Announce::Unix(value.into()),
            "--envd-init-socket" => envd_init_socket = value.into(),
            "--interpreter-admin-socket" => interpreter_admin_socket = value.into(),
            "--apply-identity" => match SystemEffects::parse(value) {
                Ok(effects) => identity_effects = effects,
                Err(problem) => return Command::Usage(problem),
            },
            "--announce-vsock" => {
                let parsed = value
                    .split_once(':')
                    .and_then(|(cid, port)| Some((cid.parse().ok()?, port.parse().ok()?)));
                match parsed {
                    Some((cid, port)) => announce = Announce::Vsock { cid, port },
                    None => {
                        return Command::Usage(format!("bad vsock address `{value}` (CID:PORT)"));
                    }
                }
            }
            other => return Command::Usage(format!("unknown channel option `{other}`")),
        }
    }
    match listen {
        Some(listen) => Command::Channel(Endpoints {
            listen,
            announce,
            envd_init_socket,
            identity_effects,
            interpreter_admin_socket,
        }),
        None => Command::Usage("`channel` needs --listen-unix PATH or --listen-vsock PORT".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str], is_pid1: bool) -> Command {
        parse(args.iter().map(OsString::from), is_pid1)
    }

    #[test]
    fn pid1_always_runs_init_whatever_the_kernel_passes() {
        let plain = Command::Init(InitOptions {
            skip_system_setup: false,
            channel: Some(Endpoints::default()),
        });
        assert_eq!(parse_strs(&["/sbin/init"], true), plain);
        assert_eq!(
            parse_strs(&["/sbin/init", "splash", "poweroff"], true),
            plain
        );
        assert_eq!(
            parse_strs(&["roost-agent", "init", "--skip-system-setup"], true),
            Command::Init(InitOptions {
                skip_system_setup: true,
                channel: None,
            })
        );
    }

    #[test]
    fn pid1_channel_on_a_unix_socket_for_tests() {
        let args = [
            "roost-agent",
            "init",
            "--skip-system-setup",
            "--channel-listen-unix=/tmp/a.sock",
            "--channel-announce-unix=/tmp/b.sock",
        ];
        assert_eq!(
            parse_strs(&args, true),
            Command::Init(InitOptions {
                skip_system_setup: true,
                channel: Some(Endpoints {
                    listen: Listen::Unix("/tmp/a.sock".into()),
                    announce: Announce::Unix("/tmp/b.sock".into()),
                    identity_effects: SystemEffects::default(),
                    ..Endpoints::default()
                }),
            })
        );
    }

    #[test]
    fn channel_subcommand() {
        assert_eq!(
            parse_strs(
                &["roost-agent", "channel", "--listen-unix", "/tmp/c.sock"],
                false
            ),
            Command::Channel(Endpoints {
                listen: Listen::Unix("/tmp/c.sock".into()),
                announce: Announce::Nowhere,
                identity_effects: SystemEffects::default(),
                ..Endpoints::default()
            })
        );
        assert_eq!(
            parse_strs(
                &[
                    "roost-agent",
                    "channel",
                    "--listen-unix",
                    "/tmp/c.sock",
                    "--envd-init-socket",
                    "/tmp/i.sock",
                    "--interpreter-admin-socket",
                    "/tmp/a.sock",
                    "--apply-identity",
                    "hostname,entropy"
                ],
                false
            ),
            Command::Channel(Endpoints {
                listen: Listen::Unix("/tmp/c.sock".into()),
                announce: Announce::Nowhere,
                envd_init_socket: "/tmp/i.sock".into(),
                identity_effects: SystemEffects {
                    hostname: true,
                    entropy: true,
                    clock: false,
                },
                interpreter_admin_socket: "/tmp/a.sock".into(),
            })
        );
        assert_eq!(
            parse_strs(
                &[
                    "roost-agent",
                    "channel",
                    "--listen-vsock",
                    "1025",
                    "--announce-vsock",
                    "2:1024",
                    "--apply-identity",
                    "hostname,entropy,clock"
                ],
                false
            ),
            Command::Channel(Endpoints::default())
        );
        for bad in [
            &["roost-agent", "channel"][..],
            &["roost-agent", "channel", "--listen-unix"],
            &["roost-agent", "channel", "--listen-vsock", "x"],
            &[
                "roost-agent",
                "channel",
                "--listen-unix",
                "/a",
                "--announce-vsock",
                "2",
            ],
            &["roost-agent", "channel", "--bogus", "1"],
            &[
                "roost-agent",
                "channel",
                "--listen-unix",
                "/a",
                "--apply-identity",
                "hostname,disk",
            ],
        ] {
            assert!(
                matches!(parse_strs(bad, false), Command::Usage(_)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn subcommands_outside_pid1() {
        assert_eq!(
            parse_strs(&["roost-agent", "poweroff"], false),
            Command::Poweroff
        );
        assert_eq!(
            parse_strs(&["roost-agent", "version"], false),
            Command::Version
        );
        assert_eq!(parse_strs(&["roost-agent", "--help"], false), Command::Help);
        assert_eq!(
            parse_strs(&["/usr/sbin/poweroff", "-f"], false),
            Command::Poweroff
        );
        assert_eq!(parse_strs(&["reboot"], false), Command::Poweroff);
    }

    #[test]
    fn no_subcommand_or_a_wrong_one_is_a_usage_error() {
        for args in [
            &["roost-agent"][..],
            &["roost-agent", "bogus"],
            &["roost-agent", "version", "extra"],
            &["roost-agent", "init"],
        ] {
            assert!(
                matches!(parse_strs(args, false), Command::Usage(_)),
                "{args:?}"
            );
        }
    }
}
