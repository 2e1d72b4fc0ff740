//! The official `e2b-code-interpreter` SDK against `roost-agent interpreter`.
//!
//! Starts the interpreter on its fixed port 49999 (hence the `sdk_` name: CI runs these one at
//! a time) with kernels from the SDK venv (`$ROOST_SDK_PYTHON`, see `.ci/dev`), then runs
//! `tests/sdk/test_*interpreter*.py` with pytest and `E2B_DEBUG=true`, which makes the SDK talk
//! to localhost:49999 with no control plane. The SDK needs no envd (port 49983) for this.
//! Fails, saying what to install, without the venv.

mod interpreter_support;

use std::path::PathBuf;
use std::process::Command;

use interpreter_support::{Interpreter, sdk_python};

#[test]
fn sdk_interpreter_official_sdk_suite_passes() {
    let python = sdk_python();
    let sdk_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&sdk_dir)
        .expect("tests/sdk")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("test_") && n.contains("interpreter") && n.ends_with(".py")
            })
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no test_*interpreter*.py in {}",
        sdk_dir.display()
    );

    let interpreter = Interpreter::start(49999, &[]);
    assert_eq!(interpreter.addr.port(), 49999);
    let status = Command::new(&python)
        .args(["-m", "pytest", "-v", "-p", "no:cacheprovider"])
        .arg(format!(
            "--basetemp={}",
            interpreter.dir.path().join("pytest").display()
        ))
        .args(&files)
        .current_dir(&sdk_dir)
        .env("E2B_DEBUG", "true")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .expect("run pytest");
    assert!(status.success(), "the SDK tests failed: {status}");
}
