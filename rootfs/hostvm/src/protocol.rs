//! The control channel between the host VM's `/init` and this process.
//!
//! `/init` writes one line per event to the virtio-serial port `roost.control`, apart from
//! CMD's stdout and stderr (their own ports) and from the kernel console (the first serial
//! port, kept in a log for error messages). Lines:
//!
//! ```text
//! roost:init <uptime at /init start> <uptime now>   (seconds, from /proc/uptime)
//! roost:stage <name>                                  (a setup step started)
//! roost:fail <stage> <message...>                     (setup failed; CMD will not run)
//! roost:ready <uptime>                                (CMD starts now)
//! roost:exit <code>                                   (CMD exited with this status)
//! roost:alive                                         (every HEARTBEAT_SECS while /init lives)
//! ```
//!
//! The heartbeat exists because the TCG host VM itself sometimes wedges (both vCPUs stuck in
//! the kernel, seen with nested guests running): without it such a run looks like a slow
//! command until the overall timeout.

/// Seconds between two `roost:alive` lines from `/init`.
pub const HEARTBEAT_SECS: u64 = 5;

/// Name of the virtio-serial port carrying control lines.
pub const CONTROL_PORT: &str = "roost.control";
/// Name of the port carrying CMD's stdout.
pub const STDOUT_PORT: &str = "roost.stdout";
/// Name of the port carrying CMD's stderr.
pub const STDERR_PORT: &str = "roost.stderr";

/// One parsed control line.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    Init {
        uptime_at_init: f64,
        uptime_now: f64,
    },
    Stage(String),
    Fail {
        stage: String,
        message: String,
    },
    Ready {
        uptime: f64,
    },
    Exit(i32),
    Alive,
}

/// Parses one control line; `None` for anything that is not a well-formed message.
pub fn parse(line: &str) -> Option<Control> {
    let rest = line.trim_end_matches(['\r', '\n']).strip_prefix("roost:")?;
    let (verb, args) = rest.split_once(' ').unwrap_or((rest, ""));
    let secs = |text: &str| {
        text.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    match verb {
        "init" => {
            let mut words = args.split_whitespace();
            let uptime_at_init = secs(words.next()?)?;
            let uptime_now = secs(words.next()?)?;
            Some(Control::Init {
                uptime_at_init,
                uptime_now,
            })
        }
        "stage" if !args.is_empty() => Some(Control::Stage(args.to_owned())),
        "fail" => {
            let (stage, message) = args.split_once(' ').unwrap_or((args, ""));
            Some(Control::Fail {
                stage: stage.to_owned(),
                message: message.to_owned(),
            })
        }
        "ready" => Some(Control::Ready {
            uptime: secs(args.trim())?,
        }),
        "exit" => args
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|c| (0..=255).contains(c))
            .map(Control::Exit),
        "alive" if args.is_empty() => Some(Control::Alive),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_message() {
        assert_eq!(
            parse("roost:init 2.31 2.50\n"),
            Some(Control::Init {
                uptime_at_init: 2.31,
                uptime_now: 2.5
            })
        );
        assert_eq!(
            parse("roost:stage modules"),
            Some(Control::Stage("modules".into()))
        );
        assert_eq!(
            parse("roost:fail kvm /dev/kvm is missing after modprobe kvm_amd"),
            Some(Control::Fail {
                stage: "kvm".into(),
                message: "/dev/kvm is missing after modprobe kvm_amd".into()
            })
        );
        assert_eq!(
            parse("roost:ready 3.10"),
            Some(Control::Ready { uptime: 3.1 })
        );
        assert_eq!(parse("roost:exit 7"), Some(Control::Exit(7)));
        assert_eq!(parse("roost:exit 0\r\n"), Some(Control::Exit(0)));
        assert_eq!(parse("roost:alive"), Some(Control::Alive));
        assert_eq!(parse("roost:alive now"), None);
    }

    #[test]
    fn rejects_malformed_messages() {
        for bad in [
            "exit 7",
            "roost:exit",
            "roost:exit seven",
            "roost:exit 256",
            "roost:exit -1",
            "roost:init 1.0",
            "roost:init nan 1",
            "roost:ready",
            "roost:stage",
            "roost:bogus 1",
            "xroost:exit 1",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
