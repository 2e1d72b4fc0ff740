//! Runs the external tools a build needs (make, debootstrap, mkfs.ext4, ...) with their whole
//! output kept in a log file and fed to a progress [`Task`], and with errors that show the tail
//! of that log so the reader sees why a tool failed without opening it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use crate::progress::Task;

/// Lines of output kept for error messages.
const TAIL_LINES: usize = 30;

/// Errors running an external tool.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "cannot start `{program}`: is it installed? (`.ci/dev setup` installs the build tools)"
    )]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the build log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{program}` failed with {status}; full log: {log}\n--- last lines ---\n{tail}")]
    Failed {
        program: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
}

/// Runs `command`, appending its stdout and stderr to `log` and passing each line to `task`
/// and to `on_line`. Succeeds only if the command exits with status 0.
pub fn run_logged(
    command: &mut Command,
    task: &Task,
    log: &Path,
    mut on_line: impl FnMut(&str) + Send,
) -> Result<(), RunError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| RunError::Log {
            path: log.to_owned(),
            source,
        })?;
    let log_file = Arc::new(Mutex::new(log_file));
    {
        let mut f = log_file.lock().expect("log lock");
        let _ = writeln!(f, "$ {command:?}");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: program.clone(),
            source,
        })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let tail = Mutex::new(VecDeque::with_capacity(TAIL_LINES));
    let on_line = Mutex::new(&mut on_line);

    let pump = |reader: Box<dyn io::Read + Send>| {
        for line in BufReader::new(reader).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            {
                let mut f = log_file.lock().expect("log lock");
                let _ = writeln!(f, "{line}");
            }
            task.output_line(&line);
            (on_line.lock().expect("callback lock"))(&line);
            let mut tail = tail.lock().expect("tail lock");
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.into_owned());
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(|| pump(Box::new(stderr)));
        pump(Box::new(stdout));
    });
    let status = child.wait().map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    let tail = tail
        .into_inner()
        .expect("tail lock")
        .into_iter()
        .collect::<Vec<_>>()
        .join("\n");
    Err(RunError::Failed {
        program,
        status,
        log: log.to_owned(),
        tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Progress;

    #[test]
    fn success_logs_output_and_reports_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let task = Progress::silent().task("t");
        let mut lines = Vec::new();
        run_logged(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            &task,
            &log,
            |l| lines.push(l.to_owned()),
        )
        .unwrap();
        lines.sort();
        assert_eq!(lines, ["err", "out"]);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("out") && text.contains("err"));
    }

    #[test]
    fn failure_carries_exit_status_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let task = Progress::silent().task("t");
        let err = run_logged(
            Command::new("sh").args(["-c", "echo why-it-failed; exit 3"]),
            &task,
            &dir.path().join("log"),
            |_| {},
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.contains("why-it-failed"), "{message}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let task = Progress::silent().task("t");
        let err = run_logged(
            &mut Command::new("roost-no-such-tool"),
            &task,
            &dir.path().join("log"),
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, RunError::Spawn { .. }));
    }
}
