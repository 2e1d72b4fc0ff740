//! `roost-agent serve [FLAGS]`: the envd API as an ordinary process (tests, benchmarks).
//!
//! `--root DIR` is the sandbox's default workdir: processes start there and relative paths
//! resolve against it (as `/init`'s `defaultWorkdir` does in a VM). Absolute paths are real
//! paths on the machine, limited by the acting user's permissions like inside a sandbox.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::ServeOptions;

/// Test-only PID 1 flag: serve the API on this address although system setup is skipped.
pub const PID1_LISTEN_FLAG: &str = "--envd-listen=";

/// What PID 1 serves: in a VM (system setup done) the guest defaults; with
/// `--skip-system-setup` (tests of init in a PID namespace) nothing, unless the arguments name
/// an address with `--envd-listen=IP:PORT` (then without `/init` socket and clock setting).
pub fn for_pid1(args: &[String], skip_system_setup: bool) -> Option<ServeOptions> {
    let defaults = ServeOptions {
        set_clock: true,
        reap_children: false,
        ..ServeOptions::default()
    };
    if !skip_system_setup {
        return Some(defaults);
    }
    let listen = args
        .iter()
        .find_map(|a| a.strip_prefix(PID1_LISTEN_FLAG))?
        .parse()
        .ok()?;
    Some(ServeOptions {
        listen,
        init_socket: None,
        set_clock: false,
        ..defaults
    })
}

/// Parses the flags after `serve`.
pub fn parse(args: &[String]) -> Result<ServeOptions, String> {
    let mut options = ServeOptions {
        // A test run must not take over the guest's socket path by default.
        init_socket: None,
        ..ServeOptions::default()
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        if flag == "--no-init-socket" {
            options.init_socket = None;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("`{flag}` needs a value"))?;
        match flag.as_str() {
            "--root" => {
                let root = PathBuf::from(value);
                if !root.is_absolute() {
                    return Err(format!("--root must be an absolute path, not `{value}`"));
                }
                options.config.default_workdir = Some(root);
            }
            "--port" => {
                let port = value.parse().map_err(|_| format!("bad port `{value}`"))?;
                options.listen.set_port(port);
            }
            "--listen" => {
                let ip: IpAddr = value
                    .parse()
                    .map_err(|_| format!("bad IP address `{value}`"))?;
                options.listen = SocketAddr::new(ip, options.listen.port());
            }
            "--access-token" => options.config.access_token = Some(value.clone()),
            "--user" => options.config.default_user = value.clone(),
            "--env" => {
                let (key, val) = value
                    .split_once('=')
                    .ok_or_else(|| format!("--env takes KEY=VALUE, not `{value}`"))?;
                options.config.env_vars.insert(key.into(), val.into());
            }
            "--init-socket" => options.init_socket = Some(PathBuf::from(value)),
            other => return Err(format!("unknown serve option `{other}`")),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn flags() {
        let options = parse(&strings(&[
            "--root",
            "/srv",
            "--port",
            "5000",
            "--listen",
            "127.0.0.1",
            "--access-token",
            "t",
            "--user",
            "root",
            "--env",
            "A=b=c",
            "--init-socket",
            "/tmp/i.sock",
        ]))
        .unwrap();
        assert_eq!(options.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(options.config.default_workdir, Some("/srv".into()));
        assert_eq!(options.config.access_token.as_deref(), Some("t"));
        assert_eq!(options.config.default_user, "root");
        assert_eq!(options.config.env_vars["A"], "b=c");
        assert_eq!(options.init_socket, Some("/tmp/i.sock".into()));
        assert!(options.reap_children && !options.set_clock);
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.listen.port(), 49983);
        assert_eq!(defaults.config.default_user, "user");
    }

    #[test]
    fn pid1_serves_in_a_vm_and_in_tests_only_when_asked() {
        let vm = for_pid1(&[], false).unwrap();
        assert!(vm.set_clock && !vm.reap_children);
        assert_eq!(vm.listen.port(), 49983);
        assert!(vm.init_socket.is_some());
        assert_eq!(for_pid1(&strings(&["--skip-system-setup"]), true), None);
        let test = for_pid1(&strings(&["--envd-listen=127.0.0.1:5001"]), true).unwrap();
        assert_eq!(test.listen, "127.0.0.1:5001".parse().unwrap());
        assert!(!test.set_clock && !test.reap_children && test.init_socket.is_none());
        assert_eq!(for_pid1(&strings(&["--envd-listen=nonsense"]), true), None);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            &["--port"][..],
            &["--port", "x"],
            &["--root", "rel"],
            &["--bogus", "1"],
            &["--env", "novalue"],
        ] {
            assert!(parse(&strings(args)).is_err(), "{args:?}");
        }
    }
}
