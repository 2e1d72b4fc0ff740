//! The official `e2b` SDK against `roost-agent serve`.
//!
//! Starts the agent on its fixed port 49983 (hence the `sdk_` name: CI runs these one at a
//! time) with `--root` a fresh directory owned by `user` (created with `useradd` if the
//! machine lacks it), then runs `tests/sdk/test_envd*.py` with the SDK venv's python
//! (`$ROOST_SDK_PYTHON`) and `E2B_DEBUG=true`, which makes the SDK talk to localhost:49983
//! with no control plane: once over HTTP/2 (h2c, the SDK's default) and once over HTTP/1.1
//! (`E2B_HTTP_VERSION=1.1`: chunked request bodies). Fails, saying what to install, without
//! the venv.

mod envd_support;

use std::path::PathBuf;
use std::process::Command;

use envd_support::{Agent, sdk_python};

#[test]
fn sdk_envd_official_sdk_suite_passes() {
    let python = sdk_python();
    let sdk_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&sdk_dir)
        .expect("tests/sdk")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("test_envd") && n.ends_with(".py"))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no test_envd*.py in {}",
        sdk_dir.display()
    );

    let agent = Agent::start(49983, &[]);
    for http_version in ["2", "1.1"] {
        let status = Command::new(&python)
            .args(["-m", "pytest", "-v", "-p", "no:cacheprovider"])
            .arg(format!(
                "--basetemp={}",
                agent.root_path().join(".pytest").display()
            ))
            .args(&files)
            .current_dir(&sdk_dir)
            .env("E2B_DEBUG", "true")
            .env("E2B_HTTP_VERSION", http_version)
            .env("ROOST_ENVD_ROOT", agent.root_path())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .status()
            .expect("run pytest");
        assert!(
            status.success(),
            "the SDK tests failed over HTTP/{http_version}: {status}"
        );
    }
}
