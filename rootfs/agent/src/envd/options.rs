//! `roost-agent serve [FLAGS]`: the envd API as an ordinary process (tests, benchmarks).
//!
//! `--root DIR` is the sandbox's default workdir: processes start there and relative paths
//! resolve against it (as `/init`'s `defaultWorkdir` does in a VM). Absolute paths are real
//! paths on the machine, limited by the acting user's permissions like inside a sandbox.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::ServeOptions;

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
