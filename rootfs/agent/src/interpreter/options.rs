//! `roost-agent interpreter [FLAGS]`: parsed by hand like the rest of the agent's CLI.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The code interpreter's port in every E2B sandbox.
pub const DEFAULT_PORT: u16 = 49999;
/// Environment variable read for the access token when `--access-token` is not given (a token
/// on the command line is visible to every process in `/proc/*/cmdline`).
pub const ACCESS_TOKEN_ENV: &str = "ROOST_INTERPRETER_ACCESS_TOKEN";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterpreterOptions {
    pub listen: IpAddr,
    /// 0 picks a free port (printed on the first line of stdout).
    pub port: u16,
    /// Required in `X-Access-Token` on every route but `GET /health`; also read from
    /// [`ACCESS_TOKEN_ENV`].
    pub access_token: Option<String>,
    pub python: PathBuf,
    /// The kernels' user (`user`, uid 1000, in the images).
    pub user: String,
    /// The default context's working directory; default: the user's home.
    pub cwd: Option<PathBuf>,
    pub runtime_dir: PathBuf,
    pub kernel_env: Vec<(String, String)>,
    pub kernel_start_timeout: Duration,
    /// envd, asked for the sandbox's env vars; `--envd none` asks nobody.
    pub envd: Option<SocketAddr>,
    /// Private Unix socket (mode 0600) where `POST /init` replaces the access token: the
    /// agent's identity operation hands a restored sandbox's token over it.
    pub admin_socket: Option<PathBuf>,
}

impl Default for InterpreterOptions {
    fn default() -> Self {
        Self {
            listen: IpAddr::from([0, 0, 0, 0]),
            port: DEFAULT_PORT,
            access_token: None,
            python: "python3".into(),
            user: "user".into(),
            cwd: None,
            runtime_dir: "/run/roost-interpreter".into(),
            kernel_env: Vec::new(),
            kernel_start_timeout: Duration::from_secs(60),
            envd: Some(SocketAddr::from(([127, 0, 0, 1], 49983))),
            admin_socket: None,
        }
    }
}

impl InterpreterOptions {
    /// Parses the flags after `interpreter`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Self::default();
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
                _ => (flag.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next().cloned())
                    .ok_or_else(|| format!("`{name}` needs a value"))
            };
            match name {
                "--port" => {
                    let v = value()?;
                    options.port = v.parse().map_err(|_| format!("bad --port `{v}`"))?;
                }
                "--listen" => {
                    let v = value()?;
                    options.listen = v.parse().map_err(|_| format!("bad --listen `{v}`"))?;
                }
                "--access-token" => options.access_token = Some(value()?),
                "--python" => options.python = value()?.into(),
                "--user" => options.user = value()?,
                "--cwd" => options.cwd = Some(value()?.into()),
                "--admin-socket" => options.admin_socket = Some(value()?.into()),
                "--runtime-dir" => options.runtime_dir = value()?.into(),
                "--envd" => {
                    let v = value()?;
                    options.envd = match v.as_str() {
                        "none" => None,
                        addr => Some(addr.parse().map_err(|_| format!("bad --envd `{v}`"))?),
                    };
                }
                "--kernel-env" => {
                    let v = value()?;
                    let (key, val) = v
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .ok_or_else(|| format!("--kernel-env wants KEY=VALUE, not `{v}`"))?;
                    options.kernel_env.push((key.to_owned(), val.to_owned()));
                }
                "--kernel-start-timeout" => {
                    let v = value()?;
                    let seconds: u64 = v
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| format!("bad --kernel-start-timeout `{v}`"))?;
                    options.kernel_start_timeout = Duration::from_secs(seconds);
                }
                other => return Err(format!("unknown flag `{other}` for `interpreter`")),
            }
        }
        if options.access_token.is_none() {
            options.access_token = std::env::var(ACCESS_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty());
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<InterpreterOptions, String> {
        InterpreterOptions::parse(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_are_the_guests() {
        let options = parse(&[]).unwrap();
        assert_eq!(options.port, 49999);
        assert_eq!(options.user, "user");
        assert_eq!(options.python, PathBuf::from("python3"));
    }

    #[test]
    fn flags_take_separate_or_inline_values() {
        let options = parse(&[
            "--port=0",
            "--access-token",
            "t0k",
            "--python",
            "/venv/bin/python",
            "--user=root",
            "--cwd",
            "/tmp",
            "--kernel-env",
            "A=b=c",
            "--listen",
            "127.0.0.1",
            "--kernel-start-timeout",
            "5",
            "--envd",
            "none",
            "--admin-socket",
            "/run/a.sock",
        ])
        .unwrap();
        assert_eq!(options.admin_socket, Some(PathBuf::from("/run/a.sock")));
        assert_eq!(options.port, 0);
        assert_eq!(options.access_token.as_deref(), Some("t0k"));
        assert_eq!(options.python, PathBuf::from("/venv/bin/python"));
        assert_eq!(options.user, "root");
        assert_eq!(options.cwd, Some(PathBuf::from("/tmp")));
        assert_eq!(options.kernel_env, vec![("A".into(), "b=c".into())]);
        assert_eq!(options.listen, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(options.kernel_start_timeout, Duration::from_secs(5));
        assert_eq!(options.envd, None);
        assert_eq!(
            parse(&["--envd", "127.0.0.1:1"]).unwrap().envd,
            Some(SocketAddr::from(([127, 0, 0, 1], 1)))
        );
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            &["--port"][..],
            &["--port", "70000"],
            &["--bogus"],
            &["--kernel-env", "=x"],
            &["--kernel-start-timeout", "0"],
            &["--listen", "nowhere"],
            &["--envd", "localhost"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}
