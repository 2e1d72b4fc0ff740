//! Integration tests that run one shell script inside the host VM and check what it reports.
//!
//! Each host-VM boot costs tens of seconds, so such tests put many checks into one script that
//! prints `RESULT <key> <value>` lines (and any diagnostics) on stdout; the test then asserts on
//! the values by key. This module holds the shared half: making sure the artefacts the script
//! needs are built, running it, and reading the results back.

use std::collections::BTreeMap;

use roost_images::{ArtefactIndex, Cache};

use crate::{HostVm, HostVmError};

/// The longest a host-VM test's run may take: below the CI runner's kill (600 s in
/// `.ci/nextest.toml`), so that a hung run ends with the test's own report (the command's
/// output so far and the console) instead of being killed silently. Every such test
/// normally finishes in under 90 s here.
pub const TEST_LIMIT: std::time::Duration = std::time::Duration::from_secs(540);

/// How often a script runs again in a fresh host VM when the host VM wedges (TCG hangs a vCPU
/// now and then; the run is reported as [`HostVmError::Unresponsive`] a minute later). Scripts
/// start from a fresh host VM each time, so running one again is safe.
pub const WEDGE_RETRIES: u32 = 2;

/// Errors before or while running a script.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("no artefact cache")]
    Cache(#[from] roost_images::CacheError),
    #[error("the script needs the `{name}` artefact (run `roost images build`)")]
    MissingArtefact {
        name: String,
        #[source]
        source: roost_images::IndexError,
    },
    #[error("cannot find the running test executable")]
    CurrentExe(#[source] std::io::Error),
    #[error("the host VM run failed (release binaries are needed: cargo build --release)")]
    HostVm(#[from] HostVmError),
}

/// What a script printed, with its `RESULT` lines parsed.
#[derive(Debug, Clone)]
pub struct ScriptRun {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    /// Runs abandoned because the host VM wedged before this one completed.
    pub wedged_runs: u32,
    results: BTreeMap<String, String>,
}

impl ScriptRun {
    /// Checks that every artefact in `needs` is built, then runs `script` with `sh -c` in the
    /// host VM that `builder` describes, capturing its output.
    pub fn run(builder: HostVm, script: &str, needs: &[&str]) -> Result<Self, ScriptError> {
        let index = ArtefactIndex::new(&Cache::from_env()?);
        for name in needs {
            index
                .lookup(name)
                .map_err(|source| ScriptError::MissingArtefact {
                    name: (*name).to_owned(),
                    source,
                })?;
        }
        let outcome = builder
            .capture_output()
            .retries_when_wedged(WEDGE_RETRIES)
            .run(["sh", "-c", script])?;
        Ok(Self::from_outcome(&outcome))
    }

    /// Runs the test `test` (an `#[ignore]`d probe) of the calling test executable inside the
    /// host VM that `builder` describes, which must make that executable available (e.g.
    /// `.binaries(vec![std::env::current_exe()?, ...])`), and parses what it printed. The
    /// probe prints `RESULT <key> <value>` lines like a script does.
    pub fn run_probe(builder: HostVm, test: &str) -> Result<Self, ScriptError> {
        let exe = std::env::current_exe().map_err(ScriptError::CurrentExe)?;
        let name = exe
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let outcome = builder
            .capture_output()
            .retries_when_wedged(WEDGE_RETRIES)
            .run([name.as_str(), "--exact", test, "--ignored", "--nocapture"])?;
        Ok(Self::from_outcome(&outcome))
    }

    fn from_outcome(outcome: &crate::RunOutcome) -> Self {
        if outcome.wedged_runs > 0 {
            eprintln!(
                "note: the host VM wedged {} time(s) and the script ran again in a fresh one",
                outcome.wedged_runs
            );
        }
        Self {
            wedged_runs: outcome.wedged_runs,
            ..Self::from_output(
                String::from_utf8_lossy(&outcome.stdout).into_owned(),
                String::from_utf8_lossy(&outcome.stderr).into_owned(),
                outcome.exit_code,
            )
        }
    }

    /// Parses output already captured.
    pub fn from_output(stdout: String, stderr: String, exit_code: i32) -> Self {
        let results = stdout
            .lines()
            .filter_map(|line| line.strip_prefix("RESULT "))
            .map(|rest| rest.split_once(' ').unwrap_or((rest, "")))
            .map(|(key, value)| (key.to_owned(), value.trim().to_owned()))
            .collect();
        Self {
            stdout,
            stderr,
            exit_code,
            wedged_runs: 0,
            results,
        }
    }

    /// The value the script reported for `key` (the last one if reported twice).
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// The value for `key`; panics with the whole transcript when the script never reported
    /// it, which is what a test wants.
    pub fn expect_result(&self, key: &str) -> &str {
        self.result(key)
            .unwrap_or_else(|| panic!("no result `{key}`; {}", self.transcript()))
    }

    /// The stdout lines that start with `prefix`, without it, joined by newlines.
    pub fn lines_after(&self, prefix: &str) -> String {
        self.stdout
            .lines()
            .filter_map(|line| line.strip_prefix(prefix))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Both streams, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "exit code {} (after {} run(s) lost to a wedged host VM)\nstdout:\n{}\nstderr:\n{}",
            self.exit_code, self.wedged_runs, self.stdout, self.stderr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_parsed_by_key_and_other_lines_kept() {
        let run = ScriptRun::from_output(
            "noise\nRESULT echo 0\nRESULT out  hello world \nRESULT empty\nSTDERR a: x\nSTDERR a: y\nRESULT echo 1\n"
                .to_owned(),
            String::new(),
            0,
        );
        assert_eq!(run.result("echo"), Some("1"));
        assert_eq!(run.result("out"), Some("hello world"));
        assert_eq!(run.result("empty"), Some(""));
        assert_eq!(run.result("missing"), None);
        assert_eq!(run.lines_after("STDERR a: "), "x\ny");
    }

    #[test]
    #[should_panic(expected = "no result `absent`")]
    fn expect_result_names_the_missing_key() {
        ScriptRun::from_output(String::new(), String::new(), 0).expect_result("absent");
    }
}
